use super::{fast_rand, next_allowed, PickContext, Strategy};
use crate::endpoint::Candidate;
use crate::hash::mix64;

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
///
/// Each snapshot fills a lookup table of prime size `M` (by default the first prime at or above
/// `max(65 537, 20 n)`, so small pools get at least a hundred slots per endpoint and large
/// ones about twenty, which keeps the table in cache: two bytes a slot below 65 536
/// endpoints): every endpoint walks its own permutation of the slots, derived from
/// the stable hash of its id, and claims free slots in turn, as often as its weight allows. A
/// request's hash key (see [`PickContext::with_hash`]) picks slot `key mod M`: one table read,
/// O(1), no lock, no allocation. Requests without a key get a random slot.
///
/// Because the table depends only on the endpoints' ids and weights (not on their order),
/// balancers built independently with the same endpoints agree on every key; when one of `n`
/// endpoints goes away, close to `1/n` of the keys move. When the key's endpoint is to be
/// avoided, the next slots of the table are tried in order, so the second choice is consistent
/// too.
#[derive(Clone, Copy, Debug, Default)]
pub struct Maglev {
    table_size: Option<usize>,
}

impl Maglev {
    /// The largest table built by default; larger pools get fewer than 20 slots each.
    pub const MAX_TABLE: usize = 4_194_301;
    /// Slots per endpoint in the default size of large pools (small pools get more, up to
    /// [`Maglev::MIN_TABLE`]).
    pub const SLOTS_PER_ENDPOINT: usize = 20;
    /// The smallest table built by default.
    pub const MIN_TABLE: usize = 65_537;

    /// Creates a Maglev strategy with the default table size.
    pub fn new() -> Self {
        Maglev { table_size: None }
    }

    /// Sets the table size (rounded up to a prime, at least the number of endpoints). Larger
    /// tables move fewer keys on changes and cost more memory and build time per snapshot.
    pub fn table_size(mut self, size: usize) -> Self {
        self.table_size = Some(size);
        self
    }
}

fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn next_prime(mut n: usize) -> usize {
    while !is_prime(n) {
        n += 1;
    }
    n
}

/// The per-snapshot state of [`Maglev`]: the lookup table of candidate indices.
#[derive(Debug)]
pub struct MaglevTable {
    slots: Slots,
}

/// Candidate indices, two bytes each while they fit (half the cache footprint).
#[derive(Debug)]
enum Slots {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl MaglevTable {
    /// The number of slots (a prime).
    pub fn len(&self) -> usize {
        match &self.slots {
            Slots::Narrow(s) => s.len(),
            Slots::Wide(s) => s.len(),
        }
    }

    /// Whether the table has no slot (never: a table is built for at least one endpoint).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The candidate index in slot `i` (`i < len()`).
    #[inline]
    pub fn slot(&self, i: usize) -> usize {
        match &self.slots {
            Slots::Narrow(s) => s[i] as usize,
            Slots::Wide(s) => s[i] as usize,
        }
    }
}

const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0xc2b2_ae3d_27d4_eb4f;

impl Strategy for Maglev {
    type State = MaglevTable;

    fn prepare(&self, candidates: &[Candidate]) -> MaglevTable {
        let n = candidates.len();
        let m = next_prime(
            self.table_size
                .unwrap_or_else(|| {
                    (Self::SLOTS_PER_ENDPOINT * n).clamp(Self::MIN_TABLE, Self::MAX_TABLE)
                })
                .max(n)
                .max(2),
        );
        // Fill in an order that depends only on the ids, so that independent builds agree.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            (candidates[a].id_hash(), candidates[a].id())
                .cmp(&(candidates[b].id_hash(), candidates[b].id()))
        });
        let max_w = candidates
            .iter()
            .map(|c| c.weight().max(1))
            .max()
            .unwrap_or(1);
        let mut pos: Vec<usize> = Vec::with_capacity(n);
        let mut skip: Vec<usize> = Vec::with_capacity(n);
        for c in candidates {
            pos.push((mix64(c.id_hash() ^ OFFSET_SEED) % m as u64) as usize);
            skip.push((mix64(c.id_hash() ^ SKIP_SEED) % (m as u64 - 1)) as usize + 1);
        }
        let mut credit = vec![0u32; n];
        let mut slots = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for &i in &order {
                credit[i] += candidates[i].weight().max(1);
                if credit[i] < max_w {
                    continue;
                }
                credit[i] -= max_w;
                // Walk i's permutation to its next free slot; m is prime so it visits all.
                while slots[pos[i]] != u32::MAX {
                    pos[i] = (pos[i] + skip[i]) % m;
                }
                slots[pos[i]] = i as u32;
                pos[i] = (pos[i] + skip[i]) % m;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        let slots = if n <= usize::from(u16::MAX) {
            Slots::Narrow(slots.into_iter().map(|i| i as u16).collect())
        } else {
            Slots::Wide(slots)
        };
        MaglevTable { slots }
    }

    #[inline]
    fn pick(
        &self,
        t: &MaglevTable,
        candidates: &[Candidate],
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let key = ctx.hash().unwrap_or_else(fast_rand::u64);
        let m = t.len();
        let slot = (key % m as u64) as usize;
        let idx = t.slot(slot);
        if ctx.allows(&candidates[idx]) {
            return Some(idx);
        }
        // Consistent second choice: the next slots of the table, in order.
        (1..m)
            .map(|k| t.slot((slot + k) % m))
            .find(|&i| ctx.allows(&candidates[i]))
            .or_else(|| next_allowed(candidates, ctx, idx))
    }

    fn name(&self) -> &'static str {
        "maglev"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(1000), 1009);
        assert!(is_prime(Maglev::MAX_TABLE));
        assert!(!is_prime(1));
    }
}
