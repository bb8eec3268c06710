use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::completion::{CompleteOnBody, InFlight, TrackCompletion};
use super::future::ResponseFuture;
use super::queue::TagTarget;
#[cfg(doc)]
use super::service::Balancer;
use super::service::{dispatch, Readiness};
use super::target::Target;
use crate::endpoint::Endpoint;
use crate::error::{BoxError, Error};
use crate::pool::Pool;
use crate::strategy::Strategy;

/// A [`Layer`] that puts a balancer in front of one HTTP service: each request is tagged with
/// the [`Target`] endpoint picked for it, and the inner service (a forwarding proxy, a client)
/// sends it there.
///
/// The layer holds its [`Pool`] of [`Target`]s, and every service it makes ([`Balanced`])
/// shares that pool: keep a clone of it ([`BalancerLayer::pool`], or build the layer
/// [`from_pool`](BalancerLayer::from_pool)) to add and remove endpoints, run health checks and
/// outlier detection, follow discovery, or read statistics while traffic flows. Requests count
/// as in flight until their response body ends ([`CompleteOnBody`]).
///
/// For a client, [`TargetUri`](super::TargetUri) is the inner service that sends each request
/// to its target with a hyper-util client. A hand-written inner service should have a concrete
/// error type: one made with `service_fn` whose `async` block returns `Result<_, BoxError>`
/// works when awaited, but its calls cannot be spawned (`tokio::spawn` fails to compile with
/// "implementation of `From` is not general enough", a rustc limitation that every tower
/// middleware bounding `S::Error: Into<BoxError>` shares).
///
/// ```
/// use lbkit::health::OutlierDetection;
/// use lbkit::{BalancerLayer, balance::Target, strategy::PowerOfTwoChoices};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let balancer = BalancerLayer::new(["10.0.0.1:80", "10.0.0.2:80"], PowerOfTwoChoices::new());
/// // The pool is the layer's: manage it while the stack serves.
/// OutlierDetection::new().spawn(balancer.pool());
/// let svc = ServiceBuilder::new()
///     .layer(balancer.clone())
///     .service(service_fn(|req: http::Request<String>| async move {
///         let to = req.extensions().get::<Target>().unwrap().endpoint().id().clone();
///         Ok::<_, std::convert::Infallible>(http::Response::new(to.to_string()))
///     }));
/// let res = svc.oneshot(http::Request::new(String::new())).await.unwrap();
/// assert!(res.body().get_ref().starts_with("10.0.0."));
/// balancer.pool().remove(&"10.0.0.1:80".into());
/// # }
/// ```
pub struct BalancerLayer<St: Strategy> {
    pool: Pool<Target, St>,
    readiness: Readiness,
}

impl<St: Strategy> Clone for BalancerLayer<St> {
    fn clone(&self) -> Self {
        BalancerLayer {
            pool: self.pool.clone(),
            readiness: self.readiness.clone(),
        }
    }
}

impl<St: Strategy> std::fmt::Debug for BalancerLayer<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancerLayer")
            .field("pool", &self.pool)
            .finish()
    }
}

impl<St: Strategy> BalancerLayer<St> {
    /// A layer balancing over `endpoints` with `strategy`, in a pool of its own (see
    /// [`pool`](BalancerLayer::pool)).
    pub fn new<E: Into<Endpoint>>(endpoints: impl IntoIterator<Item = E>, strategy: St) -> Self {
        let pool = Pool::new(strategy, Target::new);
        pool.extend(endpoints.into_iter().map(Into::into));
        BalancerLayer::from_pool(pool)
    }

    /// A layer balancing over `pool`, built with [`Target::new`] as its service factory
    /// (`Pool::new(strategy, Target::new)`, or [`PoolBuilder::build`](crate::pool::PoolBuilder::build)
    /// for non-default pool settings). The pool may be fed, health-checked and read by others
    /// while the layer's services use it.
    pub fn from_pool(pool: Pool<Target, St>) -> Self {
        BalancerLayer {
            pool,
            readiness: Readiness::default(),
        }
    }

    /// Makes the services' `poll_ready` report saturation, as
    /// [`Balancer::report_saturation`] does (default: always ready; requests wait in the
    /// pool's queue instead).
    pub fn report_saturation(mut self) -> Self {
        self.readiness = Readiness::reporting_saturation();
        self
    }

    /// The pool every service of this layer balances over.
    pub fn pool(&self) -> &Pool<Target, St> {
        &self.pool
    }
}

impl<S, St: Strategy> Layer<S> for BalancerLayer<St> {
    type Service = Balanced<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Balanced {
            pool: self.pool.clone(),
            inner: TagTarget(inner),
            readiness: self.readiness.clone(),
        }
    }
}

/// The service of a [`BalancerLayer`]: picks an endpoint from the layer's pool for each request,
/// inserts its [`Target`] into the request's extensions, and calls the inner service.
///
/// As [`Balancer`] does, it is always ready (unless
/// [`report_saturation`](BalancerLayer::report_saturation) is set), counts the request in
/// flight at the endpoint until the response body ends, feeds the outcome to the strategy and
/// to outlier detection, fails at once with
/// [`Error::is_no_endpoint`](crate::Error::is_no_endpoint) when no endpoint is up, and queues
/// a request when every endpoint is at the pool's in-flight limit (see
/// [Limits and saturation](Balancer#limits-and-saturation)). The inner service is cloned per request, so it should be cheap to clone (a hyper
/// client, [`Forward`](crate::proxy::Forward) and tonic channels are).
pub struct Balanced<S, St: Strategy> {
    pool: Pool<Target, St>,
    inner: TagTarget<S>,
    readiness: Readiness,
}

impl<S: Clone, St: Strategy> Clone for Balanced<S, St> {
    fn clone(&self) -> Self {
        Balanced {
            pool: self.pool.clone(),
            inner: self.inner.clone(),
            readiness: self.readiness.clone(),
        }
    }
}

impl<S, St: Strategy> std::fmt::Debug for Balanced<S, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balanced")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl<S, St: Strategy> Balanced<S, St> {
    /// The pool this service balances over.
    pub fn pool(&self) -> &Pool<Target, St> {
        &self.pool
    }
}

impl<S, St, B> Service<http::Request<B>> for Balanced<S, St>
where
    S: Service<http::Request<B>> + Clone,
    S::Error: Into<BoxError>,
    St: Strategy,
    CompleteOnBody: TrackCompletion<InFlight, S::Response>,
{
    type Response = <CompleteOnBody as TrackCompletion<InFlight, S::Response>>::Output;
    type Error = Error;
    type Future = ResponseFuture<Target, St, http::Request<B>, TagTarget<S>, CompleteOnBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.readiness.poll(&self.pool, cx)
    }

    #[inline]
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        dispatch(&self.pool, &CompleteOnBody, req, &self.inner)
    }
}
