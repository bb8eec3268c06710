//! Strategies: how one endpoint is picked from the eligible ones.
//!
//! A [`Strategy`] works in two steps. When the pool publishes a new snapshot (endpoints added,
//! removed, re-weighted, or a health change), [`Strategy::prepare`] builds whatever the strategy
//! needs from the eligible [`Candidate`]s: a smooth weighted round-robin schedule, a Maglev
//! lookup table, a hash ring. When only a few endpoints changed, the pool calls
//! [`Strategy::update`] instead, with the previous state and a [`Delta`], so that a strategy can
//! follow the change without rebuilding (the ring merges the new points in, round robin and
//! random with equal weights keep their state). On every request, [`Strategy::pick`] reads that prepared state and
//! the candidates' live counters and returns one index. Picking takes `&self` and `&State`: it
//! never locks, and no built-in strategy allocates: `tests/alloc_free.rs` checks that
//! [`Pool::pick`](crate::Pool::pick) (with or without a hash key) and `Balancer::call` make no
//! heap allocation. A whole pick costs about 35-45 ns at any pool size on the reference machine
//! (about 100 ns for [`PeakEwma`], which reads the clock), most of it loading the snapshot and
//! cloning the candidate; [`LeastConnections`] grows with the pool (about 4 ns per endpoint) and
//! [`Ring`] with its points' footprint in cache (see `BENCHMARKS.md`).
//!
//! | strategy | pick cost | uses |
//! |---|---|---|
//! | [`RoundRobin`] | O(1) | smooth weighted order, exact proportions per cycle |
//! | [`Random`] | O(1), O(log n) weighted | stateless spreading |
//! | [`LeastConnections`] | O(n) | fewest in flight per weight (idle first), ties broken by weight |
//! | [`PowerOfTwoChoices`] | O(1), O(log n) weighted | the less loaded (per weight) of two endpoints sampled by weight |
//! | [`PeakEwma`] | O(1), O(log n) weighted | the lower latency × load per weight of two endpoints sampled by weight |
//! | [`Maglev`] | O(1) | consistent hashing on the request's hash key |
//! | [`Ring`] | O(log n) | consistent hashing with bounded load |
//!
//! [`AnyStrategy`] chooses among the built-in ones at run time (from a flag or a config file).
//!
//! Two signals of the endpoints' health reach every pick:
//!
//! - the load-aware strategies ([`LeastConnections`], [`PowerOfTwoChoices`], [`PeakEwma`])
//!   weigh recent failures: an endpoint's cost is multiplied by `1 + penalty × failure score`
//!   (see [`PoolBuilder::failure_penalty`](crate::pool::PoolBuilder::failure_penalty)), so one
//!   that fails fast does not look idle and fast;
//! - an endpoint that answered `429` or `503` with `Retry-After` is not
//!   [allowed](PickContext::allows) while its pause lasts, whatever the strategy, unless every
//!   allowed endpoint is paused (see
//!   [`EndpointState::is_backed_off`](crate::endpoint::EndpointState::is_backed_off)).

mod any;
mod least_connections;
mod maglev;
mod p2c;
mod random;
mod ring;
mod round_robin;

pub use any::{AnyStrategy, UnknownStrategy};
pub use least_connections::LeastConnections;
pub use maglev::Maglev;
pub use p2c::{PeakEwma, PowerOfTwoChoices};
pub use random::Random;
pub use ring::Ring;
pub use round_robin::RoundRobin;

use crate::endpoint::{Candidate, Candidates, EndpointId};

/// Picks one endpoint among the eligible candidates of a snapshot.
///
/// Implementations must uphold one rule: when `ctx` allows at least one candidate, the picked
/// index is of an allowed candidate (see [`PickContext::allows`]).
pub trait Strategy: Send + Sync + 'static {
    /// What the strategy precomputes per snapshot.
    type State: Send + Sync + 'static;

    /// Builds the per-snapshot state from the eligible candidates (never empty).
    fn prepare(&self, candidates: &Candidates) -> Self::State;

    /// Builds the state of a snapshot that differs from the one before it by a few candidates
    /// (see [`Delta`]), from that snapshot's state `previous`. The pool calls it instead of
    /// [`prepare`](Strategy::prepare) when endpoints join, leave or change weight without the
    /// tier or the panic state changing, so a strategy can update its state in time
    /// proportional to the change rather than to the pool. The result must be what
    /// `prepare(delta.after())` would pick with (a hash strategy must map every key exactly
    /// as a fresh build does). The default calls `prepare`.
    fn update(&self, previous: &Self::State, delta: &Delta<'_>) -> Self::State {
        let _ = previous;
        self.prepare(delta.after())
    }

    /// Picks the index of one candidate in `candidates` (never empty; the same slice `state`
    /// was prepared from), or `None` when the context allows none of them.
    fn pick(
        &self,
        state: &Self::State,
        candidates: &Candidates,
        ctx: &PickContext<'_>,
    ) -> Option<usize>;

    /// A short name for logs and metrics, such as `"round_robin"`.
    fn name(&self) -> &'static str;
}

/// How a snapshot's candidates differ from those of the snapshot before it, for
/// [`Strategy::update`].
///
/// Candidates keep their index from one snapshot to the next, except that a new one takes the
/// next index and one that leaves gives its index to the last candidate (a swap remove). A
/// candidate whose weight, address or service changed stays at its index but counts as
/// replaced: it is among [`added`](Delta::added) and not [`carried`](Delta::carried).
#[derive(Debug)]
pub struct Delta<'a> {
    before: &'a Candidates,
    after: &'a Candidates,
    edits: &'a [Edit],
}

/// One step from the candidates before to those after, in the order applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Edit {
    /// A candidate appended.
    Push,
    /// The candidate at this index replaced.
    Set(usize),
    /// The candidate at this index removed, the last one moved into its place.
    SwapRemove(usize),
}

impl<'a> Delta<'a> {
    pub(crate) fn new(before: &'a Candidates, after: &'a Candidates, edits: &'a [Edit]) -> Self {
        Delta {
            before,
            after,
            edits,
        }
    }

    /// The steps from [`before`](Delta::before) to [`after`](Delta::after), in order.
    pub(crate) fn edits(&self) -> &'a [Edit] {
        self.edits
    }

    /// The common weight of all candidates after, when `uniform` was that of all candidates
    /// before and every new or replaced one has it too (time in the number of changes).
    pub(crate) fn still_uniform(&self, uniform: Option<u32>) -> Option<u32> {
        uniform.filter(|&w| {
            self.added()
                .into_iter()
                .all(|i| self.after[i].weight() == w)
        })
    }

    /// The candidates of the snapshot before.
    pub fn before(&self) -> &'a Candidates {
        self.before
    }

    /// The candidates of the new snapshot.
    pub fn after(&self) -> &'a Candidates {
        self.after
    }

    /// The indices in [`after`](Delta::after) of the candidates that are new or replaced, in
    /// ascending order. Costs time in the number of changes, not in the pool's size.
    pub fn added(&self) -> Vec<usize> {
        let mut len = self.before.len();
        let mut added: Vec<usize> = Vec::new();
        for edit in self.edits {
            match *edit {
                Edit::Push => {
                    added.push(len);
                    len += 1;
                }
                Edit::Set(i) => {
                    if !added.contains(&i) {
                        added.push(i);
                    }
                }
                Edit::SwapRemove(i) => {
                    len -= 1;
                    added.retain(|&a| a != i);
                    if let Some(a) = added.iter_mut().find(|a| **a == len) {
                        *a = i;
                    }
                }
            }
        }
        added.sort_unstable();
        added
    }

    /// For each index of [`before`](Delta::before), the index of the same, unchanged candidate
    /// in [`after`](Delta::after), or `None` when it left or was replaced. Costs time in the
    /// size of the pool.
    pub fn carried(&self) -> Vec<Option<usize>> {
        let mut origin: Vec<Option<u32>> = (0..self.before.len() as u32).map(Some).collect();
        for edit in self.edits {
            match *edit {
                Edit::Push => origin.push(None),
                Edit::Set(i) => origin[i] = None,
                Edit::SwapRemove(i) => {
                    origin.swap_remove(i);
                }
            }
        }
        let mut carried = vec![None; self.before.len()];
        for (at, from) in origin.into_iter().enumerate() {
            if let Some(from) = from {
                carried[from as usize] = Some(at);
            }
        }
        carried
    }
}

/// What the request tells the strategy: an optional hash key, endpoints to avoid (those a
/// retry already tried, and those that asked with `Retry-After` not to be sent requests now),
/// and the most requests an endpoint may have in flight.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext<'a> {
    hash: Option<u64>,
    avoid: &'a [EndpointId],
    /// 0: no limit.
    max_in_flight: u64,
    /// Now (see `clock_ns`) when endpoints backed off by `Retry-After` are to be passed
    /// over, else 0.
    backoff_at: u64,
}

impl<'a> PickContext<'a> {
    /// A context with no hash key and nothing to avoid.
    pub fn new() -> Self {
        PickContext::default()
    }

    /// Sets the hash key that consistent-hashing strategies route on.
    pub fn with_hash(mut self, hash: u64) -> Self {
        self.hash = Some(hash);
        self
    }

    /// Sets the endpoints that must not be picked while another one is allowed (for example
    /// the ones a retried request already failed on).
    pub fn avoiding(mut self, avoid: &'a [EndpointId]) -> Self {
        self.avoid = avoid;
        self
    }

    /// Disallows endpoints that already have `limit` requests in flight (0, the default: no
    /// limit), as a pool with
    /// [`max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint) does.
    pub fn with_max_in_flight(mut self, limit: u64) -> Self {
        self.max_in_flight = limit;
        self
    }

    /// The hash key, if the request has one.
    pub fn hash(&self) -> Option<u64> {
        self.hash
    }

    /// The endpoints to avoid.
    pub fn avoid(&self) -> &'a [EndpointId] {
        self.avoid
    }

    /// Passes over endpoints backed off by `Retry-After` at `now_ns` (0: does not).
    #[inline]
    pub(crate) fn backing_off_at(mut self, now_ns: u64) -> Self {
        self.backoff_at = now_ns;
        self
    }

    /// Whether this context passes over backed-off endpoints.
    #[inline]
    pub(crate) fn checks_backoff(&self) -> bool {
        self.backoff_at != 0
    }

    /// Whether `candidate` may be picked: it is not avoided, under the in-flight limit, and,
    /// when the pool is picking for a request, it did not ask with `Retry-After` not to be
    /// sent requests now (see
    /// [`EndpointState::is_backed_off`](crate::endpoint::EndpointState::is_backed_off)).
    #[inline]
    pub fn allows(&self, candidate: &Candidate) -> bool {
        (self.avoid.is_empty() || !self.avoid.contains(candidate.id()))
            && (self.max_in_flight == 0 || candidate.state().in_flight() < self.max_in_flight)
            && (self.backoff_at == 0 || !candidate.state().is_backed_off_at(self.backoff_at))
    }
}

/// The first allowed candidate at or after `start`, wrapping around; `None` if none is allowed.
///
/// Strategies fall back to this when their own choice is avoided.
pub(crate) fn next_allowed(
    candidates: &Candidates,
    ctx: &PickContext<'_>,
    start: usize,
) -> Option<usize> {
    let n = candidates.len();
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| ctx.allows(&candidates[i]))
}

/// A fast per-thread random number generator for picking.
pub(crate) mod fast_rand {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::cell::RefCell;

    thread_local! {
        static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
    }

    /// A uniformly random number in `0..n` (`n > 0`).
    #[inline]
    pub(crate) fn below(n: usize) -> usize {
        RNG.with(|r| r.borrow_mut().random_range(0..n))
    }

    /// A uniformly random `u64`.
    #[inline]
    pub(crate) fn u64() -> u64 {
        RNG.with(|r| r.borrow_mut().random())
    }

    /// Reseeds this thread's generator, so that a simulation's picks repeat exactly.
    #[cfg(feature = "sim")]
    pub(crate) fn reseed(seed: u64) {
        RNG.with(|r| *r.borrow_mut() = SmallRng::seed_from_u64(seed));
    }
}
