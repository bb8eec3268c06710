use std::task::{Context, Poll};

use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::completion::{CompleteOnBody, CompleteOnResponse, InFlight, TrackCompletion};
use super::future::ResponseFuture;
use crate::endpoint::Endpoint;
use crate::error::{BoxError, Error};
use crate::hints::RequestHints;
use crate::pool::Pool;
use crate::strategy::Strategy;

/// A tower `Service` that spreads requests over the endpoints of a [`Pool`].
///
/// For each request it reads the pool's current snapshot (no lock), picks an endpoint with the
/// pool's strategy and the request's [`PickHints`](crate::hints::PickHints), and calls a clone of
/// that endpoint's service. So endpoint services should be cheap to clone, as hyper's client,
/// tonic's channel and most tower stacks are.
///
/// # Readiness
///
/// `poll_ready` is always ready: the balancer has no capacity of its own, and the readiness of
/// the picked endpoint's service is awaited inside the response future (as
/// [`tower::util::Oneshot`] does). This lets clones of one balancer serve many connections at
/// once without a lock, and lets the endpoint be chosen with the request in hand (hash keys,
/// stickiness, retries). When no endpoint is available the response future fails at once with
/// [`Error::is_no_endpoint`]; it never waits for one to appear.
///
/// # Example
///
/// ```
/// use lbkit::{Balancer, strategy::RoundRobin};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let balancer = Balancer::new(["a", "b"], RoundRobin::new(), |ep| {
///     let name = ep.id().clone();
///     service_fn(move |req: http::Request<()>| {
///         let name = name.clone();
///         async move { Ok::<_, std::convert::Infallible>(format!("{} from {name}", req.uri())) }
///     })
/// });
/// let first = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
/// let second = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
/// assert_ne!(first, second);
/// # }
/// ```
pub struct Balancer<S, St: Strategy, C = CompleteOnResponse> {
    pool: Pool<S, St>,
    completion: C,
}

impl<S, St: Strategy, C: Clone> Clone for Balancer<S, St, C> {
    fn clone(&self) -> Self {
        Balancer {
            pool: self.pool.clone(),
            completion: self.completion.clone(),
        }
    }
}

impl<S, St: Strategy, C> std::fmt::Debug for Balancer<S, St, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("pool", &self.pool)
            .finish()
    }
}

impl<S: Clone, St: Strategy> Balancer<S, St> {
    /// A balancer over a fixed list of endpoints; `make` builds each endpoint's service.
    ///
    /// Endpoints can still be added and removed later through [`Balancer::pool`].
    pub fn new<E, F>(endpoints: impl IntoIterator<Item = E>, strategy: St, make: F) -> Self
    where
        E: Into<Endpoint>,
        F: Fn(&Endpoint) -> S + Send + Sync + 'static,
    {
        let pool = Pool::new(strategy, make);
        pool.extend(endpoints.into_iter().map(Into::into));
        Balancer::from_pool(pool)
    }

    /// A balancer over the endpoints of `pool`, which it shares with the pool's other users.
    pub fn from_pool(pool: Pool<S, St>) -> Self {
        Balancer {
            pool,
            completion: CompleteOnResponse,
        }
    }
}

impl<S, St: Strategy, C> Balancer<S, St, C> {
    /// The pool this balancer sends to: add, remove and re-weight endpoints through it.
    pub fn pool(&self) -> &Pool<S, St> {
        &self.pool
    }

    /// Sets when a request stops counting as in flight (see [`TrackCompletion`]).
    pub fn with_completion<C2>(self, completion: C2) -> Balancer<S, St, C2> {
        Balancer {
            pool: self.pool,
            completion,
        }
    }

    /// For HTTP: a request counts as in flight until its response body ends, and responses
    /// carry the serving endpoint (see [`CompleteOnBody`]).
    pub fn http(self) -> Balancer<S, St, CompleteOnBody> {
        self.with_completion(CompleteOnBody)
    }
}

impl<Req, S, St, C> Service<Req> for Balancer<S, St, C>
where
    Req: RequestHints,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    St: Strategy,
    C: TrackCompletion<InFlight, S::Response> + Clone,
{
    type Response = C::Output;
    type Error = Error;
    type Future = ResponseFuture<Oneshot<S, Req>, C>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let hints = req.hints();
        // One span per call, around the pick and every poll of the forward. When its level is
        // off, `debug_span!` is a cached check that returns a disabled span, and no field is
        // formatted.
        let span = tracing::debug_span!(
            "lbkit.balance",
            strategy = self.pool.strategy().name(),
            attempt = tracing::field::Empty,
            endpoint = tracing::field::Empty,
        );
        if !span.is_disabled() {
            // A retry avoids the endpoints it already tried: one per earlier attempt.
            span.record("attempt", hints.map_or(1, |h| h.avoided().len() + 1));
        }
        let picked = {
            let _enter = span.enter();
            self.pool.pick_with(hints, |candidate, service| {
                if let Some(record) = hints.and_then(|h| h.pick_record()) {
                    record.set(candidate.id());
                }
                (InFlight::start(candidate.clone()), service.clone())
            })
        };
        match picked {
            Some((handle, service)) => {
                if !span.is_disabled() {
                    span.record("endpoint", tracing::field::display(handle.candidate().id()));
                }
                ResponseFuture::running(service.oneshot(req), handle, self.completion.clone())
                    .instrumented(span)
            }
            None => {
                span.in_scope(|| tracing::debug!("no endpoint available"));
                ResponseFuture::failed(Error::no_endpoint())
            }
        }
    }
}
