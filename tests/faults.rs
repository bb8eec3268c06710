//! Faults under load, through the whole proxy stack on 127.0.0.1: a real hyper server serving
//! `ErrorResponseLayer` -> `FailoverLayer` -> `Balancer::http()` -> `Forward`, with a
//! `HealthChecker` and `OutlierDetection` on the pool, and clients sending real HTTP to it
//! (see `common::fault`).
//!
//! - a backend killed under load: no client sees a failure, and the dead backend is out of
//!   rotation within the configured detection time;
//! - a rolling restart: every in-flight request completes, no client sees a failure;
//! - backends that hang, answer slowly, reset: 504/502 within the timeouts, others unaffected;
//! - every backend down: 503 at once, memory flat, traffic back when one returns.
//!
//! The figures (requests, failures, detection times, memory) are printed: run with
//! `cargo test --test faults -- --nocapture` to see them. The tests take turns (one lock), so
//! that their timings do not disturb each other on a small machine.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fault::{
    exchange, get, rss_kib, start_server_at, Fault, FaultServer, Load, Outcome, ProxyStack,
    StackConfig,
};
use common::{endpoints, http_client, start_server, start_servers, wait_until, within};
use http::{Request, StatusCode};
use http_body_util::Full;
use lbkit::endpoint::Health;
use lbkit::health::HealthChange;
use lbkit::EndpointId;

/// One test at a time: their load and timings would disturb each other on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Scheduling slack on a noisy machine, on top of configured times.
const SLACK: Duration = Duration::from_millis(250);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_under_load_fails_no_request() {
    let _turn = SERIAL.lock().await;
    within(Duration::from_secs(20), async {
        let mut servers = start_servers(3).await;
        let config = StackConfig::default();
        let bound = config.check_detection_bound();
        let proxy = ProxyStack::start(endpoints(&servers), config).await;
        let mut events = proxy.pool.health_events();

        let load = Load::start(proxy.addr, 8, 1_000_000, Duration::ZERO);
        load.wait_for(1_000, Duration::from_secs(5)).await;

        // Kill s1 abruptly: its listener and every open connection go at once.
        let victim = servers.remove(1);
        let id = victim.name().to_owned();
        let sent_at_kill = load.sent();
        let killed = Instant::now();
        drop(victim);

        // The first mark that takes it out of rotation, and the active checker's mark.
        let mut out_of_rotation: Option<(Duration, HealthChange)> = None;
        let mut marked_down: Option<Duration> = None;
        let watch_until = killed + bound + SLACK;
        while marked_down.is_none() && Instant::now() < watch_until {
            let left = watch_until.saturating_duration_since(Instant::now());
            let Ok(Ok(ev)) = tokio::time::timeout(left, events.recv()).await else {
                break;
            };
            if ev.endpoint().as_str() != id || ev.health() == Health::Healthy {
                continue;
            }
            let after = ev.at().saturating_duration_since(killed);
            out_of_rotation.get_or_insert((after, ev.change().clone()));
            if matches!(ev.change(), HealthChange::Down { .. }) {
                marked_down = Some(after);
            }
        }
        // Keep the load on well past detection: nothing may reach the dead backend any more.
        load.wait_for(2_000, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let attempts_after_detection_window = proxy.taps.calls(&id);
        load.wait_for(500, Duration::from_secs(5)).await;
        let report = load.stop().await;
        let last_attempt = proxy
            .taps
            .last_call(&id)
            .map(|t| t.saturating_duration_since(killed));

        let (detection, how) = out_of_rotation.expect("the dead backend was never taken out");
        eprintln!(
            "kill 1 of 3 under load: {} requests ({} after the kill), {} failures; \
             out of rotation {:.1} ms after the kill ({}), marked down by the TCP check after \
             {:?} ms (bound {:.0} ms); last attempt to it {:?} ms after the kill; {} retries; \
             p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; answers {:?}",
            report.sent,
            report.sent - sent_at_kill,
            report.failures,
            ms(detection),
            match how {
                HealthChange::Ejected { .. } => "ejected by outlier detection",
                _ => "marked down by the health check",
            },
            marked_down.map(|d| ms(d).round()),
            ms(bound),
            last_attempt.map(|d| ms(d).round()),
            proxy.budget.retries(),
            ms(report.percentile(50.0)),
            ms(report.percentile(99.0)),
            ms(report.percentile(100.0)),
            report.by_backend,
        );
        assert!(
            report.failures == 0,
            "{} client-visible failures: {:?}",
            report.failures,
            report.sample_failures()
        );
        assert!(
            detection <= bound + SLACK,
            "out of rotation after {detection:?}, configured bound {bound:?}"
        );
        assert!(
            marked_down.is_some(),
            "the health check did not mark it down within {bound:?}"
        );
        assert_eq!(
            proxy.taps.calls(&id),
            attempts_after_detection_window,
            "attempts still reached the dead backend after detection"
        );
        assert!(
            last_attempt.is_some_and(|t| t <= bound + SLACK),
            "last attempt {last_attempt:?} after the kill"
        );
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
        assert!(report.ok > 2_500, "too little load: {}", report.ok);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_completes_every_request() {
    let _turn = SERIAL.lock().await;
    within(Duration::from_secs(20), async {
        let mut servers = start_servers(3).await;
        // Requests take a while, so that each backend has some in flight when it goes.
        for s in &servers {
            s.set_delay(Duration::from_millis(20));
        }
        let proxy = ProxyStack::start(endpoints(&servers), StackConfig::default()).await;
        let load = Load::start(proxy.addr, 8, 1_000_000, Duration::ZERO);
        load.wait_for(200, Duration::from_secs(5)).await;

        let mut states = Vec::new();
        let mut lines = Vec::new();
        for old in std::mem::take(&mut servers) {
            let (name, addr) = (old.name().to_owned(), old.addr());
            let id = EndpointId::new(name.as_str());
            let state = proxy.pool.state(&id).expect("endpoint in the pool");
            // Out of discovery first: no new request, the ones in flight finish (drain).
            let in_flight = state.in_flight();
            assert!(proxy.pool.remove(&id));
            let removed = Instant::now();
            wait_until(Duration::from_secs(5), "the drain", || {
                state.in_flight() == 0
            })
            .await;
            let drained = removed.elapsed();
            // Then stop it and start it again on its port; back into discovery.
            drop(old);
            let new_server = start_server_at(&name, addr).await;
            new_server.set_delay(Duration::from_millis(20));
            proxy.pool.insert(new_server.endpoint());
            let back = Instant::now();
            wait_until(
                Duration::from_secs(5),
                "traffic to the restarted backend",
                || new_server.hits() > 0,
            )
            .await;
            lines.push(format!(
                "{name}: {in_flight} in flight at removal, drained in {:.1} ms, {} errors, \
                 traffic again {:.1} ms after re-adding",
                ms(drained),
                state.errors(),
                ms(back.elapsed())
            ));
            states.push((name, in_flight, state));
            servers.push(new_server);
        }
        load.wait_for(300, Duration::from_secs(5)).await;
        let report = load.stop().await;
        for s in &servers {
            states.push((
                s.name().to_owned(),
                0,
                proxy.pool.state(&s.name().into()).expect("in the pool"),
            ));
        }
        let errors: u64 = states.iter().map(|(_, _, s)| s.errors()).sum();
        let in_flight_at_removal: u64 = states.iter().map(|(_, n, _)| n).sum();
        eprintln!(
            "rolling restart of 3 backends under load: {} requests, {} failures, {} retries, \
             {} endpoint errors, {} requests in flight at the removals all completed; \
             p50 {:.1} ms, max {:.1} ms\n  {}",
            report.sent,
            report.failures,
            proxy.budget.retries(),
            errors,
            in_flight_at_removal,
            ms(report.percentile(50.0)),
            ms(report.percentile(100.0)),
            lines.join("\n  ")
        );
        assert!(
            report.failures == 0,
            "client-visible failures: {:?}",
            report.sample_failures()
        );
        // The forwarding client pools keep-alive connections per address. A backend restarted
        // on its port can leave an idle connection to its old process in that pool for a
        // moment (until the client reads its close), and a request sent on it then fails and
        // is retried elsewhere: at most one per restart, never seen by the client.
        assert!(
            errors <= 3,
            "{errors} requests failed at an endpoint (more than one per restart)"
        );
        assert_eq!(
            proxy.budget.retries(),
            errors,
            "each failure at an endpoint was retried once"
        );
        assert!(
            in_flight_at_removal > 0,
            "no request was in flight at any removal: the drain was not exercised"
        );
        for (name, _, state) in &states {
            assert_eq!(state.in_flight(), 0, "{name}: in-flight count leaked");
        }
        assert_eq!(proxy.pool.in_flight(), 0);
    })
    .await;
}

/// A `POST` (never retried) aimed at one endpoint.
fn post_to(addr: std::net::SocketAddr, endpoint: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/"))
        .header("x-route", endpoint)
        .body(Full::new(Bytes::from_static(b"order=1")))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_slow_and_resetting_backends_get_504_and_502_in_time() {
    let _turn = SERIAL.lock().await;
    within(Duration::from_secs(20), async {
        let ok = start_server("ok").await;
        let hang = FaultServer::start("hang", Fault::Hang);
        let slow = start_server("slow").await;
        slow.set_delay(Duration::from_secs(3));
        let reset = FaultServer::start("reset", Fault::ResetBeforeHead);
        let midbody = FaultServer::start("midbody", Fault::ResetMidBody);
        let config = StackConfig {
            forward_timeout: Duration::from_secs(1),
            per_try_timeout: Duration::from_millis(300),
            deadline: Duration::from_millis(1_500),
            max_attempts: 4,
            // Generous, so that every GET may go round the faulty endpoints until they are
            // ejected (the default budget is tested elsewhere).
            budget: Some((Duration::from_secs(10), 200, 1.0)),
            outlier_failures: Some(3),
            max_ejection_percent: 75,
            ..StackConfig::default()
        };
        let per_try = config.per_try_timeout;
        let proxy = ProxyStack::start(
            vec![
                ok.endpoint(),
                hang.endpoint(),
                slow.endpoint(),
                reset.endpoint(),
                midbody.endpoint(),
            ],
            config.clone(),
        )
        .await;
        // Envoy's panic mode would send traffic to ejected endpoints once most are out; this
        // test wants to see them stay out.
        proxy.pool.set_panic_threshold(0);
        let addr = proxy.addr;

        // Phase 1: requests aimed at each faulty backend (POSTs: never retried), while
        // other clients keep using the healthy one.
        let healthy = Load::start_with(4, 1_000_000, Duration::ZERO, move || {
            let mut req = get(addr);
            req.headers_mut()
                .insert("x-route", http::HeaderValue::from_static("ok"));
            req
        });
        healthy.wait_for(100, Duration::from_secs(5)).await;
        let mut aimed = Vec::new();
        for target in ["hang", "slow", "reset", "midbody", "ok"] {
            for _ in 0..2 {
                aimed.push(tokio::spawn(async move {
                    let client = http_client();
                    let started = Instant::now();
                    let outcome =
                        exchange(&client, post_to(addr, target), Duration::from_secs(5)).await;
                    (target, outcome, started.elapsed())
                }));
            }
        }
        let mut results: HashMap<&str, Vec<(Outcome, Duration)>> = HashMap::new();
        for t in aimed {
            let (target, outcome, took) = t.await.expect("client task");
            results.entry(target).or_default().push((outcome, took));
        }
        let healthy = healthy.stop().await;
        let mut line = String::new();
        for target in ["hang", "slow", "reset", "midbody", "ok"] {
            for (outcome, took) in &results[target] {
                line.push_str(&format!(
                    "\n  POST to {target}: {} in {:.0} ms",
                    outcome.label(),
                    ms(*took)
                ));
            }
        }
        eprintln!(
            "faulty backends, phase 1 (aimed POSTs; per-try timeout {:.0} ms):{line}\n  \
             meanwhile {} GETs to the healthy backend, {} failures, p50 {:.1} ms, p99 {:.1} ms, \
             max {:.1} ms",
            ms(per_try),
            healthy.sent,
            healthy.failures,
            ms(healthy.percentile(50.0)),
            ms(healthy.percentile(99.0)),
            ms(healthy.percentile(100.0)),
        );
        for (target, want) in [
            ("hang", StatusCode::GATEWAY_TIMEOUT),
            ("slow", StatusCode::GATEWAY_TIMEOUT),
            ("reset", StatusCode::BAD_GATEWAY),
        ] {
            for (outcome, took) in &results[target] {
                assert!(
                    matches!(outcome, Outcome::Status(s, _) if *s == want),
                    "{target}: {outcome:?}, expected {want}"
                );
                let limit = if want == StatusCode::GATEWAY_TIMEOUT {
                    assert!(
                        *took >= per_try,
                        "{target}: answered before the timeout: {took:?}"
                    );
                    per_try + SLACK
                } else {
                    SLACK
                };
                assert!(
                    *took <= limit,
                    "{target}: {took:?}, expected within {limit:?}"
                );
            }
        }
        // The head was already on its way to the client when the backend reset: the client
        // sees the body break (never a short body passed off as complete).
        for (outcome, took) in &results["midbody"] {
            assert_eq!(*outcome, Outcome::BodyError(StatusCode::OK), "midbody");
            assert!(*took <= SLACK, "midbody: {took:?}");
        }
        for (outcome, _) in &results["ok"] {
            assert_eq!(*outcome, Outcome::Ok("ok".into()));
        }
        assert!(
            healthy.failures == 0,
            "the healthy backend's clients saw failures: {:?}",
            healthy.sample_failures()
        );
        assert!(
            healthy.percentile(50.0) < Duration::from_millis(50),
            "the healthy backend slowed down"
        );

        // Phase 2: plain GETs over every endpoint (the mid-body one taken out of discovery:
        // once a response head is on its way, nothing can retry it). Failover hides the
        // faults, and outlier detection ejects the faulty endpoints.
        assert!(proxy.pool.remove(&"midbody".into()));
        let mut events = proxy.pool.health_events();
        let started = Instant::now();
        let load = Load::start(addr, 8, 1_000_000, Duration::ZERO);
        let mut ejected: HashMap<String, Duration> = HashMap::new();
        let until = started + Duration::from_secs(6);
        while ejected.len() < 3 && Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(Ok(ev)) = tokio::time::timeout(left, events.recv()).await else {
                break;
            };
            if matches!(ev.change(), HealthChange::Ejected { .. }) {
                ejected
                    .entry(ev.endpoint().to_string())
                    .or_insert_with(|| ev.at().saturating_duration_since(started));
            }
        }
        let ejected_sent = load.sent();
        load.wait_for(1_000, Duration::from_secs(5)).await;
        let report = load.stop().await;
        let mut ejections: Vec<_> = ejected.iter().collect();
        ejections.sort();
        eprintln!(
            "faulty backends, phase 2 (GETs with failover): {} requests, {} failures, {} retries, \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; ejected (ms after start): {:?}; \
             {} requests after the ejections; answers {:?}",
            report.sent,
            report.failures,
            proxy.budget.retries(),
            ms(report.percentile(50.0)),
            ms(report.percentile(99.0)),
            ms(report.percentile(100.0)),
            ejections
                .iter()
                .map(|(k, v)| (k.as_str(), ms(**v).round()))
                .collect::<Vec<_>>(),
            report.sent - ejected_sent,
            report.by_backend,
        );
        assert!(
            report.failures == 0,
            "client-visible failures: {:?}",
            report.sample_failures()
        );
        assert!(
            report.percentile(100.0) <= config.deadline + SLACK,
            "a request outlived the deadline"
        );
        for id in ["hang", "slow", "reset"] {
            assert!(ejected.contains_key(id), "{id} was never ejected");
        }
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
        drop((hang, slow, reset, midbody, ok));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_gives_503_at_once_then_recovers() {
    let _turn = SERIAL.lock().await;
    within(Duration::from_secs(20), async {
        let servers = start_servers(3).await;
        let config = StackConfig::default();
        let proxy = ProxyStack::start(endpoints(&servers), config.clone()).await;
        let warm = Load::start(proxy.addr, 4, 100, Duration::ZERO)
            .finish()
            .await;
        assert!(warm.failures == 0);

        let addrs: Vec<_> = servers
            .iter()
            .map(|s| (s.name().to_owned(), s.addr()))
            .collect();
        let killed = Instant::now();
        drop(servers);
        // Requests meanwhile let outlier detection eject one of them too.
        let during = Load::start(proxy.addr, 4, 1_000_000, Duration::from_millis(2));
        let pool = proxy.pool.clone();
        wait_until(
            Duration::from_secs(3),
            "every backend out of rotation",
            || pool.endpoints().iter().all(|(_, s)| !s.is_healthy()),
        )
        .await;
        let all_out = killed.elapsed();
        let during = during.stop().await;

        // Warm up the 503 path, then measure memory across two rounds of many more.
        let clients = 8u64;
        let round = 12_000u64;
        let warmup = Load::start(
            proxy.addr,
            clients as usize,
            2_000 / clients,
            Duration::ZERO,
        )
        .finish()
        .await;
        let rss_before = rss_kib();
        let first = Load::start(
            proxy.addr,
            clients as usize,
            round / clients,
            Duration::ZERO,
        )
        .finish()
        .await;
        let rss_between = rss_kib();
        let report = Load::start(
            proxy.addr,
            clients as usize,
            round / clients,
            Duration::ZERO,
        )
        .finish()
        .await;
        let rss_after = rss_kib();

        // Bring back the one outlier detection ejected, if any (the hardest case), or s0.
        let ejected = proxy
            .pool
            .endpoints()
            .into_iter()
            .find(|(_, s)| s.is_ejected())
            .map(|(e, _)| e.id().to_string());
        let (name, addr) = addrs
            .iter()
            .find(|(n, _)| Some(n) == ejected.as_ref())
            .unwrap_or(&addrs[0])
            .clone();
        let back = start_server_at(&name, addr).await;
        let restarted = Instant::now();
        let client = http_client();
        let mut attempts_until_back = 0u64;
        let resumed = loop {
            attempts_until_back += 1;
            if let Outcome::Ok(body) =
                exchange(&client, get(proxy.addr), Duration::from_secs(2)).await
            {
                assert_eq!(body, name);
                break restarted.elapsed();
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "traffic did not resume within 5 s of {name} coming back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let after = Load::start(proxy.addr, 4, 100, Duration::ZERO)
            .finish()
            .await;

        eprintln!(
            "all backends down: out of rotation {:.0} ms after the kill ({} requests meanwhile: \
             {:?}); then 2 x {round} requests: {:?} and {:?}, p50 {:.2} ms, p99 {:.2} ms, \
             max {:.1} ms; RSS {rss_before} KiB before, {rss_between} KiB after the first \
             round ({:+} KiB), {rss_after} KiB after the second ({:+} KiB; {} warm-up \
             requests first); {name} (ejected: {}) back: traffic resumed {:.0} ms after its \
             restart ({} tries); then {} requests, {} failures",
            ms(all_out),
            during.sent,
            during.failure_kinds,
            first.failure_kinds,
            report.failure_kinds,
            ms(report.percentile(50.0)),
            ms(report.percentile(99.0)),
            ms(report.percentile(100.0)),
            rss_between as i64 - rss_before as i64,
            rss_after as i64 - rss_between as i64,
            warmup.sent,
            ejected.is_some(),
            ms(resumed),
            attempts_until_back,
            after.sent,
            after.failures,
        );
        for r in [&first, &report] {
            assert_eq!(r.sent, round);
            assert_eq!(
                r.failure_kinds.get("503").copied(),
                Some(round),
                "not all 503: {:?}",
                r.failure_kinds
            );
        }
        // At once: no request waits for a timeout or a connect.
        assert!(report.percentile(99.0) < Duration::from_millis(50));
        assert!(report.percentile(100.0) < config.per_try_timeout);
        assert!(
            rss_after.saturating_sub(rss_before) < 10 * 1024,
            "memory grew by {} KiB over {} requests",
            rss_after - rss_before,
            2 * round
        );
        let bound = config.check_detection_bound() + config.check_interval * config.rise + SLACK;
        assert!(
            resumed <= bound,
            "resumed after {resumed:?}, expected within {bound:?}"
        );
        assert!(after.failures == 0, "{:?}", after.sample_failures());
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
        drop(back);
    })
    .await;
}

// Regression tests of the two library fixes the fault tests above led to.

#[tokio::test]
async fn an_attempt_given_up_on_counts_as_a_failure_of_its_endpoint() {
    use tower::ServiceExt;
    // An endpoint that never answers; the caller gives up after 20 ms (as a failover per-try
    // timeout does). Counted as a success, the abandon reset outlier detection's count and a
    // hanging backend was never ejected.
    let balancer = lbkit::Balancer::new(["hang"], lbkit::strategy::RoundRobin::new(), |_| {
        tower::service_fn(|_req: Request<()>| async {
            std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>().await
        })
    })
    .http();
    let state = balancer.pool().state(&"hang".into()).expect("endpoint");
    for n in 1..=3 {
        let call = balancer.clone().oneshot(Request::new(()));
        assert!(tokio::time::timeout(Duration::from_millis(20), call)
            .await
            .is_err());
        assert_eq!(state.in_flight(), 0);
        assert_eq!(state.errors(), n);
        assert_eq!(state.consecutive_failures(), n as u32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_that_returns_is_no_longer_kept_out_by_its_ejection() {
    use lbkit::health::{HealthChecker, TcpCheck};
    within(Duration::from_secs(10), async {
        let server = start_server("s0").await;
        let (endpoint, addr) = (server.endpoint(), server.addr());
        drop(server);
        let pool = lbkit::Pool::new(lbkit::strategy::RoundRobin::new(), |e: &lbkit::Endpoint| {
            e.id().clone()
        });
        pool.insert(endpoint);
        let id: EndpointId = "s0".into();
        // Ejected by outlier detection for 30 s (as its death's failures would), and down.
        pool.set_ejected(&id, true);
        let checker = HealthChecker::new(TcpCheck::new())
            .interval(Duration::from_millis(50))
            .rise(2)
            .spawn(&pool);
        let state = pool.state(&id).expect("endpoint");
        wait_until(Duration::from_secs(3), "marked down", || state.is_down()).await;
        // It comes back: the checker brings it up, and lifts the ejection with it.
        let back = start_server_at("s0", addr).await;
        let restarted = Instant::now();
        wait_until(Duration::from_secs(3), "healthy again", || {
            state.is_healthy()
        })
        .await;
        eprintln!(
            "ejected and down, restarted: healthy again after {:.0} ms",
            ms(restarted.elapsed())
        );
        assert_eq!(pool.health(&id), Some(Health::Healthy));
        assert!(pool.pick(None).is_some());
        checker.abort();
        drop(back);
    })
    .await;
}
