//! A soak test: steady load through the whole proxy stack (see `common::fault`) for minutes
//! while a schedule of faults runs over four backends, one after the other: a backend killed
//! and restarted, one turned slow, one restarted through discovery (removed, drained,
//! restarted, added back), one replaced by a server that hangs or one that resets
//! connections, every backend down at once, and a fifth backend added and removed again.
//!
//! Ignored by default (it runs for minutes); run it by name:
//!
//! ```text
//! cargo test --test soak -- --ignored --nocapture
//! LBKIT_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! It prints a summary: requests, failures (those while every backend was down are expected:
//! 503s; any other fails the test), retries, ejections, latency, and memory (resident at the
//! start and end, and the peak).

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
use common::{endpoints, http_client, start_server, start_servers, wait_until, TestServer};
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

/// One client: sends `GET /` until `stop`, classing failures by the outage flag.
async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, outage: Arc<AtomicU64>) -> Tally {
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
        let outcome = exchange(&http, get(addr), Duration::from_secs(10)).await;
        t.latency.record(started.elapsed());
        t.sent += 1;
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

/// How long a fault lasts.
const FAULT: Duration = Duration::from_millis(1_500);
/// Calm between two steps.
const CALM: Duration = Duration::from_millis(1_000);

async fn run_step(
    step: Step,
    slots: &mut [Slot],
    k: usize,
    proxy: &ProxyStack,
    outage: &AtomicU64,
) {
    let i = k % slots.len();
    match step {
        Step::Kill => {
            slots[i].server = None;
            tokio::time::sleep(FAULT).await;
            slots[i].restart().await;
        }
        Step::Slow => {
            let server = slots[i].server.as_ref().expect("running");
            server.set_delay(Duration::from_millis(1_000));
            tokio::time::sleep(FAULT).await;
            server.set_delay(Duration::ZERO);
        }
        Step::RollingRestart => {
            let id = EndpointId::new(slots[i].name.as_str());
            let state = proxy.pool.state(&id).expect("in the pool");
            assert!(proxy.pool.remove(&id));
            wait_until(Duration::from_secs(5), "drain", || state.in_flight() == 0).await;
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
            tokio::time::sleep(FAULT).await;
            drop(faulty);
            slots[i].restart().await;
        }
        Step::AllDown => {
            outage.fetch_add(1, Ordering::SeqCst);
            for s in slots.iter_mut() {
                s.server = None;
            }
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            for s in slots.iter_mut() {
                s.restart().await;
            }
            // Back within the active check's rise (and ejections are lifted with it).
            let bound = proxy.config.check_detection_bound() + proxy.config.check_interval * 3;
            tokio::time::sleep(bound).await;
            outage.fetch_sub(1, Ordering::SeqCst);
        }
        Step::ScaleOutAndIn => {
            let extra = start_server(&format!("extra{k}")).await;
            proxy.pool.insert(extra.endpoint());
            tokio::time::sleep(FAULT).await;
            let id = EndpointId::new(extra.name());
            let state = proxy.pool.state(&id).expect("in the pool");
            assert!(proxy.pool.remove(&id));
            wait_until(Duration::from_secs(5), "drain", || state.in_flight() == 0).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for minutes: cargo test --test soak -- --ignored --nocapture"]
async fn soak_with_a_mixed_fault_schedule() {
    let secs: u64 = std::env::var("LBKIT_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let run_for = Duration::from_secs(secs);
    let servers = start_servers(4).await;
    let config = StackConfig {
        per_try_timeout: Duration::from_millis(300),
        deadline: Duration::from_secs(2),
        ejection_time: Duration::from_secs(5),
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
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(client(proxy.addr, stop.clone(), outage.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_kib();
    let started = Instant::now();
    eprintln!(
        "soak: {secs} s of load through the proxy over 4 backends, faults every {:?}",
        FAULT + CALM
    );

    let mut steps: BTreeMap<Step, u64> = BTreeMap::new();
    let mut k = 0usize;
    while started.elapsed() < run_for {
        let step = STEPS[k % STEPS.len()];
        run_step(step, &mut slots, k, &proxy, &outage).await;
        *steps.entry(step).or_default() += 1;
        k += 1;
        tokio::time::sleep(CALM).await;
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
