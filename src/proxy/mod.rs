//! Proxy parts: HTTP forwarding to the picked endpoint and the mapping of failures to
//! 502/503/504.
//!
//! A reverse proxy is a stack:
//!
//! ```text
//! ErrorResponseLayer        errors -> 502 / 503 / 504 with a short body, never a backend address
//!                           (gRPC requests: grpc-status 14 / 4, and their grpc-timeout)
//!   BalancerLayer           pick an endpoint, count the request in flight until its body ends
//!     Forward               rewrite URI and headers, send over pooled keep-alive connections
//! ```
//!
//! [`TcpProxy`] balances TCP connections (L4) over the same pools and strategies, and
//! [`UdpProxy`] UDP flows (datagrams per client address, each flow kept on one endpoint).
//!
//! [`headers`] holds the header rewriting on its own. [`Forward`], [`ErrorResponseLayer`] and
//! [`ForwardError`] need the `http-proxy` cargo feature (hyper and hyper-util); `UpstreamTls`
//! (HTTPS to the backends, `Forward::tls`) needs `tls`. Serving the
//! stack to clients (and TLS termination) is [`server`](crate::server)'s job.
//!
//! ```no_run
//! # #[cfg(feature = "http-proxy")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use lbkit::forwarded::ClientAddr;
//! use lbkit::proxy::{ErrorResponseLayer, Forward};
//! use lbkit::{strategy::PowerOfTwoChoices, BalancerLayer};
//! use tower::ServiceBuilder;
//!
//! let proxy = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(BalancerLayer::new(["127.0.0.1:3001", "127.0.0.1:3002"], PowerOfTwoChoices::new()))
//!     .service(Forward::<hyper::body::Incoming>::new());
//! // Serve `proxy` with hyper, inserting `ClientAddr(peer)` into each request's extensions.
//! # let _ = proxy; Ok(()) }
//! ```

// Hop-by-hop removal and upgrade detection: what `Forward` does to every request and response.
// Public only so the fuzz crate (fuzz/) can reach it; not part of the API.
#[doc(hidden)]
pub mod headers;
mod tcp;
mod udp;

pub use tcp::TcpProxy;
pub use udp::{UdpProxy, UdpStats};

#[cfg(feature = "http-proxy")]
mod error;
#[cfg(feature = "http-proxy")]
mod forward;
#[cfg(feature = "http-proxy")]
mod grpc;
#[cfg(feature = "http-proxy")]
mod http1_pool;
#[cfg(feature = "http-proxy")]
mod http2_pool;
#[cfg(feature = "http-proxy")]
mod transport;
#[cfg(feature = "http-proxy")]
mod tunnel;
#[cfg(feature = "tls")]
mod upstream_tls;

#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use error::{
    status_for, ErrorResponse, ErrorResponseFuture, ErrorResponseLayer, ForwardError, ProxyBody,
};
#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use forward::{Forward, ForwardBody, ForwardFuture, UpstreamProtocol};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use upstream_tls::{UpstreamTls, UpstreamTlsBuilder};
