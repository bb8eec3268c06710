//! Passive health: outlier detection, Envoy style.
//!
//! The balancer already sees the outcome of every request it sends: its
//! [`InFlight`](crate::balance::InFlight) guard records a failure when the endpoint's service
//! fails, and, for HTTP balancers ([`CompleteOnBody`](crate::balance::CompleteOnBody), the default), when the
//! response is a 5xx (or has a status chosen by [`OutlierDetection::failure_status`]), a gRPC
//! call ends with a failing `grpc-status` (see [`OutlierDetection::failure_grpc_codes`]), or its
//! body fails. Each endpoint's state counts failures in a row with an atomic (any success
//! resets it), so watching costs the request path nothing more.
//!
//! Why not a tower layer around each endpoint's service? Such a layer sees neither body
//! errors nor what the balancer's completion policy counts as a failure, and it would need a
//! handle to a pool that does not exist yet when the pool's `make` function runs. Counting
//! where the balancer already observes outcomes composes with every endpoint service.
//!
//! When an endpoint reaches the threshold, the one response that reaches it wakes the
//! [`OutlierDetection`] task, which ejects the endpoint through the pool (a new snapshot, a
//! `tracing` event and a [`HealthEvent`](super::HealthEvent)) and lets it return when its
//! ejection time is over.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::HealthChange;
use crate::endpoint::state::{PoolShared, StatusClassifier, GRPC_CODES_SET};
use crate::endpoint::{EndpointId, EndpointState};
use crate::grpc::FailureCodes;
use crate::pool::PoolTask;
use crate::pool::{Pool, WeakPool};
use crate::strategy::Strategy;

/// Ejects endpoints whose requests fail too often in a row, for a time that grows with each
/// ejection (Envoy's `consecutive_5xx` outlier detection).
///
/// | setting | default | |
/// |---|---|---|
/// | `consecutive_failures` | 5 | failed requests in a row that eject an endpoint |
/// | `base_ejection_time` | 30 s | the first ejection's length |
/// | `max_ejection_time` | 300 s | the longest ejection |
/// | `max_ejection_percent` | 10 | the most endpoints ejected at once, in percent of the pool |
///
/// The `n`-th ejection of an endpoint lasts `base_ejection_time × n`, capped at
/// `max_ejection_time`; each `base_ejection_time` an endpoint then spends in the pool without
/// being ejected takes one off `n` again. At most `max_ejection_percent` of the pool's
/// endpoints (rounded down) are ejected at once, but always at least one may be, as in Envoy;
/// an endpoint that reaches the threshold while the limit is reached stays and starts
/// counting again. Returning endpoints start counting from zero (and ramp up if
/// [`SlowStart`](super::SlowStart) runs). An ejection ends early when a
/// [`HealthChecker`](super::HealthChecker) had marked the endpoint down and sees it up again
/// (a backend restarted after it died).
///
/// ```
/// use std::time::Duration;
/// use lbkit::{Pool, health::OutlierDetection, strategy::RoundRobin};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = Pool::new(RoundRobin::new(), |ep| ep.id().clone());
/// let task = OutlierDetection::new()
///     .consecutive_failures(3)
///     .base_ejection_time(Duration::from_secs(10))
///     // 502, 503 and 504 only, as Envoy's consecutive_gateway_failure.
///     .failure_status(|s| matches!(s.as_u16(), 502..=504))
///     .spawn(&pool);
/// # task.abort();
/// # }
/// ```
#[derive(Clone)]
pub struct OutlierDetection {
    consecutive_failures: u32,
    base_ejection_time: Duration,
    max_ejection_time: Duration,
    max_ejection_percent: u8,
    classifier: Option<Arc<Box<StatusClassifier>>>,
    grpc_codes: FailureCodes,
}

impl fmt::Debug for OutlierDetection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutlierDetection")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("base_ejection_time", &self.base_ejection_time)
            .field("max_ejection_time", &self.max_ejection_time)
            .field("max_ejection_percent", &self.max_ejection_percent)
            .field("failure_status", &self.classifier.as_ref().map(|_| ".."))
            .field("failure_grpc_codes", &self.grpc_codes)
            .finish()
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self::new()
    }
}

impl OutlierDetection {
    /// Outlier detection with Envoy's defaults (see the table above).
    pub fn new() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            classifier: None,
            grpc_codes: FailureCodes::DEFAULT,
        }
    }

    /// Sets how many failed requests in a row eject an endpoint (default 5, at least 1).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n.max(1);
        self
    }

    /// Sets the length of a first ejection (default 30 s); later ones are multiples of it.
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.base_ejection_time = time.max(Duration::from_millis(1));
        self
    }

    /// Sets the longest an ejection may last (default 300 s; never less than the base).
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// Sets the most endpoints that may be ejected at once, in percent of the pool (default
    /// 10, rounded down); at least one endpoint may always be ejected. With the default, a pool
    /// of up to 19 endpoints ejects at most one at a time: raise it for small pools where two
    /// backends may fail together (50 lets one of three, and two of four, go at once).
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent.min(100);
        self
    }

    /// Chooses which HTTP response statuses count as failures (default: 5xx) for balancers
    /// with HTTP completion ([`CompleteOnBody`](crate::balance::CompleteOnBody), the default). This also decides what counts in
    /// [`EndpointState::errors`]. Errors of the endpoint's service always count.
    pub fn failure_status(
        mut self,
        is_failure: impl Fn(http::StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.classifier = Some(Arc::new(Box::new(is_failure)));
        self
    }

    /// Chooses which gRPC status codes count as failures (default
    /// [`FailureCodes::DEFAULT`]: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`; not
    /// `RESOURCE_EXHAUSTED`, which is overload) for HTTP balancers
    /// ([`CompleteOnBody`](crate::balance::CompleteOnBody), the default). A gRPC call's status
    /// arrives in the
    /// `grpc-status` trailer (or header, for a trailers-only answer) of an HTTP 200, which
    /// [`failure_status`](Self::failure_status) never sees.
    ///
    /// ```
    /// use lbkit::grpc::{code, FailureCodes};
    /// use lbkit::health::OutlierDetection;
    ///
    /// // Also count UNKNOWN, which these servers answer only when they are broken.
    /// let detection = OutlierDetection::new()
    ///     .failure_grpc_codes(FailureCodes::DEFAULT.with(code::UNKNOWN));
    /// # drop(detection);
    /// ```
    pub fn failure_grpc_codes(mut self, codes: FailureCodes) -> Self {
        self.grpc_codes = codes;
        self
    }

    /// How long the `n`-th ejection in a row lasts.
    fn ejection_time(&self, n: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(n.max(1))
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }

    /// Starts outlier detection on `pool` (for every balancer over it) until the pool is
    /// dropped or the returned task is aborted; aborting lets ejected endpoints return. Must
    /// be called from within a tokio runtime. Run one per pool.
    pub fn spawn<S, St>(self, pool: &Pool<S, St>) -> PoolTask
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let shared = pool.shared().clone();
        shared.classifier.store(self.classifier.clone());
        shared
            .grpc_failures
            .store(self.grpc_codes.bits() | GRPC_CODES_SET, Ordering::Relaxed);
        shared
            .outlier_threshold
            .store(self.consecutive_failures, Ordering::Relaxed);
        let detector = Detector {
            pool: pool.downgrade(),
            shared,
            config: self,
            records: HashMap::new(),
        };
        PoolTask::new(tokio::spawn(detector.run()))
    }
}

/// What the detector remembers of an endpoint it ejected.
struct Record {
    state: Arc<EndpointState>,
    /// Ejections so far, less those forgiven.
    ejections: u32,
    /// When the current ejection ends.
    until: Option<Instant>,
    /// When the endpoint last returned (or was first seen).
    since: Instant,
}

struct Detector<S: Clone, St: Strategy> {
    pool: WeakPool<S, St>,
    shared: Arc<PoolShared>,
    config: OutlierDetection,
    records: HashMap<EndpointId, Record>,
}

impl<S, St> Detector<S, St>
where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
{
    async fn run(mut self) {
        let shared = self.shared.clone();
        loop {
            // Register first: a wake-up while we look is kept for the wait below.
            let notified = shared.outlier_wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            let next = self.pass(&pool);
            drop(pool);
            match next {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }

    /// Lets due endpoints return and ejects those over the threshold; returns when the next
    /// ejection ends.
    fn pass(&mut self, pool: &Pool<S, St>) -> Option<Instant> {
        let now = Instant::now();
        for (id, r) in &mut self.records {
            if r.until.is_some_and(|t| t <= now) {
                r.until = None;
                r.since = now;
                r.state.reset_failures();
                pool.mark(id, Some(&r.state), HealthChange::Returned);
            }
        }
        let members = pool.members();
        self.records.retain(|id, r| {
            members
                .iter()
                .any(|(e, s)| e.id() == id && Arc::ptr_eq(s, &r.state))
        });
        let threshold = self.config.consecutive_failures;
        let limit = (members.len() * usize::from(self.config.max_ejection_percent) / 100).max(1);
        let mut ejected = members.iter().filter(|(_, s)| s.is_ejected()).count();
        for (endpoint, state) in &members {
            let failures = state.consecutive_failures();
            if failures < threshold || state.is_ejected() {
                continue;
            }
            state.reset_failures();
            if ejected >= limit {
                tracing::debug!(
                    endpoint = %endpoint.id(), failures, ejected,
                    "outlier not ejected: max_ejection_percent reached"
                );
                continue;
            }
            let r = self
                .records
                .entry(endpoint.id().clone())
                .or_insert_with(|| Record {
                    state: state.clone(),
                    ejections: 0,
                    until: None,
                    since: now,
                });
            let base = self.config.base_ejection_time.as_nanos().max(1);
            let forgiven = (now.saturating_duration_since(r.since).as_nanos() / base)
                .min(u128::from(u32::MAX)) as u32;
            r.ejections = r.ejections.saturating_sub(forgiven).saturating_add(1);
            let duration = self.config.ejection_time(r.ejections);
            r.until = Some(now + duration);
            let change = HealthChange::Ejected {
                consecutive_failures: failures,
                duration: Some(duration),
            };
            if pool.mark(endpoint.id(), Some(state), change) {
                ejected += 1;
            }
        }
        self.records.values().filter_map(|r| r.until).min()
    }
}

impl<S: Clone, St: Strategy> Drop for Detector<S, St> {
    fn drop(&mut self) {
        self.shared.outlier_threshold.store(0, Ordering::Relaxed);
        self.shared.classifier.store(None);
        // Stopped early: let the endpoints we ejected return.
        if let Some(pool) = self.pool.upgrade() {
            for (id, r) in &self.records {
                if r.until.is_some() {
                    r.state.reset_failures();
                    pool.mark(id, Some(&r.state), HealthChange::Returned);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejections_grow_linearly_up_to_the_cap() {
        let o = OutlierDetection::new();
        assert_eq!(o.ejection_time(1), Duration::from_secs(30));
        assert_eq!(o.ejection_time(3), Duration::from_secs(90));
        assert_eq!(o.ejection_time(11), Duration::from_secs(300));
        let o = o
            .base_ejection_time(Duration::from_secs(60))
            .max_ejection_time(Duration::from_secs(1));
        assert_eq!(o.ejection_time(2), Duration::from_secs(60));
    }
}
