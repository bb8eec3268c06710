//! lbkit's pick path side by side with the same job done by `tower::balance::p2c` and by the
//! `pingora-load-balancing` crate, in one run.
//!
//! Run with `cd benches/compare && cargo bench` (about 5 minutes on 2 cores), or a part of it
//! with a filter, such as `cargo bench -- p2c/`. Each criterion group is one job, and within a
//! group the implementations are measured one after the other at each size, so the output reads
//! side by side:
//!
//! - `p2c/<impl>/<endpoints>`: power of two choices over in-flight requests. `lbkit_call` is
//!   `Balancer::call` and polling its future to completion; `tower_call` is tower's
//!   `Balance::poll_ready` + `call` + polling, over a `ServiceList` wrapped in
//!   `PendingRequestsDiscover`. Both pick and dispatch to the same always-ready service, so
//!   these two are the like-for-like pair. `lbkit_pick` is the bare `Pool::pick(None)`.
//! - `peak_ewma/<impl>/<endpoints>`: the same with lbkit's `PeakEwma` and tower's
//!   `PeakEwmaDiscover` (both with a 30 ms starting estimate and a 10 s decay).
//! - `round_robin/<impl>/<endpoints>`: lbkit's `Pool::pick(None)` with `RoundRobin` against
//!   pingora's `LoadBalancer<RoundRobin>::select(b"", 256)`.
//! - `hash/<impl>/<endpoints>`: consistent hashing of a new 16-byte key each pick: lbkit's
//!   `PickHints::set_hash_key` + `Pool::pick` with `Maglev` and with `Ring`, against pingora's
//!   `LoadBalancer<KetamaHashing>::select(key, 256)` over the same keys. At 10 000 endpoints,
//!   `lbkit_maglev_65537_slots` is Maglev with a table 16 times smaller than its default there.
//! - `update/<impl>/10000`: one endpoint added to a set of 10 000 and removed again (two
//!   changes per iteration): lbkit's `Pool::insert` + `Pool::remove` per strategy, tower's
//!   `Balance` taking `Change::Insert` and `Change::Remove` from its discover stream, and
//!   pingora's `LoadBalancer::update` from a discovery that alternates between the two sets.
//! - `threads/<impl>/<threads>`: picks from one shared balancer of 1 000 endpoints by 1, 2 and
//!   4 threads at once (the reported throughput is the total picks per second). tower's
//!   `Balance` needs `&mut self`, so it is shared the tower way, behind `tower::buffer::Buffer`,
//!   with tokio tasks on a two-worker runtime; `lbkit_call_tasks` is lbkit's `Balancer` called
//!   the same way, for the like-for-like pair.
//!
//! No request leaves the process: the endpoints are in-memory services, and the socket
//! addresses (`127.x.y.z:8080`) are only names.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::poll_fn;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures::FutureExt;
use lbkit::endpoint::EndpointId;
use lbkit::strategy::{Maglev, PeakEwma, PowerOfTwoChoices, Ring, RoundRobin, Strategy};
use lbkit::{Balancer, Endpoint, PickHints, Pool};
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::selection::consistent::KetamaHashing;
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::{Service, ServiceExt};

const SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
const LARGE: usize = 10_000;
/// Endpoints behind the balancer that several threads pick from at once.
const SHARED: usize = 1_000;
const THREADS: [usize; 3] = [1, 2, 4];

use common::*;

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(25);
}

fn p2c(c: &mut Criterion) {
    let mut g = c.benchmark_group("p2c");
    configure(&mut g);
    for n in SIZES {
        let pool = lbkit_pool(PowerOfTwoChoices::new(), n);
        g.bench_function(BenchmarkId::new("lbkit_pick", n), |b| {
            b.iter(|| pool.pick(black_box(None)))
        });
        let mut balancer = Balancer::from_pool(pool).with_completion(lbkit::balance::CompleteOnResponse);
        g.bench_function(BenchmarkId::new("lbkit_call", n), |b| {
            b.iter(|| send(&mut balancer))
        });
        let mut tower = tower_p2c(n);
        g.bench_function(BenchmarkId::new("tower_call", n), |b| {
            b.iter(|| send(&mut tower))
        });
    }
    g.finish();
}

fn peak_ewma(c: &mut Criterion) {
    let mut g = c.benchmark_group("peak_ewma");
    configure(&mut g);
    for n in SIZES {
        let pool = lbkit_pool(PeakEwma::new(), n);
        g.bench_function(BenchmarkId::new("lbkit_pick", n), |b| {
            b.iter(|| pool.pick(black_box(None)))
        });
        let mut balancer = Balancer::from_pool(pool).with_completion(lbkit::balance::CompleteOnResponse);
        g.bench_function(BenchmarkId::new("lbkit_call", n), |b| {
            b.iter(|| send(&mut balancer))
        });
        let mut tower = tower_peak_ewma(n);
        g.bench_function(BenchmarkId::new("tower_call", n), |b| {
            b.iter(|| send(&mut tower))
        });
    }
    g.finish();
}

fn round_robin(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_robin");
    configure(&mut g);
    for n in SIZES {
        let pool = lbkit_pool(RoundRobin::new(), n);
        g.bench_function(BenchmarkId::new("lbkit_pick", n), |b| {
            b.iter(|| pool.pick(black_box(None)))
        });
        let lb = pingora_lb::<pingora_load_balancing::selection::RoundRobin>(n);
        g.bench_function(BenchmarkId::new("pingora_select", n), |b| {
            b.iter(|| lb.select(black_box(b""), 256))
        });
    }
    g.finish();
}

fn lbkit_hashed<St: Strategy>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    pool: &Pool<ReadyOk, St>,
    n: usize,
) {
    g.bench_function(BenchmarkId::new(name, n), |b| {
        let mut keys = Keys(0);
        let mut hints = PickHints::default();
        b.iter(|| {
            hints.set_hash_key(&keys.next());
            pool.pick(Some(black_box(&hints)))
        })
    });
}

fn hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    configure(&mut g);
    for n in SIZES {
        lbkit_hashed(&mut g, "lbkit_maglev", &lbkit_pool(Maglev::new(), n), n);
        if n == LARGE {
            // The default table at 10 000 endpoints has 1 000 003 slots (4 MB, four times a
            // core's L2 on the machine this was written on); the smallest default table (65 537
            // slots, 256 KiB) shows how much of the cost at this size is the table's cache misses.
            let small = Maglev::new().table_size(Maglev::MIN_TABLE);
            lbkit_hashed(&mut g, "lbkit_maglev_65537_slots", &lbkit_pool(small, n), n);
        }
        lbkit_hashed(&mut g, "lbkit_ring", &lbkit_pool(Ring::new(), n), n);
        let lb = pingora_lb::<KetamaHashing>(n);
        g.bench_function(BenchmarkId::new("pingora_ketama", n), |b| {
            let mut keys = Keys(0);
            b.iter(|| lb.select(&keys.next(), 256))
        });
    }
    g.finish();
}

/// A pingora discovery that hands out two sets in turn: the 10 000 endpoints, then the same
/// with one more. Each `LoadBalancer::update` is then one change.
struct Alternate {
    sets: [BTreeSet<Backend>; 2],
    next: AtomicUsize,
}

#[async_trait::async_trait]
impl ServiceDiscovery for Alternate {
    async fn discover(&self) -> pingora_error::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % 2;
        Ok((self.sets[i].clone(), HashMap::new()))
    }
}

fn pingora_update_case<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
) where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let base: BTreeSet<Backend> = (0..LARGE)
        .map(|i| Backend::new(&addr(i)).expect("valid address"))
        .collect();
    let mut more = base.clone();
    more.insert(Backend::new(&addr(LARGE)).expect("valid address"));
    let discovery = Alternate {
        sets: [base, more],
        next: AtomicUsize::new(0),
    };
    let lb = LoadBalancer::<S>::from_backends(Backends::new(Box::new(discovery)));
    let update = |lb: &LoadBalancer<S>| {
        lb.update()
            .now_or_never()
            .expect("a static discovery never waits")
            .expect("a static discovery never fails")
    };
    update(&lb);
    assert_eq!(lb.backends().get_backend().len(), LARGE);
    g.bench_function(BenchmarkId::new(name, LARGE), |b| {
        b.iter(|| {
            update(&lb); // 10 001
            update(&lb); // 10 000
        })
    });
    assert_eq!(lb.backends().get_backend().len(), LARGE);
}

fn lbkit_update_case<St: Strategy>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    strategy: St,
) {
    let pool = lbkit_pool(strategy, LARGE);
    let id = EndpointId::new(addr(LARGE));
    g.bench_function(BenchmarkId::new(name, LARGE), |b| {
        b.iter(|| {
            pool.insert(Endpoint::new(id.clone()));
            pool.remove(&id)
        })
    });
}

type ChangeTx = futures::channel::mpsc::UnboundedSender<Result<Change<usize, ReadyOk>, Infallible>>;

/// tower's p2c `Balance` over a discover stream fed by hand: 10 000 inserts first, then one
/// insert and one remove per iteration, each taken in by a `poll_ready`.
fn tower_update_case<B>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    make: impl FnOnce(
        futures::channel::mpsc::UnboundedReceiver<Result<Change<usize, ReadyOk>, Infallible>>,
    ) -> B,
) where
    B: Service<Request>,
    B::Error: std::fmt::Debug,
{
    let (tx, rx): (ChangeTx, _) = futures::channel::mpsc::unbounded();
    for i in 0..LARGE {
        tx.unbounded_send(Ok(Change::Insert(i, ReadyOk)))
            .expect("open");
    }
    let mut balance = make(rx);
    now(poll_fn(|cx| balance.poll_ready(cx))).expect("ready");
    g.bench_function(BenchmarkId::new(name, LARGE), |b| {
        b.iter(|| {
            tx.unbounded_send(Ok(Change::Insert(LARGE, ReadyOk)))
                .expect("open");
            now(poll_fn(|cx| balance.poll_ready(cx))).expect("ready");
            tx.unbounded_send(Ok(Change::Remove(LARGE))).expect("open");
            now(poll_fn(|cx| balance.poll_ready(cx))).expect("ready");
        })
    });
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    // Rebuilding a Maglev table, a ring or a Ketama continuum of 10 000 endpoints takes
    // milliseconds: few samples of one size each.
    g.sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    lbkit_update_case(&mut g, "lbkit_round_robin", RoundRobin::new());
    lbkit_update_case(&mut g, "lbkit_p2c", PowerOfTwoChoices::new());
    lbkit_update_case(&mut g, "lbkit_peak_ewma", PeakEwma::new());
    lbkit_update_case(&mut g, "lbkit_maglev", Maglev::new());
    lbkit_update_case(&mut g, "lbkit_ring", Ring::new());
    tower_update_case(&mut g, "tower_p2c", |rx| {
        Balance::new(PendingRequestsDiscover::new::<Request>(
            rx,
            CompleteOnResponse::default(),
        ))
    });
    tower_update_case(&mut g, "tower_peak_ewma", |rx| {
        Balance::new(PeakEwmaDiscover::new::<Request>(
            rx,
            DEFAULT_RTT,
            DECAY,
            CompleteOnResponse::default(),
        ))
    });
    pingora_update_case::<pingora_load_balancing::selection::RoundRobin>(
        &mut g,
        "pingora_round_robin",
    );
    pingora_update_case::<KetamaHashing>(&mut g, "pingora_ketama");
    g.finish();
}

/// Runs `work(thread, iters)` on `threads` threads started together; returns the wall time
/// from their common start to the end of the last one.
fn on_threads<F>(threads: usize, iters: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    work(t, iters);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().expect("a picking thread panicked");
        }
        start.elapsed()
    })
}

/// Runs `iters` requests through a clone of `svc` in each of `tasks` tokio tasks at once.
fn on_tasks<S>(rt: &tokio::runtime::Runtime, tasks: usize, iters: u64, svc: &S) -> Duration
where
    S: Service<Request> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..iters {
                        let ready = svc.ready().await.expect("ready");
                        ready.call(Request::new(())).await.expect("answered");
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("a task panicked");
        }
        start.elapsed()
    })
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    g.sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let p2c = lbkit_pool(PowerOfTwoChoices::new(), SHARED);
    let rr = lbkit_pool(RoundRobin::new(), SHARED);
    let maglev = lbkit_pool(Maglev::new(), SHARED);
    let pingora_rr = pingora_lb::<pingora_load_balancing::selection::RoundRobin>(SHARED);
    let pingora_ketama = pingora_lb::<KetamaHashing>(SHARED);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let tower_buffer = {
        let _entered = rt.enter();
        Buffer::new(tower_p2c(SHARED), 1024)
    };
    let lbkit_balancer = Balancer::from_pool(p2c.clone()).with_completion(lbkit::balance::CompleteOnResponse);
    for k in THREADS {
        // One iteration is one pick on each thread: the throughput is picks per second.
        g.throughput(Throughput::Elements(k as u64));
        g.bench_function(BenchmarkId::new("lbkit_p2c", k), |b| {
            b.iter_custom(|iters| {
                on_threads(k, iters, |_, iters| {
                    for _ in 0..iters {
                        black_box(p2c.pick(None));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("lbkit_round_robin", k), |b| {
            b.iter_custom(|iters| {
                on_threads(k, iters, |_, iters| {
                    for _ in 0..iters {
                        black_box(rr.pick(None));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("lbkit_maglev", k), |b| {
            b.iter_custom(|iters| {
                on_threads(k, iters, |t, iters| {
                    let mut keys = Keys((t as u64) << 40);
                    let mut hints = PickHints::default();
                    for _ in 0..iters {
                        hints.set_hash_key(&keys.next());
                        black_box(maglev.pick(Some(&hints)));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("pingora_round_robin", k), |b| {
            b.iter_custom(|iters| {
                on_threads(k, iters, |_, iters| {
                    for _ in 0..iters {
                        black_box(pingora_rr.select(b"", 256));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("pingora_ketama", k), |b| {
            b.iter_custom(|iters| {
                on_threads(k, iters, |t, iters| {
                    let mut keys = Keys((t as u64) << 40);
                    for _ in 0..iters {
                        black_box(pingora_ketama.select(&keys.next(), 256));
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("lbkit_call_tasks", k), |b| {
            b.iter_custom(|iters| on_tasks(&rt, k, iters, &lbkit_balancer))
        });
        g.bench_function(BenchmarkId::new("tower_buffer_tasks", k), |b| {
            b.iter_custom(|iters| on_tasks(&rt, k, iters, &tower_buffer))
        });
    }
    g.finish();
}

criterion_group!(benches, p2c, peak_ewma, round_robin, hash, update, threads);
criterion_main!(benches);
