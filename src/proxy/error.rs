use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

use super::grpc::{deadline_exceeded, grpc_error_response};
use super::http1_pool::Head;

use crate::error::{BoxError, Error};
use crate::failover::{self, NotSent};

/// Why forwarding a request to a backend failed.
///
/// A failure that proves the request never reached the backend ([`is_not_sent`]: a refused
/// connection, a connect timeout, a connection closed before the request was written) carries a
/// [`NotSent`] in its source chain, so that the failover layer sends the request elsewhere
/// whatever its method.
///
/// [`is_not_sent`]: ForwardError::is_not_sent
pub struct ForwardError {
    kind: Kind,
    source: Option<BoxError>,
    /// A bodiless request to send again over HTTP/2 (see [`Kind::Http2Only`]).
    resend: Option<Box<Head>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NoTarget,
    Connect,
    /// A connection was had, but closed (or not ready) before the request was written.
    Unsent,
    /// The TLS handshake with the backend failed.
    Tls,
    /// The backend answered an HTTP/1.1 request on a new connection in HTTP/2: it speaks only
    /// HTTP/2 and did not process the request.
    Http2Only,
    Timeout,
    Other,
}

impl ForwardError {
    pub(crate) fn no_target() -> Self {
        ForwardError {
            kind: Kind::NoTarget,
            source: None,
            resend: None,
        }
    }

    pub(crate) fn timeout() -> Self {
        ForwardError {
            kind: Kind::Timeout,
            source: None,
            resend: None,
        }
    }

    pub(crate) fn other(source: BoxError) -> Self {
        ForwardError {
            kind: Kind::Other,
            source: Some(source),
            resend: None,
        }
    }

    /// The backend could not be connected to (or the HTTP handshake on the new connection
    /// failed): the request never left.
    pub(crate) fn connect(e: BoxError) -> Self {
        ForwardError {
            kind: Kind::Connect,
            source: Some(Box::new(NotSent::new(e))),
            resend: None,
        }
    }

    /// The TLS handshake with the backend failed: the request never left.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn tls(e: BoxError) -> Self {
        ForwardError {
            kind: Kind::Tls,
            source: Some(Box::new(NotSent::new(e))),
            resend: None,
        }
    }

    /// An error of the same kind, its source in words: for each of the requests that waited
    /// on one shared connect.
    pub(crate) fn same_kind(&self) -> Self {
        let source = || -> BoxError {
            let mut message = String::new();
            let mut cur = self
                .source
                .as_deref()
                .map(|e| e as &(dyn StdError + 'static));
            while let Some(e) = cur {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&e.to_string());
                cur = e.source();
            }
            message.into()
        };
        match self.kind {
            Kind::NoTarget => Self::no_target(),
            Kind::Timeout => Self::timeout(),
            Kind::Connect => Self::connect(source()),
            Kind::Unsent => Self::unsent(source()),
            Kind::Tls => Self::tls(source()),
            Kind::Http2Only => Self::http2_only(None),
            Kind::Other => Self::other(source()),
        }
    }

    /// The connection closed (or was not ready) before the request was written.
    pub(crate) fn unsent(e: BoxError) -> Self {
        ForwardError {
            kind: Kind::Unsent,
            source: Some(Box::new(NotSent::new(e))),
            resend: None,
        }
    }

    /// The backend answered in HTTP/2 (see [`Kind::Http2Only`]); `head` to send the request
    /// again, if it had no body.
    pub(crate) fn http2_only(head: Option<Head>) -> Self {
        ForwardError {
            kind: Kind::Http2Only,
            source: Some(Box::new(NotSent::new(BoxError::from(
                "the backend answered HTTP/1.1 in HTTP/2",
            )))),
            resend: head.map(Box::new),
        }
    }

    /// With `head` (a bodiless request that failed on a new HTTP/1.1 connection before it
    /// was written), to be tried over HTTP/2: the backend may speak only HTTP/2.
    pub(crate) fn resend_over_http2(mut self, head: Option<Head>) -> Self {
        self.resend = head.map(Box::new);
        self
    }

    /// Whether the backend turned out to speak only HTTP/2; and the bodiless request, taken
    /// out to be sent again over HTTP/2 (see [`http2_only`](Self::http2_only) and
    /// [`resend_over_http2`](Self::resend_over_http2)).
    pub(crate) fn take_http2_resend(&mut self) -> (bool, Option<Head>) {
        (self.kind == Kind::Http2Only, self.resend.take().map(|h| *h))
    }

    /// A failure of hyper's client connection once the request was handed to it.
    pub(crate) fn from_hyper(e: hyper::Error) -> Self {
        if e.is_canceled() {
            return Self::unsent(e.into());
        }
        Self::other(e.into())
    }

    /// The backend could not be connected to (refused, unreachable, connect timeout).
    pub fn is_connect(&self) -> bool {
        self.kind == Kind::Connect
    }

    /// The request provably never reached the backend: it could not be connected to
    /// ([`is_connect`](ForwardError::is_connect)), or the connection closed before the request
    /// was written. Such a request is safe to send to another backend whatever its method; the
    /// source chain then holds a [`NotSent`] that tells the failover layer so.
    pub fn is_not_sent(&self) -> bool {
        matches!(
            self.kind,
            Kind::Connect | Kind::Unsent | Kind::Tls | Kind::Http2Only
        )
    }

    /// The TLS handshake with the backend failed (see
    /// [`Forward::tls`](super::Forward::tls)): its certificate is not trusted (an unknown CA,
    /// expired) or does not name the host asked for, it asked for a client certificate that
    /// was not given or not accepted (TLS 1.2; under TLS 1.3 the backend refuses a client
    /// certificate after the handshake, and the request fails as any other), or no HTTP
    /// version was in common by ALPN. The source chain holds rustls's error. The request was
    /// not sent ([`is_not_sent`](ForwardError::is_not_sent)).
    pub fn is_tls(&self) -> bool {
        self.kind == Kind::Tls
    }

    /// The backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// The request had no [`Target`](crate::balance::Target): `Forward` was used without a
    /// balancer in front of it.
    pub fn is_no_target(&self) -> bool {
        self.kind == Kind::NoTarget
    }
}

impl fmt::Debug for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::NoTarget => "request has no target endpoint",
            Kind::Connect => "could not connect to the backend",
            Kind::Unsent => "backend connection closed before the request was sent",
            Kind::Tls => "TLS handshake with the backend failed",
            Kind::Http2Only => "the backend speaks only HTTP/2",
            Kind::Timeout => "backend timed out",
            Kind::Other => "backend request failed",
        })
    }
}

impl StdError for ForwardError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// The HTTP status a proxy should answer for a failed request.
///
/// From the failover layer's [`failover::Error`]: its deadline or a per-try timeout of the last
/// attempt, 504; its retry budget spent (the fleet is failing widely and the proxy declined to
/// add retries: clients should back off), 503; no endpoint at all, 503; otherwise what the last
/// attempt's error says, below.
///
/// No endpoint available: 503. Overloaded (every endpoint at its in-flight limit with the
/// queue full or its wait over, [`Error::is_overloaded`], or tower's `load_shed` `Overloaded`):
/// 503, as HAProxy and Envoy answer; the request reached no backend. A timeout anywhere in the
/// chain (a [`ForwardError`] timeout or tower's `Elapsed`): 504. Anything else (refused,
/// reset, protocol error): 502.
pub fn status_for(error: &(dyn StdError + 'static)) -> StatusCode {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<failover::Error>() {
            if f.is_deadline() || f.is_timeout() {
                return StatusCode::GATEWAY_TIMEOUT;
            }
            if f.is_budget_exhausted() || f.is_no_endpoint() {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        if let Some(e) = e.downcast_ref::<Error>() {
            if e.is_no_endpoint() || e.is_overloaded() {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        if let Some(f) = e.downcast_ref::<ForwardError>() {
            if f.is_timeout() {
                return StatusCode::GATEWAY_TIMEOUT;
            }
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return StatusCode::GATEWAY_TIMEOUT;
        }
        cur = e.source();
    }
    StatusCode::BAD_GATEWAY
}

/// A [`Layer`] that turns a proxy's errors into HTTP responses (see [`status_for`]), so the
/// service can be handed to a hyper server as is.
///
/// A gRPC request (`content-type: application/grpc…`) gets its failures in gRPC's shape
/// instead (a trailers-only response: HTTP 200, `grpc-status` 14
/// `UNAVAILABLE` or 4 `DEADLINE_EXCEEDED`), and its client's deadline (`grpc-timeout`) bounds
/// the wait for the response head: past it the call is dropped (counted as cancelled at the
/// backend, not as its failure) and answered `DEADLINE_EXCEEDED`.
///
/// The body is the status line's text alone: it never carries the error's details, which can
/// name a backend address. The error is logged (`tracing` at `warn`) for the operator.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorResponseLayer {
    _priv: (),
}

impl ErrorResponseLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        ErrorResponseLayer { _priv: () }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;

    fn layer(&self, inner: S) -> ErrorResponse<S> {
        ErrorResponse { inner }
    }
}

/// The service of [`ErrorResponseLayer`].
#[derive(Clone, Debug)]
pub struct ErrorResponse<S> {
    inner: S,
}

/// The body of a proxied response: the backend's, or the proxy's own for an error.
pub type ProxyBody<B> = Either<B, Full<Bytes>>;

/// The response the proxy sends for `status`: a short plain-text body naming the status only.
pub(crate) fn error_response<B>(status: StatusCode) -> Response<ProxyBody<B>> {
    let text = match status {
        StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable\n",
        StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout\n",
        StatusCode::BAD_GATEWAY => "502 Bad Gateway\n",
        _ => "error\n",
    };
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for ErrorResponse<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody<B>>;
    type Error = Infallible;
    type Future = ErrorResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // An inner service that fails readiness has no way back; report it per request instead.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (grpc, deadline) = grpc_call(req.headers());
        ErrorResponseFuture {
            inner: Some(self.inner.call(req)),
            grpc,
            deadline: deadline.map(tokio::time::sleep),
        }
    }
}

/// Whether a request is gRPC, and the deadline its client set (`grpc-timeout`), if any.
#[inline]
fn grpc_call(headers: &http::HeaderMap) -> (bool, Option<Duration>) {
    match crate::grpc::is_grpc(headers) {
        true => (true, crate::grpc::timeout(headers)),
        false => (false, None),
    }
}

pin_project! {
    /// The response future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ErrorResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        // A gRPC request: errors are answered in gRPC's shape.
        grpc: bool,
        // The gRPC client's deadline: when it passes, the call is dropped (a cancellation,
        // not a failure of the backend) and answered DEADLINE_EXCEEDED.
        #[pin]
        deadline: Option<Sleep>,
    }
}

impl<F, B, E> Future for ErrorResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ProxyBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Ok(deadline_exceeded()));
        };
        let res = match inner.poll(cx) {
            Poll::Ready(res) => res,
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_pin_mut() {
                    ready!(deadline.poll(cx));
                    this.inner.set(None);
                    tracing::debug!("gRPC call past its grpc-timeout: cancelled");
                    return Poll::Ready(Ok(deadline_exceeded()));
                }
                return Poll::Pending;
            }
        };
        Poll::Ready(Ok(match res {
            Ok(res) => res.map(Either::Left),
            Err(e) => {
                let e: BoxError = e.into();
                let status = status_for(&*e);
                tracing::warn!(error = %e, source = ?e.source(), %status, grpc = *this.grpc, "proxy error");
                match *this.grpc {
                    true => grpc_error_response(status),
                    false => error_response(status),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let e: BoxError = Box::new(Error::no_endpoint());
        assert_eq!(status_for(&*e), StatusCode::SERVICE_UNAVAILABLE);
        let e: BoxError = Box::new(Error::endpoint(
            "a".into(),
            Box::new(ForwardError::timeout()),
        ));
        assert_eq!(status_for(&*e), StatusCode::GATEWAY_TIMEOUT);
        let e: BoxError = Box::new(Error::endpoint(
            "a".into(),
            Box::new(tower::timeout::error::Elapsed::new()),
        ));
        assert_eq!(status_for(&*e), StatusCode::GATEWAY_TIMEOUT);
        let e: BoxError = Box::new(Error::endpoint("a".into(), "reset".into()));
        assert_eq!(status_for(&*e), StatusCode::BAD_GATEWAY);
        let e: BoxError = Box::new(Error::overloaded());
        assert_eq!(status_for(&*e), StatusCode::SERVICE_UNAVAILABLE);
        let e: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(status_for(&*e), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn failover_statuses() {
        use crate::failover::{Error as FailoverError, Failure};
        let last = |error: &str, timed_out| Failure {
            error: Some(Box::new(Error::endpoint("a".into(), error.into()))),
            timed_out,
        };
        let status = |e: FailoverError| status_for(&e);
        // The failover layer's own reasons first.
        assert_eq!(
            status(FailoverError::deadline(1, last("reset", false))),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status(FailoverError::budget_exhausted(1, last("reset", false))),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(FailoverError::budget_exhausted(1, last("slow", true))),
            StatusCode::GATEWAY_TIMEOUT
        );
        let none: BoxError = Box::new(Error::no_endpoint());
        assert_eq!(
            status(FailoverError::no_endpoint(none)),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Otherwise the last attempt's error.
        assert_eq!(
            status(FailoverError::failed(2, last("reset", false))),
            StatusCode::BAD_GATEWAY
        );
        let timeout = Failure {
            error: Some(Box::new(Error::endpoint(
                "a".into(),
                Box::new(ForwardError::timeout()),
            ))),
            timed_out: false,
        };
        assert_eq!(
            status(FailoverError::failed(1, timeout)),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
