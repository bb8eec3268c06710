use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::SET_COOKIE;
use pin_project_lite::pin_project;

use super::layer::Config;
use crate::endpoint::EndpointId;
use crate::hints::PickRecord;

pin_project! {
    /// The response future of [`Sticky`](super::Sticky): the inner response, with a
    /// `Set-Cookie` appended when the serving endpoint is not the one the cookie named.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pinned: Option<EndpointId>,
        record: PickRecord,
        config: Arc<Config>,
        // Whether the request came over TLS (the cookie is then `Secure` by default).
        tls: bool,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(
        inner: F,
        pinned: Option<EndpointId>,
        record: PickRecord,
        config: Arc<Config>,
        tls: bool,
    ) -> Self {
        ResponseFuture {
            inner,
            pinned,
            record,
            config,
            tls,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        let served = this.record.endpoint();
        if let Some(id) = served.filter(|id| this.pinned.as_ref() != Some(id)) {
            match this.config.set_cookie(&id, *this.tls) {
                Some(v) => {
                    tracing::trace!(endpoint = %id, "affinity cookie set");
                    res.headers_mut().append(SET_COOKIE, v);
                }
                None => tracing::debug!(endpoint = %id, "endpoint id too long for a cookie"),
            }
        }
        Poll::Ready(Ok(res))
    }
}
