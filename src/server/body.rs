//! The request body the [`Server`](super::Server) hands to its service: hyper's body, with a
//! read timeout per frame.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::conn::BodyEnd;

/// A request body as lbkit's [`Server`](super::Server) gives it to the service: the client's
/// body (hyper's `Incoming`), which fails with [`BodyError::is_timeout`] when the client sends
/// no data for the server's [`body_read_timeout`](super::Server::body_read_timeout) while it
/// is being read.
///
/// The timeout runs only while someone waits for the next frame: a proxy slowed down by its
/// backend (not reading) does not make the client time out. When it expires, the server
/// answers `408 Request Timeout` (closing an HTTP/1.1 connection), and drops what the service
/// was doing for the request: a backend request being sent is aborted, and a balancer counts
/// it as cancelled, not as the backend's failure.
pub struct RequestBody {
    inner: Incoming,
    timeout: Option<Duration>,
    /// Armed when a read finds no data, cleared when a frame comes.
    timer: Option<Pin<Box<Sleep>>>,
    /// Tells the server's request future that the body timed out.
    watch: Option<Arc<BodyWatch>>,
    /// Tells the connection when the body was read to its end.
    end: Option<BodyEnd>,
}

impl RequestBody {
    /// Wraps `inner` with a per-frame read timeout (none if `timeout` is `None`); `watch` is
    /// told when it expires, `end` when the body was read to its end.
    pub(super) fn new(
        inner: Incoming,
        timeout: Option<Duration>,
        watch: Option<Arc<BodyWatch>>,
        end: Option<BodyEnd>,
    ) -> Self {
        RequestBody {
            inner,
            timeout,
            timer: None,
            watch,
            end,
        }
    }

    /// Hyper's body inside, without the timeout.
    pub fn into_inner(self) -> Incoming {
        self.inner
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                let ended = match &frame {
                    None => true,
                    Some(Ok(_)) => this.inner.is_end_stream(),
                    Some(Err(_)) => false,
                };
                if ended {
                    if let Some(end) = this.end.take() {
                        end.done();
                    }
                }
                return Poll::Ready(frame.map(|f| f.map_err(BodyError::client)));
            }
            Poll::Pending => {}
        }
        let Some(timeout) = this.timeout else {
            return Poll::Pending;
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // No data for the whole timeout. From now on the body only fails.
        this.timeout = None;
        this.timer = None;
        if let Some(w) = this.watch.take() {
            w.expire();
        }
        Poll::Ready(Some(Err(BodyError::timeout(timeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a request's body tells the server's request future: that it timed out.
#[derive(Debug, Default)]
pub(super) struct BodyWatch {
    expired: AtomicBool,
    waker: AtomicWaker,
}

impl BodyWatch {
    fn expire(&self) {
        self.expired.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether the body timed out; otherwise wakes `cx` when it does.
    pub(super) fn poll_expired(&self, cx: &mut Context<'_>) -> bool {
        if self.expired.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.expired.load(Ordering::Acquire)
    }
}

/// Why reading a [`RequestBody`] failed: the client sent nothing for the read timeout
/// ([`is_timeout`](BodyError::is_timeout)), or the connection failed (hyper's error, as the
/// [source](StdError::source)).
pub struct BodyError {
    kind: Kind,
}

enum Kind {
    Timeout(Duration),
    Client(hyper::Error),
}

impl BodyError {
    fn timeout(after: Duration) -> Self {
        BodyError {
            kind: Kind::Timeout(after),
        }
    }

    fn client(e: hyper::Error) -> Self {
        BodyError {
            kind: Kind::Client(e),
        }
    }

    /// The client sent no data for the server's body read timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout(_))
    }
}

impl fmt::Debug for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Timeout(d) => f.debug_tuple("BodyError::Timeout").field(d).finish(),
            Kind::Client(e) => f.debug_tuple("BodyError::Client").field(e).finish(),
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Timeout(d) => write!(f, "request body: no data from the client for {d:?}"),
            Kind::Client(_) => f.write_str("request body: reading from the client failed"),
        }
    }
}

impl StdError for BodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            Kind::Timeout(_) => None,
            Kind::Client(e) => Some(e),
        }
    }
}
