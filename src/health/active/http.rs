use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::check::target;
use super::{CheckError, CheckFuture, HealthCheck};
use crate::endpoint::Endpoint;

/// The most of a response body an [`HttpCheck`] reads when looking for its expected text.
const MAX_BODY: usize = 64 * 1024;

/// Healthy when an HTTP/1.1 request to the endpoint gets an expected status (and, if set, a
/// body containing an expected text).
///
/// Each check opens a new connection (`Connection: close`), as HAProxy's `option httpchk`
/// does, so it sees what a new client would see. Defaults: `GET`, any 2xx or 3xx status, no
/// body check, `Host` the endpoint's address.
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
}

impl HealthCheck for HttpCheck {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let addr = target(endpoint, self.config.port);
        let config = self.config.clone();
        Box::pin(async move { run(&config, addr?).await })
    }
}

/// Aborts the connection task when the check ends, or is dropped on its timeout.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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

    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(CheckError::refused)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CheckError::protocol)?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let res = sender
        .send_request(req)
        .await
        .map_err(CheckError::protocol)?;
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
