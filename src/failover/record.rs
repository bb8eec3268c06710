use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use crate::balance::Target;
use crate::endpoint::{Endpoint, EndpointId};

/// Where one attempt of a request went, in the request's extensions: set by
/// [`RecordEndpoint`], read by the failover layer.
#[derive(Clone, Debug, Default)]
pub(crate) struct AttemptRecord(Arc<OnceLock<EndpointId>>);

impl AttemptRecord {
    pub(crate) fn get(&self) -> Option<&EndpointId> {
        self.0.get()
    }

    fn set(&self, id: EndpointId) {
        // A record belongs to one attempt, which goes to one endpoint: the first set wins.
        let _ = self.0.set(id);
    }
}

/// Tells the failover layer which endpoint an attempt went to *before* it answers, so that an
/// attempt cut short by the [per-try timeout](super::FailoverLayer::per_try_timeout) is retried
/// on another endpoint.
///
/// Answers and endpoint errors already name their endpoint; a timed-out attempt has neither.
/// Put this service inside the balancer, around each endpoint's service: with
/// [`BalancerLayer`](crate::BalancerLayer), as a layer between it and the shared inner service
/// ([`RecordEndpointLayer`], which reads the request's [`Target`]); with
/// [`Balancer::new`](crate::Balancer::new), in the function that makes each endpoint's service
/// ([`RecordEndpoint::new`]). Without it, a timed-out attempt is still retried, but the retry
/// may go to the same endpoint.
#[derive(Clone, Debug)]
pub struct RecordEndpoint<S> {
    inner: S,
    id: Option<EndpointId>,
}

impl<S> RecordEndpoint<S> {
    /// Records `endpoint` as the destination of every request through `inner`.
    pub fn new(inner: S, endpoint: &Endpoint) -> Self {
        RecordEndpoint {
            inner,
            id: Some(endpoint.id().clone()),
        }
    }

    /// Records the endpoint of each request's [`Target`] extension.
    pub fn from_target(inner: S) -> Self {
        RecordEndpoint { inner, id: None }
    }
}

impl<S, B> Service<http::Request<B>> for RecordEndpoint<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        if let Some(record) = req.extensions().get::<AttemptRecord>() {
            let id = self.id.clone().or_else(|| {
                req.extensions()
                    .get::<Target>()
                    .map(|t| t.endpoint().id().clone())
            });
            if let Some(id) = id {
                record.set(id);
            }
        }
        self.inner.call(req)
    }
}

/// A [`Layer`] of [`RecordEndpoint::from_target`], for stacks built with
/// [`BalancerLayer`](crate::BalancerLayer):
///
/// ```
/// use lbkit::failover::{FailoverLayer, RecordEndpointLayer, RetryBudget};
/// use lbkit::{strategy::RoundRobin, BalancerLayer};
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder};
///
/// let svc = ServiceBuilder::new()
///     .layer(FailoverLayer::new(RetryBudget::default()).per_try_timeout(Duration::from_secs(2)))
///     .layer(BalancerLayer::new(["a:80", "b:80"], RoundRobin::new()))
///     .layer(RecordEndpointLayer::new())
///     .service(service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// # let _ = svc;
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordEndpointLayer {
    _priv: (),
}

impl RecordEndpointLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        RecordEndpointLayer { _priv: () }
    }
}

impl<S> Layer<S> for RecordEndpointLayer {
    type Service = RecordEndpoint<S>;

    fn layer(&self, inner: S) -> RecordEndpoint<S> {
        RecordEndpoint::from_target(inner)
    }
}
