use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::backoff::Backoff;
use super::budget::RetryBudget;
use super::policy::{DefaultPolicy, RetryPolicy};
use super::service::Failover;

/// The settings of a failover layer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) max_attempts: u32,
    pub(super) backoff: Backoff,
    pub(super) per_try_timeout: Option<Duration>,
    pub(super) deadline: Option<Duration>,
}

/// What a failover service and its futures share.
#[derive(Debug)]
pub(super) struct Shared<P> {
    pub(super) policy: Arc<P>,
    pub(super) budget: Arc<RetryBudget>,
    pub(super) settings: Settings,
}

/// A [`Layer`] that retries failed requests on *other* endpoints.
///
/// In front of a [`Balancer`](crate::Balancer): when an attempt fails (an endpoint error, a
/// 5xx answer, a [per-try timeout](FailoverLayer::per_try_timeout); see
/// [`RetryPolicy`]), the failed endpoint is added to the request's
/// [`PickHints::avoid`](crate::hints::PickHints::avoid) list and the request is sent again,
/// so each attempt goes to an endpoint not tried before for this request. Up to
/// [`max_attempts`](FailoverLayer::max_attempts) attempts (default 3), and only:
///
/// - for requests the policy allows (by default, idempotent methods: `GET`, `HEAD`,
///   `OPTIONS`, `TRACE`, `PUT`, `DELETE`), and for any request, `POST` and `PATCH` included,
///   whose attempt provably never reached its endpoint (a refused connection: see
///   [`NotSent`](super::NotSent));
/// - for requests whose body can be sent again ([`Replay`](super::Replay)): empty or
///   buffered bodies, or a [`ReplayBody`](super::ReplayBody) stream the failed attempt never
///   read;
/// - while the [`RetryBudget`] allows, so retries cannot multiply an outage;
/// - after a [`Backoff`] (by default Envoy's: a random wait under 25 ms, 75 ms, 175 ms, then
///   250 ms), never past the [`deadline`](FailoverLayer::deadline).
///
/// When no endpoint is left to try, the last failure is returned (the last failed response,
/// or error), never a wait. A failure that is not retried is returned as is: a response as
/// the backend sent it, an error as a [`failover::Error`](super::Error) that says why no
/// attempt followed, with the attempt's own error as its source.
///
/// Tiers need nothing from this layer: the pool sends traffic to backup endpoints only while
/// no primary endpoint is healthy, and back to primaries when one recovers.
///
/// The errors are [`failover::Error`](super::Error)s: `is_deadline`, `is_budget_exhausted`,
/// `is_no_endpoint`, `is_timeout` (per try); `proxy::status_for` maps them to 504, 503, 503
/// and 504.
///
/// ```
/// use std::time::Duration;
/// use lbkit::failover::{FailoverLayer, RetryBudget};
/// use lbkit::{strategy::RoundRobin, BalancerLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(
///         FailoverLayer::new(RetryBudget::default())
///             .max_attempts(3)
///             .deadline(Duration::from_secs(10)),
///     )
///     .layer(BalancerLayer::new(["good:80", "bad:80"], RoundRobin::new()))
///     .service(service_fn(|req: http::Request<()>| async move {
///         let to = req.extensions().get::<lbkit::balance::Target>().unwrap();
///         let status = if to.endpoint().id() == "bad:80" { 503 } else { 200 };
///         let mut res = http::Response::new(());
///         *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
///         Ok::<_, std::convert::Infallible>(res)
///     }));
/// for _ in 0..4 {
///     let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
///     assert_eq!(res.status(), 200);
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct FailoverLayer<P = DefaultPolicy> {
    policy: Arc<P>,
    budget: Arc<RetryBudget>,
    settings: Settings,
}

impl<P> Clone for FailoverLayer<P> {
    fn clone(&self) -> Self {
        FailoverLayer {
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            settings: self.settings,
        }
    }
}

impl FailoverLayer {
    /// Failover with the default policy, spending retries from `budget`.
    pub fn new(budget: impl Into<Arc<RetryBudget>>) -> Self {
        FailoverLayer {
            policy: Arc::new(DefaultPolicy),
            budget: budget.into(),
            settings: Settings {
                max_attempts: 3,
                backoff: Backoff::default(),
                per_try_timeout: None,
                deadline: None,
            },
        }
    }
}

impl Default for FailoverLayer {
    /// [`FailoverLayer::new`] with [`RetryBudget::default`].
    fn default() -> Self {
        FailoverLayer::new(RetryBudget::default())
    }
}

impl<P: RetryPolicy> FailoverLayer<P> {
    /// Sets the most attempts per request, the first included (default 3; at least 1, and 1
    /// turns retries off).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// Sets the wait before each retry (default [`Backoff::default`]: Envoy's fully jittered
    /// exponential back-off, 25 ms base, 250 ms cap); [`Backoff::none`] retries at once. A wait
    /// that would pass the [`deadline`](FailoverLayer::deadline) ends the request with
    /// [`Error::is_deadline`](super::Error::is_deadline) at once instead. Needs a tokio runtime
    /// unless none.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.settings.backoff = backoff;
        self
    }

    /// Sets a time limit for each attempt (until the response head arrives; the body is not
    /// timed). An attempt past it is abandoned and counts as a failure of its endpoint: it is
    /// retried elsewhere when the policy and budget allow (it may already have reached the
    /// backend, so the policy's [`may_retry`](RetryPolicy::may_retry) matters here too), and
    /// otherwise fails with [`Error::is_timeout`](super::Error::is_timeout), its source an
    /// [`lbkit::Error`](crate::Error) of the endpoint whose source is tower's
    /// [`Elapsed`](tower::timeout::error::Elapsed). The balancer records where each attempt
    /// went, so a timed-out attempt is retried on a *different* endpoint. Needs a tokio
    /// runtime.
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.settings.per_try_timeout = Some(timeout);
        self
    }

    /// Sets a time limit for the whole request, all attempts and back-offs included (until the
    /// response head arrives). Past it the request fails with
    /// [`Error::is_deadline`](super::Error::is_deadline). Default: none. Needs a tokio runtime.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.settings.deadline = Some(deadline);
        self
    }

    /// Replaces the retry policy.
    pub fn policy<P2: RetryPolicy>(self, policy: P2) -> FailoverLayer<P2> {
        FailoverLayer {
            policy: Arc::new(policy),
            budget: self.budget,
            settings: self.settings,
        }
    }

    /// The retry budget (to read its counters).
    pub fn budget(&self) -> &Arc<RetryBudget> {
        &self.budget
    }
}

impl<S, P> Layer<S> for FailoverLayer<P> {
    type Service = Failover<S, P>;

    fn layer(&self, inner: S) -> Failover<S, P> {
        Failover::new(
            inner,
            Arc::new(Shared {
                policy: self.policy.clone(),
                budget: self.budget.clone(),
                settings: self.settings,
            }),
        )
    }
}
