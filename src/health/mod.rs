//! Health: active checks, passive outlier detection, slow start and the panic threshold.
