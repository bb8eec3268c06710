//! One HTTP connection: the service wrapper that gives each request its [`ClientAddr`] and
//! counts it, and the driver that closes an idle connection gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use http::Request;
use pin_project_lite::pin_project;
use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::accept::Drain;
use crate::forwarded::ClientAddr;

/// What a connection's requests tell its driver: how many started or ended (a change means
/// the connection is not idle) and how many are in flight.
#[derive(Debug, Default)]
pub(super) struct Activity {
    events: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether the connection speaks HTTP/2 (seen on its requests).
    h2: AtomicBool,
}

/// The service hyper calls for each request of one connection: inserts the peer's
/// [`ClientAddr`] (and its verified client certificate, if any), counts the request in the
/// connection's [`Activity`], and calls a clone of the user's service.
#[derive(Debug)]
pub(super) struct ConnService<S> {
    pub(super) inner: S,
    pub(super) peer: SocketAddr,
    /// The client's verified certificate, put into each request too.
    #[cfg(feature = "tls")]
    pub(super) peer_cert: Option<super::tls::PeerCertificate>,
    pub(super) activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<B>> for ConnService<S>
where
    S: Service<Request<B>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Counted<Oneshot<S, Request<B>>>;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(ClientAddr(self.peer));
        #[cfg(feature = "tls")]
        if let Some(cert) = &self.peer_cert {
            req.extensions_mut().insert(cert.clone());
        }
        if req.version() == http::Version::HTTP_2 {
            self.activity.h2.store(true, Ordering::Relaxed);
        }
        self.activity.events.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Counted {
            fut: self.inner.clone().oneshot(req),
            activity: Some(self.activity.clone()),
        }
    }
}

pin_project! {
    /// A request's future that counts as in flight on its connection until it ends or is
    /// dropped.
    pub(super) struct Counted<F> {
        #[pin]
        fut: F,
        activity: Option<Arc<Activity>>,
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

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().fut.poll(cx)
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
