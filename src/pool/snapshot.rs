use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::ramp::{ramped_weight, SlowStart};
use super::zones::{ZoneAware, ZonePlan};
use super::{Member, Status, Table};
use crate::endpoint::{Candidate, Candidates, Chunked, EndpointId, Tier};
use crate::hints::PickHints;
use crate::strategy::{Delta, Edit, PickContext, Strategy};

/// One immutable view of a pool: its eligible endpoints, their services and the strategy's
/// prepared state.
///
/// Eligible means weight above zero, healthy, and in the lowest tier that has such an endpoint
/// (so backups are used only while no primary is healthy). When fewer than the pool's panic
/// threshold (a percentage, see [`PoolBuilder::panic_threshold`](super::PoolBuilder::panic_threshold))
/// of that tier's endpoints are healthy, the snapshot is in *panic*: every endpoint of the tier
/// in rotation is eligible, healthy or not, so the few healthy ones are not crushed by all the
/// traffic (Envoy's behaviour). With no healthy endpoint in any tier, nothing is eligible.
///
/// A snapshot shares what did not change with the one before it (see [`Candidates`]), and the
/// strategy updates its state from the previous one ([`Strategy::update`]), so a change of a
/// few endpoints costs time in proportion to the change, not to the pool. A snapshot is built
/// from scratch when the tier in use or the panic state changes, while an endpoint ramps up
/// under slow start, for a batch that changes more than a thirty-second of the pool, and
/// always with [zone-aware routing](super::ZoneAware) (which routes each pick to a zone
/// first, then lets the strategy pick among that zone's endpoints).
pub struct Snapshot<S, T> {
    total: usize,
    eligible: Candidates,
    pub(super) services: Chunked<S>,
    index: Positions,
    state: Option<T>,
    tier: Option<Tier>,
    panic: bool,
    /// Whether an endpoint of the snapshot was ramping up (its weights are then scaled).
    ramping: bool,
    /// The zone routing table, while zone-aware routing applies.
    zones: Option<ZonePlan<T>>,
    version: u64,
}

/// Pool-wide settings that shape a snapshot.
#[derive(Clone, Debug)]
pub(super) struct BuildOptions {
    /// Below this percentage of healthy endpoints in the tier in use, all of them are eligible.
    pub(super) panic_threshold: u8,
    /// The slow-start ramp, if slow start runs on the pool.
    pub(super) slow_start: Option<SlowStart>,
    /// Now, in the clock of [`clock_ns`](crate::endpoint::state::clock_ns).
    pub(super) now_ns: u64,
    /// Zone-aware routing, if on.
    pub(super) zones: Option<Arc<ZoneAware>>,
}

/// The eligible index of each endpoint id, in shards of about 64 ids each, so that a change
/// copies one shard.
#[derive(Clone)]
struct Positions {
    shards: Vec<Arc<HashMap<EndpointId, u32>>>,
    bits: u32,
}

impl Positions {
    fn build(eligible: &Candidates) -> Self {
        let mut bits = 0;
        while eligible.len() > 64 << bits {
            bits += 1;
        }
        let mut shards = vec![HashMap::new(); 1 << bits];
        for (i, c) in eligible.iter().enumerate() {
            shards[Self::shard_of(bits, c.id_hash())].insert(c.id().clone(), i as u32);
        }
        Positions {
            shards: shards.into_iter().map(Arc::new).collect(),
            bits,
        }
    }

    #[inline]
    fn shard_of(bits: u32, hash: u64) -> usize {
        if bits == 0 {
            0
        } else {
            (hash >> (64 - bits)) as usize
        }
    }

    /// Whether shards of this number still suit `len` ids (else build again: amortized O(1)).
    fn fits(&self, len: usize) -> bool {
        len <= 128 << self.bits && (self.bits == 0 || len >= 16 << self.bits)
    }

    #[inline]
    fn get(&self, id: &EndpointId) -> Option<usize> {
        let shard = &self.shards[Self::shard_of(self.bits, id.stable_hash())];
        shard.get(id).map(|&i| i as usize)
    }

    fn set(&mut self, c: &Candidate, i: usize) {
        let shard = &mut self.shards[Self::shard_of(self.bits, c.id_hash())];
        Arc::make_mut(shard).insert(c.id().clone(), i as u32);
    }

    fn remove(&mut self, c: &Candidate) {
        let shard = &mut self.shards[Self::shard_of(self.bits, c.id_hash())];
        Arc::make_mut(shard).remove(c.id());
    }
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
            .field("zones", &self.zone_shares())
            .finish()
    }
}

/// The tier in use (the lowest with a healthy endpoint in rotation) and whether it is in
/// panic, from the counts of each tier's endpoints in rotation and healthy ones among them.
fn tier_and_panic(tiers: &BTreeMap<Tier, (usize, usize)>, threshold: u8) -> (Option<Tier>, bool) {
    match tiers.iter().find(|(_, &(_, healthy))| healthy > 0) {
        Some((&tier, &(in_tier, healthy))) => {
            (Some(tier), healthy * 100 < usize::from(threshold) * in_tier)
        }
        None => (None, false),
    }
}

/// Counts (or, with `sign` false, uncounts) an endpoint of `status` in its tier.
fn count(tiers: &mut BTreeMap<Tier, (usize, usize)>, status: Status, add: bool) {
    if !status.in_rotation {
        return;
    }
    let entry = tiers.entry(status.tier).or_default();
    if add {
        entry.0 += 1;
        entry.1 += usize::from(status.healthy);
    } else {
        entry.0 -= 1;
        entry.1 -= usize::from(status.healthy);
        if entry.0 == 0 {
            tiers.remove(&status.tier);
        }
    }
}

/// The status of a member now, as a snapshot would count it.
fn status_of<S>(m: &Member<S>) -> Status {
    Status {
        tier: m.endpoint.tier(),
        in_rotation: m.endpoint.weight() > 0,
        healthy: m.state.is_healthy(),
    }
}

impl<S, T> Snapshot<S, T> {
    pub(super) fn empty<St: Strategy<State = T>>(_: &St) -> Self {
        Snapshot {
            total: 0,
            eligible: Candidates::default(),
            services: Chunked::default(),
            index: Positions::build(&Candidates::default()),
            state: None,
            tier: None,
            panic: false,
            ramping: false,
            zones: None,
            version: 0,
        }
    }

    /// Builds the snapshot of `table` from scratch, and records in it where each member is.
    pub(super) fn build<St>(
        strategy: &St,
        table: &mut Table<S>,
        version: u64,
        options: &BuildOptions,
    ) -> Self
    where
        St: Strategy<State = T>,
        S: Clone,
    {
        table.dirty.clear();
        table.gone.clear();
        table.rebuild = false;
        let mut tiers = BTreeMap::new();
        for m in table.map.values_mut() {
            let status = status_of(m);
            count(&mut tiers, status, true);
            m.published.status = Some(status);
            m.published.slot = None;
        }
        let (tier, panic) = tier_and_panic(&tiers, options.panic_threshold);
        table.tiers = tiers;
        let mut picked = Vec::new();
        for m in table.map.values_mut() {
            let st = m.published.status.expect("counted above");
            if Some(st.tier) == tier && st.in_rotation && (panic || st.healthy) {
                let share = match (options.slow_start, m.state.ramp_start()) {
                    (Some(ss), Some(from)) => {
                        ss.share_after(Duration::from_nanos(options.now_ns.saturating_sub(from)))
                    }
                    _ => None,
                };
                m.published.slot = Some(picked.len() as u32);
                picked.push((&*m, share));
            }
        }
        let ramping = picked.iter().any(|(_, share)| share.is_some());
        let mut eligible = Vec::with_capacity(picked.len());
        let mut services = Vec::with_capacity(picked.len());
        for (m, share) in picked {
            let weight = if ramping {
                ramped_weight(m.endpoint.weight(), share)
            } else {
                m.endpoint.weight()
            };
            eligible.push(Candidate::new(m.endpoint.clone(), m.state.clone(), weight));
            services.push(m.service.clone());
        }
        let eligible = Candidates(Chunked::from_vec(eligible));
        let index = Positions::build(&eligible);
        let state = (!eligible.is_empty()).then(|| strategy.prepare(&eligible));
        let zones = match &options.zones {
            Some(config) if !panic => {
                let tier_zones = table.map.values().filter_map(|m| {
                    let st = m.published.status?;
                    (Some(st.tier) == tier && st.in_rotation)
                        .then(|| m.endpoint.zone.clone())
                        .flatten()
                });
                ZonePlan::build(strategy, config, &eligible, tier_zones)
            }
            _ => None,
        };
        Snapshot {
            total: table.map.len(),
            eligible,
            services: Chunked::from_vec(services),
            index,
            state,
            tier,
            panic,
            ramping,
            zones,
            version,
        }
    }

    /// The snapshot after the changes recorded in `table` since this one, built from this one
    /// in time proportional to the changes; `None` when it must be built from scratch (see
    /// the [type docs](Snapshot)).
    pub(super) fn apply<St>(
        &self,
        strategy: &St,
        table: &mut Table<S>,
        version: u64,
        options: &BuildOptions,
    ) -> Option<Self>
    where
        St: Strategy<State = T>,
        S: Clone,
    {
        if table.rebuild || self.ramping || self.version == 0 || options.zones.is_some() {
            return None;
        }
        table.dirty.sort_unstable();
        table.dirty.dedup();
        if table.dirty.len() + table.gone.len() > (table.map.len() / 32).max(16) {
            return None;
        }
        let dirty = std::mem::take(&mut table.dirty);
        let members = &table.map;
        let changed = || dirty.iter().filter_map(|id| members.get(id));
        if options.slow_start.is_some() && changed().any(|m| m.state.ramp_start().is_some()) {
            table.dirty = dirty;
            return None;
        }
        let mut tiers = table.tiers.clone();
        for (_, published) in &table.gone {
            if let Some(status) = published.status {
                count(&mut tiers, status, false);
            }
        }
        for m in changed() {
            if let Some(status) = m.published.status {
                count(&mut tiers, status, false);
            }
            count(&mut tiers, status_of(m), true);
        }
        if tier_and_panic(&tiers, options.panic_threshold) != (self.tier, self.panic) {
            table.dirty = dirty;
            return None;
        }
        table.tiers = tiers;
        let (tier, panic) = (self.tier, self.panic);

        let mut next = Edited {
            eligible: self.eligible.clone(),
            services: self.services.clone(),
            index: self.index.clone(),
            edits: Vec::new(),
        };
        let mut gone = std::mem::take(&mut table.gone);
        for g in 0..gone.len() {
            if let Some(slot) = gone[g].1.slot {
                next.remove(slot as usize, &mut table.map, &mut gone[g + 1..]);
            }
        }
        for id in &dirty {
            let Some(m) = table.map.get(id) else {
                continue;
            };
            let status = status_of(m);
            let eligible =
                Some(status.tier) == tier && status.in_rotation && (panic || status.healthy);
            let candidate =
                Candidate::new(m.endpoint.clone(), m.state.clone(), m.endpoint.weight());
            let service = m.service.clone();
            let slot = match (m.published.slot, eligible) {
                (Some(i), true) => {
                    let i = i as usize;
                    next.eligible.0.set(i, candidate);
                    next.services.set(i, service);
                    next.edits.push(Edit::Set(i));
                    Some(i as u32)
                }
                (Some(i), false) => {
                    next.remove(i as usize, &mut table.map, &mut []);
                    None
                }
                (None, true) => {
                    let i = next.eligible.len();
                    next.index.set(&candidate, i);
                    next.eligible.0.push(candidate);
                    next.services.push(service);
                    next.edits.push(Edit::Push);
                    Some(i as u32)
                }
                (None, false) => None,
            };
            let m = table.map.get_mut(id).expect("looked up above");
            m.published.slot = slot;
            m.published.status = Some(status);
        }
        let Edited {
            eligible,
            services,
            mut index,
            edits,
        } = next;
        if !index.fits(eligible.len()) {
            index = Positions::build(&eligible);
        }
        let state = match &self.state {
            _ if eligible.is_empty() => None,
            Some(previous) => {
                Some(strategy.update(previous, &Delta::new(&self.eligible, &eligible, &edits)))
            }
            None => Some(strategy.prepare(&eligible)),
        };
        Some(Snapshot {
            total: table.map.len(),
            eligible,
            services,
            index,
            state,
            tier,
            panic,
            ramping: false,
            zones: None,
            version,
        })
    }

    /// The endpoints requests may go to now.
    pub fn eligible(&self) -> &Candidates {
        &self.eligible
    }

    /// The service of eligible endpoint `i`, if `i < eligible().len()`.
    pub fn service(&self, i: usize) -> Option<&S> {
        self.services.get(i)
    }

    /// The services of the eligible endpoints, in the same order.
    pub fn services(&self) -> impl ExactSizeIterator<Item = &S> + '_ {
        self.services.iter()
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

    /// The share of picks routed to the local zone while
    /// [zone-aware routing](super::ZoneAware) applies to this snapshot (1.0: all of them
    /// stay local), or `None` while routing is zone-unaware (off, in panic, or too few
    /// endpoints).
    pub fn local_zone_share(&self) -> Option<f64> {
        self.zones.as_ref().map(ZonePlan::local_share)
    }

    /// Each zone that gets picks under [zone-aware routing](super::ZoneAware), with its
    /// share of them (`None` for endpoints with no zone); `None` while routing is
    /// zone-unaware.
    pub fn zone_shares(&self) -> Option<Vec<(Option<Arc<str>>, f64)>> {
        self.zones.as_ref().map(ZonePlan::shares)
    }

    /// Counts up by one with each published snapshot.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The index of an eligible endpoint by id.
    pub fn position(&self, id: &EndpointId) -> Option<usize> {
        self.index.get(id)
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
        match self.pick_routed(strategy, &ctx) {
            None if ctx.checks_backoff() => self.pick_routed(strategy, &ctx.backing_off_at(0)),
            picked => picked,
        }
    }

    /// Picks in the zone the request is routed to (with zone-aware routing), and over all
    /// eligible endpoints when that finds none allowed or routing is zone-unaware.
    #[inline]
    fn pick_routed<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        if let Some(zones) = &self.zones {
            if let Some(i) = zones.pick(strategy, ctx) {
                return Some(i);
            }
        }
        self.pick_ctx(strategy, ctx)
    }
}

/// A snapshot's vectors while changes are applied to them.
struct Edited<S> {
    eligible: Candidates,
    services: Chunked<S>,
    index: Positions,
    edits: Vec<Edit>,
}

impl<S: Clone> Edited<S> {
    /// Removes eligible endpoint `i`; the last one takes its place, and its member (in
    /// `members`, or among the removed ones still to apply, `gone`) learns its new index.
    fn remove(
        &mut self,
        i: usize,
        members: &mut BTreeMap<EndpointId, Member<S>>,
        gone: &mut [(EndpointId, super::Published)],
    ) {
        let last = self.eligible.len() - 1;
        self.index.remove(&self.eligible[i]);
        if i != last {
            let moved = self.eligible[last].clone();
            self.index.set(&moved, i);
            let slot = match gone.iter_mut().find(|(id, _)| id == moved.id()) {
                Some((_, published)) => &mut published.slot,
                None => {
                    &mut members
                        .get_mut(moved.id())
                        .expect("an eligible endpoint is a member")
                        .published
                        .slot
                }
            };
            *slot = Some(i as u32);
        }
        self.eligible.0.swap_remove(i);
        self.services.swap_remove(i);
        self.edits.push(Edit::SwapRemove(i));
    }
}
