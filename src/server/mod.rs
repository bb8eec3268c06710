//! Serving clients: the accept loop and the hardened HTTP server a proxy runs in front of its
//! service stack, so that no user writes an accept loop.
//!
//! [`Server`] accepts TCP connections (optionally terminating TLS, feature `tls`), serves
//! HTTP/1.1 and HTTP/2 on each with hyper-util's `auto` connection builder, and gives every
//! request the peer's [`ClientAddr`](crate::forwarded::ClientAddr). It holds up against clients
//! that misbehave, with defaults close to nginx's and HAProxy's:
//!
//! | limit | default | what happens past it |
//! |---|---|---|
//! | [`header_read_timeout`](Server::header_read_timeout) | 30 s | a new connection's first request not received in time: closed; on HTTP/1.1 a later head (or the wait for it) taking longer: closed gracefully after 1 to 1.5 times it |
//! | [`body_read_timeout`](Server::body_read_timeout) | 30 s | no data from the client while its request body is being read: the request's work is dropped (a backend request aborted, counted as cancelled) and the client gets `408` (an HTTP/1.1 connection is closed) |
//! | [`idle_timeout`](Server::idle_timeout) | 60 s | no request in flight for that long: closed gracefully (HTTP/1 and HTTP/2) |
//! | [`max_connections`](Server::max_connections) | 10 000 | no more `accept`: new connections wait in the kernel's backlog |
//! | [`max_header_bytes`](Server::max_header_bytes) | 64 KiB | `431 Request Header Fields Too Large` (HTTP/1), stream refused (HTTP/2) |
//! | [`http2_max_concurrent_streams`](Server::http2_max_concurrent_streams) | 128 | the client must wait for a stream to end |
//! | [`http2_keep_alive`](Server::http2_keep_alive) | ping every 20 s, 20 s to answer | a dead peer's connection is closed |
//!
//! Accept errors (`EMFILE` when the process is out of file descriptors, `ENFILE`, a
//! connection aborted before it was accepted) are logged and retried after a short pause that
//! grows while they go on; they never stop the server. [`Server::serve_with_shutdown`] stops
//! accepting on a signal, lets requests in flight finish (HTTP/1 closes after the current
//! response, HTTP/2 sends `GOAWAY`) for a grace period, then closes what is left, upgraded
//! connections (WebSocket tunnels) included.
//!
//! An idle HTTP/1.1 keep-alive connection holds no buffers: hyper's connection is taken apart
//! while the client sends nothing and built again for its next request (at once after each
//! response when more than 256 are open, after 1-2 s of idleness below), so 10 000 idle
//! connections cost about 40 MiB rather than 400 (see BENCHMARKS.md).
//!
//! The service gets each request with a [`RequestBody`]: hyper's body with the read timeout.
//!
//! ```no_run
//! # #[cfg(feature = "http-proxy")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use lbkit::proxy::{ErrorResponseLayer, Forward};
//! use lbkit::server::Server;
//! use lbkit::{strategy::PowerOfTwoChoices, BalancerLayer};
//! use tower::ServiceBuilder;
//!
//! let proxy = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(BalancerLayer::new(["127.0.0.1:3001", "127.0.0.1:3002"], PowerOfTwoChoices::new()))
//!     .service(Forward::<lbkit::server::RequestBody>::new());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
//! Server::new(proxy)
//!     .header_read_timeout(Duration::from_secs(10))
//!     .serve_with_shutdown(listener, ctrl_c, Duration::from_secs(30))
//!     .await;
//! # Ok(()) }
//! ```

pub(crate) mod accept;
#[cfg(feature = "http-proxy")]
mod body;
#[cfg(feature = "http-proxy")]
mod conn;
#[cfg(feature = "http-proxy")]
pub(crate) use conn::TunnelScope;
#[cfg(feature = "http-proxy")]
mod http;
#[cfg(feature = "http-proxy")]
mod idle;
#[cfg(feature = "http-proxy")]
mod listen;
#[cfg(feature = "proxy-protocol")]
mod proxy_protocol;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
#[cfg(feature = "http-proxy")]
mod workers;

#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use body::{BodyError, RequestBody};
#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use http::Server;
#[cfg(feature = "http-proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "http-proxy")))]
pub use listen::bind_reuse_port;
#[cfg(feature = "http-proxy")]
pub(crate) use listen::reuse_port_socket;
#[cfg(feature = "proxy-protocol")]
pub(crate) use proxy_protocol::write_v2;
#[cfg(feature = "proxy-protocol")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub use proxy_protocol::{encode_v2, parse_header, ProxyProtocol, ProxyProtocolError};
