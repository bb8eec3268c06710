//! The cost of the pick path: picking an endpoint with each built-in strategy, applying a
//! change to a large pool, picking while another thread changes the pool, and the per-request
//! overhead of a `Balancer`.
//!
//! Run with `cargo bench --bench pick` (a few minutes); pass a filter to run part of it, such as
//! `cargo bench --bench pick -- pick/maglev`. Groups:
//!
//! - `pick/<strategy>/<endpoints>`: `Pool::pick(None)`, the whole path (snapshot load, strategy,
//!   cloning the candidate and its service), at 10 to 10 000 endpoints;
//! - `strategy_only/<strategy>/100`: the strategy alone, picking in a snapshot already held
//!   (`Pool::pick_in`), to set against `pick/<strategy>/100`;
//! - `pick_hashed/<strategy>/<endpoints>`: the same with `PickHints` carrying a new hash key
//!   each time (consistent-hashing strategies);
//! - `update/<strategy>/10000`: inserting one endpoint into a pool of 10 000 and removing it
//!   again (two snapshot publishes); `update/<strategy>_reweight/10000`: changing the weight of
//!   one endpoint and back (two publishes);
//! - `pick_under_writes/<writer>/10000`: `Pool::pick(None)` with power of two choices, alone
//!   and while another thread publishes changes to the same pool non-stop;
//! - `balancer_call/<service>/<endpoints>`: `Balancer::call` with a service whose future is
//!   ready at once, polled to completion, next to calling that service directly.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
};
use lbkit::endpoint::EndpointId;
use lbkit::hash::mix64;
use lbkit::strategy::{
    LeastConnections, Maglev, PeakEwma, PickContext, PowerOfTwoChoices, Random, Ring, RoundRobin,
    Strategy,
};
use lbkit::{Balancer, Endpoint, PickHints, Pool};
use tower::{service_fn, Service};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
const LARGE: usize = 10_000;

/// An endpoint service that costs nothing to clone.
#[derive(Clone, Copy, Debug)]
struct Noop;

fn endpoint(i: usize, weighted: bool) -> Endpoint {
    let e = Endpoint::new(format!(
        "10.{}.{}.{}:8080",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    ));
    if weighted {
        // Weights 1 to 10, so weighted round robin needs a real schedule.
        e.with_weight(1 + (i % 10) as u32)
    } else {
        e
    }
}

fn pool<St: Strategy>(strategy: St, n: usize, weighted: bool) -> Pool<Noop, St> {
    let pool = Pool::new(strategy, |_: &Endpoint| Noop);
    pool.extend((0..n).map(|i| endpoint(i, weighted)));
    pool
}

/// A different, well-spread hash key each call (a stand-in for hashing a request's key).
struct Keys(u64);

impl Keys {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix64(self.0)
    }
}

fn pick_cases<St: Strategy>(
    c: &mut Criterion,
    group: &str,
    name: &str,
    strategy: impl Fn() -> St,
    weighted: bool,
    hashed: bool,
) {
    let mut g = c.benchmark_group(group);
    for n in SIZES {
        let pool = pool(strategy(), n, weighted);
        g.bench_with_input(BenchmarkId::new(name, n), &pool, |b, pool| {
            if hashed {
                let mut keys = Keys(0);
                let mut hints = PickHints::default();
                b.iter(|| {
                    hints.set_hash(keys.next());
                    pool.pick(Some(black_box(&hints)))
                });
            } else {
                b.iter(|| pool.pick(black_box(None)));
            }
        });
    }
    g.finish();
}

fn picks(c: &mut Criterion) {
    pick_cases(c, "pick", "round_robin", RoundRobin::new, false, false);
    pick_cases(
        c,
        "pick",
        "round_robin_weighted",
        RoundRobin::new,
        true,
        false,
    );
    pick_cases(c, "pick", "random", Random::new, false, false);
    pick_cases(
        c,
        "pick",
        "least_connections",
        LeastConnections::new,
        false,
        false,
    );
    pick_cases(c, "pick", "p2c", PowerOfTwoChoices::new, false, false);
    pick_cases(c, "pick", "peak_ewma", PeakEwma::new, false, false);
    pick_cases(c, "pick", "maglev", Maglev::new, false, false);
    pick_cases(c, "pick", "ring", Ring::new, false, false);
}

/// The strategy alone: a pick in a snapshot already held, returning an index (no snapshot load,
/// no clone of the candidate or its service). Set beside `pick/<strategy>/100`, it shows what
/// the rest of the path costs.
fn strategy_case<St: Strategy>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, strategy: St) {
    const N: usize = 100;
    let pool = pool(strategy, N, false);
    let snapshot = pool.snapshot();
    let ctx = PickContext::new();
    g.bench_function(BenchmarkId::new(name, N), |b| {
        b.iter(|| pool.pick_in(&snapshot, black_box(&ctx)))
    });
}

fn strategy_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("strategy_only");
    strategy_case(&mut g, "round_robin", RoundRobin::new());
    strategy_case(&mut g, "random", Random::new());
    strategy_case(&mut g, "least_connections", LeastConnections::new());
    strategy_case(&mut g, "p2c", PowerOfTwoChoices::new());
    strategy_case(&mut g, "peak_ewma", PeakEwma::new());
    strategy_case(&mut g, "maglev", Maglev::new());
    strategy_case(&mut g, "ring", Ring::new());
    g.finish();
}

fn hashed_picks(c: &mut Criterion) {
    pick_cases(c, "pick_hashed", "maglev", Maglev::new, false, true);
    pick_cases(c, "pick_hashed", "ring", Ring::new, false, true);
}

/// Inserts one endpoint and removes it again: two snapshot publishes.
fn insert_then_remove<St: Strategy>(pool: &Pool<Noop, St>, id: &EndpointId) {
    pool.insert(Endpoint::new(id.clone()));
    pool.remove(id);
}

fn update_case<St: Strategy>(c: &mut Criterion, name: &str, strategy: St) {
    let pool = pool(strategy, LARGE, false);
    let id = EndpointId::new("10.255.255.255:8080");
    let mut g = c.benchmark_group("update");
    // Rebuilding a Maglev table or a ring takes milliseconds: few, flat samples.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    g.bench_function(BenchmarkId::new(name, LARGE), |b| {
        b.iter(|| insert_then_remove(&pool, &id))
    });
    // Re-weighting one endpoint and back: two changes.
    let weighted = EndpointId::new("10.0.19.136:8080");
    g.bench_function(BenchmarkId::new(format!("{name}_reweight"), LARGE), |b| {
        b.iter(|| {
            pool.set_weight(&weighted, 2);
            pool.set_weight(&weighted, 1);
        })
    });
    g.finish();
}

fn updates(c: &mut Criterion) {
    update_case(c, "round_robin", RoundRobin::new());
    update_case(c, "random", Random::new());
    update_case(c, "least_connections", LeastConnections::new());
    update_case(c, "p2c", PowerOfTwoChoices::new());
    update_case(c, "peak_ewma", PeakEwma::new());
    update_case(c, "maglev", Maglev::new());
    update_case(c, "ring", Ring::new());
}

/// A thread that publishes changes to `pool` until stopped, counting its publishes.
struct Writer {
    stop: Arc<AtomicBool>,
    publishes: Arc<AtomicU64>,
    started: Instant,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start<St: Strategy>(pool: &Pool<Noop, St>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let publishes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (pool, stop, publishes) = (pool.clone(), stop.clone(), publishes.clone());
            std::thread::spawn(move || {
                let id = EndpointId::new("10.255.255.255:8080");
                while !stop.load(Ordering::Relaxed) {
                    insert_then_remove(&pool, &id);
                    publishes.fetch_add(2, Ordering::Relaxed);
                }
            })
        };
        Writer {
            stop,
            publishes,
            started: Instant::now(),
            thread,
        }
    }

    /// Stops the writer; returns its publishes per second.
    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the writer ran to its end");
        self.publishes.load(Ordering::Relaxed) as f64 / self.started.elapsed().as_secs_f64()
    }
}

fn picks_under_writes(c: &mut Criterion) {
    let pool = pool(PowerOfTwoChoices::new(), LARGE, false);
    let mut g = c.benchmark_group("pick_under_writes");
    g.bench_function(BenchmarkId::new("p2c_no_writer", LARGE), |b| {
        b.iter(|| pool.pick(black_box(None)))
    });
    let writer = Writer::start(&pool);
    g.bench_function(BenchmarkId::new("p2c_with_writer", LARGE), |b| {
        b.iter(|| pool.pick(black_box(None)))
    });
    let rate = writer.stop();
    g.finish();
    println!("pick_under_writes: the writer published {rate:.0} snapshots/s of {LARGE} endpoints");
}

/// Polls a future that is ready at once.
#[inline]
fn now<F: Future>(fut: F) -> F::Output {
    let fut = pin!(fut);
    match fut.poll(&mut Context::from_waker(futures::task::noop_waker_ref())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("the service is always ready"),
    }
}

/// Sends one request through `svc` (`poll_ready`, `call`, poll the future to completion).
#[inline]
fn send<S: Service<http::Request<()>>>(svc: &mut S) -> Result<S::Response, S::Error> {
    now(std::future::poll_fn(|cx| svc.poll_ready(cx)))?;
    now(svc.call(http::Request::new(())))
}

fn balancer_calls(c: &mut Criterion) {
    const N: usize = 100;
    let ready_ok = || service_fn(|_: http::Request<()>| ready(Ok::<_, Infallible>(())));
    let ready_response =
        || service_fn(|_: http::Request<()>| ready(Ok::<_, Infallible>(http::Response::new(()))));
    let addrs: Vec<Endpoint> = (0..N).map(|i| endpoint(i, false)).collect();

    let mut g = c.benchmark_group("balancer_call");
    let mut direct = ready_ok();
    g.bench_function(BenchmarkId::new("direct_service", 1), |b| {
        b.iter(|| send(&mut direct))
    });
    let mut rr = Balancer::new(addrs.clone(), RoundRobin::new(), move |_: &Endpoint| {
        ready_ok()
    })
    .with_completion(lbkit::balance::CompleteOnResponse);
    g.bench_function(BenchmarkId::new("round_robin", N), |b| {
        b.iter(|| send(&mut rr))
    });
    let mut p2c = Balancer::new(
        addrs.clone(),
        PowerOfTwoChoices::new(),
        move |_: &Endpoint| ready_ok(),
    )
    .with_completion(lbkit::balance::CompleteOnResponse);
    g.bench_function(BenchmarkId::new("p2c", N), |b| b.iter(|| send(&mut p2c)));
    // HTTP completion: in flight until the response body ends.
    let mut direct_http = ready_response();
    g.bench_function(BenchmarkId::new("direct_service_http", 1), |b| {
        b.iter(|| send(&mut direct_http))
    });
    let mut p2c_http = Balancer::new(addrs, PowerOfTwoChoices::new(), move |_: &Endpoint| {
        ready_response()
    });
    g.bench_function(BenchmarkId::new("p2c_http", N), |b| {
        b.iter(|| send(&mut p2c_http))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50);
    targets = picks, strategy_only, hashed_picks, updates, picks_under_writes, balancer_calls
}
criterion_main!(benches);
