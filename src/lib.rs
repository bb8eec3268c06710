//! # lbkit
//!
//! Load balancing as composable [tower](https://docs.rs/tower) layers and services: build your
//! own reverse proxy (with axum or hyper) or client-side balancer (a hyper client, a tonic
//! channel) from small parts.
//!
//! - [`pool`]: the live set of endpoints, read lock-free on every request;
//! - [`strategy`]: how one endpoint is picked (round robin, random, least connections, power of
//!   two choices, peak EWMA, Maglev, a bounded-load hash ring);
//! - [`balance`]: the [`Balancer`] service and [`BalancerLayer`];
//! - [`hints`]: what outer layers tell the balancer about a request (hash key, preferred
//!   endpoint, endpoints to avoid);
//! - [`discover`]: feeding a pool (static lists, a live handle, `tower::discover` adapters);
//! - [`endpoint`]: endpoint descriptions and their live state;
//! - [`health`]: active health checks, outlier detection, slow start;
//! - [`proxy`]: HTTP forwarding and error mapping for reverse proxies (feature `http-proxy`);
//! - [`key`]: request keys (header, cookie, client IP behind trusted proxies, path, query) for
//!   consistent hashing, and [`HashKeyLayer`](key::HashKeyLayer);
//! - `sticky`: sticky sessions with sealed affinity cookies (feature `cookie`);
//! - [`failover`]: retries on another endpoint, with a retry budget, per-try timeout and
//!   deadline;
//! - [`stats`]: per-endpoint statistics as plain data ([`Pool::stats`]): requests, errors, in
//!   flight, latency quantiles, health, effective weight;
//! - `metrics`: export of those statistics through the `metrics` facade (feature `metrics`);
//! - `sim`: a deterministic simulator that compares strategies on simulated fleets (feature
//!   `sim`).
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
#[cfg(feature = "sim")]
mod clock;
pub mod discover;
pub mod endpoint;
mod error;
pub mod failover;
pub mod forwarded;
pub mod hash;
pub mod health;
pub mod hints;
pub mod key;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod server;
#[cfg(feature = "sim")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
pub mod sim;
pub mod stats;
#[cfg(feature = "cookie")]
#[cfg_attr(docsrs, doc(cfg(feature = "cookie")))]
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
