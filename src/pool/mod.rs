//! The endpoint pool: the live set of endpoints, published as lock-free snapshots.
//!
//! A [`Pool`] holds each endpoint's description, live state and service. Every change (insert,
//! remove, re-weight, a health mark), or batch of changes ([`Pool::update`]), builds a new
//! immutable [`Snapshot`] of the eligible endpoints, with the strategy's prepared state, and
//! swaps it in atomically. Requests read the current snapshot without a lock ([`arc_swap`]), so
//! a change never stalls a pick: picks go on over the old snapshot until the new one is in
//! place. A new snapshot shares what did not change with the one before it, so a change costs
//! time in proportion to what changed, not to the size of the pool (see [`Snapshot`]).
//!
//! A removed endpoint leaves the next snapshot at once and gets no new requests; requests
//! already in flight hold its service and state and finish normally (draining), and the service
//! is dropped when the last of them ends.

pub(crate) mod check_error;
pub(crate) mod event;
mod health;
pub(crate) mod queue;
pub(crate) mod ramp;
mod snapshot;
mod task;
mod zones;

pub(crate) use check_error::CheckError;
pub(crate) use event::{HealthChange, HealthEvent};
pub use snapshot::Snapshot;
pub use task::PoolTask;
pub use zones::ZoneAware;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::endpoint::state::PoolShared;
use crate::endpoint::{Candidate, Endpoint, EndpointId, EndpointState};
use crate::hints::PickHints;
use crate::strategy::{PickContext, Strategy};

/// Builds a [`Pool`] with non-default settings.
#[derive(Clone, Debug)]
pub struct PoolBuilder<St> {
    strategy: St,
    default_rtt: Duration,
    decay: Duration,
    panic_threshold: u8,
    max_requests: u64,
    queue_size: u64,
    queue_timeout: Duration,
    failure_penalty: f64,
    retry_after_cap: Duration,
    zones: Option<Arc<ZoneAware>>,
}

impl<St: Strategy> PoolBuilder<St> {
    /// Turns on zone-aware routing (default off): requests stay in the balancer's own zone
    /// while it holds its share of the healthy endpoints, and spill over the other zones in
    /// proportion to their spare capacity otherwise. Endpoints name their zone with
    /// [`Endpoint::with_zone`]. See [`ZoneAware`].
    pub fn zone_aware(mut self, zones: ZoneAware) -> Self {
        self.zones = Some(Arc::new(zones));
        self
    }

    /// Sets the latency a new endpoint is assumed to have until it answers (default 30 ms).
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt = rtt;
        self
    }

    /// Sets the decay window of the peak-EWMA latency estimate (default 10 s): how long a
    /// slow response keeps weighing on an endpoint's cost.
    pub fn latency_decay(mut self, decay: Duration) -> Self {
        self.decay = decay;
        self
    }

    /// Sets the panic threshold, a percentage from 0 to 100 (default 0: off, so only healthy
    /// endpoints get traffic): when fewer than this share of the endpoints in the tier in use
    /// are healthy, requests are spread over all of that tier's endpoints, healthy or not,
    /// rather than crushing the few healthy ones. Envoy's default is 50; lbkit's is off
    /// because with it, two of three endpoints down sends two thirds of the traffic to
    /// endpoints known to be dead, where a load balancer is expected to send traffic only to
    /// servers that are up (nginx and HAProxy never send to a server marked down). Turn it on
    /// when an overloaded fleet failing its checks together is the likelier story. With no healthy endpoint at all, requests still fail
    /// at once with [`Error::is_no_endpoint`](crate::Error::is_no_endpoint). See
    /// [`Snapshot::is_panic`] and [`Pool::set_panic_threshold`].
    pub fn panic_threshold(mut self, percent: u8) -> Self {
        self.panic_threshold = percent.min(100);
        self
    }

    /// Sets the most requests each endpoint may have in flight at once (default 0: no limit),
    /// as HAProxy's `maxconn` on a server line. The balancer skips an endpoint at its limit;
    /// when every endpoint a request may go to is at its limit, the request waits in the
    /// pool's queue (see [`queue_size`](PoolBuilder::queue_size)), and fails with
    /// [`Error::is_overloaded`](crate::Error::is_overloaded) (503 from the proxy) when the
    /// queue is full or its wait ends. Protects backends from bursts a client can cause at no
    /// cost to itself, such as HTTP/2 streams opened and reset at once. A request whose
    /// preferred (sticky) or hashed endpoint is at its limit goes to another one, as the
    /// ring's bounded load does. Change it later with [`Pool::set_max_requests_per_endpoint`].
    pub fn max_requests_per_endpoint(mut self, limit: u64) -> Self {
        self.max_requests = limit;
        self
    }

    /// Sets how many requests may wait for an endpoint under its limit (default 1024, as
    /// Envoy's `max_pending_requests`); a request beyond that fails at once as overloaded. 0
    /// turns the queue off. Used only with
    /// [`max_requests_per_endpoint`](PoolBuilder::max_requests_per_endpoint).
    pub fn queue_size(mut self, size: u64) -> Self {
        self.queue_size = size;
        self
    }

    /// Sets how long a request may wait in the queue (default 5 s, HAProxy's usual
    /// `timeout queue`): long enough to ride out a burst, short enough that a client gets a
    /// 503 rather than waiting behind a backlog that is not draining.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// Sets how much recent failures weigh in the cost of the load-aware strategies
    /// ([`PeakEwma`](crate::strategy::PeakEwma), [`PowerOfTwoChoices`](crate::strategy::PowerOfTwoChoices),
    /// [`LeastConnections`](crate::strategy::LeastConnections)); default 20, 0 turns it off.
    ///
    /// Each endpoint keeps a failure score, the share of its last 10 or so requests that
    /// failed ([`EndpointState::failure_score`]), decaying over the
    /// [latency decay](PoolBuilder::latency_decay) window while it gets none. Its cost (peak
    /// EWMA) or each of its requests in flight (P2C, least connections) is multiplied by
    /// `1 + penalty × score`: with the default, an endpoint failing one request in ten costs
    /// about three times as much as a healthy one, one failing half of them eleven times.
    /// What counts as a failure is what outlier detection counts: errors of the endpoint's
    /// service and, for HTTP balancers ([`CompleteOnBody`](crate::balance::CompleteOnBody), the
    /// default), 5xx responses (or the statuses chosen with
    /// [`OutlierDetection::failure_status`](crate::health::OutlierDetection::failure_status)).
    ///
    /// Why: a request that fails fast ends early, so without it an endpoint that fails fast
    /// looks idle (P2C, least connections) and fast (peak EWMA), and draws *more* traffic
    /// than the healthy ones. Finagle and linkerd count a failure as a latency penalty for the
    /// same reason. Negative or non-finite values turn it off.
    pub fn failure_penalty(mut self, penalty: f64) -> Self {
        self.failure_penalty = penalty;
        self
    }

    /// Sets the longest pause honoured when an endpoint answers `429 Too Many Requests` or
    /// `503 Service Unavailable` with a `Retry-After` header (default 60 s). Such an answer
    /// takes the endpoint out of rotation for the time asked, capped at this, without counting
    /// as a failure (see [`EndpointState::is_backed_off`]). A zero cap ignores `Retry-After`.
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.retry_after_cap = cap;
        self
    }

    /// Builds the pool; `make` builds the service of each endpoint when it joins.
    pub fn build<S, F>(self, make: F) -> Pool<S, St>
    where
        F: Fn(&Endpoint) -> S + Send + Sync + 'static,
    {
        self.build_inner(Some(Box::new(make)))
    }

    /// Builds a pool whose endpoints come with their services already made, inserted with
    /// [`Changes::insert_with_service`] (as when fed from a `tower::discover::Discover`).
    pub fn build_with_services<S>(self) -> Pool<S, St> {
        self.build_inner(None)
    }

    fn build_inner<S>(self, make: Option<MakeService<S>>) -> Pool<S, St> {
        let shared = PoolShared::default();
        shared.set_failure_penalty(self.failure_penalty);
        shared.set_retry_after_cap(self.retry_after_cap);
        let inner = Inner {
            current: ArcSwap::from_pointee(Snapshot::empty(&self.strategy)),
            members: Mutex::new(Table {
                map: BTreeMap::new(),
                tiers: BTreeMap::new(),
                dirty: Vec::new(),
                gone: Vec::new(),
                rebuild: true,
            }),
            versions: watch::channel(0).0,
            strategy: self.strategy,
            make,
            default_rtt: self.default_rtt,
            decay: self.decay,
            shared: Arc::new(shared),
            health: health::HealthHooks::new(self.panic_threshold),
            queue_size: self.queue_size,
            queue_timeout: self.queue_timeout,
            zones: self.zones,
        };
        inner
            .shared
            .max_requests
            .store(self.max_requests, Ordering::Relaxed);
        Pool {
            inner: Arc::new(inner),
        }
    }
}

/// A live set of endpoints and their services, read lock-free on every request.
///
/// Cheap to clone (a reference count) and usable from any task or thread: clones share the
/// same endpoints. See the [module docs](self).
pub struct Pool<S, St: Strategy> {
    inner: Arc<Inner<S, St>>,
}

struct Member<S> {
    endpoint: Arc<Endpoint>,
    state: Arc<EndpointState>,
    service: S,
    /// How the latest snapshot saw it.
    published: Published,
}

/// How the latest snapshot saw a member: its index among the eligible endpoints, and how it
/// was counted in its tier (`None` before its first snapshot).
#[derive(Clone, Copy, Debug, Default)]
struct Published {
    slot: Option<u32>,
    status: Option<Status>,
}

/// What decides whether an endpoint is eligible, besides the pool-wide tier and panic state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Status {
    tier: crate::endpoint::Tier,
    in_rotation: bool,
    healthy: bool,
}

/// The writers' view of the pool: the members by id, and what changed since the latest
/// snapshot, so that the next one can be built from it (see [`Snapshot`]).
struct Table<S> {
    map: BTreeMap<EndpointId, Member<S>>,
    /// Per tier, the endpoints in rotation and the healthy ones among them, as the latest
    /// snapshot counted them.
    tiers: BTreeMap<crate::endpoint::Tier, (usize, usize)>,
    /// Members added or changed since the latest snapshot (health marks included).
    dirty: Vec<EndpointId>,
    /// Members removed since the latest snapshot, as it saw them.
    gone: Vec<(EndpointId, Published)>,
    /// Whether the next snapshot must be built from scratch.
    rebuild: bool,
}

impl<S> std::ops::Deref for Table<S> {
    type Target = BTreeMap<EndpointId, Member<S>>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

type MakeService<S> = Box<dyn Fn(&Endpoint) -> S + Send + Sync>;

struct Inner<S, St: Strategy> {
    current: ArcSwap<Snapshot<S, St::State>>,
    /// The writers' view; only changes take this lock, never picks.
    members: Mutex<Table<S>>,
    /// The version of the latest snapshot, for watchers.
    versions: watch::Sender<u64>,
    strategy: St,
    make: Option<MakeService<S>>,
    default_rtt: Duration,
    decay: Duration,
    /// Counters and wiring shared with every endpoint's state.
    shared: Arc<PoolShared>,
    /// Health settings, events and the slow-start wake-up.
    health: health::HealthHooks,
    /// How many requests may wait for an endpoint under its limit, and how long.
    queue_size: u64,
    queue_timeout: Duration,
    /// Zone-aware routing, if on.
    zones: Option<Arc<ZoneAware>>,
}

/// A handle that does not keep the pool alive: background tasks (discovery followers, health
/// checkers) hold one and stop once every [`Pool`] and balancer over it is gone.
pub(crate) struct WeakPool<S, St: Strategy>(std::sync::Weak<Inner<S, St>>);

impl<S, St: Strategy> WeakPool<S, St> {
    /// The pool, if it is still alive.
    pub(crate) fn upgrade(&self) -> Option<Pool<S, St>> {
        self.0.upgrade().map(|inner| Pool { inner })
    }
}

impl<S, St: Strategy> Pool<S, St> {
    /// A handle that does not keep the pool alive.
    pub(crate) fn downgrade(&self) -> WeakPool<S, St> {
        WeakPool(Arc::downgrade(&self.inner))
    }
}

impl<S, St: Strategy> Clone for Pool<S, St> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<S, St: Strategy> fmt::Debug for Pool<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.inner.current.load();
        f.debug_struct("Pool")
            .field("strategy", &self.inner.strategy.name())
            .field("endpoints", &snap.len())
            .field("eligible", &snap.eligible().len())
            .finish()
    }
}

/// A batch of changes, applied as one new snapshot by [`Pool::update`].
pub struct Changes<'a, S> {
    members: &'a mut Table<S>,
    make: Option<&'a (dyn Fn(&Endpoint) -> S + Send + Sync)>,
    new_state: &'a dyn Fn() -> EndpointState,
    changed: bool,
}

impl<S> fmt::Debug for Changes<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes")
            .field("endpoints", &self.members.keys().collect::<Vec<_>>())
            .field("changed", &self.changed)
            .finish()
    }
}

impl<S> Changes<'_, S> {
    /// Adds an endpoint, or updates the weight, tier and address of the one with its id. An
    /// endpoint keeps its live state across updates; its service is rebuilt only when its
    /// address changes.
    ///
    /// Returns whether the endpoint is in the pool afterwards: always, except in a pool built
    /// with [`PoolBuilder::build_with_services`], which has no way to make a service for a new
    /// endpoint (use [`Changes::insert_with_service`] there).
    pub fn insert(&mut self, endpoint: Endpoint) -> bool {
        let make = self.make;
        match self.members.map.get_mut(endpoint.id()) {
            Some(m) if *m.endpoint == endpoint => true,
            Some(m) => {
                if m.endpoint.socket_addr() != endpoint.socket_addr() {
                    if let Some(make) = make {
                        m.service = make(&endpoint);
                    }
                }
                m.endpoint = Arc::new(endpoint);
                self.members.dirty.push(m.endpoint.id().clone());
                self.changed = true;
                true
            }
            None => match make {
                Some(make) => {
                    let service = make(&endpoint);
                    self.add(endpoint, service);
                    true
                }
                None => {
                    tracing::warn!(endpoint = %endpoint.id(), "no service for new endpoint: pool takes services with insert_with_service");
                    false
                }
            },
        }
    }

    /// Adds an endpoint with a service made elsewhere, or replaces the service and description
    /// of the one with its id (keeping its live state).
    pub fn insert_with_service(&mut self, endpoint: Endpoint, service: S) {
        match self.members.map.get_mut(endpoint.id()) {
            Some(m) => {
                m.endpoint = Arc::new(endpoint);
                m.service = service;
                self.members.dirty.push(m.endpoint.id().clone());
                self.changed = true;
            }
            None => self.add(endpoint, service),
        }
    }

    fn add(&mut self, endpoint: Endpoint, service: S) {
        let member = Member {
            service,
            state: Arc::new((self.new_state)()),
            endpoint: Arc::new(endpoint),
            published: Published::default(),
        };
        tracing::debug!(endpoint = %member.endpoint.id(), "endpoint added");
        let id = member.endpoint.id().clone();
        self.members.dirty.push(id.clone());
        self.members.map.insert(id, member);
        self.changed = true;
    }

    /// Removes an endpoint; returns whether it was there. Its in-flight requests finish.
    pub fn remove(&mut self, id: &EndpointId) -> bool {
        let removed = self.members.map.remove(id);
        if let Some(m) = &removed {
            tracing::debug!(endpoint = %id, "endpoint removed");
            self.members.gone.push((id.clone(), m.published));
        }
        let removed = removed.is_some();
        self.changed |= removed;
        removed
    }

    /// Sets an endpoint's weight; returns whether the endpoint exists.
    pub fn set_weight(&mut self, id: &EndpointId, weight: u32) -> bool {
        let Some(m) = self.members.get(id) else {
            return false;
        };
        let updated = (*m.endpoint).clone().with_weight(weight);
        self.insert(updated);
        true
    }

    /// Removes every endpoint whose id is not in `keep`, and inserts or updates the ones in it.
    pub fn replace_all(&mut self, keep: impl IntoIterator<Item = Endpoint>) {
        let keep: Vec<Endpoint> = keep.into_iter().collect();
        let kept: std::collections::HashSet<&EndpointId> = keep.iter().map(Endpoint::id).collect();
        let gone: Vec<EndpointId> = self
            .members
            .keys()
            .filter(|id| !kept.contains(id))
            .cloned()
            .collect();
        drop(kept);
        for id in &gone {
            self.remove(id);
        }
        for e in keep {
            self.insert(e);
        }
    }
}

impl<St: Strategy> Pool<(), St> {
    /// A builder for a pool using `strategy`. (Defined on `Pool<(), St>` only so that
    /// `Pool::builder` needs no type annotation; the builder makes pools of any service type.)
    pub fn builder(strategy: St) -> PoolBuilder<St> {
        PoolBuilder {
            strategy,
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            panic_threshold: 0,
            max_requests: 0,
            queue_size: 1024,
            queue_timeout: Duration::from_secs(5),
            failure_penalty: crate::endpoint::state::DEFAULT_FAILURE_PENALTY,
            retry_after_cap: crate::endpoint::state::DEFAULT_RETRY_AFTER_CAP,
            zones: None,
        }
    }
}

impl<S: Clone, St: Strategy> Pool<S, St> {
    /// An empty pool using `strategy`; `make` builds each endpoint's service when it joins.
    pub fn new<F>(strategy: St, make: F) -> Self
    where
        F: Fn(&Endpoint) -> S + Send + Sync + 'static,
    {
        Pool::builder(strategy).build(make)
    }

    /// The strategy.
    pub fn strategy(&self) -> &St {
        &self.inner.strategy
    }

    /// The current snapshot. Holding it keeps its endpoints' services alive; drop it soon.
    pub fn snapshot(&self) -> Arc<Snapshot<S, St::State>> {
        self.inner.current.load_full()
    }

    /// The current snapshot, borrowed for a pick (no reference count is taken).
    #[inline]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot<S, St::State>>> {
        self.inner.current.load()
    }

    /// Applies a batch of changes as one new snapshot (published only if something changed).
    /// Returns what `f` returns.
    pub fn update<R>(&self, f: impl FnOnce(&mut Changes<'_, S>) -> R) -> R {
        let mut members = self.lock();
        let inner = &*self.inner;
        // With slow start, endpoints joining a pool that already has some ramp up.
        let ramp_from = self.ramp_for_new_members(&members);
        // With a checker that holds new endpoints, they join down (and ramp once up).
        let hold = self.holds_new_members();
        let new_state = || {
            let state = EndpointState::new(inner.default_rtt, inner.decay, inner.shared.clone());
            if hold {
                state.set_down(true);
            } else if let Some(at) = ramp_from {
                state.start_ramp(at);
            }
            state
        };
        let mut changes = Changes {
            members: &mut *members,
            make: inner.make.as_deref(),
            new_state: &new_state,
            changed: false,
        };
        let out = f(&mut changes);
        if changes.changed {
            self.publish(&mut members);
            if ramp_from.is_some() && !hold {
                self.inner.health.ramp_wake.notify_one();
            }
        }
        out
    }

    /// Adds an endpoint, or updates the one with its id (see [`Changes::insert`]).
    pub fn insert(&self, endpoint: Endpoint) -> bool {
        self.update(|c| c.insert(endpoint))
    }

    /// Adds or updates many endpoints as one change.
    pub fn extend(&self, endpoints: impl IntoIterator<Item = Endpoint>) {
        self.update(|c| {
            for e in endpoints {
                c.insert(e);
            }
        });
    }

    /// Removes an endpoint; returns whether it was there. Its in-flight requests finish.
    pub fn remove(&self, id: &EndpointId) -> bool {
        self.update(|c| c.remove(id))
    }

    /// Sets an endpoint's weight; returns whether the endpoint exists.
    pub fn set_weight(&self, id: &EndpointId, weight: u32) -> bool {
        self.update(|c| c.set_weight(id, weight))
    }

    /// Marks an endpoint down (or up again) on the word of a health check; a down endpoint gets
    /// no new requests. Returns whether its health changed. Each change is logged and
    /// broadcast (see [`Pool::health_events`]).
    pub fn set_down(&self, id: &EndpointId, down: bool) -> bool {
        let change = if down {
            HealthChange::Down { reason: None }
        } else {
            HealthChange::Up
        };
        self.mark(id, None, change)
    }

    /// Every endpoint in the pool (eligible or not) with its live state, in id order.
    pub fn endpoints(&self) -> Vec<(Endpoint, Arc<EndpointState>)> {
        self.lock()
            .values()
            .map(|m| ((*m.endpoint).clone(), m.state.clone()))
            .collect()
    }

    /// The live state of one endpoint.
    pub fn state(&self, id: &EndpointId) -> Option<Arc<EndpointState>> {
        self.lock().get(id).map(|m| m.state.clone())
    }

    /// Sets the failure penalty of the load-aware strategies at run time (see
    /// [`PoolBuilder::failure_penalty`]; 0 turns it off). Takes effect at the next pick.
    pub fn set_failure_penalty(&self, penalty: f64) {
        self.inner.shared.set_failure_penalty(penalty);
    }

    /// Sets the longest `Retry-After` honoured at run time (see
    /// [`PoolBuilder::retry_after_cap`]; zero ignores `Retry-After`). Endpoints already backed
    /// off stay so for the time they were given.
    pub fn set_retry_after_cap(&self, cap: Duration) {
        self.inner.shared.set_retry_after_cap(cap);
    }

    /// Requests in flight over the whole pool.
    pub fn in_flight(&self) -> u64 {
        self.inner.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Requests waiting now for an endpoint under its limit (see
    /// [`PoolBuilder::max_requests_per_endpoint`]).
    pub fn queued(&self) -> u64 {
        self.inner.shared.queued.load(Ordering::Relaxed)
    }

    /// The most requests each endpoint may have in flight; 0: no limit.
    pub fn max_requests_per_endpoint(&self) -> u64 {
        self.inner.shared.max_requests.load(Ordering::Relaxed)
    }

    /// Changes the most requests each endpoint may have in flight (0: no limit; see
    /// [`PoolBuilder::max_requests_per_endpoint`]). Requests over a lowered limit finish;
    /// waiting requests try again at once.
    pub fn set_max_requests_per_endpoint(&self, limit: u64) {
        self.inner
            .shared
            .max_requests
            .store(limit, Ordering::Relaxed);
        self.inner.shared.wake_all();
    }

    /// How many requests may wait for an endpoint under its limit, and for how long (see
    /// [`PoolBuilder::queue_size`] and [`PoolBuilder::queue_timeout`]).
    pub fn queue_limits(&self) -> (u64, Duration) {
        (self.inner.queue_size, self.inner.queue_timeout)
    }

    /// Whether every eligible endpoint is at the in-flight limit: never with no limit, nor
    /// with no eligible endpoint (a request then fails at once, it does not wait).
    pub fn is_saturated(&self) -> bool {
        match self.max_requests_per_endpoint() {
            0 => false,
            limit => {
                let snap = self.load();
                let eligible = snap.eligible();
                !eligible.is_empty() && eligible.iter().all(|c| c.state().in_flight() >= limit)
            }
        }
    }

    /// Picks an endpoint for a request with `hints` (or none), without sending anything: the
    /// returned [`Candidate`] and a clone of its service. This is what a
    /// [`Balancer`](crate::Balancer) does for each request; use it to balance something that is
    /// not a tower `Service` (such as raw TCP connections). It is the one way to pick outside
    /// a balancer: hash keys, preferred endpoints and endpoints to avoid go in `hints`
    /// ([`PickHints::set_hash`], [`PickHints::prefer`], [`PickHints::avoid`]), as the request
    /// layers put them in a request's extensions. Endpoints at the in-flight limit
    /// are skipped, but nothing is reserved: the count goes up when the caller starts an
    /// [`InFlight`](crate::balance::InFlight) handle.
    pub fn pick(&self, hints: Option<&PickHints>) -> Option<(Candidate, S)>
    where
        S: Clone,
    {
        let snap = self.load();
        let i = snap.pick(
            &self.inner.strategy,
            hints,
            self.max_requests_per_endpoint(),
        )?;
        Some((snap.eligible()[i].clone(), snap.services[i].clone()))
    }

    /// Picks with a bare [`PickContext`] in a snapshot already held; returns the candidate
    /// index. Not part of the API (users pick with [`Pool::pick`], or through a
    /// [`Balancer`](crate::Balancer)): the strategy alone, for benchmarks and tests that
    /// compare picks key by key.
    #[doc(hidden)]
    #[inline]
    pub fn pick_in(
        &self,
        snapshot: &Snapshot<S, St::State>,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        snapshot.pick_ctx(&self.inner.strategy, ctx)
    }

    /// Picks an endpoint for a request and counts the request in flight there, under the
    /// in-flight limit if one is set; `f` gets the endpoint and its service.
    #[inline]
    pub(crate) fn acquire<R>(
        &self,
        hints: Option<&PickHints>,
        f: impl FnOnce(&Candidate, &S) -> R,
    ) -> queue::Acquired<R> {
        use queue::Acquired;
        let snap = self.load();
        let strategy = &self.inner.strategy;
        let limit = self.max_requests_per_endpoint();
        if limit == 0 {
            return match snap.pick(strategy, hints, 0) {
                Some(i) => {
                    let candidate = &snap.eligible()[i];
                    candidate.state().start();
                    Acquired::Picked(f(candidate, &snap.services[i]))
                }
                None => Acquired::NoEndpoint,
            };
        }
        // The pick skips endpoints at the limit, but racing requests may fill the picked one
        // before this one counts itself: then it is skipped too and the pick runs again.
        for _ in 0..=snap.eligible().len() {
            let Some(i) = snap.pick(strategy, hints, limit) else {
                break;
            };
            let candidate = &snap.eligible()[i];
            if candidate.state().try_start(limit) {
                return Acquired::Picked(f(candidate, &snap.services[i]));
            }
        }
        match snap.pick(strategy, hints, 0) {
            Some(_) => Acquired::Saturated,
            None => Acquired::NoEndpoint,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table<S>> {
        // A panic while holding the lock cannot leave the map half-changed in a way that
        // matters: each change is a single insert or remove. Go on with it.
        self.inner.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, members: &mut Table<S>) {
        let prev = self.inner.current.load();
        let mut options = self.build_options();
        let version = prev.version() + 1;
        let strategy = &self.inner.strategy;
        let snap = match prev.apply(strategy, members, version, &options) {
            Some(snap) => snap,
            None => {
                self.end_finished_ramps(members, &mut options);
                Snapshot::build(strategy, members, version, &options)
            }
        };
        health::log_panic_change(&prev, &snap);
        drop(prev);
        let version = snap.version();
        self.inner.current.store(Arc::new(snap));
        self.inner.versions.send_replace(version);
        // Requests waiting for a slot may find one among the endpoints now eligible.
        self.inner.shared.wake_all();
    }

    /// A receiver that sees the version of each snapshot the pool publishes: wait on it to
    /// follow changes of the endpoint set or of its health.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.inner.versions.subscribe()
    }
}
