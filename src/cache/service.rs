use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use pin_project_lite::pin_project;
use tower::ServiceExt;
use tower_service::Service;

use super::body::CacheBody;
use super::flight::{self, Joined, Leader, Outcome};
use super::layer::Shared;
use super::store::{Found, Stored};
use crate::error::BoxError;

/// Rounds of waiting for other requests' flights before a request goes to the backend alone
/// (a round ends without a usable answer when the leader's response varies on a header this
/// request differs in, or the leader was cancelled).
const MAX_WAITS: usize = 3;

/// The service of [`CacheLayer`](super::CacheLayer): answers from the cache what it can, and
/// sends the rest to the inner service.
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Cache<S> {
    pub(super) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Cache { inner, shared }
    }

    /// What the cache has done so far (shared by every service of the same layer).
    pub fn stats(&self) -> super::CacheStats {
        self.shared.stats()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

type FillFuture<RB> =
    Pin<Box<dyn Future<Output = Result<Response<CacheBody<RB>>, BoxError>> + Send>>;

pin_project! {
    /// The future of the [`Cache`] service.
    pub struct ResponseFuture<F, RB> {
        #[pin]
        kind: Kind<F, RB>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, RB> {
        // A fresh hit, answered without an await.
        Hit { response: Option<Response<CacheBody<RB>>> },
        // Not for the cache (a method it does not store, a range request): the inner
        // service's future; after an unsafe method, the URL's stored responses are dropped.
        Pass {
            #[pin]
            future: F,
            invalidate: Option<(Arc<Shared>, [u64; 2])>,
        },
        // A miss or a stale entry: coalescing, the backend, storing.
        Fill { future: FillFuture<RB> },
    }
}

impl<F, RB> fmt::Debug for ResponseFuture<F, RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Hit { .. } => "ResponseFuture::Hit",
            Kind::Pass { .. } => "ResponseFuture::Pass",
            Kind::Fill { .. } => "ResponseFuture::Fill",
        })
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<CacheBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Hit { response } => match response.take() {
                Some(res) => Poll::Ready(Ok(res)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Pass { future, invalidate } => {
                let res = std::task::ready!(future.poll(cx)).map_err(Into::into)?;
                // RFC 9111 section 4.4: a non-error answer to an unsafe method invalidates
                // the stored responses of its URL.
                if let Some((shared, keys)) = invalidate.take() {
                    if !res.status().is_client_error() && !res.status().is_server_error() {
                        keys.iter().for_each(|k| shared.store.invalidate(*k));
                    }
                }
                Poll::Ready(Ok(res.map(CacheBody::streaming)))
            }
            KindProj::Fill { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Cache<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<CacheBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, RB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let method = req.method();
        if (method != Method::GET && method != Method::HEAD)
            || req.headers().contains_key(header::RANGE)
        {
            // Unsafe methods invalidate the URL's GET and HEAD responses once answered.
            let invalidate = (!is_safe(method)).then(|| {
                let keys = [
                    shared.store.primary_key(&Method::GET, &req),
                    shared.store.primary_key(&Method::HEAD, &req),
                ];
                (shared.clone(), keys)
            });
            shared.count(|c| &c.passed);
            let kind = Kind::Pass {
                future: self.inner.call(req),
                invalidate,
            };
            return ResponseFuture { kind };
        }
        // The client's own validators are answered here, against what the cache holds; the
        // backend is asked for the whole response (or with the cache's validators).
        let conditions = Conditions::take(req.headers_mut());
        let primary = shared.store.primary_key(req.method(), &req);
        let found = shared.store.lookup(primary, &req);
        if let Some(res) = fresh_hit(shared, &found, &req, &conditions) {
            let kind = Kind::Hit {
                response: Some(res),
            };
            return ResponseFuture { kind };
        }
        // The inner service made ready by `poll_ready` goes with the request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let future = Box::pin(fill(shared.clone(), inner, req, conditions, found));
        ResponseFuture {
            kind: Kind::Fill { future },
        }
    }
}

/// The answer from `found`'s stored response when it is fresh for `req` (counted as a hit).
fn fresh_hit<B, RB>(
    shared: &Shared,
    found: &Found,
    req: &Request<B>,
    conditions: &Conditions,
) -> Option<Response<CacheBody<RB>>> {
    let stored = found.entry.as_ref()?;
    match stored.policy.before_request(req, shared.now()) {
        BeforeRequest::Fresh(head) => {
            shared.count(|c| &c.hits);
            Some(conditions.answer(stored.with_head(head)))
        }
        BeforeRequest::Stale { .. } => None,
    }
}

fn is_safe(method: &Method) -> bool {
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

/// A miss or a stale entry: waits for a concurrent request's fetch of the same key when there
/// is one, else fetches (and revalidates, and stores).
async fn fill<S, B, RB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<B>,
    conditions: Conditions,
    mut found: Found,
) -> Result<Response<CacheBody<RB>>, BoxError>
where
    S: Service<Request<B>, Response = Response<RB>> + Send,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    for _ in 0..MAX_WAITS {
        if found.pass {
            break;
        }
        let rx = match shared.flights.join(found.key) {
            Joined::Lead(leader) => {
                // The previous leader may have stored the response (and ended its flight)
                // since this request looked: look again before going to the backend.
                found = shared.store.lookup(found.primary, &req);
                if let Some(res) = fresh_hit(&shared, &found, &req, &conditions) {
                    return Ok(res);
                }
                return fetch(&shared, inner, req, conditions, found, Some(leader)).await;
            }
            Joined::Wait(rx) => rx,
        };
        let waiting = Waiting::start(&shared);
        let outcome = flight::outcome(rx).await;
        drop(waiting);
        match outcome {
            Some(Outcome::Serve(stored)) => {
                // Fetched from the backend after this request arrived: usable when it matches
                // this request (its URL and `Vary` headers), fresh or not.
                let now = shared.now();
                let res = match stored.policy.before_request(&req, now) {
                    BeforeRequest::Fresh(head) => Some(stored.with_head(head)),
                    BeforeRequest::Stale { matches: true, .. } => Some(stored.response(now)),
                    BeforeRequest::Stale { matches: false, .. } => None,
                };
                if let Some(res) = res {
                    shared.count(|c| &c.coalesced);
                    return Ok(conditions.answer(res));
                }
            }
            Some(Outcome::Pass) => break,
            // The leader was cancelled: look again, maybe lead.
            None => {}
        }
        found = shared.store.lookup(found.primary, &req);
        if let Some(res) = fresh_hit(&shared, &found, &req, &conditions) {
            return Ok(res);
        }
    }
    fetch(&shared, inner, req, conditions, found, None).await
}

/// Counts a request as waiting for another's fetch while it lives.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn start(shared: &'a Shared) -> Self {
        shared
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Goes to the backend for `req`: revalidates `found`'s stale entry (a conditional request;
/// a `304` refreshes it), or fetches the response and stores it when the rules allow; tells
/// the flight's waiters, if it leads one.
async fn fetch<S, B, RB>(
    shared: &Shared,
    inner: S,
    mut req: Request<B>,
    conditions: Conditions,
    found: Found,
    leader: Option<Leader<'_>>,
) -> Result<Response<CacheBody<RB>>, BoxError>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Unpin,
    RB::Error: Into<BoxError>,
{
    let publish = |outcome: Outcome| {
        if let Some(leader) = &leader {
            leader.publish(outcome);
        }
    };
    // Nothing kept: the waiters go on their own, and an empty key skips coalescing for a
    // while. A stored response stays: a request of its own (`Authorization`, `no-store`) may
    // be why this answer cannot be stored, and other requests can still revalidate it.
    let had_entry = found.entry.is_some();
    let not_stored = || {
        if !had_entry {
            shared.store.mark_pass(found.key);
        }
        publish(Outcome::Pass);
        shared.count(|c| &c.not_stored);
    };
    // A stale entry that matches this request: revalidate it with its validators.
    let mut stale = None;
    if let Some(stored) = found.entry {
        if let BeforeRequest::Stale {
            request,
            matches: true,
        } = stored.policy.before_request(&req, shared.now())
        {
            for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
                if let Some(value) = request.headers.get(&name) {
                    req.headers_mut().insert(name, value.clone());
                }
            }
            stale = Some(stored);
        }
    }
    // What the policy needs of the request, kept before the request goes.
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.headers_mut() = req.headers().clone();

    let result = inner.oneshot(req).await.map_err(Into::into);
    shared.count(|c| &c.misses);
    let now = shared.now();
    let res = match result {
        Ok(res) if !is_backend_failure(res.status()) => res,
        failed => {
            if let Some(stored) = stale.filter(|s| s.serves_stale_on_error(now)) {
                tracing::debug!(status = ?failed.as_ref().map(|r| r.status()).ok(), "cache: stale response served on a backend failure");
                shared.count(|c| &c.stale);
                publish(Outcome::Serve(stored.clone()));
                return Ok(conditions.answer(stored.response(now)));
            }
            publish(Outcome::Pass);
            return failed.map(|res| res.map(CacheBody::streaming));
        }
    };

    if let Some(old) = &stale {
        if res.status() == StatusCode::NOT_MODIFIED {
            if let AfterResponse::NotModified(policy, parts) =
                old.policy.after_response(&head, &res, now)
            {
                // Still valid: the stored body under the refreshed head.
                shared.count(|c| &c.revalidated);
                let refreshed = Stored::new(
                    policy,
                    head.headers(),
                    parts.status,
                    parts.headers.clone(),
                    old.body.clone(),
                    now,
                    shared.settings.stale_if_error,
                )
                .map(Arc::new);
                let Some(refreshed) = refreshed else {
                    // Too heavy to count once refreshed: served, no longer kept.
                    shared.store.mark_pass(found.key);
                    publish(Outcome::Pass);
                    let res = Response::from_parts(parts, CacheBody::full(old.body.clone()));
                    return Ok(conditions.answer(res));
                };
                shared.store.insert(found.primary, &head, refreshed.clone());
                publish(Outcome::Serve(refreshed.clone()));
                return Ok(conditions.answer(refreshed.response(now)));
            }
            // A 304 that is not about the stored response: passed on as it is.
            publish(Outcome::Pass);
            return Ok(res.map(CacheBody::streaming));
        }
    }
    let policy = CachePolicy::new_options(
        &head,
        &res,
        now,
        CacheOptions {
            shared: true,
            ..CacheOptions::default()
        },
    );
    if !shared.may_store(&policy, res.headers()) || too_large(&res, shared.settings.max_object) {
        not_stored();
        return Ok(res.map(CacheBody::streaming));
    }
    let (parts, body) = res.into_parts();
    match buffer(body, shared.settings.max_object).await {
        Buffered::Whole(bytes) => {
            let stored = Stored::new(
                policy,
                head.headers(),
                parts.status,
                parts.headers.clone(),
                bytes.clone(),
                now,
                shared.settings.stale_if_error,
            )
            .filter(|s| s.is_useful(now));
            match stored.map(Arc::new) {
                Some(stored) => {
                    shared.store.insert(found.primary, &head, stored.clone());
                    publish(Outcome::Serve(stored));
                }
                None => not_stored(),
            }
            let res = Response::from_parts(parts, CacheBody::full(bytes));
            Ok(conditions.answer(res))
        }
        Buffered::Partial(frames, rest) => {
            // Larger than the maximum object size, or with trailers: streamed on, not kept.
            not_stored();
            Ok(Response::from_parts(
                parts,
                CacheBody::prefixed(frames, rest),
            ))
        }
        Buffered::Failed(e) => {
            publish(Outcome::Pass);
            Err(e)
        }
    }
}

/// Statuses that mean the backend could not answer (what `stale-if-error` covers).
fn is_backend_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Whether the response says (`Content-Length`) that it is larger than `max` bytes.
fn too_large<B>(res: &Response<B>, max: usize) -> bool {
    res.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|len| len > max as u64)
}

enum Buffered<B> {
    /// The whole body, within the size bound.
    Whole(Bytes),
    /// What was read before the bound was passed (or trailers came), and the rest (`None`
    /// when the body has ended).
    Partial(VecDeque<Frame<Bytes>>, Option<B>),
    Failed(BoxError),
}

/// Reads `body` whole if it is at most `max` bytes long and has no trailers.
async fn buffer<B>(mut body: B, max: usize) -> Buffered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut chunks: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Buffered::Failed(e.into()),
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else {
                    // Trailers: kept for the client, not stored.
                    chunks.push_back(frame);
                    return Buffered::Partial(chunks, Some(body));
                };
                len += data.len();
                chunks.push_back(frame);
                if len > max {
                    return Buffered::Partial(chunks, Some(body));
                }
            }
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks
            .pop_front()
            .and_then(|f| f.into_data().ok())
            .unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for frame in chunks {
                if let Ok(data) = frame.into_data() {
                    all.extend_from_slice(&data);
                }
            }
            all.freeze()
        }
    };
    Buffered::Whole(bytes)
}

/// The client's own validators (`If-None-Match`, `If-Modified-Since`), taken off the request:
/// the cache answers them itself (`304 Not Modified`) against the response it serves.
pub(super) struct Conditions {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
}

impl Conditions {
    fn take(headers: &mut HeaderMap) -> Self {
        Conditions {
            if_none_match: headers.remove(header::IF_NONE_MATCH),
            if_modified_since: headers.remove(header::IF_MODIFIED_SINCE),
        }
    }

    /// `res`, or `304 Not Modified` with its headers when the client's validators match it
    /// (RFC 9110 section 13.2.2: `If-None-Match` first, `If-Modified-Since` only without it).
    fn answer<B>(&self, res: Response<CacheBody<B>>) -> Response<CacheBody<B>> {
        if res.status() != StatusCode::OK || !self.matches(res.headers()) {
            return res;
        }
        let (mut parts, _) = res.into_parts();
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, CacheBody::full(Bytes::new()))
    }

    fn matches(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            let (Ok(inm), Some(Ok(etag))) = (
                inm.to_str(),
                headers.get(header::ETAG).map(HeaderValue::to_str),
            ) else {
                return false;
            };
            // Weak comparison (RFC 9110 section 8.8.3.2).
            fn opaque(tag: &str) -> &str {
                let tag = tag.trim();
                tag.strip_prefix("W/").unwrap_or(tag)
            }
            return inm.trim() == "*" || inm.split(',').any(|t| opaque(t) == opaque(etag));
        }
        if let Some(ims) = &self.if_modified_since {
            let date = |v: Option<&HeaderValue>| {
                v.and_then(|v| v.to_str().ok())
                    .and_then(|v| httpdate::parse_http_date(v).ok())
            };
            return match (date(headers.get(header::LAST_MODIFIED)), date(Some(ims))) {
                (Some(modified), Some(since)) => modified <= since,
                _ => false,
            };
        }
        false
    }
}

impl Shared {
    pub(super) fn now(&self) -> SystemTime {
        (self.clock)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(inm: Option<&'static str>, ims: Option<&'static str>) -> Conditions {
        let mut headers = HeaderMap::new();
        if let Some(v) = inm {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static(v));
        }
        if let Some(v) = ims {
            headers.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_static(v));
        }
        let taken = Conditions::take(&mut headers);
        assert!(
            headers.is_empty(),
            "the validators are taken off the request"
        );
        taken
    }

    fn stored(etag: Option<&'static str>, modified: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(v) = etag {
            headers.insert(header::ETAG, HeaderValue::from_static(v));
        }
        if let Some(v) = modified {
            headers.insert(header::LAST_MODIFIED, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison_and_lists() {
        let etag = stored(Some("W/\"a\""), None);
        assert!(conditions(Some("\"a\""), None).matches(&etag));
        assert!(conditions(Some("\"x\", W/\"a\""), None).matches(&etag));
        assert!(conditions(Some("*"), None).matches(&etag));
        assert!(!conditions(Some("\"b\""), None).matches(&etag));
        assert!(!conditions(Some("\"a\""), None).matches(&stored(None, None)));
    }

    #[test]
    fn if_modified_since_is_read_only_without_if_none_match() {
        let modified = stored(Some("\"a\""), Some("Tue, 01 Dec 2026 10:00:00 GMT"));
        let later = Some("Tue, 01 Dec 2026 11:00:00 GMT");
        let earlier = Some("Tue, 01 Dec 2026 09:00:00 GMT");
        assert!(conditions(None, later).matches(&modified));
        assert!(!conditions(None, earlier).matches(&modified));
        // If-None-Match decides alone when present (RFC 9110 section 13.2.2).
        assert!(!conditions(Some("\"b\""), later).matches(&modified));
        assert!(!conditions(None, Some("not a date")).matches(&modified));
        assert!(!conditions(None, None).matches(&modified));
    }

    #[test]
    fn only_a_200_becomes_a_304() {
        let cond = conditions(Some("*"), None);
        let mut res = Response::new(CacheBody::<http_body_util::Empty<Bytes>>::full(
            Bytes::from_static(b"body"),
        ));
        res.headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"a\""));
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
        let answered = cond.answer(res);
        assert_eq!(answered.status(), StatusCode::NOT_MODIFIED);
        assert!(answered.headers().get(header::CONTENT_LENGTH).is_none());
        assert!(answered.body().is_end_stream());

        let mut not_found =
            Response::new(CacheBody::<http_body_util::Empty<Bytes>>::full(Bytes::new()));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        not_found
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"a\""));
        assert_eq!(cond.answer(not_found).status(), StatusCode::NOT_FOUND);
    }
}
