use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::endpoint::state::now;
use crate::endpoint::Candidate;
use crate::grpc;

/// Counts one request as in flight to an endpoint until dropped.
///
/// Created by the balancer when it sends a request; when dropped it takes the request off the
/// endpoint's in-flight count and feeds the time since it was created into the endpoint's
/// latency estimate. [`InFlight::fail`] marks the request as failed first.
#[derive(Debug)]
pub struct InFlight {
    candidate: Candidate,
    start: Instant,
    outcome: Outcome,
}

/// How a request in flight ended, as far as its endpoint is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failed,
    Cancelled,
    /// Answered and counted, still open (an upgraded connection): only leaves the in-flight
    /// count when dropped.
    Tunnelled,
    /// The endpoint asked to be retried later (`Retry-After`): neither a success nor a failure.
    Throttled,
}

impl InFlight {
    /// Counts a request (or a connection) as in flight to `candidate` from now until the
    /// handle is dropped: for users who pick by hand with [`Pool::pick`](crate::Pool::pick),
    /// so that least connections, P2C, peak EWMA and outlier detection see their traffic.
    ///
    /// ```
    /// use lbkit::{balance::InFlight, strategy::LeastConnections, Endpoint, Pool};
    ///
    /// let pool = Pool::new(LeastConnections::new(), |ep: &Endpoint| ep.id().clone());
    /// pool.extend([Endpoint::new("a"), Endpoint::new("b")]);
    /// let (candidate, _service) = pool.pick(None).unwrap();
    /// let mut guard = InFlight::start(candidate);
    /// assert_eq!(pool.in_flight(), 1);
    /// guard.fail(); // the attempt failed: counted in the endpoint's errors
    /// drop(guard);
    /// assert_eq!(pool.in_flight(), 0);
    /// ```
    pub fn start(candidate: Candidate) -> Self {
        candidate.state().start();
        InFlight::counted(candidate)
    }

    /// Takes over a request the pool already counted in flight at `candidate`.
    #[inline]
    pub(crate) fn counted(candidate: Candidate) -> Self {
        InFlight {
            candidate,
            start: now(),
            outcome: Outcome::Success,
        }
    }

    /// The endpoint the request went to.
    #[inline]
    pub fn candidate(&self) -> &Candidate {
        &self.candidate
    }

    /// Marks the request as failed, so it is counted in the endpoint's errors.
    pub fn fail(&mut self) {
        self.outcome = Outcome::Failed;
    }

    /// Reads an HTTP response's status for the endpoint's health: a failure status (5xx, or
    /// what outlier detection's classifier says) marks the request failed; a `429` or `503`
    /// with a valid `Retry-After` instead backs the endpoint off for the time asked (capped by
    /// the pool's [`retry_after_cap`](crate::pool::PoolBuilder::retry_after_cap)) and counts
    /// as neither a failure nor a success.
    pub(crate) fn classify(&mut self, status: http::StatusCode, headers: &http::HeaderMap) {
        if let Some(delay) = retry_after(status, headers) {
            let state = self.candidate.state();
            let honoured = state.back_off(now(), delay);
            tracing::debug!(
                endpoint = %self.candidate.id(), status = status.as_u16(), ?honoured,
                "endpoint asked to be retried later: backed off"
            );
            self.outcome = Outcome::Throttled;
        } else {
            let state = self.candidate.state();
            if state.is_failure_status(status)
                || grpc::status(headers).is_some_and(|c| state.is_failure_grpc_code(c))
            {
                self.fail();
            }
        }
    }

    /// Marks the request as given up on by its caller (see
    /// [`EndpointState::cancelled`](crate::endpoint::EndpointState::cancelled)): neither an
    /// error nor a success of the endpoint.
    pub fn cancel(&mut self) {
        self.outcome = Outcome::Cancelled;
    }
}

impl InFlight {
    /// Counts the answer now (its latency and outcome feed the endpoint's estimates as for any
    /// response) but keeps the request in flight until dropped: for an upgraded connection,
    /// whose answer comes at once and whose load lasts as long as it stays open.
    fn tunnel(&mut self) {
        if self.outcome == Outcome::Tunnelled {
            return;
        }
        let state = self.candidate.state();
        let now = now();
        // `finish` takes the request off the in-flight count: count it once more first.
        state.start();
        state.finish(
            now.saturating_duration_since(self.start),
            now,
            self.outcome == Outcome::Failed,
        );
        self.outcome = Outcome::Tunnelled;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = self.candidate.state();
        let now = now();
        match self.outcome {
            Outcome::Cancelled => return state.cancel(),
            Outcome::Tunnelled => return state.leave(),
            Outcome::Throttled => {
                return state.finish_throttled(now.saturating_duration_since(self.start))
            }
            Outcome::Success | Outcome::Failed => {}
        }
        state.finish(
            now.saturating_duration_since(self.start),
            now,
            self.outcome == Outcome::Failed,
        );
    }
}

/// Decides when a request stops counting as in flight: given the [`InFlight`] handle and the
/// response, returns the response to hand back, holding the handle as long as it should live.
///
/// As `tower::load::TrackCompletion`, which it mirrors.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot track the completion of a `{V}`",
    label = "the balancer's completion policy does not fit this response type",
    note = "balancers track HTTP responses (`http::Response<_>`) by default; for a service whose responses are not HTTP, call `.with_completion(lbkit::balance::CompleteOnResponse)` on the balancer"
)]
pub trait TrackCompletion<H, V>: Clone {
    /// The response type handed back.
    type Output;

    /// Attaches `handle` to `value`.
    fn track_completion(&self, handle: H, value: V) -> Self::Output;
}

/// Completion when the response arrives (for responses that carry no body to stream).
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnResponse;

impl<V> TrackCompletion<InFlight, V> for CompleteOnResponse {
    type Output = V;

    #[inline]
    fn track_completion(&self, _handle: InFlight, value: V) -> V {
        value
    }
}

/// Completion when an `http::Response`'s body ends (or is dropped), so a long download counts as
/// load for its whole length; for a protocol upgrade that the inner service tunnels
/// ([`Forward`](crate::proxy::Forward) with a WebSocket), when the upgraded connection closes. Also counts a 5xx status as an endpoint error (or the statuses
/// chosen with
/// [`OutlierDetection::failure_status`](crate::health::OutlierDetection::failure_status)), and
/// a gRPC call whose `grpc-status` (in the response headers of a trailers-only answer, or in
/// the trailers) is a failure code (see [`FailureCodes`](crate::grpc::FailureCodes)). To
/// learn which endpoint served a request, see [`PickHints::record_pick`](crate::hints::PickHints::record_pick).
///
/// A `429 Too Many Requests` or `503 Service Unavailable` with a `Retry-After` header (delay
/// in seconds, or an HTTP-date with feature `http-proxy`) is an overload signal rather than a
/// failure: the endpoint is passed over by picks for the time asked, capped by
/// [`PoolBuilder::retry_after_cap`](crate::pool::PoolBuilder::retry_after_cap) (default 60 s),
/// and the request counts in [`EndpointState::throttled`](crate::endpoint::EndpointState::throttled),
/// not in its errors. The response itself goes back unchanged, for a retry layer to act on.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompleteOnBody;

impl<B> TrackCompletion<InFlight, http::Response<B>> for CompleteOnBody {
    type Output = http::Response<TrackedBody<B>>;

    fn track_completion(&self, mut handle: InFlight, mut res: http::Response<B>) -> Self::Output {
        handle.classify(res.status(), res.headers());
        if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            if let Some(guard) = res.extensions_mut().remove::<TunnelGuard>() {
                // An upgraded connection: in flight until it closes, not until this empty
                // body ends.
                handle.tunnel();
                guard.hold(handle);
                return res.map(|inner| TrackedBody {
                    inner,
                    handle: None,
                });
            }
        }
        res.map(|inner| TrackedBody {
            inner,
            handle: Some(handle),
        })
    }
}

/// The pause an HTTP response asks for: a `429` or `503` with a `Retry-After` of
/// delay-seconds or (feature `http-proxy`) an HTTP-date; `None` for any other response or a
/// value that is neither.
pub(crate) fn retry_after(status: http::StatusCode, headers: &http::HeaderMap) -> Option<Duration> {
    if status != http::StatusCode::TOO_MANY_REQUESTS
        && status != http::StatusCode::SERVICE_UNAVAILABLE
    {
        return None;
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Delay-seconds; an absurdly long one is capped by the pool anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    retry_after_date(value)
}

/// The time from now until the HTTP-date `value` (zero if it is past).
#[cfg(feature = "http-proxy")]
fn retry_after_date(value: &str) -> Option<Duration> {
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// HTTP-dates need feature `http-proxy` (its `httpdate` parser); without it they are ignored.
#[cfg(not(feature = "http-proxy"))]
fn retry_after_date(_: &str) -> Option<Duration> {
    None
}

pin_project! {
    /// A response body that holds its request's [`InFlight`] handle until the body ends.
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        handle: Option<InFlight>,
    }
}

impl<B> TrackedBody<B> {
    /// A reference to the wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll_frame(cx));
        match &res {
            None => drop(this.handle.take()),
            Some(Err(_)) => {
                if let Some(mut h) = this.handle.take() {
                    h.fail();
                }
            }
            // gRPC reports a call's outcome in its trailers, after an HTTP 200.
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(h)) = (frame.trailers_ref(), this.handle.as_mut()) {
                    let code = grpc::status(trailers);
                    if code.is_some_and(|c| h.candidate().state().is_failure_grpc_code(c)) {
                        h.fail();
                    }
                }
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Keeps a request in flight for as long as the connection it upgraded stays open.
///
/// A service that tunnels an upgraded connection (`101 Switching Protocols`) puts one in the
/// response's extensions and keeps a clone for as long as the tunnel is open; [`CompleteOnBody`]
/// takes it out and leaves the request's [`InFlight`] handle in it, so that least connections
/// and P2C see an open WebSocket as load. The handle is dropped with the last clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct TunnelGuard(Arc<OnceLock<InFlight>>);

impl TunnelGuard {
    /// Keeps `handle` until the last clone of this guard is dropped.
    fn hold(&self, handle: InFlight) {
        let _ = self.0.set(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, StatusCode};

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn retry_after_reads_seconds_on_429_and_503_only() {
        let h = headers("7");
        let s = Duration::from_secs;
        assert_eq!(retry_after(StatusCode::TOO_MANY_REQUESTS, &h), Some(s(7)));
        assert_eq!(retry_after(StatusCode::SERVICE_UNAVAILABLE, &h), Some(s(7)));
        assert_eq!(retry_after(StatusCode::OK, &h), None);
        assert_eq!(retry_after(StatusCode::BAD_GATEWAY, &h), None);
        assert_eq!(
            retry_after(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()),
            None
        );
        for bad in ["", "-1", "1.5", "soon", "0x10"] {
            assert_eq!(
                retry_after(StatusCode::TOO_MANY_REQUESTS, &headers(bad)),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            retry_after(
                StatusCode::TOO_MANY_REQUESTS,
                &headers("99999999999999999999999")
            ),
            Some(s(u64::MAX))
        );
    }

    #[cfg(feature = "http-proxy")]
    #[test]
    fn retry_after_reads_http_dates() {
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let h = headers(&httpdate::fmt_http_date(later));
        let d = retry_after(StatusCode::TOO_MANY_REQUESTS, &h).unwrap();
        // Whole seconds: between 119 and 120 s from now, however slow the machine is.
        assert!(
            d <= Duration::from_secs(120) && d >= Duration::from_secs(100),
            "{d:?}"
        );
        let past = headers("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            retry_after(StatusCode::SERVICE_UNAVAILABLE, &past),
            Some(Duration::ZERO)
        );
    }
}
