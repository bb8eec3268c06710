//! The response cache (`lbkit::cache::CacheLayer`) in front of a balancer, over real sockets:
//! a hyper backend on 127.0.0.1 that counts the requests it receives, the library's `Server`
//! serving `ErrorResponseLayer -> CacheLayer -> BalancerLayer -> Forward`, and a hyper client.
//!
//! Time is the cache's injectable clock, moved by hand: no assertion depends on how fast the
//! machine is, and the time limits only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::cache::{CacheLayer, CacheStats};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::Server;
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, Endpoint};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;

const HANG: Duration = Duration::from_secs(30);

/// What a backend answers: from the request's head and how many requests it has had (this
/// one included).
type Handler = Arc<dyn Fn(&http::request::Parts, u64) -> Response<Full<Bytes>> + Send + Sync>;

/// A hyper backend that counts requests and keeps their heads; requests wait at `gate` (open
/// unless a test closes it) before they are answered.
struct Backend {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<(Method, String, HeaderMap)>>>,
    gate: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(
        handler: impl Fn(&http::request::Parts, u64) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Backend {
        Self::start_gated(Semaphore::MAX_PERMITS, handler).await
    }

    /// A backend whose requests wait for `permits` (released by the test) before answering.
    async fn start_gated(
        permits: usize,
        handler: impl Fn(&http::request::Parts, u64) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Backend {
        let handler: Handler = Arc::new(handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let count = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(permits));
        let (c, s, g) = (count.clone(), seen.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, count, seen, gate) =
                    (handler.clone(), c.clone(), s.clone(), g.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (handler, count, seen, gate) =
                        (handler.clone(), count.clone(), seen.clone(), gate.clone());
                    async move {
                        let (parts, _) = req.into_parts();
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.lock().unwrap().push((
                            parts.method.clone(),
                            parts.uri.to_string(),
                            parts.headers.clone(),
                        ));
                        let _permit = gate.acquire().await.expect("gate");
                        Ok::<_, Infallible>(handler(&parts, n))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            count,
            seen,
            gate,
            task,
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// The headers of the last request the backend received.
    fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .expect("a request")
            .2
            .clone()
    }
}

/// A response with `body` and `headers`.
fn answer(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::builder().status(status);
    for (name, value) in headers {
        res = res.header(*name, *value);
    }
    res.body(Full::new(body.into())).expect("response")
}

/// A backend answering `v{n}` (its count of requests) with `Cache-Control: cc`.
async fn counting_backend(cc: &'static str) -> Backend {
    counting_backend_gated(cc, Semaphore::MAX_PERMITS).await
}

/// A [`counting_backend`] whose requests wait for `permits` released by the test.
async fn counting_backend_gated(cc: &'static str, permits: usize) -> Backend {
    Backend::start_gated(permits, move |_, n| {
        answer(200, &[("cache-control", cc)], format!("v{n}"))
    })
    .await
}

/// A [`counting_backend`] and a 1 MiB cache on a test clock in front of it.
async fn cached_backend(cc: &'static str) -> (Backend, TestClock, CacheLayer, SocketAddr) {
    cached_backend_gated(cc, Semaphore::MAX_PERMITS).await
}

/// A [`counting_backend_gated`] and a 1 MiB cache on a test clock in front of it.
async fn cached_backend_gated(
    cc: &'static str,
    permits: usize,
) -> (Backend, TestClock, CacheLayer, SocketAddr) {
    let backend = counting_backend_gated(cc, permits).await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB);
    let addr = front(cache.clone(), &backend).await;
    (backend, clock, cache, addr)
}

/// A backend answering `v{n}` with the `Cache-Control` that `table` gives the request's path
/// (`max-age=60` for other paths).
async fn backend_by_path(table: &'static [(&'static str, &'static str)]) -> Backend {
    Backend::start(move |parts, n| {
        let cc = table
            .iter()
            .find(|(path, _)| *path == parts.uri.path())
            .map_or("max-age=60", |(_, cc)| cc);
        answer(200, &[("cache-control", cc)], format!("v{n}"))
    })
    .await
}

/// Sends two GETs for `path` and says how many of them reached the backend.
async fn requests_reaching(
    backend: &Backend,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> u64 {
    let before = backend.count();
    get(addr, path, headers).await;
    get(addr, path, headers).await;
    backend.count() - before
}

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock {
    start: SystemTime,
    offset: Arc<AtomicU64>,
}

impl TestClock {
    fn new() -> Self {
        TestClock {
            start: SystemTime::now(),
            offset: Arc::new(AtomicU64::new(0)),
        }
    }

    fn advance(&self, secs: u64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }

    fn now(&self) -> SystemTime {
        self.start + Duration::from_secs(self.offset.load(Ordering::SeqCst))
    }
}

/// The cache layer on `clock`, served in front of `backend` by the library's server.
async fn front(cache: CacheLayer, backend: &Backend) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(cache)
        .layer(BalancerLayer::new(
            [Endpoint::from(backend.addr)],
            RoundRobin::new(),
        ))
        .service(Forward::<lbkit::server::RequestBody>::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Server::new(svc).serve(listener));
    addr
}

fn cache_on(clock: &TestClock, capacity: u64) -> CacheLayer {
    let clock = clock.clone();
    CacheLayer::new(capacity).clock(move || clock.now())
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::new()).expect("request");
    let res = tokio::time::timeout(HANG, client().request(req))
        .await
        .expect("hang")
        .expect("request");
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(HANG, body.collect())
        .await
        .expect("hang")
        .expect("body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(addr, Method::GET, path, headers).await
}

fn age(answer: &Answer) -> Option<u64> {
    answer.headers.get("age")?.to_str().ok()?.parse().ok()
}

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn hits_do_not_reach_the_backend_and_carry_their_age() {
    let (backend, clock, cache, addr) = cached_backend("max-age=60").await;
    let first = get(addr, "/a", &[]).await;
    assert_eq!((first.status, first.body.as_str()), (StatusCode::OK, "v1"));
    for _ in 0..5 {
        let hit = get(addr, "/a", &[]).await;
        assert_eq!(hit.body, "v1");
        assert_eq!(age(&hit), Some(0));
    }
    clock.advance(7);
    let later = get(addr, "/a", &[]).await;
    assert_eq!((later.body.as_str(), age(&later)), ("v1", Some(7)));
    assert_eq!(backend.count(), 1, "hits never reach the backend");

    // Another URL, another entry; HEAD is stored apart from GET.
    assert_eq!(get(addr, "/b", &[]).await.body, "v2");
    let head = send(addr, Method::HEAD, "/a", &[]).await;
    assert_eq!((head.status, head.body.as_str()), (StatusCode::OK, ""));
    assert_eq!(backend.count(), 3);
    let stats: CacheStats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (6, 3));
}

#[tokio::test]
async fn an_expired_response_is_fetched_again() {
    let (backend, clock, _, addr) = cached_backend("max-age=1").await;
    assert_eq!(get(addr, "/", &[]).await.body, "v1");
    assert_eq!(get(addr, "/", &[]).await.body, "v1");
    clock.advance(2);
    assert_eq!(get(addr, "/", &[]).await.body, "v2");
    assert_eq!(get(addr, "/", &[]).await.body, "v2");
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn s_maxage_wins_over_max_age_and_expires_is_honoured() {
    let backend = Backend::start(|parts, n| {
        let cc = match parts.uri.path() {
            "/shared" => vec![("cache-control", "max-age=1, s-maxage=100")],
            _ => vec![("expires", "Thu, 01 Jan 1970 00:00:00 GMT")],
        };
        answer(200, &cc, format!("v{n}"))
    })
    .await;
    let clock = TestClock::new();
    let addr = front(cache_on(&clock, MIB), &backend).await;

    get(addr, "/shared", &[]).await;
    clock.advance(50);
    assert_eq!(
        get(addr, "/shared", &[]).await.body,
        "v1",
        "s-maxage=100 for a shared cache"
    );
    assert_eq!(backend.count(), 1);
    // An Expires in the past: stale at once, never served from the cache.
    assert_eq!(requests_reaching(&backend, addr, "/expired", &[]).await, 2);
}

#[tokio::test]
async fn vary_serves_a_response_only_to_requests_that_match_it() {
    let backend = Backend::start(|parts, n| {
        let lang = parts
            .headers
            .get("accept-language")
            .map_or("none", |v| v.to_str().unwrap());
        match parts.uri.path() {
            "/star" => answer(
                200,
                &[("cache-control", "max-age=60"), ("vary", "*")],
                "star",
            ),
            _ => answer(
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
                format!("{lang}-{n}"),
            ),
        }
    })
    .await;
    let clock = TestClock::new();
    let addr = front(cache_on(&clock, MIB), &backend).await;

    // The first round fills one variant per language; in the second, all three are hits.
    for _ in 0..2 {
        for (lang, body) in [(Some("en"), "en-1"), (Some("fr"), "fr-2"), (None, "none-3")] {
            let headers: Vec<_> = lang.map(|l| ("accept-language", l)).into_iter().collect();
            assert_eq!(get(addr, "/", &headers).await.body, body);
        }
    }
    assert_eq!(backend.count(), 3);

    // `Vary: *` never matches: every request goes to the backend.
    assert_eq!(requests_reaching(&backend, addr, "/star", &[]).await, 2);
}

#[tokio::test]
async fn no_store_private_and_no_cache_are_obeyed() {
    let backend = backend_by_path(&[
        ("/no-store", "no-store, max-age=60"),
        ("/private", "private, max-age=60"),
        ("/no-cache", "no-cache, max-age=60"),
    ])
    .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB);
    let addr = front(cache.clone(), &backend).await;

    for path in ["/no-store", "/private", "/no-cache"] {
        let reached = requests_reaching(&backend, addr, path, &[]).await;
        assert_eq!(reached, 2, "{path} is not served from the cache");
    }
    // A request's own no-store: not stored.
    get(addr, "/plain", &[("cache-control", "no-store")]).await;
    get(addr, "/plain", &[]).await;
    get(addr, "/plain", &[]).await;
    assert_eq!(backend.count(), 8);
    // A request's no-cache: revalidated (no validators here, so fetched again).
    get(addr, "/plain", &[("cache-control", "no-cache")]).await;
    assert_eq!(backend.count(), 9);
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn responses_to_authorized_requests_are_stored_only_when_the_response_allows() {
    let backend = backend_by_path(&[
        ("/public", "public, max-age=60"),
        ("/s-maxage", "s-maxage=60"),
    ])
    .await;
    let clock = TestClock::new();
    let addr = front(cache_on(&clock, MIB), &backend).await;
    let auth = [("authorization", "Bearer secret")];

    let reached = requests_reaching(&backend, addr, "/plain", &auth).await;
    assert_eq!(
        reached, 2,
        "max-age alone does not allow storing an authorized answer"
    );
    for path in ["/public", "/s-maxage"] {
        let reached = requests_reaching(&backend, addr, path, &auth).await;
        assert_eq!(reached, 1, "{path} allows it");
    }
}

#[tokio::test]
async fn responses_that_set_cookies_are_not_stored_unless_allowed() {
    let handler = |_: &http::request::Parts, n| {
        answer(
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "session=abc"),
            ],
            format!("v{n}"),
        )
    };
    let backend = Backend::start(handler).await;
    let clock = TestClock::new();
    let addr = front(cache_on(&clock, MIB), &backend).await;
    get(addr, "/", &[]).await;
    let second = get(addr, "/", &[]).await;
    assert_eq!((backend.count(), second.body.as_str()), (2, "v2"));

    let backend = Backend::start(handler).await;
    let allowed = cache_on(&clock, MIB).store_set_cookie(true);
    let addr = front(allowed, &backend).await;
    get(addr, "/", &[]).await;
    let second = get(addr, "/", &[]).await;
    assert_eq!((backend.count(), second.body.as_str()), (1, "v1"));
}

#[tokio::test]
async fn a_stale_response_is_revalidated_with_its_etag_and_a_304_refreshes_it() {
    let backend = Backend::start(|parts, _| {
        let etag = "\"v1\"";
        let cc = ("cache-control", "max-age=1");
        if parts
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == etag)
        {
            answer(304, &[cc, ("etag", etag)], "")
        } else {
            answer(200, &[cc, ("etag", etag)], "the body")
        }
    })
    .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB);
    let addr = front(cache.clone(), &backend).await;

    assert_eq!(get(addr, "/", &[]).await.body, "the body");
    assert!(backend.last_headers().get("if-none-match").is_none());
    clock.advance(2);
    let revalidated = get(addr, "/", &[]).await;
    assert_eq!(
        (revalidated.status, revalidated.body.as_str()),
        (StatusCode::OK, "the body")
    );
    assert_eq!(backend.count(), 2);
    assert_eq!(backend.last_headers()["if-none-match"], "\"v1\"");
    assert_eq!(cache.stats().revalidated, 1);
    // Refreshed: fresh again for max-age.
    assert_eq!(get(addr, "/", &[]).await.body, "the body");
    assert_eq!(backend.count(), 2);

    // A client's own conditional request is answered by the cache: 304 when it matches...
    let not_modified = get(addr, "/", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(
        (not_modified.status, not_modified.body.as_str()),
        (StatusCode::NOT_MODIFIED, "")
    );
    assert_eq!(not_modified.headers["etag"], "\"v1\"");
    // ... the whole response when it does not.
    let other = get(addr, "/", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!(
        (other.status, other.body.as_str()),
        (StatusCode::OK, "the body")
    );
    // Stale again: revalidated for a conditional client too, which gets the 304.
    clock.advance(2);
    let both = get(addr, "/", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(both.status, StatusCode::NOT_MODIFIED);
    assert_eq!(backend.count(), 3);
    assert_eq!(cache.stats().revalidated, 2);
}

#[tokio::test]
async fn no_cache_with_last_modified_revalidates_every_time() {
    const MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";
    let backend = Backend::start(|parts, _| {
        let headers = [("cache-control", "no-cache"), ("last-modified", MODIFIED)];
        if parts
            .headers
            .get("if-modified-since")
            .is_some_and(|v| v == MODIFIED)
        {
            answer(304, &headers, "")
        } else {
            answer(200, &headers, "content")
        }
    })
    .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB);
    let addr = front(cache.clone(), &backend).await;
    for _ in 0..3 {
        let res = get(addr, "/doc", &[]).await;
        assert_eq!((res.status, res.body.as_str()), (StatusCode::OK, "content"));
    }
    assert_eq!(backend.count(), 3, "no-cache: every use asks the backend");
    assert_eq!(backend.last_headers()["if-modified-since"], MODIFIED);
    assert_eq!(cache.stats().revalidated, 2);
    // The client's If-Modified-Since is answered against the stored Last-Modified.
    let res = get(addr, "/doc", &[("if-modified-since", MODIFIED)]).await;
    assert_eq!(res.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_key_make_one_backend_request() {
    const N: u64 = 16;
    // The backend holds requests until the test opens its gate.
    let (backend, _, cache, addr) = cached_backend_gated("max-age=60", 0).await;

    let answers = held_burst(&backend, &cache, addr, "/hot", N).await;
    for res in answers {
        assert_eq!((res.status, res.body.as_str()), (StatusCode::OK, "v1"));
    }
    assert_eq!(backend.count(), 1);
    let stats = cache.stats();
    assert_eq!(
        (stats.misses, stats.coalesced, stats.waiting),
        (1, N - 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_for_an_uncacheable_response_go_to_the_backend_themselves() {
    const N: u64 = 4;
    // The backend holds requests until the test opens its gate.
    let (backend, _, cache, addr) = cached_backend_gated("no-store", 0).await;
    let mut bodies: Vec<String> = held_burst(&backend, &cache, addr, "/", N)
        .await
        .into_iter()
        .map(|a| a.body)
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["v1", "v2", "v3", "v4"], "each got its own answer");
    // The key is now known as uncacheable: later requests skip the wait.
    get(addr, "/", &[]).await;
    assert_eq!(backend.count(), N + 1);
}

#[tokio::test]
async fn the_store_stays_within_its_byte_bound() {
    const CAPACITY: u64 = 64 * 1024;
    let body = "x".repeat(4096);
    let backend =
        Backend::start(move |_, _| answer(200, &[("cache-control", "max-age=600")], body.clone()))
            .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, CAPACITY);
    let addr = front(cache.clone(), &backend).await;
    // 100 objects of 4 KiB: over 6 times the bound.
    for i in 0..100 {
        assert_eq!(get(addr, &format!("/obj/{i}"), &[]).await.body.len(), 4096);
        let stats = cache.stats();
        assert!(
            stats.bytes <= CAPACITY,
            "{} bytes held, bound {CAPACITY}",
            stats.bytes
        );
    }
    let stats = cache.stats();
    assert!(stats.entries > 0 && stats.entries < 100, "{stats:?}");
    assert!(stats.bytes > CAPACITY / 2, "the store is used: {stats:?}");
}

#[tokio::test]
async fn bodies_over_the_maximum_object_size_stream_and_are_not_stored() {
    let big = "y".repeat(10_000);
    let backend =
        Backend::start(move |_, _| answer(200, &[("cache-control", "max-age=600")], big.clone()))
            .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB).max_object_size(4096);
    let addr = front(cache.clone(), &backend).await;
    for _ in 0..2 {
        assert_eq!(get(addr, "/big", &[]).await.body.len(), 10_000);
    }
    assert_eq!(backend.count(), 2);
    assert_eq!(cache.stats().not_stored, 2);
}

#[tokio::test]
async fn stale_if_error_serves_the_stale_response_when_the_backend_fails() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let backend = Backend::start(move |_, n| {
        if f.load(Ordering::SeqCst) {
            answer(503, &[], "down")
        } else {
            answer(200, &[("cache-control", "max-age=1")], format!("v{n}"))
        }
    })
    .await;
    let clock = TestClock::new();
    let tolerant = cache_on(&clock, MIB).stale_if_error(Duration::from_secs(60));
    let tolerant_addr = front(tolerant.clone(), &backend).await;
    let strict_addr = front(cache_on(&clock, MIB), &backend).await;

    assert_eq!(get(tolerant_addr, "/", &[]).await.body, "v1");
    assert_eq!(get(strict_addr, "/", &[]).await.body, "v2");
    clock.advance(5);
    failing.store(true, Ordering::SeqCst);
    let stale = get(tolerant_addr, "/", &[]).await;
    assert_eq!(
        (stale.status, stale.body.as_str(), age(&stale)),
        (StatusCode::OK, "v1", Some(5))
    );
    assert_eq!(tolerant.stats().stale, 1);
    assert_eq!(
        get(strict_addr, "/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Past the window: the failure goes through.
    clock.advance(120);
    assert_eq!(
        get(tolerant_addr, "/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn an_unsafe_method_invalidates_the_stored_response() {
    let (backend, _, _, addr) = cached_backend("max-age=60").await;
    assert_eq!(get(addr, "/item", &[]).await.body, "v1");
    assert_eq!(get(addr, "/item", &[]).await.body, "v1");
    send(addr, Method::POST, "/item", &[]).await;
    assert_eq!(get(addr, "/item", &[]).await.body, "v3");
    assert_eq!(backend.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_proxy_caches_with_the_cache_flag() {
    let backend = counting_backend("max-age=60").await;
    let args = reverse_proxy::Args {
        cache_mib: Some(1),
        check_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_pool, serving) = reverse_proxy::proxy(
        vec![Endpoint::from(backend.addr)],
        &args,
        listener,
        std::future::pending(),
    );
    let task = tokio::spawn(serving);
    // Health checks also reach the backend: count only the proxied path.
    let proxied = |b: &Backend| {
        b.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, uri, _)| uri == "/page")
            .count()
    };
    let first = get(addr, "/page", &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    for _ in 0..9 {
        let res = get(addr, "/page", &[]).await;
        assert_eq!((res.status, &res.body), (StatusCode::OK, &first.body));
        assert!(age(&res).is_some());
    }
    assert_eq!(
        proxied(&backend),
        1,
        "nine of ten answered by the proxy's cache"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_workload_reaches_the_backend_once_per_url() {
    const URLS: usize = 100;
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 250;
    let backend = Backend::start(|parts, _| {
        answer(
            200,
            &[("cache-control", "max-age=600")],
            parts.uri.path().to_owned(),
        )
    })
    .await;
    let clock = TestClock::new();
    let cache = cache_on(&clock, MIB);
    let addr = front(cache.clone(), &backend).await;
    // Each client walks the URLs in its own order, so first requests for a URL often race.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                for i in 0..PER_CLIENT {
                    let path = format!("/page/{}", (i * (2 * c + 1) + c) % URLS);
                    assert_eq!(get(addr, &path, &[]).await.body, path);
                }
            })
        })
        .collect();
    for client in clients {
        tokio::time::timeout(HANG * 4, client)
            .await
            .expect("hang")
            .expect("task");
    }
    let total = (CLIENTS * PER_CLIENT) as u64;
    let stats = cache.stats();
    println!(
        "repeated workload: {total} requests over {URLS} URLs, {} reached the backend, \
         hit ratio {:.1} % ({} hits, {} coalesced)",
        backend.count(),
        100.0 * (stats.hits + stats.coalesced) as f64 / total as f64,
        stats.hits,
        stats.coalesced,
    );
    assert_eq!(backend.count(), URLS as u64, "one backend request per URL");
    assert_eq!(stats.misses, URLS as u64);
    assert_eq!(stats.hits + stats.coalesced, total - URLS as u64);
}

/// Sends `n` concurrent GETs for `path` to a backend whose gate is closed, waits until one
/// reached the backend and the others wait in the cache for it (counted, not timed), opens the
/// gate and returns the answers.
async fn held_burst(
    backend: &Backend,
    cache: &CacheLayer,
    addr: SocketAddr,
    path: &'static str,
    n: u64,
) -> Vec<Answer> {
    let clients: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(addr, path, &[]).await }))
        .collect();
    wait_until("one backend request and the others waiting", || {
        backend.count() == 1 && cache.stats().waiting == n - 1
    })
    .await;
    backend.gate.add_permits(Semaphore::MAX_PERMITS);
    let mut answers = Vec::new();
    for client in clients {
        let answer = tokio::time::timeout(HANG, client).await.expect("hang");
        answers.push(answer.expect("task"));
    }
    answers
}

/// Waits (up to a limit that only catches hangs) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
