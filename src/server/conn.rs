//! One HTTP connection: the service wrapper that gives each request its [`ClientAddr`] and
//! counts it, and the driver that closes an idle connection gracefully (or hands an idle
//! HTTP/1.1 connection back to be parked, see [`super::idle`]).

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
/// the connection is not idle) and how many are in flight; and, for an HTTP/1.1 connection
/// that may be parked while idle, what its IO saw (see [`Activity::parkable`]).
#[derive(Debug, Default)]
pub(super) struct Activity {
    events: AtomicU64,
    /// Requests from the call until their response body is dropped (sent, or given up).
    in_flight: AtomicUsize,
    /// Request bodies not yet read to their end (one dropped before its end stays counted:
    /// hyper then drains or closes, so such a connection is never parked).
    unread_bodies: AtomicUsize,
    /// What hyper did with the socket (a parked connection's IO notes it).
    pub(super) io: Arc<IoSeen>,
    /// Whether the connection speaks HTTP/2 (seen on its requests).
    h2: AtomicBool,
    /// Made on the first request asking for an upgrade: its receivers are the
    /// [`TunnelScope`]s of those requests.
    tunnels: OnceLock<watch::Sender<()>>,
}

/// What hyper's HTTP/1.1 connection did with its socket, as the socket saw it. Apart from
/// [`Activity`], which the socket must not keep alive: an upgraded socket lives on in its
/// tunnel, which ends when the connection's task (holding the last `Activity`) ends.
#[derive(Debug, Default)]
pub(super) struct IoSeen {
    /// hyper's last read found no data (it waits for the client).
    pub(super) read_waiting: AtomicBool,
    /// Bytes were read since the last request started: part of a next request head.
    pub(super) read_since_call: AtomicBool,
    /// Something was written that no flush has completed since.
    pub(super) unflushed: AtomicBool,
}

impl Activity {
    /// Whether an HTTP/1.1 connection is idle between requests, as hyper's IO shows it: no
    /// request in flight, every request body read to its end, every response written and
    /// flushed, no part of a next request read, and hyper waiting for the client's next
    /// bytes. Then hyper's connection holds nothing but buffers and can be taken apart
    /// (`into_parts`) and built again when the client sends its next request.
    pub(super) fn parkable(&self) -> bool {
        self.between_requests()
            && self.io.read_waiting.load(Ordering::Relaxed)
            && !self.io.read_since_call.load(Ordering::Relaxed)
    }

    /// No request in flight or being read, and everything written flushed: closing the
    /// connection now cuts nothing short (at most a request head still coming).
    fn between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.unread_bodies.load(Ordering::Relaxed) == 0
            && !self.io.unflushed.load(Ordering::Relaxed)
    }

    /// Resolves once no [`TunnelScope`] of this connection is left: every upgraded connection
    /// (tunnel) that came from it has closed, or none was opened.
    pub(super) async fn tunnels_closed(&self) {
        if let Some(tx) = self.tunnels.get() {
            tx.closed().await;
        }
    }
}

/// Held by a [`RequestBody`] that has more to come: [`BodyEnd::done`] tells the connection
/// that the body was read to its end. Dropped without that, the body stays counted as unread.
#[derive(Debug)]
pub(super) struct BodyEnd(Arc<Activity>);

impl BodyEnd {
    /// The body was read to its end.
    pub(super) fn done(self) {
        self.0.unread_bodies.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service's response body, or the empty body of a `408` answered for it.
type OrTimeout<B> = Either<B, Empty<<B as http_body::Body>::Data>>;

/// Counts a request as in flight on its connection until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A response body that keeps its request counted as in flight until hyper is done with
    /// it (has sent it all, or gave up).
    pub(super) struct ResponseBody<B> {
        #[pin]
        inner: B,
        in_flight: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

// `inner` is never pinned (each request calls a clone of it), so the wrapper may move even
// when the service may not: hyper's connection, which owns it, can then be taken apart
// (`into_parts`) to park an idle HTTP/1.1 connection.
impl<S> Unpin for ConnService<S> {}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
    B: http_body::Body,
{
    type Response = Response<ResponseBody<Either<B, Empty<B::Data>>>>;
    type Error = S::Error;
    type Future = Counted<Oneshot<S, Request<RequestBody>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Only a body still to come can time out (and needs the watch).
        let watch = (self.body_timeout.is_some() && !http_body::Body::is_end_stream(req.body()))
            .then(|| Arc::new(BodyWatch::default()));
        let h1 = req.version() < http::Version::HTTP_2;
        let end = (!http_body::Body::is_end_stream(req.body())).then(|| {
            self.activity.unread_bodies.fetch_add(1, Ordering::Relaxed);
            BodyEnd(self.activity.clone())
        });
        self.activity
            .io
            .read_since_call
            .store(false, Ordering::Relaxed);
        let mut req = req.map(|b| RequestBody::new(b, self.body_timeout, watch.clone(), end));
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
            in_flight: Some(InFlight(self.activity.clone())),
            body: watch.map(|watch| (watch, h1)),
        }
    }
}

/// A [`ConnService`] whose futures are boxed, for the connections that may speak HTTP/2.
/// hyper's HTTP/2 server spawns a task for each request, holding the service's future: the
/// future of a full proxy stack is kilobytes, which spawning copies several times over (most
/// of the `memcpy` that callgrind counts per HTTP/2 request). Boxed, it is written once and the
/// task holds a pointer. (An HTTP/1.1 connection keeps its one request's future in place.)
#[derive(Debug)]
pub(super) struct BoxedFutures<S>(pub(super) ConnService<S>);

impl<S, B> hyper::service::Service<Request<Incoming>> for BoxedFutures<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
    B: http_body::Body,
{
    type Response = Response<ResponseBody<Either<B, Empty<B::Data>>>>;
    type Error = S::Error;
    type Future = Pin<Box<Counted<Oneshot<S, Request<RequestBody>>>>>;

    #[inline]
    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.0.call(req))
    }
}

pin_project! {
    /// A request's future that counts as in flight on its connection until it fails or is
    /// dropped, or (handing the count to the response body) until its response is sent; and
    /// that answers `408 Request Timeout` (dropping the service's future) when the request's
    /// body times out.
    pub(super) struct Counted<F> {
        #[pin]
        fut: Option<F>,
        in_flight: Option<InFlight>,
        // The request body's watch, and whether the request is HTTP/1.
        body: Option<(Arc<BodyWatch>, bool)>,
    }
}

impl<F, B, E> Future for Counted<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<ResponseBody<Either<B, Empty<B::Data>>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let in_flight = this.in_flight;
        let out = Self::poll_response(this.fut, this.body, cx);
        out.map_ok(|res| {
            let in_flight = in_flight
                .take()
                .expect("a request future is polled after its end");
            res.map(|inner| ResponseBody { inner, in_flight })
        })
    }
}

impl<F, B, E> Counted<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    fn poll_response(
        mut fut: Pin<&mut Option<F>>,
        body: &mut Option<(Arc<BodyWatch>, bool)>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<OrTimeout<B>>, E>> {
        if let Some((watch, h1)) = body.as_ref() {
            if watch.poll_expired(cx) {
                // Whatever the service was doing for the request (sending it to a backend)
                // is dropped: the request is over.
                fut.set(None);
                tracing::debug!("request body timed out: 408");
                let mut res = Response::new(Either::Right(Empty::new()));
                *res.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
                if *h1 {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                *body = None;
                return Poll::Ready(Ok(res));
            }
        }
        let Some(fut) = fut.as_pin_mut() else {
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
/// server drains, when no request came within `rules.first_request` of `accepted`, or when no
/// request was in flight and none started or ended for `rules.idle` (`rules.idle_h1` for
/// HTTP/1.1; checked every half of it, so an idle connection closes after between one and
/// one and a half times that).
///
/// With `park` (an HTTP/1.1 connection; the count of such connections open), it checks at
/// least every [`PARK_AFTER`] and returns [`Driven::Idle`] once no request started or ended
/// since the last check and the connection is idle between requests
/// ([`Activity::parkable`]): the caller then takes hyper's connection apart and waits for the
/// client's next bytes without its buffers. With more than [`PARK_AT_ONCE_ABOVE`] such
/// connections open it does so right after each poll of `conn` that leaves it idle, as nginx
/// frees a keep-alive connection's buffers after each response. (Not always: a busy
/// keep-alive connection would build hyper's connection again for each request, a few
/// percent more CPU time per request.) And when it should close while no request is
/// in flight (at most a head is still coming) it returns [`Driven::Close`]: the caller drops
/// the connection. (hyper's graceful shutdown would wait for that head on a connection built
/// again after parking, which has not finished a request yet.)
///
/// A graceful close never cuts a request short: HTTP/1 closes after the response being
/// written, HTTP/2 sends `GOAWAY` and lets open streams finish.
pub(super) async fn drive<C, T>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    rules: IdleRules,
    accepted: Instant,
    drain: &mut Option<Drain>,
    park: Option<&AtomicUsize>,
    mut shutdown: impl FnMut(Pin<&mut C>),
) -> Driven<T>
where
    C: Future<Output = T>,
{
    let at_once = || park.is_some_and(|open| open.load(Ordering::Relaxed) > PARK_AT_ONCE_ABOVE);
    let park = park.is_some();
    let idle = |rules: &IdleRules| {
        if activity.h2.load(Ordering::Relaxed) {
            rules.idle
        } else {
            rules.idle_h1
        }
    };
    let tick = |rules: &IdleRules| {
        let tick = (idle(rules) / 2).max(Duration::from_millis(1));
        if park {
            tick.min(PARK_AFTER)
        } else {
            tick
        }
    };
    let first_deadline = accepted + rules.first_request;
    let timer = tokio::time::sleep_until(first_deadline.min(Instant::now() + tick(&rules)));
    let mut timer = std::pin::pin!(timer);
    let mut seen = activity.events.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let mut closing = false;
    loop {
        tokio::select! {
            // In this order: whether the connection is idle is known after it was polled.
            biased;
            out = conn.as_mut() => return Driven::Done(out),
            () = idle_between_requests(activity), if park && !closing && at_once() => {
                return Driven::Idle;
            }
            () = started(drain), if !closing => {
                if park && activity.between_requests() {
                    return Driven::Close;
                }
                shutdown(conn.as_mut());
                closing = true;
            }
            () = timer.as_mut(), if !closing => {
                let now = Instant::now();
                let events = activity.events.load(Ordering::Relaxed);
                if events == 0 {
                    if now >= first_deadline {
                        tracing::debug!("no request in time: closing the connection");
                        if park && activity.between_requests() {
                            return Driven::Close;
                        }
                        shutdown(conn.as_mut());
                        closing = true;
                    } else {
                        timer.as_mut().reset(first_deadline.min(now + tick(&rules)));
                    }
                    continue;
                }
                if activity.in_flight.load(Ordering::Relaxed) > 0 || events != seen {
                    seen = events;
                    quiet_since = now;
                } else if now.duration_since(quiet_since) >= idle(&rules) {
                    tracing::debug!("idle: closing the connection");
                    if park && activity.between_requests() {
                        return Driven::Close;
                    }
                    shutdown(conn.as_mut());
                    closing = true;
                    continue;
                } else if park && activity.parkable() {
                    return Driven::Idle;
                }
                timer.as_mut().reset(now + tick(&rules));
            }
        }
    }
}

/// How long an HTTP/1.1 connection goes without a request starting or ending before it may be
/// parked: it is parked after between one and two times this of idleness.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// With more HTTP/1.1 connections open than this, an idle one is parked at once (memory
/// matters more than the cost of building hyper's connection again for the next request).
pub(super) const PARK_AT_ONCE_ABOVE: usize = 256;

/// Ready while the connection is [parkable](Activity::parkable); never wakes by itself (it is
/// polled right after the connection, which makes it so).
async fn idle_between_requests(activity: &Activity) {
    std::future::poll_fn(|_| {
        if activity.parkable() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// How [`drive`] left a connection.
pub(super) enum Driven<T> {
    /// It ended, with this.
    Done(T),
    /// Idle between requests: it may be taken apart (parked).
    Idle,
    /// To be closed, with no request in flight.
    Close,
}

/// Resolves once the server drains (never without a [`Drain`]).
pub(super) async fn started(drain: &mut Option<Drain>) {
    match drain {
        Some(d) => d.started().await,
        None => std::future::pending().await,
    }
}
