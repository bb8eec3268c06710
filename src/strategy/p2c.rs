use std::cmp::Ordering;

use super::least_connections::{cmp_load, Now};
use super::random::RandomState;
use super::{fast_rand, next_allowed, Delta, PickContext, Random, Strategy};
use crate::endpoint::state::{clock_ns, now};
use crate::endpoint::{Candidate, Candidates};

/// Two distinct random indices below `n` (`2 <= n < 2^32`), from one 64-bit draw: each half
/// is scaled to its range by a multiply and shift (Lemire's method without the rejection step;
/// the bias, under `n / 2^32`, is far below anything a balancer could notice).
#[inline]
fn two_random(n: usize) -> (usize, usize) {
    let r = fast_rand::u64();
    let a = (((r >> 32) * n as u64) >> 32) as usize;
    let mut b = (((r & 0xffff_ffff) * (n as u64 - 1)) >> 32) as usize;
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Samples two distinct candidates, in proportion to their weights, and keeps the cheaper by
/// `cost` (which compares its first argument's cost to its second's); falls back to a scan
/// when the context rules out both.
///
/// With unequal weights, both samples are drawn independently by weight; on a tie, each wins
/// half the time. Should both draws land on one endpoint, the second becomes a uniformly drawn
/// other one, which that endpoint wins a tie against. So at zero load (every cost tied) an
/// endpoint is picked with exactly its share of the weights, and yet a pick always compares
/// two endpoints. With equal weights, two distinct endpoints are drawn uniformly.
#[inline]
fn pick_two(
    state: &RandomState,
    candidates: &Candidates,
    ctx: &PickContext<'_>,
    mut cost: impl FnMut(&Candidate, &Candidate) -> Ordering,
) -> Option<usize> {
    let n = candidates.len();
    if n == 1 {
        return next_allowed(candidates, ctx, 0);
    }
    let (a, b, independent) = if state.is_uniform() {
        let (a, b) = two_random(n);
        (a, b, false)
    } else {
        let (a, b) = (state.sample(n), state.sample(n));
        if a == b {
            let other = fast_rand::below(n - 1);
            (a, other + usize::from(other >= a), false)
        } else {
            (a, b, true)
        }
    };
    match (ctx.allows(&candidates[a]), ctx.allows(&candidates[b])) {
        (true, true) => Some(match cost(&candidates[b], &candidates[a]) {
            Ordering::Less => b,
            Ordering::Equal if independent && fast_rand::u64() & 1 == 1 => b,
            _ => a,
        }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => next_allowed(candidates, ctx, a + 1),
    }
}

/// Power of two choices: sample two endpoints at random, in proportion to their weights, and
/// send to the one with fewer requests in flight per unit of weight.
///
/// Weights count at any load: an endpoint of weight 3 is sampled three times as often as one
/// of weight 1, and holds about three times the requests under load; at zero load (nothing in
/// flight anywhere, every comparison a tie) it gets exactly its share of the picks. A
/// [slow-start](crate::health::SlowStart) ramp acts through the ramped weight. With equal
/// weights a pick is O(1); with unequal ones each sample is a binary search over the
/// cumulative weights (O(log n)), as [`Random`]'s.
///
/// Requests to an endpoint that failed lately weigh more, as for
/// [`LeastConnections`](super::LeastConnections): a fast-failing endpoint does not look idle.
///
/// Nearly as good as [`LeastConnections`](super::LeastConnections) at spreading load, at O(1)
/// per pick, and it avoids the herd effect of every balancer choosing the same least-loaded
/// endpoint. This is the load measure of tower's `PendingRequests`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PowerOfTwoChoices {
    _priv: (),
}

impl PowerOfTwoChoices {
    /// Creates a power-of-two-choices strategy over in-flight load.
    pub fn new() -> Self {
        PowerOfTwoChoices { _priv: () }
    }
}

impl Strategy for PowerOfTwoChoices {
    type State = RandomState;

    fn prepare(&self, candidates: &Candidates) -> RandomState {
        Random::new().prepare(candidates)
    }

    fn update(&self, previous: &RandomState, delta: &Delta<'_>) -> RandomState {
        Random::new().update(previous, delta)
    }

    #[inline]
    fn pick(
        &self,
        state: &RandomState,
        candidates: &Candidates,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let mut now = Now::default();
        pick_two(state, candidates, ctx, |x, y| cmp_load(x, y, &mut now))
    }

    fn name(&self) -> &'static str {
        "p2c"
    }
}

/// Peak EWMA: power of two choices over *latency × load*.
///
/// Each endpoint keeps a moving average of its response times that jumps up at once on a slow
/// response (the peak) and decays slowly otherwise; the cost of an endpoint is that estimate,
/// decayed further while the endpoint is idle so it is probed again, times the requests that
/// would be in flight, divided by its weight. Two random endpoints are sampled (in proportion
/// to their weights, as for [`PowerOfTwoChoices`]) and the cheaper one is picked. This is the model of Finagle and of tower's `PeakEwma`; the decay window and
/// the starting estimate are set on the pool (see
/// [`PoolBuilder::latency_decay`](crate::pool::PoolBuilder::latency_decay)).
///
/// Failures weigh too: the cost is multiplied by `1 + penalty × failure score`, the recent
/// share of the endpoint's requests that failed (see
/// [`PoolBuilder::failure_penalty`](crate::pool::PoolBuilder::failure_penalty)); otherwise an
/// endpoint that fails fast would look like the fastest of all.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeakEwma {
    _priv: (),
}

impl PeakEwma {
    /// Creates a peak-EWMA strategy.
    pub fn new() -> Self {
        PeakEwma { _priv: () }
    }
}

impl Strategy for PeakEwma {
    type State = RandomState;

    fn prepare(&self, candidates: &Candidates) -> RandomState {
        Random::new().prepare(candidates)
    }

    fn update(&self, previous: &RandomState, delta: &Delta<'_>) -> RandomState {
        Random::new().update(previous, delta)
    }

    #[inline]
    fn pick(
        &self,
        state: &RandomState,
        candidates: &Candidates,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let now = clock_ns(now());
        let cost = |c: &Candidate| c.state().peak_ewma_cost(now) / f64::from(c.weight().max(1));
        pick_two(state, candidates, ctx, |x, y| cost(x).total_cmp(&cost(y)))
    }

    fn name(&self) -> &'static str {
        "peak_ewma"
    }
}
