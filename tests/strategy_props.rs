//! Property tests of every built-in strategy over random endpoint sets, weights and avoid sets.

use std::collections::HashMap;
use std::sync::Arc;

use lbkit::pool::Snapshot;
use lbkit::strategy::{AnyStrategy, PickContext, Strategy as LbStrategy};
use lbkit::{Endpoint, EndpointId, Pool};
use proptest::prelude::*;

type TestPool = Pool<(), AnyStrategy>;

fn strategies() -> impl Iterator<Item = (&'static str, AnyStrategy)> {
    AnyStrategy::NAMES
        .into_iter()
        .map(|name| (name, name.parse().expect("a built-in name parses")))
}

/// A pool of endpoints `e0`, `e1`, ... with `weights`.
fn pool(strategy: AnyStrategy, weights: &[u32]) -> TestPool {
    let pool = Pool::new(strategy, |_: &Endpoint| ());
    pool.extend(
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Endpoint::new(format!("e{i}")).with_weight(w)),
    );
    pool
}

fn snapshot(pool: &TestPool) -> Arc<Snapshot<(), <AnyStrategy as LbStrategy>::State>> {
    pool.snapshot()
}

/// Endpoint sets of 1 to 49 endpoints with weights 1 to 20.
fn weights() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(1u32..=20, 1..50)
}

/// Weights and an avoid mask over them that leaves at least one endpoint allowed.
fn weights_and_avoid() -> impl Strategy<Value = (Vec<u32>, Vec<bool>)> {
    weights()
        .prop_flat_map(|w| {
            let n = w.len();
            (Just(w), prop::collection::vec(any::<bool>(), n), 0..n)
        })
        .prop_map(|(w, mut avoid, keep)| {
            avoid[keep] = false;
            (w, avoid)
        })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A pick is always in range and never of an avoided endpoint, with or without a hash key.
    #[test]
    fn picks_are_in_range_and_not_avoided(
        (weights, avoid_mask) in weights_and_avoid(),
        hashes in prop::collection::vec(any::<u64>(), 16),
    ) {
        let avoid: Vec<EndpointId> = avoid_mask
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| EndpointId::new(format!("e{i}")))
            .collect();
        for (name, strategy) in strategies() {
            let pool = pool(strategy, &weights);
            let snap = snapshot(&pool);
            let n = snap.eligible().len();
            prop_assert_eq!(n, weights.len());
            let base = PickContext::new().avoiding(&avoid);
            let contexts = hashes
                .iter()
                .map(|&h| base.with_hash(h))
                .chain(std::iter::repeat_n(base, 16));
            for ctx in contexts {
                let i = pool.pick_in(&snap, &ctx);
                prop_assert!(i.is_some(), "{}: no pick while some endpoint is allowed", name);
                let i = i.unwrap();
                prop_assert!(i < n, "{}: index {} out of {}", name, i, n);
                let id = snap.eligible()[i].id();
                prop_assert!(!avoid.contains(id), "{}: picked avoided {}", name, id);
            }
        }
    }

    /// With every endpoint avoided, no strategy picks one.
    #[test]
    fn nothing_is_picked_when_everything_is_avoided(
        weights in weights(),
        hash in any::<u64>(),
    ) {
        let avoid: Vec<EndpointId> =
            (0..weights.len()).map(|i| EndpointId::new(format!("e{i}"))).collect();
        for (name, strategy) in strategies() {
            let pool = pool(strategy, &weights);
            let snap = snapshot(&pool);
            let ctx = PickContext::new().avoiding(&avoid);
            prop_assert_eq!(pool.pick_in(&snap, &ctx), None, "{} without a key", name);
            prop_assert_eq!(
                pool.pick_in(&snap, &ctx.with_hash(hash)), None, "{} with a key", name
            );
        }
    }

    /// Round robin picks each endpoint exactly `weight / gcd` times in every run of
    /// `sum(weights) / gcd` consecutive picks (whatever the cycle's starting point).
    #[test]
    fn round_robin_is_exact_per_cycle(weights in weights()) {
        let pool = pool("round_robin".parse().unwrap(), &weights);
        let snap = snapshot(&pool);
        let w: Vec<u64> = snap.eligible().iter().map(|c| u64::from(c.weight())).collect();
        let g = w.iter().copied().fold(0, gcd);
        let cycle = (w.iter().sum::<u64>() / g) as usize;
        let picks: Vec<usize> = (0..2 * cycle)
            .map(|_| pool.pick_in(&snap, &PickContext::new()).expect("a pick"))
            .collect();
        // Slide a window of one cycle over two cycles of picks.
        let mut count = vec![0u64; w.len()];
        for &p in &picks[..cycle] {
            count[p] += 1;
        }
        for start in 0..=cycle {
            if start > 0 {
                count[picks[start - 1]] -= 1;
                count[picks[start + cycle - 1]] += 1;
            }
            for (i, (&c, &wi)) in count.iter().zip(&w).enumerate() {
                prop_assert_eq!(c, wi / g, "endpoint {} in the window at {}", i, start);
            }
        }
    }

    /// Random picks each endpoint in proportion to its weight, and so do least connections
    /// and power of two choices at zero load (nothing in flight, so every comparison is a
    /// tie): within 6 standard deviations (plus one pick) of the expected count.
    #[test]
    fn random_and_load_aware_at_zero_load_follow_weights(
        weights in weights(),
        name in prop::sample::select(vec!["random", "least_connections", "p2c"]),
    ) {
        const PICKS: usize = 20_000;
        let pool = pool(name.parse().unwrap(), &weights);
        let snap = snapshot(&pool);
        let mut count: HashMap<usize, u64> = HashMap::new();
        for _ in 0..PICKS {
            *count.entry(pool.pick_in(&snap, &PickContext::new()).expect("a pick")).or_default() += 1;
        }
        let total: f64 = snap.eligible().iter().map(|c| f64::from(c.weight())).sum();
        for (i, c) in snap.eligible().iter().enumerate() {
            let p = f64::from(c.weight()) / total;
            let expected = PICKS as f64 * p;
            let sigma = (PICKS as f64 * p * (1.0 - p)).sqrt();
            let got = count.get(&i).copied().unwrap_or(0) as f64;
            prop_assert!(
                (got - expected).abs() <= 6.0 * sigma + 1.0,
                "{name}: {}: {} picks, expected {:.0} ± {:.0}", c.id(), got, expected, sigma
            );
        }
    }

    /// The hashing strategies send a key to the same endpoint in pools built apart, also when
    /// endpoints are avoided (a consistent second choice).
    #[test]
    fn hashing_is_deterministic_with_avoid_sets(
        (weights, avoid_mask) in weights_and_avoid(),
        hashes in prop::collection::vec(any::<u64>(), 32),
    ) {
        let avoid: Vec<EndpointId> = avoid_mask
            .iter()
            .enumerate()
            .filter(|(_, a)| **a)
            .map(|(i, _)| EndpointId::new(format!("e{i}")))
            .collect();
        for name in ["maglev", "ring"] {
            let (a, b) = (pool(name.parse().unwrap(), &weights), pool(name.parse().unwrap(), &weights));
            let (sa, sb) = (snapshot(&a), snapshot(&b));
            for &h in &hashes {
                let ctx = PickContext::new().avoiding(&avoid).with_hash(h);
                let pa = a.pick_in(&sa, &ctx).map(|i| sa.eligible()[i].id().clone());
                let pb = b.pick_in(&sb, &ctx).map(|i| sb.eligible()[i].id().clone());
                prop_assert!(pa.is_some());
                prop_assert_eq!(pa, pb, "{} with key {}", name, h);
            }
        }
    }
}
