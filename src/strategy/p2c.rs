use super::least_connections::{cmp_load, Now};
use super::{fast_rand, next_allowed, PickContext, Strategy};
use crate::endpoint::state::{clock_ns, now};
use crate::endpoint::Candidate;

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

/// Samples two distinct candidates and keeps the one `better` prefers; falls back to a scan
/// when the context rules out both.
#[inline]
fn pick_two(
    candidates: &[Candidate],
    ctx: &PickContext<'_>,
    mut better: impl FnMut(&Candidate, &Candidate) -> bool,
) -> Option<usize> {
    if candidates.len() == 1 {
        return next_allowed(candidates, ctx, 0);
    }
    let (a, b) = two_random(candidates.len());
    match (ctx.allows(&candidates[a]), ctx.allows(&candidates[b])) {
        (true, true) => Some(if better(&candidates[b], &candidates[a]) {
            b
        } else {
            a
        }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => next_allowed(candidates, ctx, a + 1),
    }
}

/// Power of two choices: sample two endpoints at random, send to the one with fewer requests
/// in flight per unit of weight.
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
    type State = ();

    fn prepare(&self, _: &[Candidate]) {}

    #[inline]
    fn pick(&self, _: &(), candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let mut now = Now::default();
        pick_two(candidates, ctx, |x, y| cmp_load(x, y, &mut now).is_lt())
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
/// would be in flight, divided by its weight. Two random endpoints are sampled and the cheaper
/// one is picked. This is the model of Finagle and of tower's `PeakEwma`; the decay window and
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
    type State = ();

    fn prepare(&self, _: &[Candidate]) {}

    #[inline]
    fn pick(&self, _: &(), candidates: &[Candidate], ctx: &PickContext<'_>) -> Option<usize> {
        let now = clock_ns(now());
        let cost = |c: &Candidate| c.state().peak_ewma_cost(now) / f64::from(c.weight().max(1));
        pick_two(candidates, ctx, |x, y| cost(x) < cost(y))
    }

    fn name(&self) -> &'static str {
        "peak_ewma"
    }
}
