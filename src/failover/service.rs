use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use super::body::Replay;
use super::budget::RetryBudget;
use super::error::{Error, Failure};
use super::future::{ResponseFuture, Retry};
use super::layer::Shared;
use super::policy::RetryPolicy;
use crate::error::BoxError;

/// The service of [`FailoverLayer`](super::FailoverLayer).
pub struct Failover<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S, P> Failover<S, P> {
    pub(super) fn new(inner: S, shared: Arc<Shared<P>>) -> Self {
        Failover { inner, shared }
    }

    /// The retry budget (to read its counters).
    pub fn budget(&self) -> &Arc<RetryBudget> {
        &self.shared.budget
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, P> Clone for Failover<S, P> {
    fn clone(&self) -> Self {
        Failover {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, P> fmt::Debug for Failover<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .field("budget", &self.shared.budget)
            .finish()
    }
}

impl<S, P, B, RB> Service<http::Request<B>> for Failover<S, P>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: Replay,
    P: RetryPolicy,
{
    type Response = http::Response<RB>;
    type Error = Error;
    type Future = ResponseFuture<S, B, P>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            let last = Failure {
                error: Some(e.into()),
                timed_out: false,
            };
            Error::failed(0, last)
        })
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The first attempt uses the service that was made ready; retries ready it again.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let shared = &self.shared;
        shared.budget.deposit();
        let retry = if shared.settings.max_attempts <= 1 {
            Retry::Never
        } else if shared.policy.may_retry(&req) {
            Retry::Any
        } else {
            // Sent again only if the policy finds an attempt never left the proxy.
            Retry::NotSent
        };
        ResponseFuture::new(service, req, retry, self.shared.clone())
    }
}
