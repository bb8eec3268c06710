use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::budget::RetryBudget;
use super::policy::{DefaultPolicy, RetryPolicy};
use super::service::Failover;

/// The settings of a failover layer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) max_attempts: u32,
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
/// 502/503/504 answer, a [per-try timeout](FailoverLayer::per_try_timeout); see
/// [`RetryPolicy`]), the failed endpoint is added to the request's
/// [`PickHints::avoid`](crate::hints::PickHints::avoid) list and the request is sent again,
/// so each attempt goes to an endpoint not tried before for this request. Up to
/// [`max_attempts`](FailoverLayer::max_attempts) attempts (default 3), and only:
///
/// - for requests the policy allows (by default, idempotent methods: `GET`, `HEAD`,
///   `OPTIONS`, `TRACE`, `PUT`, `DELETE`; never `POST` or `PATCH`);
/// - for requests whose body can be sent again ([`Replay`](super::Replay)): empty or
///   buffered bodies, never one that streams as it is sent;
/// - while the [`RetryBudget`] allows, so retries cannot multiply an outage.
///
/// When no endpoint is left to try, the last failure is returned (the last failed response,
/// or error), never a wait. A failure that is not retried is returned as is.
///
/// Tiers need nothing from this layer: the pool sends traffic to backup endpoints only while
/// no primary endpoint is healthy, and back to primaries when one recovers.
///
/// Errors are boxed ([`BoxError`](crate::BoxError)): the inner service's errors, or tower's
/// [`Elapsed`](tower::timeout::error::Elapsed) when the [`deadline`](FailoverLayer::deadline)
/// passes (`proxy::status_for` maps it to `504 Gateway Timeout`).
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

    /// Sets a time limit for each attempt (until the response head arrives; the body is not
    /// timed). An attempt past it is abandoned and counts as a failure of its endpoint: it is
    /// retried elsewhere when the policy and budget allow (it may already have reached the
    /// backend, so the policy's [`may_retry`](RetryPolicy::may_retry) matters here too), and
    /// otherwise fails with [`Error::is_endpoint`](crate::Error::is_endpoint) whose source is
    /// [`Elapsed`](tower::timeout::error::Elapsed). The balancer records where each attempt
    /// went, so a timed-out attempt is retried on a *different* endpoint. Needs a tokio
    /// runtime.
    pub fn per_try_timeout(mut self, timeout: Duration) -> Self {
        self.settings.per_try_timeout = Some(timeout);
        self
    }

    /// Sets a time limit for the whole request, all attempts included (until the response head
    /// arrives). Past it the request fails with tower's
    /// [`Elapsed`](tower::timeout::error::Elapsed). Needs a tokio runtime.
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
