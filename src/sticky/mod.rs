//! Sticky sessions: the same client keeps going to the same endpoint (feature `sticky`).
//!
//! Two ways, both working with any [`Balancer`](crate::Balancer):
//!
//! - **Cookie affinity** ([`StickyLayer`]): the first response tells the client, in a cookie,
//!   which endpoint served it; later requests carrying that cookie go back there while the
//!   endpoint is healthy and present, and are re-balanced (with the cookie replaced)
//!   otherwise. The cookie is the endpoint id sealed with ChaCha20-Poly1305 under a
//!   [`CookieSecret`] of yours: opaque (no address leaks), authenticated (a forged or garbled
//!   cookie is ignored, never trusted), and stateless (a fleet of proxies sharing the key
//!   honour each other's cookies).
//! - **Key affinity without cookies**: [`HashKeyLayer`](crate::key::HashKeyLayer) with a
//!   consistent-hashing strategy ([`Maglev`](crate::strategy::Maglev),
//!   [`Ring`](crate::strategy::Ring)) sends each user id, session header or client address to
//!   the same endpoint, and moves few keys when endpoints change.
//!
//! ```
//! use lbkit::sticky::{CookieSecret, StickyLayer};
//! use lbkit::{strategy::PowerOfTwoChoices, BalancerLayer};
//! use tower::ServiceBuilder;
//!
//! # fn make(inner: tower::util::BoxCloneSyncService<http::Request<()>, http::Response<()>, lbkit::BoxError>) {
//! let key = CookieSecret::from_bytes([42; 32]); // from your secret store
//! let svc = ServiceBuilder::new()
//!     .layer(StickyLayer::cookie("lb", key))
//!     .layer(BalancerLayer::new(["10.0.0.1:80", "10.0.0.2:80"], PowerOfTwoChoices::new()))
//!     .service(inner);
//! # let _ = svc; }
//! ```

mod future;
mod layer;
mod seal;
mod service;

pub use future::ResponseFuture;
pub use layer::{SameSite, StickyLayer};
pub use seal::CookieSecret;
pub use service::Sticky;
