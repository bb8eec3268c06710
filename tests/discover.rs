//! Discovery: live changes of the endpoint set under load, draining, batching, and the
//! `tower::discover` adapters, over real servers on 127.0.0.1.
//!
//! No assertion depends on how fast the machine is: slow requests are held by their server
//! until released, traffic is counted in requests, and the time limits only catch hangs.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use lbkit::discover::{self, PoolDiscover};
use lbkit::strategy::{PowerOfTwoChoices, RoundRobin};
use lbkit::{Endpoint, EndpointId, Pool};
use tower::discover::Change;
use tower::{Service, ServiceExt};

/// Runs `workers` loops of requests through `balancer` until `stop` (or `max` requests in all),
/// counting successes and failures.
fn load<St: lbkit::strategy::Strategy>(
    balancer: &lbkit::Balancer<HttpEndpoint, St>,
    workers: usize,
    max: u64,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinSet<()>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (b, ok, failed, stop) = (balancer.clone(), ok.clone(), failed.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::SeqCst)
                && ok.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst) < max
            {
                match ask(&b).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("request failed: {e:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        });
    }
    (ok, failed, set)
}

/// Bound on a whole test; only catches a hang.
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_remove_and_reweight_under_load() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
        let balancer = balancer([a.endpoint(), b.endpoint()], RoundRobin::new());
        let pool = balancer.pool().clone();

        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, mut workers) = load(&balancer, 4, 20_000, stop.clone());
        wait_until(HANG, "traffic to a and b", || a.hits() > 10 && b.hits() > 10).await;

        // Added: gets traffic.
        assert!(pool.insert(c.endpoint()));
        wait_until(HANG, "traffic to the new endpoint", || c.hits() > 10).await;

        // Removed while holding slow requests: they finish, and nothing new reaches it. (b
        // holds its answers until released: slow for as long as the test needs.)
        b.hold(1);
        let slow_from = b.hits();
        let b_id = EndpointId::from(b.name());
        let b_state = pool.state(&b_id).expect("b is in the pool");
        wait_until(HANG, "slow requests in flight on b", || {
            b.hits() >= slow_from + 2 && b_state.in_flight() >= 2
        })
        .await;
        assert!(pool.remove(&b_id));
        assert!(pool.state(&b_id).is_none());
        let in_flight_at_removal = b_state.in_flight();
        assert!(
            in_flight_at_removal >= 2,
            "the slow requests were still in flight at removal"
        );
        let removed_at = std::time::Instant::now();
        b.release();
        wait_until(HANG, "b to drain", || b_state.in_flight() == 0).await;
        let drain_time = removed_at.elapsed();
        let b_hits = b.hits();
        let ok_before = ok.load(Ordering::SeqCst);
        wait_until(HANG, "more traffic after the removal", || {
            ok.load(Ordering::SeqCst) > ok_before + 200
        })
        .await;
        assert_eq!(b.hits(), b_hits, "a removed endpoint got new requests");
        // Nothing holds the drained endpoint any more: no snapshot, no guard, no service clone.
        wait_until(HANG, "the drained endpoint to be released", || {
            Arc::strong_count(&b_state) == 1
        })
        .await;

        stop.store(true, Ordering::SeqCst);
        while workers.join_next().await.is_some() {}
        assert_eq!(
            failed.load(Ordering::SeqCst),
            0,
            "requests failed during changes"
        );
        eprintln!(
            "requests: {} ok, {} in flight on the removed endpoint when it was removed, drained in {:?}",
            ok.load(Ordering::SeqCst),
            in_flight_at_removal,
            drain_time
        );

        // Re-weighted: round robin follows the new weights exactly, cycle by cycle.
        assert!(pool.set_weight(&EndpointId::from(a.name()), 3));
        let (a0, c0) = (a.hits(), c.hits());
        for _ in 0..400 {
            ask(&balancer).await.expect("request succeeds");
        }
        assert_eq!((a.hits() - a0, c.hits() - c0), (300, 100));
    })
    .await;
}

#[tokio::test]
async fn a_burst_of_changes_is_one_snapshot() {
    let pool: Pool<(), RoundRobin> = Pool::new(RoundRobin::new(), |_: &Endpoint| ());
    let versions = pool.watch();
    let before = *versions.borrow();
    pool.update(|c| {
        for i in 0..1_000 {
            c.insert(Endpoint::new(format!("ep-{i}")));
        }
        c.remove(&"ep-7".into());
    });
    assert_eq!(*versions.borrow(), before + 1);
    assert_eq!(pool.snapshot().eligible().len(), 999);
    // No change, no new snapshot.
    pool.insert(Endpoint::new("ep-1"));
    assert_eq!(*versions.borrow(), before + 1);
}

#[tokio::test]
async fn fed_from_a_tower_discover_stream() {
    within(LIMIT, async {
        let servers = start_servers(2).await;
        let client = http_client();
        let pool: Pool<HttpEndpoint, RoundRobin> =
            Pool::builder(RoundRobin::new()).build_with_services();
        let balancer = lbkit::Balancer::from_pool(pool.clone());

        let (tx, rx) = futures::channel::mpsc::unbounded();
        let feeder = tokio::spawn({
            let pool = pool.clone();
            async move { discover::feed(&pool, rx).await }
        });
        for s in &servers {
            let svc = HttpEndpoint::new(client.clone(), &s.endpoint());
            tx.unbounded_send(Ok::<_, std::convert::Infallible>(Change::Insert(
                s.addr(),
                svc,
            )))
            .unwrap();
        }
        wait_until(HANG, "both endpoints", || {
            pool.snapshot().eligible().len() == 2
        })
        .await;
        let mut names: Vec<String> = Vec::new();
        for _ in 0..4 {
            names.push(ask(&balancer).await.unwrap());
        }
        names.sort();
        assert_eq!(names, ["s0", "s0", "s1", "s1"]);

        for s in &servers {
            tx.unbounded_send(Ok(Change::Remove(s.addr()))).unwrap();
        }
        wait_until(HANG, "an empty pool", || pool.snapshot().is_empty()).await;
        let err = ask(&balancer).await.unwrap_err();
        assert!(err.is_no_endpoint());

        drop(tx);
        feeder.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_p2c_runs_over_an_lbkit_pool() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let balancer = balancer(endpoints(&servers), PowerOfTwoChoices::new());
        let pool = balancer.pool().clone();

        let discover = tower::load::PendingRequestsDiscover::new(
            PoolDiscover::new(&pool),
            tower::load::CompleteOnResponse::default(),
        );
        let mut tower_balance = tower::balance::p2c::Balance::new(discover);
        for _ in 0..30 {
            let res = tower_balance
                .ready()
                .await
                .expect("tower balancer ready")
                .call(get())
                .await
                .expect("request through tower's balancer");
            assert!(res.status().is_success());
        }
        assert!(servers.iter().all(|s| s.hits() > 0), "{:?}", hits(&servers));
        assert_eq!(tower_balance.len(), 3);
        // Another follower of the pool, read directly.
        let mut follower = PoolDiscover::new(&pool);
        let mut tell = async || {
            let change = tokio::time::timeout(HANG, follower.next())
                .await
                .expect("a change")
                .map(|c| c.expect("infallible"));
            match change {
                Some(Change::Insert(id, _)) => format!("+{id}"),
                Some(Change::Remove(id)) => format!("-{id}"),
                None => "end".to_owned(),
            }
        };
        let mut told = Vec::new();
        for _ in 0..3 {
            told.push(tell().await);
        }

        // A health mark in lbkit reaches tower's balancer as a removal (which it takes in
        // when it is polled for readiness).
        pool.set_down(&EndpointId::from(servers[0].name()), true);
        let deadline = std::time::Instant::now() + HANG;
        while tower_balance.len() != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the removal did not reach tower's balancer"
            );
            tower_balance.ready().await.expect("tower balancer ready");
            tokio::task::yield_now().await;
        }
        told.push(tell().await);
        let before = servers[0].hits();
        for _ in 0..30 {
            tower_balance
                .ready()
                .await
                .unwrap()
                .call(get())
                .await
                .unwrap();
        }
        assert_eq!(servers[0].hits(), before, "{:?}", hits(&servers));

        // The stream ends when the pool is gone.
        drop((balancer, pool));
        told.push(tell().await);
        assert_eq!(told, ["+s0", "+s1", "+s2", "-s0", "end"]);
    })
    .await;
}
