//! A shared HTTP response cache (RFC 9111) in front of the balancer (feature `cache`).
//!
//! [`CacheLayer`] answers repeated `GET` and `HEAD` requests from memory, so they never reach
//! the backends: the rules of a shared cache (freshness, `Vary`, `no-store`, `private`,
//! `Authorization`, revalidation with `ETag`/`Last-Modified`) from
//! [`http-cache-semantics`](https://docs.rs/http-cache-semantics), a store bounded in bytes
//! from [`moka`](https://docs.rs/moka), concurrent misses coalesced into one backend request,
//! and optionally stale responses when the backend fails.
//!
//! It goes outside the balancer and the failover layer, so that a hit costs no pick and a miss
//! gets the retries:
//!
//! ```text
//! ErrorResponseLayer   errors -> 502/503/504
//!   CacheLayer         hits answered here; misses coalesced, then sent on
//!     FailoverLayer    retries on another endpoint
//!       Balancer       picks an endpoint
//! ```

mod body;
mod flight;
mod layer;
mod service;
mod store;

pub use body::CacheBody;
pub use layer::{CacheLayer, CacheStats};
pub use service::{Cache, ResponseFuture};
