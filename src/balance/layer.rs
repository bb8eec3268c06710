use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::completion::CompleteOnBody;
use super::service::Balancer;
use crate::endpoint::Endpoint;
use crate::pool::Pool;
use crate::strategy::Strategy;

/// The endpoint a request was routed to, in the request's extensions.
///
/// [`RouteToEndpoint`] inserts it, so that one inner service (a forwarding proxy, a client) can
/// serve every endpoint by reading where to send each request.
#[derive(Clone, Debug)]
pub struct Target(Arc<TargetInner>);

#[derive(Debug)]
struct TargetInner {
    endpoint: Endpoint,
    authority: Option<http::uri::Authority>,
}

impl Target {
    /// A target for `endpoint`.
    pub fn new(endpoint: &Endpoint) -> Self {
        let authority = match endpoint.socket_addr() {
            Some(addr) => http::uri::Authority::try_from(addr.to_string()).ok(),
            None => http::uri::Authority::try_from(endpoint.id().as_str()).ok(),
        };
        Target(Arc::new(TargetInner {
            endpoint: endpoint.clone(),
            authority,
        }))
    }

    /// The endpoint to send the request to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }

    /// The endpoint as a URI authority (`host:port`): its socket address, or else its id when
    /// that is a valid authority. Computed once per endpoint, so forwarding does not format it
    /// per request.
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.0.authority.as_ref()
    }
}

/// An endpoint's service made from one shared inner service: it tags each request with its
/// [`Target`] and calls the inner service.
#[derive(Clone, Debug)]
pub struct RouteToEndpoint<S> {
    inner: S,
    target: Target,
}

impl<S> RouteToEndpoint<S> {
    /// Routes requests through `inner`, tagged for `endpoint`.
    pub fn new(inner: S, endpoint: &Endpoint) -> Self {
        RouteToEndpoint {
            inner,
            target: Target::new(endpoint),
        }
    }
}

impl<S, B> Service<http::Request<B>> for RouteToEndpoint<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        req.extensions_mut().insert(self.target.clone());
        self.inner.call(req)
    }
}

/// A [`Layer`] that turns one HTTP service into a [`Balancer`] over a list of endpoints.
///
/// Each endpoint's service is a [`RouteToEndpoint`] around a clone of the inner service, which
/// finds its destination in the request's [`Target`] extension. Requests count as in flight
/// until their response body ends ([`CompleteOnBody`]).
///
/// ```
/// use lbkit::{BalancerLayer, balance::Target, strategy::PowerOfTwoChoices};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(BalancerLayer::new(["10.0.0.1:80", "10.0.0.2:80"], PowerOfTwoChoices::new()))
///     .service(service_fn(|req: http::Request<String>| async move {
///         let to = req.extensions().get::<Target>().unwrap().endpoint().id().clone();
///         Ok::<_, std::convert::Infallible>(http::Response::new(to.to_string()))
///     }));
/// let res = svc.oneshot(http::Request::new(String::new())).await.unwrap();
/// assert!(res.body().get_ref().starts_with("10.0.0."));
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct BalancerLayer<St> {
    endpoints: Vec<Endpoint>,
    strategy: St,
}

impl<St: Strategy + Clone> BalancerLayer<St> {
    /// A layer balancing over `endpoints` with `strategy`.
    pub fn new<E: Into<Endpoint>>(endpoints: impl IntoIterator<Item = E>, strategy: St) -> Self {
        BalancerLayer {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            strategy,
        }
    }
}

impl<S, St> Layer<S> for BalancerLayer<St>
where
    S: Clone + Send + Sync + 'static,
    St: Strategy + Clone,
{
    type Service = Balancer<RouteToEndpoint<S>, St, CompleteOnBody>;

    fn layer(&self, inner: S) -> Self::Service {
        let pool = Pool::new(self.strategy.clone(), move |ep: &Endpoint| {
            RouteToEndpoint::new(inner.clone(), ep)
        });
        pool.extend(self.endpoints.iter().cloned());
        Balancer::from_pool(pool).http()
    }
}
