use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower_service::Service;

use super::Latency;
use crate::endpoint::{Endpoint, EndpointId, Tier};

/// A request in the simulator: an HTTP request without a body, so that lbkit's HTTP layers
/// (hash keys, failover) work on it.
pub(crate) type SimRequest = http::Request<()>;

/// A simulated endpoint's response.
pub(crate) type SimResponse = http::Response<()>;

/// A simulated endpoint: its latency distribution, and what happens to it over time
/// (slowdowns, errors, outages in windows of simulated time since the start of a run).
///
/// ```
/// use std::time::Duration;
/// use lbkit::sim::{Latency, SimEndpoint};
///
/// let s = Duration::from_secs;
/// let flaky = SimEndpoint::new("b", Latency::exponential(Duration::from_millis(20)))
///     .slowdown(s(10)..s(20), 5.0) // 5 × slower from 10 s to 20 s
///     .errors(s(30)..s(40), 0.2) // 20 % of its requests fail from 30 s to 40 s
///     .fast_errors(s(40)..s(50), 0.1) // 10 % fail at once from 40 s to 50 s
///     .outage(s(50)..s(55)) // refuses every request from 50 s to 55 s
///     .rate_limit(50, s(1)); // over 50 requests in a second: 429, Retry-After: 1
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SimEndpoint {
    pub(crate) endpoint: Endpoint,
    pub(crate) latency: Latency,
    pub(crate) concurrency: Option<usize>,
    pub(crate) windows: Vec<Window>,
    pub(crate) rate_limit: Option<RateLimit>,
}

/// A simulated endpoint's rate limit: at most `per_second` requests in each second of
/// simulated time since the start; the others are refused at once with `429 Too Many
/// Requests` and `Retry-After: retry_after` (whole seconds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RateLimit {
    pub(crate) per_second: u64,
    pub(crate) retry_after: u64,
}

/// Something that happens to a simulated endpoint during a window of time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Effect {
    /// Latencies multiplied by this.
    Slowdown(f64),
    /// This share of requests fail (after their latency, as an HTTP 500 would).
    Errors(f64),
    /// This share of requests fail at once (as a broken handler's instant 500 would).
    FastErrors(f64),
    /// Every request fails at once (as a refused connection).
    Outage,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Window {
    pub(crate) during: Range<Duration>,
    pub(crate) effect: Effect,
}

impl SimEndpoint {
    /// An endpoint named `id` whose requests take `latency`, with weight 1, primary tier, no
    /// concurrency limit and nothing happening to it.
    pub fn new(id: impl Into<EndpointId>, latency: Latency) -> Self {
        SimEndpoint {
            endpoint: Endpoint::new(id),
            latency,
            concurrency: None,
            windows: Vec::new(),
            rate_limit: None,
        }
    }

    /// Sets its weight in the pool.
    pub fn weight(mut self, weight: u32) -> Self {
        self.endpoint = self.endpoint.with_weight(weight);
        self
    }

    /// Sets its tier in the pool.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.endpoint = self.endpoint.with_tier(tier);
        self
    }

    /// Sets the zone it runs in (see [`ZoneAware`](crate::pool::ZoneAware)); the report
    /// then sums the shares of each zone ([`Report::zone_share`](super::Report::zone_share)).
    pub fn zone(mut self, zone: &str) -> Self {
        self.endpoint = self.endpoint.with_zone(zone);
        self
    }

    /// Serves at most `n` requests at once; the others wait in line (first come, first
    /// served), and the wait counts in their latency. Without a limit (the default), every
    /// request takes its sampled latency however many there are.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// Multiplies its latencies by `factor` for requests that arrive during `window`.
    pub fn slowdown(self, window: Range<Duration>, factor: f64) -> Self {
        let factor = if factor.is_finite() {
            factor.max(0.0)
        } else {
            1.0
        };
        self.during(window, Effect::Slowdown(factor))
    }

    /// Fails a share `rate` (0.0 to 1.0) of the requests that arrive during `window`, after
    /// their usual latency (as an HTTP 500 would).
    pub fn errors(self, window: Range<Duration>, rate: f64) -> Self {
        self.during(window, Effect::Errors(share(rate)))
    }

    /// Fails a share `rate` (0.0 to 1.0) of the requests that arrive during `window` at once,
    /// with no latency (as a broken handler answering 500 straight away would): such an
    /// endpoint looks idle and fast to load-aware strategies unless they count its failures.
    pub fn fast_errors(self, window: Range<Duration>, rate: f64) -> Self {
        self.during(window, Effect::FastErrors(share(rate)))
    }

    /// Serves at most `per_second` requests in each second of simulated time (counted from
    /// the start of the run, in whole seconds); the others are answered at once with `429 Too
    /// Many Requests` and `Retry-After` of `retry_after` (rounded up to whole seconds), as a
    /// rate-limited backend does. Such answers are not failures of the endpoint: a balancer
    /// backs off from it for the time asked (see
    /// [`EndpointState::is_backed_off`](crate::endpoint::EndpointState::is_backed_off)), and
    /// the client sees them as errors unless a retry layer sends them elsewhere.
    pub fn rate_limit(mut self, per_second: u64, retry_after: Duration) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        self.rate_limit = Some(RateLimit {
            per_second,
            retry_after: secs,
        });
        self
    }

    /// Fails every request that arrives during `window` at once (as a refused connection).
    pub fn outage(self, window: Range<Duration>) -> Self {
        self.during(window, Effect::Outage)
    }

    fn during(mut self, window: Range<Duration>, effect: Effect) -> Self {
        self.windows.push(Window {
            during: window,
            effect,
        });
        self
    }

    /// The endpoint as the pool sees it.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Its id.
    pub fn id(&self) -> &EndpointId {
        self.endpoint.id()
    }

    /// Whether anything happens to it during a run (a slowdown, errors, an outage or a rate
    /// limit).
    pub fn has_events(&self) -> bool {
        !self.windows.is_empty() || self.rate_limit.is_some()
    }

    /// What holds at `at` since the start. Overlapping windows combine: factors multiply,
    /// the highest error rate of each kind wins.
    fn conditions(&self, at: Duration) -> Conditions {
        let mut c = Conditions {
            factor: 1.0,
            rate: 0.0,
            fast_rate: 0.0,
            out: false,
        };
        for w in self.windows.iter().filter(|w| w.during.contains(&at)) {
            match w.effect {
                Effect::Slowdown(f) => c.factor *= f,
                Effect::Errors(r) => c.rate = c.rate.max(r),
                Effect::FastErrors(r) => c.fast_rate = c.fast_rate.max(r),
                Effect::Outage => c.out = true,
            }
        }
        c
    }
}

/// `rate` as a share from 0.0 to 1.0 (0.0 if it is not a number).
fn share(rate: f64) -> f64 {
    if rate.is_finite() {
        rate.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// What holds for a simulated endpoint at one instant.
struct Conditions {
    /// Latencies are multiplied by this.
    factor: f64,
    /// The share of requests that fail after their latency.
    rate: f64,
    /// The share of requests that fail at once.
    fast_rate: f64,
    /// Every request is refused.
    out: bool,
}

/// The random numbers a simulated request carries (in its extensions), from which each
/// endpoint draws its latency.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    pub(crate) u1: f64,
    pub(crate) u2: f64,
}

/// The error of a simulated endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError {
    endpoint: EndpointId,
    outage: bool,
}

impl SimError {
    /// The endpoint that failed.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// Whether the endpoint was out (the request was refused at once), rather than failing
    /// the request after its latency.
    pub fn is_outage(&self) -> bool {
        self.outage
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.outage {
            write!(f, "simulated endpoint {} is out", self.endpoint)
        } else {
            write!(f, "simulated endpoint {} failed the request", self.endpoint)
        }
    }
}

impl std::error::Error for SimError {}

/// What one simulated endpoint saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// Requests refused by the rate limit (`429`).
    pub(crate) throttled: u64,
    /// Latencies of successful requests, in nanoseconds.
    pub(crate) latencies: Vec<u64>,
    /// When each request arrived, in nanoseconds since the start of the run.
    pub(crate) arrivals: Vec<u64>,
}

struct Shared {
    spec: SimEndpoint,
    start: Instant,
    /// Decides which requests fail in an error window.
    rng: Mutex<StdRng>,
    limit: Option<Arc<Semaphore>>,
    seen: Mutex<Seen>,
    /// The rate limit's current second since the start, and the requests served in it.
    window: Mutex<(u64, u64)>,
}

/// A simulated endpoint as a tower `Service`: each request sleeps on tokio's paused clock for
/// its sampled latency (after waiting for a slot if the endpoint has a concurrency limit),
/// then succeeds or fails as the endpoint's windows say. Cheap to clone (a reference count);
/// clones are the same endpoint.
///
/// Always ready. Made by a [`Scenario`](super::Scenario) run, which hands one per endpoint to
/// the stack under test.
#[derive(Clone)]
pub struct SimService {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimService")
            .field("endpoint", self.shared.spec.id())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimService {
    pub(crate) fn new(spec: SimEndpoint, start: Instant, seed: u64) -> Self {
        let limit = spec.concurrency.map(|n| Arc::new(Semaphore::new(n)));
        SimService {
            shared: Arc::new(Shared {
                spec,
                start,
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                limit,
                seen: Mutex::new(Seen::default()),
                window: Mutex::new((0, 0)),
            }),
        }
    }

    /// The simulated endpoint.
    pub fn spec(&self) -> &SimEndpoint {
        &self.shared.spec
    }

    /// What the endpoint saw so far.
    pub(crate) fn take_seen(&self) -> Seen {
        std::mem::take(&mut *lock(&self.shared.seen))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<SimResponse, SimError>> + Send>>;

impl Service<SimRequest> for SimService {
    type Response = SimResponse;
    type Error = SimError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), SimError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: SimRequest) -> BoxFuture {
        let shared = self.shared.clone();
        let arrived = Instant::now();
        let since = arrived - shared.start;
        let Conditions {
            factor,
            rate,
            fast_rate,
            out,
        } = shared.spec.conditions(since);
        {
            let mut seen = lock(&shared.seen);
            seen.requests += 1;
            seen.arrivals.push(nanos(since));
        }
        let error = |outage| SimError {
            endpoint: shared.spec.id().clone(),
            outage,
        };
        if out {
            lock(&shared.seen).errors += 1;
            let e = error(true);
            return Box::pin(async move { Err(e) });
        }
        if let Some(limit) = shared.spec.rate_limit {
            let mut window = lock(&shared.window);
            let second = since.as_secs();
            if window.0 != second {
                *window = (second, 0);
            }
            if window.1 >= limit.per_second {
                drop(window);
                lock(&shared.seen).throttled += 1;
                let res = http::Response::builder()
                    .status(http::StatusCode::TOO_MANY_REQUESTS)
                    .header(http::header::RETRY_AFTER, limit.retry_after)
                    .body(())
                    .expect("a valid response");
                return Box::pin(async move { Ok(res) });
            }
            window.1 += 1;
        }
        let (ticket, fail, fail_fast) = {
            let mut rng = lock(&shared.rng);
            let ticket = req.extensions().get::<Ticket>().copied().unwrap_or(Ticket {
                u1: rng.random(),
                u2: rng.random(),
            });
            let fail = rate > 0.0 && rng.random::<f64>() < rate;
            let fail_fast = fast_rate > 0.0 && rng.random::<f64>() < fast_rate;
            (ticket, fail, fail_fast)
        };
        if fail_fast {
            lock(&shared.seen).errors += 1;
            let e = error(false);
            return Box::pin(async move { Err(e) });
        }
        let latency = shared
            .spec
            .latency
            .sample(ticket.u1, ticket.u2)
            .mul_f64(factor);
        let e = error(false);
        Box::pin(async move {
            let _permit = match &shared.limit {
                Some(limit) => Some(limit.clone().acquire_owned().await.expect("never closed")),
                None => None,
            };
            tokio::time::sleep(latency).await;
            let mut seen = lock(&shared.seen);
            if fail {
                seen.errors += 1;
                Err(e)
            } else {
                seen.latencies.push(nanos(arrived.elapsed()));
                Ok(http::Response::new(()))
            }
        })
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
