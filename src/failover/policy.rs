use std::error::Error as StdError;

use http::Method;

use super::error::NotSent;
use crate::error::Error;

/// Which requests the failover layer may retry, and which outcomes count as failures worth a
/// retry on another endpoint.
///
/// Every method has a default, which [`DefaultPolicy`] uses as is; override the ones you want
/// to change:
///
/// ```
/// use lbkit::failover::{DefaultPolicy, RetryPolicy};
///
/// /// Also retries a POST that carries an idempotency key.
/// struct IdempotencyKey;
///
/// impl RetryPolicy for IdempotencyKey {
///     fn may_retry<B>(&self, req: &http::Request<B>) -> bool {
///         DefaultPolicy.may_retry(req) || req.headers().contains_key("idempotency-key")
///     }
/// }
/// ```
pub trait RetryPolicy: Send + Sync + 'static {
    /// Whether `req` may be sent again after an attempt that may have reached its endpoint
    /// (asked once, before the first try). A request that provably never left the proxy is
    /// retried whatever this says, see [`is_not_sent`](RetryPolicy::is_not_sent).
    ///
    /// Default: idempotent methods only (RFC 9110 §9.2.2: `GET`, `HEAD`, `OPTIONS`, `TRACE`,
    /// `PUT` and `DELETE`, which have the effect of one request when sent twice): a retried
    /// `POST` could, say, charge a card twice when the first attempt did reach the backend.
    /// To extend the default rather than replace it, call
    /// [`DefaultPolicy`]`.may_retry(req)` in yours.
    fn may_retry<B>(&self, req: &http::Request<B>) -> bool {
        is_idempotent(req.method())
    }

    /// Whether a response is a failure of its endpoint, to retry elsewhere.
    ///
    /// Default: any 5xx, the statuses that say "this server failed" rather than "this request
    /// is wrong", and what outlier detection counts against an endpoint by default: one
    /// classification, so that a backend answering `500` is retried elsewhere while outlier
    /// detection ejects it (if you choose other statuses with
    /// [`OutlierDetection::failure_status`](crate::health::OutlierDetection::failure_status),
    /// choose the same here). A response that did not come through a [`Balancer`](crate::Balancer) (no pick
    /// was recorded for it) is returned as is.
    fn is_failure<B>(&self, res: &http::Response<B>) -> bool {
        res.status().is_server_error()
    }

    /// Whether an error is worth a retry on another endpoint.
    ///
    /// Default: an endpoint's failure ([`Error::is_endpoint`]: refused connection, reset,
    /// timeout inside the endpoint's service) and a per-try timeout of the failover layer.
    /// Not [`Error::is_no_endpoint`]: there is nowhere else to go.
    fn is_retryable_error(&self, error: &(dyn StdError + 'static)) -> bool {
        match error.downcast_ref::<Error>() {
            Some(e) => e.is_endpoint(),
            None => error.is::<tower::timeout::error::Elapsed>(),
        }
    }

    /// Whether `error` proves the attempt never reached its endpoint, so that the request may
    /// be sent elsewhere even when [`may_retry`](RetryPolicy::may_retry) said no (a `POST`, a
    /// gRPC call). The error must also be [retryable](RetryPolicy::is_retryable_error), and the
    /// body still unread (see [`Replay`](super::Replay)).
    ///
    /// Default: a [`NotSent`] in the error's source chain, which
    /// [`Forward`](crate::proxy::Forward) adds for a refused connection, a connect timeout and a
    /// pooled connection found closed before the request was written (nginx and HAProxy,
    /// `retry-on conn-failure`, retry those by default too). Return `false` to send
    /// non-idempotent requests once, whatever happens.
    fn is_not_sent(&self, error: &(dyn StdError + 'static)) -> bool {
        NotSent::find(error).is_some()
    }
}

/// The default [`RetryPolicy`]: idempotent methods, and any method when the attempt never left
/// the proxy; any 5xx answer (the same default as outlier detection's, and Envoy's
/// `retry_on: 5xx`) and endpoint errors.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultPolicy;

impl RetryPolicy for DefaultPolicy {}

/// Whether `method` is idempotent (RFC 9110 §9.2.2): `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`
/// and `DELETE`. Sending such a request twice has the effect of sending it once.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
