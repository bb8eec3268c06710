//! Races on purpose: endpoint-set updates against picks, on a multi-threaded runtime.
//!
//! Several tasks pick (`Pool::pick`) and send requests through an HTTP `Balancer` (some
//! answered, some failing, some dropped before their body ends, some cancelled mid-way) while
//! another task inserts, removes, re-weights and marks endpoints down. Checked:
//!
//! - no endpoint is picked after its removal was applied. A pick that loaded the snapshot
//!   before the removal may still return it; so the writer publishes a sequence number after
//!   each `Pool::update` returns (and the removal epoch of each endpoint it removed), and each
//!   picker reads the sequence number *before* picking: if it had already seen the removal's
//!   number, the pick must not return that endpoint.
//! - in-flight counts never exceed the requests that can be in flight at once (a decrement
//!   below zero would wrap to a huge number), and are 0 for every endpoint and the pool at the
//!   end (no leak).
//!
//! The run is driven by counts, never by a time window: the writer applies a fixed schedule of
//! [`UPDATES`] updates (paced by the pickers' progress, so that the two interleave on a slow
//! machine as on a fast one), and the pickers run until the writer is done and at least
//! [`MIN_REQUESTS`] requests went through. The time limit only catches hangs.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use lbkit::endpoint::EndpointState;
use lbkit::strategy::AnyStrategy;
use lbkit::{Balancer, Endpoint, EndpointId, PickHints, Pool};
use tower::{Service, ServiceExt};

/// Tasks picking and sending at once: the most requests that can be in flight.
const PICKERS: usize = 6;
/// Ids are `e0`, `e1`, ...; never reused.
const MAX_IDS: usize = 1 << 16;
/// Updates the writer applies per strategy (each inserts, removes and re-weights some).
const UPDATES: u64 = 200;
/// Removals the schedule makes at least (the writer goes on past [`UPDATES`] until it has).
const MIN_REMOVALS: usize = 30;
/// Requests through the balancer the pickers send at least; the writer applies update `k`
/// only once `k * MIN_REQUESTS / UPDATES` were sent, so the updates are spread over them.
const MIN_REQUESTS: u64 = 1_000;
/// Catches a hang of one strategy's run; never reached by a run that works, however slow.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// What an endpoint's service does with a request.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Answers at once.
    Fast,
    /// Answers after yielding to the scheduler a few times.
    Yield(u8),
    /// Fails.
    Fail,
    /// Sleeps (the caller cancels it first).
    Sleep,
}

/// An endpoint's service: answers with its index in the response extensions.
#[derive(Clone, Debug)]
struct Echo {
    idx: usize,
}

impl Service<Request<()>> for Echo {
    type Response = Response<Full<Bytes>>;
    type Error = &'static str;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let idx = self.idx;
        let mode = req
            .extensions()
            .get::<Mode>()
            .copied()
            .unwrap_or(Mode::Fast);
        Box::pin(async move {
            match mode {
                Mode::Fast => {}
                Mode::Yield(n) => {
                    for _ in 0..n {
                        tokio::task::yield_now().await;
                    }
                }
                Mode::Fail => return Err("endpoint failed"),
                Mode::Sleep => tokio::time::sleep(Duration::from_secs(10)).await,
            }
            let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
            res.extensions_mut().insert(Served(idx));
            Ok(res)
        })
    }
}

/// Which endpoint served a response.
#[derive(Clone, Copy, Debug)]
struct Served(usize);

fn id_of(idx: usize) -> EndpointId {
    EndpointId::new(format!("e{idx}"))
}

fn idx_of(id: &EndpointId) -> usize {
    id.as_str()[1..].parse().expect("e<number>")
}

/// What the run shared between writer, pickers and sampler.
struct Shared {
    /// The writer's sequence number, published after each applied update.
    seq: AtomicU64,
    /// The sequence number of each endpoint's removal; 0 while it is in the pool.
    removed_at: Vec<AtomicU64>,
    /// The state of every endpoint ever inserted.
    states: Mutex<Vec<Arc<EndpointState>>>,
    /// Set when the run ends, or fails: every task stops.
    stop: AtomicBool,
    /// Set when the writer is done (or gone).
    writer_done: AtomicBool,
    /// Picks (direct and through the balancer) that returned a removed endpoint after its
    /// removal was applied.
    violations: AtomicU64,
    /// Picks that returned an endpoint removed while they ran (allowed: an older snapshot).
    stale: AtomicU64,
    picks: AtomicU64,
    requests: AtomicU64,
    /// The highest in-flight count the sampler saw, per endpoint and for the pool.
    max_endpoint_in_flight: AtomicU64,
    max_pool_in_flight: AtomicU64,
    samples: AtomicU64,
    /// The most recently removed endpoint, to aim preferred picks at.
    last_removed: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Shared {
            seq: AtomicU64::new(1),
            removed_at: (0..MAX_IDS).map(|_| AtomicU64::new(0)).collect(),
            states: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            writer_done: AtomicBool::new(false),
            violations: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            picks: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            max_endpoint_in_flight: AtomicU64::new(0),
            max_pool_in_flight: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            last_removed: AtomicU64::new(u64::MAX),
        }
    }

    /// Checks a pick made by a task that read sequence number `seen` before picking.
    fn check(&self, seen: u64, idx: usize) {
        let removed = self.removed_at[idx].load(SeqCst);
        if removed != 0 {
            if seen >= removed {
                self.violations.fetch_add(1, SeqCst);
                eprintln!("e{idx} picked after its removal (seq {removed}, picker saw {seen})");
            } else {
                self.stale.fetch_add(1, SeqCst);
            }
        }
    }

    /// Whether pickers and sampler should stop: told to, or the writer is done and enough
    /// requests went through.
    fn done(&self) -> bool {
        self.stop.load(SeqCst)
            || (self.writer_done.load(SeqCst) && self.requests.load(SeqCst) >= MIN_REQUESTS)
    }
}

/// Sets [`Shared::stop`] when dropped: a failing (panicking or timed-out) run stops the writer
/// thread and every task instead of leaving them running.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, SeqCst);
    }
}

/// Sets [`Shared::writer_done`] when dropped: when the writer ends, also by a panic.
struct WriterDone(Arc<Shared>);

impl Drop for WriterDone {
    fn drop(&mut self) {
        self.0.writer_done.store(true, SeqCst);
    }
}

type RacePool = Pool<Echo, AnyStrategy>;

/// Inserts, removes, re-weights and marks endpoints down: [`UPDATES`] updates (more if they
/// made fewer than [`MIN_REMOVALS`] removals), or until told to stop. Returns the removals.
fn writer(pool: RacePool, shared: Arc<Shared>) -> usize {
    let _done = WriterDone(shared.clone());
    let mut removals = 0usize;
    let mut next = 0usize;
    let mut live: Vec<usize> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut rounds = 0u64;
    while (rounds < UPDATES || removals < MIN_REMOVALS) && next + 4 < MAX_IDS {
        // Pace the updates by the pickers' progress (the first ones go in before they start).
        let due = rounds.min(UPDATES) * MIN_REQUESTS / UPDATES;
        while rounds >= 3 && shared.requests.load(SeqCst) < due {
            if shared.stop.load(SeqCst) {
                return removals;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        if shared.stop.load(SeqCst) {
            return removals;
        }
        rounds += 1;
        let r = rand();
        let mut removed = Vec::new();
        let mut added = Vec::new();
        // Grow while small, shrink while large, churn in between.
        let add = if live.len() < 3 { 2 } else { (r % 3) as usize };
        let remove = if live.len() > 8 {
            3
        } else {
            ((r >> 8) % 3) as usize
        };
        pool.update(|c| {
            for _ in 0..add {
                let weight = 1 + (rand() % 5) as u32;
                c.insert(Endpoint::new(id_of(next)).with_weight(weight));
                added.push(next);
                next += 1;
            }
            for _ in 0..remove.min(live.len().saturating_sub(1)) {
                let i = (rand() % live.len() as u64) as usize;
                let idx = live.swap_remove(i);
                assert!(c.remove(&id_of(idx)));
                removed.push(idx);
            }
            if let Some(&idx) = live.first() {
                c.set_weight(&id_of(idx), 1 + (r >> 16) as u32 % 7);
            }
        });
        // Applied: publish the removals' number, then the number itself.
        let seq = shared.seq.load(SeqCst) + 1;
        for &idx in &removed {
            shared.removed_at[idx].store(seq, SeqCst);
            shared.last_removed.store(idx as u64, SeqCst);
        }
        shared.seq.store(seq, SeqCst);
        removals += removed.len();
        {
            let mut states = shared.states.lock().unwrap();
            for &idx in &added {
                states.push(pool.state(&id_of(idx)).expect("just inserted"));
            }
        }
        live.extend(added);
        // Health marks go through the same snapshots.
        if r % 7 == 0 && live.len() > 2 {
            let idx = live[(r >> 24) as usize % live.len()];
            pool.set_down(&id_of(idx), true);
            pool.set_down(&id_of(idx), false);
        }
        if rounds.is_multiple_of(16) {
            std::thread::yield_now();
        }
    }
    removals
}

/// Picks directly and through the balancer until the run is done.
async fn picker(
    me: usize,
    balancer: Balancer<Echo, AnyStrategy, lbkit::balance::CompleteOnBody>,
    shared: Arc<Shared>,
) {
    let pool = balancer.pool().clone();
    let mut n = 0u64;
    while !shared.done() {
        n += 1;
        // Directly.
        let seen = shared.seq.load(SeqCst);
        if let Some((candidate, service)) = pool.pick(None) {
            shared.picks.fetch_add(1, SeqCst);
            let idx = idx_of(candidate.id());
            assert_eq!(
                idx, service.idx,
                "a candidate with another endpoint's service"
            );
            shared.check(seen, idx);
        }
        // Preferring the endpoint removed last, which must not be honoured once removed.
        let mut req = Request::new(());
        let last = shared.last_removed.load(SeqCst);
        if n.is_multiple_of(3) && last != u64::MAX {
            PickHints::of_mut(&mut req).prefer(id_of(last as usize));
        }
        if n.is_multiple_of(5) {
            PickHints::of_mut(&mut req).set_hash(n.wrapping_mul(0x9e37_79b9));
        }
        let mode = match (n + me as u64) % 10 {
            0 => Mode::Fail,
            1 => Mode::Sleep,
            2..=4 => Mode::Yield((n % 4) as u8 + 1),
            _ => Mode::Fast,
        };
        req.extensions_mut().insert(mode);
        // Through the balancer: the pick happens in `call`, after `seen` is read.
        let seen = shared.seq.load(SeqCst);
        let fut = balancer.clone().oneshot(req);
        shared.requests.fetch_add(1, SeqCst);
        match mode {
            Mode::Sleep => {
                // Cancelled before any answer: the in-flight guard must still end.
                let cancelled = tokio::time::timeout(Duration::from_micros(200), fut).await;
                assert!(cancelled.is_err());
            }
            Mode::Fail => {
                let err = fut.await.expect_err("the endpoint fails");
                assert!(err.is_endpoint() || err.is_no_endpoint(), "{err}");
                if let Some(id) = err.endpoint_id() {
                    shared.check(seen, idx_of(id));
                }
            }
            _ => match fut.await {
                Ok(res) => {
                    let Served(idx) = *res.extensions().get::<Served>().expect("served");
                    shared.check(seen, idx);
                    if n.is_multiple_of(2) {
                        // Read to the end: in flight until then.
                        let body = res.into_body().collect().await.expect("body");
                        assert_eq!(body.to_bytes(), "hello");
                    } else {
                        // Dropped before its end: counts as ended all the same.
                        drop(res);
                    }
                }
                Err(e) => assert!(e.is_no_endpoint(), "{e}"),
            },
        }
        if n.is_multiple_of(32) {
            tokio::task::yield_now().await;
        }
    }
}

/// Samples in-flight counts until the run is done.
async fn sampler(pool: RacePool, shared: Arc<Shared>) {
    while !shared.done() {
        let states: Vec<_> = shared.states.lock().unwrap().clone();
        for s in &states {
            shared
                .max_endpoint_in_flight
                .fetch_max(s.in_flight(), SeqCst);
        }
        shared
            .max_pool_in_flight
            .fetch_max(pool.in_flight(), SeqCst);
        shared.samples.fetch_add(1, SeqCst);
        tokio::task::yield_now().await;
    }
}

async fn race(strategy: &str) {
    let strategy: AnyStrategy = strategy.parse().expect("strategy");
    let name = lbkit::strategy::Strategy::name(&strategy);
    let pool: RacePool = Pool::new(strategy, |ep: &Endpoint| Echo {
        idx: idx_of(ep.id()),
    });
    let balancer = Balancer::from_pool(pool.clone());
    let shared = Arc::new(Shared::new());
    // Whatever way this run ends (a failed assertion, the hang limit), the writer thread and
    // the tasks stop.
    let _stop = StopOnDrop(shared.clone());

    let w = {
        let (pool, shared) = (pool.clone(), shared.clone());
        tokio::task::spawn_blocking(move || writer(pool, shared))
    };
    // Let the writer put some endpoints in first.
    while shared.states.lock().unwrap().len() < 3 {
        assert!(!shared.writer_done.load(SeqCst), "the writer ended early");
        tokio::task::yield_now().await;
    }
    let pickers: Vec<_> = (0..PICKERS)
        .map(|me| tokio::spawn(picker(me, balancer.clone(), shared.clone())))
        .collect();
    let s = tokio::spawn(sampler(pool.clone(), shared.clone()));
    // Pickers and sampler stop by themselves once the writer is done and enough requests
    // went through.
    for p in pickers {
        p.await.expect("picker");
    }
    s.await.expect("sampler");
    let removals = w.await.expect("writer");

    let states = shared.states.lock().unwrap().clone();
    let leaked: Vec<_> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.in_flight() != 0)
        .map(|(i, s)| (i, s.in_flight()))
        .collect();
    let removed_ids = shared
        .removed_at
        .iter()
        .filter(|r| r.load(SeqCst) != 0)
        .count();
    assert_eq!(removals, removed_ids, "removals published");
    eprintln!(
        "race ({name}): {} endpoints inserted, {removals} removed, {} snapshots; {} direct \
         picks + {} requests through the balancer by {PICKERS} tasks; {} picks of an endpoint \
         removed while they ran (older snapshot, allowed), {} after the removal was applied; \
         in flight at most {} per endpoint and {} in the pool ({} samples), {} left at the end",
        states.len(),
        shared.seq.load(SeqCst) - 1,
        shared.picks.load(SeqCst),
        shared.requests.load(SeqCst),
        shared.stale.load(SeqCst),
        shared.violations.load(SeqCst),
        shared.max_endpoint_in_flight.load(SeqCst),
        shared.max_pool_in_flight.load(SeqCst),
        shared.samples.load(SeqCst),
        pool.in_flight(),
    );
    assert_eq!(
        shared.violations.load(SeqCst),
        0,
        "removed endpoints were picked"
    );
    assert!(leaked.is_empty(), "in-flight counts left: {leaked:?}");
    assert_eq!(pool.in_flight(), 0, "pool in-flight count left");
    assert!(
        shared.max_endpoint_in_flight.load(SeqCst) <= PICKERS as u64,
        "an endpoint's in-flight count went past {PICKERS} (negative?)"
    );
    assert!(
        shared.max_pool_in_flight.load(SeqCst) <= PICKERS as u64,
        "the pool's in-flight count went past {PICKERS} (negative?)"
    );
    // The schedule, not the machine's speed, decides these.
    assert!(
        removals >= MIN_REMOVALS,
        "too few removals to race: {removals}"
    );
    assert!(
        shared.requests.load(SeqCst) >= MIN_REQUESTS,
        "too few requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_endpoints_are_not_picked_and_in_flight_counts_balance() {
    for strategy in [
        "round_robin",
        "p2c",
        "least_connections",
        "peak_ewma",
        "maglev",
        "ring",
    ] {
        tokio::time::timeout(HANG_LIMIT, race(strategy))
            .await
            .unwrap_or_else(|_| panic!("{strategy}: the race hung (not done in {HANG_LIMIT:?})"));
    }
}
