use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;

/// A request body that can be sent again, so that a failed request can be retried.
///
/// A retry sends a copy of the request made *before* the first attempt; a body that is read
/// as it is sent (a client's upload streaming through a proxy) has no copy to make, and such
/// a request is never retried. This is the choice lbkit makes: no hidden buffering, so memory
/// stays bounded and uploads stream; buffer on purpose with [`ReplayBody::buffer`] (up to a
/// size you choose) when you want small bodies retried.
///
/// Implemented for the bodies whose copy is cheap and known in full (`http_body_util::Full` and
/// `Empty` with the `http-proxy` feature, `Bytes`, `String`, `Vec<u8>`, static strings and
/// slices, and `()` for body-less requests), where a clone is the copy, and for [`ReplayBody`],
/// which makes any body type replayable when it is empty or buffered. A server's streaming
/// body (hyper's `Incoming`, `axum::body::Body`) is not: wrap it with
/// `req.map(ReplayBody::new)` before the failover layer, and the compiler says so if you
/// forget. For a `Clone` body type of your own, implement it with `Some(self.clone())`.
///
/// ```compile_fail
/// # // A streaming body behind the failover layer without `ReplayBody`: rejected, with
/// # // "the request body `MyStream` cannot be sent again for a retry".
/// use lbkit::failover::{FailoverLayer, RetryBudget};
/// use tower::{service_fn, Layer, Service};
///
/// #[derive(Clone)]
/// struct MyStream;
/// let inner = service_fn(|_req: http::Request<MyStream>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// });
/// let mut svc = FailoverLayer::new(RetryBudget::default()).layer(inner);
/// let _ = svc.call(http::Request::new(MyStream));
/// ```
#[diagnostic::on_unimplemented(
    message = "the request body `{Self}` cannot be sent again for a retry",
    note = "wrap it so that empty or buffered bodies can be retried: `req.map(lbkit::failover::ReplayBody::new)`"
)]
pub trait Replay: Sized {
    /// A copy of this body to send in a retry, or `None` if it cannot be sent again.
    fn replay(&self) -> Option<Self>;

    /// A copy of this body for an attempt after which `self` may still be needed: like
    /// [`replay`](Replay::replay) (the default), except that a body still streaming may hand
    /// its stream to the copy while `self` keeps a claim on it, so that `self` can be replayed
    /// later if the attempt never read the stream (the request never left the proxy).
    ///
    /// [`ReplayBody`] does so; the failover layer asks this before each attempt.
    fn lend(&mut self) -> Option<Self> {
        self.replay()
    }
}

/// `Replay` by cloning, for body types whose clone is the whole body.
macro_rules! replay_by_clone {
    ($($(#[$attr:meta])* [$($gen:tt)*] $ty:ty;)*) => {$(
        $(#[$attr])*
        impl<$($gen)*> Replay for $ty {
            fn replay(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}

replay_by_clone! {
    [] ();
    [] String;
    [] Vec<u8>;
    [] &'static str;
    [] &'static [u8];
    #[cfg(feature = "http-proxy")]
    [] bytes::Bytes;
    #[cfg(feature = "http-proxy")]
    [D: Clone] http_body_util::Full<D>;
    #[cfg(feature = "http-proxy")]
    [D] http_body_util::Empty<D>;
}

pin_project! {
    /// A body wrapper that makes a request retryable when its body is known in full: an empty
    /// body (one that reports [`is_end_stream`](Body::is_end_stream), as a hyper server's
    /// `Incoming` does for a `GET`), or one buffered with [`ReplayBody::buffer`]. A body still
    /// streaming is sent as is and never retried (see [`Replay`]).
    ///
    /// For a proxy, map requests with `req.map(ReplayBody::new)` before the failover layer, so
    /// body-less requests are retried and uploads stream through untouched:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Empty, Full};
    /// use lbkit::failover::{Replay, ReplayBody};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // An empty body can always be sent again.
    /// let empty = ReplayBody::new(Empty::<Bytes>::new());
    /// assert!(empty.replay().is_some());
    ///
    /// // A small body buffered on purpose too, as often as needed.
    /// let small = ReplayBody::buffer(Full::new(Bytes::from("hello")), 64 * 1024).await.unwrap();
    /// let copy = small.replay().unwrap();
    /// assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
    ///
    /// // Over the limit: it streams, and is not replayable.
    /// let big = ReplayBody::buffer(Full::new(Bytes::from(vec![0; 100])), 10).await.unwrap();
    /// assert!(big.replay().is_none());
    /// # }
    /// ```
    pub struct ReplayBody<B: Body> {
        // Buffered data with its length, sent first.
        chunks: VecDeque<(B::Data, u64)>,
        // Buffered trailers, sent after everything else.
        trailers: Option<HeaderMap>,
        // Whether buffering stopped at a limit: what was read is sent first, but the body is
        // not whole in memory and cannot be replayed.
        spilled: bool,
        // The bytes this body (and its replays) hold against a `ReplayBuffer`'s cap.
        reservation: Option<Arc<Reservation>>,
        // What is still to be read from the original body, if anything.
        #[pin]
        rest: Option<B>,
        // A stream lent to an attempt (see `Replay::lend`), shared by the lender and its copy:
        // the copy moves it into `rest` when first polled, so a stream still here was not read.
        lent: Option<Arc<Mutex<Option<B>>>>,
    }
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body` as it is: replayable only if it is already at its end (an empty body).
    pub fn new(body: B) -> Self {
        ReplayBody {
            chunks: VecDeque::new(),
            trailers: None,
            spilled: false,
            reservation: None,
            rest: Some(body),
            lent: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ReplayBody {
            chunks: VecDeque::new(),
            trailers: None,
            spilled: false,
            reservation: None,
            rest: None,
            lent: None,
        }
    }

    /// A body of buffered `data`, replayable.
    pub fn from_data(data: B::Data) -> Self
    where
        B::Data: AsRef<[u8]>,
    {
        let n = data.as_ref().len() as u64;
        ReplayBody {
            chunks: VecDeque::from([(data, n)]),
            trailers: None,
            spilled: false,
            reservation: None,
            rest: None,
            lent: None,
        }
    }

    /// Reads `body` into memory if it is at most `limit` bytes, making it replayable. A body
    /// that announces more (in its size hint) is not read at all; one that turns out larger
    /// while being read keeps what was read (at most `limit` bytes, and the frame that would
    /// have crossed it) and streams the rest, and is not replayable. Fails with the body's
    /// error if reading fails.
    ///
    /// To also bound the bytes held by all bodies at once, use a [`ReplayBuffer`].
    pub async fn buffer(body: B, limit: usize) -> Result<Self, B::Error>
    where
        B: Unpin,
        B::Data: AsRef<[u8]>,
    {
        Self::fill(body, limit, None).await
    }

    /// Buffers `body` up to `limit` bytes, each byte also reserved against `held`'s cap.
    async fn fill(body: B, limit: usize, held: Option<&Arc<Held>>) -> Result<Self, B::Error>
    where
        B: Unpin,
        B::Data: AsRef<[u8]>,
    {
        let mut this = ReplayBody::new(body);
        if this
            .rest
            .as_ref()
            .is_some_and(|b| b.size_hint().lower() > limit as u64)
        {
            return Ok(this);
        }
        // Released if this future is dropped half-way; kept by the body (and its replays)
        // otherwise.
        let mut reservation = held.map(|h| Reservation {
            held: h.clone(),
            bytes: 0,
        });
        let mut size = 0usize;
        while let Some(body) = this.rest.as_mut() {
            if body.is_end_stream() {
                this.rest = None;
                break;
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
            match frame {
                None => this.rest = None,
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let n = data.as_ref().len();
                        let fits = size.checked_add(n).is_some_and(|total| total <= limit)
                            && reservation.as_mut().is_none_or(|r| r.add(n));
                        // Read is read: sent first either way, but past a limit the body
                        // streams on and is not replayable.
                        this.chunks.push_back((data, n as u64));
                        if !fits {
                            this.spilled = true;
                            break;
                        }
                        size += n;
                    }
                    Err(frame) => {
                        // Trailers end the body.
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                            this.rest = None;
                        }
                    }
                },
            }
        }
        this.reservation = reservation.filter(|r| r.bytes > 0).map(Arc::new);
        Ok(this)
    }

    /// Whether the body can be sent again: it is buffered (within its limit) or empty, or its
    /// stream was lent (see [`Replay::lend`]) and the copy that had it is gone without reading
    /// it.
    pub fn is_replayable(&self) -> bool {
        match &self.lent {
            None => !self.spilled && ended(self.rest.as_ref()),
            // No copy left that could still read it, and none did.
            Some(slot) => Arc::strong_count(slot) == 1 && lock(slot).is_some(),
        }
    }
}

/// Buffers request bodies for replay within a limit per body and a cap on the bytes all the
/// bodies it buffered hold at once, so that retries of small uploads cost bounded memory
/// however many clients send at the same time.
///
/// As a [`Layer`] (in front of the [`FailoverLayer`](super::FailoverLayer)) it buffers each
/// request's body before passing the request on, as a [`ReplayBody`]; a request known to have
/// no body goes straight through. [`buffer`](ReplayBuffer::buffer) does the same for one body:
/// it reads a body into memory while it stays within the per-body limit and the shared cap; a body that would cross either is still forwarded (what
/// was read first, then the rest as it streams) but is not replayable. A buffered body's bytes
/// count against the cap until it and every replay of it are dropped, which is when the
/// request is over. Clones share the cap.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use lbkit::failover::{Replay, ReplayBuffer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Up to 4 bytes per body, 6 bytes in all.
/// let buffers = ReplayBuffer::new(4, 6);
/// let first = buffers.buffer(Full::new(Bytes::from("abcd"))).await.unwrap();
/// assert!(first.replay().is_some());
/// assert_eq!(buffers.held(), 4);
/// // Only 2 bytes left under the cap: this one is forwarded, not kept for a retry.
/// let second = buffers.buffer(Full::new(Bytes::from("efg"))).await.unwrap();
/// assert!(second.replay().is_none());
/// drop((first, second));
/// assert_eq!(buffers.held(), 0);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ReplayBuffer {
    limit: usize,
    held: Arc<Held>,
}

impl ReplayBuffer {
    /// Buffers bodies of up to `limit` bytes each, with at most `cap` bytes held by all of
    /// them at once. (HAProxy's `http-buffer-request` waits for up to one buffer, 16 KiB by
    /// default; Envoy's retry buffer defaults to 1 MiB per request.)
    pub fn new(limit: usize, cap: usize) -> Self {
        ReplayBuffer {
            limit,
            held: Arc::new(Held {
                cap,
                bytes: AtomicUsize::new(0),
            }),
        }
    }

    /// Reads `body` into memory if it fits the per-body limit and the room left under the
    /// cap, making it replayable; otherwise forwards it without buffering it (past the cap,
    /// nothing is read ahead). See [`ReplayBody::buffer`]. Fails with the body's error if
    /// reading fails.
    pub async fn buffer<B>(&self, body: B) -> Result<ReplayBody<B>, B::Error>
    where
        B: Body + Unpin,
        B::Data: AsRef<[u8]>,
    {
        if self.held.bytes.load(Ordering::Relaxed) >= self.held.cap && !body.is_end_stream() {
            return Ok(ReplayBody::new(body));
        }
        ReplayBody::fill(body, self.limit, Some(&self.held)).await
    }

    /// The bytes held now by the bodies this buffer (or a clone) buffered.
    pub fn held(&self) -> usize {
        self.held.bytes.load(Ordering::Relaxed)
    }

    /// The largest body it buffers, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The most bytes all its bodies hold at once.
    pub fn cap(&self) -> usize {
        self.held.cap
    }
}

impl<S> Layer<S> for ReplayBuffer {
    type Service = BufferBodies<S>;

    fn layer(&self, inner: S) -> BufferBodies<S> {
        BufferBodies {
            inner,
            buffer: self.clone(),
        }
    }
}

/// The service of a [`ReplayBuffer`] used as a layer: buffers each request's body (see
/// [`ReplayBuffer::buffer`]) and passes the request on with a [`ReplayBody`]. Its errors are
/// the inner service's, or the body's when reading it failed, boxed.
#[derive(Clone, Debug)]
pub struct BufferBodies<S> {
    inner: S,
    buffer: ReplayBuffer,
}

impl<S, B> Service<http::Request<B>> for BufferBodies<S>
where
    S: Service<http::Request<ReplayBody<B>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: AsRef<[u8]> + Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BufferFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.body().is_end_stream() {
            return BufferFuture {
                state: BufferState::Direct {
                    fut: self.inner.call(req.map(ReplayBody::new)),
                },
            };
        }
        // The ready service takes the request once its body is read; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let buffer = self.buffer.clone();
        let fut = Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = buffer.buffer(body).await.map_err(Into::into)?;
            inner
                .call(http::Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        });
        BufferFuture {
            state: BufferState::Buffering { fut },
        }
    }
}

pin_project! {
    /// The response future of [`BufferBodies`].
    pub struct BufferFuture<F, R> {
        #[pin]
        state: BufferState<F, R>,
    }
}

pin_project! {
    #[project = BufferStateProj]
    enum BufferState<F, R> {
        // A request without a body, passed on at once.
        Direct { #[pin] fut: F },
        // Reading the body, then waiting for the inner service.
        Buffering { fut: Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>> },
    }
}

impl<F, R, E> Future for BufferFuture<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            BufferStateProj::Direct { fut } => fut.poll(cx).map_err(Into::into),
            BufferStateProj::Buffering { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<F, R> fmt::Debug for BufferFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.state {
            BufferState::Direct { .. } => "BufferFuture::Direct",
            BufferState::Buffering { .. } => "BufferFuture::Buffering",
        })
    }
}

/// The bytes held by the bodies of one [`ReplayBuffer`], and its cap.
#[derive(Debug)]
struct Held {
    cap: usize,
    bytes: AtomicUsize,
}

/// Bytes held against a [`ReplayBuffer`]'s cap, given back when dropped.
#[derive(Debug)]
struct Reservation {
    held: Arc<Held>,
    bytes: usize,
}

impl Reservation {
    /// Reserves `n` more bytes if they fit under the cap.
    fn add(&mut self, n: usize) -> bool {
        let cap = self.held.cap;
        let ok = self
            .held
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                cur.checked_add(n).filter(|&total| total <= cap)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Whether an optional body is absent or at its end.
fn ended<B: Body>(body: Option<&B>) -> bool {
    body.is_none_or(Body::is_end_stream)
}

/// The lent stream; a panic elsewhere cannot leave an `Option` half-written.
fn lock<B>(slot: &Mutex<Option<B>>) -> MutexGuard<'_, Option<B>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B: Body> Replay for ReplayBody<B>
where
    B::Data: Clone,
{
    fn replay(&self) -> Option<Self> {
        self.is_replayable().then(|| ReplayBody {
            chunks: self.chunks.clone(),
            trailers: self.trailers.clone(),
            spilled: self.spilled,
            reservation: self.reservation.clone(),
            rest: None,
            lent: self.lent.clone(),
        })
    }

    /// A copy; a stream not read yet goes to the copy (one allocation), and `self` can be
    /// replayed again once that copy is dropped without having read it.
    fn lend(&mut self) -> Option<Self> {
        if self.lent.is_none() && !ended(self.rest.as_ref()) {
            // Not pinned (behind `&mut`): the stream can move to the shared slot.
            self.lent = Some(Arc::new(Mutex::new(self.rest.take())));
        }
        self.replay()
    }
}

impl<B: Body> Body for ReplayBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Some((data, _)) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(slot) = this.lent.take() {
            // Read from now on: the lender can no longer replay it.
            this.rest.set(lock(&slot).take());
        }
        if let Some(rest) = this.rest.as_mut().as_pin_mut() {
            match ready!(rest.poll_frame(cx)) {
                None => this.rest.set(None),
                other => return Poll::Ready(other),
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
            && self.trailers.is_none()
            && ended(self.rest.as_ref())
            && self.lent.as_ref().is_none_or(|s| ended(lock(s).as_ref()))
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.chunks.iter().map(|(_, n)| n).sum();
        let lent = self.lent.as_ref().map(|s| lock(s));
        match self
            .rest
            .as_ref()
            .or(lent.as_ref().and_then(|l| l.as_ref()))
        {
            None => SizeHint::with_exact(buffered),
            Some(b) => {
                let h = b.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower().saturating_add(buffered));
                if let Some(u) = h.upper() {
                    out.set_upper(u.saturating_add(buffered));
                }
                out
            }
        }
    }
}

impl<B: Body + fmt::Debug> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("buffered_chunks", &self.chunks.len())
            .field("trailers", &self.trailers.is_some())
            .field("spilled", &self.spilled)
            .field("rest", &self.rest)
            .field("lent", &self.lent.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    type Stream = StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    fn stream(chunks: &[&'static str]) -> Stream {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn streaming_is_not_replayable_until_buffered() {
        let body = ReplayBody::new(stream(&["ab", "cd"]));
        assert!(!body.is_replayable() && body.replay().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");

        let body = ReplayBody::buffer(stream(&["ab", "cd"]), 16).await.unwrap();
        assert!(body.is_replayable());
        assert_eq!(body.size_hint().exact(), Some(4));
        let copy = body.replay().unwrap();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");

        // Over the limit while reading: what was read comes first, then the rest streams.
        let body = ReplayBody::buffer(stream(&["ab", "cd", "ef", "gh"]), 3)
            .await
            .unwrap();
        assert!(body.replay().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefgh");
    }

    #[tokio::test]
    async fn the_limit_is_exact() {
        for (chunks, limit, replayable) in [
            (&["abcd"][..], 4, true),
            (&["abcd"][..], 3, false),
            (&["ab", "cd"][..], 4, true),
            // The last frame crosses the limit: read, sent, but not kept for a retry (it was,
            // with the whole body over the limit, before).
            (&["ab", "cd"][..], 3, false),
            (&["ab", "", "cd"][..], 4, true),
            (&[][..], 0, true),
        ] {
            let body = ReplayBody::buffer(stream(chunks), limit).await.unwrap();
            assert_eq!(
                body.is_replayable(),
                replayable,
                "{chunks:?} within {limit}"
            );
            assert_eq!(body.replay().is_some(), replayable);
            assert_eq!(body.collect().await.unwrap().to_bytes(), chunks.concat());
        }
    }

    #[tokio::test]
    async fn the_cap_is_shared_and_given_back() {
        let buffers = ReplayBuffer::new(4, 6);
        let a = buffers.buffer(stream(&["ab", "cd"])).await.unwrap();
        assert!(a.is_replayable());
        assert_eq!(buffers.held(), 4);
        // Replays share the bytes: still 4.
        let a2 = a.replay().unwrap();
        assert_eq!(buffers.held(), 4);
        // 2 bytes left: the first frame fits, the second does not.
        let b = buffers.buffer(stream(&["ef", "gh"])).await.unwrap();
        assert!(!b.is_replayable());
        assert_eq!(buffers.held(), 6);
        // At the cap: not read at all.
        let c = buffers.clone().buffer(stream(&["i"])).await.unwrap();
        assert!(!c.is_replayable());
        assert_eq!(c.chunks.len(), 0);
        // A body known to be empty is replayable at any time.
        let empty = buffers.buffer(Full::new(Bytes::new())).await.unwrap();
        assert!(empty.is_replayable());
        assert_eq!(b.collect().await.unwrap().to_bytes(), "efgh");
        assert_eq!(buffers.held(), 4);
        drop(a);
        assert_eq!(buffers.held(), 4, "a replay still holds the bytes");
        assert_eq!(a2.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(buffers.held(), 0);
        assert_eq!(c.collect().await.unwrap().to_bytes(), "i");
        // Dropped half-way (the client went away): nothing stays reserved.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tx.unbounded_send(Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
            "xy",
        ))))
        .unwrap();
        let pending = StreamBody::new(rx);
        let filling = buffers.buffer(pending);
        let mut filling = Box::pin(filling);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert!(filling.as_mut().poll(&mut cx).is_pending());
        assert_eq!(buffers.held(), 2);
        drop(filling);
        assert_eq!(buffers.held(), 0);
        drop(tx);
    }

    #[tokio::test]
    async fn a_lent_stream_comes_back_only_if_unread_and_no_copy_is_left() {
        let mut body = ReplayBody::new(stream(&["ab", "cd"]));
        assert!(body.replay().is_none());
        // Lent to an attempt: one copy at a time holds the stream.
        let copy = body.lend().expect("a stream not read yet can be lent");
        assert_eq!(copy.size_hint().lower(), 0);
        assert!(!copy.is_end_stream());
        assert!(
            body.replay().is_none(),
            "a copy that may still read it is out"
        );
        drop(copy);
        // The attempt never read it (a refused connection): sent again, whole.
        let copy = body.lend().expect("unread: lent again");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcd");
        // Read: gone for good.
        assert!(body.replay().is_none() && body.lend().is_none());
        assert!(body.is_end_stream());

        // Buffered chunks stay with the lender and go to every copy first.
        let mut body = ReplayBody::buffer(stream(&["ab", "cd", "ef", "gh"]), 3)
            .await
            .unwrap();
        let copy = body.lend().unwrap();
        assert!(body.lend().is_none());
        drop(copy);
        let copy = body.lend().unwrap();
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcdefgh");
        assert!(body.lend().is_none());

        // A replayable body lends a plain copy.
        let mut empty = ReplayBody::new(Full::new(Bytes::new()));
        assert!(empty.lend().is_some() && empty.lend().is_some());
    }

    #[tokio::test]
    async fn empty_and_trailers() {
        let empty = ReplayBody::new(Full::new(Bytes::new()));
        assert!(empty.is_replayable());
        assert!(ReplayBody::<Full<Bytes>>::empty().is_end_stream());
        let data = ReplayBody::<Full<Bytes>>::from_data(Bytes::from_static(b"xyz"));
        assert_eq!(data.size_hint().exact(), Some(3));
        assert!(!data.is_end_stream());

        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = ReplayBody::buffer(StreamBody::new(futures::stream::iter(frames)), 10)
            .await
            .unwrap();
        let copy = body.replay().unwrap();
        let collected = copy.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "a");
    }
}
