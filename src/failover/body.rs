use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

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
            rest: Some(body),
            lent: None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ReplayBody {
            chunks: VecDeque::new(),
            trailers: None,
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
            rest: None,
            lent: None,
        }
    }

    /// Reads `body` into memory if it is at most `limit` bytes, making it replayable. A body
    /// that announces more (in its size hint) is not read at all; one that turns out larger
    /// while being read keeps what was read and streams the rest, and is not replayable.
    /// Fails with the body's error if reading fails.
    pub async fn buffer(body: B, limit: usize) -> Result<Self, B::Error>
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
        let mut size = 0usize;
        loop {
            let Some(body) = this.rest.as_mut() else {
                return Ok(this);
            };
            if body.is_end_stream() {
                this.rest = None;
                return Ok(this);
            }
            if size > limit {
                return Ok(this);
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
            match frame {
                None => this.rest = None,
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let n = data.as_ref().len();
                        size = size.saturating_add(n);
                        this.chunks.push_back((data, n as u64));
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
    }

    /// Whether the body can be sent again: it is buffered or empty, or its stream was lent
    /// (see [`Replay::lend`]) and the copy that had it is gone without reading it.
    pub fn is_replayable(&self) -> bool {
        match &self.lent {
            None => ended(self.rest.as_ref()),
            // No copy left that could still read it, and none did.
            Some(slot) => Arc::strong_count(slot) == 1 && lock(slot).is_some(),
        }
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
