use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// The response body of the [`Cache`](super::Cache) service.
    ///
    /// A response served from the cache is one [`Bytes`] (a reference-counted clone of the
    /// stored body, no copy); a response the cache did not keep is the backend's body, streamed
    /// as it arrives, after any part already read while the cache tried to buffer it (a body
    /// found larger than the [maximum object size](super::CacheLayer::max_object_size) is
    /// read up to that size, then streamed on).
    pub struct CacheBody<B> {
        // A stored body, served whole (no allocation beyond the `Bytes` clone).
        full: Option<Bytes>,
        prefix: VecDeque<Frame<Bytes>>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B> CacheBody<B> {
    /// A body of `bytes` alone.
    pub fn full(bytes: Bytes) -> Self {
        CacheBody {
            full: (!bytes.is_empty()).then_some(bytes),
            prefix: VecDeque::new(),
            rest: None,
        }
    }

    /// The backend's `body`, streamed as is (what the cache answers when it keeps nothing).
    pub fn streaming(body: B) -> Self {
        CacheBody {
            full: None,
            prefix: VecDeque::new(),
            rest: Some(body),
        }
    }

    /// `frames` already read from `rest`, then what is left of `rest`.
    pub(super) fn prefixed(frames: VecDeque<Frame<Bytes>>, rest: Option<B>) -> Self {
        CacheBody {
            full: None,
            prefix: frames,
            rest,
        }
    }
}

impl<B> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBody")
            .field("stored", &self.full.as_ref().map(Bytes::len))
            .field("buffered_frames", &self.prefix.len())
            .field("streaming", &self.rest.is_some())
            .finish()
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(bytes) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.rest.as_mut().as_pin_mut() {
            Some(rest) => rest.poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none()
            && self.prefix.is_empty()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.full.as_ref().map_or(0, |b| b.len() as u64)
            + self
                .prefix
                .iter()
                .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                .sum::<u64>();
        let rest = match &self.rest {
            Some(rest) => rest.size_hint(),
            None => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint.set_lower(rest.lower().saturating_add(buffered));
        hint
    }
}
