//! Faults under load, through the whole proxy stack on 127.0.0.1: a real hyper server serving
//! `ErrorResponseLayer` -> `FailoverLayer` -> `Balancer` -> `Forward`, with a
//! `HealthChecker` and `OutlierDetection` on the pool, and clients sending real HTTP to it
//! (see `common::fault`).
//!
//! - a backend killed under load: no client sees a failure, the health check marks it down
//!   after exactly `fall` failed checks, and no attempt reaches it after that;
//! - a rolling restart: every in-flight request completes, no client sees a failure;
//! - backends that hang, answer slowly, reset: 504/502, others unaffected, and the faulty ones
//!   ejected and then left alone;
//! - every backend down: 503 without an attempt to reach any, memory flat, traffic back when
//!   one returns, after exactly `rise` passed checks.
//!
//! Nothing here depends on how fast the machine is: the load is counted in requests, health
//! in check rounds, traffic in attempts seen by the endpoint services, and the time limits
//! only catch hangs. The figures (requests, failures, times, memory) are printed: run with
//! `cargo test --test faults -- --nocapture` to see them. The load tests take turns (one
//! lock): each keeps a small machine busy on its own.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fault::{
    exchange, get, rss_kib, start_server_at, Fault, FaultServer, Load, Outcome, ProxyStack,
    StackConfig,
};
use common::{
    endpoints, http_client, next_event, start_server, start_servers, wait_until, within, HANG,
};
use http::{Request, StatusCode};
use http_body_util::Full;
use lbkit::endpoint::Health;
use lbkit::health::HealthChange;
use lbkit::EndpointId;

/// One load test at a time: each keeps two cores busy on its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on a whole test; only catches a hang (each wait inside has its own, [`HANG`]).
const LIMIT: Duration = Duration::from_secs(180);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn is_down(c: &HealthChange) -> bool {
    matches!(c, HealthChange::Down { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_under_load_fails_no_request() {
    let _turn = SERIAL.lock().await;
    within(LIMIT, async {
        let mut servers = start_servers(3).await;
        let config = StackConfig::default();
        let proxy = ProxyStack::start(endpoints(&servers), config.clone()).await;
        let mut events = proxy.pool.health_events();
        // Every backend passes a check first: from then on the health check needs `fall`
        // failed checks in a row to mark one down (the first failed check of a new endpoint
        // marks it down at once).
        wait_until(HANG, "a passed check of every backend", || {
            servers
                .iter()
                .all(|s| proxy.checks.passed(&EndpointId::from(s.name())) > 0)
        })
        .await;

        let load = Load::start(proxy.addr, 8, 1_000_000, Duration::ZERO);
        load.wait_for(1_000, HANG).await;

        // Kill s1 abruptly: its listener and every open connection go at once. Its port stays
        // reserved: connecting to it is refused from now on.
        let victim = servers.remove(1);
        let id = EndpointId::from(victim.name());
        let state = proxy.pool.state(&id).expect("s1 in the pool");
        let sent_at_kill = load.sent();
        let killed = Instant::now();
        drop(victim);

        // Out of rotation: maybe ejected by outlier detection first, in any case marked down
        // by the health check.
        let mut first_out = None;
        let down = loop {
            let ev = next_event(&mut events, &id, |c| !c.is_recovery()).await;
            first_out.get_or_insert_with(|| ev.clone());
            if is_down(ev.change()) {
                break ev;
            }
        };
        let first_out = first_out.expect("an event");
        let failed_checks = proxy.checks.between(&id, false, killed, down.at());
        let passed_after_kill = proxy.checks.between(&id, true, killed, down.at());

        // Once the attempts picked before the mark have ended, no new one goes to s1: after
        // a thousand more requests, its attempt count stays put for two thousand more.
        wait_until(
            HANG,
            "the attempts to s1 picked before its mark to end",
            || state.in_flight() == 0,
        )
        .await;
        load.wait_for(1_000, HANG).await;
        let attempts_after_detection = proxy.taps.calls(id.as_str());
        load.wait_for(2_000, HANG).await;
        let report = load.stop().await;

        eprintln!(
            "kill 1 of 3 under load: {} requests ({} after the kill), {} failures; \
             out of rotation {:.1} ms after the kill ({:?}), marked down by the TCP check \
             {:.1} ms after it, after {failed_checks} failed checks (fall {}; {} passed \
             first); {attempts_after_detection} attempts to it in all; {} retries; \
             p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; answers {:?}",
            report.sent,
            report.sent - sent_at_kill,
            report.failures,
            ms(first_out.at().saturating_duration_since(killed)),
            first_out.change(),
            ms(down.at().saturating_duration_since(killed)),
            config.fall,
            passed_after_kill,
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
        if let HealthChange::Ejected {
            consecutive_failures,
            ..
        } = first_out.change()
        {
            assert!(
                *consecutive_failures >= config.outlier_failures.expect("outlier detection"),
                "ejected after {consecutive_failures} failures"
            );
        }
        assert_eq!(
            failed_checks, config.fall as usize,
            "marked down after {failed_checks} failed checks, with fall {}",
            config.fall
        );
        assert_eq!(
            proxy.taps.calls(id.as_str()),
            attempts_after_detection,
            "attempts still reached the dead backend after it was marked down"
        );
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_completes_every_request() {
    let _turn = SERIAL.lock().await;
    within(LIMIT, async {
        let mut servers = start_servers(3).await;
        // Each backend holds requests while it is taken out (see below), for as long as the
        // machine takes: no timeout may cut them short.
        let config = StackConfig {
            forward_timeout: HANG,
            per_try_timeout: HANG,
            deadline: HANG * 2,
            ..StackConfig::default()
        };
        let proxy = ProxyStack::start(endpoints(&servers), config).await;
        let load = Load::start(proxy.addr, 8, 1_000_000, Duration::ZERO);
        load.wait_for(200, HANG).await;

        let mut states = Vec::new();
        let mut lines = Vec::new();
        // Each restart may cost one retried request per connection the old process had open
        // (a pooled connection to it, reused before the client read its close).
        let mut connections_at_stops = 0;
        for old in std::mem::take(&mut servers) {
            let (name, addr) = (old.name().to_owned(), old.addr());
            let id = EndpointId::new(name.as_str());
            let state = proxy.pool.state(&id).expect("endpoint in the pool");
            // Requests in flight on it when it goes: it holds the answers until released.
            old.hold(1);
            wait_until(HANG, "requests held by the backend", || {
                state.in_flight() >= 1
            })
            .await;
            // Out of discovery first: no new request, the ones in flight finish (drain).
            assert!(proxy.pool.remove(&id));
            let in_flight = state.in_flight();
            assert!(in_flight >= 1, "{name}: nothing in flight at its removal");
            old.release();
            wait_until(HANG, "the drain", || state.in_flight() == 0).await;
            // Then stop it and start it again on its port; back into discovery.
            connections_at_stops += old.open_connections();
            drop(old);
            let new_server = start_server_at(&name, addr).await;
            proxy.pool.insert(new_server.endpoint());
            wait_until(HANG, "traffic to the restarted backend", || {
                new_server.hits() > 0
            })
            .await;
            lines.push(format!(
                "{name}: {in_flight} in flight at removal, all completed; {} errors",
                state.errors(),
            ));
            states.push((name, in_flight, state));
            servers.push(new_server);
        }
        load.wait_for(300, HANG).await;
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
             {} endpoint errors ({} connections open at the stops), {} requests in flight at \
             the removals all completed; p50 {:.1} ms, max {:.1} ms\n  {}",
            report.sent,
            report.failures,
            proxy.budget.retries(),
            errors,
            connections_at_stops,
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
        assert!(
            errors <= connections_at_stops,
            "{errors} requests failed at an endpoint, more than the {connections_at_stops} \
             connections the stopped backends had open"
        );
        assert_eq!(
            proxy.budget.retries(),
            errors,
            "each failure at an endpoint was retried once"
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
    within(LIMIT, async {
        let ok = start_server("ok").await;
        let hang = FaultServer::start("hang", Fault::Hang);
        let slow = start_server("slow").await;
        let reset = FaultServer::start("reset", Fault::ResetBeforeHead);
        let midbody = FaultServer::start("midbody", Fault::ResetMidBody);
        let config = StackConfig {
            forward_timeout: Duration::from_secs(2),
            per_try_timeout: Duration::from_secs(1),
            // Room for the three faulty attempts a GET may make before it reaches "ok".
            deadline: Duration::from_secs(10),
            max_attempts: 4,
            // Generous, so that every GET may go round the faulty endpoints until they are
            // ejected (the default budget is tested elsewhere).
            budget: Some((Duration::from_secs(10), 200, 1.0)),
            outlier_failures: Some(3),
            // Ejected endpoints stay out for the rest of the test.
            ejection_time: Duration::from_secs(600),
            max_ejection_percent: 75,
            ..StackConfig::default()
        };
        // "slow" answers long after the per-try timeout, on any machine: a timer that cannot
        // fire before its time.
        slow.set_delay(config.per_try_timeout * 5);
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
        healthy.wait_for(100, HANG).await;
        let mut aimed = Vec::new();
        for target in ["hang", "slow", "reset", "midbody", "ok"] {
            for _ in 0..2 {
                aimed.push(tokio::spawn(async move {
                    let client = http_client();
                    let started = Instant::now();
                    let outcome = exchange(&client, post_to(addr, target), HANG).await;
                    (target, outcome, started.elapsed())
                }));
            }
        }
        let mut results: HashMap<&str, Vec<(Outcome, Duration)>> = HashMap::new();
        for t in aimed {
            let (target, outcome, took) = t.await.expect("client task");
            results.entry(target).or_default().push((outcome, took));
        }
        // The healthy backend's clients go on meanwhile.
        healthy.wait_for(100, HANG).await;
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
                if want == StatusCode::GATEWAY_TIMEOUT {
                    // Timers never fire early.
                    assert!(
                        *took >= per_try,
                        "{target}: answered before the timeout: {took:?}"
                    );
                }
            }
        }
        // The head was already on its way to the client when the backend closed: the client
        // sees the body break (never a short body passed off as complete).
        for (outcome, _) in &results["midbody"] {
            assert_eq!(*outcome, Outcome::BodyError(StatusCode::OK), "midbody");
        }
        for (outcome, _) in &results["ok"] {
            assert_eq!(*outcome, Outcome::Ok("ok".into()));
        }
        assert!(
            healthy.failures == 0,
            "the healthy backend's clients saw failures: {:?}",
            healthy.sample_failures()
        );
        assert_eq!(
            healthy.by_backend.get("ok").copied(),
            Some(healthy.sent),
            "{:?}",
            healthy.by_backend
        );

        // Phase 2: plain GETs over every endpoint (the mid-body one taken out of discovery:
        // once a response head is on its way, nothing can retry it). Failover hides the
        // faults, and outlier detection ejects the faulty endpoints.
        assert!(proxy.pool.remove(&"midbody".into()));
        let mut events = proxy.pool.health_events();
        let started = Instant::now();
        let load = Load::start(addr, 8, 1_000_000, Duration::ZERO);
        let mut ejected: HashMap<String, Duration> = HashMap::new();
        while ejected.len() < 3 {
            let ev = tokio::time::timeout(HANG, events.recv())
                .await
                .unwrap_or_else(|_| panic!("ejected within {HANG:?}: only {ejected:?}"))
                .expect("health events");
            if matches!(ev.change(), HealthChange::Ejected { .. }) {
                ejected.insert(
                    ev.endpoint().to_string(),
                    ev.at().saturating_duration_since(started),
                );
            }
        }
        // Ejected, they get no attempt any more: once those picked before the ejections have
        // ended, their attempt counts stay put over a thousand requests.
        wait_until(
            HANG,
            "the attempts picked before the ejections to end",
            || {
                ["hang", "slow", "reset"].iter().all(|id| {
                    proxy
                        .pool
                        .state(&EndpointId::from(*id))
                        .is_some_and(|s| s.in_flight() == 0)
                })
            },
        )
        .await;
        let ejected_sent = load.sent();
        let calls = |id: &str| proxy.taps.calls(id);
        let attempts: Vec<u64> = ["hang", "slow", "reset"].map(calls).to_vec();
        load.wait_for(1_000, HANG).await;
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
        assert_eq!(
            ["hang", "slow", "reset"].map(calls).to_vec(),
            attempts,
            "attempts reached ejected endpoints"
        );
        for id in ["hang", "slow", "reset"] {
            assert_eq!(proxy.pool.health(&id.into()), Some(Health::Ejected), "{id}");
        }
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
        drop((hang, slow, reset, midbody, ok));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_gives_503_at_once_then_recovers() {
    let _turn = SERIAL.lock().await;
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let config = StackConfig::default();
        let proxy = ProxyStack::start(endpoints(&servers), config.clone()).await;
        let warm = Load::start(proxy.addr, 4, 100, Duration::ZERO)
            .finish()
            .await;
        assert!(warm.failures == 0, "{:?}", warm.sample_failures());

        let addrs: Vec<_> = servers
            .iter()
            .map(|s| (s.name().to_owned(), s.addr()))
            .collect();
        let ids: Vec<EndpointId> = addrs.iter().map(|(n, _)| n.as_str().into()).collect();
        let killed = Instant::now();
        // Their ports stay reserved: connecting is refused from now on.
        drop(servers);
        // Requests meanwhile let outlier detection eject one of them too.
        let during = Load::start(proxy.addr, 4, 1_000_000, Duration::from_millis(2));
        let pool = proxy.pool.clone();
        wait_until(HANG, "every backend out of rotation", || {
            pool.endpoints().iter().all(|(_, s)| !s.is_healthy())
        })
        .await;
        let all_out = killed.elapsed();
        let during = during.stop().await;
        wait_until(HANG, "the attempts picked before the marks to end", || {
            pool.in_flight() == 0
        })
        .await;

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
        let attempts: Vec<u64> = ids.iter().map(|id| proxy.taps.calls(id.as_str())).collect();
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
        let attempts_after: Vec<u64> = ids.iter().map(|id| proxy.taps.calls(id.as_str())).collect();

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
        let id = EndpointId::from(name.as_str());
        let mut events = proxy.pool.health_events();
        let restarted = Instant::now();
        let back = start_server_at(&name, addr).await;
        let up = next_event(&mut events, &id, |c| matches!(c, HealthChange::Up)).await;
        let passed_checks = proxy.checks.between(&id, true, restarted, up.at());
        let client = http_client();
        let mut attempts_until_back = 0u64;
        let resumed = loop {
            attempts_until_back += 1;
            if let Outcome::Ok(body) = exchange(&client, get(proxy.addr), HANG).await {
                assert_eq!(body, name);
                break restarted.elapsed();
            }
            assert!(
                restarted.elapsed() < HANG,
                "traffic did not resume within {HANG:?} of {name} coming back"
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
             requests first); {name} (ejected: {}) back: up after {passed_checks} passed checks \
             (rise {}), {:.0} ms after its restart, traffic resumed after {:.0} ms ({} tries); \
             then {} requests, {} failures",
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
            config.rise,
            ms(up.at().saturating_duration_since(restarted)),
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
        // At once: no request tried to reach a backend (no connect, no timeout to wait for).
        assert_eq!(
            attempts_after, attempts,
            "503s made attempts to the endpoints"
        );
        assert!(
            rss_after.saturating_sub(rss_before) < 10 * 1024,
            "memory grew by {} KiB over {} requests",
            rss_after - rss_before,
            2 * round
        );
        assert_eq!(
            passed_checks, config.rise as usize,
            "back up after {passed_checks} passed checks, with rise {}",
            config.rise
        );
        assert!(after.failures == 0, "{:?}", after.sample_failures());
        assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
        drop(back);
    })
    .await;
}

// Regression tests of the two library fixes the fault tests above led to.

#[tokio::test]
async fn an_attempt_given_up_on_counts_as_a_failure_of_its_endpoint_and_a_client_gone_does_not() {
    use tower::ServiceExt;
    within(LIMIT, async {
        // A backend that reads requests and never answers. A caller that gives up because it
        // is too slow says so (as the failover layer's per-try timeout does): a failure, so
        // a hanging backend is ejected. Counted as a success, the abandon would reset outlier
        // detection's count.
        let hang = FaultServer::start("hang", Fault::Hang);
        let balancer = common::balancer([hang.endpoint()], lbkit::strategy::RoundRobin::new());
        let state = balancer.pool().state(&"hang".into()).expect("endpoint");
        for n in 1..=4u64 {
            let mut req = common::get();
            let record = lbkit::PickHints::of_mut(&mut req).record_pick();
            let mut call = Box::pin(balancer.clone().oneshot(req));
            tokio::select! {
                res = &mut call => panic!("the hanging backend answered: {:?}", res.map(|_| ())),
                () = wait_until(HANG, "the request at the backend", || hang.hits() == n) => {}
            }
            assert_eq!(state.in_flight(), 1);
            if n <= 3 {
                record.give_up();
                drop(call);
                assert_eq!(state.errors(), n);
                assert_eq!(state.consecutive_failures(), n as u32);
            } else {
                // A caller that just goes away (a client disconnecting) cancels: neither a
                // failure nor a success of the endpoint.
                drop(call);
                assert_eq!(state.errors(), 3);
                assert_eq!(state.consecutive_failures(), 3);
                assert_eq!(state.cancelled(), 1);
            }
            assert_eq!(state.in_flight(), 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_that_returns_is_no_longer_kept_out_by_its_ejection() {
    use lbkit::health::{HealthChecker, TcpCheck};
    within(LIMIT, async {
        let server = start_server("s0").await;
        let (endpoint, addr) = (server.endpoint(), server.addr());
        // Its port stays reserved: connecting is refused until it is back.
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
        wait_until(HANG, "marked down", || state.is_down()).await;
        // It comes back: the checker brings it up, and lifts the ejection with it.
        let back = start_server_at("s0", addr).await;
        let restarted = Instant::now();
        wait_until(HANG, "healthy again", || state.is_healthy()).await;
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
