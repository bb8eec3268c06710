//! Failover on real HTTP/1.1 servers on 127.0.0.1: retries go to endpoints not yet tried,
//! only for idempotent requests with replayable bodies, within a budget, a per-try timeout
//! and a deadline; backup endpoints take over when every primary is down and hand back.
//!
//! Each request carries an `x-request-id`; every server counts the ids it sees, so a test
//! can tell how many times one request reached one server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::failover::{
    self, Backoff, DefaultPolicy, FailoverLayer, ReplayBody, RetryBudget, RetryPolicy,
};
use lbkit::hints::PickHints;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, BoxError, Endpoint, Tier};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Backends

/// What a backend does with each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 with its name as the body.
    Ok = 0,
    /// 503 Service Unavailable.
    Unavailable = 1,
    /// Reads the request head, then closes the connection without answering.
    Close = 2,
    /// Never answers (until the test ends).
    Hang = 3,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Ok,
            1 => Mode::Unavailable,
            2 => Mode::Close,
            _ => Mode::Hang,
        }
    }
}

/// One backend on 127.0.0.1, stopped when dropped.
struct Backend {
    name: String,
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicU64>,
    /// How many times each request id reached this backend.
    seen: Arc<Mutex<HashMap<String, u32>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(name: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let hits = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let (m, h, s, body) = (
            mode.clone(),
            hits.clone(),
            seen.clone(),
            Bytes::from(name.to_owned()),
        );
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (m, h, s, body) = (m.clone(), h.clone(), s.clone(), body.clone());
                conns.spawn(async move {
                    if Mode::from_u8(m.load(Ordering::SeqCst)) == Mode::Close {
                        // Read the head to learn the request id, then hang up.
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                        let id = head
                            .lines()
                            .find_map(|l| l.strip_prefix("x-request-id:"))
                            .map(|v| v.trim().to_owned())
                            .unwrap_or_default();
                        *s.lock().unwrap().entry(id).or_insert(0) += 1;
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (m, h, s, body) = (m.clone(), h.clone(), s.clone(), body.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let id = req
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            *s.lock().unwrap().entry(id).or_insert(0) += 1;
                            // Read the request body whole, as a real server would.
                            let _ = req.into_body().collect().await;
                            let mut res = Response::new(Full::new(body));
                            match Mode::from_u8(m.load(Ordering::SeqCst)) {
                                Mode::Ok | Mode::Close => {}
                                Mode::Unavailable => {
                                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE
                                }
                                Mode::Hang => futures::future::pending::<()>().await,
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            mode,
            hits,
            seen,
            task,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.name.as_str()).with_addr(self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The most times any one request reached this backend.
    fn max_per_request(&self) -> u32 {
        self.seen
            .lock()
            .unwrap()
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// An endpoint's service: sends requests to the endpoint's address with a shared client.
struct HttpEndpoint<B> {
    client: Client<HttpConnector, B>,
    addr: SocketAddr,
}

impl<B> Clone for HttpEndpoint<B> {
    fn clone(&self) -> Self {
        HttpEndpoint {
            client: self.client.clone(),
            addr: self.addr,
        }
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

impl<B> Service<Request<B>> for HttpEndpoint<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> BoxFut {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{}{path}", self.addr).parse().expect("uri");
        let fut = self.client.request(req);
        Box::pin(async move { fut.await.map_err(BoxError::from) })
    }
}

type Svc<B> = HttpEndpoint<B>;
type HttpBalancer<B> = Balancer<Svc<B>, RoundRobin, lbkit::balance::CompleteOnBody>;

/// A round-robin HTTP balancer over `endpoints`.
fn balancer<B>(endpoints: impl IntoIterator<Item = Endpoint>) -> HttpBalancer<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let client: Client<HttpConnector, B> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    Balancer::new(endpoints, RoundRobin::new(), move |ep: &Endpoint| {
        HttpEndpoint {
            client: client.clone(),
            addr: ep.socket_addr().expect("endpoint address"),
        }
    })
}

fn get(id: u64) -> Request<Full<Bytes>> {
    Request::get("/")
        .header("x-request-id", id.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn post(id: u64) -> Request<Full<Bytes>> {
    Request::post("/order")
        .header("x-request-id", id.to_string())
        .body(Full::new(Bytes::from_static(b"one pizza")))
        .expect("request")
}

/// Sends `req` and returns the status and body text.
async fn send<S, B>(svc: &S, req: Request<B>) -> Result<(StatusCode, String), BoxError>
where
    S: Service<Request<B>, Response = Response<lbkit::balance::TrackedBody<Incoming>>> + Clone,
    S::Error: Into<BoxError>,
{
    let res = svc.clone().oneshot(req).await.map_err(Into::into)?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Runs `test`, failing if it takes longer than `limit`.
async fn within<F: Future>(limit: Duration, test: F) -> F::Output {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// 1 000 GETs over three backends, one of which answers 503 to everything: every request
/// succeeds, and no request reaches the failing backend twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_gets_succeed_with_one_backend_failing() {
    within(Duration::from_secs(60), async {
        let ok1 = Backend::start("ok1", Mode::Ok).await;
        let ok2 = Backend::start("ok2", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Unavailable).await;
        let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.5);
        let layer = FailoverLayer::new(budget);
        let svc = layer.layer(balancer([ok1.endpoint(), bad.endpoint(), ok2.endpoint()]));

        let results: Vec<_> = futures::stream::iter(0..1000u64)
            .map(|i| {
                let svc = svc.clone();
                async move { send(&svc, get(i)).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for r in &results {
            let (status, body) = r.as_ref().expect("request failed");
            assert_eq!(*status, StatusCode::OK);
            assert!(body == "ok1" || body == "ok2", "served by {body}");
        }
        let retries = svc.budget().retries();
        eprintln!(
            "1000 GETs: bad={} ok1={} ok2={} retries={} refused={} max attempts of one request on bad={}",
            bad.hits(),
            ok1.hits(),
            ok2.hits(),
            retries,
            svc.budget().refused(),
            bad.max_per_request()
        );
        assert_eq!(bad.max_per_request(), 1, "a request reached the failing backend twice");
        assert!(bad.hits() > 0, "round robin sends first attempts to every backend");
        // Each visit to the failing backend cost exactly one retry, and nothing else did.
        assert_eq!(retries, bad.hits());
        assert_eq!(ok1.hits() + ok2.hits(), 1000);
    })
    .await;
}

/// The same with a backend that hangs up without answering: endpoint errors are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_are_retried_elsewhere() {
    within(Duration::from_secs(60), async {
        let ok1 = Backend::start("ok1", Mode::Ok).await;
        let ok2 = Backend::start("ok2", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Close).await;
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .layer(balancer([ok1.endpoint(), bad.endpoint(), ok2.endpoint()]));
        let results: Vec<_> = futures::stream::iter(0..300u64)
            .map(|i| {
                let svc = svc.clone();
                async move { send(&svc, get(i)).await }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok((StatusCode::OK, _)))));
        eprintln!(
            "300 GETs, one backend hanging up: bad={} retries={} max attempts of one request on bad={}",
            bad.hits(),
            svc.budget().retries(),
            bad.max_per_request()
        );
        assert!(bad.hits() > 0);
        assert_eq!(bad.max_per_request(), 1);
        assert_eq!(ok1.hits() + ok2.hits(), 300);
    })
    .await;
}

/// A POST is sent once: the failing backend's 503 reaches the client. A policy of your own
/// can allow it (here: with an idempotency key).
#[tokio::test]
async fn post_is_not_retried_by_default() {
    within(Duration::from_secs(30), async {
        let ok1 = Backend::start("ok1", Mode::Ok).await;
        let ok2 = Backend::start("ok2", Mode::Ok).await;
        let bad = Backend::start("bad", Mode::Unavailable).await;
        let endpoints = [ok1.endpoint(), bad.endpoint(), ok2.endpoint()];
        let svc = FailoverLayer::new(RetryBudget::unlimited()).layer(balancer(endpoints.clone()));
        let mut unavailable = 0;
        for i in 0..30 {
            let (status, _) = send(&svc, post(i)).await.unwrap();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                unavailable += 1;
            }
        }
        eprintln!(
            "30 POSTs: 503s={unavailable} bad hits={} retries={}",
            bad.hits(),
            svc.budget().retries()
        );
        assert_eq!(
            unavailable, 10,
            "round robin: every third POST reaches the failing backend"
        );
        assert_eq!(bad.hits(), 10);
        assert_eq!(
            ok1.hits() + ok2.hits() + bad.hits(),
            30,
            "each POST sent once"
        );
        assert_eq!(svc.budget().retries(), 0);

        struct IdempotencyKey;
        impl RetryPolicy for IdempotencyKey {
            fn may_retry<B>(&self, req: &Request<B>) -> bool {
                DefaultPolicy.may_retry(req) || req.headers().contains_key("idempotency-key")
            }
        }
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .policy(IdempotencyKey)
            .layer(balancer(endpoints));
        let bad_before = bad.hits();
        for i in 100..130 {
            let mut req = post(i);
            req.headers_mut()
                .insert("idempotency-key", i.to_string().parse().unwrap());
            let (status, _) = send(&svc, req).await.unwrap();
            assert_eq!(status, StatusCode::OK);
        }
        assert!(bad.hits() > bad_before);
        assert_eq!(svc.budget().retries(), bad.hits() - bad_before);
        assert_eq!(bad.max_per_request(), 1);
    })
    .await;
}

type Streamed = UnsyncBoxBody<Bytes, Infallible>;

fn streamed(chunks: &'static [&'static str]) -> Streamed {
    let frames = chunks
        .iter()
        .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
    StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

/// A PUT whose body streams is sent once, even though PUT is idempotent; the same body
/// buffered with `ReplayBody::buffer` is retried.
#[tokio::test]
async fn streamed_body_is_not_retried_buffered_is() {
    within(Duration::from_secs(30), async {
        let bad = Backend::start("bad", Mode::Unavailable).await;
        let ok = Backend::start("ok", Mode::Ok).await;
        let svc =
            FailoverLayer::new(RetryBudget::unlimited()).layer(balancer::<ReplayBody<Streamed>>([
                bad.endpoint(),
                ok.endpoint(),
            ]));
        // Each first attempt goes to `bad`: it is the preferred endpoint while not avoided.
        let put = |id: u64, body: ReplayBody<Streamed>| {
            let mut req = Request::put("/doc")
                .header("x-request-id", id.to_string())
                .body(body)
                .unwrap();
            PickHints::of_mut(&mut req).prefer("bad".into());
            req
        };

        let (status, _) = send(&svc, put(1, ReplayBody::new(streamed(&["a", "b"]))))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "streamed: not retried"
        );
        assert_eq!((bad.hits(), ok.hits()), (1, 0));

        let body = ReplayBody::buffer(streamed(&["a", "b"]), 1024)
            .await
            .unwrap();
        let (status, text) = send(&svc, put(2, body)).await.unwrap();
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::OK, "ok"),
            "buffered: retried"
        );
        assert_eq!((bad.hits(), ok.hits()), (2, 1));
    })
    .await;
}

/// With every backend failing, a budget of one retry per ten requests (and no reserve) keeps
/// the load close to one attempt per request; without a budget it triples.
#[tokio::test]
async fn retry_budget_keeps_an_outage_from_multiplying() {
    within(Duration::from_secs(30), async {
        let backends = [
            Backend::start("b0", Mode::Unavailable).await,
            Backend::start("b1", Mode::Unavailable).await,
            Backend::start("b2", Mode::Unavailable).await,
        ];
        let total = |bs: &[Backend]| bs.iter().map(Backend::hits).sum::<u64>();
        let endpoints: Vec<_> = backends.iter().map(Backend::endpoint).collect();

        let unlimited =
            FailoverLayer::new(RetryBudget::unlimited()).layer(balancer(endpoints.clone()));
        for i in 0..20 {
            let (status, _) = send(&unlimited, get(i)).await.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let without_budget = total(&backends);
        assert_eq!(
            without_budget, 60,
            "3 attempts per request without a budget"
        );

        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
        let svc = FailoverLayer::new(budget).layer(balancer(endpoints));
        for i in 1000..1200 {
            let (status, _) = send(&svc, get(i)).await.unwrap();
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "the failure surfaces"
            );
        }
        let attempts = total(&backends) - without_budget;
        let b = svc.budget();
        eprintln!(
            "200 GETs, all backends failing: attempts={attempts} retries={} refused={}",
            b.retries(),
            b.refused()
        );
        assert_eq!(attempts, 200 + b.retries());
        assert!(
            b.retries() <= 21,
            "retries {} over 10 % of 200",
            b.retries()
        );
        assert!(b.refused() >= 170);
        for bk in &backends {
            assert!(bk.max_per_request() <= 1);
        }
    })
    .await;
}

/// A backend that never answers: each attempt on it is cut at the per-try timeout and the
/// request goes to another backend.
#[tokio::test]
async fn per_try_timeout_retries_a_hanging_backend_elsewhere() {
    within(Duration::from_secs(30), async {
        let hang = Backend::start("hang", Mode::Hang).await;
        let ok1 = Backend::start("ok1", Mode::Ok).await;
        let ok2 = Backend::start("ok2", Mode::Ok).await;
        // Far longer than an answer of the others takes, even on a busy machine: only the
        // hanging backend's attempts are cut.
        let per_try = Duration::from_secs(1);
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .per_try_timeout(per_try)
            .layer(balancer([hang.endpoint(), ok1.endpoint(), ok2.endpoint()]));
        for i in 0..9 {
            let (hang_before, started) = (hang.hits(), Instant::now());
            let (status, body) = send(&svc, get(i)).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_ne!(body, "hang");
            if hang.hits() > hang_before {
                // Timers never fire early.
                assert!(started.elapsed() >= per_try, "{:?}", started.elapsed());
            }
        }
        eprintln!(
            "9 GETs, one backend hanging: hang={} retries={}",
            hang.hits(),
            svc.budget().retries()
        );
        assert!(
            hang.hits() >= 1,
            "round robin sends first attempts to every backend"
        );
        assert_eq!(hang.max_per_request(), 1);
        assert_eq!(svc.budget().retries(), hang.hits());
    })
    .await;
}

/// When every backend hangs, the overall deadline ends the request with a timeout error that
/// a proxy answers with 504; with a per-try timeout as well, the last attempt's timeout is the
/// error, also a 504.
#[tokio::test]
async fn deadline_ends_the_request_with_a_timeout() {
    within(Duration::from_secs(30), async {
        let backends = [
            Backend::start("h0", Mode::Hang).await,
            Backend::start("h1", Mode::Hang).await,
        ];
        let endpoints: Vec<_> = backends.iter().map(Backend::endpoint).collect();

        let svc = FailoverLayer::new(RetryBudget::unlimited())
            // Long enough for the attempt to reach its backend first, on any machine.
            .deadline(Duration::from_secs(1))
            .layer(balancer(endpoints.clone()));
        let started = Instant::now();
        let err = send(&svc, get(1)).await.unwrap_err();
        let took = started.elapsed();
        let failover = err
            .downcast_ref::<failover::Error>()
            .expect("a failover error");
        assert!(failover.is_deadline() && !failover.is_timeout(), "{err:?}");
        assert_eq!(failover.attempts(), 1, "{err}");
        assert_eq!(lbkit::proxy::status_for(&*err), StatusCode::GATEWAY_TIMEOUT);
        // Timers never fire early.
        assert!(took >= Duration::from_secs(1), "{took:?}");

        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .per_try_timeout(Duration::from_millis(500))
            .deadline(Duration::from_secs(30))
            .layer(balancer(endpoints));
        let started = Instant::now();
        let err = send(&svc, get(2)).await.unwrap_err();
        let took = started.elapsed();
        let failover = err
            .downcast_ref::<failover::Error>()
            .expect("a failover error");
        assert!(failover.is_timeout() && !failover.is_deadline(), "{err:?}");
        assert_eq!(failover.attempts(), 2, "{err}");
        let lb = err
            .source()
            .and_then(|e| e.downcast_ref::<lbkit::Error>())
            .expect("the last attempt's endpoint error");
        assert!(lb.is_endpoint(), "{err:?}");
        assert_eq!(lbkit::proxy::status_for(&*err), StatusCode::GATEWAY_TIMEOUT);
        // Two endpoints, each tried once (for a per-try timeout each); the third attempt finds
        // none left.
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert_eq!(backends.iter().map(Backend::hits).sum::<u64>(), 3);
    })
    .await;
}

/// With fewer endpoints than attempts, the request ends when none is left untried: the last
/// failure comes back at once (here the second backend's 503), not a hang or a synthetic error.
#[tokio::test]
async fn no_endpoint_left_returns_the_last_failure() {
    within(Duration::from_secs(30), async {
        let b0 = Backend::start("b0", Mode::Unavailable).await;
        let b1 = Backend::start("b1", Mode::Unavailable).await;
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .max_attempts(5)
            .layer(balancer([b0.endpoint(), b1.endpoint()]));
        for i in 0..10 {
            let (status, body) = send(&svc, get(i)).await.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(body == "b0" || body == "b1");
        }
        assert_eq!(
            (b0.hits(), b1.hits()),
            (10, 10),
            "each request tried both, once each"
        );
        assert_eq!(b0.max_per_request().max(b1.max_per_request()), 1);

        // Both down: no endpoint at all, at once.
        let bal = balancer::<Full<Bytes>>([b0.endpoint(), b1.endpoint()]);
        let pool = bal.pool().clone();
        pool.set_down(&"b0".into(), true);
        pool.set_down(&"b1".into(), true);
        let svc = FailoverLayer::new(RetryBudget::unlimited()).layer(bal);
        let err = send(&svc, get(99)).await.unwrap_err();
        let failover = err
            .downcast_ref::<failover::Error>()
            .expect("a failover error");
        assert!(
            failover.is_no_endpoint() && failover.attempts() == 0,
            "{err:?}"
        );
        assert!(err.source().unwrap().is::<lbkit::Error>());
        assert_eq!(
            lbkit::proxy::status_for(&*err),
            StatusCode::SERVICE_UNAVAILABLE
        );
    })
    .await;
}

/// Two primaries and a backup: the backup gets nothing while a primary is healthy, takes all
/// traffic when both primaries are down, and hands back as soon as one recovers.
#[tokio::test]
async fn backups_take_over_when_primaries_are_down_and_hand_back() {
    within(Duration::from_secs(30), async {
        let p0 = Backend::start("p0", Mode::Ok).await;
        let p1 = Backend::start("p1", Mode::Ok).await;
        let backup = Backend::start("backup", Mode::Ok).await;
        let bal = balancer::<Full<Bytes>>([
            p0.endpoint(),
            p1.endpoint(),
            backup.endpoint().with_tier(Tier::BACKUP),
        ]);
        let pool = bal.pool().clone();
        let svc = FailoverLayer::new(RetryBudget::default()).layer(bal);
        let served = |n: u64| {
            let svc = svc.clone();
            async move {
                let mut names = HashMap::<String, u32>::new();
                for i in 0..n {
                    let (status, body) = send(&svc, get(i)).await.unwrap();
                    assert_eq!(status, StatusCode::OK);
                    *names.entry(body).or_default() += 1;
                }
                let mut names: Vec<_> = names.into_iter().collect();
                names.sort();
                names
            }
        };

        assert_eq!(served(20).await, [("p0".into(), 10), ("p1".into(), 10)]);

        // One primary down: the other takes everything, the backup still nothing.
        pool.set_down(&"p0".into(), true);
        assert_eq!(served(10).await, [("p1".into(), 10)]);

        // Both down: the backup takes over.
        pool.set_down(&"p1".into(), true);
        assert_eq!(served(10).await, [("backup".into(), 10)]);

        // A primary recovers: traffic goes back at once.
        pool.set_down(&"p1".into(), false);
        assert_eq!(served(10).await, [("p1".into(), 10)]);
        pool.set_down(&"p0".into(), false);
        assert_eq!(served(20).await, [("p0".into(), 10), ("p1".into(), 10)]);
        assert_eq!(backup.hits(), 10);

        // A primary that fails its requests (without being marked down) is failed over to the
        // other primary, not to the backup.
        p0.set_mode(Mode::Unavailable);
        assert_eq!(served(10).await, [("p1".into(), 10)]);
        assert_eq!(backup.hits(), 10);
    })
    .await;
}

/// With the budget spent, a failed attempt ends the request with a typed error that says so
/// (a proxy answers 503), after exactly one attempt.
#[tokio::test]
async fn a_spent_budget_ends_the_request_with_a_typed_error() {
    within(Duration::from_secs(30), async {
        let close = Backend::start("close", Mode::Close).await;
        let ok = Backend::start("ok", Mode::Ok).await;
        // No reserve and no share: every retry is refused.
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
        let svc = FailoverLayer::new(budget).layer(balancer([close.endpoint(), ok.endpoint()]));
        for i in 0..4 {
            let mut req = get(i);
            PickHints::of_mut(&mut req).prefer("close".into());
            let err = send(&svc, req).await.unwrap_err();
            let failover = err
                .downcast_ref::<failover::Error>()
                .expect("a failover error");
            assert!(failover.is_budget_exhausted(), "{err:?}");
            assert!(!failover.is_deadline() && !failover.is_no_endpoint());
            assert!(!failover.is_timeout() && !failover.is_not_sent(), "{err:?}");
            assert_eq!(failover.attempts(), 1);
            assert_eq!(
                err.to_string(),
                "retry budget exhausted after 1 attempt",
                "{err:?}"
            );
            let lb = err.source().and_then(|e| e.downcast_ref::<lbkit::Error>());
            assert_eq!(lb.and_then(|e| e.endpoint_id()).unwrap().as_str(), "close");
            assert_eq!(
                lbkit::proxy::status_for(&*err),
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        assert_eq!((close.hits(), ok.hits()), (4, 0));
        assert_eq!((svc.budget().retries(), svc.budget().refused()), (0, 4));
    })
    .await;
}

/// A back-off that would end after the deadline ends the request at once with the deadline
/// error instead of sleeping: here the back-off is two hours and the deadline one, so a sleep
/// would hang the test.
#[tokio::test]
async fn a_backoff_past_the_deadline_ends_the_request_at_once() {
    within(Duration::from_secs(30), async {
        let bad = Backend::start("bad", Mode::Unavailable).await;
        let ok = Backend::start("ok", Mode::Ok).await;
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(Backoff::fixed(Duration::from_secs(7_200)))
            .deadline(Duration::from_secs(3_600))
            .layer(balancer([bad.endpoint(), ok.endpoint()]));
        let mut req = get(1);
        PickHints::of_mut(&mut req).prefer("bad".into());
        let err = send(&svc, req).await.unwrap_err();
        let failover = err
            .downcast_ref::<failover::Error>()
            .expect("a failover error");
        assert!(failover.is_deadline(), "{err:?}");
        assert_eq!(failover.attempts(), 1);
        assert_eq!(err.to_string(), "deadline passed after 1 attempt");
        assert_eq!(lbkit::proxy::status_for(&*err), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!((bad.hits(), ok.hits()), (1, 0));
        // No retry was made, so none was taken from the budget.
        assert_eq!(svc.budget().retries(), 0);

        // Without back-off the same request is retried at once and served.
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(Backoff::none())
            .deadline(Duration::from_secs(3_600))
            .layer(balancer([bad.endpoint(), ok.endpoint()]));
        let mut req = get(2);
        PickHints::of_mut(&mut req).prefer("bad".into());
        assert_eq!(send(&svc, req).await.unwrap().0, StatusCode::OK);
        assert_eq!((bad.hits(), ok.hits()), (2, 1));
    })
    .await;
}

/// Runs `test` on a current-thread runtime whose clock is paused (it jumps to the next timer
/// whenever nothing else can run), on its own thread, failing if it has not finished after
/// `limit` of real time.
fn on_paused_clock<F>(limit: Duration, test: impl FnOnce() -> F + Send + 'static)
where
    F: Future<Output = ()>,
{
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(test());
        let _ = done.send(());
    });
    finished
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}

/// The back-off is slept between attempts, within the configured range: on a paused clock,
/// where time moves only by the timers that run, a request's time is the sum of its back-offs.
/// Counted per retry: two failing backends before a working one make two retries per request.
#[test]
fn backoff_is_slept_between_attempts_within_its_range() {
    on_paused_clock(Duration::from_secs(60), || async {
        let b0 = Backend::start("b0", Mode::Unavailable).await;
        let b1 = Backend::start("b1", Mode::Unavailable).await;
        let ok = Backend::start("ok", Mode::Ok).await;
        let endpoints = [b0.endpoint(), b1.endpoint(), ok.endpoint()];
        // Each request tries b0, then b1 (the preferred and then the next by round robin is
        // not certain), so count the retries rather than assume them.
        let request = |i| {
            let mut req = get(i);
            PickHints::of_mut(&mut req).prefer("b0".into());
            req
        };

        // A fixed back-off: exactly its delay per retry.
        let fixed = Duration::from_secs(5);
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(Backoff::fixed(fixed))
            .layer(balancer(endpoints.clone()));
        for i in 0..6 {
            let retries_before = svc.budget().retries();
            let started = tokio::time::Instant::now();
            assert_eq!(send(&svc, request(i)).await.unwrap().0, StatusCode::OK);
            let took = started.elapsed();
            let retries = (svc.budget().retries() - retries_before) as u32;
            assert!((1..=2).contains(&retries), "{retries}");
            // Timers round up to the millisecond.
            assert!(took >= fixed * retries, "{retries} retries in {took:?}");
            assert!(
                took <= fixed * retries + Duration::from_millis(10),
                "{took:?}"
            );
        }

        // Envoy's default, scaled up to seconds so the range is plain: the first retry waits
        // under 1 s, the second under 3 s, each drawn at random; over 20 requests the draws
        // fill their range.
        let backoff = Backoff::exponential(Duration::from_secs(1), Duration::from_secs(10));
        let svc = FailoverLayer::new(RetryBudget::unlimited())
            .backoff(backoff)
            .layer(balancer(endpoints));
        let (mut longest, mut shortest) = (Duration::ZERO, Duration::MAX);
        for i in 100..120 {
            let retries_before = svc.budget().retries();
            let started = tokio::time::Instant::now();
            assert_eq!(send(&svc, request(i)).await.unwrap().0, StatusCode::OK);
            let took = started.elapsed();
            let retries = (svc.budget().retries() - retries_before) as u32;
            let most: Duration = (1..=retries).map(|n| backoff.max_delay(n)).sum();
            assert!(
                took <= most + Duration::from_millis(10),
                "{retries} retries in {took:?}"
            );
            longest = longest.max(took);
            shortest = shortest.min(took);
        }
        // Jittered: not all the same (20 draws from a 1-4 s range).
        assert!(
            longest > shortest + Duration::from_millis(100),
            "{shortest:?}..{longest:?}"
        );
        assert_eq!(ok.hits(), 26);
        assert_eq!(b0.max_per_request().max(b1.max_per_request()), 1);
    });
}
