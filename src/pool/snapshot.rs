use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::endpoint::{Candidate, Endpoint, EndpointId, EndpointState, Tier};
use crate::hints::PickHints;
use crate::strategy::{PickContext, Strategy};

/// One immutable view of a pool: its eligible endpoints, their services and the strategy's
/// prepared state.
///
/// Eligible means weight above zero, healthy, and in the lowest tier that has such an endpoint
/// (so backups are used only while no primary is healthy).
pub struct Snapshot<S, T> {
    total: usize,
    eligible: Vec<Candidate>,
    pub(super) services: Vec<S>,
    index: HashMap<EndpointId, usize>,
    state: Option<T>,
    tier: Option<Tier>,
    version: u64,
}

impl<S, T> fmt::Debug for Snapshot<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("endpoints", &self.total)
            .field(
                "eligible",
                &self.eligible.iter().map(Candidate::id).collect::<Vec<_>>(),
            )
            .field("tier", &self.tier)
            .finish()
    }
}

impl<S, T> Snapshot<S, T> {
    pub(super) fn empty<St: Strategy<State = T>>(_: &St) -> Self {
        Snapshot {
            total: 0,
            eligible: Vec::new(),
            services: Vec::new(),
            index: HashMap::new(),
            state: None,
            tier: None,
            version: 0,
        }
    }

    pub(super) fn build<'a, St>(
        strategy: &St,
        members: impl Iterator<Item = (&'a Arc<Endpoint>, &'a Arc<EndpointState>, &'a S)> + Clone,
        version: u64,
    ) -> Self
    where
        St: Strategy<State = T>,
        S: Clone + 'a,
    {
        let usable = |(e, s, _): &(&Arc<Endpoint>, &Arc<EndpointState>, &S)| {
            e.get_weight() > 0 && s.is_healthy()
        };
        let tier = members
            .clone()
            .filter(usable)
            .map(|(e, _, _)| e.get_tier())
            .min();
        let mut eligible = Vec::new();
        let mut services = Vec::new();
        let mut total = 0;
        for m in members {
            total += 1;
            if Some(m.0.get_tier()) == tier && usable(&m) {
                let (e, s, svc) = m;
                eligible.push(Candidate::new(e.clone(), s.clone(), e.get_weight()));
                services.push(svc.clone());
            }
        }
        let index = eligible
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id().clone(), i))
            .collect();
        let state = (!eligible.is_empty()).then(|| strategy.prepare(&eligible));
        Snapshot {
            total,
            eligible,
            services,
            index,
            state,
            tier,
            version,
        }
    }

    /// The endpoints requests may go to now.
    pub fn eligible(&self) -> &[Candidate] {
        &self.eligible
    }

    /// The services of the eligible endpoints, in the same order.
    pub fn services(&self) -> &[S] {
        &self.services
    }

    /// How many endpoints the pool held, eligible or not.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the pool held no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The tier in use, if any endpoint is eligible.
    pub fn tier(&self) -> Option<Tier> {
        self.tier
    }

    /// Counts up by one with each published snapshot.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The index of an eligible endpoint by id.
    pub fn position(&self, id: &EndpointId) -> Option<usize> {
        self.index.get(id).copied()
    }

    #[inline]
    pub(crate) fn pick_ctx<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        ctx: &PickContext<'_>,
    ) -> Option<usize> {
        let state = self.state.as_ref()?;
        strategy.pick(state, &self.eligible, ctx)
    }

    /// Picks for a request: its preferred endpoint while eligible and not avoided, otherwise
    /// the strategy's choice.
    #[inline]
    pub(crate) fn pick<St: Strategy<State = T>>(
        &self,
        strategy: &St,
        hints: Option<&PickHints>,
    ) -> Option<usize> {
        let Some(h) = hints else {
            return self.pick_ctx(strategy, &PickContext::new());
        };
        let mut ctx = PickContext::new().avoiding(h.avoided());
        if let Some(hash) = h.hash() {
            ctx = ctx.with_hash(hash);
        }
        if let Some(i) = h.preferred().and_then(|id| self.position(id)) {
            if ctx.allows(&self.eligible[i]) {
                return Some(i);
            }
        }
        self.pick_ctx(strategy, &ctx)
    }
}
