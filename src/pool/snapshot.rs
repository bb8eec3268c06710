use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::ramp::{ramped_weight, SlowStart};
use crate::endpoint::{Candidate, Endpoint, EndpointId, EndpointState, Tier};
use crate::hints::PickHints;
use crate::strategy::{PickContext, Strategy};

/// One immutable view of a pool: its eligible endpoints, their services and the strategy's
/// prepared state.
///
/// Eligible means weight above zero, healthy, and in the lowest tier that has such an endpoint
/// (so backups are used only while no primary is healthy). When fewer than the pool's panic
/// threshold (a percentage, see [`PoolBuilder::panic_threshold`](super::PoolBuilder::panic_threshold))
/// of that tier's endpoints are healthy, the snapshot is in *panic*: every endpoint of the tier
/// in rotation is eligible, healthy or not, so the few healthy ones are not crushed by all the
/// traffic (Envoy's behaviour). With no healthy endpoint in any tier, nothing is eligible.
pub struct Snapshot<S, T> {
    total: usize,
    eligible: Vec<Candidate>,
    pub(super) services: Vec<S>,
    index: HashMap<EndpointId, usize>,
    state: Option<T>,
    tier: Option<Tier>,
    panic: bool,
    version: u64,
}

/// Pool-wide settings that shape a snapshot.
#[derive(Clone, Copy, Debug)]
pub(super) struct BuildOptions {
    /// Below this percentage of healthy endpoints in the tier in use, all of them are eligible.
    pub(super) panic_threshold: u8,
    /// The slow-start ramp, if slow start runs on the pool.
    pub(super) slow_start: Option<SlowStart>,
    /// Now, in the clock of [`clock_ns`](crate::endpoint::state::clock_ns).
    pub(super) now_ns: u64,
}

impl<S, T> fmt::Debug for Snapshot<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("endpoints", &self.total)
            .field(
                "eligible",
                &self.eligible.iter().map(Candidate::id).collect::<Vec<_>>(),
            )
            .field("tier", &self.tier)
            .field("panic", &self.panic)
            .finish()
    }
}

impl<S, T> Snapshot<S, T> {
    pub(super) fn empty<St: Strategy<State = T>>(_: &St) -> Self {
        Snapshot {
            total: 0,
            eligible: Vec::new(),
            services: Vec::new(),
            index: HashMap::new(),
            state: None,
            tier: None,
            panic: false,
            version: 0,
        }
    }

    pub(super) fn build<'a, St>(
        strategy: &St,
        members: impl Iterator<Item = (&'a Arc<Endpoint>, &'a Arc<EndpointState>, &'a S)> + Clone,
        version: u64,
        options: &BuildOptions,
    ) -> Self
    where
        St: Strategy<State = T>,
        S: Clone + 'a,
    {
        let in_rotation = |e: &Endpoint| e.weight() > 0;
        // The lowest tier with a healthy endpoint in rotation.
        let tier = members
            .clone()
            .filter(|(e, s, _)| in_rotation(e) && s.is_healthy())
            .map(|(e, _, _)| e.tier())
            .min();
        // Panic: too few of that tier's endpoints are healthy; spread over all of them.
        let (mut in_tier, mut healthy) = (0usize, 0usize);
        for (e, s, _) in members.clone() {
            if Some(e.tier()) == tier && in_rotation(e) {
                in_tier += 1;
                healthy += usize::from(s.is_healthy());
            }
        }
        let panic = healthy * 100 < usize::from(options.panic_threshold) * in_tier;
        let mut picked = Vec::new();
        let mut total = 0;
        for m in members {
            total += 1;
            let (e, s, _) = m;
            if Some(e.tier()) == tier && in_rotation(e) && (panic || s.is_healthy()) {
                let share = match (options.slow_start, s.ramp_start()) {
                    (Some(ss), Some(from)) => {
                        ss.share_after(Duration::from_nanos(options.now_ns.saturating_sub(from)))
                    }
                    _ => None,
                };
                picked.push((m, share));
            }
        }
        let ramping = picked.iter().any(|(_, share)| share.is_some());
        let mut eligible = Vec::with_capacity(picked.len());
        let mut services = Vec::with_capacity(picked.len());
        for ((e, s, svc), share) in picked {
            let weight = if ramping {
                ramped_weight(e.weight(), share)
            } else {
                e.weight()
            };
            eligible.push(Candidate::new(e.clone(), s.clone(), weight));
            services.push(svc.clone());
        }
        let index = eligible
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id().clone(), i))
            .collect();
        let state = (!eligible.is_empty()).then(|| strategy.prepare(&eligible));
        Snapshot {
            total,
            eligible,
            services,
            index,
            state,
            tier,
            panic,
            version,
        }
    }

    /// The endpoints requests may go to now.
    pub fn eligible(&self) -> &[Candidate] {
        &self.eligible
    }

    /// The services of the eligible endpoints, in the same order.
    pub fn services(&self) -> &[S] {
        &self.services
    }

    /// How many endpoints the pool held, eligible or not.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the pool held no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The tier in use, if any endpoint is eligible.
    pub fn tier(&self) -> Option<Tier> {
        self.tier
    }

    /// Whether the snapshot is in panic: too few endpoints of its tier are healthy, so all of
    /// them are eligible (see the [type docs](Snapshot)).
    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Counts up by one with each published snapshot.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The index of an eligible endpoint by id.
    pub fn position(&self, id: &EndpointId) -> Option<usize> {
        self.index.get(id).copied()
    }

    #[inline]
    pub(crate) fn pick_ctx<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let state = self.state.as_ref()?;
        strategy.pick(state, &self.eligible, ctx)
    }

    /// Picks for a request: its preferred endpoint while eligible and allowed (not avoided,
    /// under `max_in_flight`, 0: no limit), otherwise the strategy's choice.
    ///
    /// Endpoints backed off by `Retry-After` are passed over like avoided ones; when that
    /// leaves nothing, the pick is made again without that filter (an endpoint that asked for
    /// a pause is still better than no answer). While no endpoint of the pool is backed off,
    /// the filter costs one atomic load and reads no clock.
    #[inline]
    pub(crate) fn pick<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        hints: Option<&PickHints>,
        max_in_flight: u64,
    ) -> Option<usize> {
        let backoff_at = self
            .eligible
            .first()
            .map_or(0, |c| c.state().pool_shared().backoff_now());
        let mut ctx = PickContext::new()
            .with_max_in_flight(max_in_flight)
            .backing_off_at(backoff_at);
        if let Some(h) = hints {
            ctx = ctx.avoiding(h.avoided());
            if let Some(hash) = h.hash() {
                ctx = ctx.with_hash(hash);
            }
            if let Some(i) = h.preferred().and_then(|id| self.position(id)) {
                if ctx.allows(&self.eligible[i]) {
                    return Some(i);
                }
            }
        }
        match self.pick_ctx(strategy, &ctx) {
            None if ctx.checks_backoff() => self.pick_ctx(strategy, &ctx.backing_off_at(0)),
            picked => picked,
        }
    }
}
