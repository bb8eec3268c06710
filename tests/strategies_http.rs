//! The strategies and the balancer through real sockets: hyper HTTP/1.1 servers on 127.0.0.1
//! behind a `Balancer` whose endpoint services are a hyper-util client.

mod common;

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Frame;
use lbkit::health::SlowStart;
use lbkit::hints::PickHints;
use lbkit::strategy::{
    AnyStrategy, LeastConnections, PeakEwma, PowerOfTwoChoices, RoundRobin, Strategy,
};
use lbkit::{Balancer, Endpoint, EndpointId, Tier};
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use common::{
    ask, balancer, body_text, dead_addr, endpoints, get, hits, start_servers,
    start_streaming_server, wait_until, within, HttpEndpoint, TestServer, HANG,
};

/// Bound on a whole test; only catches a hang.
const LIMIT: Duration = Duration::from_secs(120);

fn id(s: &str) -> EndpointId {
    EndpointId::new(s)
}

/// Weights 5:1:1 give exactly 5:1:1 in every 7 consecutive responses, and the heavy endpoint's
/// picks are spread out (never 5 in a row), as nginx's smooth weighted round robin.
#[tokio::test]
async fn smooth_weighted_round_robin_5_1_1() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let eps = [
            servers[0].endpoint().with_weight(5),
            servers[1].endpoint(),
            servers[2].endpoint(),
        ];
        let b = balancer(eps, RoundRobin::new());

        let mut seq = Vec::with_capacity(70);
        for _ in 0..70 {
            seq.push(ask(&b).await.expect("request"));
        }
        println!("first 7 responses: {:?}", &seq[..7]);

        // The schedule is periodic with period 7 and starts at a random point of the cycle, so
        // every window of 7 (in particular the ones aligned at cycles) holds one whole cycle.
        for (start, window) in seq.windows(7).enumerate() {
            let count = |name: &str| window.iter().filter(|s| *s == name).count();
            assert_eq!(
                (count("s0"), count("s1"), count("s2")),
                (5, 1, 1),
                "window at {start}: {window:?}"
            );
        }
        let longest_s0_run = seq
            .split(|s| s != "s0")
            .map(<[String]>::len)
            .max()
            .unwrap_or(0);
        assert!(
            longest_s0_run < 5,
            "s0 picked {longest_s0_run} times in a row: {seq:?}"
        );
        assert_eq!(hits(&servers), [50, 10, 10]);
    })
    .await;
}

/// An endpoint holding slow requests gets none of the new ones while they are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_the_endpoint_holding_slow_requests() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        // s0 holds its answers until released: its requests stay in flight for as long as the
        // test needs, on any machine.
        servers[0].hold(1);
        let b = balancer(endpoints(&servers), LeastConnections::new());
        let slow_state = b.pool().state(&id("s0")).expect("s0 is in the pool");

        const SLOW: u64 = 5;
        let mut slow = JoinSet::new();
        for _ in 0..SLOW {
            let mut req = get();
            PickHints::of_mut(&mut req).prefer(id("s0"));
            let b = b.clone();
            slow.spawn(async move {
                let res = b.oneshot(req).await.expect("slow request");
                body_text(res.into_body()).await
            });
        }
        wait_until(HANG, "the slow requests to reach s0", || {
            servers[0].hits() == SLOW
        })
        .await;
        assert_eq!(slow_state.in_flight(), SLOW);

        // 20 new requests, 4 at a time: the fast endpoints never hold more than 4 (< 5).
        let before = hits(&servers);
        let mut answers = Vec::new();
        for _ in 0..5 {
            for r in join_all((0..4).map(|_| ask(&b))).await {
                answers.push(r.expect("new request"));
            }
        }
        assert_eq!(slow_state.in_flight(), SLOW, "the slow requests are held");
        let after = hits(&servers);
        println!(
            "new requests per server: {:?}",
            [
                after[0] - before[0],
                after[1] - before[1],
                after[2] - before[2]
            ]
        );
        assert!(!answers.iter().any(|a| a == "s0"), "{answers:?}");
        assert_eq!(after[0], before[0], "s0 got new requests");
        assert_eq!(after[1] + after[2] - before[1] - before[2], 20);

        servers[0].release();
        while let Some(done) = slow.join_next().await {
            assert_eq!(done.expect("slow task"), "s0");
        }
        assert_eq!(slow_state.in_flight(), 0);
        assert_eq!(b.pool().in_flight(), 0);
    })
    .await;
}

/// Sends `TOTAL` requests with `CONCURRENCY` workers over 3 servers of which `s0` is slow and
/// the others answer at once; returns the requests each server received.
///
/// Slow without a clock: `s0` holds each answer until the other two have answered `HOLD`
/// requests since it arrived (and all of them once every request is sent), so it is many
/// times slower than they are on any machine. An even split would give it a third; with
/// power of two choices over in-flight counts it never holds more than 8 requests at once
/// (a pick of `s0` needs the other sample to hold as many, out of the 15 other workers), so
/// it gets at most 8 per `HOLD` answers of the others, plus 8: 32 of 300.
async fn load_with_one_slow_server<St: Strategy>(strategy: St) -> Vec<u64> {
    const TOTAL: usize = 300;
    const CONCURRENCY: usize = 16;
    const HOLD: u64 = 100;
    let servers = Arc::new(start_servers(3).await);
    servers[0].hold(HOLD);
    let b: Balancer<HttpEndpoint, St> = balancer(endpoints(&servers), strategy);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (b, next, servers) = (b.clone(), next.clone(), servers.clone());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                if ask(&b).await.expect("request") != "s0" {
                    servers[0].advance();
                }
            }
        });
    }
    // Once every request is sent, s0 answers the ones it holds. (Were all the workers held
    // by s0, as with a strategy blind to load, it lets them go instead of hanging the test.)
    let s0 = b.pool().state(&id("s0")).expect("s0 is in the pool");
    wait_until(HANG, "every request sent", || {
        if s0.in_flight() == CONCURRENCY as u64 {
            (0..HOLD).for_each(|_| servers[0].advance());
        }
        next.load(Ordering::Relaxed) >= TOTAL
    })
    .await;
    servers[0].release();
    while let Some(done) = workers.join_next().await {
        done.expect("worker");
    }
    let hits = hits(&servers);
    assert_eq!(hits.iter().sum::<u64>(), TOTAL as u64);
    assert_eq!(b.pool().in_flight(), 0);
    hits
}

/// The share of requests the slow server may get. An even split would give it 1/3; load-aware
/// strategies give it a few requests at the start (while its load does not show yet) and then
/// few more. Seen locally: about 7 % (round robin: a third).
const SLOW_SHARE_BOUND: f64 = 0.15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_little_to_a_slow_server() {
    within(LIMIT, async {
        let hits = load_with_one_slow_server(PowerOfTwoChoices::new()).await;
        let share = hits[0] as f64 / hits.iter().sum::<u64>() as f64;
        println!(
            "p2c: requests per server {hits:?}, slow share {:.1} %",
            share * 100.0
        );
        assert!(
            share < SLOW_SHARE_BOUND,
            "slow share {share:.3} with p2c: {hits:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_little_to_a_slow_server() {
    within(LIMIT, async {
        let hits = load_with_one_slow_server(PeakEwma::new()).await;
        let share = hits[0] as f64 / hits.iter().sum::<u64>() as f64;
        println!(
            "peak_ewma: requests per server {hits:?}, slow share {:.1} %",
            share * 100.0
        );
        assert!(
            share < SLOW_SHARE_BOUND,
            "slow share {share:.3} with peak EWMA: {hits:?}"
        );
    })
    .await;
}

/// Without concurrency, in-flight counts are all 0 and tell nothing: peak EWMA still avoids an
/// endpoint it has seen answer slowly, from its latency estimate alone.
#[tokio::test]
async fn peak_ewma_remembers_a_slow_answer() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        // Slower than an answer on 127.0.0.1 takes on any machine, however busy.
        servers[0].set_delay(Duration::from_secs(1));
        let b = balancer(endpoints(&servers), PeakEwma::new());
        let mut req = get();
        PickHints::of_mut(&mut req).prefer(id("s0"));
        let res = b.clone().oneshot(req).await.expect("slow request");
        assert_eq!(body_text(res.into_body()).await, "s0");
        let slow = b.pool().state(&id("s0")).expect("in the pool");
        assert!(slow.latency_ewma() >= Duration::from_secs(1));

        // The estimate decays over the pool's 10 s window: far from the 30 ms that new
        // endpoints start with, for the many seconds these requests could take.
        let mut answers = Vec::new();
        for _ in 0..50 {
            answers.push(ask(&b).await.expect("request"));
        }
        let after = hits(&servers);
        println!("sequential requests after one slow answer: {after:?}");
        assert_eq!(after[0], 1, "s0 got new requests: {answers:?}");
        assert_eq!(after[1] + after[2], 50);
    })
    .await;
}

/// Asserts that a request through `b` fails with "no endpoint" on its very first poll (at
/// once: nothing to wait for).
fn assert_no_endpoint<St: Strategy>(b: &Balancer<HttpEndpoint, St>, what: &str) {
    let res = b
        .clone()
        .oneshot(get())
        .now_or_never()
        .unwrap_or_else(|| panic!("{what}: the request did not fail at once"));
    let err = res.expect_err(what);
    assert!(err.is_no_endpoint(), "{what}: {err:?}");
    assert!(
        !err.is_endpoint() && err.endpoint_id().is_none(),
        "{what}: {err:?}"
    );
}

/// An empty pool, and a pool whose endpoints are all down, fail at once with every strategy.
#[tokio::test]
async fn no_endpoint_fails_at_once() {
    within(LIMIT, async {
        let servers = start_servers(2).await;
        for name in AnyStrategy::NAMES {
            let strategy: AnyStrategy = name.parse().expect("built-in name");
            let empty = balancer(Vec::<Endpoint>::new(), strategy);
            assert_no_endpoint(&empty, &format!("{name}, empty pool"));

            let b = balancer(endpoints(&servers), strategy);
            for s in &servers {
                assert!(b.pool().set_down(&id(s.name()), true));
            }
            assert_no_endpoint(&b, &format!("{name}, all down"));

            // And it serves again once one comes back.
            assert!(b.pool().set_down(&id("s1"), false));
            assert_eq!(ask(&b).await.expect("s1 is up"), "s1", "{name}");
        }
        assert_eq!(hits(&servers), [0, AnyStrategy::NAMES.len() as u64]);
    })
    .await;
}

/// A backend with nothing listening gives an endpoint error naming it, counted as an error.
#[tokio::test]
async fn dead_backend_is_an_endpoint_error() {
    within(LIMIT, async {
        let dead = dead_addr().await;
        let b = balancer([Endpoint::new("dead").with_addr(dead)], RoundRobin::new());
        let err = ask(&b).await.expect_err("nothing listens there");
        println!("error: {err} (source: {:?})", err.source());
        assert!(err.is_endpoint() && !err.is_no_endpoint(), "{err:?}");
        assert_eq!(err.endpoint_id().map(EndpointId::as_str), Some("dead"));
        assert!(err.source().is_some(), "the client's error is kept");
        let state = b.pool().state(&id("dead")).expect("still in the pool");
        assert_eq!(
            (state.requests(), state.errors(), state.in_flight()),
            (1, 1, 0)
        );
    })
    .await;
}

/// Backups get nothing while a primary is healthy, everything while none is, and nothing again
/// once a primary is back.
#[tokio::test]
async fn backup_tier_takes_over_only_while_primaries_are_down() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let eps = [
            servers[0].endpoint(),
            servers[1].endpoint(),
            servers[2].endpoint().with_tier(Tier::BACKUP),
        ];
        let b = balancer(eps, RoundRobin::new());
        let pool = b.pool();

        for _ in 0..20 {
            assert_ne!(ask(&b).await.expect("primaries up"), "s2");
        }
        assert_eq!(hits(&servers), [10, 10, 0]);

        assert!(pool.set_down(&id("s0"), true));
        for _ in 0..10 {
            assert_eq!(ask(&b).await.expect("s1 up"), "s1");
        }
        assert_eq!(
            hits(&servers),
            [10, 20, 0],
            "one primary left: no backup yet"
        );

        assert!(pool.set_down(&id("s1"), true));
        for _ in 0..20 {
            assert_eq!(ask(&b).await.expect("backup up"), "s2");
        }
        assert_eq!(hits(&servers), [10, 20, 20]);

        assert!(pool.set_down(&id("s0"), false));
        for _ in 0..20 {
            assert_eq!(ask(&b).await.expect("s0 back"), "s0");
        }
        assert_eq!(hits(&servers), [30, 20, 20]);
    })
    .await;
}

/// With HTTP completion (the default), a request counts as in flight while its body streams, and stops
/// counting when the body ends (before it is dropped), or when it is dropped half read.
#[tokio::test]
async fn complete_on_body_counts_streaming_responses() {
    within(LIMIT, async {
        let (server, mut bodies) = start_streaming_server("stream").await;
        let b = balancer([server.endpoint()], LeastConnections::new());
        let state = b.pool().state(&id("stream")).expect("in the pool");

        let mut req = get();
        let record = PickHints::of_mut(&mut req).record_pick();
        let res = b.clone().oneshot(req).await.expect("response head");
        assert_eq!(
            record.endpoint().as_ref().map(|id| id.as_str()),
            Some("stream")
        );
        let tx = bodies.recv().await.expect("the server's body sender");
        assert_eq!(state.in_flight(), 1, "head received, body not yet");
        let mut body = res.into_body();
        let mut got = Vec::new();
        for i in 0..3 {
            tx.unbounded_send(Ok(Frame::data(Bytes::from(format!("chunk{i};")))))
                .expect("client still reading");
            let frame = body.frame().await.expect("a frame").expect("no error");
            got.extend_from_slice(frame.data_ref().expect("data frame"));
            assert_eq!(state.in_flight(), 1, "body still streaming after chunk {i}");
            assert_eq!(b.pool().in_flight(), 1);
        }
        drop(tx);
        assert!(body.frame().await.is_none(), "the body ends");
        assert_eq!(
            state.in_flight(),
            0,
            "ended bodies stop counting before being dropped"
        );
        assert_eq!(b.pool().in_flight(), 0);
        assert_eq!(got, b"chunk0;chunk1;chunk2;");
        drop(body);

        // A body dropped half read stops counting too.
        let res = b.clone().oneshot(get()).await.expect("response head");
        let tx = bodies.recv().await.expect("the server's body sender");
        let mut body = res.into_body();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"partial"))))
            .expect("client still reading");
        body.frame().await.expect("a frame").expect("no error");
        assert_eq!(state.in_flight(), 1);
        drop(body);
        assert_eq!(state.in_flight(), 0, "a dropped body stops counting");
        assert_eq!((state.requests(), state.errors()), (2, 0));
        assert_eq!(server.hits(), 2);
    })
    .await;
}

/// Sends `n` requests through `b` that stay in flight: each is picked (the balancer's `call`)
/// before the next one is, and the servers hold every answer until released. Returns the
/// tasks that end once the servers answer.
async fn held_requests<St: Strategy>(b: &Balancer<HttpEndpoint, St>, n: u64) -> JoinSet<String> {
    let mut held = JoinSet::new();
    for _ in 0..n {
        let mut svc = b.clone();
        let answer = svc
            .ready()
            .await
            .expect("the balancer is ready")
            .call(get());
        held.spawn(async move { body_text(answer.await.expect("held request").into_body()).await });
    }
    held
}

/// The strategies that pick by load per unit of weight.
fn least_connections_and_p2c() -> [AnyStrategy; 2] {
    [
        LeastConnections::new().into(),
        PowerOfTwoChoices::new().into(),
    ]
}

/// Weights 3:1 over two equal servers give a 3:1 split with least connections and with
/// power of two choices, both at zero load (requests one after the other: nothing in flight,
/// every comparison a tie, broken by weight) and under load (16 requests held in flight at
/// once: each goes to the lower in-flight count per unit of weight). Counts only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_3_1_split_3_1_with_least_connections_and_p2c() {
    within(LIMIT, async {
        for strategy in least_connections_and_p2c() {
            let name = strategy.name();
            let servers = start_servers(2).await;
            let b = balancer(
                [servers[0].endpoint().with_weight(3), servers[1].endpoint()],
                strategy,
            );

            // Zero load: 400 requests, one after the other; 300 expected on s0 (σ ≈ 8.7).
            const SEQUENTIAL: u64 = 400;
            for _ in 0..SEQUENTIAL {
                ask(&b).await.expect("request");
            }
            let zero_load = hits(&servers);
            println!("{name}: zero load, weights 3:1: {zero_load:?}");
            assert!(
                (250..=350).contains(&zero_load[0]),
                "{name}: zero load split {zero_load:?}, expected about 300:100"
            );

            // Under load: 16 requests in flight at once split 12:4 (±1 for the tie-breaks).
            const HELD: u64 = 16;
            servers.iter().for_each(|s| s.hold(1));
            let mut held = held_requests(&b, HELD).await;
            wait_until(HANG, "the held requests to reach the servers", || {
                hits(&servers).iter().sum::<u64>() == SEQUENTIAL + HELD
            })
            .await;
            let loaded: Vec<u64> = hits(&servers)
                .iter()
                .zip(&zero_load)
                .map(|(after, before)| after - before)
                .collect();
            println!("{name}: {HELD} in flight, weights 3:1: {loaded:?}");
            assert!(
                (11..=13).contains(&loaded[0]),
                "{name}: in-flight split {loaded:?}, expected 12:4"
            );
            servers.iter().for_each(TestServer::release);
            while let Some(done) = held.join_next().await {
                done.expect("held request");
            }
            assert_eq!(b.pool().in_flight(), 0);
        }
    })
    .await;
}

/// Slow start acts on least connections and P2C: an endpoint that comes back ramps from a
/// tenth of its weight (1 against 10 and 10 here: about 1/21 of the requests at zero load, 1
/// of 21 held in flight), and gets its third once its ramp ends. The ramp window is an hour,
/// so the test never reaches its end by time: it ends the ramp by stopping slow start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_returning_endpoint_under_least_connections_and_p2c() {
    within(LIMIT, async {
        for strategy in least_connections_and_p2c() {
            let name = strategy.name();
            let servers = start_servers(3).await;
            let b = balancer(endpoints(&servers), strategy);
            let ramp = SlowStart::new(Duration::from_secs(3600)).spawn(b.pool());
            assert!(b.pool().set_down(&id("s2"), true));
            assert!(b.pool().set_down(&id("s2"), false));
            let weights: Vec<u32> = b
                .pool()
                .snapshot()
                .eligible()
                .iter()
                .map(|c| c.weight())
                .collect();
            assert_eq!(weights, [10, 10, 1], "{name}: ramped weights");

            // Zero load: 420 requests, 20 expected on s2 (σ ≈ 4.4).
            const SEQUENTIAL: u64 = 420;
            for _ in 0..SEQUENTIAL {
                ask(&b).await.expect("request");
            }
            let ramping = hits(&servers);
            println!("{name}: zero load, s2 ramping: {ramping:?}");
            assert!(
                (1..=45).contains(&ramping[2]),
                "{name}: the ramping endpoint got {} of {SEQUENTIAL}: {ramping:?}",
                ramping[2]
            );

            // Under load: of 21 requests in flight, s2 holds 1 (2 at most with tie-breaks).
            servers.iter().for_each(|s| s.hold(1));
            let mut held = held_requests(&b, 21).await;
            wait_until(HANG, "the held requests to reach the servers", || {
                hits(&servers).iter().sum::<u64>() == SEQUENTIAL + 21
            })
            .await;
            let loaded = hits(&servers)[2] - ramping[2];
            println!("{name}: 21 in flight, s2 ramping holds {loaded}");
            assert!(loaded <= 2, "{name}: s2 holds {loaded} of 21");
            servers.iter().for_each(TestServer::release);
            while let Some(done) = held.join_next().await {
                done.expect("held request");
            }

            // The ramp ends: s2 gets its third again.
            ramp.abort();
            wait_until(HANG, "the ramp to end", || {
                b.pool()
                    .snapshot()
                    .eligible()
                    .iter()
                    .all(|c| c.weight() == 1)
            })
            .await;
            let before = hits(&servers);
            for _ in 0..300 {
                ask(&b).await.expect("request");
            }
            let after = hits(&servers)[2] - before[2];
            println!("{name}: after the ramp, s2 got {after} of 300");
            assert!((60..=140).contains(&after), "{name}: s2 got {after} of 300");
        }
    })
    .await;
}
