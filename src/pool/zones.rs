//! Zone-aware routing: keep traffic in the balancer's own zone while that zone has its share
//! of healthy endpoints, and spill the rest over the other zones in proportion to their spare
//! capacity (Envoy's zone-aware routing).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::endpoint::{Candidate, Candidates};
use crate::strategy::{fast_rand, PickContext, Strategy};

/// Picks are routed in units of 1 / `SCALE`.
const SCALE: u32 = 1 << 20;

/// Zone-aware routing settings, for [`PoolBuilder::zone_aware`](super::PoolBuilder::zone_aware).
///
/// Endpoints carry the zone they run in ([`Endpoint::with_zone`](crate::endpoint::Endpoint::with_zone)),
/// and the balancer knows its own zone (the *local* zone) and how the balancers of its fleet
/// (the proxies, or the client processes, that share this upstream) are spread over zones.
/// Each snapshot compares, for the local zone, its share of the fleet with its share of the
/// upstream's healthy endpoints:
///
/// - while the local zone holds at least its share of the healthy endpoints, every request
///   stays in it ("direct" routing): with the fleet spread like the upstream, no request
///   crosses a zone;
/// - otherwise the local zone gets `upstream share / fleet share` of the requests (what it
///   can serve while each endpoint of the upstream keeps about the same rate), and the rest
///   spills over the other zones in proportion to their *residual* capacity, their share of
///   healthy endpoints beyond their share of the fleet. A zone with no spare capacity gets
///   no spilled request; a zone where no balancer runs (or endpoints with no zone) spare all
///   theirs.
///
/// Within the chosen zone the pool's strategy picks as usual, over that zone's endpoints
/// only (each zone has the strategy's state prepared for it). When the strategy finds no
/// allowed endpoint there (all avoided by a retry, or at their in-flight limit), the pick is
/// made again over every eligible endpoint, so zones never make a request fail. A preferred
/// (sticky) endpoint is honoured wherever it is.
///
/// **The fleet's spread.** Envoy reads it from the local cluster's membership. Here it is
/// given with [`local_cluster`](ZoneAware::local_cluster) (balancers per zone, from a
/// deployment's replica spread or a discovery of the balancers themselves); without it, the
/// fleet is assumed to be spread equally over the zones that hold endpoints of the tier in
/// use (healthy or not) — the usual outcome of a topology spread over zones.
///
/// **When routing is zone-unaware.** Like Envoy, a snapshot routes over all eligible endpoints
/// when the pool is in [panic](super::Snapshot::is_panic), when fewer than
/// [`min_cluster_size`](ZoneAware::min_cluster_size) endpoints are eligible (default 6: with
/// few endpoints, rounding makes the shares meaningless and the load of a zone lopsided), or
/// when the local zone has no share of the fleet (it is not among the zones of the spread).
///
/// Shares count endpoints, not weights (Envoy's default basis): a zone's capacity is its
/// number of healthy endpoints. The routing table is computed when a snapshot is published;
/// a pick costs one or two random numbers and no lock or allocation. With zone-aware
/// routing on, every snapshot is built from scratch (time in proportion to the pool, not
/// to the change).
///
/// ```
/// use lbkit::endpoint::Endpoint;
/// use lbkit::pool::{Pool, ZoneAware};
/// use lbkit::strategy::RoundRobin;
///
/// let pool = Pool::builder(RoundRobin::new())
///     .zone_aware(ZoneAware::new("a"))
///     .build(|e: &Endpoint| e.id().clone());
/// for zone in ["a", "b", "c"] {
///     for i in 0..4 {
///         pool.insert(Endpoint::new(format!("{zone}{i}")).with_zone(zone));
///     }
/// }
/// // Zone a holds its third of the endpoints: every request stays there.
/// assert_eq!(pool.snapshot().local_zone_share(), Some(1.0));
///
/// // Half of zone a goes down: a keeps 2 / 10 of the capacity for 1 / 3 of the fleet, so
/// // it takes 60 % of this balancer's requests; b and c share the rest.
/// pool.set_down(&"a0".into(), true);
/// pool.set_down(&"a1".into(), true);
/// let share = pool.snapshot().local_zone_share().unwrap();
/// assert!((share - 0.6).abs() < 1e-3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneAware {
    local: Arc<str>,
    fleet: Option<Vec<(Arc<str>, u32)>>,
    min_cluster_size: usize,
}

impl ZoneAware {
    /// Zone-aware routing for a balancer running in `local_zone`, with the fleet assumed
    /// spread equally over the upstream's zones and a minimum of 6 eligible endpoints.
    /// An empty zone name matches no endpoint, so routing stays zone-unaware.
    pub fn new(local_zone: impl Into<Arc<str>>) -> Self {
        ZoneAware {
            local: local_zone.into(),
            fleet: None,
            min_cluster_size: 6,
        }
    }

    /// Sets how many balancers of the fleet run in each zone (zones not listed have none).
    /// Only the proportions matter. With no balancer counted in the local zone, routing is
    /// zone-unaware.
    pub fn local_cluster<Z: Into<Arc<str>>>(
        mut self,
        zones: impl IntoIterator<Item = (Z, u32)>,
    ) -> Self {
        let mut fleet: BTreeMap<Arc<str>, u32> = BTreeMap::new();
        for (zone, n) in zones {
            let n_ref = fleet.entry(zone.into()).or_default();
            *n_ref = n_ref.saturating_add(n);
        }
        self.fleet = Some(fleet.into_iter().collect());
        self
    }

    /// Sets the fewest eligible endpoints for zone-aware routing (default 6, as Envoy's
    /// `min_cluster_size`); below it, requests go over all eligible endpoints.
    pub fn min_cluster_size(mut self, n: usize) -> Self {
        self.min_cluster_size = n;
        self
    }

    /// The balancer's own zone.
    pub fn local_zone(&self) -> &str {
        &self.local
    }
}

/// Eligible endpoints by zone, each with its index among all eligible endpoints.
type ByZone = BTreeMap<Option<Arc<str>>, (Vec<Candidate>, Vec<u32>)>;

/// The endpoints of one zone in a snapshot, with the strategy's state for them.
struct ZoneGroup<T> {
    zone: Option<Arc<str>>,
    eligible: Candidates,
    /// Each one's index among the snapshot's eligible endpoints.
    global: Vec<u32>,
    state: T,
}

/// A snapshot's zone routing table: how picks are spread over zones, and each zone's
/// endpoints.
pub(super) struct ZonePlan<T> {
    groups: Vec<ZoneGroup<T>>,
    /// The local zone's group, if it has eligible endpoints.
    local: Option<usize>,
    /// Of `SCALE` picks, those routed to the local zone.
    local_share: u32,
    /// Cumulative residual capacities of the other zones that get spilled requests.
    spill: Vec<(u64, usize)>,
}

impl<T> ZonePlan<T> {
    /// The routing table for `eligible` (the snapshot's eligible endpoints, none in panic),
    /// or `None` where routing is zone-unaware. `tier_zones` are the zones of every endpoint
    /// of the tier in use, healthy or not (the assumed fleet's zones).
    pub(super) fn build<St>(
        strategy: &St,
        config: &ZoneAware,
        eligible: &Candidates,
        tier_zones: impl IntoIterator<Item = Arc<str>>,
    ) -> Option<Self>
    where
        St: Strategy<State = T>,
    {
        let total = eligible.len();
        if total == 0 || total < config.min_cluster_size {
            return None;
        }
        let fleet: Vec<(Arc<str>, u32)> = match &config.fleet {
            Some(fleet) => fleet.clone(),
            None => {
                let zones: std::collections::BTreeSet<Arc<str>> = tier_zones.into_iter().collect();
                zones.into_iter().map(|z| (z, 1)).collect()
            }
        };
        let fleet_total: f64 = fleet.iter().map(|&(_, n)| f64::from(n)).sum();
        let fleet_share = |zone: Option<&str>| -> f64 {
            match zone {
                Some(z) if fleet_total > 0.0 => fleet
                    .iter()
                    .find(|(f, _)| &**f == z)
                    .map_or(0.0, |&(_, n)| f64::from(n) / fleet_total),
                _ => 0.0,
            }
        };
        let local_fleet = fleet_share(Some(&config.local));
        if local_fleet <= 0.0 {
            return None;
        }

        let mut members: ByZone = BTreeMap::new();
        for (i, c) in eligible.iter().enumerate() {
            let zone = c.endpoint().zone.clone();
            let entry = members.entry(zone).or_default();
            entry.0.push(c.clone());
            entry.1.push(i as u32);
        }
        let up_share = |n: usize| n as f64 / total as f64;
        let local_key = Some(config.local.clone());
        let local_up = members
            .get(&local_key)
            .map_or(0.0, |(c, _)| up_share(c.len()));
        let local_share = if local_up >= local_fleet {
            SCALE
        } else {
            (local_up / local_fleet * f64::from(SCALE)) as u32
        };

        let mut groups = Vec::new();
        let mut local = None;
        let mut spill = Vec::new();
        let mut cumulative = 0u64;
        let residual = |zone: &Option<Arc<str>>, n: usize| {
            let r = up_share(n) - fleet_share(zone.as_deref());
            if r > 0.0 {
                (r * f64::from(SCALE)).round() as u64
            } else {
                0
            }
        };
        let any_residual = local_share < SCALE
            && members
                .iter()
                .any(|(z, (c, _))| *z != local_key && residual(z, c.len()) > 0);
        for (zone, (candidates, global)) in members {
            let is_local = zone == local_key;
            let weight = match () {
                _ if is_local || local_share == SCALE => 0,
                // Rounding left no zone with spare capacity: spill by endpoints.
                _ if !any_residual => candidates.len() as u64,
                _ => residual(&zone, candidates.len()),
            };
            if !is_local && weight == 0 {
                continue;
            }
            if is_local && local_share == 0 {
                continue;
            }
            let eligible: Candidates = candidates.into_iter().collect();
            let state = strategy.prepare(&eligible);
            if is_local {
                local = Some(groups.len());
            } else {
                cumulative += weight;
                spill.push((cumulative, groups.len()));
            }
            groups.push(ZoneGroup {
                zone,
                eligible,
                global,
                state,
            });
        }
        Some(ZonePlan {
            groups,
            local,
            local_share: if local.is_some() { local_share } else { 0 },
            spill,
        })
    }

    /// The zone a request goes to: the local one for `local_share` of `SCALE` picks, else
    /// one of the others by residual capacity.
    #[inline]
    fn route(&self) -> Option<&ZoneGroup<T>> {
        if let Some(local) = self.local {
            if self.local_share == SCALE
                || (fast_rand::below(SCALE as usize) as u32) < self.local_share
            {
                return Some(&self.groups[local]);
            }
        }
        let total = self.spill.last()?.0;
        let x = fast_rand::u64() % total;
        let &(_, g) = self.spill.iter().find(|&&(upto, _)| x < upto)?;
        Some(&self.groups[g])
    }

    /// Picks in the zone the request is routed to; returns the index among the snapshot's
    /// eligible endpoints, or `None` when the strategy allows none there.
    #[inline]
    pub(super) fn pick<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let group = self.route()?;
        let i = strategy.pick(&group.state, &group.eligible, ctx)?;
        Some(group.global[i] as usize)
    }

    /// The share of picks routed to the local zone.
    pub(super) fn local_share(&self) -> f64 {
        f64::from(self.local_share) / f64::from(SCALE)
    }

    /// Each zone that gets requests, with its share of the picks.
    pub(super) fn shares(&self) -> Vec<(Option<Arc<str>>, f64)> {
        let local = self.local_share();
        let spilled = 1.0 - local;
        let total = self.spill.last().map_or(0, |&(t, _)| t) as f64;
        let mut out = Vec::with_capacity(self.groups.len());
        let mut previous = 0u64;
        for (g, group) in self.groups.iter().enumerate() {
            let share = if Some(g) == self.local {
                local
            } else {
                match self.spill.iter().find(|&&(_, i)| i == g) {
                    Some(&(upto, _)) if total > 0.0 => {
                        let s = (upto - previous) as f64 / total * spilled;
                        previous = upto;
                        s
                    }
                    _ => 0.0,
                }
            };
            out.push((group.zone.clone(), share));
        }
        out
    }
}
