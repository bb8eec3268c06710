//! Statistics: what each endpoint of a pool is doing, readable at any time without stopping
//! traffic.
//!
//! [`Pool::stats`] returns a [`PoolStats`]: plain data (numbers, durations, ids) copied from
//! the live atomics of each endpoint, so it can be logged, serialised, diffed or exported
//! (see the `metrics` module, feature `metrics`). Taking it reads every endpoint's counters
//! and the current snapshot; the request path is not stopped or slowed (only the pool's
//! writers' lock is taken, which picks never take).
//!
//! Each endpoint keeps a latency histogram ([`EndpointState::latency`](crate::endpoint::EndpointState::latency)): a fixed set of log-scale buckets made of
//! atomics, fed with every request's latency when it ends, from which the stats read
//! quantiles.
//!
//! ```
//! use lbkit::{Balancer, strategy::RoundRobin};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let balancer = Balancer::new(["a", "b"], RoundRobin::new(), |_| {
//!     service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     })
//! });
//! for _ in 0..10 {
//!     balancer.clone().oneshot(http::Request::new(())).await.unwrap();
//! }
//! let stats = balancer.pool().stats();
//! assert_eq!(stats.strategy, "round_robin");
//! assert_eq!(stats.requests(), 10);
//! for ep in &stats.endpoints {
//!     assert_eq!(ep.requests, 5);
//!     assert_eq!(ep.latency.count, 5);
//!     println!("{}: {} requests, p99 {:?}", ep.id, ep.requests, ep.latency.p99);
//! }
//! # }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use crate::endpoint::state::{clock_ns, now};
use crate::endpoint::{CheckOutcome, EndpointId, Health, HistogramSnapshot, LatencySummary, Tier};
use crate::pool::Pool;
use crate::strategy::Strategy;

/// The statistics of a whole pool at one moment, as plain data. See [`Pool::stats`].
///
/// With the `serde` feature it serialises (for logs, files and tools) with every field of
/// [`EndpointStats`] but the raw histogram; durations are in human form (`"1ms 250us"`), the
/// health is `"healthy"`, `"down"` or `"ejected"`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PoolStats {
    /// The strategy's name (see [`Strategy::name`]).
    pub strategy: &'static str,
    /// The version of the snapshot in force (see
    /// [`Snapshot::version`](crate::pool::Snapshot::version)).
    pub version: u64,
    /// Requests in flight over the whole pool.
    pub in_flight: u64,
    /// The tier in use, if any endpoint is eligible.
    pub tier: Option<Tier>,
    /// Whether the pool is in panic (too few healthy endpoints, so all get traffic; see
    /// [`Snapshot::is_panic`](crate::pool::Snapshot::is_panic)).
    pub panic: bool,
    /// Every endpoint of the pool, eligible or not, in id order.
    pub endpoints: Vec<EndpointStats>,
}

impl PoolStats {
    /// Requests sent to the pool's current endpoints, added up.
    pub fn requests(&self) -> u64 {
        self.endpoints.iter().map(|e| e.requests).sum()
    }

    /// Failed requests of the pool's current endpoints, added up.
    pub fn errors(&self) -> u64 {
        self.endpoints.iter().map(|e| e.errors).sum()
    }

    /// The endpoints that may get requests now.
    pub fn eligible(&self) -> usize {
        self.endpoints.iter().filter(|e| e.eligible).count()
    }

    /// The statistics of one endpoint.
    pub fn endpoint(&self, id: &str) -> Option<&EndpointStats> {
        self.endpoints.iter().find(|e| e.id == id)
    }
}

/// The statistics of one endpoint at one moment, as plain data. See [`Pool::stats`].
///
/// Counters count from when the endpoint joined the pool; an endpoint removed and added again
/// starts from zero.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct EndpointStats {
    /// The endpoint's id.
    pub id: EndpointId,
    /// Its socket address, if it has one.
    pub addr: Option<SocketAddr>,
    /// Requests sent to it.
    pub requests: u64,
    /// Requests to it that failed (an error of its service, or a failure status with
    /// HTTP balancers, see [`CompleteOnBody`](crate::balance::CompleteOnBody)).
    pub errors: u64,
    /// Requests to it that the caller gave up on before it answered (a client that went
    /// away): neither errors nor successes.
    pub cancelled: u64,
    /// Requests in flight to it now.
    pub in_flight: u64,
    /// Failed requests in a row, up to now (what outlier detection watches).
    pub consecutive_failures: u32,
    /// The peak-EWMA latency estimate (what [`PeakEwma`](crate::strategy::PeakEwma) uses,
    /// before its idle decay); the pool's default RTT until the first response.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub latency_ewma: Duration,
    /// Quantiles of the latencies of all its finished requests, read from
    /// [`histogram`](EndpointStats::histogram).
    pub latency: LatencySummary,
    /// The latency histogram's counts, to subtract from a later one for an interval's
    /// latencies (see [`HistogramSnapshot::since`]).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub histogram: HistogramSnapshot,
    /// Its health.
    pub health: Health,
    /// How long ago its health last changed; `None` if it never changed since it joined.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub health_changed: Option<Duration>,
    /// The latest active health check of it (see [`EndpointState::last_check`]); `None`
    /// before the first one, or when no checker watches the pool.
    ///
    /// [`EndpointState::last_check`]: crate::endpoint::EndpointState::last_check
    #[cfg_attr(feature = "serde", serde(serialize_with = "last_check"))]
    pub last_check: Option<CheckOutcome>,
    /// Its configured weight.
    pub weight: u32,
    /// The weight in force in the current snapshot, in the unit of the configured weight:
    /// the configured weight, less during a slow-start ramp, and 0 when the endpoint is not
    /// eligible.
    pub effective_weight: f64,
    /// Whether it is ramping up under [`SlowStart`](crate::health::SlowStart).
    pub warming_up: bool,
    /// Its tier.
    pub tier: Tier,
    /// Whether it may get requests now (in the current snapshot's eligible set).
    pub eligible: bool,
}

/// A check's outcome as `{"passed", "error", "took", "ago"}` (its `Instant` as how long ago).
#[cfg(feature = "serde")]
fn last_check<S: serde::Serializer>(c: &Option<CheckOutcome>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let Some(c) = c else {
        return s.serialize_none();
    };
    let mut t = s.serialize_struct("CheckOutcome", 4)?;
    t.serialize_field("passed", &c.passed())?;
    t.serialize_field("error", &c.error)?;
    t.serialize_field("took", &humantime_serde::Serde::from(c.took))?;
    t.serialize_field(
        "ago",
        &humantime_serde::Serde::from(now().saturating_duration_since(c.at)),
    )?;
    t.end()
}

impl<S: Clone, St: Strategy> Pool<S, St> {
    /// The statistics of the pool and every endpoint in it, as plain data.
    ///
    /// Readable at any time, from any thread, while traffic flows: it copies each endpoint's
    /// atomic counters and reads the current snapshot. Counters are read one by one, so under
    /// traffic they may be a request apart from each other.
    pub fn stats(&self) -> PoolStats {
        let snapshot = self.snapshot();
        let eligible = snapshot.eligible();
        // While an endpoint ramps up, the snapshot's weights are on a scale ten times larger.
        let scaled = eligible
            .iter()
            .any(|c| c.weight() != c.endpoint().weight() || c.state().is_warming_up());
        let scale = if scaled {
            f64::from(crate::pool::ramp::RAMP_SCALE)
        } else {
            1.0
        };
        let now_ns = clock_ns(now());
        let endpoints = self
            .endpoints()
            .into_iter()
            .map(|(endpoint, state)| {
                let position = snapshot.position(endpoint.id());
                let histogram = state.latency_histogram().snapshot();
                EndpointStats {
                    id: endpoint.id().clone(),
                    addr: endpoint.socket_addr(),
                    requests: state.requests(),
                    errors: state.errors(),
                    cancelled: state.cancelled(),
                    in_flight: state.in_flight(),
                    consecutive_failures: state.consecutive_failures(),
                    latency_ewma: state.latency_ewma(),
                    latency: histogram.summary(),
                    histogram,
                    health: state.health(),
                    health_changed: state
                        .health_changed_ns()
                        .map(|at| Duration::from_nanos(now_ns.saturating_sub(at))),
                    last_check: state.last_check().map(|c| (*c).clone()),
                    weight: endpoint.weight(),
                    effective_weight: position
                        .map_or(0.0, |i| f64::from(eligible[i].weight()) / scale),
                    warming_up: state.is_warming_up(),
                    tier: endpoint.tier(),
                    eligible: position.is_some(),
                }
            })
            .collect();
        PoolStats {
            strategy: self.strategy().name(),
            version: snapshot.version(),
            in_flight: self.in_flight(),
            tier: snapshot.tier(),
            panic: snapshot.is_panic(),
            endpoints,
        }
    }
}
