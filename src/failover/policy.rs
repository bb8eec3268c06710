use std::error::Error as StdError;

use http::{Method, StatusCode};

use crate::error::Error;

/// Which requests the failover layer may retry, and which outcomes count as failures worth a
/// retry on another endpoint.
///
/// Every method has a default, which [`DefaultPolicy`] uses as is; override the ones you want
/// to change:
///
/// ```
/// use lbkit::failover::RetryPolicy;
///
/// /// Also retries a POST that carries an idempotency key.
/// struct IdempotencyKey;
///
/// impl RetryPolicy for IdempotencyKey {
///     fn may_retry<B>(&self, req: &http::Request<B>) -> bool {
///         lbkit::failover::is_idempotent(req.method())
///             || req.headers().contains_key("idempotency-key")
///     }
/// }
/// ```
pub trait RetryPolicy: Send + Sync + 'static {
    /// Whether `req` may be sent more than once at all (asked once, before the first try).
    ///
    /// Default: idempotent methods only ([`is_idempotent`]): a retried `POST` could, say,
    /// charge a card twice when the first attempt did reach the backend.
    fn may_retry<B>(&self, req: &http::Request<B>) -> bool {
        is_idempotent(req.method())
    }

    /// Whether a response is a failure of its endpoint, to retry elsewhere.
    ///
    /// Default: `502 Bad Gateway`, `503 Service Unavailable` and `504 Gateway Timeout`, the
    /// statuses that say "this server could not handle it now" rather than "this request is
    /// wrong". A response that did not come through a [`Balancer`](crate::Balancer) (no pick
    /// was recorded for it) is returned as is.
    fn is_failure<B>(&self, res: &http::Response<B>) -> bool {
        matches!(
            res.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        )
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
}

/// The default [`RetryPolicy`]: idempotent methods; 502, 503, 504 and endpoint errors.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultPolicy;

impl RetryPolicy for DefaultPolicy {}

/// Whether `method` is idempotent (RFC 9110 §9.2.2): `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`
/// and `DELETE`. Sending such a request twice has the effect of sending it once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
