//! Health against real local servers: hyper HTTP backends and raw tokio TCP listeners on
//! 127.0.0.1, stopped and restarted for real.
//!
//! Every test uses short intervals (50 ms), and none depends on how fast the machine is: the
//! health checks are counted (a backend is marked down after exactly `fall` failed checks, back
//! up after exactly `rise` passed ones), the waits are for health events, and the time limits
//! only catch hangs; a few hard lower bounds remain (timers never fire early). Run with
//! `--nocapture` to see the measured detection times.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{dead_addr, listen_reserved, next_event, rebind, wait_until, CheckLog, Logged, HANG};
use futures::FutureExt;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::endpoint::Health;
use lbkit::health::{
    check_fn, CheckErrorKind, HealthChange, HealthChecker, HttpCheck, OutlierDetection, SlowStart,
    TcpCheck,
};
use lbkit::hints::PickHints;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, BoxError, Endpoint, EndpointId, Pool};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tower::{Service, ServiceExt};

/// Bound on every test; only catches a hang (each wait inside has its own, [`HANG`]).
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Check interval of the tests.
const INTERVAL: Duration = Duration::from_millis(50);
/// Jitter of the tests.
const JITTER: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Servers.

/// What an HTTP backend does and counts.
struct BackendState {
    name: String,
    /// The status of `/work` responses.
    status: AtomicU16,
    /// `/work` requests served.
    hits: AtomicUsize,
}

/// A hyper HTTP/1 backend on 127.0.0.1 that can be stopped (listener and every connection
/// closed) and started again on the same port (reserved for the test process: connecting to
/// it is refused while the backend is stopped).
struct HttpBackend {
    addr: SocketAddr,
    state: Arc<BackendState>,
    task: Option<JoinHandle<()>>,
}

impl HttpBackend {
    async fn start(name: &str) -> Self {
        let (listener, addr) = listen_reserved();
        let state = Arc::new(BackendState {
            name: name.to_string(),
            status: AtomicU16::new(200),
            hits: AtomicUsize::new(0),
        });
        let task = Some(tokio::spawn(serve_http(listener, state.clone())));
        HttpBackend { addr, state, task }
    }

    fn id(&self) -> EndpointId {
        EndpointId::from(self.addr)
    }

    fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Closes the listener and every open connection, and waits until they are gone.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the same port again.
    async fn restart(&mut self) {
        let listener = rebind(self.addr).await;
        self.task = Some(tokio::spawn(serve_http(listener, self.state.clone())));
    }
}

/// Accepts connections until aborted; aborting drops every connection too.
async fn serve_http(listener: TcpListener, state: Arc<BackendState>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let state = state.clone();
                async move {
                    let res = if req.uri().path() == "/health" {
                        http::Response::new(Full::new(Bytes::from("ok")))
                    } else {
                        state.hits.fetch_add(1, Ordering::SeqCst);
                        let mut res =
                            http::Response::new(Full::new(Bytes::from(state.name.clone())));
                        *res.status_mut() =
                            http::StatusCode::from_u16(state.status.load(Ordering::SeqCst))
                                .unwrap();
                        res
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        // Forget finished connections.
        while conns.try_join_next().is_some() {}
    }
}

/// A raw TCP backend: accepts and closes connections (`hold: false`), or accepts and holds
/// them without ever answering (`hold: true`, a hung server). Its port is reserved, as
/// [`HttpBackend`]'s.
struct TcpBackend {
    addr: SocketAddr,
    hold: bool,
    task: Option<JoinHandle<()>>,
}

impl TcpBackend {
    async fn start(hold: bool) -> Self {
        let (listener, addr) = listen_reserved();
        TcpBackend {
            addr,
            hold,
            task: Some(tokio::spawn(serve_tcp(listener, hold))),
        }
    }

    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        let listener = rebind(self.addr).await;
        self.task = Some(tokio::spawn(serve_tcp(listener, self.hold)));
    }
}

async fn serve_tcp(listener: TcpListener, hold: bool) {
    let mut held = Vec::new();
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            if hold {
                held.push(stream);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Balancer and helpers.

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A round-robin HTTP balancer over `addrs`, each endpoint's service a pooled hyper client.
fn http_balancer(
    addrs: &[SocketAddr],
) -> Balancer<
    impl Service<
            http::Request<Empty<Bytes>>,
            Response = http::Response<Incoming>,
            Error = impl Into<BoxError>,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    RoundRobin,
    lbkit::balance::CompleteOnBody,
> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let make = move |ep: &Endpoint| {
        let client = client.clone();
        let addr = ep.socket_addr().expect("test endpoints have addresses");
        tower::service_fn(move |mut req: http::Request<Empty<Bytes>>| {
            *req.uri_mut() = format!("http://{addr}/work").parse().unwrap();
            client.request(req)
        })
    };
    Balancer::new(addrs.iter().copied(), RoundRobin::new(), make)
}

/// Sends one request; returns who served it and the status.
async fn send<S>(
    balancer: &Balancer<S, RoundRobin, lbkit::balance::CompleteOnBody>,
) -> Result<(EndpointId, u16), lbkit::Error>
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<Incoming>> + Clone,
    S::Error: Into<BoxError>,
{
    let mut req = http::Request::new(Empty::new());
    let record = PickHints::of_mut(&mut req).record_pick();
    let res = balancer.clone().oneshot(req).await?;
    let by = record.endpoint().expect("the balancer records its pick");
    let status = res.status().as_u16();
    // Read the body to its end, so the request completes.
    let _ = res.into_body().collect().await;
    Ok((by, status))
}

fn is_down(c: &HealthChange) -> bool {
    matches!(c, HealthChange::Down { .. })
}

fn is_up(c: &HealthChange) -> bool {
    matches!(c, HealthChange::Up)
}

fn is_ejected(c: &HealthChange) -> bool {
    matches!(c, HealthChange::Ejected { .. })
}

fn is_returned(c: &HealthChange) -> bool {
    matches!(c, HealthChange::Returned)
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

// ---------------------------------------------------------------------------------------------
// Active checks.

/// TCP check: a stopped backend is marked down after exactly `fall` failed checks, and returns
/// after exactly `rise` passed checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_marks_a_stopped_backend_down_and_back_up() {
    bounded(async {
        let (fall, rise) = (3u32, 2u32);
        let mut backends = Vec::new();
        for _ in 0..3 {
            backends.push(TcpBackend::start(false).await);
        }
        let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
        pool.extend(backends.iter().map(|b| Endpoint::from(b.addr)));
        let mut events = pool.health_events();
        let checks = CheckLog::default();
        let _checker = HealthChecker::new(Logged::new(TcpCheck::new(), &checks))
            .interval(INTERVAL)
            .jitter(JITTER)
            .timeout(Duration::from_secs(5))
            .fall(fall)
            .rise(rise)
            .spawn(&pool);
        // Every endpoint passes its first check: from then on it takes `fall` failed checks in
        // a row to mark one down (the first failed check of a new endpoint marks it at once).
        wait_until(HANG, "a passed check of every endpoint", || {
            backends
                .iter()
                .all(|b| checks.passed(&EndpointId::from(b.addr)) > 0)
        })
        .await;
        let victim = EndpointId::from(backends[1].addr);
        assert_eq!(pool.health(&victim), Some(Health::Healthy));

        let stopped = Instant::now();
        backends[1].stop().await;
        let down = next_event(&mut events, &victim, is_down).await;
        let failed = checks.between(&victim, false, stopped, down.at());
        println!(
            "tcp: marked down {:?} after the stop, after {failed} failed checks (fall {fall} \
             × interval {INTERVAL:?})",
            down.at().saturating_duration_since(stopped)
        );
        assert_eq!(failed, fall as usize, "down after {failed} failed checks");
        let reason = match down.change() {
            HealthChange::Down { reason } => reason.clone().expect("a check's reason"),
            _ => unreachable!(),
        };
        assert_eq!(reason.kind(), CheckErrorKind::Refused, "{reason}");
        assert_eq!(down.health(), Health::Down);
        assert_eq!(pool.health(&victim), Some(Health::Down));
        for _ in 0..50 {
            let (c, _) = pool.pick(None).unwrap();
            assert_ne!(c.id(), &victim, "a down endpoint was picked");
        }

        let restarted = Instant::now();
        backends[1].restart().await;
        let up = next_event(&mut events, &victim, is_up).await;
        let passed = checks.between(&victim, true, restarted, up.at());
        println!(
            "tcp: back up {:?} after the restart, after {passed} passed checks (rise {rise})",
            up.at().saturating_duration_since(restarted)
        );
        assert_eq!(passed, rise as usize, "up after {passed} passed checks");
        assert_eq!(pool.health(&victim), Some(Health::Healthy));
    })
    .await;
}

/// The most a ramping endpoint of weight 1 weighs `elapsed` into its ramp (on the ramp's scale
/// of ten, where the others weigh 10): its weight only climbs.
fn ramp_cap(slow_start: &SlowStart, elapsed: Duration) -> u32 {
    match slow_start.share_after(elapsed) {
        Some(share) => ((10.0 * share).round() as u32).clamp(1, 10),
        None => 10,
    }
}

/// HTTP check: a stopped backend gets no new requests once marked down; started again, it
/// returns after `rise` checks and ramps up under slow start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_takes_a_stopped_backend_out_and_ramps_it_back_in() {
    bounded(async {
        let (fall, rise) = (2u32, 2u32);
        let window = Duration::from_secs(2);
        let mut backends = Vec::new();
        for name in ["a", "b", "c"] {
            backends.push(HttpBackend::start(name).await);
        }
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let balancer = http_balancer(&addrs);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let checks = CheckLog::default();
        let check = HttpCheck::get("/health").expect_body("ok");
        let _checker = HealthChecker::new(Logged::new(check, &checks))
            .interval(INTERVAL)
            .down_interval(INTERVAL / 2)
            .jitter(JITTER)
            .timeout(Duration::from_secs(5))
            .fall(fall)
            .rise(rise)
            .spawn(pool);
        let slow_start = SlowStart::new(window);
        let _slow = slow_start.spawn(pool);
        wait_until(HANG, "a passed check of every backend", || {
            backends.iter().all(|b| checks.passed(&b.id()) > 0)
        })
        .await;
        for _ in 0..30 {
            send(&balancer).await.unwrap();
        }
        assert!(
            backends.iter().all(|b| b.hits() == 10),
            "round robin over three"
        );

        let b = backends[1].id();
        let stopped = Instant::now();
        backends[1].stop().await;
        let down = next_event(&mut events, &b, is_down).await;
        let failed = checks.between(&b, false, stopped, down.at());
        println!(
            "http: marked down {:?} after the stop, after {failed} failed checks (fall {fall} \
             × {INTERVAL:?})",
            down.at().saturating_duration_since(stopped)
        );
        assert_eq!(failed, fall as usize, "down after {failed} failed checks");

        // No new requests go to the down backend, and none fails.
        let before = backends[1].hits();
        for _ in 0..60 {
            let (by, status) = send(&balancer).await.expect("healthy endpoints remain");
            assert_ne!(by, b);
            assert_eq!(status, 200);
        }
        assert_eq!(backends[1].hits(), before);

        let restarted = Instant::now();
        backends[1].restart().await;
        let up = next_event(&mut events, &b, is_up).await;
        let passed = checks.between(&b, true, restarted, up.at());
        println!(
            "http: back up {:?} after the restart, after {passed} passed checks (rise {rise} \
             × {:?})",
            up.at().saturating_duration_since(restarted),
            INTERVAL / 2
        );
        assert_eq!(passed, rise as usize, "up after {passed} passed checks");
        assert_eq!(up.health(), Health::Healthy);

        // Slow start: the returning endpoint starts at a tenth of the others' weight, and has
        // no more than its ramp allows by the time it is read (however long that took).
        let snap = pool.snapshot();
        let ramped_for = up.at().elapsed();
        let weight = |id: &EndpointId| {
            snap.eligible()
                .iter()
                .find(|c| c.id() == id)
                .map(|c| c.weight())
                .unwrap()
        };
        let (wb, wa) = (weight(&b), weight(&backends[0].id()));
        let cap = ramp_cap(&slow_start, ramped_for);
        println!("slow start: weights {ramped_for:?} after coming back: b {wb}, a {wa}");
        assert!(
            wb <= cap,
            "b weighs {wb} after {ramped_for:?}, more than {cap} of 10"
        );
        if ramped_for < window {
            assert_eq!(wa, 10, "the others' weights on the ramp's scale");
        }
        drop(snap);

        // Early in the ramp, b gets a small share: no more than its weights allow (each
        // snapshot's cycle spreads it evenly, give or take one per snapshot; the ramp
        // republishes every tenth of its window).
        let before = backends[1].hits();
        let sending = Instant::now();
        for _ in 0..42 {
            send(&balancer).await.unwrap();
        }
        let early = (backends[1].hits() - before) as u64;
        let (cap, took) = (ramp_cap(&slow_start, up.at().elapsed()), sending.elapsed());
        let snapshots = 2 + (took.as_nanos() / (window / 10).as_nanos()) as u64;
        let bound = (42 * u64::from(cap)).div_ceil(20 + u64::from(cap)) + snapshots;
        println!("slow start: b served {early} of 42 requests early in the ramp (at most {bound})");
        assert!(
            early <= bound,
            "b got {early} of 42 while ramping up to a weight of {cap} of 10 (in {took:?})"
        );

        // After the window, b has its full weight again and a fair share.
        wait_until(HANG, "the ramp to end", || {
            pool.snapshot().eligible().iter().all(|c| c.weight() == 1)
        })
        .await;
        let ramp = up.at().elapsed();
        println!("slow start: ramp over {ramp:?} after coming back");
        assert!(ramp >= window, "the ramp ended early, after {ramp:?}");
        assert!(!pool.state(&b).unwrap().is_warming_up());
        let before = backends[1].hits();
        for _ in 0..30 {
            send(&balancer).await.unwrap();
        }
        assert_eq!(
            backends[1].hits() - before,
            10,
            "a full third after the ramp"
        );
    })
    .await;
}

/// A check that hangs is timed out and counts as a failure of kind `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_checks_are_timed_out() {
    bounded(async {
        // An HTTP check against a server that accepts but never answers.
        let hung = TcpBackend::start(true).await;
        let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
        pool.insert(Endpoint::from(hung.addr));
        let mut events = pool.health_events();
        let check_timeout = Duration::from_millis(150);
        let started = Instant::now();
        let task = HealthChecker::new(HttpCheck::get("/health"))
            .interval(INTERVAL)
            .jitter(Duration::ZERO)
            .timeout(check_timeout)
            .spawn(&pool);
        let down = next_event(&mut events, &EndpointId::from(hung.addr), is_down).await;
        let took = down.at().saturating_duration_since(started);
        println!("hung HTTP server: marked down after {took:?} (timeout {check_timeout:?})");
        // Timers never fire early.
        assert!(took >= check_timeout, "{took:?}");
        match down.change() {
            HealthChange::Down { reason: Some(r) } => {
                assert_eq!(r.kind(), CheckErrorKind::Timeout, "{r}")
            }
            other => panic!("unexpected change {other:?}"),
        }
        task.abort();

        // A custom check that never returns.
        let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
        pool.insert(Endpoint::new("stuck"));
        let mut events = pool.health_events();
        let _task = HealthChecker::new(check_fn(|_ep: Endpoint| async {
            std::future::pending::<Result<(), BoxError>>().await
        }))
        .interval(INTERVAL)
        .timeout(Duration::from_millis(100))
        .spawn(&pool);
        let down = next_event(&mut events, &"stuck".into(), is_down).await;
        match down.change() {
            HealthChange::Down { reason: Some(r) } => {
                assert_eq!(r.kind(), CheckErrorKind::Timeout, "{r}")
            }
            other => panic!("unexpected change {other:?}"),
        }
    })
    .await;
}

/// Custom checks: a closure and a tower service, with typed errors kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_checks_decide_health() {
    bounded(async {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
        pool.extend([Endpoint::new("x"), Endpoint::new("y")]);
        let mut events = pool.health_events();
        let flag = healthy.clone();
        let checks = CheckLog::default();
        let probe = tower::service_fn(move |ep: Endpoint| {
            let ok = flag.load(Ordering::SeqCst) || ep.id() != "x";
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(lbkit::health::CheckError::status(503))
                }
            }
        });
        // A tower service as a check: call a clone per check.
        let check = check_fn(move |ep: Endpoint| probe.clone().oneshot(ep));
        let _task = HealthChecker::new(Logged::new(check, &checks))
            .interval(INTERVAL)
            .fall(2)
            .rise(1)
            .spawn(&pool);
        let x = EndpointId::from("x");
        // x passes a check first: from then on it takes two failed ones to mark it down.
        wait_until(HANG, "a passed check of x", || checks.passed(&x) > 0).await;
        let failing = Instant::now();
        healthy.store(false, Ordering::SeqCst);
        let down = next_event(&mut events, &x, is_down).await;
        match down.change() {
            HealthChange::Down { reason: Some(r) } => {
                assert_eq!(r.kind(), CheckErrorKind::Status(503))
            }
            other => panic!("unexpected change {other:?}"),
        }
        assert_eq!(checks.between(&x, false, failing, down.at()), 2, "fall 2");
        assert_eq!(pool.health(&"y".into()), Some(Health::Healthy));
        let passing = Instant::now();
        healthy.store(true, Ordering::SeqCst);
        let up = next_event(&mut events, &x, is_up).await;
        assert_eq!(checks.between(&x, true, passing, up.at()), 1, "rise 1");
    })
    .await;
}

/// The checker follows endpoints added and removed at run time, and ends with the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_follows_the_pool_and_ends_with_it() {
    bounded(async {
        let live = TcpBackend::start(false).await;
        let live_id = EndpointId::from(live.addr);
        let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
        pool.insert(Endpoint::from(live.addr));
        let mut events = pool.health_events();
        let checks = CheckLog::default();
        let task = HealthChecker::new(Logged::new(TcpCheck::new(), &checks))
            .interval(INTERVAL)
            .spawn(&pool);
        // Added later, dead from the start (its port reserved, nothing listening): its first
        // failed check marks it down.
        let gone = dead_addr().await;
        let dead = EndpointId::from(gone);
        let added = Instant::now();
        pool.insert(Endpoint::from(gone));
        let down = next_event(&mut events, &dead, is_down).await;
        println!(
            "dead endpoint added at run time marked down after {:?}",
            down.at().saturating_duration_since(added)
        );
        assert_eq!(checks.between(&dead, false, added, down.at()), 1);
        assert_eq!(checks.passed(&dead), 0);

        // Removed: its checks stop (one may have been under way), while the others go on.
        assert!(pool.remove(&dead));
        let live_checks = |n: usize| {
            let target = checks.checks(&live_id) + n;
            let checks = checks.clone();
            let id = live_id.clone();
            move || checks.checks(&id) >= target
        };
        wait_until(
            HANG,
            "three more checks of the live endpoint",
            live_checks(3),
        )
        .await;
        let dead_checks = checks.checks(&dead);
        wait_until(
            HANG,
            "three more checks of the live endpoint",
            live_checks(3),
        )
        .await;
        assert_eq!(
            checks.checks(&dead),
            dead_checks,
            "a removed endpoint is still checked"
        );
        assert_eq!(pool.health(&live_id), Some(Health::Healthy));

        let detector = OutlierDetection::new().spawn(&pool);
        let slow = SlowStart::new(Duration::from_secs(10)).spawn(&pool);
        // They keep running while the pool lives (the checker goes on checking meanwhile).
        wait_until(HANG, "two more checks of the live endpoint", live_checks(2)).await;
        assert!(!task.is_finished() && !detector.is_finished() && !slow.is_finished());
        drop(pool);
        timeout(HANG, async {
            task.await;
            detector.await;
            slow.await;
        })
        .await
        .expect("health tasks end when their pool is dropped");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Passive health.

/// A backend answering 500 is ejected after `consecutive_failures` of them, gets no requests
/// while ejected, and returns after the ejection time; the next ejection lasts twice as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_backend_for_a_while() {
    bounded(async {
        let base = Duration::from_secs(1);
        let mut backends = Vec::new();
        for name in ["a", "b", "c"] {
            backends.push(HttpBackend::start(name).await);
        }
        backends[2].set_status(500);
        let bad = backends[2].id();
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let balancer = http_balancer(&addrs);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let _detector = OutlierDetection::new()
            .consecutive_failures(3)
            .base_ejection_time(base)
            .spawn(pool);

        // Round robin: the bad backend gets every third request; its third 500 ejects it
        // (by a task that the third failure wakes).
        while backends[2].hits() < 3 {
            send(&balancer).await.unwrap();
        }
        let ejected = next_event(&mut events, &bad, is_ejected).await;
        let ejected_at = ejected.at();
        match ejected.change() {
            HealthChange::Ejected {
                consecutive_failures,
                duration,
            } => {
                // No request was sent after the third 500: the detector saw exactly three.
                assert_eq!(*consecutive_failures, 3, "ejected after exactly three 500s");
                assert_eq!(*duration, Some(base));
            }
            _ => unreachable!(),
        }
        assert_eq!(pool.state(&bad).expect("in the pool").errors(), 3);

        // While ejected it gets no request: any of these it serves came after its return.
        let mut served = Vec::new();
        for _ in 0..30 {
            let (by, status) = send(&balancer).await.unwrap();
            served.push((by, status, Instant::now()));
        }
        let back = next_event(&mut events, &bad, is_returned).await;
        let out_for = back.at().saturating_duration_since(ejected_at);
        println!("outlier: ejected for {out_for:?} (base ejection time {base:?})");
        for (by, status, done) in &served {
            if *by == bad {
                assert!(*done > back.at(), "a request reached the ejected backend");
            } else {
                assert_eq!(*status, 200);
            }
        }
        // (`at` is read just after the detector's clock; allow for that.)
        assert!(
            out_for + Duration::from_millis(5) >= base,
            "returned early: {out_for:?}"
        );
        assert_eq!(back.health(), Health::Healthy);

        // Still failing: ejected again, once it has failed three more times, for twice as long
        // (unless it spent a whole base ejection time back in the pool first, which forgives
        // one ejection).
        let again = loop {
            match events.try_recv() {
                Ok(e) if e.endpoint() == &bad && is_ejected(e.change()) => break e,
                Ok(_) | Err(broadcast::error::TryRecvError::Empty) => {}
                Err(e) => panic!("health events: {e}"),
            }
            // Three 500s since the return (they were all after it, see above) wake the
            // detector.
            if backends[2].hits() >= 6 {
                break next_event(&mut events, &bad, is_ejected).await;
            }
            send(&balancer).await.unwrap();
        };
        let back_for = again.at().saturating_duration_since(back.at());
        let slack = Duration::from_millis(10);
        let want = match again.change() {
            HealthChange::Ejected { duration, .. } => duration.expect("a duration"),
            _ => unreachable!(),
        };
        println!("outlier: ejected again after {back_for:?} back, for {want:?}");
        if back_for + slack < base {
            assert_eq!(want, base * 2, "back for {back_for:?}");
        } else if back_for > base + slack {
            assert_eq!(want, base, "back for {back_for:?}: one ejection forgiven");
        } else {
            assert!(want == base || want == base * 2, "{want:?}");
        }
    })
    .await;
}

/// At most `max_ejection_percent` of the endpoints are ejected at once, but at least one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_at_most_its_share() {
    bounded(async {
        let mut backends = Vec::new();
        for name in ["a", "b", "c"] {
            backends.push(HttpBackend::start(name).await);
        }
        backends[1].set_status(503);
        backends[2].set_status(500);
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let balancer = http_balancer(&addrs);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let _detector = OutlierDetection::new()
            .consecutive_failures(2)
            .base_ejection_time(Duration::from_secs(600))
            .spawn(pool);
        for _ in 0..60 {
            send(&balancer).await.unwrap();
        }
        // One of the two is ejected; the detector passes over the other (and resets its count)
        // each time it reaches the threshold again, the last time after the last request.
        let first = timeout(HANG, async {
            loop {
                let e = events.recv().await.expect("health events");
                if is_ejected(e.change()) {
                    break e.endpoint().clone();
                }
            }
        })
        .await
        .expect("an ejection");
        let other = if first == backends[1].id() {
            backends[2].id()
        } else {
            backends[1].id()
        };
        let other_state = pool.state(&other).expect("in the pool");
        wait_until(HANG, "the detector to pass over the other one", || {
            other_state.consecutive_failures() < 2
        })
        .await;
        let ejected: Vec<_> = [backends[1].id(), backends[2].id()]
            .into_iter()
            .filter(|id| pool.health(id) == Some(Health::Ejected))
            .collect();
        assert_eq!(
            ejected,
            [first],
            "10 % of three is less than one: one may go"
        );
        assert_eq!(pool.health(&backends[0].id()), Some(Health::Healthy));
    })
    .await;
}

/// A user-chosen classifier: only 503 counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_uses_the_chosen_failure_statuses() {
    bounded(async {
        let mut backends = Vec::new();
        for name in ["a", "b", "c"] {
            backends.push(HttpBackend::start(name).await);
        }
        backends[1].set_status(500);
        backends[2].set_status(503);
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let balancer = http_balancer(&addrs);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let _detector = OutlierDetection::new()
            .consecutive_failures(2)
            .failure_status(|s| s == http::StatusCode::SERVICE_UNAVAILABLE)
            .spawn(pool);
        for _ in 0..12 {
            send(&balancer).await.unwrap();
        }
        next_event(&mut events, &backends[2].id(), is_ejected).await;
        assert_eq!(pool.health(&backends[1].id()), Some(Health::Healthy));
        assert_eq!(pool.state(&backends[1].id()).unwrap().errors(), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// No healthy endpoint, panic threshold.

/// With every endpoint down, a request fails at once with the typed "no endpoint" error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_fails_at_once_with_no_endpoint() {
    bounded(async {
        let mut backends = Vec::new();
        for name in ["a", "b"] {
            backends.push(HttpBackend::start(name).await);
        }
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        let balancer = http_balancer(&addrs);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let _checker = HealthChecker::new(TcpCheck::new())
            .interval(INTERVAL)
            .fall(1)
            .spawn(pool);
        for b in &mut backends {
            b.stop().await;
        }
        // Both marked down (their ports stay reserved: refused), in either order.
        let mut down = std::collections::HashSet::new();
        timeout(HANG, async {
            while down.len() < backends.len() {
                let e = events.recv().await.expect("health events");
                if is_down(e.change()) {
                    down.insert(e.endpoint().clone());
                }
            }
        })
        .await
        .expect("both marked down");
        // At once: the request fails on its first poll, with nothing to wait for.
        let err = balancer
            .clone()
            .oneshot(http::Request::new(Empty::new()))
            .now_or_never()
            .expect("failed at once")
            .expect_err("no endpoint");
        assert!(err.is_no_endpoint(), "{err:?}");
    })
    .await;
}

/// Below the panic threshold, every endpoint of the tier is eligible; with none healthy,
/// none is.
#[tokio::test]
async fn panic_threshold_spreads_over_all_endpoints() {
    let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
    pool.extend(["a", "b", "c", "d"].map(Endpoint::new));
    assert_eq!(
        pool.panic_threshold(),
        0,
        "off by default: healthy endpoints only"
    );
    pool.set_panic_threshold(50);
    pool.set_down(&"a".into(), true);
    pool.set_down(&"b".into(), true);
    let snap = pool.snapshot();
    assert!(!snap.is_panic(), "2 of 4 healthy is not below 50 %");
    assert_eq!(snap.eligible().len(), 2);
    pool.set_ejected(&"c".into(), true);
    let snap = pool.snapshot();
    assert!(snap.is_panic(), "1 of 4 healthy is below 50 %");
    assert_eq!(snap.eligible().len(), 4);
    pool.set_panic_threshold(0);
    let snap = pool.snapshot();
    assert!(!snap.is_panic());
    assert_eq!(snap.eligible().len(), 1);
    pool.set_panic_threshold(50);
    pool.set_down(&"d".into(), true);
    let snap = pool.snapshot();
    assert!(
        !snap.is_panic(),
        "no healthy endpoint: no panic, nothing eligible"
    );
    assert!(snap.eligible().is_empty());
    assert!(pool.pick(None).is_none());

    let strict = Pool::builder(RoundRobin::new())
        .panic_threshold(80)
        .build(|ep: &Endpoint| ep.id().clone());
    strict.extend(["a", "b", "c", "d", "e"].map(Endpoint::new));
    strict.set_down(&"a".into(), true);
    assert!(!strict.snapshot().is_panic(), "4 of 5 is 80 %");
    strict.set_down(&"b".into(), true);
    assert!(strict.snapshot().is_panic());
}

/// Slow start also ramps endpoints added to a running pool, and stopping it ends the ramps.
#[tokio::test]
async fn slow_start_ramps_new_endpoints_and_stops_cleanly() {
    let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
    pool.extend(["a", "b"].map(Endpoint::new));
    let slow = SlowStart::new(Duration::from_secs(60)).spawn(&pool);
    pool.insert(Endpoint::new("c").with_weight(2));
    let snap = pool.snapshot();
    let w: Vec<_> = snap.eligible().iter().map(|c| c.weight()).collect();
    assert_eq!(
        w,
        [10, 10, 2],
        "c starts at 10 % of its weight 2, on a ×10 scale"
    );
    drop(snap);
    slow.abort();
    let _ = slow.await;
    let snap = pool.snapshot();
    let w: Vec<_> = snap.eligible().iter().map(|c| c.weight()).collect();
    assert_eq!(
        w,
        [1, 1, 2],
        "without slow start every endpoint has its own weight"
    );
}

/// Healthy-only by default: with two of three endpoints down, every pick goes to the one that
/// is up (with Envoy's 50 % panic threshold, two thirds would go to the dead ones).
#[test]
fn by_default_only_healthy_endpoints_are_picked() {
    let pool = Pool::new(RoundRobin::new(), |ep: &Endpoint| ep.id().clone());
    pool.extend(["a", "b", "c"].map(Endpoint::new));
    pool.set_down(&"a".into(), true);
    pool.set_ejected(&"b".into(), true);
    for _ in 0..30 {
        let (candidate, _) = pool.pick(None).expect("one endpoint is up");
        assert_eq!(candidate.id().as_str(), "c");
    }
    pool.set_panic_threshold(50);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        seen.insert(pool.pick(None).expect("panic spreads").0.id().to_string());
    }
    assert_eq!(seen.len(), 3, "in panic every endpoint is picked: {seen:?}");
}

/// Sends `n` requests; how many each endpoint served (all must succeed).
async fn served_by<S>(
    balancer: &Balancer<S, RoundRobin, lbkit::balance::CompleteOnBody>,
    n: usize,
) -> std::collections::BTreeMap<EndpointId, usize>
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<Incoming>> + Clone,
    S::Error: Into<BoxError>,
{
    let mut by = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (id, status) = send(balancer).await.expect("a healthy endpoint answers");
        assert_eq!(status, 200);
        *by.entry(id).or_default() += 1;
    }
    by
}

/// `start_down`: every endpoint is out of rotation until its first check passes (one pass,
/// not `rise`): a backend failing its check gets no request; once it passes, it gets its
/// share. So does an endpoint added while the checks run (as discovery adds them): it is
/// down in the very snapshot that adds it. Once the checker stops, new endpoints join up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_down_keeps_endpoints_out_until_their_first_check_passes() {
    bounded(async {
        let ready = HttpBackend::start("ready").await;
        let starting = HttpBackend::start("starting").await;
        starting.set_status(503);
        let balancer = http_balancer(&[ready.addr, starting.addr]);
        let pool = balancer.pool();
        let mut events = pool.health_events();
        let checks = CheckLog::default();
        let spawned = Instant::now();
        let checker = HealthChecker::new(Logged::new(HttpCheck::get("/work"), &checks))
            .interval(INTERVAL)
            .jitter(JITTER)
            .rise(3)
            .start_down(true)
            .spawn(pool);

        // Held at once, before any check has run.
        assert_eq!(pool.health(&ready.id()), Some(Health::Down));
        assert_eq!(pool.health(&starting.id()), Some(Health::Down));
        let err = send(&balancer)
            .await
            .expect_err("nothing is up before a check passes");
        assert!(err.is_no_endpoint(), "{err:?}");

        // The ready backend is up after its first passed check.
        let up = next_event(&mut events, &ready.id(), is_up).await;
        assert_eq!(checks.between(&ready.id(), true, spawned, up.at()), 1);

        // The starting one fails its checks and gets no request.
        wait_until(HANG, "three failed checks of the starting backend", || {
            checks.failed(&starting.id()) >= 3
        })
        .await;
        let by = served_by(&balancer, 20).await;
        assert_eq!(by.get(&ready.id()), Some(&20), "{by:?}");
        assert_eq!(pool.health(&starting.id()), Some(Health::Down));

        // It passes: it gets its share.
        starting.set_status(200);
        next_event(&mut events, &starting.id(), is_up).await;
        let by = served_by(&balancer, 20).await;
        assert_eq!(by.get(&starting.id()), Some(&10), "{by:?}");

        // An endpoint added while the checks run is down from the start, gets nothing while
        // it fails its checks, then its share.
        let late = HttpBackend::start("late").await;
        late.set_status(503);
        assert!(pool.insert(Endpoint::from(late.addr)));
        assert_eq!(pool.health(&late.id()), Some(Health::Down));
        assert_eq!(pool.snapshot().position(&late.id()), None);
        wait_until(HANG, "two failed checks of the added backend", || {
            checks.failed(&late.id()) >= 2
        })
        .await;
        let by = served_by(&balancer, 30).await;
        assert_eq!(by.get(&late.id()), None, "{by:?}");
        late.set_status(200);
        next_event(&mut events, &late.id(), is_up).await;
        let by = served_by(&balancer, 30).await;
        assert_eq!(by.get(&late.id()), Some(&10), "{by:?}");

        // Without the checker, endpoints join up again.
        checker.abort();
        wait_until(HANG, "the checker to stop", || checker.is_finished()).await;
        let other = HttpBackend::start("other").await;
        assert!(pool.insert(Endpoint::from(other.addr)));
        assert_eq!(pool.health(&other.id()), Some(Health::Healthy));
    })
    .await;
}

/// By default a new endpoint is in rotation at once (the checker's first failed check takes
/// a dead one out).
#[tokio::test]
async fn by_default_a_new_endpoint_is_up_before_its_first_check() {
    let backend = HttpBackend::start("new").await;
    let balancer = http_balancer(&[]);
    let pool = balancer.pool();
    let _checker = HealthChecker::new(HttpCheck::get("/work"))
        .interval(Duration::from_secs(3600))
        .jitter(Duration::from_secs(3600))
        .spawn(pool);
    assert!(pool.insert(Endpoint::from(backend.addr)));
    assert_eq!(pool.health(&backend.id()), Some(Health::Healthy));
    let (by, status) = bounded(send(&balancer)).await.expect("served");
    assert_eq!((by, status), (backend.id(), 200));
}
