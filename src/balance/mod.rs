//! The balancer: a tower [`Service`](tower_service::Service) that sends each request to one
//! endpoint of a [`Pool`](crate::pool::Pool).
//!
//! [`Balancer`] reads the pool's current snapshot without a lock, picks an endpoint with the
//! pool's strategy (honouring the request's [`PickHints`](crate::hints::PickHints)), and calls
//! a clone of that endpoint's service. An [`InFlight`] guard counts the request against the
//! endpoint until it completes, which feeds least-connections, power-of-two-choices and peak
//! EWMA; *when* it completes is decided by a [`TrackCompletion`] policy: when the response
//! arrives ([`CompleteOnResponse`]) or when an HTTP response body ends ([`CompleteOnBody`]).

mod completion;
mod future;
mod layer;
mod queue;
mod service;
mod target;

#[cfg(feature = "http-proxy")]
pub(crate) use completion::TunnelGuard;
pub use completion::{CompleteOnBody, CompleteOnResponse, InFlight, TrackCompletion, TrackedBody};
pub use future::ResponseFuture;
pub use layer::{Balanced, BalancerLayer};
pub use service::Balancer;
pub use target::{Target, TargetUri, TargetUriFuture};
