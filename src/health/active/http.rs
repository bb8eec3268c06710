use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::check::target;
use super::{CheckError, CheckFuture, HealthCheck};
use crate::endpoint::Endpoint;

/// The most of a response body an [`HttpCheck`] reads when looking for its expected text.
const MAX_BODY: usize = 64 * 1024;

/// Healthy when an HTTP request to the endpoint gets an expected status (and, if set, a
/// body containing an expected text).
///
/// Each check opens a new connection (`Connection: close`), as HAProxy's `option httpchk`
/// does, so it sees what a new client would see. Defaults: `GET`, any 2xx or 3xx status, no
/// body check, `Host` the endpoint's address, HTTP/1.1. An HTTP/2-only backend answers an
/// HTTP/1.1 request with a protocol error: check it with [`http2`](HttpCheck::http2) (h2c,
/// prior knowledge), as the proxy speaks to it (HAProxy's `check-proto h2`).
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
}

#[derive(Clone, Debug)]
struct Config {
    method: Method,
    path: String,
    status: (u16, u16),
    body: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    http2: bool,
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
                http2: false,
            }),
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

    /// Speaks HTTP/2 without TLS (h2c, prior knowledge) instead of HTTP/1.1 (default `false`),
    /// for backends that speak only HTTP/2. The host goes in `:authority`.
    pub fn http2(mut self, http2: bool) -> Self {
        self.config().http2 = http2;
        self
    }
}

impl HealthCheck for HttpCheck {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let addr = target(endpoint, self.config.port);
        let config = self.config.clone();
        Box::pin(async move { run(&config, addr?).await })
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

async fn run(config: &Config, addr: SocketAddr) -> Result<(), CheckError> {
    let host = match &config.host {
        Some(h) => HeaderValue::from_str(h),
        None => HeaderValue::from_str(&addr.to_string()),
    }
    .map_err(CheckError::failed)?;
    let req = Request::builder()
        .method(config.method.clone())
        .uri(config.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, "lbkit-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(CheckError::failed)?;
    let (res, _conn) = send(addr, req, config.http2).await?;
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
