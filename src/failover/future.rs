use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::timeout::error::Elapsed;
use tower_service::Service;

use super::body::Replay;
use super::error::{Error as FailoverError, Failure};
use super::layer::Shared;
use super::policy::RetryPolicy;
use crate::endpoint::EndpointId;
use crate::error::{BoxError, Error};
use crate::hints::{PickHints, PickRecord};

pin_project! {
    /// The response future of [`Failover`](super::Failover): runs attempts one after the other
    /// (with a back-off between them) until one succeeds, the policy or budget says stop, or
    /// the deadline passes.
    pub struct ResponseFuture<S, B, P>
    where
        S: Service<http::Request<B>>,
    {
        service: S,
        // The request to copy the next attempts from, while more attempts may follow.
        template: Option<http::Request<B>>,
        // The request of the next attempt.
        next: Option<http::Request<B>>,
        retry: Retry,
        // Attempts sent to an endpoint so far.
        attempts: u32,
        // Where each attempt went: the balancer writes its pick here (shared with the copies).
        record: PickRecord,
        // The last failure, returned if no endpoint is left for the next attempt.
        last: Option<Result<S::Response, Failure>>,
        shared: Arc<Shared<P>>,
        #[pin]
        state: State<S::Future>,
        // When the attempt in flight times out (its per-try timeout), if it has one.
        try_end: Option<Instant>,
        // When the whole request times out (the deadline), if it has one.
        deadline: Option<Instant>,
        // One timer for whichever of the two comes first while an attempt is in flight, or for
        // the deadline while waiting for the service: created and set only when the request
        // has to wait (a single timer registration per request in the usual case).
        #[pin]
        timer: Option<Sleep>,
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
        // Waiting before a retry.
        Backoff {
            #[pin]
            sleep: Sleep,
        },
    }
}

/// Which failures of a request may be retried, as the policy said before the first attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// None: one attempt only.
    Never,
    /// Only those that prove the request never reached its endpoint (a non-idempotent method).
    NotSent,
    /// Every failure the policy counts as one.
    Any,
}

impl<S, B, P> ResponseFuture<S, B, P>
where
    S: Service<http::Request<B>>,
    B: Replay,
{
    pub(super) fn new(
        service: S,
        mut req: http::Request<B>,
        retry: Retry,
        shared: Arc<Shared<P>>,
    ) -> Self {
        let settings = shared.settings;
        let record = PickHints::of_mut(&mut req).record_pick();
        // Attempts are copies of the request, kept as a template while a retry may follow; a
        // body that cannot be copied is sent as it is, once.
        let (template, next) = match retry {
            Retry::Never => (None, req),
            Retry::NotSent | Retry::Any => match copy_request(&mut req) {
                Some(copy) => (Some(req), copy),
                None => (None, req),
            },
        };
        ResponseFuture {
            service,
            template,
            next: Some(next),
            retry,
            attempts: 0,
            record,
            last: None,
            state: State::Ready,
            try_end: None,
            deadline: settings.deadline.map(|d| Instant::now() + d),
            timer: None,
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
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// How one attempt ended.
enum Outcome<R> {
    Response(R),
    Error(BoxError),
    TimedOut,
}

/// The last failure as the caller gets it: a failed response as it is, an error as `make` says.
fn finish<R>(
    last: Result<R, Failure>,
    make: impl FnOnce(Failure) -> FailoverError,
) -> Result<R, FailoverError> {
    last.map_err(make)
}

/// The error part of a last failure, for an error that ends the request anyway.
fn failure_of<R>(last: Option<Result<R, Failure>>) -> Failure {
    match last {
        Some(Err(f)) => f,
        Some(Ok(_)) | None => Failure {
            error: None,
            timed_out: false,
        },
    }
}

impl<S, B, P, RB> Future for ResponseFuture<S, B, P>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    B: Replay,
    P: RetryPolicy,
{
    type Output = Result<http::Response<RB>, FailoverError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let shared = &**this.shared;
        let settings = shared.settings;
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready => {
                    let ready = match this.service.poll_ready(cx) {
                        Poll::Ready(ready) => ready,
                        Poll::Pending => {
                            // Waiting for the service is bounded by the deadline alone.
                            if let Some(deadline) = *this.deadline {
                                if fired(this.timer.as_mut(), deadline, cx) {
                                    tracing::debug!(
                                        attempts = *this.attempts,
                                        "failover deadline passed"
                                    );
                                    let last = failure_of(this.last.take());
                                    return Poll::Ready(Err(FailoverError::deadline(
                                        *this.attempts,
                                        last,
                                    )));
                                }
                            }
                            return Poll::Pending;
                        }
                    };
                    if let Err(e) = ready {
                        let last = Failure {
                            error: Some(e.into()),
                            timed_out: false,
                        };
                        return Poll::Ready(Err(FailoverError::failed(*this.attempts, last)));
                    }
                    let Some(req) = this.next.take() else {
                        // Not reached: an attempt is only started with a request in hand.
                        let last = Failure {
                            error: Some("failover: no request left to send".into()),
                            timed_out: false,
                        };
                        return Poll::Ready(Err(FailoverError::failed(*this.attempts, last)));
                    };
                    this.record.clear();
                    let fut = this.service.call(req);
                    this.state.set(State::Calling { fut });
                    *this.try_end = settings.per_try_timeout.map(|d| Instant::now() + d);
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Calling { fut } => {
                    let outcome = match fut.poll(cx) {
                        Poll::Ready(Ok(res)) => Outcome::Response(res),
                        Poll::Ready(Err(e)) => Outcome::Error(e.into()),
                        Poll::Pending => {
                            let (end, deadline) = (*this.try_end, *this.deadline);
                            let Some(at) = earliest(end, deadline) else {
                                return Poll::Pending;
                            };
                            if !fired(this.timer.as_mut(), at, cx) {
                                return Poll::Pending;
                            }
                            // Said before the attempt is dropped.
                            this.record.give_up();
                            if deadline.is_some_and(|d| at >= d) {
                                // The attempt in flight (dropped with this future) took too
                                // long: the endpoint's failure, not a cancellation.
                                tracing::debug!(
                                    attempts = *this.attempts,
                                    "failover deadline passed"
                                );
                                let attempts = *this.attempts + 1;
                                let last = failure_of(this.last.take());
                                return Poll::Ready(Err(FailoverError::deadline(attempts, last)));
                            }
                            Outcome::TimedOut
                        }
                    };
                    // Drops an attempt that timed out.
                    this.state.set(State::Ready);
                    let recorded = this.record.endpoint();
                    let retry = *this.retry;
                    let (failure, endpoint, retryable) = match outcome {
                        Outcome::Response(res) => {
                            *this.attempts += 1;
                            if !shared.policy.is_failure(&res) {
                                return Poll::Ready(Ok(res));
                            }
                            match recorded {
                                Some(id) => (Ok(res), Some(id), retry == Retry::Any),
                                // Not from an endpoint we know of: nothing to avoid, hand it on.
                                None => return Poll::Ready(Ok(res)),
                            }
                        }
                        Outcome::Error(e) => {
                            let lb = e.downcast_ref::<Error>();
                            if lb.is_some_and(Error::is_no_endpoint) {
                                // Every endpoint was tried (or none is up): the last failure
                                // says more than "no endpoint".
                                return Poll::Ready(match this.last.take() {
                                    Some(last) => {
                                        finish(last, |f| FailoverError::failed(*this.attempts, f))
                                    }
                                    None => Err(FailoverError::no_endpoint(e)),
                                });
                            }
                            *this.attempts += 1;
                            let id = lb.and_then(|err| err.endpoint_id().cloned());
                            let retryable = shared.policy.is_retryable_error(&*e)
                                && match retry {
                                    Retry::Any => true,
                                    Retry::NotSent => shared.policy.is_not_sent(&*e),
                                    Retry::Never => false,
                                };
                            let failure = Failure {
                                error: Some(e),
                                timed_out: false,
                            };
                            (Err(failure), id.or(recorded), retryable)
                        }
                        Outcome::TimedOut => {
                            *this.attempts += 1;
                            let e: BoxError = match &recorded {
                                Some(id) => {
                                    Box::new(Error::endpoint(id.clone(), Box::new(Elapsed::new())))
                                }
                                None => Box::new(Elapsed::new()),
                            };
                            // It may have reached the endpoint: a retry needs `may_retry`.
                            let retryable =
                                retry == Retry::Any && shared.policy.is_retryable_error(&*e);
                            let failure = Failure {
                                error: Some(e),
                                timed_out: true,
                            };
                            (Err(failure), recorded, retryable)
                        }
                    };
                    let attempts = *this.attempts;
                    if !retryable || attempts >= settings.max_attempts {
                        return Poll::Ready(finish(failure, |f| {
                            FailoverError::failed(attempts, f)
                        }));
                    }
                    // The next attempts avoid the endpoint that failed.
                    if let (Some(id), Some(template)) = (&endpoint, this.template.as_mut()) {
                        PickHints::of_mut(template).avoid(id.clone());
                    }
                    // A copy, if the body can still be sent (not a stream the attempt read).
                    let Some(next) = this.template.as_mut().and_then(copy_request) else {
                        return Poll::Ready(finish(failure, |f| {
                            FailoverError::failed(attempts, f)
                        }));
                    };
                    let delay = settings.backoff.delay(attempts);
                    if this.deadline.is_some_and(|d| Instant::now() + delay >= d) {
                        tracing::debug!(attempts, ?delay, "back-off would pass the deadline");
                        let last = failure_of(Some(failure));
                        return Poll::Ready(Err(FailoverError::deadline(attempts, last)));
                    }
                    if !shared.budget.withdraw() {
                        tracing::debug!(attempts, "retry budget spent");
                        return Poll::Ready(finish(failure, |f| {
                            FailoverError::budget_exhausted(attempts, f)
                        }));
                    }
                    log_retry(endpoint.as_ref(), attempts, delay);
                    if attempts + 1 >= settings.max_attempts {
                        // The next attempt is the last: no more copies to make.
                        *this.template = None;
                    }
                    *this.next = Some(next);
                    *this.last = Some(failure);
                    if !delay.is_zero() {
                        let sleep = tokio::time::sleep(delay);
                        this.state.set(State::Backoff { sleep });
                    }
                }
            }
        }
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sets `timer` to go off at `at` (creating it, or moving it only if it was set elsewhere),
/// polls it, and tells whether it went off.
fn fired(mut timer: Pin<&mut Option<Sleep>>, at: Instant, cx: &mut Context<'_>) -> bool {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) if sleep.deadline() == at => {}
        Some(sleep) => sleep.reset(at),
        None => timer.set(Some(tokio::time::sleep_until(at))),
    }
    timer
        .as_pin_mut()
        .is_some_and(|sleep| sleep.poll(cx).is_ready())
}

fn log_retry(endpoint: Option<&EndpointId>, attempts: u32, backoff: Duration) {
    match endpoint {
        Some(id) => tracing::debug!(
            endpoint = %id,
            attempts,
            ?backoff,
            "attempt failed; retrying elsewhere"
        ),
        None => tracing::debug!(
            attempts,
            ?backoff,
            "attempt failed at an unknown endpoint; retrying"
        ),
    }
}

/// A copy of `req` for an attempt, if its body can be sent (again): see [`Replay::lend`].
fn copy_request<B: Replay>(req: &mut http::Request<B>) -> Option<http::Request<B>> {
    let body = req.body_mut().lend()?;
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::{pending, Future};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use crate::failover::{Backoff, FailoverLayer, RetryBudget};

    /// A service whose calls never answer; with `ready: false`, it is never ready either.
    #[derive(Clone)]
    struct Stuck {
        ready: bool,
    }

    impl Service<http::Request<()>> for Stuck {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<http::Response<()>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.ready {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            Box::pin(pending())
        }
    }

    /// The failover error `call` ends with. The clock is paused: it jumps from timer to timer,
    /// so the test's own hour-long bound only catches a request that no timer would end.
    async fn failure<F>(call: F) -> crate::failover::Error
    where
        F: Future<Output = Result<http::Response<()>, crate::failover::Error>>,
    {
        tokio::time::timeout(Duration::from_secs(3600), call)
            .await
            .expect("a timer of the failover layer, not the test's bound")
            .expect_err("no response can come")
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_the_wait_for_a_service_that_is_never_ready() {
        let mut svc = FailoverLayer::new(RetryBudget::unlimited())
            .deadline(Duration::from_secs(5))
            .layer(Stuck { ready: false });
        // Called without `poll_ready` (which would wait on the inner service's): the response
        // future waits for readiness itself, as it does before every retry.
        let err = failure(svc.call(http::Request::new(()))).await;
        assert!(err.is_deadline(), "{err:?}");
        assert_eq!(err.attempts(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeouts_then_the_deadline_share_one_timer() {
        // Attempt 1 times out at 4 s and is retried at once; attempt 2 would time out at 8 s,
        // but the deadline comes first, at 6 s: a deadline error after two attempts.
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(Backoff::none())
            .per_try_timeout(Duration::from_secs(4))
            .deadline(Duration::from_secs(6))
            .layer(Stuck { ready: true });
        let err = failure(svc.oneshot(http::Request::new(()))).await;
        assert!(err.is_deadline(), "{err:?}");
        assert_eq!(err.attempts(), 2);

        // Without a deadline, every attempt gets its own per-try timeout.
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(Backoff::none())
            .max_attempts(3)
            .per_try_timeout(Duration::from_secs(4))
            .layer(Stuck { ready: true });
        let err = failure(svc.oneshot(http::Request::new(()))).await;
        assert!(err.is_timeout() && !err.is_deadline(), "{err:?}");
        assert_eq!(err.attempts(), 3);
    }
}
