//! Balancing that sees failures, over real sockets: hyper HTTP/1.1 backends on 127.0.0.1
//! whose answers follow a fixed pattern by request count (every 7th fails, ...), so nothing
//! here depends on chance or on how fast the machine is.
//!
//! - the failure penalty: a backend failing one request in ten at once loses its share under
//!   P2C, least connections and peak EWMA, and clients see fewer errors;
//! - statistical outlier detection: success-rate and failure-percentage ejection, evaluated on
//!   demand ([`OutlierTrigger::evaluate`]) after a fixed number of requests;
//! - `Retry-After`: a `429` or `503` with it takes a backend out of rotation for the time
//!   asked (capped), without counting as a failure, and failover retries elsewhere.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{body_text, get, http_client, listen_reserved, wait_until, HttpEndpoint, HANG};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use lbkit::balance::CompleteOnBody;
use lbkit::endpoint::Health;
use lbkit::failover::{FailoverLayer, RetryBudget};
use lbkit::health::{HealthChange, OutlierDetection};
use lbkit::pool::PoolBuilder;
use lbkit::strategy::{
    AnyStrategy, LeastConnections, PeakEwma, PowerOfTwoChoices, RoundRobin, Strategy,
};
use lbkit::{Balancer, Endpoint, EndpointId, Pool};
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, ServiceExt};

/// Bound on every test; only catches a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What a backend answers to its `n`-th request (from 1): a status, an optional
/// `Retry-After`, and whether to wait its delay first.
type Answer = dyn Fn(u64) -> (StatusCode, Option<String>, bool) + Send + Sync;

/// A real HTTP/1.1 backend on 127.0.0.1 that answers by request count; stops when dropped.
struct Backend {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts `name`, answering with `answer` after `delay` (for answers that ask for it).
    fn start(
        name: &str,
        delay: Duration,
        answer: impl Fn(u64) -> (StatusCode, Option<String>, bool) + Send + Sync + 'static,
    ) -> Backend {
        let (listener, addr) = listen_reserved();
        let hits = Arc::new(AtomicU64::new(0));
        let answer: Arc<Answer> = Arc::new(answer);
        let body = Bytes::from(name.to_owned());
        let h = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, answer, body) = (h.clone(), answer.clone(), body.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                        let (status, retry_after, wait) = answer(n);
                        let body = body.clone();
                        async move {
                            if wait && !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut res = Response::new(Full::new(body));
                            *res.status_mut() = status;
                            if let Some(v) = retry_after {
                                res.headers_mut().insert(
                                    http::header::RETRY_AFTER,
                                    HeaderValue::from_str(&v).expect("a header value"),
                                );
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
            hits,
            task,
        }
    }

    /// Always `200 OK`, after `delay`.
    fn ok(name: &str, delay: Duration) -> Backend {
        Backend::start(name, delay, |_| (StatusCode::OK, None, true))
    }

    /// `500` at once for every `every`-th request, else `200 OK` after `delay`.
    fn failing_every(name: &str, every: u64, delay: Duration) -> Backend {
        Backend::start(name, delay, move |n| {
            if n.is_multiple_of(every) {
                (StatusCode::INTERNAL_SERVER_ERROR, None, false)
            } else {
                (StatusCode::OK, None, true)
            }
        })
    }

    fn id(&self) -> EndpointId {
        EndpointId::new(self.name.as_str())
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.name.as_str()).with_addr(self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

type HttpBalancer<St> = Balancer<HttpEndpoint, St, CompleteOnBody>;

/// An HTTP balancer over `backends` on a pool from `builder`.
fn balancer<St: Strategy>(backends: &[Backend], builder: PoolBuilder<St>) -> HttpBalancer<St> {
    let client = http_client();
    let pool = builder.build(move |ep: &Endpoint| HttpEndpoint::new(client.clone(), ep));
    pool.extend(backends.iter().map(Backend::endpoint));
    Balancer::from_pool(pool)
}

/// Sends `GET /`; returns the status and the name of the backend that answered.
async fn send<St: Strategy>(b: &HttpBalancer<St>) -> (StatusCode, String) {
    let res = b.clone().oneshot(get()).await.expect("an answer");
    let status = res.status();
    (status, body_text(res.into_body()).await)
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

// ---------------------------------------------------------------------------------------------
// The failure penalty.

/// What one run of the fast-failing fleet gave.
#[derive(Debug)]
struct Run {
    /// Requests the failing backend got.
    to_bad: u64,
    /// 5xx answers the client got.
    errors: u64,
}

/// Four backends answering in 2 ms, `bad` failing every 10th request at once; `requests`
/// sent one after the other through `strategy`, with the failure penalty `penalty`.
async fn fast_failing_run(strategy: AnyStrategy, penalty: f64, requests: u64) -> Run {
    let delay = Duration::from_millis(2);
    let mut backends: Vec<Backend> = (0..3)
        .map(|i| Backend::ok(&format!("ok{i}"), delay))
        .collect();
    backends.push(Backend::failing_every("bad", 10, delay));
    let b = balancer(&backends, Pool::builder(strategy).failure_penalty(penalty));
    let mut errors = 0;
    for _ in 0..requests {
        let (status, _) = send(&b).await;
        errors += u64::from(status.is_server_error());
    }
    Run {
        to_bad: backends[3].hits(),
        errors,
    }
}

/// One after the other, nothing is ever in flight at a pick: without the penalty, P2C and
/// least connections see four idle backends and spread evenly (a quarter to `bad`, whose
/// tenth requests fail); with it, `bad` costs more than an idle backend from its first failure
/// on (for far longer than the test) and gets no more requests. Peak EWMA weighs the penalty
/// against latency estimates that jitter on a busy machine, so it is held to less than half
/// of the fair share rather than to none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_failing_backend_loses_its_share_and_clients_see_fewer_errors() {
    bounded(async {
        let requests = 400;
        for strategy in [
            AnyStrategy::from(PowerOfTwoChoices::new()),
            AnyStrategy::from(LeastConnections::new()),
            AnyStrategy::from(PeakEwma::new()),
        ] {
            let name = strategy.name();
            let before = fast_failing_run(strategy, 0.0, requests).await;
            let after = fast_failing_run(strategy, 20.0, requests).await;
            println!(
                "{name}: share to bad {:.1} % -> {:.1} %, client errors {:.1} % -> {:.1} %",
                100.0 * before.to_bad as f64 / requests as f64,
                100.0 * after.to_bad as f64 / requests as f64,
                100.0 * before.errors as f64 / requests as f64,
                100.0 * after.errors as f64 / requests as f64,
            );
            // Every 10th request to bad fails, and only those.
            assert_eq!(before.errors, before.to_bad / 10, "{name}");
            assert_eq!(after.errors, after.to_bad / 10, "{name}");
            assert!(
                after.to_bad * 8 < requests,
                "{name}: bad got {} of {requests} with the penalty",
                after.to_bad
            );
            if name != "peak_ewma" {
                // Bad's first failure is its 10th request; from then on it costs more than
                // any idle backend. (Before it, picks are spread at random: allow for luck.)
                assert_eq!(after.errors, 1, "{name}: {after:?}");
                assert!(after.to_bad < 40, "{name}: {after:?}");
                // Without the penalty a quarter goes to bad: 100 of 400, give or take luck.
                assert!(before.to_bad > 60, "{name}: {before:?}");
                assert!(before.errors > after.errors, "{name}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Statistical outlier detection.

/// An interval no test reaches: evaluations happen when the test asks for them.
const NEVER: Duration = Duration::from_secs(3600);

/// Sends `n` requests through `b`, eight at a time.
async fn send_many(b: &HttpBalancer<RoundRobin>, n: u64) {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let (b, sent) = (b.clone(), sent.clone());
        tasks.spawn(async move {
            while sent.fetch_add(1, Ordering::SeqCst) < n {
                send(&b).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a sender");
    }
}

/// Eight backends under round robin, `bad` failing every 7th request (14 %, never twice in
/// a row): failures in a row never eject it, its success rate over an interval does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_ejects_a_backend_failing_one_request_in_seven() {
    bounded(async {
        let mut backends: Vec<Backend> = (0..7)
            .map(|i| Backend::ok(&format!("ok{i}"), Duration::ZERO))
            .collect();
        backends.push(Backend::failing_every("bad", 7, Duration::ZERO));
        let b = balancer(&backends, Pool::builder(RoundRobin::new()));
        let pool = b.pool();
        let mut events = pool.health_events();
        let detection = OutlierDetection::new().interval(NEVER);
        let trigger = detection.trigger();
        let _task = detection.spawn(pool);

        // Round robin: 150 requests each, over the volume of 100; bad fails 21 of its 150.
        send_many(&b, 8 * 150).await;
        assert!(trigger.evaluate().await, "the detector runs");
        let bad = backends[7].id();
        assert_eq!(pool.health(&bad), Some(Health::Ejected));
        for ok in &backends[..7] {
            assert_eq!(pool.health(&ok.id()), Some(Health::Healthy), "{}", ok.name);
        }
        let event = common::next_event(&mut events, &bad, |c| {
            matches!(c, HealthChange::Ejected { .. })
        })
        .await;
        match event.change() {
            HealthChange::Ejected {
                consecutive_failures,
                duration,
            } => {
                assert!(*consecutive_failures < 5, "not by failures in a row");
                assert_eq!(*duration, Some(Duration::from_secs(30)));
            }
            other => panic!("{other:?}"),
        }
        // While ejected it gets nothing.
        let hits = backends[7].hits();
        send_many(&b, 70).await;
        assert_eq!(backends[7].hits(), hits);
        assert_eq!(trigger.evaluations(), 1);
    })
    .await;
}

/// A bad release everywhere: every backend fails every 10th request. Nobody stands out, so
/// success-rate ejection ejects none, interval after interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_ejects_none_when_every_backend_fails_alike() {
    bounded(async {
        let backends: Vec<Backend> = (0..8)
            .map(|i| Backend::failing_every(&format!("b{i}"), 10, Duration::ZERO))
            .collect();
        let b = balancer(&backends, Pool::builder(RoundRobin::new()));
        let pool = b.pool();
        let detection = OutlierDetection::new().interval(NEVER);
        let trigger = detection.trigger();
        let _task = detection.spawn(pool);
        for round in 1..=3 {
            send_many(&b, 8 * 150).await;
            assert!(trigger.evaluate().await, "the detector runs");
            assert_eq!(trigger.evaluations(), round);
            for backend in &backends {
                assert_eq!(
                    pool.health(&backend.id()),
                    Some(Health::Healthy),
                    "round {round}: {}",
                    backend.name
                );
            }
        }
        let errors: u64 = pool.endpoints().iter().map(|(_, s)| s.errors()).sum();
        assert_eq!(
            errors,
            3 * 8 * 15,
            "every 10th of 3 × 1 200 requests failed"
        );
    })
    .await;
}

/// Failure percentage is absolute: off by default; on at 50 %, it ejects a backend failing
/// three requests in five, success rate aside. Too few backends with enough requests, and it
/// holds back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_percentage_ejects_above_its_threshold() {
    bounded(async {
        let mut backends: Vec<Backend> = (0..4)
            .map(|i| Backend::ok(&format!("ok{i}"), Duration::ZERO))
            .collect();
        backends.push(Backend::start("bad", Duration::ZERO, |n| {
            if n % 5 < 3 {
                (StatusCode::BAD_GATEWAY, None, false)
            } else {
                (StatusCode::OK, None, false)
            }
        }));
        let bad = backends[4].id();
        let b = balancer(&backends, Pool::builder(RoundRobin::new()));
        let pool = b.pool();
        let detection = OutlierDetection::new()
            .interval(NEVER)
            .consecutive_failures(1000)
            .success_rate_ejection(false)
            .failure_percentage(50)
            .failure_percentage_request_volume(50)
            .failure_percentage_minimum_hosts(6);
        let trigger = detection.trigger();
        let task = detection.spawn(pool);
        send_many(&b, 5 * 60).await;
        assert!(trigger.evaluate().await);
        assert_eq!(
            pool.health(&bad),
            Some(Health::Healthy),
            "five backends, six needed"
        );
        task.abort();
        let _ = task.await;

        let detection = OutlierDetection::new()
            .interval(NEVER)
            .consecutive_failures(1000)
            .success_rate_ejection(false)
            .failure_percentage(50)
            .failure_percentage_request_volume(50);
        let trigger = detection.trigger();
        let _task = detection.spawn(pool);
        send_many(&b, 5 * 60).await;
        assert!(trigger.evaluate().await);
        assert_eq!(pool.health(&bad), Some(Health::Ejected));
        let healthy = pool
            .endpoints()
            .iter()
            .filter(|(_, s)| s.is_healthy())
            .count();
        assert_eq!(healthy, 4);
    })
    .await;
}

/// The trigger of a detector that stopped says so instead of waiting.
#[tokio::test]
async fn a_stopped_detector_answers_no_evaluation() {
    let pool = Pool::new(RoundRobin::new(), |_: &Endpoint| ());
    pool.insert(Endpoint::new("a"));
    let detection = OutlierDetection::new().interval(NEVER);
    let trigger = detection.trigger();
    let task = detection.spawn(&pool);
    assert!(trigger.evaluate().await);
    task.abort();
    let _ = task.await;
    assert!(!trigger.evaluate().await);
}

// ---------------------------------------------------------------------------------------------
// Retry-After.

/// `throttled` answers 429 with `Retry-After: 30` to every request: its first one backs it
/// off, and the next requests all go elsewhere. The 429 is neither an error nor a failure in
/// a row: outlier detection at one failure does not eject it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_takes_a_backend_out_of_rotation_without_failing_it() {
    bounded(async {
        let backends = vec![
            Backend::start("throttled", Duration::ZERO, |_| {
                (StatusCode::TOO_MANY_REQUESTS, Some("30".into()), false)
            }),
            Backend::ok("ok0", Duration::ZERO),
            Backend::ok("ok1", Duration::ZERO),
        ];
        let b = balancer(&backends, Pool::builder(RoundRobin::new()));
        let pool = b.pool();
        let _task = OutlierDetection::new().consecutive_failures(1).spawn(pool);
        let id = backends[0].id();
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(send(&b).await.0);
        }
        assert_eq!(backends[0].hits(), 1, "one 429, then out of rotation");
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
                .count(),
            1
        );
        let state = pool.state(&id).expect("in the pool");
        assert_eq!(state.throttled(), 1);
        assert_eq!(state.errors(), 0);
        assert_eq!(state.consecutive_failures(), 0);
        assert!(state.is_backed_off());
        let left = state.backed_off_for().expect("backed off");
        assert!(left <= Duration::from_secs(30) && left > Duration::ZERO);
        assert_eq!(pool.health(&id), Some(Health::Healthy), "not ejected");
    })
    .await;
}

/// A `503` whose `Retry-After` is an HTTP-date an hour ahead is honoured for the pool's cap
/// only; once the cap is over the backend gets requests again. With failover, the 503 the
/// client would have seen is retried on another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_dates_are_capped_and_failover_retries_elsewhere() {
    bounded(async {
        let backends = vec![
            Backend::start("busy", Duration::ZERO, |_| {
                let later = std::time::SystemTime::now() + Duration::from_secs(3600);
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(httpdate::fmt_http_date(later)),
                    false,
                )
            }),
            Backend::ok("ok0", Duration::ZERO),
        ];
        // Long enough for the first two requests on a busy machine, short for the test.
        let cap = Duration::from_secs(3);
        let b = balancer(
            &backends,
            Pool::builder(RoundRobin::new()).retry_after_cap(cap),
        );
        let pool = b.pool().clone();
        let failover = FailoverLayer::new(RetryBudget::unlimited())
            .max_attempts(2)
            .layer(b);
        let busy = pool.state(&backends[0].id()).expect("in the pool");
        // Round robin sends one of the first two requests to busy: failover answers from ok0.
        for _ in 0..2 {
            let res = failover.clone().oneshot(get()).await.expect("an answer");
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(body_text(res.into_body()).await, "ok0");
        }
        assert_eq!(backends[0].hits(), 1);
        assert_eq!(busy.throttled(), 1);
        assert_eq!(busy.errors(), 0);
        let left = busy.backed_off_for().expect("backed off");
        assert!(left <= cap, "capped: {left:?}");

        // Once the cap is over, busy is asked again (and backs off again).
        wait_until(HANG, "busy to be asked again", || !busy.is_backed_off()).await;
        for _ in 0..2 {
            let res = failover.clone().oneshot(get()).await.expect("an answer");
            assert_eq!(res.status(), StatusCode::OK);
        }
        assert_eq!(backends[0].hits(), 2);
        assert_eq!(busy.throttled(), 2);
    })
    .await;
}

/// When every backend asked for a pause, requests still go to one of them rather than fail
/// for want of an endpoint; a `Retry-After` of zero seconds backs nothing off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backed_off_still_answers() {
    bounded(async {
        let backends = vec![
            Backend::start("a", Duration::ZERO, |_| {
                (StatusCode::TOO_MANY_REQUESTS, Some("30".into()), false)
            }),
            Backend::start("b", Duration::ZERO, |n| {
                let after = if n == 1 { "0" } else { "30" };
                (StatusCode::SERVICE_UNAVAILABLE, Some(after.into()), false)
            }),
        ];
        let b = balancer(&backends, Pool::builder(RoundRobin::new()));
        let pool = b.pool();
        // Round robin: a first, then b, whose first answer asks for no pause.
        for _ in 0..2 {
            send(&b).await;
        }
        let state_b = pool.state(&backends[1].id()).expect("in the pool");
        assert_eq!(backends[1].hits(), 1);
        assert!(!state_b.is_backed_off(), "Retry-After: 0 asks for no pause");
        for _ in 0..10 {
            send(&b).await;
        }
        assert!(pool.endpoints().iter().all(|(_, s)| s.is_backed_off()));
        // Both backed off: the requests went on all the same.
        assert_eq!(backends[0].hits() + backends[1].hits(), 12);
        assert_eq!(
            pool.endpoints()
                .iter()
                .map(|(_, s)| s.errors())
                .sum::<u64>(),
            0
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The same in the simulator: deterministic, so the figures are exact.

mod simulated {
    use std::time::Duration;

    use lbkit::sim::{Latency, Report, Scenario, SimEndpoint, Workload};
    use lbkit::strategy::{AnyStrategy, LeastConnections, PeakEwma, PowerOfTwoChoices, Strategy};

    /// Ten endpoints at 1 000 requests a second, the last of them `special`.
    fn fleet(name: &str, special: SimEndpoint) -> Scenario {
        let latency = Latency::log_normal(Duration::from_millis(20), 0.4);
        Scenario::new(name)
            .seed(11)
            .endpoints((0..9).map(|i| SimEndpoint::new(format!("e{i}"), latency)))
            .endpoint(special)
            .workload(Workload::open(1_000.0).requests(10_000))
    }

    /// `bad` fails one request in ten at once.
    fn fast_failing() -> Scenario {
        let latency = Latency::log_normal(Duration::from_millis(20), 0.4);
        let bad = SimEndpoint::new("bad", latency).fast_errors(Duration::ZERO..Duration::MAX, 0.1);
        fleet("fast failures", bad)
    }

    /// `limited` serves 50 requests a second, then answers 429 with `Retry-After: 1`.
    fn rate_limited() -> Scenario {
        let latency = Latency::log_normal(Duration::from_millis(20), 0.4);
        let limited = SimEndpoint::new("limited", latency).rate_limit(50, Duration::from_secs(1));
        fleet("rate limit", limited)
    }

    fn load_aware() -> [AnyStrategy; 3] {
        [
            PowerOfTwoChoices::new().into(),
            LeastConnections::new().into(),
            PeakEwma::new().into(),
        ]
    }

    fn share(r: &Report, id: &str) -> f64 {
        r.endpoint(id).expect("in the scenario").share
    }

    #[test]
    fn the_failure_penalty_starves_a_fast_failing_endpoint() {
        let scenario = fast_failing();
        for strategy in load_aware() {
            let name = strategy.name();
            let before = scenario.run_with("no penalty", strategy, |b| {
                b.pool().set_failure_penalty(0.0);
                b
            });
            let after = scenario.run(strategy);
            println!(
                "{name}: to bad {:.1} % -> {:.1} %, errors {:.2} % -> {:.2} %",
                100.0 * share(&before, "bad"),
                100.0 * share(&after, "bad"),
                100.0 * before.error_rate(),
                100.0 * after.error_rate()
            );
            // Without it, a fast failure makes bad look idle: at least its tenth.
            assert!(share(&before, "bad") > 0.095, "{name}\n{before}");
            assert!(share(&after, "bad") < 0.05, "{name}\n{after}");
            assert!(after.errors * 2 < before.errors, "{name}");
            // Deterministic: the same run again gives the same report.
            assert_eq!(scenario.run(strategy).to_string(), after.to_string());
        }
    }

    #[test]
    fn retry_after_turns_refusals_into_requests_served_elsewhere() {
        let scenario = rate_limited();
        for strategy in load_aware() {
            let name = strategy.name();
            let ignoring = scenario.run_with("ignores Retry-After", strategy, |b| {
                b.pool().set_retry_after_cap(Duration::ZERO);
                b
            });
            let honouring = scenario.run(strategy);
            println!(
                "{name}: to limited {:.1} % -> {:.1} %, errors {:.2} % -> {:.2} %",
                100.0 * share(&ignoring, "limited"),
                100.0 * share(&honouring, "limited"),
                100.0 * ignoring.error_rate(),
                100.0 * honouring.error_rate()
            );
            let limited = honouring.endpoint("limited").expect("in the scenario");
            // The 429s are not the endpoint's errors, and the client sees few of them: about
            // one a second, the one that starts each pause.
            assert_eq!(limited.errors, 0);
            assert_eq!(limited.throttled, honouring.errors);
            assert!(honouring.errors <= 2 * 11, "{name}\n{honouring}");
            assert!(
                ignoring.errors > 10 * honouring.errors,
                "{name}\n{ignoring}"
            );
            assert!(honouring.to_string().contains("refused with 429"));
        }
    }
}
