use std::cmp::Ordering;

use super::{fast_rand, PickContext, Strategy};
use crate::endpoint::state::{clock_ns, now};
use crate::endpoint::Candidate;

/// Least connections, weighted: the endpoint with the fewest requests in flight per unit of
/// weight, ties broken uniformly at random.
///
/// An endpoint whose requests failed lately looks more loaded than it is: its requests in
/// flight, and the one to be sent, each count `1 + penalty × failure score` times (see
/// [`PoolBuilder::failure_penalty`](crate::pool::PoolBuilder::failure_penalty)). A fast
/// failure ends a request early and so would otherwise make an endpoint look idle and draw
/// *more* traffic to it.
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

/// Compares `in_flight / weight` of two candidates: exactly (by cross-multiplication) when
/// neither failed lately, otherwise with each one's in-flight count raised by its failure
/// factor `m` (see [`EndpointState::failure_factor`]) to `(in_flight + 1) × m − 1`, which is
/// `in_flight` when `m` is 1. `now` reads the clock, once, when a factor is needed.
///
/// [`EndpointState::failure_factor`]: crate::endpoint::EndpointState
#[inline]
pub(crate) fn cmp_load(a: &Candidate, b: &Candidate, now: &mut Now) -> Ordering {
    let (sa, sb) = (a.state(), b.state());
    if !sa.has_failure_score() && !sb.has_failure_score() {
        let la = u128::from(a.in_flight()) * u128::from(b.weight().max(1));
        let lb = u128::from(b.in_flight()) * u128::from(a.weight().max(1));
        return la.cmp(&lb);
    }
    let now = now.get();
    let load = |c: &Candidate| {
        let m = c.state().failure_factor(now);
        ((c.in_flight() as f64 + 1.0) * m - 1.0) / f64::from(c.weight().max(1))
    };
    load(a).total_cmp(&load(b))
}

/// The clock, read at most once per pick and only if needed.
#[derive(Default)]
pub(crate) struct Now(u64);

impl Now {
    /// Now, in [`clock_ns`].
    #[inline]
    pub(crate) fn get(&mut self) -> u64 {
        if self.0 == 0 {
            self.0 = clock_ns(now()).max(1);
        }
        self.0
    }
}

impl Strategy for LeastConnections {
    type State = ();

    fn prepare(&self, _: &[Candidate]) {}

    fn pick(&self, _: &(), candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut ties = 0usize;
        let mut now = Now::default();
        for (i, c) in candidates.iter().enumerate() {
            if !ctx.allows(c) {
                continue;
            }
            match best.map(|b| cmp_load(c, &candidates[b], &mut now)) {
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
