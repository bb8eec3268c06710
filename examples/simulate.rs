//! Compares every strategy in lbkit's deterministic simulator (feature `sim`), beside tower's
//! own power-of-two-choices balancer, on four fleets:
//!
//! 1. ten endpoints, one of them ten times slower than the others;
//! 2. ten equal endpoints, one of which is out (refuses every request) from 10 s to 20 s;
//!    there, two stacks with health and retries are added: P2C with outlier detection, and
//!    round robin behind failover;
//! 3. ten equal endpoints, one of which fails one request in ten *at once* (a broken handler's
//!    instant 500), each strategy with and without the failure penalty
//!    (`PoolBuilder::failure_penalty`, on by default);
//! 4. ten equal endpoints, one of which is rate limited to half its fair share and answers
//!    the rest `429` with `Retry-After: 1`, each strategy honouring `Retry-After` (the default)
//!    and ignoring it, and round robin behind failover retrying the 429s elsewhere.
//!
//! ```text
//! cargo run --release --example simulate
//! cargo run --release --example simulate -- --seed 42 --requests 100000
//! cargo run --release --example simulate -- --report p2c   # one strategy's full report
//! cargo run --release --example simulate -- --svg plots    # and SVG plots in plots/
//! ```
//!
//! With `--svg DIR`, each scenario also gets two plots (`lbkit::sim::plot`, feature
//! `sim-plot`): `latency-NAME.svg`, the client's p50 and p99 latency (and failed requests)
//! second by second, one line per strategy; and `share-NAME.svg`, each endpoint's share of
//! the requests second by second, one small chart per strategy, the endpoint in trouble in
//! red. NAME is `slow`, `outage`, `fast-failures` or `rate-limit`.
//!
//! The same seed gives the same tables, byte for byte. What to look for: on the slow fleet,
//! round robin and random send a tenth of the traffic to the slow endpoint and their p99 is
//! its latency; least connections, P2C and peak EWMA starve it and keep the p99 near the fast
//! endpoints'. On the outage fleet, load-aware strategies send *more* to the failing endpoint
//! (it answers at once, so it looks idle and fast): outlier detection or failover fix that.
//! On the fast-failing fleet, the same trap without the failure penalty: with it, P2C, least
//! connections and peak EWMA send the failing endpoint well under its tenth. On the
//! rate-limited fleet, honouring `Retry-After` turns most 429s into requests served elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lbkit::failover::{FailoverLayer, RetryBudget, RetryPolicy};
use lbkit::hash::mix64;
use lbkit::health::OutlierDetection;
use lbkit::sim::{plot, Comparison, Latency, Scenario, SimEndpoint, SimService, Workload};
use lbkit::strategy::{AnyStrategy, PowerOfTwoChoices, RoundRobin, Strategy};
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

/// A fleet of ten equal endpoints at 1 000 requests a second, `e3` changed by `trouble`.
fn fleet_with_e3(
    name: &str,
    seed: u64,
    requests: u64,
    trouble: impl Fn(SimEndpoint) -> SimEndpoint,
) -> Scenario {
    let latency = Latency::log_normal(ms(20), 0.4);
    Scenario::new(name)
        .seed(seed)
        .endpoints((0..10).map(|i| {
            let e = SimEndpoint::new(format!("e{i}"), latency);
            if i == 3 {
                trouble(e)
            } else {
                e
            }
        }))
        .workload(Workload::open(1_000.0).requests(requests))
}

/// `e3` refuses every request from 10 s to 20 s.
fn outage_fleet(seed: u64, requests: u64) -> Scenario {
    fleet_with_e3("outage: e3 is out from 10s to 20s", seed, requests, |e| {
        e.outage(Duration::from_secs(10)..Duration::from_secs(20))
    })
}

/// `e3` fails one request in ten at once, all run long.
fn fast_failing_fleet(seed: u64, requests: u64) -> Scenario {
    fleet_with_e3(
        "fast failures: e3 fails 10% of requests at once",
        seed,
        requests,
        |e| e.fast_errors(Duration::ZERO..Duration::MAX, 0.1),
    )
}

/// `e3` serves 50 requests a second (half its fair share) and answers the others `429` with
/// `Retry-After: 1`.
fn rate_limited_fleet(seed: u64, requests: u64) -> Scenario {
    fleet_with_e3(
        "rate limit: e3 serves 50/s, then 429 with Retry-After: 1",
        seed,
        requests,
        |e| e.rate_limit(50, Duration::from_secs(1)),
    )
}

/// Failover's default retries, and a `429` too.
struct RetryTooManyRequests;

impl RetryPolicy for RetryTooManyRequests {
    fn is_failure<B>(&self, res: &http::Response<B>) -> bool {
        res.status() == http::StatusCode::TOO_MANY_REQUESTS
            || lbkit::failover::DefaultPolicy.is_failure(res)
    }
}

/// Each strategy twice on `scenario`: as configured by `off` (the feature turned off, label
/// suffixed `label_off`) and with the pool's defaults.
fn with_and_without(
    scenario: &Scenario,
    label_off: &str,
    off: impl Fn(&lbkit::Pool<SimService, AnyStrategy>) + Sync,
) -> Comparison {
    let mut table = scenario.comparison();
    for strategy in every_strategy() {
        let name = strategy.name();
        table.push(
            scenario.run_with(&format!("{name} {label_off}"), strategy, |b| {
                off(b.pool());
                b
            }),
        );
        table.push(scenario.run(strategy));
    }
    table
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

/// Every scenario's comparison table, with a short name for its files: `slow`, `outage`,
/// `fast-failures` and `rate-limit`.
pub fn comparisons(seed: u64, requests: u64) -> Vec<(&'static str, Comparison)> {
    let slow = slow_fleet(seed, requests);
    let outage = outage_fleet(seed, requests);
    let fast_failing = fast_failing_fleet(seed, requests);
    let rate_limited = rate_limited_fleet(seed, requests);
    let mut tables = Vec::new();

    let mut table = slow.compare(every_strategy());
    tower_rows(&slow, &mut table);
    tables.push(("slow", table));

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
    tables.push(("outage", table));

    let mut table = with_and_without(&fast_failing, "(no penalty)", |pool| {
        pool.set_failure_penalty(0.0)
    });
    tower_rows(&fast_failing, &mut table);
    tables.push(("fast-failures", table));

    let mut table = with_and_without(&rate_limited, "(ignores Retry-After)", |pool| {
        pool.set_retry_after_cap(Duration::ZERO)
    });
    tower_rows(&rate_limited, &mut table);
    table.push(
        rate_limited.run_with("round_robin + failover on 429", RoundRobin::new(), |b| {
            FailoverLayer::new(RetryBudget::unlimited())
                .max_attempts(2)
                .policy(RetryTooManyRequests)
                .layer(b)
        }),
    );
    tables.push(("rate-limit", table));
    tables
}

/// Writes two plots of each comparison into `dir` (created if missing):
/// `latency-NAME.svg` (p50 and p99 over time per run, and failures when there are any) and
/// `share-NAME.svg` (each endpoint's share of the requests over time, per run). Returns the
/// files written.
pub fn write_svgs(dir: &Path, tables: &[(&str, Comparison)]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, table) in tables {
        let latency = dir.join(format!("latency-{name}.svg"));
        std::fs::write(&latency, plot::latency_svg(table)?)?;
        let share = dir.join(format!("share-{name}.svg"));
        std::fs::write(&share, plot::traffic_share_svg(table)?)?;
        written.extend([latency, share]);
    }
    Ok(written)
}

fn main() {
    let mut seed = 7;
    let mut requests = 30_000;
    let mut report = None;
    let mut svg = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => seed = value().parse().expect("--seed takes a number"),
            "--requests" => requests = value().parse().expect("--requests takes a number"),
            "--report" => report = Some(value()),
            "--svg" => svg = Some(PathBuf::from(value())),
            other => panic!("unknown argument {other:?} (try --seed, --requests, --report, --svg)"),
        }
    }

    if let Some(name) = report {
        let strategy: AnyStrategy = name.parse().unwrap_or_else(|e| panic!("{e}"));
        for scenario in [
            slow_fleet(seed, requests),
            outage_fleet(seed, requests),
            fast_failing_fleet(seed, requests),
            rate_limited_fleet(seed, requests),
        ] {
            println!("{}", scenario.run(strategy));
        }
        return;
    }

    let tables = comparisons(seed, requests);
    for (_, table) in &tables {
        println!("{table}");
    }
    if let Some(dir) = svg {
        match write_svgs(&dir, &tables) {
            Ok(files) => {
                for f in files {
                    println!("wrote {}", f.display());
                }
            }
            Err(e) => {
                eprintln!("cannot write the plots to {}: {e}", dir.display());
                std::process::exit(1);
            }
        }
    }
}
