use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::Config;
use crate::forwarded::ClientTls;
use crate::hints::PickHints;

/// The service of [`StickyLayer`](super::StickyLayer).
#[derive(Clone, Debug)]
pub struct Sticky<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Sticky<S> {
    pub(super) fn new(inner: S, config: Arc<Config>) -> Self {
        Sticky { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, RB> Service<http::Request<B>> for Sticky<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let cookie = self.config.endpoint_in(req.headers());
        let tls = req.extensions().get::<ClientTls>().is_some();
        let hints = PickHints::of_mut(&mut req);
        if let Some(found) = &cookie {
            tracing::trace!(endpoint = %found.id, "affinity cookie");
            hints.prefer(found.id.clone());
        }
        // A cookie sealed with a previous key, or past half its lifetime, counts as none on
        // the way out: it is set again, sealed with the current key and a new issue time.
        let pinned = cookie.and_then(|f| (!f.renew).then_some(f.id));
        let record = hints.record_pick();
        ResponseFuture::new(
            self.inner.call(req),
            pinned,
            record,
            self.config.clone(),
            tls,
        )
    }
}
