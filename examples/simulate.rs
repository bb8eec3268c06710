//! Compares every strategy in lbkit's deterministic simulator (feature `sim`), beside tower's
//! own power-of-two-choices balancer, on two fleets:
//!
//! 1. ten endpoints, one of them ten times slower than the others;
//! 2. ten equal endpoints, one of which is out (refuses every request) from 10 s to 20 s;
//!    there, two stacks with health and retries are added: P2C with outlier detection, and
//!    round robin behind failover.
//!
//! ```text
//! cargo run --release --example simulate
//! cargo run --release --example simulate -- --seed 42 --requests 100000
//! cargo run --release --example simulate -- --report p2c   # one strategy's full report
//! ```
//!
//! The same seed gives the same tables, byte for byte. What to look for: on the slow fleet,
//! round robin and random send a tenth of the traffic to the slow endpoint and their p99 is
//! its latency; least connections, P2C and peak EWMA starve it and keep the p99 near the fast
//! endpoints'. On the outage fleet, load-aware strategies send *more* to the failing endpoint
//! (it answers at once, so it looks idle and fast): outlier detection or failover fix that.

use std::time::Duration;

use lbkit::failover::{FailoverLayer, RetryBudget};
use lbkit::hash::mix64;
use lbkit::health::OutlierDetection;
use lbkit::sim::{Comparison, Latency, Scenario, SimEndpoint, SimService, Workload};
use lbkit::strategy::{AnyStrategy, PowerOfTwoChoices, RoundRobin};
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::Layer;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A fleet of ten endpoints, `e9` ten times slower than the others.
fn slow_fleet(seed: u64, requests: u64) -> Scenario {
    let fast = Latency::log_normal(ms(20), 0.4);
    Scenario::new("slow endpoint: e9 is 10x slower")
        .seed(seed)
        .endpoints((0..9).map(|i| SimEndpoint::new(format!("e{i}"), fast)))
        .endpoint(SimEndpoint::new("e9", fast.times(10.0)))
        .workload(Workload::open(1_000.0).requests(requests))
}

/// A fleet of ten equal endpoints; `e3` refuses every request from 10 s to 20 s.
fn outage_fleet(seed: u64, requests: u64) -> Scenario {
    let latency = Latency::log_normal(ms(20), 0.4);
    Scenario::new("outage: e3 is out from 10s to 20s")
        .seed(seed)
        .endpoints((0..10).map(|i| {
            let e = SimEndpoint::new(format!("e{i}"), latency);
            if i == 3 {
                e.outage(Duration::from_secs(10)..Duration::from_secs(20))
            } else {
                e
            }
        }))
        .workload(Workload::open(1_000.0).requests(requests))
}

/// A seeded random number generator for tower's balancer (tower's default one is seeded
/// from the OS, which would make runs differ).
#[derive(Debug)]
struct SplitMix(u64);

impl tower::util::rng::Rng for SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// Runs `scenario` through tower's `p2c::Balance`, with peak-EWMA load (as lbkit's pool
/// defaults: 30 ms before the first response, 10 s decay) and with pending-requests load.
fn tower_rows(scenario: &Scenario, comparison: &mut Comparison) {
    let seed = scenario.get_seed();
    comparison.push(
        scenario.run_service("tower p2c peak_ewma", |services: Vec<SimService>| {
            let discover = PeakEwmaDiscover::new(
                ServiceList::new(services),
                ms(30),
                Duration::from_secs(10),
                CompleteOnResponse::default(),
            );
            Balance::from_rng(discover, SplitMix(seed))
        }),
    );
    comparison.push(
        scenario.run_service("tower p2c pending", |services: Vec<SimService>| {
            let discover = PendingRequestsDiscover::new(
                ServiceList::new(services),
                CompleteOnResponse::default(),
            );
            Balance::from_rng(discover, SplitMix(seed))
        }),
    );
}

fn every_strategy() -> impl Iterator<Item = AnyStrategy> {
    AnyStrategy::NAMES
        .into_iter()
        .map(|name| name.parse().expect("a built-in strategy"))
}

fn main() {
    let mut seed = 7;
    let mut requests = 30_000;
    let mut report = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => seed = value().parse().expect("--seed takes a number"),
            "--requests" => requests = value().parse().expect("--requests takes a number"),
            "--report" => report = Some(value()),
            other => panic!("unknown argument {other:?} (try --seed, --requests, --report)"),
        }
    }

    let slow = slow_fleet(seed, requests);
    let outage = outage_fleet(seed, requests);

    if let Some(name) = report {
        let strategy: AnyStrategy = name.parse().unwrap_or_else(|e| panic!("{e}"));
        println!("{}", slow.run(strategy));
        println!("{}", outage.run(strategy));
        return;
    }

    let mut table = slow.compare(every_strategy());
    tower_rows(&slow, &mut table);
    println!("{table}");

    let mut table = outage.compare(every_strategy());
    tower_rows(&outage, &mut table);
    table.push(
        outage.run_with("p2c + outlier detection", PowerOfTwoChoices::new(), |b| {
            OutlierDetection::new()
                .consecutive_failures(5)
                .base_ejection_time(Duration::from_secs(5))
                .spawn(b.pool());
            b
        }),
    );
    table.push(
        outage.run_with("round_robin + failover", RoundRobin::new(), |b| {
            FailoverLayer::new(RetryBudget::unlimited())
                .max_attempts(2)
                .layer(b)
        }),
    );
    println!("{table}");
}
