//! A pool changed one step at a time (its snapshots built incrementally from the one before)
//! picks exactly like a pool built from scratch with the same endpoints: the same eligible
//! endpoints with the same weights, the same tier and panic state, and for the hash strategies
//! the same endpoint for every key.

use std::collections::BTreeMap;

use lbkit::hash::mix64;
use lbkit::strategy::{AnyStrategy, PickContext, Strategy as _};
use lbkit::{Endpoint, EndpointId, Pool, Tier};
use proptest::prelude::*;

type TestPool = Pool<(), AnyStrategy>;

#[derive(Clone, Debug)]
enum Op {
    /// Inserts (or updates) endpoint `e{id}` with a weight and a tier.
    Insert(u8, u32, u8),
    Remove(u8),
    SetWeight(u8, u32),
    Down(u8, bool),
    Eject(u8, bool),
    /// Several inserts and removes in one update.
    Batch(Vec<(u8, Option<u32>)>),
    /// Every endpoint of the list, with weight 1, as a DNS answer would replace them.
    ReplaceAll(Vec<u8>),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    let id = 0u8..24;
    prop_oneof![
        4 => (id.clone(), 0u32..4, 0u8..2).prop_map(|(i, w, t)| Op::Insert(i, w, t)),
        2 => id.clone().prop_map(Op::Remove),
        1 => (id.clone(), 0u32..4).prop_map(|(i, w)| Op::SetWeight(i, w)),
        2 => (id.clone(), any::<bool>()).prop_map(|(i, d)| Op::Down(i, d)),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, e)| Op::Eject(i, e)),
        1 => prop::collection::vec((id.clone(), prop::option::of(0u32..4)), 1..6).prop_map(Op::Batch),
        1 => prop::collection::vec(id, 0..12).prop_map(Op::ReplaceAll),
    ]
}

fn name(i: u8) -> EndpointId {
    EndpointId::new(format!("e{i}"))
}

fn apply(pool: &TestPool, op: &Op) {
    match op {
        Op::Insert(i, w, t) => {
            pool.insert(Endpoint::new(name(*i)).with_weight(*w).with_tier(Tier(*t)));
        }
        Op::Remove(i) => {
            pool.remove(&name(*i));
        }
        Op::SetWeight(i, w) => {
            pool.set_weight(&name(*i), *w);
        }
        Op::Down(i, d) => {
            pool.set_down(&name(*i), *d);
        }
        Op::Eject(i, e) => {
            pool.set_ejected(&name(*i), *e);
        }
        Op::Batch(changes) => pool.update(|c| {
            for (i, w) in changes {
                match w {
                    Some(w) => c.insert(Endpoint::new(name(*i)).with_weight(*w)),
                    None => c.remove(&name(*i)),
                };
            }
        }),
        Op::ReplaceAll(ids) => {
            pool.update(|c| c.replace_all(ids.iter().map(|i| Endpoint::new(name(*i)))))
        }
    }
}

/// The eligible endpoints by the rule of the docs: in rotation (weight above 0), in the lowest
/// tier with a healthy one, healthy unless the tier is in panic.
fn expected(pool: &TestPool, threshold: usize) -> (BTreeMap<EndpointId, u32>, bool) {
    let members = pool.endpoints();
    let tier = members
        .iter()
        .filter(|(e, s)| e.weight() > 0 && s.is_healthy())
        .map(|(e, _)| e.tier())
        .min();
    let in_tier: Vec<_> = members
        .iter()
        .filter(|(e, _)| Some(e.tier()) == tier && e.weight() > 0)
        .collect();
    let healthy = in_tier.iter().filter(|(_, s)| s.is_healthy()).count();
    let panic = healthy * 100 < threshold * in_tier.len();
    let eligible = in_tier
        .iter()
        .filter(|(_, s)| panic || s.is_healthy())
        .map(|(e, _)| (e.id().clone(), e.weight()))
        .collect();
    (eligible, panic)
}

/// The endpoint each of 2 000 keys goes to, and each candidate's index by id.
fn owners(pool: &TestPool) -> Vec<Option<EndpointId>> {
    let snap = pool.snapshot();
    (0..2_000u64)
        .map(|k| {
            let ctx = PickContext::new().with_hash(mix64(k));
            pool.pick_in(&snap, &ctx)
                .map(|i| snap.eligible()[i].id().clone())
        })
        .collect()
}

fn check(strategy: &str, ops: &[Op], threshold: u8) {
    let parse = || -> AnyStrategy { strategy.parse().expect("a built-in name") };
    let pool: TestPool = Pool::builder(parse())
        .panic_threshold(threshold)
        .build(|_: &Endpoint| ());
    for (step, op) in ops.iter().enumerate() {
        apply(&pool, op);
        let snap = pool.snapshot();
        let (want, panic) = expected(&pool, usize::from(threshold));
        let got: BTreeMap<EndpointId, u32> = snap
            .eligible()
            .iter()
            .map(|c| (c.id().clone(), c.weight()))
            .collect();
        assert_eq!(
            got.len(),
            snap.eligible().len(),
            "an endpoint is eligible twice"
        );
        assert_eq!(got, want, "{strategy}, step {step} ({op:?})");
        if !want.is_empty() {
            assert_eq!(snap.is_panic(), panic, "{strategy}, step {step}");
        }
        for (i, c) in snap.eligible().iter().enumerate() {
            assert_eq!(snap.position(c.id()), Some(i), "{strategy}, step {step}");
        }
        // A pool built at once from the same eligible endpoints picks the same for every key.
        if matches!(strategy, "maglev" | "ring") {
            let fresh: TestPool = Pool::new(parse(), |_: &Endpoint| ());
            fresh.extend(
                want.iter()
                    .map(|(id, w)| Endpoint::new(id.clone()).with_weight(*w)),
            );
            assert_eq!(
                owners(&pool),
                owners(&fresh),
                "{strategy}, step {step} ({op:?})"
            );
            // And so does the strategy's own state prepared from scratch on these candidates.
            if let Some(state) =
                (!snap.eligible().is_empty()).then(|| pool.strategy().prepare(snap.eligible()))
            {
                for k in 0..500u64 {
                    let ctx = PickContext::new().with_hash(mix64(k));
                    assert_eq!(
                        pool.strategy().pick(&state, snap.eligible(), &ctx),
                        pool.pick_in(&snap, &ctx),
                        "{strategy}, step {step}, key {k}"
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn incremental_snapshots_match_fresh_ones(
        ops in prop::collection::vec(op(), 1..40),
        threshold in prop_oneof![Just(0u8), Just(50u8)],
    ) {
        for strategy in ["round_robin", "random", "p2c", "ring"] {
            check(strategy, &ops, threshold);
        }
    }

    #[test]
    fn incremental_maglev_tables_match_fresh_ones(ops in prop::collection::vec(op(), 1..16)) {
        check("maglev", &ops, 0);
    }
}

/// A large pool changed one endpoint at a time keeps agreeing with one built at once, and the
/// Maglev table size does not change with each endpoint (so keys stay put).
#[test]
fn a_large_pool_changed_one_at_a_time_agrees_with_a_fresh_one() {
    for strategy in ["maglev", "ring", "round_robin"] {
        let parse = || -> AnyStrategy { strategy.parse().expect("a built-in name") };
        let pool: TestPool = Pool::new(parse(), |_: &Endpoint| ());
        pool.extend((0..3_000).map(|i| Endpoint::new(format!("ep-{i}"))));
        for i in 0..40 {
            pool.remove(&EndpointId::new(format!("ep-{}", i * 7)));
            pool.insert(Endpoint::new(format!("new-{i}")).with_weight(1 + i % 3));
            pool.set_weight(&EndpointId::new(format!("ep-{}", i * 11 + 1)), 2);
        }
        let fresh: TestPool = Pool::new(parse(), |_: &Endpoint| ());
        fresh.extend(pool.endpoints().into_iter().map(|(e, _)| e));
        let ids = |p: &TestPool| {
            let mut v: Vec<(EndpointId, u32)> = p
                .snapshot()
                .eligible()
                .iter()
                .map(|c| (c.id().clone(), c.weight()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&pool), ids(&fresh), "{strategy}");
        if strategy != "round_robin" {
            assert_eq!(owners(&pool), owners(&fresh), "{strategy}");
        }
    }
}
