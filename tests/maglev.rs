//! Consistent hashing over named endpoints (no sockets): how many keys move when an endpoint
//! goes away, whether independently built pools agree, and weighted shares.

use lbkit::hash::stable_hash;
use lbkit::strategy::{Maglev, PickContext, Ring, Strategy};
use lbkit::{Endpoint, EndpointId, Pool};

const KEYS: u64 = 100_000;

fn key_hash(k: u64) -> u64 {
    stable_hash(format!("key-{k}").as_bytes())
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ep-{i}")).collect()
}

/// A pool of named endpoints (their services are `()`), inserted one by one in `order`.
fn pool<St: Strategy>(strategy: St, order: impl IntoIterator<Item = Endpoint>) -> Pool<(), St> {
    let pool = Pool::new(strategy, |_: &Endpoint| ());
    for e in order {
        pool.insert(e);
    }
    pool
}

/// The endpoint each of the `KEYS` keys goes to.
fn owners<St: Strategy>(pool: &Pool<(), St>) -> Vec<EndpointId> {
    let snap = pool.snapshot();
    (0..KEYS)
        .map(|k| {
            let ctx = PickContext::new().with_hash(key_hash(k));
            let i = pool.pick_in(&snap, &ctx).expect("endpoints are eligible");
            snap.eligible()[i].id().clone()
        })
        .collect()
}

struct Movement {
    /// Share of all keys whose endpoint changed.
    moved: f64,
    /// Share of the keys not on the removed endpoint that kept their endpoint.
    others_stayed: f64,
}

/// Removes `victim` from a pool of `n` endpoints and measures how keys move.
fn remove_one<St: Strategy>(strategy: St, n: usize, victim: usize) -> Movement {
    let names = names(n);
    let pool = pool(strategy, names.iter().map(|s| Endpoint::new(s.as_str())));
    let before = owners(&pool);
    let gone = EndpointId::new(names[victim].as_str());
    assert!(pool.remove(&gone));
    let after = owners(&pool);

    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let others: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(b, _)| **b != gone)
        .collect();
    let others_stayed = others.iter().filter(|(b, a)| b == a).count();
    assert!(
        after.iter().all(|a| *a != gone),
        "a key still goes to the removed endpoint"
    );
    Movement {
        moved: moved as f64 / KEYS as f64,
        others_stayed: others_stayed as f64 / others.len() as f64,
    }
}

#[test]
fn maglev_moves_about_one_nth_of_keys_when_an_endpoint_goes() {
    for n in [10, 100] {
        for victim in [0, n / 2, n - 1] {
            let m = remove_one(Maglev::new(), n, victim);
            println!(
                "maglev n = {n}, removed ep-{victim}: {:.2} % of keys moved (1/n = {:.2} %), \
                 {:.2} % of the other keys stayed",
                m.moved * 100.0,
                100.0 / n as f64,
                m.others_stayed * 100.0
            );
            assert!(
                m.moved <= 1.0 / n as f64 + 0.01,
                "n = {n}: {:.4} of keys moved",
                m.moved
            );
            assert!(
                m.others_stayed >= 0.99,
                "n = {n}: only {:.4} of the other keys stayed",
                m.others_stayed
            );
        }
    }
}

#[test]
fn ring_moves_only_the_removed_endpoints_keys() {
    for n in [10, 100] {
        let m = remove_one(Ring::new().load_factor(f64::INFINITY), n, n / 2);
        println!(
            "ring n = {n}: {:.2} % of keys moved, {:.2} % of the other keys stayed",
            m.moved * 100.0,
            m.others_stayed * 100.0
        );
        assert_eq!(m.others_stayed, 1.0, "n = {n}");
        assert!(
            m.moved <= 2.0 / n as f64,
            "n = {n}: {:.4} of keys moved",
            m.moved
        );
    }
}

/// Two pools built apart, with the same endpoints inserted in different orders (and one of them
/// with an endpoint that came and went), agree on every key.
fn independent_pools_agree<St: Strategy>(strategy: impl Fn() -> St) {
    for n in [10, 100] {
        let names = names(n);
        let a = pool(strategy(), names.iter().map(|s| Endpoint::new(s.as_str())));
        // Odd indices from the top down, then even ones from the bottom up (n is even).
        let shuffled = names.iter().rev().step_by(2).chain(names.iter().step_by(2));
        let b = pool(strategy(), shuffled.map(|s| Endpoint::new(s.as_str())));
        b.insert(Endpoint::new("temporary"));
        assert!(b.remove(&EndpointId::new("temporary")));
        assert_eq!(b.snapshot().eligible().len(), n);

        let (owners_a, owners_b) = (owners(&a), owners(&b));
        let disagree = owners_a
            .iter()
            .zip(&owners_b)
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(disagree, 0, "n = {n}: {disagree} keys differ");
    }
}

#[test]
fn maglev_pools_built_apart_agree_on_every_key() {
    independent_pools_agree(Maglev::new);
}

#[test]
fn ring_pools_built_apart_agree_on_every_key() {
    independent_pools_agree(|| Ring::new().load_factor(f64::INFINITY));
}

#[test]
fn weighted_maglev_shares_follow_weights() {
    let p = pool(
        Maglev::new(),
        [
            Endpoint::new("w1").with_weight(1),
            Endpoint::new("w2").with_weight(2),
            Endpoint::new("w3").with_weight(3),
        ],
    );
    let owners = owners(&p);
    for (name, weight) in [("w1", 1.0), ("w2", 2.0), ("w3", 3.0)] {
        let share = owners.iter().filter(|o| *o == name).count() as f64 / KEYS as f64;
        let want = weight / 6.0;
        println!(
            "maglev weight {weight}: {:.2} % of keys (want {:.2} %)",
            share * 100.0,
            want * 100.0
        );
        assert!(
            (share - want).abs() <= 0.02,
            "{name}: share {share:.4}, want {want:.4}"
        );
    }
}

/// In a large pool (where the table has more than the minimum size) an endpoint leaving moves
/// only about its share of keys: the table size does not change with each endpoint.
#[test]
fn maglev_in_a_large_pool_moves_about_one_nth_of_keys() {
    let n = 5_000;
    let names = names(n);
    let pool = Pool::new(Maglev::new(), |_: &Endpoint| ());
    pool.extend(names.iter().map(|s| Endpoint::new(s.as_str())));
    assert!(Maglev::new().len_for(n) > Maglev::MIN_TABLE);
    assert_eq!(Maglev::new().len_for(n), Maglev::new().len_for(n - 1));
    let before = owners(&pool);
    let gone = EndpointId::new(names[n / 3].as_str());
    assert!(pool.remove(&gone));
    let after = owners(&pool);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / KEYS as f64;
    println!("maglev n = {n}: {:.3} % of keys moved", moved * 100.0);
    assert!(moved <= 1.0 / n as f64 + 0.01, "{moved:.4} of keys moved");
}
