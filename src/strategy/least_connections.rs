use std::cmp::Ordering;

use super::{fast_rand, PickContext, Strategy};
use crate::endpoint::Candidate;

/// Least connections, weighted: the endpoint with the fewest requests in flight per unit of
/// weight, ties broken uniformly at random.
///
/// A pick scans every eligible endpoint (O(n)); for large pools prefer [`PowerOfTwoChoices`],
/// which approximates it in O(1).
///
/// [`PowerOfTwoChoices`]: super::PowerOfTwoChoices
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastConnections {
    _priv: (),
}

impl LeastConnections {
    /// Creates a weighted least-connections strategy.
    pub fn new() -> Self {
        LeastConnections { _priv: () }
    }
}

/// Compares `in_flight / weight` of two candidates exactly (by cross-multiplication).
#[inline]
pub(crate) fn cmp_load(a: &Candidate, b: &Candidate) -> Ordering {
    let la = u128::from(a.in_flight()) * u128::from(b.weight().max(1));
    let lb = u128::from(b.in_flight()) * u128::from(a.weight().max(1));
    la.cmp(&lb)
}

impl Strategy for LeastConnections {
    type State = ();

    fn prepare(&self, _: &[Candidate]) {}

    fn pick(&self, _: &(), candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut ties = 0usize;
        for (i, c) in candidates.iter().enumerate() {
            if !ctx.allows(c) {
                continue;
            }
            match best.map(|b| cmp_load(c, &candidates[b])) {
                None | Some(Ordering::Less) => {
                    best = Some(i);
                    ties = 1;
                }
                Some(Ordering::Equal) => {
                    // Reservoir sampling: each of the k tied endpoints wins with chance 1/k.
                    ties += 1;
                    if fast_rand::below(ties) == 0 {
                        best = Some(i);
                    }
                }
                Some(Ordering::Greater) => {}
            }
        }
        best
    }

    fn name(&self) -> &'static str {
        "least_connections"
    }
}
