//! The pool's side of health: marking endpoints down or ejected (each mark a new snapshot, a
//! `tracing` event and a broadcast [`HealthEvent`]), the panic threshold, and the plumbing of
//! slow start and outlier detection.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, Notify};

use super::ramp::SlowStart;
use super::snapshot::BuildOptions;
use super::{HealthChange, HealthEvent};
use super::{Inner, Pool, Snapshot, Table};
use crate::endpoint::state::{clock_ns, now, PoolShared};
use crate::endpoint::{Endpoint, EndpointId, EndpointState, Health};
use crate::strategy::Strategy;

/// How many health events a slow subscriber may fall behind before it misses some.
const EVENT_CAPACITY: usize = 256;

/// Health settings and wiring of one pool.
pub(super) struct HealthHooks {
    events: broadcast::Sender<HealthEvent>,
    slow_start: Mutex<Option<SlowStart>>,
    /// Wakes the slow-start task when a ramp begins, and when the pool is dropped.
    pub(super) ramp_wake: Arc<Notify>,
    panic_threshold: AtomicU8,
    /// Whether endpoints join down, until a health check brings them up (set by a checker
    /// with [`start_down`](crate::health::HealthChecker::start_down)).
    hold_new: AtomicBool,
}

impl HealthHooks {
    pub(super) fn new(panic_threshold: u8) -> Self {
        HealthHooks {
            events: broadcast::channel(EVENT_CAPACITY).0,
            slow_start: Mutex::new(None),
            ramp_wake: Arc::new(Notify::new()),
            panic_threshold: AtomicU8::new(panic_threshold.min(100)),
            hold_new: AtomicBool::new(false),
        }
    }

    fn slow_start(&self) -> Option<SlowStart> {
        *self.slow_start.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S, St: Strategy> Drop for Inner<S, St> {
    fn drop(&mut self) {
        // Background tasks wait without holding the pool; tell them it is gone.
        self.shared.outlier_wake.notify_waiters();
        self.health.ramp_wake.notify_waiters();
    }
}

impl<S: Clone, St: Strategy> Pool<S, St> {
    /// Ejects an endpoint (or lets it return) as outlier detection does; an ejected endpoint
    /// gets no new requests. Returns whether its health changed. Each change is logged and
    /// broadcast (see [`Pool::health_events`]).
    ///
    /// The ejected mark is independent of the down mark of [`Pool::set_down`]: an endpoint is
    /// healthy when it has neither.
    pub fn set_ejected(&self, id: &EndpointId, ejected: bool) -> bool {
        let change = if ejected {
            HealthChange::Ejected {
                consecutive_failures: 0,
                duration: None,
            }
        } else {
            HealthChange::Returned
        };
        self.mark(id, None, change)
    }

    /// The health of one endpoint, if it is in the pool.
    pub fn health(&self, id: &EndpointId) -> Option<Health> {
        self.lock().get(id).map(|m| m.state.health())
    }

    /// A receiver of every health transition of the pool's endpoints from now on (marked down
    /// or up, ejected or returned), for metrics, logs and tests.
    ///
    /// The channel keeps the last 256 events; a receiver that falls further behind gets
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged) and goes on
    /// with the newest. It is closed when the pool is dropped. To read the current health
    /// instead, see [`Pool::health`] and [`Pool::endpoints`].
    pub fn health_events(&self) -> broadcast::Receiver<HealthEvent> {
        self.inner.health.events.subscribe()
    }

    /// Sets the panic threshold, a percentage from 0 (off) to 100, and republishes the
    /// snapshot (see [`PoolBuilder::panic_threshold`](super::PoolBuilder::panic_threshold)).
    pub fn set_panic_threshold(&self, percent: u8) {
        let mut members = self.lock();
        self.inner
            .health
            .panic_threshold
            .store(percent.min(100), Ordering::Relaxed);
        self.publish(&mut members);
    }

    /// The panic threshold, in percent.
    pub fn panic_threshold(&self) -> u8 {
        self.inner.health.panic_threshold.load(Ordering::Relaxed)
    }

    /// Sets or clears one health mark of endpoint `id` — only if its state is `only`, when
    /// given (so a task that watched a removed endpoint cannot mark a new one of the same id).
    /// On a change: starts a slow-start ramp if the endpoint is healthy again, logs, publishes
    /// a snapshot and broadcasts the event. Returns whether the mark changed.
    pub(crate) fn mark(
        &self,
        id: &EndpointId,
        only: Option<&Arc<EndpointState>>,
        change: HealthChange,
    ) -> bool {
        let mut members = self.lock();
        let Some(m) = members.get(id) else {
            return false;
        };
        if only.is_some_and(|s| !Arc::ptr_eq(s, &m.state)) {
            return false;
        }
        let previous = m.state.health();
        let changed = match &change {
            HealthChange::Down { .. } => m.state.set_down(true),
            HealthChange::Up => m.state.set_down(false),
            HealthChange::Ejected { .. } => m.state.set_ejected(true),
            HealthChange::Returned => m.state.set_ejected(false),
        };
        if !changed {
            return false;
        }
        let health = m.state.health();
        let now = now();
        let ramp = health == Health::Healthy
            && previous != Health::Healthy
            && self.inner.health.slow_start().is_some();
        if ramp {
            m.state.start_ramp(clock_ns(now));
        } else if health != Health::Healthy {
            m.state.end_ramp();
        }
        log_transition(id, &change, previous, health);
        members.dirty.push(id.clone());
        self.publish(&mut members);
        let event = HealthEvent {
            endpoint: id.clone(),
            change,
            previous,
            health,
            at: now,
        };
        // No subscriber is fine.
        let _ = self.inner.health.events.send(event);
        drop(members);
        if ramp {
            self.inner.health.ramp_wake.notify_one();
        }
        true
    }

    /// Keeps endpoints out of rotation until a health check brings them up (`hold`), or stops
    /// doing so for the endpoints that join from now on.
    ///
    /// Holding marks every endpoint of the pool down at once (one snapshot, a
    /// [`HealthChange::Down`] event for each that was not down), and makes endpoints that
    /// join later start down, in the snapshot that adds them: they never get a request before
    /// a check has passed. The active checker that asks for it lifts the marks.
    pub(crate) fn hold_until_checked(&self, hold: bool) {
        let mut members = self.lock();
        self.inner.health.hold_new.store(hold, Ordering::Relaxed);
        if !hold {
            return;
        }
        let now = now();
        let mut held = Vec::new();
        for (id, m) in members.iter() {
            let previous = m.state.health();
            if m.state.set_down(true) {
                m.state.end_ramp();
                tracing::debug!(endpoint = %id, "endpoint held out until a health check passes");
                held.push((id.clone(), previous, m.state.health()));
            }
        }
        if held.is_empty() {
            return;
        }
        // Marks set here, not through `mark`: the next snapshot counts every member again.
        members.rebuild = true;
        self.publish(&mut members);
        drop(members);
        for (endpoint, previous, health) in held {
            let _ = self.inner.health.events.send(HealthEvent {
                endpoint,
                change: HealthChange::Down { reason: None },
                previous,
                health,
                at: now,
            });
        }
    }

    /// Whether endpoints join down (see [`Pool::hold_until_checked`]).
    pub(super) fn holds_new_members(&self) -> bool {
        self.inner.health.hold_new.load(Ordering::Relaxed)
    }

    /// Every endpoint with its state, sharing the pool's `Arc`s (for background tasks).
    pub(crate) fn members(&self) -> Vec<(Arc<Endpoint>, Arc<EndpointState>)> {
        self.lock()
            .values()
            .map(|m| (m.endpoint.clone(), m.state.clone()))
            .collect()
    }

    /// What the pool's endpoint states share (outlier detection's wiring).
    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.inner.shared
    }

    /// Installs (or removes) slow start, then republishes; without it, ramps end at once.
    pub(crate) fn set_slow_start(&self, slow_start: Option<SlowStart>) {
        let mut members = self.lock();
        *self
            .inner
            .health
            .slow_start
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = slow_start;
        members.rebuild = true;
        self.publish(&mut members);
    }

    /// What wakes the slow-start task.
    pub(crate) fn ramp_wake(&self) -> Arc<Notify> {
        self.inner.health.ramp_wake.clone()
    }

    /// Whether any endpoint is ramping up.
    pub(crate) fn is_ramping(&self) -> bool {
        self.lock().values().any(|m| m.state.ramp_start().is_some())
    }

    /// Publishes a fresh snapshot of the same endpoints, built from scratch (slow-start
    /// weights move on).
    pub(crate) fn republish(&self) {
        let mut members = self.lock();
        members.rebuild = true;
        self.publish(&mut members);
    }

    /// When endpoints inserted now should start their ramp: now, if slow start runs and the
    /// pool already has endpoints.
    pub(super) fn ramp_for_new_members(&self, members: &Table<S>) -> Option<u64> {
        (!members.is_empty() && self.inner.health.slow_start().is_some()).then(|| clock_ns(now()))
    }

    /// The settings of the next snapshot.
    pub(super) fn build_options(&self) -> BuildOptions {
        BuildOptions {
            panic_threshold: self.inner.health.panic_threshold.load(Ordering::Relaxed),
            slow_start: self.inner.health.slow_start(),
            now_ns: clock_ns(now()),
            zones: self.inner.zones.clone(),
        }
    }

    /// Ends the ramps that are over (or all of them without slow start), before a snapshot is
    /// built from scratch: O(endpoints), so not on the path of an incremental one, which only
    /// runs while no endpoint ramps.
    pub(super) fn end_finished_ramps(&self, members: &Table<S>, options: &mut BuildOptions) {
        options.now_ns = clock_ns(now());
        let (now_ns, slow_start) = (options.now_ns, options.slow_start);
        for m in members.values() {
            if let Some(from) = m.state.ramp_start() {
                let elapsed = Duration::from_nanos(now_ns.saturating_sub(from));
                if slow_start.is_none_or(|s| s.share_after(elapsed).is_none()) {
                    m.state.end_ramp();
                    tracing::debug!(endpoint = %m.endpoint.id(), "slow start over");
                }
            }
        }
    }
}

/// One `tracing` event per health transition: a warning when an endpoint loses traffic, info
/// when it may get traffic again.
fn log_transition(id: &EndpointId, change: &HealthChange, previous: Health, health: Health) {
    match change {
        HealthChange::Down {
            reason: Some(reason),
        } => tracing::warn!(
            endpoint = %id, ?previous, ?health, %reason,
            "endpoint marked down by health check"
        ),
        HealthChange::Down { reason: None } => {
            tracing::warn!(endpoint = %id, ?previous, ?health, "endpoint marked down")
        }
        HealthChange::Up => tracing::info!(endpoint = %id, ?previous, ?health, "endpoint up"),
        HealthChange::Ejected {
            consecutive_failures,
            duration,
        } => tracing::warn!(
            endpoint = %id, ?previous, ?health, consecutive_failures, ?duration,
            "endpoint ejected by outlier detection"
        ),
        HealthChange::Returned => {
            tracing::info!(endpoint = %id, ?previous, ?health, "endpoint returned from ejection")
        }
    }
}

/// A `tracing` event when the pool enters or leaves panic.
pub(super) fn log_panic_change<S, T>(prev: &Snapshot<S, T>, next: &Snapshot<S, T>) {
    match (prev.is_panic(), next.is_panic()) {
        (false, true) => tracing::warn!(
            eligible = next.eligible().len(),
            "panic: too few healthy endpoints, balancing over all of them"
        ),
        (true, false) => tracing::info!("panic over: balancing over healthy endpoints only"),
        _ => {}
    }
}

impl<S, St: Strategy> Clone for super::WeakPool<S, St> {
    fn clone(&self) -> Self {
        super::WeakPool(self.0.clone())
    }
}
