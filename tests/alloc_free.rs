//! The pick path neither locks nor allocates: a counting global allocator checks that picking
//! an endpoint (with every built-in strategy, with and without a hash key) and sending a
//! request through a [`Balancer`] make no heap allocation once warmed up.
//!
//! Allocations are counted per thread, so the test harness and other tests running at the
//! same time do not disturb the count. To find where an unexpected allocation comes from, run
//! with `LBKIT_ALLOC_BACKTRACE=1`: the first allocation inside a counted region prints a
//! backtrace.
//!
//! ```text
//! LBKIT_ALLOC_BACKTRACE=1 cargo test --test alloc_free -- --nocapture
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};

use lbkit::hash::mix64;
use lbkit::pool::ZoneAware;
use lbkit::strategy::{
    AnyStrategy, LeastConnections, Maglev, PeakEwma, PickContext, PowerOfTwoChoices, Random, Ring,
    RoundRobin, Strategy,
};
use lbkit::{Balancer, Endpoint, PickHints, Pool};
use tower::{service_fn, Service};

// ---------------------------------------------------------------------------------------------
// The counting allocator.

struct Counting;

thread_local! {
    /// Allocations made by this thread while counting.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Whether this thread is in a counted region.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Whether to print a backtrace of the first allocation in a counted region.
    static BACKTRACE: Cell<bool> = const { Cell::new(false) };
    /// Set while the allocator itself is capturing a backtrace (which allocates).
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

#[inline]
fn record() {
    // `try_with`: thread locals may be gone while a thread shuts down. Const-initialised
    // `Cell`s need no destructor, so touching them never allocates.
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if !counting || IN_HOOK.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let n = ALLOCS.with(|a| {
        a.set(a.get() + 1);
        a.get()
    });
    if n == 1 && BACKTRACE.with(Cell::get) {
        IN_HOOK.with(|h| h.set(true));
        let bt = std::backtrace::Backtrace::force_capture();
        eprintln!("first allocation in a counted region:\n{bt}");
        IN_HOOK.with(|h| h.set(false));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting touches only const-initialised
// thread-local `Cell`s (and, when asked for, captures a backtrace under a re-entrancy guard).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns how many heap allocations this thread made during it.
fn allocations<R>(f: impl FnOnce() -> R) -> u64 {
    let backtrace = std::env::var_os("LBKIT_ALLOC_BACKTRACE").is_some();
    BACKTRACE.with(|b| b.set(backtrace));
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    drop(black_box(out));
    ALLOCS.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// Pools.

/// A service that is cheap to clone and never allocates.
#[derive(Clone, Copy, Debug)]
struct Noop;

const ENDPOINTS: usize = 100;
const PICKS: u64 = 10_000;

/// A pool of `n` endpoints, weighted 1 to 5 when `weighted`, with some requests in flight so
/// load-aware strategies compare real numbers.
fn pool<St: Strategy>(strategy: St, n: usize, weighted: bool) -> Pool<Noop, St> {
    let pool = Pool::new(strategy, |_: &Endpoint| Noop);
    pool.extend((0..n).map(|i| {
        let e = Endpoint::new(format!("10.0.{}.{}:8080", i / 256, i % 256));
        if weighted {
            e.with_weight(1 + (i % 5) as u32)
        } else {
            e
        }
    }));
    pool
}

/// Allocations made by `PICKS` picks without hints, after one warm-up pick.
fn pick_allocations<S: Clone, St: Strategy>(pool: &Pool<S, St>) -> u64 {
    // The first pick on a thread may set up thread-local state (the random number generator,
    // arc-swap's debt list): that is a one-time cost, not the hot path.
    assert!(pool.pick(None).is_some());
    allocations(|| {
        for _ in 0..PICKS {
            black_box(pool.pick(black_box(None)));
        }
    })
}

/// Allocations made by `PICKS` picks with hints carrying a different hash key each time.
fn hashed_pick_allocations<S: Clone, St: Strategy>(pool: &Pool<S, St>) -> u64 {
    hinted_pick_allocations(pool, PickHints::default())
}

/// Allocations made by `PICKS` picks with `hints`, its hash key set anew for each pick.
fn hinted_pick_allocations<S: Clone, St: Strategy>(
    pool: &Pool<S, St>,
    mut hints: PickHints,
) -> u64 {
    hints.set_hash(1);
    assert!(pool.pick(Some(&hints)).is_some());
    allocations(|| {
        for i in 0..PICKS {
            hints.set_hash(mix64(i));
            black_box(pool.pick(Some(black_box(&hints))));
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Picks.

#[test]
fn round_robin_equal_weights_pick_does_not_allocate() {
    assert_eq!(
        pick_allocations(&pool(RoundRobin::new(), ENDPOINTS, false)),
        0
    );
}

#[test]
fn round_robin_weighted_pick_does_not_allocate() {
    let pool = pool(RoundRobin::new(), ENDPOINTS, true);
    assert!(
        !pool.snapshot().eligible().is_empty(),
        "the weighted pool has endpoints"
    );
    assert_eq!(pick_allocations(&pool), 0);
}

/// With zone-aware routing, local (the local zone holds its share) and spilling (it does
/// not) alike: the routing table is built with the snapshot, not per pick.
#[test]
fn zone_aware_picks_do_not_allocate() {
    let pool = Pool::builder(PowerOfTwoChoices::new())
        .zone_aware(ZoneAware::new("z0"))
        .build(|_: &Endpoint| Noop);
    pool.extend((0..30).map(|i| Endpoint::new(format!("e{i}")).with_zone(format!("z{}", i % 3))));
    assert_eq!(pool.snapshot().local_zone_share(), Some(1.0));
    assert_eq!(pick_allocations(&pool), 0);
    for i in (0..15).step_by(3) {
        pool.set_down(&format!("e{i}").as_str().into(), true);
    }
    assert!(pool.snapshot().local_zone_share().is_some_and(|s| s < 1.0));
    assert_eq!(pick_allocations(&pool), 0);
    assert_eq!(hashed_pick_allocations(&pool), 0);
}

#[test]
fn random_pick_does_not_allocate() {
    assert_eq!(pick_allocations(&pool(Random::new(), ENDPOINTS, false)), 0);
    assert_eq!(pick_allocations(&pool(Random::new(), ENDPOINTS, true)), 0);
}

#[test]
fn least_connections_pick_does_not_allocate() {
    let pool = pool(LeastConnections::new(), ENDPOINTS, true);
    assert_eq!(pick_allocations(&pool), 0);
}

#[test]
fn p2c_pick_does_not_allocate() {
    assert_eq!(
        pick_allocations(&pool(PowerOfTwoChoices::new(), ENDPOINTS, false)),
        0
    );
    assert_eq!(
        pick_allocations(&pool(PowerOfTwoChoices::new(), ENDPOINTS, true)),
        0
    );
}

#[test]
fn peak_ewma_pick_does_not_allocate() {
    assert_eq!(pick_allocations(&pool(PeakEwma::new(), ENDPOINTS, true)), 0);
}

#[test]
fn maglev_pick_does_not_allocate() {
    assert_eq!(pick_allocations(&pool(Maglev::new(), ENDPOINTS, false)), 0);
    assert_eq!(pick_allocations(&pool(Maglev::new(), ENDPOINTS, true)), 0);
}

#[test]
fn ring_pick_does_not_allocate() {
    assert_eq!(pick_allocations(&pool(Ring::new(), ENDPOINTS, true)), 0);
}

#[test]
fn hashed_picks_do_not_allocate() {
    assert_eq!(
        hashed_pick_allocations(&pool(Maglev::new(), ENDPOINTS, true)),
        0
    );
    assert_eq!(
        hashed_pick_allocations(&pool(Ring::new(), ENDPOINTS, true)),
        0
    );
    // A bounded-load ring whose endpoints are busy takes the slower, load-checking path.
    let endpoints: Vec<String> = (0..ENDPOINTS).map(|i| format!("10.3.0.{i}:80")).collect();
    let mut busy = Balancer::new(
        endpoints.iter().map(String::as_str),
        Ring::new(),
        |_: &Endpoint| ready_service(),
    )
    .with_completion(lbkit::balance::CompleteOnResponse);
    // Response futures count as in flight until dropped.
    let held: Vec<_> = (0..3 * ENDPOINTS)
        .map(|_| busy.call(http::Request::new(())))
        .collect();
    assert_eq!(busy.pool().in_flight(), 3 * ENDPOINTS as u64);
    assert_eq!(hashed_pick_allocations(busy.pool()), 0);
    drop(held);
}

#[test]
fn any_strategy_picks_do_not_allocate() {
    for name in AnyStrategy::NAMES {
        let strategy: AnyStrategy = name.parse().unwrap();
        let pool = pool(strategy, ENDPOINTS, true);
        assert_eq!(pick_allocations(&pool), 0, "{name} without a hash key");
        assert_eq!(hashed_pick_allocations(&pool), 0, "{name} with a hash key");
    }
}

#[test]
fn picks_avoiding_endpoints_do_not_allocate() {
    // A retry's hints: a hash key and endpoints to avoid (built before counting).
    let pool = pool(Maglev::new(), ENDPOINTS, false);
    let mut hints = PickHints::default();
    for c in pool.snapshot().eligible().iter().take(10) {
        hints.avoid(c.id().clone());
    }
    assert_eq!(hinted_pick_allocations(&pool, hints), 0);
}

#[test]
fn picks_in_a_held_snapshot_do_not_allocate() {
    let pool = pool(PowerOfTwoChoices::new(), ENDPOINTS, false);
    let snapshot = pool.snapshot();
    let ctx = PickContext::new();
    assert!(pool.pick_in(&snapshot, &ctx).is_some());
    let n = allocations(|| {
        for _ in 0..PICKS {
            black_box(pool.pick_in(&snapshot, black_box(&ctx)));
        }
    });
    assert_eq!(n, 0);
}

// ---------------------------------------------------------------------------------------------
// The balancer.

/// Polls a future that is expected to be ready at once.
fn poll_ready_now<F: Future>(fut: F) -> F::Output {
    let fut = pin!(fut);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    match fut.poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the inner service is always ready"),
    }
}

type Ok0 = Ready<Result<(), Infallible>>;

fn ready_service(
) -> impl Service<http::Request<()>, Response = (), Error = Infallible, Future = Ok0> + Clone {
    service_fn(|_req: http::Request<()>| ready(Ok::<_, Infallible>(())))
}

/// Allocations made by calling `balancer` once per request and polling each response future
/// to completion (requests are built before counting).
fn call_allocations<S>(balancer: &mut S, requests: Vec<http::Request<()>>) -> u64
where
    S: Service<http::Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut requests = requests.into_iter();
    // Warm up: the first call sets up thread-local state and registers tracing call sites.
    let first = requests.next().expect("at least one request");
    poll_ready_now(std::future::poll_fn(|cx| balancer.poll_ready(cx))).unwrap();
    poll_ready_now(balancer.call(first)).unwrap();
    allocations(|| {
        for req in requests.by_ref() {
            poll_ready_now(std::future::poll_fn(|cx| balancer.poll_ready(cx))).unwrap();
            black_box(poll_ready_now(balancer.call(req)).unwrap());
        }
    })
}

const CALLS: usize = 1_000;

#[test]
fn balancer_call_does_not_allocate() {
    let endpoints: Vec<String> = (0..ENDPOINTS).map(|i| format!("10.1.0.{i}:80")).collect();
    let mut balancer = Balancer::new(
        endpoints.iter().map(String::as_str),
        PowerOfTwoChoices::new(),
        |_: &Endpoint| ready_service(),
    )
    .with_completion(lbkit::balance::CompleteOnResponse);
    let requests = (0..=CALLS).map(|_| http::Request::new(())).collect();
    assert_eq!(call_allocations(&mut balancer, requests), 0);
    assert_eq!(balancer.pool().in_flight(), 0, "every request has ended");
}

#[test]
fn balancer_call_with_hash_key_does_not_allocate() {
    let endpoints: Vec<String> = (0..ENDPOINTS).map(|i| format!("10.2.0.{i}:80")).collect();
    let mut balancer = Balancer::new(
        endpoints.iter().map(String::as_str),
        Maglev::new(),
        |_: &Endpoint| ready_service(),
    )
    .with_completion(lbkit::balance::CompleteOnResponse);
    let requests = (0..=CALLS as u64)
        .map(|i| {
            let mut req = http::Request::new(());
            PickHints::of_mut(&mut req).set_hash(mix64(i));
            req
        })
        .collect();
    assert_eq!(call_allocations(&mut balancer, requests), 0);
}

#[test]
fn http_balancer_call_does_not_allocate() {
    // HTTP completion: the request stays in flight until the response body ends. Dropping
    // the tracked body ends it; nothing on the way may allocate.
    let endpoints: Vec<String> = (0..ENDPOINTS).map(|i| format!("10.3.0.{i}:80")).collect();
    let mut balancer = Balancer::new(
        endpoints.iter().map(String::as_str),
        PowerOfTwoChoices::new(),
        |_: &Endpoint| {
            service_fn(|_req: http::Request<()>| {
                ready(Ok::<_, Infallible>(http::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                )))
            })
        },
    );
    let requests: Vec<_> = (0..=CALLS).map(|_| http::Request::new(())).collect();
    let mut requests = requests.into_iter();
    let first = requests.next().unwrap();
    drop(poll_ready_now(balancer.call(first)).unwrap());
    let n = allocations(|| {
        for req in requests.by_ref() {
            let res = poll_ready_now(balancer.call(req)).unwrap();
            drop(black_box(res));
        }
    });
    assert_eq!(n, 0);
    assert_eq!(balancer.pool().in_flight(), 0, "every body was dropped");
}

// ---------------------------------------------------------------------------------------------
// The counter itself.

/// A strategy that allocates on every pick, to show the counter sees allocations made deep in
/// the pick path.
struct Leaky;

impl Strategy for Leaky {
    type State = ();

    fn prepare(&self, _: &lbkit::endpoint::Candidates) {}

    fn pick(&self, _: &(), _: &lbkit::endpoint::Candidates, _: &PickContext<'_>) -> Option<usize> {
        black_box(Box::new(0u64));
        Some(0)
    }

    fn name(&self) -> &'static str {
        "leaky"
    }
}

#[test]
fn counter_sees_allocations_in_the_pick_path() {
    assert_eq!(pick_allocations(&pool(Leaky, 3, false)), PICKS);
}

// ---------------------------------------------------------------------------------------------
// No lock.

#[test]
fn picks_go_on_while_a_writer_holds_the_pool_lock() {
    use std::sync::mpsc;
    use std::time::Duration;

    let pool = pool(PowerOfTwoChoices::new(), ENDPOINTS, false);
    let before = pool.snapshot().version();
    let (locked_tx, locked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            // `update` holds the writers' lock for as long as its closure runs.
            pool.update(|c| {
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                c.insert(Endpoint::new("late"));
            })
        })
    };
    locked_rx.recv().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let reader = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            for _ in 0..PICKS {
                black_box(pool.pick(None).expect("an endpoint"));
            }
            done_tx.send(()).unwrap();
        })
    };
    let finished = done_rx.recv_timeout(Duration::from_secs(10));
    release_tx.send(()).unwrap();
    writer.join().unwrap();
    reader.join().unwrap();
    assert!(
        finished.is_ok(),
        "picks waited for the writer's lock: the pick path must not lock"
    );
    assert_eq!(pool.snapshot().version(), before + 1);
}
