//! The bounded-load ring's spill-over: a hot key's requests stay on its home endpoint only up
//! to the load bound, then go on around the ring; with the bound off they all stay home.
//! Driven by counts (requests held in flight), not by time.

use std::collections::HashMap;

use lbkit::hints::PickHints;
use lbkit::strategy::Ring;
use lbkit::{Balancer, Endpoint};
use tower::Service;

const ENDPOINTS: usize = 4;
const HELD: usize = 40;

/// Calls the balancer `HELD` times with one hash key, keeping every response future (so each
/// request stays in flight), and counts where they went.
fn hold_hot_key(ring: Ring) -> (HashMap<String, usize>, String) {
    let endpoints: Vec<Endpoint> = (0..ENDPOINTS)
        .map(|i| Endpoint::from(format!("10.0.0.{i}:80").as_str()))
        .collect();
    let mut balancer = Balancer::new(endpoints, ring, |_: &Endpoint| {
        tower::service_fn(|_req: http::Request<()>| {
            std::future::pending::<Result<http::Response<String>, std::convert::Infallible>>()
        })
    });
    let mut held = Vec::new();
    let mut counts = HashMap::new();
    let mut first = String::new();
    for i in 0..HELD {
        let mut req = http::Request::new(());
        let hints = PickHints::of_mut(&mut req);
        hints.set_hash(0x5eed_cafe);
        let record = hints.record_pick();
        held.push(balancer.call(req));
        let ep = record.endpoint().expect("picked").to_string();
        if i == 0 {
            first = ep.clone();
        }
        *counts.entry(ep).or_insert(0) += 1;
    }
    assert_eq!(balancer.pool().in_flight(), HELD as u64);
    drop(held);
    assert_eq!(balancer.pool().in_flight(), 0);
    // Unloaded again, the key is back home.
    let mut req = http::Request::new(());
    let hints = PickHints::of_mut(&mut req);
    hints.set_hash(0x5eed_cafe);
    let record = hints.record_pick();
    let _call = balancer.call(req);
    assert_eq!(record.endpoint().expect("picked").as_str(), first);
    (counts, first)
}

#[test]
fn a_hot_key_spills_over_past_the_bound_and_returns_home_when_load_falls() {
    let factor = 1.25;
    let (counts, home) = hold_hot_key(Ring::new().load_factor(factor));
    // No endpoint holds more than the bound at the last request: ceil(factor * HELD / n).
    let bound = (factor * HELD as f64 / ENDPOINTS as f64).ceil() as usize;
    for (ep, n) in &counts {
        assert!(*n <= bound, "{ep} holds {n} > {bound}: {counts:?}");
    }
    assert!(counts.len() > 1, "no spill-over: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), HELD);
    assert!(counts[&home] >= 1);
}

#[test]
fn without_a_bound_a_hot_key_stays_home() {
    let (counts, home) = hold_hot_key(Ring::new().load_factor(f64::INFINITY));
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[&home], HELD);
}
