use super::{fast_rand, next_allowed, Delta, PickContext, Strategy};
use crate::endpoint::{Candidate, Candidates};

/// Random picking, weighted by endpoint weight.
///
/// With equal weights a pick is one random number; with unequal weights it is a binary search
/// over cumulative weights (O(log n)). Stateless between requests, so it spreads well across
/// many independent balancers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Random {
    _priv: (),
}

impl Random {
    /// Creates a weighted random strategy.
    pub fn new() -> Self {
        Random { _priv: () }
    }
}

/// The per-snapshot state of [`Random`], [`PowerOfTwoChoices`](super::PowerOfTwoChoices) and
/// [`PeakEwma`](super::PeakEwma): cumulative weights to sample from, empty when all weights
/// are equal.
#[derive(Debug)]
pub struct RandomState {
    cumulative: Vec<u64>,
    /// The weight of every candidate when all are equal (`cumulative` is then empty).
    uniform: Option<u32>,
}

impl RandomState {
    /// Whether every candidate has the same weight (sampling is then uniform).
    #[inline]
    pub(crate) fn is_uniform(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// The index of one of `n` candidates (`n > 0`, the ones this state was prepared from),
    /// drawn in proportion to its weight: one random number, plus a binary search over the
    /// cumulative weights when they differ (O(log n)).
    #[inline]
    pub(crate) fn sample(&self, n: usize) -> usize {
        match self.cumulative.last() {
            None => fast_rand::below(n),
            Some(&total) => {
                let r = fast_rand::u64() % total;
                self.cumulative.partition_point(|&c| c <= r)
            }
        }
    }
}

impl Strategy for Random {
    type State = RandomState;

    fn prepare(&self, candidates: &Candidates) -> RandomState {
        let first = candidates.first().map(Candidate::weight);
        let uniform = first.filter(|&w| candidates.iter().all(|c| c.weight() == w));
        let cumulative = if uniform.is_some() {
            Vec::new()
        } else {
            candidates
                .iter()
                .scan(0u64, |sum, c| {
                    *sum += u64::from(c.weight().max(1));
                    Some(*sum)
                })
                .collect()
        };
        RandomState {
            cumulative,
            uniform,
        }
    }

    /// With equal weights before and after, there is nothing to compute; otherwise the
    /// cumulative weights are summed again (O(n), a few microseconds for 10 000 endpoints).
    fn update(&self, previous: &RandomState, delta: &Delta<'_>) -> RandomState {
        match delta.still_uniform(previous.uniform) {
            Some(w) => RandomState {
                cumulative: Vec::new(),
                uniform: Some(w),
            },
            None => self.prepare(delta.after()),
        }
    }

    #[inline]
    fn pick(
        &self,
        s: &RandomState,
        candidates: &Candidates,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let idx = s.sample(candidates.len());
        if ctx.allows(&candidates[idx]) {
            Some(idx)
        } else {
            next_allowed(candidates, ctx, idx + 1)
        }
    }

    fn name(&self) -> &'static str {
        "random"
    }
}
