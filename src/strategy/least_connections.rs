use std::cmp::Ordering;

use super::{fast_rand, PickContext, Strategy};
use crate::endpoint::state::{clock_ns, now};
use crate::endpoint::{Candidate, Candidates};

/// Least connections, weighted: the endpoint with the fewest requests in flight per unit of
/// weight (HAProxy's `leastconn`, Envoy's least request), ties broken at random in proportion
/// to the weights. An idle endpoint comes first; among busy ones the key is
/// `(in flight + ½) / weight`, which shares the requests in flight in proportion to the
/// weights without favouring light or heavy endpoints (see the source of `cmp_load`).
///
/// So weights count at any load: under load, an endpoint of weight 3 holds about three times
/// the requests of one of weight 1; at zero load, when every endpoint has nothing in flight
/// and all tie, it gets three picks in four. A [slow-start](crate::health::SlowStart) ramp
/// acts the same way, through the ramped weight.
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

/// Twice the offset added to a busy endpoint's in-flight count (see [`cmp_load`]).
const OFFSET2: u64 = 1;

/// Compares the load per unit of weight of two candidates, HAProxy's `leastconn` key: 0 for
/// an idle endpoint (so at zero load all tie, and the tie is broken by weight), and
/// `(in_flight + ½) / weight` for a busy one. The half (HAProxy adds 1) makes the in-flight
/// counts follow the weights without bias whatever the concurrency: picking the lowest
/// `in_flight / weight` favours light endpoints (with 16 requests in flight over weights
/// 3, 1, 1, 1 the heavy one held 43 % instead of half), `(in_flight + 1) / weight` heavy ones;
/// this is the Sainte-Laguë rule of apportionment.
///
/// Exact (by cross-multiplication) when neither failed lately, otherwise with each one's
/// in-flight count raised by its failure factor `m` (see [`EndpointState::failure_factor`])
/// to `(in_flight + 1) × m − 1`, which is `in_flight` when `m` is 1. `now` reads the clock,
/// once, when a factor is needed.
///
/// [`EndpointState::failure_factor`]: crate::endpoint::EndpointState
#[inline]
pub(crate) fn cmp_load(a: &Candidate, b: &Candidate, now: &mut Now) -> Ordering {
    let (sa, sb) = (a.state(), b.state());
    if !sa.has_failure_score() && !sb.has_failure_score() {
        let key = |c: &Candidate| match c.in_flight() {
            0 => 0,
            n => u128::from(2 * n + OFFSET2),
        };
        let la = key(a) * u128::from(b.weight().max(1));
        let lb = key(b) * u128::from(a.weight().max(1));
        return la.cmp(&lb);
    }
    let now = now.get();
    let load = |c: &Candidate| {
        let m = c.state().failure_factor(now);
        let effective = (c.in_flight() as f64 + 1.0) * m - 1.0;
        if effective <= 0.0 {
            0.0
        } else {
            (2.0 * effective + OFFSET2 as f64) / f64::from(c.weight().max(1))
        }
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

    fn prepare(&self, _: &Candidates) {}

    fn pick(&self, _: &(), candidates: &Candidates, ctx: &PickContext<'_>) -> Option<usize> {
        let mut best: Option<usize> = None;
        // The weights of the endpoints tied with `best` so far, its own included.
        let mut tied_weight = 0u64;
        let mut now = Now::default();
        for (i, c) in candidates.iter().enumerate() {
            if !ctx.allows(c) {
                continue;
            }
            let weight = u64::from(c.weight().max(1));
            match best.map(|b| cmp_load(c, &candidates[b], &mut now)) {
                None | Some(Ordering::Less) => {
                    best = Some(i);
                    tied_weight = weight;
                }
                Some(Ordering::Equal) => {
                    // Weighted reservoir sampling: each tied endpoint wins with a chance of
                    // its weight over the tied endpoints' total, so at zero load (all tied)
                    // the picks follow the weights.
                    tied_weight += weight;
                    if fast_rand::u64() % tied_weight < weight {
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
