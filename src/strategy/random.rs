use super::{fast_rand, next_allowed, PickContext, Strategy};
use crate::endpoint::Candidate;

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

/// The per-snapshot state of [`Random`]: cumulative weights, empty when all are equal.
#[derive(Debug)]
pub struct RandomState {
    cumulative: Vec<u64>,
}

impl Strategy for Random {
    type State = RandomState;

    fn prepare(&self, candidates: &[Candidate]) -> RandomState {
        let first = candidates.first().map(Candidate::weight);
        let cumulative = if candidates.iter().all(|c| Some(c.weight()) == first) {
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
        RandomState { cumulative }
    }

    #[inline]
    fn pick(
        &self,
        s: &RandomState,
        candidates: &[Candidate],
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let idx = match s.cumulative.last() {
            None => fast_rand::below(candidates.len()),
            Some(&total) => {
                let r = fast_rand::u64() % total;
                s.cumulative.partition_point(|&c| c <= r)
            }
        };
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
