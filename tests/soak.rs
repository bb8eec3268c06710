//! A soak test: steady load through the whole proxy stack (see `common::fault`) for minutes
//! while a schedule of faults runs over four backends, one after the other: a backend killed
//! and restarted, one turned slow, one restarted through discovery (removed, drained,
//! restarted, added back), one replaced by a server that hangs or one that resets
//! connections, every backend down at once, and a fifth backend added and removed again.
//!
//! The soak itself is ignored by default (it runs for minutes); run it by name:
//!
//! ```text
//! cargo test --test soak -- --ignored --nocapture
//! LBKIT_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! A smoke run of the same code, every step of the schedule once, runs with `cargo test`.
//!
//! It prints a summary: requests, failures (those while every backend was down are expected:
//! 503s; any other fails the test), retries, ejections, latency, and memory (resident at the
//! start and end, and the peak).
//!
//! Nothing in it depends on how fast the machine is: a fault lasts a number of requests, the
//! calm between two faults lasts until every backend is healthy again and a number of requests
//! went through, an outage ends once every backend is healthy again, and the time limits only
//! catch hangs. Only the soak's total length is a time.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{
    exchange, get, proc_status_kib, rss_kib, start_server_at, Fault, FaultServer, ProxyStack,
    StackConfig,
};
use common::{endpoints, http_client, start_server, start_servers, wait_until, TestServer, HANG};
use lbkit::endpoint::Health;
use lbkit::health::HealthChange;
use lbkit::EndpointId;

/// A latency histogram in quarter-octave buckets from 1 µs: bounded memory for any run.
struct Histogram {
    buckets: [u64; 128],
    count: u64,
    max: Duration,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: [0; 128],
            count: 0,
            max: Duration::ZERO,
        }
    }

    fn bucket(d: Duration) -> usize {
        let us = d.as_micros().max(1) as f64;
        ((us.log2() * 4.0) as usize).min(127)
    }

    fn record(&mut self, d: Duration) {
        self.buckets[Self::bucket(d)] += 1;
        self.count += 1;
        self.max = self.max.max(d);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The upper bound of the bucket holding the `p`-th percentile.
    fn percentile(&self, p: f64) -> Duration {
        let want = ((self.count as f64) * p / 100.0).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return Duration::from_micros(2f64.powf((i + 1) as f64 / 4.0) as u64);
            }
        }
        self.max
    }
}

/// What the clients saw.
struct Tally {
    sent: u64,
    ok: u64,
    /// Failures while every backend was down (or coming back): expected.
    expected: BTreeMap<String, u64>,
    /// Any other failure.
    unexpected: BTreeMap<String, u64>,
    latency: Histogram,
}

/// One client: sends `GET /` until `stop`, classing failures by the outage flag, counting the
/// requests it sent in `sent`.
async fn client(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    outage: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) -> Tally {
    let http = http_client();
    let mut t = Tally {
        sent: 0,
        ok: 0,
        expected: BTreeMap::new(),
        unexpected: BTreeMap::new(),
        latency: Histogram::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        let during_outage = outage.load(Ordering::SeqCst) > 0;
        let started = Instant::now();
        let outcome = exchange(&http, get(addr), HANG).await;
        t.latency.record(started.elapsed());
        t.sent += 1;
        sent.fetch_add(1, Ordering::SeqCst);
        if outcome.is_ok() {
            t.ok += 1;
            continue;
        }
        let expected = during_outage || outage.load(Ordering::SeqCst) > 0;
        let kinds = if expected {
            &mut t.expected
        } else {
            &mut t.unexpected
        };
        *kinds.entry(outcome.label()).or_default() += 1;
        if !expected && kinds.values().sum::<u64>() <= 3 {
            eprintln!("  unexpected failure: {outcome:?}");
        }
    }
    t
}

/// A backend slot: its name, address, and what runs there now.
struct Slot {
    name: String,
    addr: SocketAddr,
    server: Option<TestServer>,
}

impl Slot {
    async fn restart(&mut self) {
        self.server = None;
        self.server = Some(start_server_at(&self.name, self.addr).await);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Kill,
    Slow,
    RollingRestart,
    Hang,
    Reset,
    AllDown,
    ScaleOutAndIn,
}

const STEPS: [Step; 7] = [
    Step::Kill,
    Step::Slow,
    Step::RollingRestart,
    Step::Hang,
    Step::Reset,
    Step::AllDown,
    Step::ScaleOutAndIn,
];

/// How long a fault lasts, in requests sent by the clients.
const FAULT: u64 = 400;
/// The calm between two steps, in requests sent once every backend is healthy again.
const CALM: u64 = 300;

/// What the steps need of the run.
struct Run<'a> {
    proxy: &'a ProxyStack,
    outage: &'a AtomicU64,
    /// Requests sent by the clients so far.
    sent: &'a AtomicU64,
}

impl Run<'_> {
    /// Waits until the clients have sent `n` more requests.
    async fn requests(&self, n: u64) {
        let target = self.sent.load(Ordering::SeqCst) + n;
        wait_until(HANG, "the clients' requests", || {
            self.sent.load(Ordering::SeqCst) >= target
        })
        .await;
    }

    fn health(&self, slot: &Slot) -> Option<Health> {
        self.proxy.pool.health(&EndpointId::new(slot.name.as_str()))
    }

    /// Waits until `slot` is out of rotation (marked down or ejected).
    async fn out(&self, slot: &Slot) {
        wait_until(HANG, "the backend out of rotation", || {
            self.health(slot) != Some(Health::Healthy)
        })
        .await;
    }

    /// Waits until every backend of `slots` is healthy (back up, ejections over).
    async fn all_healthy(&self, slots: &[Slot]) {
        wait_until(HANG, "every backend healthy", || {
            slots
                .iter()
                .all(|s| self.health(s) == Some(Health::Healthy))
        })
        .await;
    }
}

async fn run_step(step: Step, slots: &mut [Slot], k: usize, run: &Run<'_>) {
    let i = k % slots.len();
    let proxy = run.proxy;
    match step {
        Step::Kill => {
            slots[i].server = None;
            run.out(&slots[i]).await;
            run.requests(FAULT).await;
            slots[i].restart().await;
        }
        Step::Slow => {
            let server = slots[i].server.as_ref().expect("running");
            // Far past the per-try timeout, on any machine.
            server.set_delay(proxy.config.per_try_timeout * 5);
            run.requests(FAULT).await;
            server.set_delay(Duration::ZERO);
        }
        Step::RollingRestart => {
            let id = EndpointId::new(slots[i].name.as_str());
            let state = proxy.pool.state(&id).expect("in the pool");
            assert!(proxy.pool.remove(&id));
            wait_until(HANG, "drain", || state.in_flight() == 0).await;
            slots[i].restart().await;
            let endpoint = slots[i].server.as_ref().expect("running").endpoint();
            proxy.pool.insert(endpoint);
        }
        Step::Hang | Step::Reset => {
            let fault = if step == Step::Hang {
                Fault::Hang
            } else {
                Fault::ResetBeforeHead
            };
            slots[i].server = None;
            let faulty = FaultServer::start_at(&slots[i].name, slots[i].addr, fault).await;
            run.requests(FAULT).await;
            drop(faulty);
            slots[i].restart().await;
        }
        Step::AllDown => {
            run.outage.fetch_add(1, Ordering::SeqCst);
            for s in slots.iter_mut() {
                s.server = None;
            }
            for s in slots.iter() {
                run.out(s).await;
            }
            run.requests(FAULT).await;
            for s in slots.iter_mut() {
                s.restart().await;
            }
            // Back once the active check has seen them up (ejections are lifted with it).
            run.all_healthy(slots).await;
            run.outage.fetch_sub(1, Ordering::SeqCst);
        }
        Step::ScaleOutAndIn => {
            let extra = start_server(&format!("extra{k}")).await;
            proxy.pool.insert(extra.endpoint());
            wait_until(HANG, "traffic to the added backend", || extra.hits() >= 10).await;
            let id = EndpointId::new(extra.name());
            let state = proxy.pool.state(&id).expect("in the pool");
            assert!(proxy.pool.remove(&id));
            wait_until(HANG, "drain", || state.in_flight() == 0).await;
        }
    }
    // Calm: every backend back, then some requests.
    run.all_healthy(slots).await;
    run.requests(CALM).await;
}

/// The smoke run: every step of the schedule once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_smoke_runs_every_step_once() {
    tokio::time::timeout(Duration::from_secs(600), soak(Length::Steps(STEPS.len())))
        .await
        .expect("the smoke run hung");
}

/// How long a soak runs.
#[derive(Clone, Copy, Debug)]
enum Length {
    For(Duration),
    Steps(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for minutes: cargo test --test soak -- --ignored --nocapture"]
async fn soak_with_a_mixed_fault_schedule() {
    let secs: u64 = std::env::var("LBKIT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    soak(Length::For(Duration::from_secs(secs))).await;
}

async fn soak(length: Length) {
    let servers = start_servers(4).await;
    let config = StackConfig {
        // Far more than a healthy backend's answer takes on any machine: only the faults
        // time out.
        per_try_timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(10),
        ejection_time: Duration::from_secs(2),
        ..StackConfig::default()
    };
    let proxy = ProxyStack::start(endpoints(&servers), config).await;
    let mut slots: Vec<Slot> = servers
        .into_iter()
        .map(|s| Slot {
            name: s.name().to_owned(),
            addr: s.addr(),
            server: Some(s),
        })
        .collect();

    // Health transitions, counted as they come.
    let transitions: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let mut events = proxy.pool.health_events();
    let t = transitions.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            let kind = match ev.change() {
                HealthChange::Down { .. } => "down",
                HealthChange::Up => "up",
                HealthChange::Ejected { .. } => "ejected",
                HealthChange::Returned => "returned",
                _ => "other",
            };
            *t.lock().unwrap().entry(kind).or_default() += 1;
        }
    });
    // Memory, sampled each 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak_rss.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let outage = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(client(
                proxy.addr,
                stop.clone(),
                outage.clone(),
                sent.clone(),
            ))
        })
        .collect();
    let run = Run {
        proxy: &proxy,
        outage: &outage,
        sent: &sent,
    };
    run.requests(CALM).await;
    let rss_start = rss_kib();
    let started = Instant::now();
    eprintln!(
        "soak: {length:?} of load through the proxy over 4 backends, a fault of {FAULT} \
         requests then a calm of {CALM} after each step"
    );

    let mut steps: BTreeMap<Step, u64> = BTreeMap::new();
    let mut k = 0usize;
    while match length {
        Length::For(d) => started.elapsed() < d,
        Length::Steps(n) => k < n,
    } {
        let step = STEPS[k % STEPS.len()];
        run_step(step, &mut slots, k, &run).await;
        *steps.entry(step).or_default() += 1;
        k += 1;
        if k.is_multiple_of(STEPS.len()) {
            eprintln!(
                "  {:>4.0} s: {k} faults, RSS {} KiB",
                started.elapsed().as_secs_f64(),
                rss_kib()
            );
        }
    }

    stop.store(true, Ordering::Relaxed);
    let mut total = Tally {
        sent: 0,
        ok: 0,
        expected: BTreeMap::new(),
        unexpected: BTreeMap::new(),
        latency: Histogram::new(),
    };
    for c in clients {
        let t = c.await.expect("client");
        total.sent += t.sent;
        total.ok += t.ok;
        for (k, v) in t.expected {
            *total.expected.entry(k).or_default() += v;
        }
        for (k, v) in t.unexpected {
            *total.unexpected.entry(k).or_default() += v;
        }
        total.latency.merge(&t.latency);
    }
    sampler.await.expect("sampler");
    let elapsed = started.elapsed();
    let rss_end = rss_kib();
    let hwm = proc_status_kib("VmHWM");
    watcher.abort();
    let unexpected: u64 = total.unexpected.values().sum();
    let expected: u64 = total.expected.values().sum();
    eprintln!(
        "soak summary after {:.0} s:\n  faults: {steps:?}\n  requests: {} ({:.0}/s), {} ok, \
         {} failures: {unexpected} unexpected {:?}, {expected} while every backend was down \
         {:?}\n  retries: {} granted, {} refused by the budget; health transitions: {:?}\n  \
         latency: p50 <= {:.1} ms, p99 <= {:.1} ms, p99.9 <= {:.1} ms, max {:.1} ms\n  \
         memory: RSS {rss_start} KiB at the start, {rss_end} KiB at the end, peak {} KiB \
         (sampled), VmHWM {hwm} KiB; in flight at the end: {}",
        elapsed.as_secs_f64(),
        total.sent,
        total.sent as f64 / elapsed.as_secs_f64(),
        total.ok,
        unexpected + expected,
        total.unexpected,
        total.expected,
        proxy.budget.retries(),
        proxy.budget.refused(),
        transitions.lock().unwrap(),
        total.latency.percentile(50.0).as_secs_f64() * 1000.0,
        total.latency.percentile(99.0).as_secs_f64() * 1000.0,
        total.latency.percentile(99.9).as_secs_f64() * 1000.0,
        total.latency.max.as_secs_f64() * 1000.0,
        peak_rss.load(Ordering::Relaxed),
        proxy.pool.in_flight(),
    );
    assert_eq!(unexpected, 0, "failures outside the all-down windows");
    assert_eq!(proxy.pool.in_flight(), 0, "in-flight count leaked");
    assert!(
        rss_end.saturating_sub(rss_start) < 64 * 1024,
        "memory grew from {rss_start} KiB to {rss_end} KiB"
    );
    drop(slots);
}
