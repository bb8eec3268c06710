use std::sync::atomic::{AtomicUsize, Ordering};

use super::{fast_rand, next_allowed, Delta, Edit, PickContext, Strategy};
use crate::endpoint::{Candidate, Candidates};

/// Smooth weighted round robin.
///
/// Over every cycle of `sum(weights) / gcd(weights)` picks, each endpoint is picked exactly in
/// proportion to its weight, and the picks of a heavy endpoint are spread through the cycle
/// rather than sent in a burst: weights 5:1:1 give `a a b a c a a`, the order nginx's smooth
/// weighted round robin gives. With equal weights it is plain round robin.
///
/// The order is computed once per snapshot into a schedule; a pick is one atomic increment
/// and one table read (plus, in large pools with few distinct weights, a binary search over a
/// few runs), with no lock and no allocation.
///
/// Large pools (where the exact smooth order would cost too much to compute) get an
/// earliest-deadline-first order instead: endpoint `i`'s `k`-th pick of a cycle is due at
/// `(2k + 1) / (2 w_i)`. When the pool has few distinct weights, that order is kept as runs
/// ("every endpoint of weight `w` once, in index order") rather than listed pick by pick, so
/// re-weighting one endpoint of 10 000 costs one pass over the weights (microseconds), not a
/// cycle of 10 000 or more picks computed again.
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
    /// Candidate indices of one cycle; empty when all weights are equal or the cycle is kept
    /// in `runs`.
    order: Vec<u32>,
    /// The cycle as runs of `members`, when it is not listed in `order`.
    runs: Vec<Run>,
    /// The candidate indices of each weight, the lightest weight's first, each in index order.
    members: Vec<u32>,
    /// With `runs`: each weight (as the candidates have it, not reduced) and its number of
    /// candidates, lightest first; empty when the weights were scaled down (see
    /// [`RoundRobin::MAX_SCHEDULE`]).
    groups: Vec<(u64, u32)>,
    /// The weight of every candidate when all are equal (`order` and `runs` are then empty).
    uniform: Option<u32>,
    cursor: AtomicUsize,
}

/// A stretch of a cycle: every candidate of one weight, once each, in index order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// The position in the cycle just past this run.
    end: u64,
    /// Where the run's candidates start in `members`.
    first: u32,
    /// How many candidates the run has.
    len: u32,
}

impl Schedule {
    /// The candidate indices of one cycle when it is listed pick by pick; empty when all
    /// weights are equal ("each candidate once, in order") or when a large pool's cycle is
    /// kept as runs of the candidates of each weight.
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// The candidate at position `n` of the cycle (any `n`: it wraps).
    #[inline]
    fn at(&self, n: usize, candidates: usize) -> usize {
        if let Some(last) = self.runs.last() {
            let p = n as u64 % last.end;
            let run = &self.runs[self.runs.partition_point(|r| r.end <= p)];
            let offset = p - (run.end - u64::from(run.len));
            self.members[run.first as usize + offset as usize] as usize
        } else if self.order.is_empty() {
            n % candidates
        } else {
            self.order[n % self.order.len()] as usize
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Reduces weights by their gcd and, if their sum is still above `max`, scales them down;
/// also the gcd they were divided by (`None` when they were also scaled down).
fn reduced_weights(candidates: &Candidates, max: usize) -> (Vec<u64>, Option<u64>) {
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
        return (w, None);
    }
    (w, Some(g))
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

/// The most distinct weights, and the most runs, a cycle kept as runs has: a pick's binary
/// search over the runs stays within a few steps.
const MAX_GROUPS: usize = 32;
const MAX_RUNS: usize = 1024;

/// A large pool's earliest-deadline-first cycle as runs: candidates of (reduced) weight `w`
/// make up the `w` runs due at `(2k + 1) / (2w)`, `k < w`; runs due at the same time go
/// heaviest first. `None` when the pool has too many distinct weights or runs. One pass over
/// the weights to group them, one to place the candidates.
#[allow(clippy::type_complexity)]
fn grouped(weights: &[u64]) -> Option<(Vec<Run>, Vec<u32>, Vec<(u64, u32)>)> {
    // (weight, candidates), sorted by weight.
    let mut groups: Vec<(u64, u32)> = Vec::new();
    for &w in weights {
        if let Some((_, count)) = groups.iter_mut().find(|(gw, _)| *gw == w) {
            *count += 1;
        } else if groups.len() < MAX_GROUPS {
            groups.push((w, 1));
        } else {
            return None;
        }
    }
    groups.sort_unstable();
    if groups.iter().map(|&(w, _)| w).sum::<u64>() > MAX_RUNS as u64 {
        return None;
    }
    let start = group_starts(&groups);
    let mut members = vec![0u32; weights.len()];
    let mut next = start.clone();
    for (i, &w) in weights.iter().enumerate() {
        let group = groups
            .binary_search_by(|&(gw, _)| gw.cmp(&w))
            .expect("every weight has its group");
        members[next[group] as usize] = i as u32;
        next[group] += 1;
    }
    Some((runs_of(&groups), members, groups))
}

/// Where each group's candidates start in `members`.
fn group_starts(groups: &[(u64, u32)]) -> Vec<u32> {
    let mut at = 0u32;
    groups
        .iter()
        .map(|&(_, count)| {
            at += count;
            at - count
        })
        .collect()
}

/// The runs of a cycle over `groups` ((reduced) weight, candidates; lightest first), whose
/// candidates are laid out group after group.
fn runs_of(groups: &[(u64, u32)]) -> Vec<Run> {
    let start = group_starts(groups);
    // (k, group): due at (2k + 1) / (2 w_group).
    let mut due: Vec<(u64, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(group, &(w, _))| (0..w).map(move |k| (k, group)))
        .collect();
    let time = |&(k, group): &(u64, usize)| (2 * k + 1, 2 * groups[group].0);
    due.sort_unstable_by(|a, b| {
        let ((an, ad), (bn, bd)) = (time(a), time(b));
        (u128::from(an) * u128::from(bd))
            .cmp(&(u128::from(bn) * u128::from(ad)))
            .then(b.1.cmp(&a.1))
    });
    let mut end = 0u64;
    due.into_iter()
        .map(|(_, group)| {
            let len = groups[group].1;
            end += u64::from(len);
            Run {
                end,
                first: start[group],
                len,
            }
        })
        .collect()
}

impl Schedule {
    /// "Each candidate in turn", the cursor going on from `previous`'s.
    fn uniform(weight: u32, previous: &Schedule) -> Schedule {
        Schedule {
            order: Vec::new(),
            runs: Vec::new(),
            members: Vec::new(),
            groups: Vec::new(),
            uniform: Some(weight),
            cursor: AtomicUsize::new(previous.cursor.load(Ordering::Relaxed)),
        }
    }
}

impl RoundRobin {
    /// The schedule after `delta` when it only re-weights candidates of a pool whose cycle is
    /// kept as runs (or whose weights were all equal) and stays so: exactly what
    /// [`prepare`](Strategy::prepare) would build, in one copy of the candidate indices.
    /// `None` when `prepare` must decide.
    fn reweighted(&self, previous: &Schedule, delta: &Delta<'_>) -> Option<Schedule> {
        let (before, after) = (delta.before(), delta.after());
        let only_weights = delta.edits().iter().all(|e| matches!(e, Edit::Set(_)));
        if !only_weights || before.len() != after.len() {
            return None;
        }
        let n = after.len();
        // The groups (weight, candidates) and candidate indices before.
        let (old_groups, old_members): (Vec<(u64, u32)>, std::borrow::Cow<'_, [u32]>) =
            match previous.uniform {
                Some(w) => (
                    vec![(u64::from(w.max(1)), n as u32)],
                    (0..n as u32).collect::<Vec<_>>().into(),
                ),
                None if !previous.groups.is_empty() => {
                    (previous.groups.clone(), previous.members.as_slice().into())
                }
                None => return None,
            };
        // (index, weight before, weight after) of the re-weighted candidates.
        let mut moved: Vec<(u32, u64, u64)> = Vec::new();
        for i in delta.added() {
            let (from, to) = (before[i].weight().max(1), after[i].weight().max(1));
            if from != to {
                moved.push((i as u32, u64::from(from), u64::from(to)));
            }
        }
        let mut groups = old_groups.clone();
        for &(_, from, to) in &moved {
            let Ok(g) = groups.binary_search_by(|&(w, _)| w.cmp(&from)) else {
                return None;
            };
            groups[g].1 -= 1;
            match groups.binary_search_by(|&(w, _)| w.cmp(&to)) {
                Ok(g) => groups[g].1 += 1,
                Err(at) => groups.insert(at, (to, 1)),
            }
        }
        groups.retain(|&(_, count)| count > 0);
        if let [(w, _)] = groups[..] {
            return Some(Schedule::uniform(u32::try_from(w).ok()?, previous));
        }
        // What prepare decides from the reduced weights: runs only when they are not scaled,
        // the smooth order would cost too much, and there are few enough groups and runs.
        let g = groups.iter().fold(0, |g, &(w, _)| gcd(g, w)).max(1);
        let reduced: Vec<(u64, u32)> = groups.iter().map(|&(w, c)| (w / g, c)).collect();
        let total: u64 = reduced.iter().map(|&(w, c)| w * u64::from(c)).sum();
        if total > Self::MAX_SCHEDULE as u64
            || (n as u64).saturating_mul(total) <= 1 << 24
            || groups.len() > MAX_GROUPS
            || reduced.iter().map(|&(w, _)| w).sum::<u64>() > MAX_RUNS as u64
        {
            return None;
        }
        // Each group's candidates: the old ones but those that left it, and those that came.
        moved.sort_unstable();
        let old_starts = group_starts(&old_groups);
        let mut members = Vec::with_capacity(n);
        for &(w, _) in &groups {
            let kept: &[u32] = match old_groups.binary_search_by(|&(ow, _)| ow.cmp(&w)) {
                Ok(og) => {
                    let at = old_starts[og] as usize;
                    &old_members[at..at + old_groups[og].1 as usize]
                }
                Err(_) => &[],
            };
            let mut came = moved.iter().filter(|m| m.2 == w).map(|m| m.0).peekable();
            for &i in kept {
                if moved
                    .binary_search_by(|m| m.0.cmp(&i))
                    .is_ok_and(|k| moved[k].2 != w)
                {
                    continue;
                }
                while let Some(c) = came.next_if(|&c| c < i) {
                    members.push(c);
                }
                members.push(i);
            }
            members.extend(came);
        }
        Some(Schedule {
            order: Vec::new(),
            runs: runs_of(&reduced),
            members,
            groups,
            uniform: None,
            cursor: AtomicUsize::new(previous.cursor.load(Ordering::Relaxed)),
        })
    }
}

impl Strategy for RoundRobin {
    type State = Schedule;

    fn prepare(&self, candidates: &Candidates) -> Schedule {
        let first = candidates.first().map(Candidate::weight);
        let uniform = first.filter(|&w| candidates.iter().all(|c| c.weight() == w));
        let (mut order, mut runs, mut members) = (Vec::new(), Vec::new(), Vec::new());
        let mut groups = Vec::new();
        if uniform.is_none() {
            let (w, gcd) = reduced_weights(candidates, Self::MAX_SCHEDULE);
            let total: u64 = w.iter().sum();
            // The exact smooth order costs n steps per pick; keep it while that stays small.
            if (w.len() as u64).saturating_mul(total) <= 1 << 24 {
                order = smooth_order(&w);
            } else if let Some((r, m, g)) = grouped(&w) {
                (runs, members) = (r, m);
                if let Some(gcd) = gcd {
                    groups = g.into_iter().map(|(w, c)| (w * gcd, c)).collect();
                }
            } else {
                order = edf_order(&w);
            }
        }
        let len = match (runs.last(), order.len()) {
            (Some(last), _) => usize::try_from(last.end).unwrap_or(usize::MAX),
            (None, 0) => candidates.len(),
            (None, len) => len,
        };
        Schedule {
            order,
            runs,
            members,
            groups,
            uniform,
            // Balancers started together should not all begin with the same endpoint.
            cursor: AtomicUsize::new(fast_rand::below(len.max(1))),
        }
    }

    /// With equal weights before and after, the schedule stays "each candidate in turn": the
    /// cursor goes on where it was, in time proportional to the change. A large pool whose
    /// cycle is kept as runs (or whose weights were all equal) and whose endpoints only
    /// changed weight moves the re-weighted endpoints between the groups of each weight (a
    /// copy of the candidate indices, no look at the other candidates). Otherwise the order
    /// of a cycle is computed again.
    fn update(&self, previous: &Schedule, delta: &Delta<'_>) -> Schedule {
        if let Some(w) = delta.still_uniform(previous.uniform) {
            return Schedule::uniform(w, previous);
        }
        self.reweighted(previous, delta)
            .unwrap_or_else(|| self.prepare(delta.after()))
    }

    #[inline]
    fn pick(&self, s: &Schedule, candidates: &Candidates, ctx: &PickContext<'_>) -> Option<usize> {
        let idx = s.at(s.cursor.fetch_add(1, Ordering::Relaxed), candidates.len());
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

    /// Kept as runs, the cycle is the earliest-deadline-first order (here without ties across
    /// weights, which runs settle heaviest first).
    #[test]
    fn runs_give_the_edf_order() {
        let w = [1, 2, 1, 1, 2, 4, 1, 4];
        let (runs, members, groups) = grouped(&w).expect("few weights");
        let s = Schedule {
            order: Vec::new(),
            runs,
            members,
            groups,
            uniform: None,
            cursor: AtomicUsize::new(0),
        };
        let cycle: Vec<u32> = (0..16).map(|n| s.at(n, w.len()) as u32).collect();
        assert_eq!(cycle, edf_order(&w));
        // It wraps.
        assert_eq!(s.at(16 + 3, w.len()), s.at(3, w.len()));
        // Too many distinct weights: listed instead.
        let many: Vec<u64> = (1..=MAX_GROUPS as u64 + 1).collect();
        assert!(grouped(&many).is_none());
    }

    /// A large pool with one endpoint re-weighted keeps its cycle as runs, and a cycle gives
    /// each endpoint its weight in picks, whether prepared or updated.
    #[test]
    fn a_large_reweighted_pool_keeps_exact_proportions() {
        use crate::pool::Pool;
        use crate::strategy::Edit;
        let pool = Pool::new(RoundRobin::new(), |_: &crate::Endpoint| ());
        pool.extend((0..5000).map(|i| crate::Endpoint::new(format!("ep-{i}"))));
        let before = pool.snapshot().eligible().clone();
        let rr = RoundRobin::new();
        let uniform = rr.prepare(&before);
        let mut after = before.clone();
        let old = &before[7];
        after.0.set(
            7,
            Candidate::new(old.endpoint.clone(), old.state.clone(), 3),
        );
        let updated = rr.update(&uniform, &Delta::new(&before, &after, &[Edit::Set(7)]));
        for s in [updated, rr.prepare(&after)] {
            assert!(s.order().is_empty() && !s.runs.is_empty());
            let mut counts = vec![0u32; after.len()];
            for n in 0..5002 {
                counts[s.at(n, after.len())] += 1;
            }
            assert_eq!(counts[7], 3);
            assert!(counts.iter().enumerate().all(|(i, &c)| i == 7 || c == 1));
        }
    }

    /// Re-weighting endpoints of a large pool one change after another (away from equal
    /// weights and back) gives the schedule built afresh each time.
    #[test]
    fn a_reweighted_schedule_is_the_one_built_afresh() {
        use crate::pool::Pool;
        use crate::strategy::Edit;
        let pool = Pool::new(RoundRobin::new(), |_: &crate::Endpoint| ());
        pool.extend((0..5000).map(|i| crate::Endpoint::new(format!("ep-{i}"))));
        let rr = RoundRobin::new();
        let mut current = pool.snapshot().eligible().clone();
        let mut state = rr.prepare(&current);
        let steps = [
            (7, 3),
            (9, 2),
            (4000, 3),
            (7, 1),
            (4000, 2),
            (9, 1),
            (4000, 1),
        ];
        for (step, &(at, weight)) in steps.iter().enumerate() {
            let mut next = current.clone();
            let old = &current[at];
            next.0.set(
                at,
                Candidate::new(old.endpoint.clone(), old.state.clone(), weight),
            );
            state = rr.update(&state, &Delta::new(&current, &next, &[Edit::Set(at)]));
            let fresh = rr.prepare(&next);
            assert_eq!(state.uniform, fresh.uniform, "step {step}");
            assert_eq!(state.order, fresh.order, "step {step}");
            assert_eq!(state.runs, fresh.runs, "step {step}");
            assert_eq!(state.members, fresh.members, "step {step}");
            assert_eq!(state.groups, fresh.groups, "step {step}");
            current = next;
        }
        assert_eq!(state.uniform, Some(1));
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
