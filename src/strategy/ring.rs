use super::least_connections::{cmp_load, Now};
use super::{fast_rand, Delta, PickContext, Strategy};
use crate::endpoint::{Candidate, Candidates};
use crate::hash::mix64;

/// A consistent hash ring with bounded load (Mirrokni et al., "Consistent Hashing with Bounded
/// Loads", 2016).
///
/// Each endpoint owns `replicas × weight / lowest weight` points on a 64-bit ring, halved as
/// often as needed to keep the ring within [`Ring::MAX_POINTS`] (at least one).
/// A request's hash key (see [`PickContext::with_hash`]) goes to the first point clockwise whose
/// endpoint is not overloaded, where overloaded means more than `load_factor` times the mean
/// in-flight load (counting this request). So keys stay put while load is even, and a hot key
/// spills over to its next endpoint on the ring rather than swamping one server. A pick is a
/// binary search (O(log n)) plus a short walk; requests without a key get a random point.
///
/// An endpoint's points depend on the others only through the lowest weight and the halving,
/// so adding, removing or re-weighting one endpoint (raising the top weight too) moves only
/// that endpoint's points and the snapshot's ring is updated in time proportional to them.
/// Lowering a weight below the lowest one, or a change that crosses a halving, rebuilds it.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    replicas: u32,
    load_factor: f64,
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new()
    }
}

impl Ring {
    /// The most points a ring holds; larger pools get fewer points per endpoint.
    pub const MAX_POINTS: usize = 1 << 21;

    /// A ring with 100 points per endpoint and a load factor of 1.25.
    pub fn new() -> Self {
        Ring {
            replicas: 100,
            load_factor: 1.25,
        }
    }

    /// Sets the points per endpoint of the lowest weight (at least 1), before halving.
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Sets how far above the mean load an endpoint may go before keys spill over (at least
    /// 1.0); `f64::INFINITY` turns bounding off, giving a plain consistent hash ring.
    pub fn load_factor(mut self, factor: f64) -> Self {
        self.load_factor = if factor.is_nan() {
            1.25
        } else {
            factor.max(1.0)
        };
        self
    }
}

/// The per-snapshot state of [`Ring`]: the sorted points.
#[derive(Debug)]
pub struct RingState {
    /// Point positions, sorted.
    positions: Vec<u64>,
    /// The candidate index of each point, in the same order.
    owners: Vec<u32>,
    /// `buckets[b]` is the first point whose position's top bits are `b` or more, so that a
    /// search only looks among the few points of the key's bucket, not the whole ring (which
    /// for large pools does not fit in cache).
    buckets: Vec<u32>,
    /// How far a position is shifted to get its bucket (64 minus the bucket bits).
    shift: u32,
    /// What each endpoint's number of points was computed from.
    sizing: Sizing,
}

/// The lowest weight, and how many times points per endpoint were halved to fit
/// [`Ring::MAX_POINTS`]: while both stay the same, an endpoint's points do not depend on the
/// others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sizing {
    min_weight: u32,
    halvings: u32,
}

/// At most this many bits of a position pick its bucket (65 536 buckets).
const MAX_BUCKET_BITS: u32 = 16;

impl RingState {
    /// The number of points on the ring.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the ring has no point (never: a ring is built for at least one endpoint).
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The ring's points in order: `(position, candidate index)`.
    pub fn points(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.positions
            .iter()
            .zip(&self.owners)
            .map(|(&p, &o)| (p, o as usize))
    }

    /// The first point at or after `key`, wrapping to 0.
    #[inline]
    fn first_at(&self, key: u64) -> usize {
        let b = (key >> self.shift) as usize;
        let lo = self.buckets[b] as usize;
        let hi = self
            .buckets
            .get(b + 1)
            .map_or(self.positions.len(), |&h| h as usize);
        lo + self.positions[lo..hi].partition_point(|&p| p < key)
    }
}

impl Ring {
    /// The lowest weight, and the halvings that keep the ring within [`Ring::MAX_POINTS`].
    /// Halving (rather than scaling to fit exactly) keeps the sizing, and so every other
    /// endpoint's points, the same when one endpoint joins, leaves or changes weight, except
    /// when the pool crosses a doubling.
    fn sizing(&self, candidates: &Candidates) -> Sizing {
        let min_weight = candidates
            .iter()
            .map(|c| c.weight().max(1))
            .min()
            .unwrap_or(1);
        let want: u64 = candidates
            .iter()
            .map(|c| self.per_endpoint(c.weight(), min_weight))
            .fold(0, u64::saturating_add);
        let mut halvings = 0;
        while want >> halvings > Self::MAX_POINTS as u64 {
            halvings += 1;
        }
        Sizing {
            min_weight,
            halvings,
        }
    }

    /// The points of an endpoint of `weight` before halving (`replicas` at the lowest weight).
    fn per_endpoint(&self, weight: u32, min_weight: u32) -> u64 {
        u64::from(self.replicas) * u64::from(weight.max(1)) / u64::from(min_weight)
    }

    /// Appends the points of candidate `c`, at index `i`.
    fn points_of(&self, c: &Candidate, i: usize, sizing: Sizing, points: &mut Vec<(u64, u32)>) {
        let per = (self.per_endpoint(c.weight(), sizing.min_weight) >> sizing.halvings).max(1);
        for k in 0..per {
            points.push((mix64(c.id_hash() ^ mix64(k.wrapping_add(1))), i as u32));
        }
    }
}

/// About one bucket per point (a bucket holds a point or two on average), at most 2^16.
fn bucket_bits(points: usize) -> u32 {
    (usize::BITS - points.leading_zeros()).clamp(1, MAX_BUCKET_BITS)
}

/// Sorts points by position; ties on a position are settled by id, so independent builds agree.
fn sort_points(points: &mut [(u64, u32)], candidates: &Candidates) {
    points.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| {
            candidates[a.1 as usize]
                .id()
                .cmp(candidates[b.1 as usize].id())
        })
    });
}

impl RingState {
    /// The index of the point at `at` owned by candidate `owner`.
    fn find(&self, at: u64, owner: u32) -> Option<usize> {
        let mut k = self.first_at(at);
        while k < self.len() && self.positions[k] == at {
            if self.owners[k] == owner {
                return Some(k);
            }
            k += 1;
        }
        None
    }

    /// The bucket index of a ring made from this one by dropping the points at `drops` (sorted
    /// indices) and adding `fresh` (sorted by position), when it keeps the bucket count.
    fn shifted_buckets(
        &self,
        positions: &[u64],
        drops: &[usize],
        fresh: &[(u64, u32)],
    ) -> Option<Vec<u32>> {
        if bucket_bits(positions.len()) != 64 - self.shift {
            return None;
        }
        let (mut d, mut f) = (0usize, 0usize);
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(b, &old)| {
                let from = (b as u64) << self.shift;
                while d < drops.len() && drops[d] < old as usize {
                    d += 1;
                }
                while f < fresh.len() && fresh[f].0 < from {
                    f += 1;
                }
                (old as usize - d + f) as u32
            })
            .collect();
        Some(buckets)
    }

    fn new(positions: Vec<u64>, owners: Vec<u32>, sizing: Sizing) -> Self {
        let bits = bucket_bits(positions.len());
        let shift = 64 - bits;
        let mut buckets = Vec::with_capacity(1 << bits);
        let mut at = 0usize;
        for b in 0..(1u64 << bits) {
            let from = b << shift;
            while at < positions.len() && positions[at] < from {
                at += 1;
            }
            buckets.push(at as u32);
        }
        RingState {
            positions,
            owners,
            buckets,
            shift,
            sizing,
        }
    }
}

impl Strategy for Ring {
    type State = RingState;

    fn prepare(&self, candidates: &Candidates) -> RingState {
        let sizing = self.sizing(candidates);
        let mut points = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            self.points_of(c, i, sizing, &mut points);
        }
        sort_points(&mut points, candidates);
        let (positions, owners) = points.into_iter().unzip();
        RingState::new(positions, owners, sizing)
    }

    /// While the lowest weight and the halvings stay the same, the ring of the snapshot before
    /// loses the points of the endpoints that left or changed and gains those of the new ones,
    /// each found by binary search, and the points between are copied in runs: no sort of the
    /// whole ring, no per-point work beyond a copy.
    fn update(&self, previous: &RingState, delta: &Delta<'_>) -> RingState {
        let (before, after) = (delta.before(), delta.after());
        let sizing = self.sizing(after);
        if sizing != previous.sizing {
            return self.prepare(after);
        }
        // The points of the endpoints that left or changed (to drop) and of those that moved
        // to another index (to rename), found again from their ids.
        let mut drops: Vec<usize> = Vec::new();
        let mut renames: Vec<(usize, u32)> = Vec::new();
        let mut scratch = Vec::new();
        for (j, to) in delta.carried().into_iter().enumerate() {
            if to == Some(j) {
                continue;
            }
            scratch.clear();
            self.points_of(&before[j], j, sizing, &mut scratch);
            for &(at, _) in &scratch {
                let Some(k) = previous.find(at, j as u32) else {
                    // Not where it should be: build from scratch rather than guess.
                    return self.prepare(after);
                };
                match to {
                    None => drops.push(k),
                    Some(t) => renames.push((k, t as u32)),
                }
            }
        }
        drops.sort_unstable();
        drops.dedup();
        let mut fresh = Vec::new();
        for i in delta.added() {
            self.points_of(&after[i], i, sizing, &mut fresh);
        }
        sort_points(&mut fresh, after);
        // Where each new point goes among the old ones.
        let inserts: Vec<usize> = fresh
            .iter()
            .map(|&(at, owner)| {
                let mut k = previous.first_at(at);
                while k < previous.len()
                    && previous.positions[k] == at
                    && before[previous.owners[k] as usize].id() < after[owner as usize].id()
                {
                    k += 1;
                }
                k
            })
            .collect();
        let len = previous.len() - drops.len() + fresh.len();
        let (mut positions, mut owners) = (Vec::with_capacity(len), Vec::with_capacity(len));
        let (mut from, mut d, mut f) = (0usize, 0usize, 0usize);
        loop {
            let next_drop = drops.get(d).copied().unwrap_or(usize::MAX);
            let next_insert = inserts.get(f).copied().unwrap_or(usize::MAX);
            let cut = next_drop.min(next_insert).min(previous.len());
            positions.extend_from_slice(&previous.positions[from..cut]);
            owners.extend_from_slice(&previous.owners[from..cut]);
            from = cut;
            if next_insert <= next_drop && next_insert != usize::MAX {
                positions.push(fresh[f].0);
                owners.push(fresh[f].1);
                f += 1;
            } else if next_drop != usize::MAX {
                from = next_drop + 1;
                d += 1;
            } else {
                break;
            }
        }
        // An old index k is now k + (new points before it) - (dropped points before it).
        let moved =
            |k: usize| k + inserts.partition_point(|&i| i <= k) - drops.partition_point(|&i| i < k);
        for (k, to) in renames {
            owners[moved(k)] = to;
        }
        match previous.shifted_buckets(&positions, &drops, &fresh) {
            Some(buckets) => RingState {
                positions,
                owners,
                buckets,
                shift: previous.shift,
                sizing,
            },
            None => RingState::new(positions, owners, sizing),
        }
    }

    fn pick(&self, s: &RingState, candidates: &Candidates, ctx: &PickContext<'_>) -> Option<usize> {
        let key = ctx.hash().unwrap_or_else(fast_rand::u64);
        let len = s.len();
        let start = s.first_at(key);
        let n = candidates.len() as f64;
        let mut limit: Option<f64> = None;
        let mut first_allowed = None;
        for k in 0..len {
            let idx = s.owners[(start + k) % len] as usize;
            let c = &candidates[idx];
            if !ctx.allows(c) {
                continue;
            }
            first_allowed.get_or_insert(idx);
            let load = c.in_flight();
            if load == 0 || self.load_factor.is_infinite() {
                return Some(idx);
            }
            let limit = *limit.get_or_insert_with(|| {
                let total = c.state().pool_in_flight() as f64;
                (self.load_factor * (total + 1.0) / n).ceil()
            });
            if (load + 1) as f64 <= limit {
                return Some(idx);
            }
        }
        // Everything allowed is over the bound (only possible under racing updates):
        // the least loaded allowed endpoint.
        first_allowed.map(|first| {
            let mut now = Now::default();
            candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| ctx.allows(c))
                .min_by(|a, b| cmp_load(a.1, b.1, &mut now))
                .map_or(first, |(i, _)| i)
        })
    }

    fn name(&self) -> &'static str {
        "ring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::strategy::Edit;

    /// An updated ring has exactly the points, owners and bucket index of one built afresh.
    #[test]
    fn an_updated_ring_is_the_ring_built_afresh() {
        let pool = Pool::new(Ring::new(), |_: &crate::Endpoint| ());
        pool.extend((0..700).map(|i| crate::Endpoint::new(format!("ep-{i}"))));
        let others = Pool::new(Ring::new(), |_: &crate::Endpoint| ());
        others.extend((0..5).map(|i| crate::Endpoint::new(format!("new-{i}"))));
        let before = pool.snapshot().eligible().clone();
        let ring = Ring::new();
        let mut state = ring.prepare(&before);
        let mut current = before;
        for step in 0..5 {
            let mut next = current.clone();
            let mut edits = Vec::new();
            next.0.swap_remove(step * 97);
            edits.push(Edit::SwapRemove(step * 97));
            next.0.push(others.snapshot().eligible()[step].clone());
            edits.push(Edit::Push);
            if step % 2 == 1 {
                next.0.swap_remove(next.len() - 1);
                edits.push(Edit::SwapRemove(next.len()));
            }
            state = ring.update(&state, &Delta::new(&current, &next, &edits));
            let fresh = ring.prepare(&next);
            assert_eq!(state.positions, fresh.positions, "step {step}");
            assert_eq!(state.owners, fresh.owners, "step {step}");
            assert_eq!(state.buckets, fresh.buckets, "step {step}");
            current = next;
        }
    }

    /// Re-weighting (above the lowest weight, raising the top weight too, and lowering one
    /// below the lowest) gives the ring built afresh, and every endpoint's point count follows
    /// its weight.
    #[test]
    fn a_reweighted_ring_is_the_ring_built_afresh() {
        let pool = Pool::new(Ring::new(), |_: &crate::Endpoint| ());
        pool.extend((0..300).map(|i| crate::Endpoint::new(format!("ep-{i}")).with_weight(2)));
        let ring = Ring::new();
        let mut current = pool.snapshot().eligible().clone();
        let mut state = ring.prepare(&current);
        for (step, (at, weight)) in [(17, 5), (17, 9), (40, 3), (17, 2), (99, 1), (99, 2)]
            .into_iter()
            .enumerate()
        {
            let mut next = current.clone();
            let old = &current[at];
            next.0.set(
                at,
                Candidate::new(old.endpoint.clone(), old.state.clone(), weight),
            );
            let edits = [Edit::Set(at)];
            state = ring.update(&state, &Delta::new(&current, &next, &edits));
            let fresh = ring.prepare(&next);
            assert_eq!(state.positions, fresh.positions, "step {step}");
            assert_eq!(state.owners, fresh.owners, "step {step}");
            assert_eq!(state.buckets, fresh.buckets, "step {step}");
            let lowest = next.iter().map(Candidate::weight).min().unwrap();
            let points = state.owners.iter().filter(|&&o| o as usize == at).count();
            assert_eq!(points as u32, 100 * weight / lowest, "step {step}");
            current = next;
        }
    }

    #[test]
    fn the_bucket_index_finds_what_a_full_search_finds() {
        for n in [1usize, 3, 50, 700] {
            let pool = Pool::new(Ring::new(), |_: &crate::Endpoint| ());
            pool.extend((0..n).map(|i| crate::Endpoint::new(format!("ep-{i}"))));
            let snap = pool.snapshot();
            let ring = Ring::new().prepare(snap.eligible());
            for i in 0..20_000u64 {
                let key = mix64(i);
                let full = ring.positions.partition_point(|&p| p < key);
                assert_eq!(ring.first_at(key), full, "n = {n}, key = {key:#x}");
            }
            assert_eq!(ring.first_at(0), 0);
            assert_eq!(
                ring.first_at(u64::MAX),
                ring.positions.partition_point(|&p| p < u64::MAX)
            );
        }
    }
}
