use super::{fast_rand, next_allowed, Delta, Edit, PickContext, Strategy};
use crate::endpoint::Candidates;
use crate::hash::mix64;

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
///
/// Each snapshot fills a lookup table of prime size `M` (by default 65 537, doubled as often as
/// needed to give each endpoint at least 20 slots, see [`Maglev::len_for`], so small pools get
/// at least a hundred slots per endpoint and large ones 20 to 40, which keeps the table in
/// cache: two bytes a slot below 65 535 endpoints): every endpoint walks its own permutation
/// of the slots, derived from
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

    /// The table size for `n` endpoints: the size set, or by default the first prime at or
    /// above 65 536 × 2^k for the smallest `k` that gives each endpoint at least
    /// [`SLOTS_PER_ENDPOINT`](Maglev::SLOTS_PER_ENDPOINT) slots, at most
    /// [`MAX_TABLE`](Maglev::MAX_TABLE). The size, and so every key's place, changes only when
    /// the pool crosses a doubling, not with each endpoint that joins or leaves.
    pub fn len_for(&self, n: usize) -> usize {
        let size = self.table_size.unwrap_or_else(|| {
            let want = Self::SLOTS_PER_ENDPOINT.saturating_mul(n);
            let mut base = Self::MIN_TABLE - 1;
            while base < want && base < Self::MAX_TABLE {
                base *= 2;
            }
            next_prime(base).min(Self::MAX_TABLE)
        });
        next_prime(size.max(n).max(2))
    }

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
#[derive(Clone, Debug)]
pub struct MaglevTable {
    slots: Slots,
}

/// Candidate indices, two bytes each while they fit (half the cache footprint).
#[derive(Clone, Debug)]
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

/// One endpoint filling the table: where it is on its permutation of the slots.
struct Walker {
    hash: u64,
    index: u32,
    pos: usize,
    skip: usize,
    weight: u32,
    credit: u32,
}

/// A slot of the table: a candidate index, or empty while the table fills.
trait Slot: Copy + Eq {
    const EMPTY: Self;
    fn of(index: u32) -> Self;
}

impl Slot for u16 {
    const EMPTY: u16 = u16::MAX;
    fn of(index: u32) -> u16 {
        index as u16
    }
}

impl Slot for u32 {
    const EMPTY: u32 = u32::MAX;
    fn of(index: u32) -> u32 {
        index
    }
}

/// Fills a table of `m` slots (`m` prime): in turn, each endpoint claims the next free slot of
/// its permutation, as often as its weight allows (one turn in `max weight / weight`).
///
/// Most of the time goes into walking past taken slots (about `m ln m` steps in all), so which
/// slots are taken is kept in a bitset of `m` bits: 32 KiB for 262 147 slots, in the L1 cache,
/// where the table itself is not.
fn fill<T: Slot>(m: usize, walkers: &mut [Walker]) -> Vec<T> {
    let max_w = walkers.iter().map(|w| w.weight).max().unwrap_or(1);
    let mut slots = vec![T::EMPTY; m];
    let mut taken = vec![0u64; m.div_ceil(64)];
    let mut filled = 0;
    loop {
        for w in walkers.iter_mut() {
            w.credit += w.weight;
            if w.credit < max_w {
                continue;
            }
            w.credit -= max_w;
            // Walk the permutation to the next free slot; m is prime so it visits all. The
            // position stays below m, and so below 2m after a step: no division needed.
            let mut pos = w.pos;
            while taken[pos >> 6] & (1 << (pos & 63)) != 0 {
                pos += w.skip;
                if pos >= m {
                    pos -= m;
                }
            }
            taken[pos >> 6] |= 1 << (pos & 63);
            slots[pos] = T::of(w.index);
            pos += w.skip;
            if pos >= m {
                pos -= m;
            }
            w.pos = pos;
            filled += 1;
            if filled == m {
                return slots;
            }
        }
    }
}

const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0xc2b2_ae3d_27d4_eb4f;

impl Strategy for Maglev {
    type State = MaglevTable;

    fn prepare(&self, candidates: &Candidates) -> MaglevTable {
        let n = candidates.len();
        let m = self.len_for(n);
        // Each endpoint's permutation (offset and skip) and weight, in an order that depends
        // only on the ids, so that independent builds agree.
        let mut walkers: Vec<Walker> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| Walker {
                hash: c.id_hash(),
                index: i as u32,
                pos: (mix64(c.id_hash() ^ OFFSET_SEED) % m as u64) as usize,
                skip: (mix64(c.id_hash() ^ SKIP_SEED) % (m as u64 - 1)) as usize + 1,
                weight: c.weight().max(1),
                credit: 0,
            })
            .collect();
        walkers.sort_unstable_by(|a, b| {
            a.hash.cmp(&b.hash).then_with(|| {
                candidates[a.index as usize]
                    .id()
                    .cmp(candidates[b.index as usize].id())
            })
        });
        let slots = if n < usize::from(u16::MAX) {
            Slots::Narrow(fill(m, &mut walkers))
        } else {
            Slots::Wide(fill(m, &mut walkers))
        };
        MaglevTable { slots }
    }

    /// The table depends on every endpoint's id and weight (an endpoint joining or leaving
    /// changes the turns of the fill after it), so it is filled again, unless no candidate
    /// moved and none changed id or weight (a health mark elsewhere in the pool, a new
    /// service): then it is copied.
    fn update(&self, previous: &MaglevTable, delta: &Delta<'_>) -> MaglevTable {
        let (before, after) = (delta.before(), delta.after());
        let same = delta.edits().iter().all(|edit| match *edit {
            Edit::Set(i) => {
                before[i].id() == after[i].id() && before[i].weight() == after[i].weight()
            }
            Edit::Push | Edit::SwapRemove(_) => false,
        });
        if same {
            previous.clone()
        } else {
            self.prepare(after)
        }
    }

    #[inline]
    fn pick(
        &self,
        t: &MaglevTable,
        candidates: &Candidates,
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
