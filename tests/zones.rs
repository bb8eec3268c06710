//! Zone-aware routing: how picks spread over zones as endpoints go down, counted over many
//! picks (the shares are exact in the routing table; the picks are random, so counts are
//! checked within bounds many standard deviations wide), and one run through a `Balancer`
//! over real hyper servers on 127.0.0.1.

mod common;

/// The simulator example, run by a test below.
#[allow(dead_code)]
#[path = "../examples/zones.rs"]
mod example;

use std::collections::BTreeMap;
use std::time::Duration;

use lbkit::hints::PickHints;
use lbkit::pool::{Pool, ZoneAware};
use lbkit::strategy::{Maglev, PowerOfTwoChoices, RoundRobin, Strategy};
use lbkit::{Balancer, Endpoint, EndpointId};

use common::{ask, http_client, start_servers, within, HttpEndpoint};

/// Picks counted in each distribution test.
const PICKS: usize = 40_000;

fn id(s: &str) -> EndpointId {
    EndpointId::new(s)
}

/// `per_zone` endpoints named `{zone}{i}` in each of `zones`.
fn fleet(zones: &[&str], per_zone: usize) -> Vec<Endpoint> {
    zones
        .iter()
        .flat_map(|z| (0..per_zone).map(move |i| Endpoint::new(format!("{z}{i}")).with_zone(*z)))
        .collect()
}

fn zoned_pool<St: Strategy>(
    strategy: St,
    zones: ZoneAware,
    endpoints: Vec<Endpoint>,
) -> Pool<EndpointId, St> {
    let pool = Pool::builder(strategy)
        .zone_aware(zones)
        .build(|e: &Endpoint| e.id().clone());
    pool.extend(endpoints);
    pool
}

/// The share of `PICKS` picks that went to each zone ("-" for endpoints with no zone).
fn zone_counts<St: Strategy>(
    pool: &Pool<EndpointId, St>,
    hints: Option<&PickHints>,
) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..PICKS {
        let (c, _) = pool.pick(hints).expect("an eligible endpoint");
        *counts
            .entry(c.endpoint().zone().unwrap_or("-").to_owned())
            .or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(z, n)| (z, n as f64 / PICKS as f64))
        .collect()
}

/// Whether `share` is within 0.02 of `expected` (about 8 standard deviations at 40 000 picks).
fn near(share: Option<&f64>, expected: f64) -> bool {
    share.is_some_and(|s| (s - expected).abs() < 0.02)
}

fn assert_shares(got: &BTreeMap<String, f64>, expected: &[(&str, f64)]) {
    for (zone, want) in expected {
        assert!(
            near(got.get(*zone), *want) || (*want == 0.0 && !got.contains_key(*zone)),
            "zone {zone}: expected {want}, got {got:?}"
        );
    }
}

/// Three equal zones: all requests stay local; half the local zone down: 60 % stay, 20 %
/// spill to each other zone; the local zone back: local again.
#[test]
fn local_zone_losing_half_spills_in_proportion() {
    let pool = zoned_pool(
        RoundRobin::new(),
        ZoneAware::new("a"),
        fleet(&["a", "b", "c"], 4),
    );
    assert_eq!(pool.snapshot().local_zone_share(), Some(1.0));
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 1.0), ("b", 0.0), ("c", 0.0)],
    );

    pool.set_down(&id("a0"), true);
    pool.set_down(&id("a1"), true);
    let snap = pool.snapshot();
    let local = snap.local_zone_share().expect("zone-aware");
    assert!((local - 0.6).abs() < 1e-4, "{local}");
    let shares = snap.zone_shares().expect("zone-aware");
    assert_eq!(shares.len(), 3, "{shares:?}");
    for (zone, share) in &shares {
        let want = if zone.as_deref() == Some("a") {
            0.6
        } else {
            0.2
        };
        assert!((share - want).abs() < 1e-4, "{shares:?}");
    }
    let got = zone_counts(&pool, None);
    assert_shares(&got, &[("a", 0.6), ("b", 0.2), ("c", 0.2)]);

    pool.set_down(&id("a0"), false);
    pool.set_down(&id("a1"), false);
    assert_shares(&zone_counts(&pool, None), &[("a", 1.0)]);
}

/// A zone losing endpoints that is not the local one: the local zone still holds its share,
/// so nothing crosses; the spread per endpoint is the strategy's within the zone.
#[test]
fn other_zone_losses_keep_traffic_local() {
    let pool = zoned_pool(
        PowerOfTwoChoices::new(),
        ZoneAware::new("a"),
        fleet(&["a", "b", "c"], 4),
    );
    pool.set_down(&id("b0"), true);
    pool.set_down(&id("b1"), true);
    pool.set_down(&id("b2"), true);
    assert_eq!(pool.snapshot().local_zone_share(), Some(1.0));
    assert_shares(&zone_counts(&pool, None), &[("a", 1.0)]);
}

/// The fleet's spread given: two of four balancers in zone b, one each in a and c, and the
/// upstream spread equally: b holds a third of the capacity for half the fleet, so it keeps
/// two thirds of its requests and spills one sixth to each of a and c.
#[test]
fn local_cluster_spread_sets_the_local_share() {
    let zones = ZoneAware::new("b").local_cluster([("a", 1), ("b", 2), ("c", 1)]);
    let pool = zoned_pool(RoundRobin::new(), zones, fleet(&["a", "b", "c"], 4));
    let local = pool.snapshot().local_zone_share().expect("zone-aware");
    assert!((local - 2.0 / 3.0).abs() < 1e-4, "{local}");
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 1.0 / 6.0), ("b", 2.0 / 3.0), ("c", 1.0 / 6.0)],
    );

    // From zone a (a quarter of the fleet, a third of the capacity): all local.
    let zones = ZoneAware::new("a").local_cluster([("a", 1), ("b", 2), ("c", 1)]);
    let pool = zoned_pool(RoundRobin::new(), zones, fleet(&["a", "b", "c"], 4));
    assert_eq!(pool.snapshot().local_zone_share(), Some(1.0));
}

/// Spilled requests go by residual capacity: a zone already at its share of the fleet gets
/// none, endpoints with no zone (no balancer counted there) get all of theirs.
#[test]
fn spill_follows_residual_capacity() {
    // Fleet: 1 in a, 1 in b, 0 in c. Upstream: a 2, b 4, c 2 (8 in all).
    // a: 25 % of capacity for 50 % of the fleet -> half local.
    // residual: b 50 % - 50 % = 0, c 25 % - 0 = 25 % -> all spill to c.
    let zones = ZoneAware::new("a")
        .local_cluster([("a", 1), ("b", 1)])
        .min_cluster_size(1);
    let mut eps = fleet(&["a", "c"], 2);
    eps.extend(fleet(&["b"], 4));
    let pool = zoned_pool(RoundRobin::new(), zones, eps);
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 0.5), ("b", 0.0), ("c", 0.5)],
    );

    // Endpoints without a zone count as spare capacity; the default spread takes the named
    // zones only: a and b, half each. a: 2 of 8 = 25 % for 50 % -> half local; b: 2 of 8 for
    // 50 %: no residual; the 4 unzoned ones get the other half.
    let zones = ZoneAware::new("a").min_cluster_size(1);
    let mut eps = fleet(&["a", "b"], 2);
    eps.extend((0..4).map(|i| Endpoint::new(format!("n{i}"))));
    let pool = zoned_pool(RoundRobin::new(), zones, eps);
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 0.5), ("b", 0.0), ("-", 0.5)],
    );
}

/// Below the minimum cluster size, in panic, or with the local zone unknown to the fleet,
/// routing is zone-unaware: picks spread over every eligible endpoint.
#[test]
fn fallbacks_route_over_all_endpoints() {
    // 5 eligible endpoints < 6.
    let pool = zoned_pool(
        RoundRobin::new(),
        ZoneAware::new("a"),
        fleet(&["a", "b", "c"], 2),
    );
    pool.set_down(&id("c1"), true);
    assert_eq!(pool.snapshot().local_zone_share(), None);
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 0.4), ("b", 0.4), ("c", 0.2)],
    );

    // Panic: 3 of 12 healthy is under the threshold of 50 %.
    let p = Pool::builder(RoundRobin::new())
        .panic_threshold(50)
        .zone_aware(ZoneAware::new("a").min_cluster_size(1))
        .build(|e: &Endpoint| e.id().clone());
    p.extend(fleet(&["a", "b", "c"], 4));
    for e in fleet(&["a", "b", "c"], 4).iter().skip(3) {
        p.set_down(e.id(), true);
    }
    assert!(p.snapshot().is_panic());
    assert_eq!(p.snapshot().local_zone_share(), None);

    // The local zone has no balancer in the given spread, or an empty name.
    for zones in [
        ZoneAware::new("a").local_cluster([("b", 1), ("c", 1)]),
        ZoneAware::new("a").local_cluster([("a", 0), ("b", 1)]),
        ZoneAware::new(""),
    ] {
        let pool = zoned_pool(RoundRobin::new(), zones, fleet(&["a", "b", "c"], 4));
        assert_eq!(pool.snapshot().local_zone_share(), None);
        assert_shares(
            &zone_counts(&pool, None),
            &[("a", 1.0 / 3.0), ("b", 1.0 / 3.0), ("c", 1.0 / 3.0)],
        );
    }
}

/// The local zone with no healthy endpoint: everything spills, and a request that avoids
/// every endpoint of the zone it is routed to still gets one elsewhere.
#[test]
fn empty_local_zone_and_avoided_endpoints() {
    let pool = zoned_pool(
        RoundRobin::new(),
        ZoneAware::new("a"),
        fleet(&["a", "b", "c"], 4),
    );
    for i in 0..4 {
        pool.set_down(&id(&format!("a{i}")), true);
    }
    assert_eq!(pool.snapshot().local_zone_share(), Some(0.0));
    assert_shares(
        &zone_counts(&pool, None),
        &[("a", 0.0), ("b", 0.5), ("c", 0.5)],
    );

    let pool = zoned_pool(
        RoundRobin::new(),
        ZoneAware::new("a"),
        fleet(&["a", "b", "c"], 4),
    );
    let mut hints = PickHints::default();
    for i in 0..4 {
        hints.avoid(id(&format!("a{i}")));
    }
    // Routed to a, where nothing is allowed: the strategy picks again over every endpoint
    // (round robin takes the next allowed one in its order, so b gets more than c).
    let got = zone_counts(&pool, Some(&hints));
    assert!(!got.contains_key("a"), "{got:?}");
    assert!(near(Some(&(got["b"] + got["c"])), 1.0), "{got:?}");

    // A preferred (sticky) endpoint in another zone is honoured.
    let mut hints = PickHints::default();
    hints.prefer(id("c3"));
    assert_eq!(pool.pick(Some(&hints)).expect("pick").0.id(), &id("c3"));
}

/// Consistent hashing within the zone: a key maps to the same endpoint on every pick, and
/// that endpoint is in the local zone.
#[test]
fn hashing_stays_in_the_local_zone() {
    let pool = zoned_pool(
        Maglev::new(),
        ZoneAware::new("b"),
        fleet(&["a", "b", "c"], 4),
    );
    for key in 0..200u64 {
        let mut hints = PickHints::default();
        hints.set_hash(key.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let first = pool.pick(Some(&hints)).expect("pick").0;
        assert_eq!(first.endpoint().zone(), Some("b"));
        for _ in 0..3 {
            assert_eq!(pool.pick(Some(&hints)).expect("pick").0.id(), first.id());
        }
    }
}

/// Through a `Balancer` over real servers: six servers in zones a and b; from zone a, every
/// response comes from a's servers; with two of a's three down, a third of the requests stay.
#[tokio::test]
async fn balancer_over_real_servers() {
    within(Duration::from_secs(120), async {
        let servers = start_servers(6).await;
        let client = http_client();
        let pool = Pool::builder(RoundRobin::new())
            .zone_aware(ZoneAware::new("a").min_cluster_size(2))
            .build(move |e: &Endpoint| HttpEndpoint::new(client.clone(), e));
        pool.extend(
            servers
                .iter()
                .enumerate()
                .map(|(i, s)| s.endpoint().with_zone(if i < 3 { "a" } else { "b" })),
        );
        let balancer = Balancer::from_pool(pool.clone());
        let zone_a: Vec<String> = servers[..3].iter().map(|s| s.name().to_owned()).collect();
        for _ in 0..60 {
            let name = ask(&balancer).await.expect("request");
            assert!(zone_a.contains(&name), "{name} is not in zone a");
        }
        pool.set_down(&servers[0].endpoint().id().clone(), true);
        pool.set_down(&servers[1].endpoint().id().clone(), true);
        // a: 1 of 4 healthy (25 %) for half the fleet -> half the requests stay.
        assert!((pool.snapshot().local_zone_share().expect("zone-aware") - 0.5).abs() < 1e-4);
        let (mut local, n) = (0, 2_000);
        for _ in 0..n {
            let name = ask(&balancer).await.expect("request");
            assert_ne!(name, servers[0].name());
            assert_ne!(name, servers[1].name());
            local += usize::from(name == servers[2].name());
        }
        let share = local as f64 / n as f64;
        // 2 000 requests: one standard deviation is about 0.011.
        assert!((share - 0.5).abs() < 0.08, "local share {share}");
    })
    .await;
}

/// The simulator example's fleet (three zones of four, half of zone a lost at 20 s): no
/// request crosses zones before the loss, 40 % after (20 % to each other zone); zone-unaware
/// round robin sends two thirds across all along. Same seed, same report.
#[test]
fn simulated_loss_of_half_a_zone() {
    let scenario = example::scenario(1);
    let aware = example::run(&scenario, true);
    let before = Duration::ZERO..example::LOSS_AT;
    let after = example::LOSS_AT..Duration::from_secs(3600);
    assert_eq!(aware.zone_share_during("a", before.clone()), 1.0);
    let shares = ["a", "b", "c"].map(|z| aware.zone_share_during(z, after.clone()));
    assert!((shares[0] - 0.6).abs() < 0.03, "{shares:?}");
    assert!((shares[1] - 0.2).abs() < 0.03, "{shares:?}");
    assert!((shares[2] - 0.2).abs() < 0.03, "{shares:?}");
    assert!(aware.to_string().contains("share per zone: a "), "{aware}");

    let unaware = example::run(&scenario, false);
    let a = unaware.zone_share_during("a", before);
    assert!((a - 1.0 / 3.0).abs() < 0.01, "{a}");
    assert_eq!(example::run(&scenario, true), aware);
}
