use std::task::{Context, Poll};

use tower_service::Service;

#[cfg(doc)]
use super::completion::CompleteOnResponse;
use super::completion::{CompleteOnBody, InFlight, TrackCompletion};
use super::future::{EndpointCall, ResponseFuture};
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
/// `poll_ready` is always ready: the balancer has no capacity of its own. The picked endpoint's
/// service is asked for readiness with the request in hand: called at once when ready, and
/// otherwise awaited inside the response future (see [`EndpointCall`]). This lets clones of one
/// balancer serve many connections at
/// once without a lock, and lets the endpoint be chosen with the request in hand (hash keys,
/// stickiness, retries). When no endpoint is available the response future fails at once with
/// [`Error::is_no_endpoint`]; it never waits for one to appear.
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
            completion: CompleteOnBody,
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
        }
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
    type Future = ResponseFuture<EndpointCall<S, Req>, C>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        dispatch(&self.pool, &self.completion, req, |service, _req| service)
    }
}

/// Picks an endpoint of `pool` for `req` and starts the call: what every balancer does per
/// request. `bind` turns the picked endpoint's pool entry (a clone of it) into the service to
/// call, and may tag the request for it.
#[inline]
pub(super) fn dispatch<P, St, C, S, Req>(
    pool: &Pool<P, St>,
    completion: &C,
    mut req: Req,
    bind: impl FnOnce(P, &mut Req) -> S,
) -> ResponseFuture<EndpointCall<S, Req>, C>
where
    P: Clone,
    St: Strategy,
    C: Clone,
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: RequestHints,
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
    let record = hints.and_then(|h| h.pick_record());
    let picked = {
        let _enter = span.enter();
        pool.pick_with(hints, |candidate, entry| {
            if let Some(record) = record {
                record.set(candidate.id());
            }
            (InFlight::start(candidate.clone()), entry.clone())
        })
    };
    let record = record.cloned();
    match picked {
        Some((handle, entry)) => {
            if !span.is_disabled() {
                span.record("endpoint", tracing::field::display(handle.candidate().id()));
            }
            let call = {
                let _enter = span.enter();
                let service = bind(entry, &mut req);
                EndpointCall::new(service, req)
            };
            ResponseFuture::running(call, handle, completion.clone(), record, span)
        }
        None => {
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
