//! Health: only healthy endpoints get traffic, and the balancer finds out by itself.
//!
//! Four parts, each usable alone, all acting on a [`Pool`](crate::Pool) (and so on every
//! [`Balancer`](crate::Balancer) over it):
//!
//! - **Active health checks** ([`HealthChecker`]): a background task probes every endpoint at
//!   an interval (with jitter) with a [`HealthCheck`]: a TCP connect ([`TcpCheck`]), an HTTP
#![cfg_attr(
    feature = "http-proxy",
    doc = "  request over HTTP/1.1 or h2 ([`HttpCheck`], feature `http-proxy`), a gRPC \
           `grpc.health.v1` call ([`GrpcCheck`]), or your own, a closure or a"
)]
#![cfg_attr(
    not(feature = "http-proxy"),
    doc = "  request over HTTP/1.1 or h2 (`HttpCheck`, feature `http-proxy`), a gRPC \
           `grpc.health.v1` call (`GrpcCheck`), or your own, a closure or a"
)]
//!   tower service ([`check_fn`]). As in HAProxy, `fall` failures in a row mark an endpoint down and
//!   `rise` successes in a row bring it back; each check has a timeout. Defaults: every 2 s,
//!   timeout 1 s, rise 2, fall 3. With [`start_down`](HealthChecker::start_down), an endpoint
//!   (also one that joins later) gets no traffic before its first check passes.
//! - **Passive health, or outlier detection** ([`OutlierDetection`]): the balancer already
//!   sees every request's outcome; after 5 failures in a row (errors, and with
//!   HTTP balancers, 5xx responses, gRPC calls ending in `UNAVAILABLE`, `DEADLINE_EXCEEDED`
//!   or `INTERNAL`, or classifiers of your choice)
//!   an endpoint is ejected for 30 s, longer with each ejection, up to 300 s, with at most 10 %
//!   of the endpoints ejected at once (but always at least one), as in Envoy. Every 10 s, it
//!   also ejects endpoints whose success rate stands out below the pool's (and, if asked,
//!   those failing over a fixed share of their requests).
//! - **Slow start** ([`SlowStart`]): an endpoint that comes (back) up gets a weight that ramps
//!   up over a window, so a cold server is not flooded.
//! - **Panic threshold** ([`PoolBuilder::panic_threshold`](crate::pool::PoolBuilder::panic_threshold),
//!   off by default, Envoy uses 50 %): when fewer than that share of endpoints are healthy,
//!   requests go to all of them rather than crushing the few healthy ones. When *no* endpoint is
//!   healthy, requests fail at once with [`Error::is_no_endpoint`](crate::Error::is_no_endpoint).
//!
//! Marks go through the pool: each transition publishes a new snapshot (picking stays
//! lock-free and never sees a half-made change), logs a `tracing` event (a warning when an
//! endpoint is taken out, info when it returns) and is broadcast as a [`HealthEvent`] to
//! [`Pool::health_events`](crate::Pool::health_events) subscribers. The current health of an
//! endpoint is [`Pool::health`](crate::Pool::health) or
//! [`EndpointState::health`](crate::endpoint::EndpointState::health).
//!
//! Background tasks hold no strong reference to the pool: they end by themselves once every
//! pool handle and balancer is dropped, and follow endpoints added and removed at run time.
//! Each `spawn` returns a [`PoolTask`](crate::pool::PoolTask) to stop one earlier. Spawning needs a tokio runtime.
//!
//! ```
//! use std::time::Duration;
//! use lbkit::{Balancer, health::{HealthChecker, OutlierDetection, SlowStart, TcpCheck}};
//! use lbkit::strategy::PowerOfTwoChoices;
//! use tower::service_fn;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let balancer = Balancer::new(["127.0.0.1:8081", "127.0.0.1:8082"], PowerOfTwoChoices::new(), |ep| {
//!     let id = ep.id().clone();
//!     service_fn(move |_req: http::Request<()>| {
//!         let id = id.clone();
//!         async move { Ok::<_, std::convert::Infallible>(http::Response::new(id.to_string())) }
//!     })
//! });
//! let pool = balancer.pool();
//! HealthChecker::new(TcpCheck::new())
//!     .interval(Duration::from_secs(1))
//!     .rise(2)
//!     .fall(3)
//!     .spawn(pool);
//! OutlierDetection::new().spawn(pool);
//! SlowStart::new(Duration::from_secs(30)).spawn(pool);
//!
//! let mut events = pool.health_events();
//! # drop(balancer);
//! # let _ = events.try_recv();
//! # }
//! ```

mod active;
mod outlier;
pub(crate) mod slow_start;

/// Health transitions and check failures are defined in the pool (it records and broadcasts
/// them); this is their one public path, beside the checks and detectors that cause them.
pub use crate::pool::event::{HealthChange, HealthEvent};
pub use active::{check_fn, CheckError, CheckErrorKind, HealthCheck, HealthChecker, TcpCheck};
#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use active::{GrpcCheck, HttpCheck};
pub use outlier::{OutlierDetection, OutlierTrigger};
pub use slow_start::SlowStart;
