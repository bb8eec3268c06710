//! Failover: retry a failed request on another endpoint, within a budget and a deadline.
//!
//! [`FailoverLayer`] sits in front of a [`Balancer`](crate::Balancer). When an attempt fails
//! it sends the request again, telling the balancer to avoid every endpoint already tried for
//! it, so no request is sent twice to the same endpoint. Whether to retry is decided by:
//!
//! - the [`RetryPolicy`]: which requests may be sent twice (idempotent methods by default,
//!   and any request that provably never reached its endpoint, see [`NotSent`]) and which
//!   outcomes are failures (endpoint errors, any 5xx as outlier detection counts them,
//!   per-try timeouts by default);
//! - the body: only a body that can be sent again ([`Replay`]: empty, buffered, or any `Clone`
//!   body) is retried. A request body that streams as it is sent is **not** buffered behind
//!   your back; wrapped in [`ReplayBody`] it is retried only while the attempt that had it
//!   never read it (a refused connection), and you can buffer small ones with
//!   [`ReplayBody::buffer`] to retry them after any failure;
//! - the [`RetryBudget`], a cap on retries as a share of recent traffic, so a failing fleet
//!   is not hit by every request several times;
//! - [`max_attempts`](FailoverLayer::max_attempts) (3 by default), a jittered exponential
//!   [`Backoff`] between attempts (Envoy's 25 ms base, 250 ms cap by default), a
//!   [per-try timeout](FailoverLayer::per_try_timeout) and an overall
//!   [deadline](FailoverLayer::deadline).
//!
//! Its errors are one typed [`Error`] that says which limit ended the request
//! ([`is_deadline`](Error::is_deadline), [`is_budget_exhausted`](Error::is_budget_exhausted),
//! [`is_no_endpoint`](Error::is_no_endpoint), ...), with the last attempt's error as source.
//!
//! Tiers of endpoints (primaries, then backups) live in the [`Pool`](crate::Pool): backups
//! get traffic only while no primary is healthy, and lose it as soon as one recovers; the
//! failover layer works the same over either.
//!
//! A typical stack, outermost first:
//!
//! ```text
//! FailoverLayer      retry elsewhere (avoid list), budget, deadline
//!   StickyLayer      same client, same endpoint; the cookie names the endpoint that answered
//!   HashKeyLayer     key for consistent hashing
//!     Balancer       pick an endpoint among the eligible ones, minus the avoided ones
//! ```

mod backoff;
mod body;
mod budget;
mod error;
mod future;
mod layer;
mod policy;
mod service;

pub use backoff::Backoff;
pub use body::{BufferBodies, BufferFuture, Replay, ReplayBody, ReplayBuffer};
pub use budget::RetryBudget;
#[cfg(test)]
pub(crate) use error::Failure;
pub use error::{Error, NotSent};
pub use future::ResponseFuture;
pub use layer::FailoverLayer;
pub use policy::{DefaultPolicy, RetryPolicy};
pub use service::Failover;
