use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower_service::Service;

use super::endpoint::{nanos, Ticket};
use super::report::{Comparison, EndpointReport, Report, TimelineStep};
use super::workload::Arrivals;
use super::{Latency, SimEndpoint, SimService, Workload};
use crate::balance::{InFlight, TrackCompletion};
use crate::endpoint::state::clock_ns;
use crate::endpoint::LatencySummary;
use crate::hash::mix64;
use crate::hints::PickHints;
use crate::pool::Pool;
use crate::strategy::{fast_rand, AnyStrategy, Strategy};
use crate::Balancer;

/// What the simulated client counts as a successful response (see [`Scenario::run_service`]).
fn is_success<B>(res: &http::Response<B>) -> bool {
    let status = res.status();
    !status.is_server_error() && status != http::StatusCode::TOO_MANY_REQUESTS
}

/// How a simulation's [`Balancer`] tracks a request (see [`TrackCompletion`]): like
/// [`CompleteOnBody`](crate::balance::CompleteOnBody) for HTTP balancers, it reads the
/// response's status (a failure status counts as the endpoint's error, a `429` or `503` with
/// `Retry-After` backs the endpoint off without counting as one); as simulated responses
/// have no body, the request ends with the response.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimCompletion;

impl<B> TrackCompletion<InFlight, http::Response<B>> for SimCompletion {
    type Output = http::Response<B>;

    fn track_completion(&self, mut handle: InFlight, res: http::Response<B>) -> Self::Output {
        handle.classify(res.status(), res.headers());
        res
    }
}

/// Streams of random numbers derived from a scenario's seed, one per use, so that adding a
/// use does not shift another's numbers.
const ARRIVALS: u64 = 0x6172_7269_7661_6c73;
const PICKS: u64 = 0x7069_636b_7300_0000;
const ENDPOINT: u64 = 0x656e_6470_6f69_6e74;

/// A fleet of simulated endpoints, a workload and a seed: what a simulation runs.
///
/// Each run ([`run`](Scenario::run), [`run_with`](Scenario::run_with),
/// [`run_service`](Scenario::run_service)) builds fresh endpoints and drives the workload
/// through the stack under test on its own thread, on a current-thread tokio runtime whose
/// clock is paused: time moves only when every task waits, straight to the next timer, so a
/// run of minutes of traffic takes milliseconds and depends on nothing but the seed. lbkit's
/// own random choices (power of two choices, random, tie-breaks) are seeded from it too, and
/// its latency measurements read the simulated clock.
///
/// Time moves in steps of 1 ms (tokio's timer resolution): model latencies of a few
/// milliseconds and up.
///
/// See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct Scenario {
    name: String,
    seed: u64,
    endpoints: Vec<SimEndpoint>,
    workload: Workload,
    step: Duration,
}

impl Scenario {
    /// An empty scenario named `name`: no endpoint, seed 1, 1 000 requests arriving at 100
    /// per second, a timeline in steps of one second.
    pub fn new(name: impl Into<String>) -> Self {
        Scenario {
            name: name.into(),
            seed: 1,
            endpoints: Vec::new(),
            workload: Workload::open(100.0),
            step: Duration::from_secs(1),
        }
    }

    /// Sets the seed every random number of a run derives from.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, endpoint: SimEndpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Adds endpoints.
    pub fn endpoints(mut self, endpoints: impl IntoIterator<Item = SimEndpoint>) -> Self {
        self.endpoints.extend(endpoints);
        self
    }

    /// Sets the workload.
    pub fn workload(mut self, workload: Workload) -> Self {
        self.workload = workload;
        self
    }

    /// Sets the step of the reports' timelines (default one second).
    pub fn timeline_step(mut self, step: Duration) -> Self {
        self.step = step.max(Duration::from_millis(1));
        self
    }

    /// The scenario's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The seed.
    pub fn get_seed(&self) -> u64 {
        self.seed
    }

    /// The endpoints, in order.
    pub fn get_endpoints(&self) -> &[SimEndpoint] {
        &self.endpoints
    }

    /// The workload.
    pub fn get_workload(&self) -> &Workload {
        &self.workload
    }

    /// Runs the workload through a [`Balancer`] with `strategy` over the scenario's endpoints
    /// (a pool with default settings); the report is labelled with the strategy's name.
    pub fn run<St: Strategy>(&self, strategy: St) -> Report {
        let label = strategy.name();
        self.run_with(label, strategy, |balancer| balancer)
    }

    /// Runs the workload through `stack`, given a [`Balancer`] with `strategy` over the
    /// scenario's endpoints: wrap it in layers (failover, hash keys), or spawn health tasks on
    /// its pool (outlier detection, slow start) first. `stack` is called inside the
    /// simulation's runtime, so it may spawn tasks.
    pub fn run_with<St, F, Svc, B>(&self, label: &str, strategy: St, stack: F) -> Report
    where
        St: Strategy,
        F: FnOnce(Balancer<SimService, St, SimCompletion>) -> Svc + Send,
        Svc: Service<http::Request<()>, Response = http::Response<B>>,
    {
        self.run_service(label, move |services| {
            let pool = Pool::builder(strategy).build_with_services();
            pool.update(|changes| {
                for s in services {
                    changes.insert_with_service(s.spec().endpoint().clone(), s);
                }
            });
            stack(Balancer::from_pool(pool).with_completion(SimCompletion))
        })
    }

    /// Runs the workload through the service `make` builds from the scenario's endpoints, one
    /// [`SimService`] each, in order: any tower balancer (such as `tower::balance::p2c`), or an
    /// lbkit pool with non-default settings. `make` is called inside the simulation's
    /// runtime, so it may spawn tasks.
    ///
    /// The client counts a response as a success unless its status is `429 Too Many Requests`
    /// or 5xx (a request a rate-limited endpoint refused, and not retried elsewhere, failed as
    /// far as the client is concerned); an error of the service is always a failure.
    ///
    /// Runs on a thread of its own (and so may be called from async code, which it blocks
    /// until the run ends).
    ///
    /// ```
    /// use std::time::Duration;
    /// use lbkit::sim::{Latency, Scenario, SimEndpoint, SimService};
    /// use tower::balance::p2c::Balance;
    /// use tower::discover::ServiceList;
    /// use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
    ///
    /// /// Tower's default generator is seeded by the OS: seed one for repeatable runs.
    /// struct Counter(u64);
    /// impl tower::util::rng::Rng for Counter {
    ///     fn next_u64(&mut self) -> u64 {
    ///         self.0 += 1;
    ///         lbkit::hash::mix64(self.0)
    ///     }
    /// }
    ///
    /// let latency = Latency::exponential(Duration::from_millis(10));
    /// let scenario = Scenario::new("tower")
    ///     .endpoints((0..3).map(|i| SimEndpoint::new(format!("e{i}"), latency)));
    /// let report = scenario.run_service("tower p2c", |services: Vec<SimService>| {
    ///     let discover =
    ///         PendingRequestsDiscover::new(ServiceList::new(services), CompleteOnResponse::default());
    ///     Balance::from_rng(discover, Counter(scenario.get_seed()))
    /// });
    /// assert_eq!(report.requests, 1_000);
    /// assert_eq!(report.endpoints.iter().map(|e| e.requests).sum::<u64>(), 1_000);
    /// ```
    pub fn run_service<F, Svc, B>(&self, label: &str, make: F) -> Report
    where
        F: FnOnce(Vec<SimService>) -> Svc + Send,
        Svc: Service<http::Request<()>, Response = http::Response<B>>,
    {
        std::thread::scope(|scope| {
            let run = std::thread::Builder::new()
                .name(format!("lbkit-sim-{label}"))
                .spawn_scoped(scope, || self.run_here(label, make))
                .expect("spawn a simulation thread");
            match run.join() {
                Ok(report) => report,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs every strategy of `strategies` and puts the reports side by side.
    pub fn compare(&self, strategies: impl IntoIterator<Item = AnyStrategy>) -> Comparison {
        let mut comparison = self.comparison();
        for s in strategies {
            comparison.push(self.run(s));
        }
        comparison
    }

    /// An empty [`Comparison`] titled after the scenario, highlighting its endpoints that
    /// something happens to or whose latency differs from most others'.
    pub fn comparison(&self) -> Comparison {
        let usual = most_common(self.endpoints.iter().map(|e| e.latency));
        let highlight = self
            .endpoints
            .iter()
            .filter(|e| e.has_events() || Some(e.latency) != usual)
            .map(|e| e.id().clone());
        let title = format!(
            "{} | seed {} | {} requests",
            self.name,
            self.seed,
            self.workload.request_count()
        );
        Comparison::new(title, highlight)
    }

    /// One run, on this thread.
    fn run_here<F, Svc, B>(&self, label: &str, make: F) -> Report
    where
        F: FnOnce(Vec<SimService>) -> Svc,
        Svc: Service<http::Request<()>, Response = http::Response<B>>,
    {
        // Start lbkit's clock before the runtime's, so simulated instants all count after it.
        clock_ns(std::time::Instant::now());
        let _simulated = crate::clock::Simulated::enter();
        fast_rand::reseed(mix64(self.seed ^ PICKS));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(async {
            let start = Instant::now();
            let services: Vec<SimService> = self
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let seed = mix64(self.seed ^ ENDPOINT.wrapping_add(i as u64));
                    SimService::new(e.clone(), start, seed)
                })
                .collect();
            let svc = make(services.clone());
            let rng = StdRng::seed_from_u64(mix64(self.seed ^ ARRIVALS));
            let run = drive(svc, &self.workload, rng, start).await;
            self.report(label, start, run, &services)
        })
    }

    fn report(&self, label: &str, start: Instant, run: Run, services: &[SimService]) -> Report {
        let seen: Vec<_> = services.iter().map(SimService::take_seen).collect();
        let total: u64 = seen.iter().map(|s| s.requests).sum();
        let step = nanos(self.step).max(1);
        let last = run.outcomes.iter().map(|o| o.sent_at).max().unwrap_or(0);
        let steps = usize::try_from(last / step).map_or(usize::MAX, |s| s + 1);
        let endpoints = services
            .iter()
            .zip(seen)
            .map(|(s, mut seen)| EndpointReport {
                id: s.spec().id().clone(),
                zone: s.spec().endpoint().zone.clone(),
                requests: seen.requests,
                share: if total == 0 {
                    0.0
                } else {
                    seen.requests as f64 / total as f64
                },
                errors: seen.errors,
                throttled: seen.throttled,
                latency: LatencySummary::exact(&mut seen.latencies),
                timeline: per_step(&seen.arrivals, step, steps),
            })
            .collect();
        let mut timeline: Vec<TimelineStep> = (0..steps as u64)
            .map(|i| TimelineStep {
                start: Duration::from_nanos(i * step),
                requests: 0,
                errors: 0,
                latency: LatencySummary::default(),
            })
            .collect();
        let mut latencies = Vec::with_capacity(run.outcomes.len());
        let mut step_latencies: Vec<Vec<u64>> = vec![Vec::new(); steps];
        let mut errors = 0;
        for o in &run.outcomes {
            let i = (o.sent_at / step) as usize;
            let t = &mut timeline[i];
            t.requests += 1;
            if o.ok {
                latencies.push(o.latency);
                step_latencies[i].push(o.latency);
            } else {
                t.errors += 1;
                errors += 1;
            }
        }
        for (t, l) in timeline.iter_mut().zip(&mut step_latencies) {
            t.latency = LatencySummary::exact(l);
        }
        Report {
            scenario: self.name.clone(),
            label: label.to_owned(),
            seed: self.seed,
            requests: run.outcomes.len() as u64,
            errors,
            elapsed: run.end.saturating_duration_since(start),
            latency: LatencySummary::exact(&mut latencies),
            endpoints,
            timeline,
            timeline_step: self.step,
        }
    }
}

/// How many of `times` (nanoseconds since the start) fall in each of `steps` steps of `step`
/// nanoseconds; later ones count in the last step.
fn per_step(times: &[u64], step: u64, steps: usize) -> Vec<u64> {
    let mut counts = vec![0; steps];
    if let Some(last) = steps.checked_sub(1) {
        for &t in times {
            counts[usize::try_from(t / step).map_or(last, |i| i.min(last))] += 1;
        }
    }
    counts
}

/// The value that occurs most often (the first of equals), if any.
fn most_common(values: impl Iterator<Item = Latency>) -> Option<Latency> {
    let mut counts: Vec<(Latency, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let mut best: Option<(Latency, usize)> = None;
    for (v, n) in counts {
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((v, n));
        }
    }
    best.map(|(v, _)| v)
}

/// One request as the client saw it.
struct Outcome {
    /// When it should have been sent, in nanoseconds since the start.
    sent_at: u64,
    /// From then to its response, in nanoseconds.
    latency: u64,
    ok: bool,
}

/// What the client saw of a run.
struct Run {
    outcomes: Vec<Outcome>,
    /// When the last response came.
    end: Instant,
}

/// Waits for `fut` and tells how it went, timed from `sent`.
async fn track<F, B, E>(start: Instant, sent: Instant, fut: F) -> Outcome
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    let ok = fut.await.is_ok_and(|res| is_success(&res));
    Outcome {
        sent_at: nanos(sent - start),
        latency: nanos(sent.elapsed()),
        ok,
    }
}

/// Sends the workload through `svc` and collects every request's outcome.
async fn drive<Svc, B>(mut svc: Svc, workload: &Workload, mut rng: StdRng, start: Instant) -> Run
where
    Svc: Service<http::Request<()>, Response = http::Response<B>>,
{
    let total = workload.requests;
    let mut outcomes = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0u64;
    // Open loop: the exact time of the next arrival since the start; closed loop: when each
    // idle worker sends next.
    let mut next_open: Option<Duration> = None;
    let mut workers = VecDeque::new();
    let (cap, think) = match workload.arrivals {
        Arrivals::Open {
            rate,
            max_in_flight,
        } => {
            next_open = Some(gap(&mut rng, rate));
            (max_in_flight, Duration::ZERO)
        }
        Arrivals::Closed { workers: n, think } => {
            let n = usize::try_from(total).map_or(n, |t| t.min(n));
            workers.extend(std::iter::repeat_n(start, n));
            (usize::MAX, think)
        }
    };
    let mut end = start;
    let closed = next_open.is_none();
    let mut done = |o: Outcome, workers: &mut VecDeque<Instant>, end: &mut Instant| {
        outcomes.push(o);
        let now = Instant::now();
        *end = now;
        if closed {
            workers.push_back(now + think);
        }
    };
    while sent < total || !in_flight.is_empty() {
        let due = if sent == total || in_flight.len() >= cap {
            None
        } else {
            next_open
                .map(|t| start + whole_ms(t))
                .or_else(|| workers.front().copied())
        };
        let Some(at) = due else {
            if let Some(o) = in_flight.next().await {
                done(o, &mut workers, &mut end);
            }
            continue;
        };
        // Responses first, so that what ends at an instant is seen before what starts at it.
        tokio::select! {
            biased;
            Some(o) = in_flight.next() => {
                done(o, &mut workers, &mut end);
                continue;
            }
            _ = tokio::time::sleep_until(at) => {}
        }
        // Due: wait for the service to be ready, taking responses meanwhile.
        let ready = loop {
            tokio::select! {
                biased;
                Some(o) = in_flight.next() => done(o, &mut workers, &mut end),
                r = poll_fn(|cx| svc.poll_ready(cx)) => break r.is_ok(),
            }
        };
        let ticket = Ticket {
            u1: rng.random(),
            u2: rng.random(),
        };
        let mut req = http::Request::new(());
        req.extensions_mut().insert(ticket);
        if let Some(keys) = workload.keys {
            PickHints::of_mut(&mut req).set_hash(mix64(rng.random_range(0..keys)));
        }
        match &mut next_open {
            Some(next) => {
                if let Arrivals::Open { rate, .. } = workload.arrivals {
                    *next += gap(&mut rng, rate);
                }
            }
            None => {
                workers.pop_front();
            }
        }
        sent += 1;
        if ready {
            in_flight.push(track(start, at, svc.call(req)));
        } else {
            let failed = Outcome {
                sent_at: nanos(at - start),
                latency: nanos(at.elapsed()),
                ok: false,
            };
            done(failed, &mut workers, &mut end);
        }
    }
    drop(svc);
    Run { outcomes, end }
}

/// `t` rounded up to a whole millisecond: the clock moves in steps of 1 ms, so arrivals are
/// scheduled on them (and latencies count from when a request is really sent).
fn whole_ms(t: Duration) -> Duration {
    let ms = t.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// An exponential gap between Poisson arrivals at `rate` per second.
fn gap(rng: &mut StdRng, rate: f64) -> Duration {
    let u: f64 = rng.random();
    Duration::from_secs_f64((-(1.0 - u).ln() / rate).min(3600.0))
}
