//! Fuzz target: see `lbkit_fuzz::proxy_protocol`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lbkit_fuzz::proxy_protocol(data));
