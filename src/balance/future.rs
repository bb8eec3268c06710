use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::util::{Oneshot, ServiceExt};
use tower_service::Service;

use super::completion::{InFlight, TrackCompletion};
use crate::error::{BoxError, Error};
use crate::hints::PickRecord;

pin_project! {
    /// The response future of a [`Balancer`](super::Balancer).
    ///
    /// Resolves to the endpoint's response (passed through the completion policy), or to an
    /// [`Error`]: at once when no endpoint was available, or when the endpoint's service fails.
    ///
    /// Dropped before the endpoint answered, the request counts as *cancelled* at that
    /// endpoint (see [`EndpointState::cancelled`](crate::endpoint::EndpointState::cancelled)):
    /// a client that disconnects or resets its stream is not the endpoint's fault, and must not
    /// get a healthy backend ejected. Only a caller that says it gave up because the endpoint
    /// was too slow ([`PickRecord::give_up`](crate::hints::PickRecord::give_up), as the failover
    /// layer's per-try timeout and deadline do) makes it a failure, so that an endpoint that
    /// hangs is ejected like one that fails. (`Forward::timeout` fails the request with an error,
    /// which counts too.)
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
        // The balancer's span, entered on each poll (disabled unless its level is on).
        span: tracing::Span,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
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
    enum State<F, C> {
        Failed { error: Option<Error> },
        Running {
            #[pin]
            fut: F,
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

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            span: tracing::Span::none(),
        }
    }

    /// Runs `fut` for the request counted by `handle`, entering `span` on each poll.
    #[inline]
    pub(crate) fn running(
        fut: F,
        handle: InFlight,
        completion: C,
        record: Option<PickRecord>,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                handle: Some(handle),
                completion,
                record,
            },
            span,
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, BoxError>>,
    C: TrackCompletion<InFlight, T>,
{
    type Output = Result<C::Output, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _enter = this.span.enter();
        match this.state.project() {
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
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
