use std::pin::Pin;
use std::task::{Context, Poll};

use tower_service::Service;

#[cfg(doc)]
use super::completion::CompleteOnResponse;
use super::completion::{CompleteOnBody, InFlight, TrackCompletion};
use super::future::{EndpointCall, ResponseFuture};
use super::queue::{self, Bind, EntryService, NotStarted, Queued};
use crate::endpoint::Endpoint;
use crate::error::{BoxError, Error};
use crate::hints::RequestHints;
use crate::pool::queue::SlotWait;
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
/// `poll_ready` is always ready by default: the balancer has no capacity of its own. The picked
/// endpoint's service is asked for readiness with the request in hand: called at once when
/// ready, and otherwise awaited inside the response future. This lets
/// clones of one balancer serve many connections at once without a lock, and lets the endpoint
/// be chosen with the request in hand (hash keys, stickiness, retries). When no endpoint is
/// available the response future fails at once with [`Error::is_no_endpoint`]; it never waits
/// for one to appear.
///
/// # Limits and saturation
///
/// With a per-endpoint limit on requests in flight
/// ([`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint)),
/// the pick skips endpoints at their limit. When every endpoint a request may go to is at its
/// limit, the request waits in the pool's bounded queue until one of them finishes a request,
/// up to the queue timeout; a full queue or a timeout fails it with [`Error::is_overloaded`]
/// (503 from [`ErrorResponseLayer`](crate::proxy::ErrorResponseLayer)). This works whatever
/// the caller does with readiness, so it is the default.
///
/// For tower's own back-pressure, [`report_saturation`](Balancer::report_saturation) makes
/// `poll_ready` return `Pending` while every eligible endpoint is at its limit, and wake the
/// caller when a request ends. Then `tower::load_shed::LoadShed` in front fails requests at
/// once with its `Overloaded` error (also a 503) instead of queueing them, and a caller that
/// awaits readiness (tower's `Buffer`, `ServiceExt::ready`) waits without a timeout of the
/// pool's. Readiness cannot see a request's hints: a request that avoids the endpoints with
/// room still queues as above.
///
/// # Completion
///
/// For HTTP services (responses are `http::Response`), a request counts as in flight until its
/// response body ends, and 5xx answers count as endpoint failures ([`CompleteOnBody`], the
/// default, so an HTTP balancer needs no extra call). For other response types, choose
/// [`CompleteOnResponse`] with [`Balancer::with_completion`]; forgetting it is a compile error
/// that says so.
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
///         let body = format!("{} from {name}", req.uri());
///         async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
///     })
/// });
/// let first = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
/// let second = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
/// assert_ne!(first.body().get_ref(), second.body().get_ref());
/// # }
/// ```
///
/// A service whose responses are not HTTP does not compile with the default completion. Where
/// the balancer is handed to code that needs a `Service` (axum, `ServiceBuilder`, a generic
/// function), the error names [`CompleteOnResponse`]; a method call such as `oneshot` says that
/// `Balancer<..>: Service<_>` is not satisfied:
///
/// ```compile_fail
/// use lbkit::{Balancer, strategy::RoundRobin};
/// use tower::{service_fn, ServiceExt};
///
/// # async fn f() {
/// let balancer = Balancer::new(["a"], RoundRobin::new(), |_| {
///     service_fn(|_req: http::Request<()>| async { Ok::<_, std::convert::Infallible>("a") })
/// });
/// let _ = balancer.oneshot(http::Request::new(())).await;
/// # }
/// ```
///
/// and compiles with it:
///
/// ```
/// use lbkit::{Balancer, balance::CompleteOnResponse, strategy::RoundRobin};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let balancer = Balancer::new(["a", "b"], RoundRobin::new(), |ep| {
///     let name = ep.id().to_string();
///     service_fn(move |_req: http::Request<()>| {
///         let name = name.clone();
///         async move { Ok::<_, std::convert::Infallible>(name) }
///     })
/// })
/// .with_completion(CompleteOnResponse);
/// let first = balancer.clone().oneshot(http::Request::new(())).await.unwrap();
/// assert!(first == "a" || first == "b");
/// # }
/// ```
pub struct Balancer<S, St: Strategy, C = CompleteOnBody> {
    pool: Pool<S, St>,
    completion: C,
    readiness: Readiness,
}

impl<S, St: Strategy, C: Clone> Clone for Balancer<S, St, C> {
    fn clone(&self) -> Self {
        Balancer {
            pool: self.pool.clone(),
            completion: self.completion.clone(),
            readiness: self.readiness.clone(),
        }
    }
}

/// What `poll_ready` of a balancer reports, and its wait for a slot while it reports
/// saturation.
#[derive(Debug, Default)]
pub(super) struct Readiness {
    report_saturation: bool,
    wait: Option<Pin<Box<SlotWait>>>,
}

impl Clone for Readiness {
    fn clone(&self) -> Self {
        // A clone has not waited yet.
        Readiness {
            report_saturation: self.report_saturation,
            wait: None,
        }
    }
}

impl Readiness {
    pub(super) fn reporting_saturation() -> Self {
        Readiness {
            report_saturation: true,
            wait: None,
        }
    }

    /// Ready unless saturation is reported and every eligible endpoint of `pool` is at its
    /// limit; then pending until a request ends (or the endpoints or the limit change).
    #[inline]
    pub(super) fn poll<P: Clone, St: Strategy>(
        &mut self,
        pool: &Pool<P, St>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        if !self.report_saturation {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !pool.is_saturated() {
                self.wait = None;
                return Poll::Ready(Ok(()));
            }
            match &mut self.wait {
                // Armed before looking again: a request that ends in between wakes it.
                None => self.wait = Some(Box::pin(SlotWait::new(pool.shared()))),
                Some(wait) => {
                    if wait.as_mut().poll_woken(cx).is_pending() {
                        return Poll::Pending;
                    }
                    wait.as_mut().rearm();
                }
            }
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
            completion: CompleteOnBody,
            readiness: Readiness::default(),
        }
    }
}

impl<S, St: Strategy, C> Balancer<S, St, C> {
    /// The pool this balancer sends to: add, remove and re-weight endpoints through it.
    pub fn pool(&self) -> &Pool<S, St> {
        &self.pool
    }

    /// Sets when a request stops counting as in flight (see [`TrackCompletion`]).
    ///
    /// The default, [`CompleteOnBody`], is right for HTTP services (`http::Response`): a
    /// request counts until its response body ends, and 5xx answers count as endpoint
    /// failures. Services whose responses are not `http::Response` take
    /// `.with_completion(CompleteOnResponse)`: a request counts until its response arrives.
    pub fn with_completion<C2>(self, completion: C2) -> Balancer<S, St, C2> {
        Balancer {
            pool: self.pool,
            completion,
            readiness: self.readiness,
        }
    }

    /// Makes `poll_ready` report saturation: `Pending` while every eligible endpoint is at
    /// the pool's in-flight limit, woken when one of their requests ends (default: always
    /// ready, and requests wait in the pool's queue instead). Use it with
    /// `tower::load_shed::LoadShed` in front to shed load at once; see
    /// [Limits and saturation](Balancer#limits-and-saturation).
    pub fn report_saturation(mut self) -> Self {
        self.readiness = Readiness::reporting_saturation();
        self
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
    type Future = ResponseFuture<S, St, Req, EntryService, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.readiness.poll(&self.pool, cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        dispatch(&self.pool, &self.completion, req, &EntryService)
    }
}

/// Picks an endpoint of `pool` for `req` and starts the call: what every balancer does per
/// request. `bind` turns the picked endpoint's pool entry (a clone of it) into the service to
/// call, and may tag the request for it. With every endpoint at its in-flight limit, the
/// request waits in the pool's queue, or fails as overloaded when the queue is full.
#[inline]
pub(super) fn dispatch<P, St, C, Req, Bd>(
    pool: &Pool<P, St>,
    completion: &C,
    req: Req,
    bind: &Bd,
) -> ResponseFuture<P, St, Req, Bd, C>
where
    P: Clone,
    St: Strategy,
    C: Clone,
    Req: RequestHints,
    Bd: Bind<P, Req> + Clone,
    Bd::Service: Service<Req>,
    <Bd::Service as Service<Req>>::Error: Into<BoxError>,
{
    let hints = req.hints();
    // One span per call, around the pick and every poll of the forward. When its level is
    // off, `debug_span!` is a cached check that returns a disabled span, and no field is
    // formatted.
    let span = tracing::debug_span!(
        "lbkit.balance",
        strategy = pool.strategy().name(),
        attempt = tracing::field::Empty,
        endpoint = tracing::field::Empty,
    );
    if !span.is_disabled() {
        // A retry avoids the endpoints it already tried: one per earlier attempt.
        span.record("attempt", hints.map_or(1, |h| h.avoided().len() + 1));
    }
    let started = {
        let _enter = span.enter();
        queue::start(pool, bind, req, EndpointCall::new)
    };
    match started {
        Ok(started) => {
            if !span.is_disabled() {
                span.record(
                    "endpoint",
                    tracing::field::display(started.handle.candidate().id()),
                );
            }
            ResponseFuture::running(started, completion.clone(), span)
        }
        Err(NotStarted {
            saturated: true,
            req,
        }) => match Queued::enter(pool, bind, req, EndpointCall::new) {
            Ok(queued) => {
                span.in_scope(|| tracing::debug!("every endpoint at its limit: queued"));
                ResponseFuture::queued(queued, completion.clone(), span)
            }
            Err(_req) => {
                span.in_scope(|| tracing::debug!("every endpoint at its limit, queue full"));
                ResponseFuture::failed(Error::overloaded())
            }
        },
        Err(NotStarted { .. }) => {
            span.in_scope(|| tracing::debug!("no endpoint available"));
            ResponseFuture::failed(Error::no_endpoint())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use tower_service::Service;

    use super::Balancer;
    use crate::strategy::RoundRobin;

    /// A service that is not ready until `open` is set, and wakes its waiter then.
    #[derive(Clone, Default)]
    struct Gate {
        state: Arc<Mutex<(bool, Option<Waker>)>>,
    }

    impl Gate {
        fn open(&self) {
            let mut s = self.state.lock().unwrap();
            s.0 = true;
            if let Some(w) = s.1.take() {
                w.wake();
            }
        }
    }

    impl Service<http::Request<()>> for Gate {
        type Response = &'static str;
        type Error = Infallible;
        type Future = std::future::Ready<Result<&'static str, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            let mut s = self.state.lock().unwrap();
            if s.0 {
                Poll::Ready(Ok(()))
            } else {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }

        fn call(&mut self, _req: http::Request<()>) -> Self::Future {
            assert!(self.state.lock().unwrap().0, "called before it was ready");
            std::future::ready(Ok("served"))
        }
    }

    #[test]
    fn a_service_that_is_not_ready_gets_the_request_once_it_is() {
        let gate = Gate::default();
        let g = gate.clone();
        let mut balancer = Balancer::new(["a"], RoundRobin::new(), move |_| g.clone())
            .with_completion(crate::balance::CompleteOnResponse);
        let mut fut = pin!(balancer.call(http::Request::new(())));
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = futures::task::waker(Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            balancer.pool().in_flight(),
            1,
            "waiting counts as in flight"
        );
        gate.open();
        assert!(
            woken.load(std::sync::atomic::Ordering::SeqCst),
            "the real waker was registered"
        );
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(v)) => assert_eq!(v, "served"),
            other => panic!("expected the answer, got {other:?}"),
        }
        assert_eq!(balancer.pool().in_flight(), 0);
    }

    struct Flag(Arc<std::sync::atomic::AtomicBool>);

    impl futures::task::ArcWake for Flag {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
