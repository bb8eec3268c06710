use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

/// How many retries the failover layer may make, as a share of recent requests, so that
/// retries cannot multiply an outage.
///
/// When a backend fails, every request to it would otherwise be sent again, adding load
/// exactly when the system is weakest; with all backends failing, `n` attempts per request
/// multiply the traffic by `n`. A budget caps retries at a percentage of the requests seen
/// in a sliding window (plus a small reserve per second for quiet periods); past it, a failure
/// is returned as is. It is tower's [`TpsBudget`] (Finagle's design), plus counters of
/// retries made and refused.
///
/// Share one budget (it is inside an `Arc` in the layer) between every clone of a service.
///
/// ```
/// use std::time::Duration;
/// use lbkit::failover::RetryBudget;
///
/// // Retries up to 20 % of the requests of the last 10 s, plus 10 per second.
/// let budget = RetryBudget::default();
/// budget.deposit();
/// assert!(budget.withdraw());
/// // No reserve, one retry per 10 requests.
/// let strict = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
/// assert!(!strict.withdraw());
/// assert_eq!(strict.refused(), 1);
/// ```
pub struct RetryBudget {
    tps: Option<TpsBudget>,
    retries: AtomicU64,
    refused: AtomicU64,
}

impl RetryBudget {
    /// A budget over a window of `ttl` (1 to 60 s) that allows `retry_percent` retries per
    /// request (0.2 = one retry for every five requests; up to 1000) plus `min_per_sec` retries
    /// per second whatever the traffic.
    ///
    /// # Panics
    ///
    /// If `ttl` is not between 1 and 60 seconds or `retry_percent` not between 0 and 1000
    /// (as [`TpsBudget::new`]).
    pub fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        RetryBudget {
            tps: Some(TpsBudget::new(ttl, min_per_sec, retry_percent)),
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// No limit: every failure that the policy allows is retried. For tests and for callers
    /// with a limit of their own.
    pub fn unlimited() -> Self {
        RetryBudget {
            tps: None,
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Records a request (the failover layer calls it once per request, not per retry).
    pub fn deposit(&self) {
        if let Some(b) = &self.tps {
            b.deposit();
        }
    }

    /// Takes one retry from the budget; `false` if there is none left.
    pub fn withdraw(&self) -> bool {
        let ok = match &self.tps {
            Some(b) => b.withdraw(),
            None => true,
        };
        let counter = if ok { &self.retries } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Retries granted so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Retries refused so far (failures returned because the budget was spent).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Default for RetryBudget {
    /// 20 % of the requests of the last 10 seconds, plus 10 retries per second (tower's and
    /// Finagle's default).
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("budget", &self.tps)
            .field("retries", &self.retries())
            .field("refused", &self.refused())
            .finish()
    }
}
