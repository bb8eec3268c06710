use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::check::target;
use super::{CheckError, CheckErrorKind, CheckFuture, HealthCheck};
use crate::endpoint::Endpoint;

/// The most of a response body an [`HttpCheck`] reads when looking for its expected text.
const MAX_BODY: usize = 64 * 1024;

/// Healthy when an HTTP request to the endpoint gets an expected status (and, if set, a
/// body containing an expected text).
///
/// Each check opens a new connection (`Connection: close`), as HAProxy's `option httpchk`
/// does, so it sees what a new client would see. Defaults: `GET`, any 2xx or 3xx status, no
/// body check, `Host` the endpoint's address, and the protocol the endpoint speaks:
///
/// - By default the check speaks HTTP/1.1, and finds out by itself when a backend speaks only
///   HTTP/2 (as gRPC servers do): such a backend answers an HTTP/1.1 request with an HTTP/2
///   frame, which fails as a protocol error, and the check then asks again over h2c (prior
///   knowledge). It remembers, per endpoint address, which protocol answered and speaks it
///   first from then on (switching back the same way if the backend changes), so an
///   HTTP/2-only backend is never marked down for not speaking HTTP/1.1. An HTTP/2-only
///   backend that answers the check as a gRPC server answers any request that is not gRPC
///   (with `content-type: application/grpc`, or `415 Unsupported Media Type` as the gRPC spec
///   asks) is up: it is serving gRPC, which is all a plain request can learn of it (ask its
///   health service with [`GrpcCheck`](super::GrpcCheck) to learn more). That exception does
///   not apply when a body is expected.
/// - [`http2(true)`](HttpCheck::http2) speaks only HTTP/2 (h2c, prior knowledge), as the proxy
///   speaks to such backends (HAProxy's `check-proto h2`); [`http2(false)`](HttpCheck::http2)
///   only HTTP/1.1. Either way the status and body rules apply as set.
///
/// ```
/// use lbkit::health::{HealthChecker, HttpCheck};
///
/// let check = HttpCheck::get("/healthz")
///     .expect_status(200..300)
///     .expect_body("ok")
///     .host("api.example.com");
/// let checker = HealthChecker::new(check);
/// # drop(checker);
/// ```
#[derive(Clone, Debug)]
pub struct HttpCheck {
    config: Arc<Config>,
    /// The endpoints found to speak only HTTP/2, shared by the clones of the check.
    http2_peers: Arc<Http2Peers>,
}

/// The protocol a check speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.1, or h2c for a peer that speaks only HTTP/2.
    Detect,
    Http1,
    Http2,
}

#[derive(Clone, Debug)]
struct Config {
    method: Method,
    path: String,
    status: (u16, u16),
    body: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    protocol: Protocol,
}

/// The addresses found to speak only HTTP/2. Bounded: past [`Http2Peers::MAX`] addresses (a
/// pool whose endpoints come and go for a long time), it starts over, and a forgotten one
/// costs one more connection to be found again.
#[derive(Debug, Default)]
struct Http2Peers(Mutex<HashSet<SocketAddr>>);

impl Http2Peers {
    const MAX: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        // Only inserts and removes under the lock: a panic cannot leave it half-changed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_http2_only(&self, addr: SocketAddr) -> bool {
        self.lock().contains(&addr)
    }

    fn set(&self, addr: SocketAddr, http2_only: bool) {
        let mut peers = self.lock();
        if !http2_only {
            peers.remove(&addr);
            return;
        }
        if peers.len() >= Self::MAX {
            peers.clear();
        }
        peers.insert(addr);
    }
}

impl HttpCheck {
    /// A check sending `method` requests for `path` (a path and query, such as `/health`).
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        HttpCheck {
            config: Arc::new(Config {
                method,
                path: path.into(),
                status: (200, 399),
                body: None,
                host: None,
                port: None,
                protocol: Protocol::Detect,
            }),
            http2_peers: Arc::default(),
        }
    }

    /// A check sending `GET` requests for `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Sets the statuses that mean healthy (default `200..=399`).
    pub fn expect_status(mut self, range: impl RangeBounds<u16>) -> Self {
        let lo = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_sub(1),
            Bound::Unbounded => u16::MAX,
        };
        self.config().status = (lo, hi);
        self
    }

    /// Requires the response body to contain `text` (the first 64 KiB are read).
    pub fn expect_body(mut self, text: impl Into<String>) -> Self {
        self.config().body = Some(text.into());
        self
    }

    /// Sets the `Host` header (default: the endpoint's address, such as `10.0.0.7:8080`).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config().host = Some(host.into());
        self
    }

    /// Sends the check to `port` on the endpoint's host instead of its own port.
    pub fn port(mut self, port: u16) -> Self {
        self.config().port = Some(port);
        self
    }

    /// Speaks only HTTP/2 without TLS (h2c, prior knowledge) with `true`, only HTTP/1.1 with
    /// `false`. By default (not called) the check speaks HTTP/1.1 and switches to h2c for an
    /// endpoint that speaks only HTTP/2 (see the [type docs](HttpCheck)). Over HTTP/2 the host
    /// goes in `:authority`.
    pub fn http2(mut self, http2: bool) -> Self {
        self.config().protocol = if http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        self
    }
}

impl HealthCheck for HttpCheck {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let addr = target(endpoint, self.config.port);
        let config = self.config.clone();
        let peers = self.http2_peers.clone();
        Box::pin(async move { run(&config, &peers, addr?).await })
    }
}

/// Aborts the connection task when the check ends, or is dropped on its timeout.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Runs a client connection's task until it ends or this is dropped.
    fn spawn<C>(conn: C) -> Self
    where
        C: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    {
        AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `req` on a new connection to `addr`, over HTTP/2 (h2c, prior knowledge) or HTTP/1.1;
/// the response comes with the connection's task, which must be kept while its body is read.
pub(super) async fn send<B>(
    addr: SocketAddr,
    mut req: Request<B>,
    http2: bool,
) -> Result<(Response<Incoming>, AbortOnDrop), CheckError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::error::BoxError>,
{
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(CheckError::refused)?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if http2 {
        // No connection-specific fields in HTTP/2: the host goes in `:authority`.
        req.headers_mut().remove(CONNECTION);
        let host = req.headers_mut().remove(HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map_or_else(|| addr.to_string(), str::to_owned);
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(CheckError::failed)?;
        *req.version_mut() = http::Version::HTTP_2;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(CheckError::protocol)?;
        let conn = AbortOnDrop::spawn(conn);
        let res = sender.send_request(req).await;
        Ok((res.map_err(CheckError::protocol)?, conn))
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(CheckError::protocol)?;
        let conn = AbortOnDrop::spawn(conn);
        let res = sender.send_request(req).await;
        Ok((res.map_err(CheckError::protocol)?, conn))
    }
}

/// The check's request to `addr`.
fn request(config: &Config, addr: SocketAddr) -> Result<Request<Empty<Bytes>>, CheckError> {
    let host = match &config.host {
        Some(h) => HeaderValue::from_str(h),
        None => HeaderValue::from_str(&addr.to_string()),
    }
    .map_err(CheckError::failed)?;
    Request::builder()
        .method(config.method.clone())
        .uri(config.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, "lbkit-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(CheckError::failed)
}

/// Sends the check's request in the protocol `addr` is known to speak; on a protocol error
/// (as an HTTP/2-only peer's answer to HTTP/1.1 is, and the other way round), once more in
/// the other protocol, remembering it if it answers. The response, its connection, and
/// whether it came over HTTP/2 from a peer that speaks nothing else.
async fn detect(
    config: &Config,
    peers: &Http2Peers,
    addr: SocketAddr,
) -> Result<(Response<Incoming>, AbortOnDrop, bool), CheckError> {
    let http2 = peers.is_http2_only(addr);
    match send(addr, request(config, addr)?, http2).await {
        Ok((res, conn)) => Ok((res, conn, http2)),
        Err(e) if e.kind() == CheckErrorKind::Protocol => {
            match send(addr, request(config, addr)?, !http2).await {
                Ok((res, conn)) => {
                    tracing::debug!(
                        %addr, http2_only = !http2,
                        "health check: the endpoint answers in the other protocol"
                    );
                    peers.set(addr, !http2);
                    Ok((res, conn, !http2))
                }
                Err(_) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

async fn run(config: &Config, peers: &Http2Peers, addr: SocketAddr) -> Result<(), CheckError> {
    let (res, _conn, http2_only) = match config.protocol {
        Protocol::Detect => detect(config, peers, addr).await?,
        fixed => {
            let http2 = fixed == Protocol::Http2;
            let (res, conn) = send(addr, request(config, addr)?, http2).await?;
            (res, conn, false)
        }
    };
    if http2_only && config.body.is_none() && answers_as_grpc_server(&res) {
        return Ok(());
    }
    let status = res.status().as_u16();
    if status < config.status.0 || status > config.status.1 {
        return Err(CheckError::status(status));
    }
    if let Some(expected) = &config.body {
        // Read up to MAX_BODY bytes; the text must be within them.
        let mut body = res.into_body();
        let mut seen = Vec::new();
        while seen.len() < MAX_BODY {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => return Err(CheckError::protocol(e)),
            }
        }
        seen.truncate(MAX_BODY);
        if !contains(&seen, expected.as_bytes()) {
            return Err(CheckError::body_mismatch());
        }
    }
    Ok(())
}

/// Whether `res` is how a gRPC server answers a request that is not gRPC: a gRPC response
/// (`content-type: application/grpc…`, as grpc-go's `415`/`405` and tonic's `UNIMPLEMENTED`
/// are), or `415 Unsupported Media Type`, which the gRPC over HTTP/2 spec asks of servers
/// for a request of another content type.
fn answers_as_grpc_server(res: &Response<Incoming>) -> bool {
    res.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE || crate::grpc::is_grpc(res.headers())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
