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
//!
//! Failures in a row miss an endpoint that fails one request in ten at random: a success
//! soon breaks every run. So, as Envoy does, the detector also compares the endpoints with
//! each other once per interval, over the requests each finished in that interval: *success
//! rate* ejection takes out those far below the pool's mean, *failure percentage* ejection
//! (off by default) those above a fixed share. The counts come from the endpoint's cumulative
//! counters ([`EndpointState::errors`], its latency histogram's count), read and remembered by
//! the task at each interval: the request path keeps no per-interval counter of its own and
//! nothing is reset under it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::HealthChange;
use crate::endpoint::state::{PoolShared, StatusClassifier, GRPC_CODES_SET};
use crate::endpoint::{Endpoint, EndpointId, EndpointState};
use crate::grpc::FailureCodes;
use crate::pool::PoolTask;
use crate::pool::{Pool, WeakPool};
use crate::strategy::Strategy;

/// Ejects endpoints whose requests fail too often: in a row (Envoy's `consecutive_5xx`), or,
/// compared with the rest of the pool over an interval, by success rate (Envoy's
/// `success_rate`) or failure percentage (Envoy's `failure_percentage`). An ejection lasts a
/// time that grows with each ejection.
///
/// | setting | default | |
/// |---|---|---|
/// | `consecutive_failures` | 5 | failed requests in a row that eject an endpoint |
/// | `interval` | 10 s | how often success rates and failure percentages are evaluated |
/// | `success_rate_stdev_factor` | 1.9 | eject below mean − factor × σ of the pool's success rates |
/// | `success_rate_request_volume` | 100 | requests in the interval for an endpoint to count |
/// | `success_rate_minimum_hosts` | 5 | endpoints with that volume for the rule to apply |
/// | `failure_percentage` | off | eject at or above this share of failed requests (Envoy's threshold is 85) |
/// | `failure_percentage_request_volume` | 50 | requests in the interval for an endpoint to count |
/// | `failure_percentage_minimum_hosts` | 5 | endpoints with that volume for the rule to apply |
/// | `base_ejection_time` | 30 s | the first ejection's length |
/// | `max_ejection_time` | 300 s | the longest ejection |
/// | `max_ejection_percent` | 10 | the most endpoints ejected at once, in percent of the pool |
///
/// The defaults are Envoy's, except that success-rate ejection is on (as in Envoy, whose
/// `enforcing_success_rate` is 100 %) and failure-percentage ejection off (Envoy's
/// `enforcing_failure_percentage` is 0 %). Success rate is relative: a pool where every
/// endpoint fails one request in ten (a bad release everywhere) ejects none, since none
/// stands out; failure percentage is absolute, and would eject them all (up to
/// `max_ejection_percent`) at a threshold under 10. Mind that with σ taken over the pool, as
/// Envoy does, one endpoint of `n` can lie at most `(n − 1) / √n` σ below the mean: with the
/// default factor of 1.9, success-rate ejection needs six endpoints with enough traffic.
///
/// The `n`-th ejection of an endpoint lasts `base_ejection_time × n`, capped at
/// `max_ejection_time`; each `base_ejection_time` an endpoint then spends in the pool without
/// being ejected takes one off `n` again. At most `max_ejection_percent` of the pool's
/// endpoints (rounded down) are ejected at once, but always at least one may be, as in Envoy
/// (the worst go first); an endpoint that reaches the threshold while the limit is reached
/// stays and starts counting again. Returning endpoints start counting from zero (and ramp up
/// if [`SlowStart`](super::SlowStart) runs). An ejection ends early when a
/// [`HealthChecker`](super::HealthChecker) had marked the endpoint down and sees it up again
/// (a backend restarted after it died).
///
/// What counts as a failure is what the balancer counts: errors of the endpoint's service,
/// and for HTTP balancers 5xx responses (or [`failure_status`](OutlierDetection::failure_status)).
/// A `429` or `503` with `Retry-After` is not one (see
/// [`EndpointState::throttled`]) and does not count in an interval's requests either.
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
///     // Also eject any endpoint failing half of its requests over 10 s.
///     .failure_percentage(50)
///     .spawn(&pool);
/// # task.abort();
/// # }
/// ```
#[derive(Clone)]
pub struct OutlierDetection {
    consecutive_failures: u32,
    interval: Duration,
    success_rate: Option<SuccessRate>,
    failure_percentage: FailurePercentage,
    base_ejection_time: Duration,
    max_ejection_time: Duration,
    max_ejection_percent: u8,
    classifier: Option<Arc<Box<StatusClassifier>>>,
    grpc_codes: FailureCodes,
    trigger: Arc<TriggerShared>,
}

/// The success-rate rule's settings.
#[derive(Clone, Copy, Debug)]
struct SuccessRate {
    stdev_factor: f64,
    request_volume: u64,
    minimum_hosts: usize,
}

/// The failure-percentage rule's settings; `threshold` `None` when off.
#[derive(Clone, Copy, Debug)]
struct FailurePercentage {
    threshold: Option<u8>,
    request_volume: u64,
    minimum_hosts: usize,
}

impl fmt::Debug for OutlierDetection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutlierDetection")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("interval", &self.interval)
            .field("success_rate", &self.success_rate)
            .field("failure_percentage", &self.failure_percentage)
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
            interval: Duration::from_secs(10),
            success_rate: Some(SuccessRate {
                stdev_factor: 1.9,
                request_volume: 100,
                minimum_hosts: 5,
            }),
            failure_percentage: FailurePercentage {
                threshold: None,
                request_volume: 50,
                minimum_hosts: 5,
            },
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            classifier: None,
            grpc_codes: FailureCodes::DEFAULT,
            trigger: Arc::new(TriggerShared::new()),
        }
    }

    /// Sets how many failed requests in a row eject an endpoint (default 5, at least 1).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n.max(1);
        self
    }

    /// Sets how often success rates and failure percentages are evaluated, each time over the
    /// requests finished since the last evaluation (default 10 s, as Envoy's `interval`; at
    /// least 1 ms). See [`OutlierDetection::trigger`] to evaluate at a moment of your choice.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Turns success-rate ejection on (the default) or off.
    pub fn success_rate_ejection(mut self, on: bool) -> Self {
        self.success_rate = on.then(|| {
            self.success_rate.unwrap_or(SuccessRate {
                stdev_factor: 1.9,
                request_volume: 100,
                minimum_hosts: 5,
            })
        });
        self
    }

    /// Sets the factor `k` of success-rate ejection: endpoints whose success rate over the
    /// interval is below `mean − k × σ` of the pool's are ejected (default 1.9, as Envoy's
    /// `stdev_factor` of 1900). Not finite or negative values leave it unchanged.
    pub fn success_rate_stdev_factor(mut self, k: f64) -> Self {
        if let Some(sr) = &mut self.success_rate {
            if k.is_finite() && k >= 0.0 {
                sr.stdev_factor = k;
            }
        }
        self
    }

    /// Sets how many requests an endpoint must finish in an interval for its success rate to
    /// count (default 100, as Envoy): fewer say too little.
    pub fn success_rate_request_volume(mut self, n: u64) -> Self {
        if let Some(sr) = &mut self.success_rate {
            sr.request_volume = n.max(1);
        }
        self
    }

    /// Sets how many endpoints must reach the request volume for success-rate ejection to
    /// apply at all (default 5, as Envoy; at least 2).
    pub fn success_rate_minimum_hosts(mut self, n: usize) -> Self {
        if let Some(sr) = &mut self.success_rate {
            sr.minimum_hosts = n.max(2);
        }
        self
    }

    /// Turns failure-percentage ejection on: endpoints that failed at least `percent` of the
    /// requests they finished in an interval are ejected, whatever the others do (off by
    /// default, as in Envoy; Envoy's threshold is 85). 0 turns it off again; above 100 means
    /// 100.
    pub fn failure_percentage(mut self, percent: u8) -> Self {
        self.failure_percentage.threshold = (percent > 0).then_some(percent.min(100));
        self
    }

    /// Sets how many requests an endpoint must finish in an interval for its failure
    /// percentage to count (default 50, as Envoy).
    pub fn failure_percentage_request_volume(mut self, n: u64) -> Self {
        self.failure_percentage.request_volume = n.max(1);
        self
    }

    /// Sets how many endpoints must reach that volume for failure-percentage ejection to
    /// apply (default 5, as Envoy; at least 1).
    pub fn failure_percentage_minimum_hosts(mut self, n: usize) -> Self {
        self.failure_percentage.minimum_hosts = n.max(1);
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
    /// use lbkit::grpc::{Code, FailureCodes};
    /// use lbkit::health::OutlierDetection;
    ///
    /// // Also count UNKNOWN, which these servers answer only when they are broken.
    /// let detection = OutlierDetection::new()
    ///     .failure_grpc_codes(FailureCodes::DEFAULT.with(Code::UNKNOWN));
    /// # drop(detection);
    /// ```
    pub fn failure_grpc_codes(mut self, codes: FailureCodes) -> Self {
        self.grpc_codes = codes;
        self
    }

    /// A handle that makes the detector spawned from this configuration evaluate success
    /// rates and failure percentages now, rather than at the end of its interval: for tests
    /// that must not depend on timing, and for operators. Take it before
    /// [`spawn`](OutlierDetection::spawn).
    pub fn trigger(&self) -> OutlierTrigger {
        OutlierTrigger {
            shared: self.trigger.clone(),
        }
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
        // The first interval counts from now, not from when each endpoint joined.
        let baselines = pool
            .members()
            .iter()
            .map(|(e, s)| (e.id().clone(), Baseline::of(s)))
            .collect();
        let detector = Detector {
            pool: pool.downgrade(),
            shared,
            next_interval: Instant::now() + self.interval,
            config: self,
            records: HashMap::new(),
            baselines,
        };
        PoolTask::new(tokio::spawn(detector.run()))
    }
}

/// What an [`OutlierTrigger`] and its detector share.
#[derive(Debug)]
struct TriggerShared {
    /// Evaluations asked for so far.
    requested: AtomicU64,
    /// Wakes the detector when one is asked for.
    wake: Notify,
    /// Where the detector is: see [`Progress`].
    done: watch::Sender<Progress>,
}

impl TriggerShared {
    fn new() -> Self {
        TriggerShared {
            requested: AtomicU64::new(0),
            wake: Notify::new(),
            done: watch::channel(Progress {
                served: 0,
                evaluations: 0,
                running: true,
            })
            .0,
        }
    }
}

/// How far the detector got.
#[derive(Clone, Copy, Debug)]
struct Progress {
    /// Every evaluation asked for up to this one is done.
    served: u64,
    /// Evaluations done, on the interval or asked for.
    evaluations: u64,
    /// Whether the detector still runs.
    running: bool,
}

/// Makes an [`OutlierDetection`] task evaluate success rates and failure percentages now (see
/// [`OutlierDetection::trigger`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct OutlierTrigger {
    shared: Arc<TriggerShared>,
}

impl OutlierTrigger {
    /// Asks the detector for an evaluation over the requests finished since its last one and
    /// waits until it is done (its ejections made), which starts a new interval. Every request
    /// that finished before this call counts in it. Returns `false` if the detector has
    /// stopped (its pool was dropped or its task aborted); waits for it to start if it has
    /// not been spawned yet.
    pub async fn evaluate(&self) -> bool {
        let mut done = self.shared.done.subscribe();
        let ticket = self.shared.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.wake.notify_one();
        done.wait_for(|p| p.served >= ticket || !p.running)
            .await
            .is_ok_and(|p| p.served >= ticket)
    }

    /// How many evaluations the detector has done so far, on its interval or asked for.
    pub fn evaluations(&self) -> u64 {
        self.shared.done.borrow().evaluations
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

/// An endpoint's cumulative counters at the last evaluation.
struct Baseline {
    state: Arc<EndpointState>,
    /// Requests finished with a success or a failure.
    finished: u64,
    /// Of those, failures.
    errors: u64,
}

impl Baseline {
    /// The counters of `state` now.
    fn of(state: &Arc<EndpointState>) -> Self {
        // Errors first: a request that finishes between the reads is then counted as finished
        // and not failed, rather than failed and not finished (a share above 100 %).
        let errors = state.errors();
        let finished = state
            .latency_histogram()
            .count()
            .saturating_sub(state.throttled());
        Baseline {
            state: state.clone(),
            finished,
            errors,
        }
    }
}

/// Why an endpoint is ejected.
#[derive(Clone, Copy, Debug)]
enum Cause {
    ConsecutiveFailures,
    SuccessRate { rate: f64, threshold: f64 },
    FailurePercentage { percent: f64 },
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::ConsecutiveFailures => f.write_str("consecutive failures"),
            Cause::SuccessRate { rate, threshold } => write!(
                f,
                "success rate {:.1} % below the pool's threshold of {:.1} %",
                rate * 100.0,
                threshold * 100.0
            ),
            Cause::FailurePercentage { percent } => {
                write!(f, "{percent:.1} % of requests failed")
            }
        }
    }
}

/// One endpoint's requests over an interval.
struct IntervalCount {
    index: usize,
    finished: u64,
    errors: u64,
}

impl IntervalCount {
    fn success_rate(&self) -> f64 {
        (self.finished - self.errors.min(self.finished)) as f64 / self.finished as f64
    }
}

struct Detector<S: Clone, St: Strategy> {
    pool: WeakPool<S, St>,
    shared: Arc<PoolShared>,
    config: OutlierDetection,
    records: HashMap<EndpointId, Record>,
    baselines: HashMap<EndpointId, Baseline>,
    /// When the current interval ends.
    next_interval: Instant,
}

type Members = Vec<(Arc<Endpoint>, Arc<EndpointState>)>;

impl<S, St> Detector<S, St>
where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
{
    async fn run(mut self) {
        let shared = self.shared.clone();
        let trigger = self.config.trigger.clone();
        loop {
            // Register first: a wake-up while we look is kept for the wait below.
            let notified = shared.outlier_wake.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let asked = trigger.wake.notified();
            let mut asked = std::pin::pin!(asked);
            asked.as_mut().enable();
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            let next = self.pass(&pool);
            drop(pool);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = notified => {}
                _ = asked => {}
            }
        }
    }

    /// Lets due endpoints return, ejects those over the threshold of failures in a row, and
    /// at the end of an interval (or when asked) those that stand out over it; returns when
    /// to look again.
    fn pass(&mut self, pool: &Pool<S, St>) -> Instant {
        let now = Instant::now();
        for (id, r) in &mut self.records {
            if r.until.is_some_and(|t| t <= now) {
                r.until = None;
                r.since = now;
                r.state.forget_failures();
                pool.mark(id, Some(&r.state), HealthChange::Returned);
            }
        }
        let members = pool.members();
        let is_member = |id: &EndpointId, state: &Arc<EndpointState>| {
            members
                .iter()
                .any(|(e, s)| e.id() == id && Arc::ptr_eq(s, state))
        };
        self.records.retain(|id, r| is_member(id, &r.state));
        self.baselines.retain(|id, b| is_member(id, &b.state));
        let limit = (members.len() * usize::from(self.config.max_ejection_percent) / 100).max(1);
        let mut ejected = members.iter().filter(|(_, s)| s.is_ejected()).count();

        let threshold = self.config.consecutive_failures;
        for (endpoint, state) in &members {
            let failures = state.consecutive_failures();
            if failures < threshold || state.is_ejected() {
                continue;
            }
            state.reset_failures();
            self.eject(
                pool,
                endpoint,
                state,
                Cause::ConsecutiveFailures,
                now,
                limit,
                &mut ejected,
            );
        }

        // Read before the counters: every request finished before an evaluation was asked
        // for is then counted in this one.
        let asked = self.config.trigger.requested.load(Ordering::Acquire);
        let served = self.config.trigger.done.borrow().served;
        if now >= self.next_interval || asked > served {
            self.evaluate_interval(pool, &members, now, limit, &mut ejected);
            self.next_interval = now + self.config.interval;
            self.config.trigger.done.send_modify(|p| {
                p.served = p.served.max(asked);
                p.evaluations += 1;
            });
        }
        self.records
            .values()
            .filter_map(|r| r.until)
            .fold(self.next_interval, Instant::min)
    }

    /// Success-rate and failure-percentage ejection over the requests finished since the
    /// last evaluation.
    fn evaluate_interval(
        &mut self,
        pool: &Pool<S, St>,
        members: &Members,
        now: Instant,
        limit: usize,
        ejected: &mut usize,
    ) {
        let mut counts = Vec::with_capacity(members.len());
        for (i, (endpoint, state)) in members.iter().enumerate() {
            let current = Baseline::of(state);
            let (finished, errors) = match self.baselines.get(endpoint.id()) {
                Some(b) => (
                    current.finished.saturating_sub(b.finished),
                    current.errors.saturating_sub(b.errors),
                ),
                // Joined during the interval: all it did, it did in the interval.
                None => (current.finished, current.errors),
            };
            self.baselines.insert(endpoint.id().clone(), current);
            // Ejected and down endpoints get no traffic; they say nothing of the pool.
            if state.is_healthy() && finished > 0 {
                counts.push(IntervalCount {
                    index: i,
                    finished,
                    errors,
                });
            }
        }
        let mut outliers: Vec<(usize, Cause, f64)> = Vec::new();
        if let Some(sr) = self.config.success_rate {
            let valid: Vec<&IntervalCount> = counts
                .iter()
                .filter(|c| c.finished >= sr.request_volume)
                .collect();
            if valid.len() >= sr.minimum_hosts {
                let n = valid.len() as f64;
                let mean = valid.iter().map(|c| c.success_rate()).sum::<f64>() / n;
                let variance = valid
                    .iter()
                    .map(|c| (c.success_rate() - mean).powi(2))
                    .sum::<f64>()
                    / n;
                let threshold = mean - sr.stdev_factor * variance.sqrt();
                for c in valid {
                    let rate = c.success_rate();
                    // A margin for rounding: endpoints with equal rates never eject each other
                    // (their mean may come out a hair above them).
                    if rate < threshold - 1e-9 {
                        outliers.push((c.index, Cause::SuccessRate { rate, threshold }, rate));
                    }
                }
            }
        }
        let fp = self.config.failure_percentage;
        if let Some(percent) = fp.threshold {
            let valid: Vec<&IntervalCount> = counts
                .iter()
                .filter(|c| c.finished >= fp.request_volume)
                .collect();
            if valid.len() >= fp.minimum_hosts {
                for c in valid {
                    let failed = 100.0 * (1.0 - c.success_rate());
                    if failed >= f64::from(percent) && !outliers.iter().any(|o| o.0 == c.index) {
                        outliers.push((
                            c.index,
                            Cause::FailurePercentage { percent: failed },
                            1.0 - failed / 100.0,
                        ));
                    }
                }
            }
        }
        // The worst first, should the ejection limit stop some.
        outliers.sort_by(|a, b| a.2.total_cmp(&b.2));
        for (i, cause, _) in outliers {
            let (endpoint, state) = &members[i];
            self.eject(pool, endpoint, state, cause, now, limit, ejected);
        }
    }

    /// Ejects one endpoint, unless `limit` endpoints already are.
    #[allow(clippy::too_many_arguments)]
    fn eject(
        &mut self,
        pool: &Pool<S, St>,
        endpoint: &Endpoint,
        state: &Arc<EndpointState>,
        cause: Cause,
        now: Instant,
        limit: usize,
        ejected: &mut usize,
    ) {
        if *ejected >= limit {
            tracing::debug!(
                endpoint = %endpoint.id(), %cause, ejected = *ejected,
                "outlier not ejected: max_ejection_percent reached"
            );
            return;
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
        let consecutive_failures = match cause {
            Cause::ConsecutiveFailures => self.config.consecutive_failures,
            _ => state.consecutive_failures(),
        };
        let change = HealthChange::Ejected {
            consecutive_failures,
            duration: Some(duration),
        };
        tracing::info!(endpoint = %endpoint.id(), %cause, ?duration, "outlier detected");
        if pool.mark(endpoint.id(), Some(state), change) {
            *ejected += 1;
        }
    }
}

impl<S: Clone, St: Strategy> Drop for Detector<S, St> {
    fn drop(&mut self) {
        self.shared.outlier_threshold.store(0, Ordering::Relaxed);
        self.shared.classifier.store(None);
        self.config.trigger.done.send_modify(|p| p.running = false);
        // Stopped early: let the endpoints we ejected return.
        if let Some(pool) = self.pool.upgrade() {
            for (id, r) in &self.records {
                if r.until.is_some() {
                    r.state.forget_failures();
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
