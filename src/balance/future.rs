use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::completion::{InFlight, TrackCompletion};
use super::queue::{Bind, Queued, Started};
use crate::error::{BoxError, Error};
use crate::hints::{PickRecord, RequestHints};
use crate::strategy::Strategy;

pin_project! {
    /// The response future of a [`Balancer`](super::Balancer).
    ///
    /// Resolves to the endpoint's response (passed through the completion policy), or to an
    /// [`Error`]: at once when no endpoint was available, when every endpoint it could go to
    /// is at its in-flight limit and the pool's queue is full (or after waiting in the queue
    /// up to its timeout; see
    /// [`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint)),
    /// or when the endpoint's service fails. The type parameters are those of the pool (entry
    /// and strategy), the request, the [`Bind`]ing of an entry to the service called, and the
    /// completion policy.
    ///
    /// Dropped before the endpoint answered, the request counts as *cancelled* at that
    /// endpoint (see [`EndpointState::cancelled`](crate::endpoint::EndpointState::cancelled)):
    /// a client that disconnects or resets its stream is not the endpoint's fault, and must not
    /// get a healthy backend ejected. Only a caller that says it gave up because the endpoint
    /// was too slow ([`PickRecord::give_up`](crate::hints::PickRecord::give_up), as the failover
    /// layer's per-try timeout and deadline do) makes it a failure, so that an endpoint that
    /// hangs is ejected like one that fails. (`Forward::timeout` fails the request with an error,
    /// which counts too.)
    pub struct ResponseFuture<P, St: Strategy, Req, Bd, C>
    where
        Bd: Bind<P, Req>,
        Bd::Service: Service<Req>,
    {
        #[pin]
        state: State<P, St, Req, Bd, C>,
        // The balancer's span, entered on each poll (disabled unless its level is on).
        span: tracing::Span,
    }

    impl<P, St: Strategy, Req, Bd, C> PinnedDrop for ResponseFuture<P, St, Req, Bd, C>
    where
        Bd: Bind<P, Req>,
        Bd::Service: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Still waiting for the answer: the attempt was given up on. A timeout of the
            // caller's is the endpoint's failure; anything else a cancellation.
            if let StateProj::Running {
                handle: Some(h),
                record,
                ..
            } = this.project().state.project()
            {
                if record.as_ref().is_some_and(PickRecord::gave_up) {
                    h.fail();
                } else {
                    h.cancel();
                }
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<P, St: Strategy, Req, Bd, C>
    where
        Bd: Bind<P, Req>,
        Bd::Service: Service<Req>,
    {
        Failed { error: Option<Error> },
        // Waiting in the pool's queue (boxed: only requests that wait pay for it).
        Queued {
            queued: Pin<Box<Queued<P, St, Req, Bd>>>,
            completion: C,
        },
        Running {
            #[pin]
            fut: EndpointCall<Bd::Service, Req>,
            handle: Option<InFlight>,
            completion: C,
            // The request's pick record, if it has one: says whether the caller gave up.
            record: Option<PickRecord>,
        },
    }
}

pin_project! {
    /// The call of the picked endpoint's service, inside a [`ResponseFuture`].
    ///
    /// The balancer asks the service whether it is ready once, with the request in hand; a
    /// ready service (hyper's client, a tonic channel: the usual case) is called at once, and
    /// only its response future is kept. A service that is not ready yet gets the request
    /// later, once it is (as [`tower::util::Oneshot`] does), which costs one allocation.
    pub struct EndpointCall<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: Call<S, Req>,
        // The conversion of the service's error, chosen where `S::Error: Into<BoxError>` is
        // known. A bound on the `Future` impl instead would make rustc fail to prove a
        // spawned caller `Send` when `S::Error` is `BoxError` ("implementation of `From` is
        // not general enough").
        into_box: fn(S::Error) -> BoxError,
    }
}

pin_project! {
    #[project = CallProj]
    enum Call<S, Req>
    where
        S: Service<Req>,
    {
        Called {
            #[pin]
            fut: S::Future,
        },
        Waiting {
            oneshot: Pin<Box<Oneshot<S, Req>>>,
        },
    }
}

impl<S, Req> EndpointCall<S, Req>
where
    S: Service<Req>,
{
    /// Calls `service` now if it is ready, otherwise keeps the request until it is.
    #[inline]
    pub(crate) fn new(mut service: S, req: Req) -> Self
    where
        S::Error: Into<BoxError>,
    {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let inner = match service.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called {
                fut: service.call(req),
            },
            // Not ready, or failed: `Oneshot` polls again with the real waker and reports the
            // error, if any, through the response future.
            _ => Call::Waiting {
                oneshot: Box::pin(service.oneshot(req)),
            },
        };
        EndpointCall {
            inner,
            into_box: Into::into,
        }
    }
}

impl<S, Req> Future for EndpointCall<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match this.inner.project() {
            CallProj::Called { fut } => ready!(fut.poll(cx)),
            CallProj::Waiting { oneshot } => ready!(oneshot.as_mut().poll(cx)),
        };
        Poll::Ready(res.map_err(*this.into_box))
    }
}

impl<S, Req> std::fmt::Debug for EndpointCall<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Call::Called { .. } => "EndpointCall::Called",
            Call::Waiting { .. } => "EndpointCall::Waiting",
        })
    }
}

impl<P, St, Req, Bd, C> ResponseFuture<P, St, Req, Bd, C>
where
    St: Strategy,
    Bd: Bind<P, Req>,
    Bd::Service: Service<Req>,
{
    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            span: tracing::Span::none(),
        }
    }

    /// Runs the call `started`, entering `span` on each poll.
    #[inline]
    pub(super) fn running(
        started: Started<Bd::Service, Req>,
        completion: C,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                fut: started.call,
                handle: Some(started.handle),
                completion,
                record: started.record,
            },
            span,
        }
    }

    /// Waits in the queue for an endpoint, then runs the call as [`running`](Self::running).
    pub(super) fn queued(
        queued: Pin<Box<Queued<P, St, Req, Bd>>>,
        completion: C,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Queued { queued, completion },
            span,
        }
    }
}

impl<P, St, Req, Bd, C> std::fmt::Debug for ResponseFuture<P, St, Req, Bd, C>
where
    St: Strategy,
    Bd: Bind<P, Req>,
    Bd::Service: Service<Req>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<P, St, Req, Bd, C> Future for ResponseFuture<P, St, Req, Bd, C>
where
    P: Clone,
    St: Strategy,
    Req: RequestHints,
    Bd: Bind<P, Req> + Clone,
    Bd::Service: Service<Req>,
    C: TrackCompletion<InFlight, <Bd::Service as Service<Req>>::Response>,
{
    type Output = Result<C::Output, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _enter = this.span.enter();
        let mut state = this.state;
        if let StateProj::Queued { queued, completion } = state.as_mut().project() {
            match ready!(queued.as_mut().poll_start(cx)) {
                Ok(started) => {
                    if !this.span.is_disabled() {
                        this.span.record(
                            "endpoint",
                            tracing::field::display(started.handle.candidate().id()),
                        );
                    }
                    let completion = completion.clone();
                    state.set(State::Running {
                        fut: started.call,
                        handle: Some(started.handle),
                        completion,
                        record: started.record,
                    });
                }
                Err(e) => {
                    state.set(State::Failed { error: None });
                    return Poll::Ready(Err(e));
                }
            }
        }
        match state.project() {
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
            StateProj::Queued { .. } => unreachable!("left the queue above"),
            StateProj::Running {
                fut,
                handle,
                completion,
                ..
            } => {
                let res = ready!(fut.poll(cx));
                let mut h = handle.take().expect("polled after completion");
                Poll::Ready(match res {
                    Ok(v) => Ok(completion.track_completion(h, v)),
                    Err(e) => {
                        h.fail();
                        let id = h.candidate().id().clone();
                        drop(h);
                        Err(Error::endpoint(id, e))
                    }
                })
            }
        }
    }
}
