use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::completion::{InFlight, TrackCompletion};
use crate::error::{BoxError, Error};

pin_project! {
    /// The response future of a [`Balancer`](super::Balancer).
    ///
    /// Resolves to the endpoint's response (passed through the completion policy), or to an
    /// [`Error`]: at once when no endpoint was available, or when the endpoint's service fails.
    ///
    /// Dropped before the endpoint answered (a failover per-try timeout or deadline, a timeout
    /// layer, a caller that went away), the request counts as failed at that endpoint: an
    /// endpoint that hangs is then ejected by outlier detection like one that fails.
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
        // The balancer's span, entered on each poll (disabled unless its level is on).
        span: tracing::Span,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            // Still waiting for the answer: the attempt was given up on. Counted as a success,
            // it would reset the endpoint's run of failures and hide a hanging endpoint.
            if let StateProj::Running {
                handle: Some(h), ..
            } = this.project().state.project()
            {
                h.fail();
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
        },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn running(fut: F, handle: InFlight, completion: C) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                handle: Some(handle),
                completion,
            },
            span: tracing::Span::none(),
        }
    }

    /// Enters `span` on each poll.
    pub(crate) fn instrumented(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
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
            } => {
                let res = ready!(fut.poll(cx));
                let mut h = handle.take().expect("polled after completion");
                Poll::Ready(match res {
                    Ok(v) => Ok(completion.track_completion(h, v)),
                    Err(e) => {
                        h.fail();
                        let id = h.candidate().id().clone();
                        drop(h);
                        Err(Error::endpoint(id, e.into()))
                    }
                })
            }
        }
    }
}
