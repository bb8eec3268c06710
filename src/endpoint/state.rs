use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use super::histogram::{HistogramSnapshot, LatencyHistogram};
use crate::grpc::FailureCodes;

/// The health of an endpoint as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Eligible for traffic.
    Healthy,
    /// Marked down by an active health check.
    Down,
    /// Ejected by passive outlier detection.
    Ejected,
}

const DOWN: u8 = 0b01;
const EJECTED: u8 = 0b10;

/// Decides whether an HTTP response status counts as a failure of the endpoint.
pub(crate) type StatusClassifier = dyn Fn(http::StatusCode) -> bool + Send + Sync;

/// The outcome of the latest active health check of an endpoint (see
/// [`EndpointState::last_check`]): what HAProxy's status page shows as `LastChk`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOutcome {
    /// When the check ended.
    pub at: Instant,
    /// How long it took (up to the check's timeout).
    pub took: Duration,
    /// Why it failed (the check error's text); `None` when it passed.
    pub error: Option<String>,
}

impl CheckOutcome {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        self.error.is_none()
    }
}

/// What all endpoints of one pool share: the pool-wide in-flight count, the wiring of
/// passive health (outlier detection), the failure penalty and the `Retry-After` back-off.
pub(crate) struct PoolShared {
    /// Requests in flight over the whole pool.
    pub(crate) in_flight: AtomicU64,
    /// Consecutive failures that wake the outlier detector; 0 while none runs.
    pub(crate) outlier_threshold: AtomicU32,
    /// Woken when an endpoint reaches `outlier_threshold` consecutive failures, and when the
    /// pool is dropped.
    pub(crate) outlier_wake: Notify,
    /// Which HTTP statuses count as failures; `None` means 5xx.
    pub(crate) classifier: ArcSwapOption<Box<StatusClassifier>>,
    /// The most requests one endpoint may have in flight; 0: no limit.
    pub(crate) max_requests: AtomicU64,
    /// Requests and readiness checks waiting for an endpoint under its limit; while any
    /// waits, every request that ends wakes them through `slot_freed`.
    pub(crate) waiters: AtomicU64,
    /// Woken (all waiters) when a request ends while some wait.
    pub(crate) slot_freed: Arc<Notify>,
    /// Requests waiting in the pool's queue (a subset of `waiters`).
    pub(crate) queued: AtomicU64,
    /// Which gRPC status codes count as failures: [`FailureCodes::bits`] with
    /// [`GRPC_CODES_SET`] added once chosen; 0 means [`FailureCodes::DEFAULT`].
    pub(crate) grpc_failures: AtomicU32,
    /// How much recent failures weigh in the load-aware strategies' cost, as `f64` bits: an
    /// endpoint's cost is multiplied by `1 + penalty × failure score`. 0 turns it off.
    pub(crate) failure_penalty: AtomicU64,
    /// The longest `Retry-After` honoured, in nanoseconds.
    pub(crate) retry_after_cap: AtomicU64,
    /// The latest `Retry-After` deadline of any endpoint of the pool (see [`clock_ns`]); 0 when
    /// none is pending. Picks read it to learn whether to check endpoints' own deadlines.
    pub(crate) backoff_until: AtomicU64,
}

/// The failure penalty of a new pool (see [`PoolShared::failure_penalty`]).
pub(crate) const DEFAULT_FAILURE_PENALTY: f64 = 20.0;

/// The longest `Retry-After` a new pool honours.
pub(crate) const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

impl Default for PoolShared {
    fn default() -> Self {
        PoolShared {
            in_flight: AtomicU64::new(0),
            outlier_threshold: AtomicU32::new(0),
            outlier_wake: Notify::new(),
            classifier: ArcSwapOption::empty(),
            failure_penalty: AtomicU64::new(DEFAULT_FAILURE_PENALTY.to_bits()),
            retry_after_cap: AtomicU64::new(DEFAULT_RETRY_AFTER_CAP.as_nanos() as u64),
            backoff_until: AtomicU64::new(0),
            max_requests: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            slot_freed: Arc::new(Notify::new()),
            queued: AtomicU64::new(0),
            grpc_failures: AtomicU32::new(0),
        }
    }
}

impl PoolShared {
    /// Sets the failure penalty (see [`PoolShared::failure_penalty`]); negative or not finite
    /// means off.
    pub(crate) fn set_failure_penalty(&self, penalty: f64) {
        let penalty = if penalty.is_finite() && penalty > 0.0 {
            penalty
        } else {
            0.0
        };
        self.failure_penalty
            .store(penalty.to_bits(), Ordering::Relaxed);
    }

    /// Sets the longest `Retry-After` honoured.
    pub(crate) fn set_retry_after_cap(&self, cap: Duration) {
        self.retry_after_cap.store(
            u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Now (see [`clock_ns`]) if some endpoint of the pool may be backed off at this instant,
    /// else 0. Clears the pool-wide deadline once it has passed, so that later picks read no
    /// clock.
    #[inline]
    pub(crate) fn backoff_now(&self) -> u64 {
        let until = self.backoff_until.load(Ordering::Relaxed);
        if until == 0 {
            return 0;
        }
        let now = clock_ns(now()).max(1);
        if now < until {
            return now;
        }
        // Every endpoint's deadline is at most the pool's: all are over. A deadline set
        // meanwhile is later, and the exchange then fails.
        let _ = self
            .backoff_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        0
    }
}

impl PoolShared {
    /// Wakes the waiters, if any, after a request left an endpoint's in-flight count.
    #[inline]
    fn wake_waiters(&self) {
        if self.max_requests.load(Ordering::Relaxed) != 0 {
            self.wake_all();
        }
    }

    /// Wakes the waiters, if any: a request ended, the endpoints changed, or the limit did.
    pub(crate) fn wake_all(&self) {
        // Pairs with the fence a waiter runs between counting itself in `waiters` and looking
        // at the in-flight counts: either it sees this request gone, or this sees it waiting.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Acquire) != 0 {
            self.slot_freed.notify_waiters();
        }
    }
}

/// Marks [`PoolShared::grpc_failures`] as chosen (so that "none" differs from "default").
pub(crate) const GRPC_CODES_SET: u32 = 1 << 31;

impl std::fmt::Debug for PoolShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolShared")
            .field("in_flight", &self.in_flight)
            .field("outlier_threshold", &self.outlier_threshold)
            .finish_non_exhaustive()
    }
}

/// Live, lock-free state of one endpoint: load, latency and health.
///
/// Every counter is an atomic; the balancer updates them on the request path and strategies
/// read them when picking. The state outlives re-weighting and survives in snapshots until the
/// endpoint's last in-flight request ends.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: AtomicU64,
    errors: AtomicU64,
    /// Requests the caller gave up on before the endpoint answered (a client that went away).
    cancelled: AtomicU64,
    /// Peak-EWMA of the round trip time in nanoseconds, stored as `f64` bits.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` last changed, in nanoseconds since [`clock_base`].
    ewma_at: AtomicU64,
    health: AtomicU8,
    /// Failed requests in a row (reset by any success), for outlier detection.
    consecutive_failures: AtomicU32,
    /// The recent share of failed requests, as `f64` bits (0 when none failed lately): a
    /// moving average over about the last [`FAILURE_WINDOW`] requests, decayed further while
    /// the endpoint gets none.
    failure_score: AtomicU64,
    /// When `failure_score` last changed (see [`clock_ns`]).
    failure_at: AtomicU64,
    /// Until when the endpoint asked not to be sent requests (`Retry-After`), in [`clock_ns`];
    /// 0 if it did not.
    backoff_until: AtomicU64,
    /// Responses that asked to be retried later (`429` or `503` with `Retry-After`).
    throttled: AtomicU64,
    /// When the current slow-start ramp began, in nanoseconds since [`clock_base`]; 0 when
    /// the endpoint is not ramping up.
    ramp_from: AtomicU64,
    /// When a health mark last changed, in nanoseconds since [`clock_base`]; 0 if never.
    health_changed_at: AtomicU64,
    /// The latest active health check, once one ran (written once per check, never on the
    /// request path).
    last_check: ArcSwapOption<CheckOutcome>,
    /// The latency of every finished request, in log-scale buckets.
    latency: LatencyHistogram,
    decay_ns: f64,
    /// What all endpoints of the pool share (the pool-wide in-flight count among others).
    shared: Arc<PoolShared>,
}

/// About how many recent requests the failure score averages over.
const FAILURE_WINDOW: f64 = 10.0;

/// The instant all state timestamps count from.
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds from [`clock_base`] to `at`.
pub(crate) fn clock_ns(at: Instant) -> u64 {
    at.saturating_duration_since(clock_base()).as_nanos() as u64
}

/// `exp(-x)` for `x >= 0`, the decay of the load estimates over a part `x` of their decay
/// window. Where `x` is small, the usual case on the request path (an endpoint that serves
/// even one request every few milliseconds was updated a tiny part of a 10 s window ago), a
/// Taylor polynomial replaces the library's `exp`, a call of some fifty instructions; its
/// error there (`x < 1/64`) is below `x⁵ / 120 < 1e-11`.
#[inline]
pub(crate) fn exp_neg(x: f64) -> f64 {
    if x < 1.0 / 64.0 {
        1.0 - x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0))))
    } else {
        (-x).exp()
    }
}

/// Now, for the request path's measurements (latency, peak-EWMA decay, slow start):
/// `Instant::now()`, or tokio's paused clock on a thread running a simulation
/// (feature `sim`, see [`crate::sim`]).
#[inline]
pub(crate) fn now() -> Instant {
    #[cfg(feature = "sim")]
    if crate::clock::is_simulated() {
        return tokio::time::Instant::now().into_std();
    }
    Instant::now()
}

impl EndpointState {
    /// A fresh state: nothing in flight, healthy, latency estimate `default_rtt`, and a peak-EWMA
    /// decay window of `decay`, counting its requests into the pool-wide `shared` counters.
    pub(crate) fn new(default_rtt: Duration, decay: Duration, shared: Arc<PoolShared>) -> Self {
        EndpointState {
            in_flight: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ewma_ns: AtomicU64::new((default_rtt.as_nanos() as f64).to_bits()),
            ewma_at: AtomicU64::new(clock_ns(now())),
            health: AtomicU8::new(0),
            consecutive_failures: AtomicU32::new(0),
            failure_score: AtomicU64::new(0),
            failure_at: AtomicU64::new(0),
            backoff_until: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
            health_changed_at: AtomicU64::new(0),
            last_check: ArcSwapOption::empty(),
            latency: LatencyHistogram::new(),
            decay_ns: decay.as_nanos().max(1) as f64,
            shared,
        }
    }

    /// Requests now in flight to this endpoint.
    #[inline]
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests in flight over the whole pool this endpoint belongs to.
    pub fn pool_in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this endpoint since it joined the pool: those finished (counted in the
    /// latency histogram) and those in flight. No counter of its own is kept for it, one atomic
    /// operation less per request; read while requests finish, it may count one of them twice.
    pub fn requests(&self) -> u64 {
        // In flight first: a request that finishes between the two reads is then seen in both
        // rather than in neither (it is recorded before it leaves the in-flight count).
        let in_flight = self.in_flight();
        self.latency.count() + self.cancelled() + in_flight
    }

    /// Requests to this endpoint that the caller gave up on before it answered: a client that
    /// disconnected, an HTTP/2 stream reset, a caller's own timeout. Not the endpoint's fault,
    /// so they count neither as errors nor as successes, and feed no latency estimate.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Requests to this endpoint that ended in an error.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The current health. An endpoint both down and ejected is [`Health::Down`]: the active
    /// check's word is the stronger (it cannot be reached), and bringing it up again also
    /// lifts the ejection (see [`is_ejected`](EndpointState::is_ejected) for the flag alone).
    pub fn health(&self) -> Health {
        let h = self.health.load(Ordering::Acquire);
        if h & DOWN != 0 {
            Health::Down
        } else if h & EJECTED != 0 {
            Health::Ejected
        } else {
            Health::Healthy
        }
    }

    /// Whether the endpoint may take traffic.
    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::Acquire) == 0
    }

    /// Whether an active health check (or [`Pool::set_down`](crate::Pool::set_down)) marked
    /// the endpoint down, whether or not it is also ejected.
    pub fn is_down(&self) -> bool {
        self.health.load(Ordering::Acquire) & DOWN != 0
    }

    /// Whether outlier detection (or [`Pool::set_ejected`](crate::Pool::set_ejected)) ejected
    /// the endpoint, whether or not it is also down.
    pub fn is_ejected(&self) -> bool {
        self.health.load(Ordering::Acquire) & EJECTED != 0
    }

    /// Requests that failed in a row, up to now (any success resets it). Outlier detection
    /// ejects an endpoint when this reaches its threshold.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The recent share of the endpoint's requests that failed, from 0.0 to 1.0: a moving
    /// average over about its last 10 finished requests, decaying towards 0 over the pool's
    /// latency decay window while it gets none (see
    /// [`PoolBuilder::failure_penalty`](crate::pool::PoolBuilder::failure_penalty), which
    /// weighs it into the load of the load-aware strategies).
    pub fn failure_score(&self) -> f64 {
        let bits = self.failure_score.load(Ordering::Relaxed);
        if bits == 0 {
            return 0.0;
        }
        self.decayed_failure_score(bits, clock_ns(now()))
    }

    /// Responses of the endpoint that asked to be retried later: a `429 Too Many Requests` or
    /// a `503 Service Unavailable` with a `Retry-After` header. Neither errors nor successes,
    /// they take the endpoint out of rotation for the time asked (see
    /// [`is_backed_off`](EndpointState::is_backed_off)).
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Whether the endpoint asked, with `Retry-After`, not to be sent requests now. While it
    /// is, picks pass it over for another endpoint, unless every endpoint allowed is backed
    /// off.
    pub fn is_backed_off(&self) -> bool {
        let until = self.backoff_until.load(Ordering::Relaxed);
        until != 0 && self.is_backed_off_at(clock_ns(now()))
    }

    /// How long the endpoint is still backed off, if it is.
    pub fn backed_off_for(&self) -> Option<Duration> {
        let until = self.backoff_until.load(Ordering::Relaxed);
        let now = clock_ns(now());
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Whether the endpoint is backed off at `now_ns` (see [`clock_ns`]).
    #[inline]
    pub(crate) fn is_backed_off_at(&self, now_ns: u64) -> bool {
        self.backoff_until.load(Ordering::Relaxed) > now_ns
    }

    /// Takes the endpoint out of rotation for `delay` from `now` (capped by the pool's
    /// `Retry-After` cap), as a response's `Retry-After` asked. Returns the delay honoured.
    pub(crate) fn back_off(&self, now: Instant, delay: Duration) -> Duration {
        let cap = Duration::from_nanos(self.shared.retry_after_cap.load(Ordering::Relaxed));
        let delay = delay.min(cap);
        if delay.is_zero() {
            return delay;
        }
        let until = clock_ns(now)
            .saturating_add(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX))
            .max(1);
        self.backoff_until.fetch_max(until, Ordering::Relaxed);
        self.shared
            .backoff_until
            .fetch_max(until, Ordering::Relaxed);
        delay
    }

    /// The pool this endpoint belongs to: what its endpoints share.
    #[inline]
    pub(crate) fn pool_shared(&self) -> &PoolShared {
        &self.shared
    }

    /// The factor recent failures multiply the endpoint's cost by at `now_ns`: 1 without
    /// recent failures or with the penalty off, `1 + penalty × failure score` otherwise.
    #[inline]
    pub(crate) fn failure_factor(&self, now_ns: u64) -> f64 {
        let bits = self.failure_score.load(Ordering::Relaxed);
        if bits == 0 {
            return 1.0;
        }
        let penalty = f64::from_bits(self.shared.failure_penalty.load(Ordering::Relaxed));
        1.0 + penalty * self.decayed_failure_score(bits, now_ns)
    }

    /// Whether recent failures weigh on the endpoint's cost (so that a pick needs the clock).
    #[inline]
    pub(crate) fn has_failure_score(&self) -> bool {
        self.failure_score.load(Ordering::Relaxed) != 0
    }

    /// The failure score `bits`, decayed by the time since it last changed.
    fn decayed_failure_score(&self, bits: u64, now_ns: u64) -> f64 {
        let idle = now_ns.saturating_sub(self.failure_at.load(Ordering::Relaxed)) as f64;
        f64::from_bits(bits) * exp_neg(idle / self.decay_ns)
    }

    /// Feeds one finished request's outcome into the failure score.
    #[inline]
    fn record_outcome(&self, now_ns: u64, failed: bool) {
        let bits = self.failure_score.load(Ordering::Relaxed);
        if bits == 0 && !failed {
            // The usual case: nothing failed lately, nothing to write.
            return;
        }
        let score = if bits == 0 {
            0.0
        } else {
            self.decayed_failure_score(bits, now_ns)
        };
        const ALPHA: f64 = 1.0 / FAILURE_WINDOW;
        let next = if failed {
            score + (1.0 - score) * ALPHA
        } else {
            score * (1.0 - ALPHA)
        };
        // Racing completions may each read the same score; one update wins, as for the EWMA.
        // A negligible score snaps to 0, so a recovered endpoint is cheap to pick again.
        let next = if next < 1e-3 { 0.0 } else { next };
        self.failure_at.store(now_ns, Ordering::Relaxed);
        self.failure_score.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The latencies of the endpoint's finished requests so far, counted in log-scale buckets
    /// (four per power of two, from 1 µs to about 36 minutes): read quantiles from it, or
    /// subtract an earlier one ([`HistogramSnapshot::since`]) for an interval. Recording is
    /// lock-free and goes on meanwhile (see [`Pool::stats`](crate::Pool::stats) for all
    /// endpoints at once).
    ///
    /// ```
    /// use lbkit::{Balancer, strategy::RoundRobin};
    /// use tower::{service_fn, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let balancer = Balancer::new(["a"], RoundRobin::new(), |_| {
    ///     service_fn(|_req: http::Request<()>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     })
    /// });
    /// balancer.clone().oneshot(http::Request::new(())).await.unwrap();
    /// let state = balancer.pool().state(&"a".into()).unwrap();
    /// assert_eq!(state.latency().count(), 1);
    /// # }
    /// ```
    pub fn latency(&self) -> HistogramSnapshot {
        self.latency.snapshot()
    }

    /// The live histogram behind [`latency`](EndpointState::latency).
    pub(crate) fn latency_histogram(&self) -> &LatencyHistogram {
        &self.latency
    }

    /// When a health mark last changed (see [`clock_ns`]), if ever.
    pub(crate) fn health_changed_ns(&self) -> Option<u64> {
        match self.health_changed_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    /// The outcome of the latest active health check of the endpoint (see
    /// [`HealthChecker`](crate::health::HealthChecker)); `None` before the first one, or when
    /// no checker watches its pool.
    pub fn last_check(&self) -> Option<Arc<CheckOutcome>> {
        self.last_check.load_full()
    }

    /// Records the outcome of an active health check.
    pub(crate) fn record_check(&self, outcome: CheckOutcome) {
        self.last_check.store(Some(Arc::new(outcome)));
    }

    /// Whether the endpoint is ramping up under slow start (its weight is reduced).
    pub fn is_warming_up(&self) -> bool {
        self.ramp_from.load(Ordering::Relaxed) != 0
    }

    /// Sets or clears the "down" mark of active health checks; returns whether it changed.
    pub(crate) fn set_down(&self, down: bool) -> bool {
        self.set_flag(DOWN, down)
    }

    /// Sets or clears the "ejected" mark of passive health; returns whether it changed.
    pub(crate) fn set_ejected(&self, ejected: bool) -> bool {
        self.set_flag(EJECTED, ejected)
    }

    /// Resets the consecutive failure count (when outlier detection has dealt with it).
    pub(crate) fn reset_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Resets the consecutive failure count and the failure score: an endpoint returning
    /// from ejection starts afresh.
    pub(crate) fn forget_failures(&self) {
        self.reset_failures();
        self.failure_score.store(0, Ordering::Relaxed);
    }

    /// The start of the current slow-start ramp (see [`clock_ns`]), if any.
    pub(crate) fn ramp_start(&self) -> Option<u64> {
        match self.ramp_from.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    /// Starts a slow-start ramp at `now_ns` (see [`clock_ns`]).
    pub(crate) fn start_ramp(&self, now_ns: u64) {
        self.ramp_from.store(now_ns.max(1), Ordering::Relaxed);
    }

    /// Ends the slow-start ramp, if any.
    pub(crate) fn end_ramp(&self) {
        self.ramp_from.store(0, Ordering::Relaxed);
    }

    /// Whether an HTTP response with `status` counts as a failure: a 5xx, unless outlier
    /// detection installed its own classifier for the pool.
    #[inline]
    pub(crate) fn is_failure_status(&self, status: http::StatusCode) -> bool {
        match &*self.shared.classifier.load() {
            Some(classify) => classify(status),
            None => status.is_server_error(),
        }
    }

    /// Whether a gRPC call that ended with status `code` counts as a failure: see
    /// [`FailureCodes`] (the default unless outlier detection chose other codes).
    #[inline]
    pub(crate) fn is_failure_grpc_code(&self, code: crate::grpc::Code) -> bool {
        match self.shared.grpc_failures.load(Ordering::Relaxed) {
            0 => FailureCodes::DEFAULT.contains(code),
            bits => FailureCodes::from_bits(bits).contains(code),
        }
    }

    fn set_flag(&self, flag: u8, on: bool) -> bool {
        let prev = if on {
            self.health.fetch_or(flag, Ordering::AcqRel)
        } else {
            self.health.fetch_and(!flag, Ordering::AcqRel)
        };
        let changed = (prev & flag != 0) != on;
        if changed {
            self.health_changed_at
                .store(clock_ns(now()).max(1), Ordering::Relaxed);
        }
        changed
    }

    /// The peak-EWMA latency estimate, without decay.
    pub fn latency_ewma(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) as u64)
    }

    /// The peak-EWMA cost of sending one more request here at `now_ns`: the latency estimate,
    /// decayed by the time since it was last fed (so an idle endpoint is probed again), times
    /// the requests that would then be in flight.
    pub(crate) fn peak_ewma_cost(&self, now_ns: u64) -> f64 {
        let rtt = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let at = self.ewma_at.load(Ordering::Relaxed);
        let idle = now_ns.saturating_sub(at) as f64;
        let decayed = rtt * exp_neg(idle / self.decay_ns);
        decayed * (self.in_flight() + 1) as f64 * self.failure_factor(now_ns)
    }

    /// Counts one request as started.
    #[inline]
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request as started if fewer than `limit` are in flight; returns whether it
    /// did. Racing callers never take the count past `limit`.
    pub(crate) fn try_start(&self, limit: u64) -> bool {
        let taken = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Whether the endpoint has as many requests in flight as its pool allows each endpoint
    /// (see [`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint));
    /// never with no limit set. The balancer sends such an endpoint nothing more until one of
    /// its requests ends.
    pub fn is_saturated(&self) -> bool {
        match self.shared.max_requests.load(Ordering::Relaxed) {
            0 => false,
            limit => self.in_flight() >= limit,
        }
    }

    /// Counts one request as given up on by its caller: it leaves the in-flight count, and
    /// nothing else about the endpoint changes.
    pub(crate) fn cancel(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.wake_waiters();
    }

    /// Takes one request off the in-flight count and changes nothing else: the end of an
    /// upgraded connection whose answer was counted when it came (see
    /// [`InFlight`](crate::balance::InFlight)).
    pub(crate) fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one request as ended with a response that asked to be retried later (see
    /// [`throttled`](EndpointState::throttled)): it leaves the in-flight count and is counted
    /// in the latency histogram, but neither as an error nor as a success, and feeds no
    /// latency estimate (an instant refusal says nothing of how fast the endpoint serves).
    pub(crate) fn finish_throttled(&self, rtt: Duration) {
        self.latency.record(rtt);
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one request as ended after `rtt`, feeding the latency estimate, the failure
    /// score and the consecutive failure count of outlier detection.
    pub(crate) fn finish(&self, rtt: Duration, now: Instant, failed: bool) {
        // Recorded before it leaves the in-flight count, so `requests()` never misses it.
        self.latency.record(rtt);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shared.wake_waiters();
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let run = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            // Only the one response that reaches the threshold wakes the detector (which
            // keeps a permit if it is busy); all others touch atomics only.
            if run == self.shared.outlier_threshold.load(Ordering::Relaxed) {
                self.shared.outlier_wake.notify_one();
            }
        } else if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            // Read first: a healthy endpoint's counter stays 0 and its cache line clean.
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        let now_ns = clock_ns(now);
        self.record_outcome(now_ns, failed);
        // Through `u64`: a `u128` to `f64` conversion is a library call, this is one
        // instruction (latencies beyond 584 years saturate).
        let rtt = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX) as f64;
        // Racing completions may each read the same previous estimate; one of their updates
        // then wins. The estimate stays a valid EWMA either way, which is all picking needs.
        let prev_at = self.ewma_at.load(Ordering::Relaxed);
        self.ewma_at.store(now_ns, Ordering::Relaxed);
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let next = if rtt > prev {
            // Peak sensitivity: a slow response raises the estimate at once.
            rtt
        } else {
            let elapsed = now_ns.saturating_sub(prev_at) as f64;
            let w = exp_neg(elapsed / self.decay_ns);
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_matches_exp() {
        let mut x = 0.0_f64;
        while x < 50.0 {
            let (got, want) = (exp_neg(x), (-x).exp());
            assert!(
                (got - want).abs() <= 1e-11 * want,
                "exp(-{x}): {got} vs {want}"
            );
            x = if x == 0.0 { 1e-12 } else { x * 1.07 };
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f64::INFINITY), 0.0);
    }

    #[test]
    fn health_flags_combine() {
        let s = EndpointState::new(
            Duration::from_millis(1),
            Duration::from_secs(10),
            Default::default(),
        );
        assert_eq!(s.health(), Health::Healthy);
        assert!(s.set_down(true));
        assert!(!s.set_down(true));
        assert_eq!(s.health(), Health::Down);
        assert!(s.set_ejected(true));
        assert_eq!(s.health(), Health::Down, "down says more than ejected");
        assert!(s.is_down() && s.is_ejected());
        assert!(s.set_down(false));
        assert_eq!(s.health(), Health::Ejected);
        assert!(s.set_ejected(false));
        assert!(s.is_healthy());
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointState::new(
            Duration::from_millis(1),
            Duration::from_millis(100),
            Default::default(),
        );
        let t0 = Instant::now();
        s.start();
        s.finish(Duration::from_millis(50), t0, false);
        assert_eq!(s.latency_ewma(), Duration::from_millis(50));
        s.start();
        s.finish(
            Duration::from_millis(10),
            t0 + Duration::from_millis(100),
            false,
        );
        let after = s.latency_ewma();
        assert!(after < Duration::from_millis(50) && after > Duration::from_millis(10));
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.requests(), 2);
        let now = clock_ns(t0 + Duration::from_secs(10));
        assert!(
            s.peak_ewma_cost(now) < 1.0,
            "idle endpoints decay towards zero cost"
        );
    }
}
