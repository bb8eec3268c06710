use std::sync::atomic::{AtomicUsize, Ordering};

use super::{fast_rand, next_allowed, Delta, PickContext, Strategy};
use crate::endpoint::{Candidate, Candidates};

/// Smooth weighted round robin.
///
/// Over every cycle of `sum(weights) / gcd(weights)` picks, each endpoint is picked exactly in
/// proportion to its weight, and the picks of a heavy endpoint are spread through the cycle
/// rather than sent in a burst: weights 5:1:1 give `a a b a c a a`, the order nginx's smooth
/// weighted round robin gives. With equal weights it is plain round robin.
///
/// The order is computed once per snapshot into a schedule; a pick is one atomic increment
/// and one table read, with no lock and no allocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin {
    _priv: (),
}

impl RoundRobin {
    /// The longest schedule kept; larger weight sums are scaled down to fit, keeping
    /// proportions to within one pick per endpoint per cycle.
    pub const MAX_SCHEDULE: usize = 1 << 20;

    /// Creates a smooth weighted round robin.
    pub fn new() -> Self {
        RoundRobin { _priv: () }
    }
}

/// The per-snapshot state of [`RoundRobin`]: the order of one cycle and a cursor.
#[derive(Debug)]
pub struct Schedule {
    /// Candidate indices of one cycle; empty when all weights are equal.
    order: Vec<u32>,
    /// The weight of every candidate when all are equal (`order` is then empty).
    uniform: Option<u32>,
    cursor: AtomicUsize,
}

impl Schedule {
    /// The candidate indices of one cycle (empty means "each candidate once, in order").
    pub fn order(&self) -> &[u32] {
        &self.order
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Reduces weights by their gcd and, if their sum is still above `max`, scales them down.
fn reduced_weights(candidates: &Candidates, max: usize) -> Vec<u64> {
    let mut w: Vec<u64> = candidates
        .iter()
        .map(|c| u64::from(c.weight().max(1)))
        .collect();
    let g = w.iter().copied().fold(0, gcd).max(1);
    w.iter_mut().for_each(|x| *x /= g);
    let total: u64 = w.iter().sum();
    if total > max as u64 {
        let scale = max as f64 / total as f64;
        w.iter_mut()
            .for_each(|x| *x = ((*x as f64 * scale).floor() as u64).max(1));
    }
    w
}

/// nginx's smooth weighted order: each step every endpoint gains its weight, the one with the
/// most is picked and pays the total. O(n) per step.
fn smooth_order(w: &[u64]) -> Vec<u32> {
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        order.push(best as u32);
    }
    order
}

/// Earliest-deadline-first order, O(log n) per step, for pools too large for
/// [`smooth_order`]: endpoint `i`'s `k`-th pick is due at `(2k + 1) / (2 w_i)`.
fn edf_order(w: &[u64]) -> Vec<u32> {
    use std::cmp::{Ordering as CmpOrdering, Reverse};
    use std::collections::BinaryHeap;

    #[derive(PartialEq, Eq)]
    struct Due {
        num: u64, // 2k + 1
        den: u64, // 2 w
        idx: u32,
    }
    impl Ord for Due {
        fn cmp(&self, o: &Self) -> CmpOrdering {
            (u128::from(self.num) * u128::from(o.den))
                .cmp(&(u128::from(o.num) * u128::from(self.den)))
                .then(self.idx.cmp(&o.idx))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(o))
        }
    }

    let total: u64 = w.iter().sum();
    let mut heap: BinaryHeap<Reverse<Due>> = w
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            Reverse(Due {
                num: 1,
                den: 2 * w,
                idx: i as u32,
            })
        })
        .collect();
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let Reverse(mut due) = heap.pop().expect("one entry per endpoint");
        order.push(due.idx);
        due.num += 2;
        heap.push(Reverse(due));
    }
    order
}

impl Strategy for RoundRobin {
    type State = Schedule;

    fn prepare(&self, candidates: &Candidates) -> Schedule {
        let first = candidates.first().map(Candidate::weight);
        let uniform = first.filter(|&w| candidates.iter().all(|c| c.weight() == w));
        let order = if uniform.is_some() {
            Vec::new()
        } else {
            let w = reduced_weights(candidates, Self::MAX_SCHEDULE);
            let total: u64 = w.iter().sum();
            // The exact smooth order costs n steps per pick; keep it while that stays small.
            if (w.len() as u64).saturating_mul(total) <= 1 << 24 {
                smooth_order(&w)
            } else {
                edf_order(&w)
            }
        };
        let len = if order.is_empty() {
            candidates.len()
        } else {
            order.len()
        };
        Schedule {
            order,
            uniform,
            // Balancers started together should not all begin with the same endpoint.
            cursor: AtomicUsize::new(fast_rand::below(len.max(1))),
        }
    }

    /// With equal weights before and after, the schedule stays "each candidate in turn": the
    /// cursor goes on where it was, in time proportional to the change. Otherwise the order
    /// of a cycle is computed again.
    fn update(&self, previous: &Schedule, delta: &Delta<'_>) -> Schedule {
        match delta.still_uniform(previous.uniform) {
            Some(w) => Schedule {
                order: Vec::new(),
                uniform: Some(w),
                cursor: AtomicUsize::new(previous.cursor.load(Ordering::Relaxed)),
            },
            None => self.prepare(delta.after()),
        }
    }

    #[inline]
    fn pick(&self, s: &Schedule, candidates: &Candidates, ctx: &PickContext<'_>) -> Option<usize> {
        let n = s.cursor.fetch_add(1, Ordering::Relaxed);
        let idx = if s.order.is_empty() {
            n % candidates.len()
        } else {
            s.order[n % s.order.len()] as usize
        };
        if ctx.allows(&candidates[idx]) {
            Some(idx)
        } else {
            next_allowed(candidates, ctx, idx + 1)
        }
    }

    fn name(&self) -> &'static str {
        "round_robin"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_5_1_1_matches_nginx() {
        assert_eq!(smooth_order(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn edf_keeps_exact_proportions() {
        let w = [3, 2, 7, 1];
        let order = edf_order(&w);
        for (i, &wi) in w.iter().enumerate() {
            assert_eq!(
                order.iter().filter(|&&x| x as usize == i).count() as u64,
                wi
            );
        }
    }

    #[test]
    fn weights_are_reduced_by_gcd() {
        assert_eq!(gcd(10, 4), 2);
        assert_eq!(gcd(0, 7), 7);
    }
}
