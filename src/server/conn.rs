//! One HTTP connection: the service wrapper that gives each request its [`ClientAddr`] and
//! counts it, and the driver that closes an idle connection gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::accept::Drain;
use super::body::{BodyWatch, RequestBody};
use crate::forwarded::{ClientAddr, ClientTls};

/// What a connection's requests tell its driver: how many started or ended (a change means
/// the connection is not idle) and how many are in flight.
#[derive(Debug, Default)]
pub(super) struct Activity {
    events: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether the connection speaks HTTP/2 (seen on its requests).
    h2: AtomicBool,
    /// Made on the first request asking for an upgrade: its receivers are the
    /// [`TunnelScope`]s of those requests.
    tunnels: OnceLock<watch::Sender<()>>,
}

impl Activity {
    /// Resolves once no [`TunnelScope`] of this connection is left: every upgraded connection
    /// (tunnel) that came from it has closed, or none was opened.
    pub(super) async fn tunnels_closed(&self) {
        if let Some(tx) = self.tunnels.get() {
            tx.closed().await;
        }
    }
}

/// Ties a tunnel (an upgraded connection, such as a WebSocket, that the service splices to a
/// backend in a task of its own) to the client connection it came from. The server puts one
/// into the extensions of each request that asks for an upgrade.
///
/// The connection's task waits for its tunnels to close before it ends, so an open tunnel
/// keeps its place under the server's connection limit and is waited for on graceful
/// shutdown; and a tunnel closes as soon as that task is gone (the shutdown's grace period
/// is over, or the server's future was dropped), see [`TunnelScope::ended`].
#[derive(Clone, Debug)]
pub(crate) struct TunnelScope(watch::Receiver<()>);

impl TunnelScope {
    /// Resolves once the client connection's task has ended: the tunnel must close.
    pub(crate) async fn ended(&mut self) {
        // Nothing is ever sent: `changed` fails when the sender is dropped with the task.
        while self.0.changed().await.is_ok() {}
    }
}

/// The service hyper calls for each request of one connection: gives the body its read
/// timeout ([`RequestBody`]), inserts the peer's [`ClientAddr`] (and [`ClientTls`] on a TLS
/// connection, with the verified client certificate if any), counts the request in the connection's [`Activity`], and calls a clone of the
/// user's service.
#[derive(Debug)]
pub(super) struct ConnService<S> {
    pub(super) inner: S,
    pub(super) peer: SocketAddr,
    pub(super) tls: bool,
    pub(super) body_timeout: Option<Duration>,
    /// The client's verified certificate, put into each request too.
    #[cfg(feature = "tls")]
    pub(super) peer_cert: Option<super::tls::PeerCertificate>,
    pub(super) activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
    B: http_body::Body,
{
    type Response = Response<Either<B, Empty<B::Data>>>;
    type Error = S::Error;
    type Future = Counted<Oneshot<S, Request<RequestBody>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Only a body still to come can time out (and needs the watch).
        let watch = (self.body_timeout.is_some() && !http_body::Body::is_end_stream(req.body()))
            .then(|| Arc::new(BodyWatch::default()));
        let h1 = req.version() < http::Version::HTTP_2;
        let mut req = req.map(|b| RequestBody::new(b, self.body_timeout, watch.clone()));
        req.extensions_mut().insert(ClientAddr(self.peer));
        if self.tls {
            req.extensions_mut().insert(ClientTls);
        }
        #[cfg(feature = "tls")]
        if let Some(cert) = &self.peer_cert {
            req.extensions_mut().insert(cert.clone());
        }
        if req.headers().contains_key(http::header::UPGRADE) {
            let tx = self.activity.tunnels.get_or_init(|| watch::channel(()).0);
            req.extensions_mut().insert(TunnelScope(tx.subscribe()));
        }
        if req.version() == http::Version::HTTP_2 {
            self.activity.h2.store(true, Ordering::Relaxed);
        }
        self.activity.events.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Counted {
            fut: Some(self.inner.clone().oneshot(req)),
            activity: Some(self.activity.clone()),
            body: watch.map(|watch| (watch, h1)),
        }
    }
}

pin_project! {
    /// A request's future that counts as in flight on its connection until it ends or is
    /// dropped; and that answers `408 Request Timeout` (dropping the service's future) when
    /// the request's body times out.
    pub(super) struct Counted<F> {
        #[pin]
        fut: Option<F>,
        activity: Option<Arc<Activity>>,
        // The request body's watch, and whether the request is HTTP/1.
        body: Option<(Arc<BodyWatch>, bool)>,
    }

    impl<F> PinnedDrop for Counted<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(a) = this.project().activity.take() {
                a.in_flight.fetch_sub(1, Ordering::Relaxed);
                a.events.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<F, B, E> Future for Counted<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<Either<B, Empty<B::Data>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some((watch, h1)) = this.body.as_ref() {
            if watch.poll_expired(cx) {
                // Whatever the service was doing for the request (sending it to a backend)
                // is dropped: the request is over.
                this.fut.set(None);
                tracing::debug!("request body timed out: 408");
                let mut res = Response::new(Either::Right(Empty::new()));
                *res.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
                if *h1 {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                *this.body = None;
                return Poll::Ready(Ok(res));
            }
        }
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            // Answered 408 already (hyper polls no further).
            return Poll::Pending;
        };
        fut.poll(cx).map_ok(|res| res.map(Either::Left))
    }
}

/// When a connection counts as idle.
#[derive(Clone, Copy, Debug)]
pub(super) struct IdleRules {
    /// How long a new connection may go without a request.
    pub(super) first_request: Duration,
    /// How long an HTTP/2 connection may go with no request in flight, after the first.
    pub(super) idle: Duration,
    /// The same for HTTP/1.1, where waiting for the next request is also waiting for its
    /// head: the shorter of the idle and header-read timeouts.
    pub(super) idle_h1: Duration,
}

/// Drives `conn` to its end. Asks it to close gracefully (with `shutdown`, once) when the
/// server drains, when no request came within `rules.first_request`, or when no request was
/// in flight and none started or ended for `rules.idle` (`rules.idle_h1` for HTTP/1.1;
/// checked every half of it, so an idle connection closes after between one and one and a
/// half times that).
///
/// A graceful close never cuts a request short: HTTP/1 closes after the response being
/// written, HTTP/2 sends `GOAWAY` and lets open streams finish.
pub(super) async fn drive<C, T>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    rules: IdleRules,
    mut drain: Option<Drain>,
    mut shutdown: impl FnMut(Pin<&mut C>),
) -> T
where
    C: Future<Output = T>,
{
    let tick = |rules: &IdleRules| {
        let idle = if activity.h2.load(Ordering::Relaxed) {
            rules.idle
        } else {
            rules.idle_h1
        };
        (idle / 2).max(Duration::from_millis(1))
    };
    let first_deadline = Instant::now() + rules.first_request;
    let timer = tokio::time::sleep_until(first_deadline.min(Instant::now() + tick(&rules)));
    let mut timer = std::pin::pin!(timer);
    let mut seen = 0;
    let mut quiet = 0u8;
    let mut closing = false;
    loop {
        tokio::select! {
            out = conn.as_mut() => return out,
            () = started(&mut drain), if !closing => {
                shutdown(conn.as_mut());
                closing = true;
            }
            () = timer.as_mut(), if !closing => {
                let now = Instant::now();
                let events = activity.events.load(Ordering::Relaxed);
                if events == 0 {
                    if now >= first_deadline {
                        tracing::debug!("no request in time: closing the connection");
                        shutdown(conn.as_mut());
                        closing = true;
                    } else {
                        timer.as_mut().reset(first_deadline.min(now + tick(&rules)));
                    }
                    continue;
                }
                if activity.in_flight.load(Ordering::Relaxed) > 0 || events != seen {
                    seen = events;
                    quiet = 0;
                } else {
                    quiet += 1;
                    if quiet >= 2 {
                        tracing::debug!("idle: closing the connection");
                        shutdown(conn.as_mut());
                        closing = true;
                        continue;
                    }
                }
                timer.as_mut().reset(now + tick(&rules));
            }
        }
    }
}

async fn started(drain: &mut Option<Drain>) {
    match drain {
        Some(d) => d.started().await,
        None => std::future::pending().await,
    }
}
