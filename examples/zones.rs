//! Zone-aware routing in lbkit's deterministic simulator (feature `sim`): how much traffic
//! crosses zones before and after the local zone loses half its endpoints.
//!
//! ```text
//! cargo run --example zones
//! cargo run --example zones -- --seed 42
//! ```
//!
//! The fleet: twelve endpoints, four in each of zones a, b and c (a cross-zone hop adds 1 ms
//! here). The balancer runs in zone a, and the fleet of balancers is assumed spread equally
//! over the three zones (`ZoneAware::new("a")`). For 20 s every endpoint is up; then `a0` and
//! `a1` fail (they refuse every request, and a health check marks them down at once). The run
//! prints, for each half, the share of requests that crossed zones and each zone's share:
//!
//! - zone-unaware (plain round robin): two thirds cross zones all along;
//! - zone-aware, all up: zone a holds its third of the endpoints, so nothing crosses;
//! - zone-aware, a lost half: a holds 2 of the 10 healthy endpoints (20 %) for a third of the
//!   fleet, so it keeps 60 % of the requests, and the 40 % that spill go to b and c equally
//!   (their residual capacity, 40 % - 33.3 % each). The balancers in b and c stay local
//!   (each of their zones holds 40 % of the capacity for a third of the fleet), so every
//!   healthy endpoint gets the same rate from the whole fleet: 0.3 of one balancer's.
//!
//! The same seed prints the same numbers, byte for byte.

use std::time::Duration;

use lbkit::pool::{Pool, ZoneAware};
use lbkit::sim::{Latency, Report, Scenario, SimCompletion, SimEndpoint, SimService, Workload};
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, EndpointId};

/// When half of zone a fails.
pub const LOSS_AT: Duration = Duration::from_secs(20);

/// The fleet: four endpoints in each of three zones, `a0` and `a1` out from `LOSS_AT` on.
pub fn scenario(seed: u64) -> Scenario {
    let local = Latency::log_normal(Duration::from_millis(10), 0.3);
    let remote = Latency::log_normal(Duration::from_millis(11), 0.3);
    let endpoints = ["a", "b", "c"].into_iter().flat_map(move |zone| {
        (0..4).map(move |i| {
            let latency = if zone == "a" { local } else { remote };
            let e = SimEndpoint::new(format!("{zone}{i}"), latency).zone(zone);
            if zone == "a" && i < 2 {
                e.outage(LOSS_AT..Duration::from_secs(3600))
            } else {
                e
            }
        })
    });
    Scenario::new("zone a loses half its endpoints at 20 s")
        .seed(seed)
        .endpoints(endpoints)
        .workload(Workload::open(200.0).requests(8_000))
}

/// Runs `scenario` through a round-robin balancer, zone-aware from zone a or not; a task marks
/// `a0` and `a1` down at `LOSS_AT`, as a health check would.
pub fn run(scenario: &Scenario, zone_aware: bool) -> Report {
    let label = if zone_aware {
        "zone-aware"
    } else {
        "zone-unaware"
    };
    scenario.run_service(label, move |services: Vec<SimService>| {
        let mut builder = Pool::builder(RoundRobin::new());
        if zone_aware {
            builder = builder.zone_aware(ZoneAware::new("a"));
        }
        let pool = builder.build_with_services();
        pool.update(|changes| {
            for s in services {
                changes.insert_with_service(s.spec().endpoint().clone(), s);
            }
        });
        let health = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LOSS_AT).await;
            health.set_down(&EndpointId::new("a0"), true);
            health.set_down(&EndpointId::new("a1"), true);
        });
        Balancer::from_pool(pool).with_completion(SimCompletion)
    })
}

fn main() {
    let mut seed = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse::<u64>())) {
            ("--seed", Some(Ok(v))) => seed = v,
            _ => {
                eprintln!("usage: zones [--seed N]");
                std::process::exit(2);
            }
        }
    }
    let scenario = scenario(seed);
    println!("{} | seed {seed}", scenario.name());
    println!(
        "{:<14} {:<10} {:>11} {:>7} {:>7} {:>7}",
        "run", "window", "cross-zone", "a", "b", "c"
    );
    for zone_aware in [false, true] {
        let report = run(&scenario, zone_aware);
        for (name, window) in [
            ("0-20 s", Duration::ZERO..LOSS_AT),
            ("20-40 s", LOSS_AT..Duration::from_secs(3600)),
        ] {
            let shares = ["a", "b", "c"].map(|z| report.zone_share_during(z, window.clone()));
            println!(
                "{:<14} {:<10} {:>10.1}% {:>6.1}% {:>6.1}% {:>6.1}%",
                report.label,
                name,
                (1.0 - shares[0]) * 100.0,
                shares[0] * 100.0,
                shares[1] * 100.0,
                shares[2] * 100.0,
            );
        }
    }
}
