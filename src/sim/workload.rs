use std::time::Duration;

/// The traffic of a simulation: how requests arrive, and how many.
///
/// - **Open loop** ([`Workload::open`]): requests arrive at a rate whatever happens to the
///   earlier ones (a Poisson process: independent arrivals, exponential gaps), as from many
///   independent users. A cap on requests in flight (default 10 000) holds arrivals back when
///   reached; a held request's latency counts from when it should have arrived, so waiting
///   for the cap is not hidden.
/// - **Closed loop** ([`Workload::closed`]): a fixed number of workers, each sending its next
///   request when the last one ends (after an optional think time), as a load generator does.
///
/// ```
/// use lbkit::sim::Workload;
///
/// let open = Workload::open(1_000.0).max_in_flight(500).requests(50_000);
/// let closed = Workload::closed(64).requests(10_000);
/// assert_eq!(open.request_count(), 50_000);
/// # let _ = closed;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub(crate) arrivals: Arrivals,
    pub(crate) requests: u64,
    pub(crate) keys: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Arrivals {
    Open { rate: f64, max_in_flight: usize },
    Closed { workers: usize, think: Duration },
}

impl Workload {
    /// Open-loop Poisson arrivals at `rate_per_sec` requests per second (1 000 requests by
    /// default).
    pub fn open(rate_per_sec: f64) -> Self {
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            1.0
        };
        Workload {
            arrivals: Arrivals::Open {
                rate,
                max_in_flight: 10_000,
            },
            requests: 1_000,
            keys: None,
        }
    }

    /// A closed loop of `workers` workers, each sending a request as soon as its last one
    /// ended (1 000 requests by default).
    pub fn closed(workers: usize) -> Self {
        Workload {
            arrivals: Arrivals::Closed {
                workers: workers.max(1),
                think: Duration::ZERO,
            },
            requests: 1_000,
            keys: None,
        }
    }

    /// Sets how many requests to send in all.
    pub fn requests(mut self, n: u64) -> Self {
        self.requests = n;
        self
    }

    /// Sets the cap on requests in flight of an open loop (no effect on a closed loop).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        if let Arrivals::Open { max_in_flight, .. } = &mut self.arrivals {
            *max_in_flight = n.max(1);
        }
        self
    }

    /// Sets the pause of a closed loop's workers between one response and their next request
    /// (no effect on an open loop).
    pub fn think_time(mut self, pause: Duration) -> Self {
        if let Arrivals::Closed { think, .. } = &mut self.arrivals {
            *think = pause;
        }
        self
    }

    /// Gives each request a hash key (in its [`PickHints`](crate::PickHints)), drawn
    /// uniformly among `n` keys, for consistent-hashing strategies. Without it requests have
    /// no key.
    pub fn hash_keys(mut self, n: u64) -> Self {
        self.keys = (n > 0).then_some(n);
        self
    }

    /// How many requests are sent in all.
    pub fn request_count(&self) -> u64 {
        self.requests
    }
}
