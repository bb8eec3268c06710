//! The simulator (feature `sim`): runs repeat byte for byte, theory shows (load-aware
//! strategies avoid a slow endpoint, an outage costs errors only while it lasts), and tower's
//! own balancer runs beside lbkit's in the same simulation.

use std::time::Duration;

use lbkit::failover::{FailoverLayer, RetryBudget};
use lbkit::hash::mix64;
use lbkit::health::OutlierDetection;
use lbkit::sim::{Latency, Report, Scenario, SimEndpoint, SimService, Workload};
use lbkit::strategy::{
    AnyStrategy, LeastConnections, Maglev, PeakEwma, PowerOfTwoChoices, Random, RoundRobin,
};
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::Layer;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Ten endpoints, `slow` ten times slower than the other nine; 1 000 requests a second.
fn slow_fleet(seed: u64, requests: u64) -> Scenario {
    let fast = Latency::log_normal(ms(20), 0.4);
    Scenario::new("one slow endpoint")
        .seed(seed)
        .endpoints((0..9).map(|i| SimEndpoint::new(format!("e{i}"), fast)))
        .endpoint(SimEndpoint::new("slow", fast.times(10.0)))
        .workload(Workload::open(1_000.0).requests(requests))
}

/// Five equal endpoints; `e2` refuses every request from 4 s to 8 s. 500 requests a second
/// for about 12 s.
fn outage_fleet(seed: u64) -> Scenario {
    let latency = Latency::exponential(ms(10));
    Scenario::new("outage")
        .seed(seed)
        .endpoints((0..5).map(|i| {
            let e = SimEndpoint::new(format!("e{i}"), latency);
            if i == 2 {
                e.outage(secs(4)..secs(8))
            } else {
                e
            }
        }))
        .workload(Workload::open(500.0).requests(6_000))
}

/// A seeded generator for tower's balancer, whose default one is seeded by the OS.
struct SplitMix(u64);

impl tower::util::rng::Rng for SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

fn tower_peak_ewma(scenario: &Scenario) -> Report {
    let seed = scenario.get_seed();
    scenario.run_service("tower p2c peak_ewma", |services: Vec<SimService>| {
        let discover = PeakEwmaDiscover::new(
            ServiceList::new(services),
            ms(30),
            secs(10),
            CompleteOnResponse::default(),
        );
        Balance::from_rng(discover, SplitMix(seed))
    })
}

fn tower_pending(scenario: &Scenario) -> Report {
    let seed = scenario.get_seed();
    scenario.run_service("tower p2c pending", |services: Vec<SimService>| {
        let discover =
            PendingRequestsDiscover::new(ServiceList::new(services), CompleteOnResponse::default());
        Balance::from_rng(discover, SplitMix(seed))
    })
}

fn share(report: &Report, id: &str) -> f64 {
    report.endpoint(id).expect("endpoint in report").share
}

#[test]
fn same_seed_same_report_byte_for_byte() {
    let scenario = slow_fleet(11, 5_000);
    for strategy in ["random", "p2c", "peak_ewma", "least_connections", "ring"] {
        let s: AnyStrategy = strategy.parse().unwrap();
        let first = scenario.run(s);
        let second = scenario.run(s);
        assert_eq!(first.to_string(), second.to_string(), "{strategy}");
        assert_eq!(first, second, "{strategy}");
        assert_eq!(first.requests, 5_000);
    }
    // So does tower's balancer, with a seeded generator.
    assert_eq!(
        tower_peak_ewma(&scenario).to_string(),
        tower_peak_ewma(&scenario).to_string()
    );
    // Another seed, another run.
    let other = slow_fleet(12, 5_000).run(PowerOfTwoChoices::new());
    assert_ne!(
        other.to_string(),
        scenario.run(PowerOfTwoChoices::new()).to_string()
    );
}

#[test]
fn runs_repeat_on_any_thread_and_inside_a_runtime() {
    let scenario = outage_fleet(3).workload(Workload::open(500.0).requests(1_000));
    let here = scenario.run(PeakEwma::new()).to_string();
    let there = std::thread::spawn({
        let scenario = scenario.clone();
        move || scenario.run(PeakEwma::new()).to_string()
    })
    .join()
    .unwrap();
    assert_eq!(here, there);
    // From async code (each run has its own thread and runtime).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let inside = rt.block_on(async { scenario.run(PeakEwma::new()).to_string() });
    assert_eq!(here, inside);
}

#[test]
fn load_aware_strategies_beat_round_robin_on_a_slow_endpoint() {
    let scenario = slow_fleet(7, 20_000);
    let rr = scenario.run(RoundRobin::new());
    let p2c = scenario.run(PowerOfTwoChoices::new());
    let ewma = scenario.run(PeakEwma::new());
    let lc = scenario.run(LeastConnections::new());
    println!("{rr}\n{p2c}\n{ewma}");

    // Round robin sends the slow endpoint its tenth: more than 1 % of requests are slow, so
    // its p99 is the slow endpoint's latency (median 200 ms).
    assert!((share(&rr, "slow") - 0.1).abs() < 0.001, "{rr}");
    assert!(rr.latency.p99 > ms(150), "{rr}");
    // Load-aware strategies send it much less, and their p99 is lower.
    for r in [&p2c, &ewma, &lc] {
        assert!(share(r, "slow") < 0.05, "{r}");
        assert!(
            r.latency.p99 < rr.latency.p99,
            "{}: p99 {:?} not below round robin's {:?}",
            r.label,
            r.latency.p99,
            rr.latency.p99
        );
    }
    // Peak EWMA sees the latency itself: it nearly starves the slow endpoint, and its p99 is
    // the fast endpoints' (log-normal, median 20 ms, sigma 0.4: p99 about 51 ms).
    assert!(share(&ewma, "slow") < 0.01, "{ewma}");
    assert!(ewma.latency.p99 < ms(80), "{ewma}");
    assert!(ewma.latency.p99 < p2c.latency.p99);
    // Medians hardly differ: the slow endpoint only shows in the tail.
    assert!(rr.latency.p50 < ms(30) && ewma.latency.p50 < ms(30));
}

#[test]
fn tower_p2c_runs_beside_lbkit_in_the_same_simulation() {
    let scenario = slow_fleet(7, 20_000);
    let mut table = scenario.compare([
        AnyStrategy::RoundRobin(RoundRobin::new()),
        AnyStrategy::PowerOfTwoChoices(PowerOfTwoChoices::new()),
        AnyStrategy::PeakEwma(PeakEwma::new()),
    ]);
    table.push(tower_pending(&scenario));
    table.push(tower_peak_ewma(&scenario));
    let text = table.to_string();
    println!("{text}");
    for label in [
        "round_robin",
        "p2c",
        "peak_ewma",
        "tower p2c pending",
        "tower p2c peak_ewma",
    ] {
        assert!(text.contains(label), "{label} in\n{text}");
    }
    assert!(
        text.contains("to slow"),
        "the slow endpoint is highlighted:\n{text}"
    );
    let rr = table.report("round_robin").unwrap();
    let ours = table.report("peak_ewma").unwrap();
    let theirs = table.report("tower p2c peak_ewma").unwrap();
    // Tower's peak EWMA does what lbkit's does: both starve the slow endpoint.
    assert!(share(theirs, "slow") < 0.01, "{theirs}");
    assert!(theirs.latency.p99 < rr.latency.p99);
    assert!(theirs.latency.p99 < ms(80) && ours.latency.p99 < ms(80));
    // And tower's P2C over pending requests matches lbkit's P2C over in-flight requests.
    let (ours, theirs) = (
        table.report("p2c").unwrap(),
        table.report("tower p2c pending").unwrap(),
    );
    assert!((share(ours, "slow") - share(theirs, "slow")).abs() < 0.01);
    assert!(theirs.latency.p99 < rr.latency.p99);
}

/// The timeline steps (of one second) that saw errors.
fn error_seconds(report: &Report) -> Vec<u64> {
    report
        .timeline
        .iter()
        .filter(|s| s.errors > 0)
        .map(|s| s.start.as_secs())
        .collect()
}

#[test]
fn an_outage_costs_errors_only_while_it_lasts() {
    let scenario = outage_fleet(5);
    for strategy in [
        AnyStrategy::RoundRobin(RoundRobin::new()),
        AnyStrategy::Random(Random::new()),
        AnyStrategy::PowerOfTwoChoices(PowerOfTwoChoices::new()),
        AnyStrategy::Maglev(Maglev::new()),
    ] {
        let r = scenario.run(strategy);
        let seconds = error_seconds(&r);
        if matches!(strategy, AnyStrategy::PowerOfTwoChoices(_)) {
            // Its failure penalty soon makes the dead endpoint cost more than any live one.
            assert!(
                !seconds.is_empty() && seconds.iter().all(|s| (4..8).contains(s)),
                "{r}"
            );
        } else {
            // Without health checks every second of the outage has errors, and no other does.
            assert_eq!(seconds, [4, 5, 6, 7], "{r}");
        }
        assert_eq!(r.errors, r.endpoint("e2").unwrap().errors, "{r}");
        for id in ["e0", "e1", "e3", "e4"] {
            assert_eq!(r.endpoint(id).unwrap().errors, 0, "{r}");
        }
    }
    // Round robin sends the dead endpoint its fifth of the requests of those 4 s.
    let rr = scenario.run(RoundRobin::new());
    let during: u64 = rr.timeline[4..8].iter().map(|s| s.requests).sum();
    assert!(rr.errors.abs_diff(during / 5) <= 1, "{rr}");
}

#[test]
fn outlier_detection_and_failover_hide_an_outage() {
    let scenario = outage_fleet(5);
    // Without its failure penalty, P2C alone keeps sending to the dead endpoint (with it, it
    // stops as soon as outlier detection would).
    let plain = scenario.run_with("p2c, no failure penalty", PowerOfTwoChoices::new(), |b| {
        b.pool().set_failure_penalty(0.0);
        b
    });
    let penalised = scenario.run(PowerOfTwoChoices::new());
    assert!(plain.errors > 10 * penalised.errors, "{plain}\n{penalised}");
    let ejecting = scenario.run_with("p2c + outlier detection", PowerOfTwoChoices::new(), |b| {
        b.pool().set_failure_penalty(0.0);
        OutlierDetection::new()
            .consecutive_failures(3)
            .base_ejection_time(secs(2))
            .spawn(b.pool());
        b
    });
    println!("{plain}\n{ejecting}");
    // Ejected after 3 failures, back after 2 s (then 4 s), failing 3 more each time.
    assert!(ejecting.errors > 0 && ejecting.errors <= 12, "{ejecting}");
    assert!(plain.errors > 10 * ejecting.errors, "{plain}\n{ejecting}");
    assert!(error_seconds(&ejecting).iter().all(|s| (4..8).contains(s)));

    let retried = scenario.run_with("round_robin + failover", RoundRobin::new(), |b| {
        FailoverLayer::new(RetryBudget::unlimited())
            .max_attempts(2)
            .layer(b)
    });
    println!("{retried}");
    assert_eq!(retried.errors, 0, "{retried}");
    // The dead endpoint still got its share of first attempts, each retried elsewhere.
    let e2 = retried.endpoint("e2").unwrap();
    assert!(e2.errors > 0);
    let calls: u64 = retried.endpoints.iter().map(|e| e.requests).sum();
    assert_eq!(calls, retried.requests + e2.errors);
}

#[test]
fn a_closed_loop_queues_at_a_busy_endpoint() {
    // One endpoint serving one request at a time, in 10 ms; two workers: each request but
    // the first waits 10 ms for the other's.
    let scenario = Scenario::new("queue")
        .endpoint(SimEndpoint::new("only", Latency::constant(ms(10))).concurrency(1))
        .workload(Workload::closed(2).requests(100));
    let r = scenario.run(RoundRobin::new());
    assert_eq!(r.requests, 100);
    assert_eq!(r.errors, 0);
    assert_eq!(r.elapsed, ms(1_000));
    assert_eq!(r.latency.p50, ms(20));
    assert_eq!(r.latency.max, ms(20));
    assert_eq!(r.endpoint("only").unwrap().latency.p50, ms(20));
    assert_eq!(r.endpoint("only").unwrap().share, 1.0);
}

#[test]
fn slowdowns_and_error_windows_show_where_they_are() {
    let base = Latency::constant(ms(10));
    let scenario = Scenario::new("windows")
        .seed(9)
        .endpoint(SimEndpoint::new("a", base).slowdown(secs(1)..secs(2), 5.0))
        .endpoint(SimEndpoint::new("b", base).errors(secs(2)..secs(3), 0.5))
        .workload(Workload::open(400.0).requests(1_600));
    let r = scenario.run(RoundRobin::new());
    println!("{r}");
    // a: 10 ms, except 50 ms for a second out of four.
    let a = r.endpoint("a").unwrap();
    assert_eq!((a.latency.p50, a.latency.max), (ms(10), ms(50)));
    assert!(a.latency.p90 == ms(50) || a.latency.p90 == ms(10));
    // b: about half of its requests fail between 2 s and 3 s, none otherwise.
    assert_eq!(error_seconds(&r), [2]);
    let b = r.endpoint("b").unwrap();
    let in_window = r.timeline[2].requests / 2;
    assert!(
        b.errors > in_window / 4 && b.errors < in_window * 3 / 4,
        "{b:?}"
    );
}

#[test]
fn hash_keys_reach_consistent_hashing() {
    let one_key = Scenario::new("one key")
        .endpoints((0..4).map(|i| SimEndpoint::new(format!("e{i}"), Latency::constant(ms(5)))))
        .workload(Workload::open(100.0).requests(200).hash_keys(1));
    let r = one_key.run(Maglev::new());
    assert_eq!(
        r.endpoints.iter().filter(|e| e.requests > 0).count(),
        1,
        "{r}"
    );
    let many = one_key.workload(Workload::open(100.0).requests(2_000).hash_keys(1_000));
    let r = many.run(Maglev::new());
    assert!(r.endpoints.iter().all(|e| e.share > 0.15), "{r}");
}

#[test]
fn timelines_show_each_endpoints_share_and_the_latency_step_by_step() {
    let scenario = outage_fleet(3);
    let rr = scenario.run(RoundRobin::new());
    let steps = rr.timeline.len();
    assert_eq!(steps, 12, "{rr}");
    for e in &rr.endpoints {
        assert_eq!(e.timeline.len(), steps);
        assert_eq!(e.timeline.iter().sum::<u64>(), e.requests, "{}", e.id);
    }
    for (s, t) in rr.timeline.iter().enumerate() {
        // Without retries each request reaches one endpoint, when it is sent.
        let reached: u64 = rr.endpoints.iter().map(|e| e.timeline[s]).sum();
        assert_eq!(reached, t.requests, "step {s}");
        assert_eq!(t.latency.count + t.errors, t.requests, "step {s}");
        assert!(t.latency.p50 <= t.latency.p99 && t.latency.p99 <= t.latency.max);
        // Round robin keeps sending e2 its fifth, out or not.
        let e2 = rr.endpoint("e2").unwrap().timeline[s];
        assert!(
            e2.abs_diff(t.requests / 5) <= 1,
            "step {s}: {e2} of {}",
            t.requests
        );
    }
    assert_eq!(error_seconds(&rr), [4, 5, 6, 7]);

    // Outlier detection: e2's share falls to nothing while it is out, and comes back.
    let ejecting = scenario.run_with("p2c + outlier detection", PowerOfTwoChoices::new(), |b| {
        OutlierDetection::new()
            .consecutive_failures(5)
            .base_ejection_time(secs(1))
            .spawn(b.pool());
        b
    });
    let e2 = ejecting.endpoint("e2").unwrap();
    let share = |s: usize| e2.timeline[s] as f64 / ejecting.timeline[s].requests as f64;
    for s in 0..4 {
        assert!(share(s) > 0.1, "step {s}: {}", share(s));
    }
    for s in 5..8 {
        assert!(share(s) < 0.05, "step {s}: {}", share(s));
    }
    // Ejected again and again while out, for longer each time: back once the last ends.
    assert!(share(11) > 0.1, "back after the outage: {}", share(11));
    // The client's p99 stays that of the healthy endpoints all along.
    let p99_before = ejecting.timeline[2].latency.p99;
    let p99_during = ejecting.timeline[6].latency.p99;
    assert!(
        p99_during < p99_before * 2,
        "{p99_before:?} -> {p99_during:?}"
    );
}

/// Four equal endpoints of weights 3, 1, 1, 1: every weighted strategy gives `e0` half of the
/// requests, one at a time (zero load: the load-aware ones compare endpoints with nothing in
/// flight) and with 16 at once. Simulated time, so the shares repeat exactly.
#[test]
fn weights_3_1_1_1_give_half_to_the_heavy_endpoint_at_zero_load_and_under_load() {
    let latency = Latency::log_normal(ms(10), 0.3);
    let strategies: [AnyStrategy; 4] = [
        RoundRobin::new().into(),
        Random::new().into(),
        LeastConnections::new().into(),
        PowerOfTwoChoices::new().into(),
    ];
    for workers in [1, 16] {
        let scenario = Scenario::new("weights 3:1:1:1")
            .seed(7)
            .endpoint(SimEndpoint::new("e0", latency).weight(3))
            .endpoints((1..4).map(|i| SimEndpoint::new(format!("e{i}"), latency)))
            .workload(Workload::closed(workers).requests(4_000));
        for strategy in strategies {
            let report = scenario.run(strategy);
            let share = report.endpoint("e0").expect("e0").share;
            println!(
                "{} workers, {}: e0 share {:.3}",
                workers, report.label, share
            );
            assert!(
                (0.44..=0.56).contains(&share),
                "{workers} workers, {}: e0 got {share:.3} of the requests\n{report}",
                report.label
            );
        }
    }
}
