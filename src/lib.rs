//! # lbkit
//!
//! Load balancing as composable [tower](https://docs.rs/tower) layers and services: build your
//! own reverse proxy (with axum or hyper) or client-side balancer (a hyper client, a tonic
//! channel) from small parts.
//!
//! ## The stack, top to bottom
//!
//! A request enters at the top and each part hands it to the one below; the code's modules are
//! layered the same way (a module imports only from those below it; `.ci/modules.py` checks
//! that no two import each other in a circle):
//!
//! ```text
//!  client
//!    |
//!  server        Server: accept loop, limits, timeouts, TLS, PROXY protocol     src/server/
//!    |           ClientAddr on every request                                   src/forwarded/
//!  proxy         ErrorResponseLayer: failures -> 502/503/504                    src/proxy/error.rs
//!    |
//!  cache         CacheLayer: hits answered here, misses coalesced (feature      src/cache/
//!    |           `cache`; RFC 9111 shared cache)
//!  failover      FailoverLayer: retry elsewhere under a RetryBudget             src/failover/
//!  sticky, key   StickyLayer, HashKeyLayer: where this client should go         src/sticky/, src/key/
//!    |           (they speak to the balancer only through PickHints)           src/hints.rs
//!  balance       Balancer / BalancerLayer: pick, count in flight, classify      src/balance/
//!    |
//!  pool          Pool: the live endpoint table, lock-free snapshots, health,    src/pool/
//!    |           zone-aware routing
//!  strategy      round robin, random, least connections, P2C, peak EWMA,        src/strategy/
//!    |           Maglev, bounded-load ring
//!  endpoint      Endpoint, its atomic state and latency histogram               src/endpoint/
//!    |
//!  proxy         Forward: the HTTP request to the picked backend                src/proxy/forward.rs
//!    |
//!  backend
//! ```
//!
//! Beside the request path, background tasks use only the pool's public handle: active health
//! checks, outlier detection and slow start ([`health`]), discovery ([`discover`]: static
//! lists, `tower::discover` adapters, DNS, Kubernetes EndpointSlices), and metrics export (`metrics`, feature `metrics`);
//! [`stats`] reads the pool as plain data, `status` (feature `status-page`) serves it to
//! operators as an HTML page and JSON with drain and weight controls, and `sim` (feature
//! `sim`) runs the same stack on a simulated fleet and clock (`sim::plot`, feature `sim-plot`,
//! draws the runs as SVG). The L4 balancer ([`proxy::TcpProxy`]) uses the same pool,
//! strategies and server accept loop for TCP.
//!
//! ```
//! use lbkit::{Balancer, Endpoint, strategy::RoundRobin};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Three endpoints, weighted 2:1:1; each endpoint's service says who it is.
//! let endpoints = [Endpoint::new("a").with_weight(2), Endpoint::new("b"), Endpoint::new("c")];
//! let balancer = Balancer::new(endpoints, RoundRobin::new(), |ep: &Endpoint| {
//!     let id = ep.id().clone();
//!     service_fn(move |_req: http::Request<()>| {
//!         let answer = http::Response::new(id.to_string());
//!         async move { Ok::<_, std::convert::Infallible>(answer) }
//!     })
//! });
//!
//! let mut served = Vec::new();
//! for _ in 0..4 {
//!     let res = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
//!     served.push(res.into_body().into_inner());
//! }
//! served.sort();
//! assert_eq!(served, ["a", "a", "b", "c"]);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod balance;
#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub mod cache;
#[cfg(feature = "sim")]
mod clock;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub mod config;
pub mod discover;
pub mod endpoint;
mod error;
pub mod failover;
pub mod forwarded;
pub mod grpc;
pub mod hash;
pub mod health;
pub mod hints;
pub mod key;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod server;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;
pub mod stats;
#[cfg(feature = "status-page")]
#[cfg_attr(docsrs, doc(cfg(feature = "status-page")))]
pub mod status;
#[cfg(feature = "sticky")]
#[cfg_attr(docsrs, doc(cfg(feature = "sticky")))]
pub mod sticky;
pub mod strategy;

pub use balance::{Balancer, BalancerLayer};
pub use endpoint::{Endpoint, EndpointId, Tier};
pub use error::{BoxError, Error};
pub use hints::PickHints;
pub use pool::Pool;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
