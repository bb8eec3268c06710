use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::timeout::error::Elapsed;
use tower_service::Service;

use super::body::Replay;
use super::layer::Shared;
use super::policy::RetryPolicy;
use crate::endpoint::EndpointId;
use crate::error::{BoxError, Error};
use crate::hints::{PickHints, PickRecord};

pin_project! {
    /// The response future of [`Failover`](super::Failover): runs attempts one after the other
    /// until one succeeds, the policy or budget says stop, or the deadline passes.
    pub struct ResponseFuture<S, B, P>
    where
        S: Service<http::Request<B>>,
    {
        service: S,
        // The request to copy each attempt from, while more attempts may follow.
        template: Option<http::Request<B>>,
        retryable: bool,
        attempts: u32,
        // Where each attempt went: the balancer writes its pick here (shared with the copies).
        record: PickRecord,
        // The last failure, returned if no endpoint is left for the next attempt.
        last: Option<Result<S::Response, BoxError>>,
        shared: Arc<Shared<P>>,
        #[pin]
        state: State<S::Future>,
        #[pin]
        per_try: Option<Sleep>,
        #[pin]
        deadline: Option<Sleep>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for the service to be ready, then sending the next attempt.
        Ready,
        Calling {
            #[pin]
            fut: F,
        },
    }
}

impl<S, B, P> ResponseFuture<S, B, P>
where
    S: Service<http::Request<B>>,
{
    pub(super) fn new(
        service: S,
        mut req: http::Request<B>,
        retryable: bool,
        shared: Arc<Shared<P>>,
    ) -> Self {
        let settings = shared.settings;
        let record = PickHints::of_mut(&mut req).record_pick();
        ResponseFuture {
            service,
            template: Some(req),
            retryable,
            attempts: 0,
            record,
            last: None,
            state: State::Ready,
            per_try: settings.per_try_timeout.map(tokio::time::sleep),
            deadline: settings.deadline.map(tokio::time::sleep),
            shared,
        }
    }
}

impl<S, B, P> fmt::Debug for ResponseFuture<S, B, P>
where
    S: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempts", &self.attempts)
            .field("retryable", &self.retryable)
            .finish_non_exhaustive()
    }
}

/// How one attempt ended.
enum Outcome<R> {
    Response(R),
    Error(BoxError),
    TimedOut,
}

impl<S, B, P, RB> Future for ResponseFuture<S, B, P>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    B: Replay,
    P: RetryPolicy,
{
    type Output = Result<http::Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let shared = &**this.shared;
        let settings = shared.settings;
        loop {
            if let Some(deadline) = this.deadline.as_mut().as_pin_mut() {
                if deadline.poll(cx).is_ready() {
                    tracing::debug!(attempts = *this.attempts, "failover deadline passed");
                    // The attempt in flight (dropped with this future) took too long: the
                    // endpoint's failure, not a cancellation.
                    if matches!(this.state.as_mut().project(), StateProj::Calling { .. }) {
                        this.record.give_up();
                    }
                    return Poll::Ready(Err(Box::new(Elapsed::new())));
                }
            }
            match this.state.as_mut().project() {
                StateProj::Ready => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(e.into()));
                    }
                    let last_chance =
                        !*this.retryable || *this.attempts + 1 >= settings.max_attempts;
                    let Some(req) = next_request(this.template, last_chance) else {
                        // Not reached: an attempt is only started with a request in hand.
                        return Poll::Ready(Err("failover: no request left to send".into()));
                    };
                    this.record.clear();
                    let fut = this.service.call(req);
                    this.state.set(State::Calling { fut });
                    if let (Some(sleep), Some(d)) =
                        (this.per_try.as_mut().as_pin_mut(), settings.per_try_timeout)
                    {
                        sleep.reset(Instant::now() + d);
                    }
                }
                StateProj::Calling { fut } => {
                    let outcome = match fut.poll(cx) {
                        Poll::Ready(Ok(res)) => Outcome::Response(res),
                        Poll::Ready(Err(e)) => Outcome::Error(e.into()),
                        Poll::Pending => {
                            let timed_out = this
                                .per_try
                                .as_mut()
                                .as_pin_mut()
                                .is_some_and(|sleep| sleep.poll(cx).is_ready());
                            if !timed_out {
                                return Poll::Pending;
                            }
                            // Said before the attempt is dropped just below.
                            this.record.give_up();
                            Outcome::TimedOut
                        }
                    };
                    // Drops an attempt that timed out.
                    this.state.set(State::Ready);
                    *this.attempts += 1;
                    let recorded = this.record.endpoint();
                    let (failure, endpoint) = match outcome {
                        Outcome::Response(res) => {
                            if !shared.policy.is_failure(&res) {
                                return Poll::Ready(Ok(res));
                            }
                            match recorded {
                                Some(id) => (Ok(res), Some(id)),
                                // Not from an endpoint we know of: nothing to avoid, hand it on.
                                None => return Poll::Ready(Ok(res)),
                            }
                        }
                        Outcome::Error(e) => {
                            if let Some(err) = e.downcast_ref::<Error>() {
                                if err.is_no_endpoint() {
                                    // Every endpoint was tried (or none is up): the last failure
                                    // says more than "no endpoint".
                                    return Poll::Ready(this.last.take().unwrap_or(Err(e)));
                                }
                            }
                            if !shared.policy.is_retryable_error(&*e) {
                                return Poll::Ready(Err(e));
                            }
                            let id = e
                                .downcast_ref::<Error>()
                                .and_then(|err| err.endpoint_id().cloned());
                            (Err(e), id.or(recorded))
                        }
                        Outcome::TimedOut => {
                            let e: BoxError = match &recorded {
                                Some(id) => {
                                    Box::new(Error::endpoint(id.clone(), Box::new(Elapsed::new())))
                                }
                                None => Box::new(Elapsed::new()),
                            };
                            if !shared.policy.is_retryable_error(&*e) {
                                return Poll::Ready(Err(e));
                            }
                            (Err(e), recorded)
                        }
                    };
                    let more = *this.retryable
                        && *this.attempts < settings.max_attempts
                        && this.template.is_some();
                    if !more {
                        return Poll::Ready(failure);
                    }
                    if !shared.budget.withdraw() {
                        tracing::debug!(attempts = *this.attempts, "retry budget spent");
                        return Poll::Ready(failure);
                    }
                    log_retry(endpoint.as_ref(), *this.attempts);
                    if let (Some(id), Some(template)) = (endpoint, this.template.as_mut()) {
                        PickHints::of_mut(template).avoid(id);
                    }
                    *this.last = Some(failure);
                }
            }
        }
    }
}

fn log_retry(endpoint: Option<&EndpointId>, attempts: u32) {
    match endpoint {
        Some(id) => tracing::debug!(endpoint = %id, attempts, "attempt failed; retrying elsewhere"),
        None => tracing::debug!(attempts, "attempt failed at an unknown endpoint; retrying"),
    }
}

/// The request of the next attempt: a copy of the template while more attempts may follow and
/// the body can be replayed, otherwise the template itself (after which nothing is left to
/// retry with).
fn next_request<B: Replay>(
    template: &mut Option<http::Request<B>>,
    last_chance: bool,
) -> Option<http::Request<B>> {
    if !last_chance {
        if let Some(copy) = template.as_ref().and_then(copy_request) {
            return Some(copy);
        }
    }
    template.take()
}

/// A copy of `req` for another attempt, if its body can be sent again.
fn copy_request<B: Replay>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let body = req.body().replay()?;
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}
