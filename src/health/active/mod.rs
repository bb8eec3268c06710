//! Active health checks: a background task probes each endpoint and marks it down or up.

mod check;
#[cfg(feature = "http-proxy")]
mod grpc;
#[cfg(feature = "http-proxy")]
mod http;

pub use crate::pool::check_error::{CheckError, CheckErrorKind};
#[cfg(feature = "http-proxy")]
pub(crate) use check::CheckFuture;
pub use check::{check_fn, HealthCheck, TcpCheck};
#[cfg(feature = "http-proxy")]
pub use grpc::GrpcCheck;
#[cfg(feature = "http-proxy")]
pub use http::HttpCheck;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::HealthChange;
use crate::endpoint::{CheckOutcome, Endpoint, EndpointId, EndpointState};
use crate::pool::PoolTask;
use crate::pool::{Pool, WeakPool};
use crate::strategy::{fast_rand, Strategy};

/// Active health checking of a pool's endpoints, HAProxy style.
///
/// Every endpoint is checked once per [`interval`](HealthChecker::interval) (plus a random
/// [`jitter`](HealthChecker::jitter), so checks of many endpoints and balancers spread out),
/// each check bounded by a [`timeout`](HealthChecker::timeout). `fall` failed checks in a row
/// mark an endpoint down (it gets no new requests); `rise` passed checks in a row bring it
/// back. An endpoint starts up, but as in HAProxy the *first* failed check of a new endpoint
/// marks it down at once, so a backend that is dead from the start is found in one check.
/// While an endpoint is down it may be checked more often
/// ([`down_interval`](HealthChecker::down_interval)). To keep endpoints out until their first
/// check *passes* instead, see [`start_down`](HealthChecker::start_down).
///
/// | setting | default | |
/// |---|---|---|
/// | `interval` | 2 s | HAProxy's `inter` |
/// | `timeout` | 1 s | |
/// | `jitter` | a tenth of `interval` | added to each wait, uniformly at random |
/// | `rise` | 2 | HAProxy's default |
/// | `fall` | 3 | HAProxy's default |
/// | `down_interval` | `interval` | HAProxy's `downinter` |
/// | `start_down` | `false` | nginx's `mandatory`, HAProxy's `init-state down` |
///
/// So with the defaults a stopped backend is marked down within `fall × (interval + jitter)`
/// plus one timeout, about 7.6 s, and comes back within about 4.4 s of answering again.
///
/// The checker owns the down mark: it overrides [`Pool::set_down`] calls by the checks'
/// verdicts. When it brings a down endpoint back and outlier detection had also ejected it
/// (for the failures of its death), the ejection is lifted too, so a restarted backend gets
/// traffic again without waiting out its ejection. Run one per pool.
///
/// ```
/// use std::time::Duration;
/// use lbkit::{Pool, health::{HealthChecker, TcpCheck}, strategy::RoundRobin};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = Pool::new(RoundRobin::new(), |ep| ep.id().clone());
/// pool.insert("127.0.0.1:9".into());
/// let task = HealthChecker::new(TcpCheck::new())
///     .interval(Duration::from_millis(500))
///     .timeout(Duration::from_millis(200))
///     .spawn(&pool);
/// # task.abort();
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HealthChecker<C> {
    check: C,
    settings: Settings,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    interval: Duration,
    down_interval: Option<Duration>,
    timeout: Duration,
    jitter: Option<Duration>,
    rise: u32,
    fall: u32,
    start_down: bool,
}

impl Settings {
    fn jitter(&self) -> Duration {
        self.jitter.unwrap_or(self.interval / 10)
    }

    /// A random duration between zero and the jitter.
    fn random_jitter(&self) -> Duration {
        let max = self.jitter().as_nanos().min(u128::from(u64::MAX)) as u64;
        match max {
            0 => Duration::ZERO,
            _ => Duration::from_nanos(fast_rand::u64() % (max + 1)),
        }
    }
}

impl<C: HealthCheck> HealthChecker<C> {
    /// The default interval between two checks of an endpoint: 2 s.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
    /// The default timeout of one check: 1 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default number of passed checks in a row that bring an endpoint back: 2.
    pub const DEFAULT_RISE: u32 = 2;
    /// The default number of failed checks in a row that mark an endpoint down: 3.
    pub const DEFAULT_FALL: u32 = 3;

    /// A checker running `check` with the default settings (see the table above).
    pub fn new(check: C) -> Self {
        HealthChecker {
            check,
            settings: Settings {
                interval: Self::DEFAULT_INTERVAL,
                down_interval: None,
                timeout: Self::DEFAULT_TIMEOUT,
                jitter: None,
                rise: Self::DEFAULT_RISE,
                fall: Self::DEFAULT_FALL,
                start_down: false,
            },
        }
    }

    /// Sets the time from the start of one check of an endpoint to the start of the next
    /// (plus jitter). A check that takes longer delays the next one: checks of an endpoint
    /// never overlap.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.settings.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets the interval while an endpoint is down (default: the same as
    /// [`interval`](Self::interval)); shorter brings a recovered endpoint back sooner.
    pub fn down_interval(mut self, interval: Duration) -> Self {
        self.settings.down_interval = Some(interval.max(Duration::from_millis(1)));
        self
    }

    /// Sets the timeout of one check (default 1 s): a check that takes longer fails with
    /// [`CheckErrorKind::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Sets the most random time added to each wait (default: a tenth of the interval).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.settings.jitter = Some(jitter);
        self
    }

    /// Sets how many passed checks in a row bring a down endpoint back (default 2, at least 1).
    pub fn rise(mut self, rise: u32) -> Self {
        self.settings.rise = rise.max(1);
        self
    }

    /// Sets how many failed checks in a row mark an endpoint down (default 3, at least 1).
    pub fn fall(mut self, fall: u32) -> Self {
        self.settings.fall = fall.max(1);
        self
    }

    /// Keeps every endpoint out of rotation until its first check passes (default `false`), as
    /// nginx's `health_check mandatory` and HAProxy's `init-state down` do.
    ///
    /// With it, [`spawn`](Self::spawn) marks the pool's endpoints down at once, and an
    /// endpoint that joins later (added by hand or by discovery) is down in the very snapshot
    /// that adds it; each comes up at its first passed check (not `rise` of them, just as the
    /// first failed check of an endpoint marks it down at once), and then ramps up if
    /// [`SlowStart`](crate::health::SlowStart) runs. So a backend that is not ready when it
    /// appears (a pod still starting, a server that listens before it can serve) never gets a
    /// request before a check has seen it serve.
    ///
    /// Off by default, as in nginx and HAProxy: without it a new endpoint gets traffic at
    /// once, and one that is dead from the start is marked down by its first check (within an
    /// interval's jitter plus one timeout), while with it *every* endpoint waits for a check,
    /// so a pool (or a proxy) that starts has no endpoint until the first checks answer, and a
    /// check that cannot pass (a wrong path) keeps everything out. Turn it on where endpoints
    /// come and go while traffic flows and a new one may not be ready. Spawn the checker with
    /// the pool, before traffic: it takes endpoints that already serve out until their check.
    /// When the checker stops, endpoints that join later are no longer held (those it holds
    /// stay down, as every mark a stopped checker leaves).
    pub fn start_down(mut self, start_down: bool) -> Self {
        self.settings.start_down = start_down;
        self
    }

    /// Starts checking the endpoints of `pool`, including those added later, until the pool
    /// is dropped (or the returned task is aborted). Must be called from within a tokio
    /// runtime.
    pub fn spawn<S, St>(self, pool: &Pool<S, St>) -> PoolTask
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let hold = self.settings.start_down.then(|| {
            pool.hold_until_checked(true);
            Unhold(pool.downgrade())
        });
        let checker = Arc::new(Checker {
            check: self.check,
            settings: self.settings,
        });
        let supervising = supervise(pool.downgrade(), pool.watch(), checker);
        let join = tokio::spawn(async move {
            let _unhold = hold;
            supervising.await
        });
        PoolTask::new(join)
    }
}

/// Stops holding new endpoints down when the checker that asked for it ends (aborted, or its
/// pool gone).
struct Unhold<S: Clone, St: Strategy>(WeakPool<S, St>);

impl<S: Clone, St: Strategy> Drop for Unhold<S, St> {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.hold_until_checked(false);
        }
    }
}

struct Checker<C> {
    check: C,
    settings: Settings,
}

/// The probe task of one endpoint, aborted when dropped.
struct Probe {
    endpoint: Arc<Endpoint>,
    state: Arc<EndpointState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps one probe task per endpoint, following the pool's changes; ends (aborting every
/// probe) when the pool is dropped.
async fn supervise<S, St, C>(
    pool: WeakPool<S, St>,
    mut versions: watch::Receiver<u64>,
    checker: Arc<Checker<C>>,
) where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
    C: HealthCheck,
{
    let mut probes: HashMap<EndpointId, Probe> = HashMap::new();
    loop {
        let members = match pool.upgrade() {
            Some(p) => p.members(),
            None => return,
        };
        // Drop the probes of endpoints that left, or came back as new ones, or moved.
        probes.retain(|id, probe| {
            members.iter().any(|(e, s)| {
                e.id() == id
                    && Arc::ptr_eq(s, &probe.state)
                    && e.socket_addr() == probe.endpoint.socket_addr()
            })
        });
        for (endpoint, state) in members {
            if probes.contains_key(endpoint.id()) {
                continue;
            }
            let task = tokio::spawn(probe(
                pool.clone(),
                checker.clone(),
                endpoint.clone(),
                state.clone(),
            ));
            probes.insert(
                endpoint.id().clone(),
                Probe {
                    endpoint,
                    state,
                    task,
                },
            );
        }
        // The sender goes with the pool.
        if versions.changed().await.is_err() {
            return;
        }
    }
}

/// Checks one endpoint forever (until aborted or the pool is gone).
async fn probe<S, St, C>(
    pool: WeakPool<S, St>,
    checker: Arc<Checker<C>>,
    endpoint: Arc<Endpoint>,
    state: Arc<EndpointState>,
) where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
    C: HealthCheck,
{
    let settings = &checker.settings;
    // Spread the first checks of many endpoints.
    tokio::time::sleep(settings.random_jitter()).await;
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut first = true;
    // Until a check passes, an endpoint held down by `start_down` waits for one pass only.
    let mut held = settings.start_down;
    loop {
        let started = Instant::now();
        let verdict =
            match tokio::time::timeout(settings.timeout, checker.check.check(&endpoint)).await {
                Ok(verdict) => verdict,
                Err(_) => Err(CheckError::timeout(settings.timeout)),
            };
        state.record_check(CheckOutcome {
            at: std::time::Instant::now(),
            took: started.elapsed(),
            error: verdict.as_ref().err().map(ToString::to_string),
        });
        let down = state.is_down();
        let change = match verdict {
            Ok(()) => {
                failed = 0;
                passed = passed.saturating_add(1);
                tracing::trace!(endpoint = %endpoint.id(), passed, "health check passed");
                let rise = if held { 1 } else { settings.rise };
                held = false;
                (down && passed >= rise).then_some(HealthChange::Up)
            }
            Err(error) => {
                passed = 0;
                failed = failed.saturating_add(1);
                tracing::debug!(endpoint = %endpoint.id(), failed, %error, "health check failed");
                (!down && (first || failed >= settings.fall)).then_some(HealthChange::Down {
                    reason: Some(error),
                })
            }
        };
        first = false;
        if let Some(change) = change {
            match pool.upgrade() {
                Some(p) => {
                    let up = matches!(change, HealthChange::Up);
                    if p.mark(endpoint.id(), Some(&state), change) && up && state.is_ejected() {
                        // Back from the dead: its outlier ejection was for the failures of its
                        // death; keeping it out until the ejection ends would keep a fleet that
                        // was all down at 503 (Envoy lifts ejections on a passed check too).
                        state.reset_failures();
                        p.mark(endpoint.id(), Some(&state), HealthChange::Returned);
                    }
                }
                None => return,
            }
        }
        let wait = match (state.is_down(), settings.down_interval) {
            (true, Some(down_interval)) => down_interval,
            _ => settings.interval,
        };
        tokio::time::sleep_until(started + wait + settings.random_jitter()).await;
        if pool.upgrade().is_none() {
            return;
        }
    }
}
