//! Health transitions as values: what [`Pool::health_events`](crate::Pool::health_events)
//! broadcasts.

use std::time::{Duration, Instant};

use crate::endpoint::{EndpointId, Health};

use super::CheckError;

/// One change of an endpoint's health marks, as broadcast by
/// [`Pool::health_events`](crate::Pool::health_events) and logged as a `tracing` event.
///
/// An endpoint carries two independent marks: *down* (set by active health checks) and
/// *ejected* (set by outlier detection). Each event is one mark set or cleared; [`health`]
/// is the endpoint's overall health afterwards (an endpoint that returns from ejection while
/// still marked down stays [`Health::Down`]).
///
/// [`health`]: HealthEvent::health
#[derive(Clone, Debug)]
pub struct HealthEvent {
    pub(crate) endpoint: EndpointId,
    pub(crate) change: HealthChange,
    pub(crate) previous: Health,
    pub(crate) health: Health,
    pub(crate) at: Instant,
}

impl HealthEvent {
    /// The endpoint whose health changed.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// What changed, and why.
    pub fn change(&self) -> &HealthChange {
        &self.change
    }

    /// The endpoint's health before the change.
    pub fn previous(&self) -> Health {
        self.previous
    }

    /// The endpoint's health after the change.
    pub fn health(&self) -> Health {
        self.health
    }

    /// When the change was made.
    pub fn at(&self) -> Instant {
        self.at
    }
}

/// Which health mark of an endpoint changed, and why.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum HealthChange {
    /// Marked down: by an active check that failed `fall` times in a row (`reason` is the
    /// last failure), or by [`Pool::set_down`](crate::Pool::set_down) (`reason` is `None`).
    Down {
        /// The failure of the check that marked the endpoint down.
        reason: Option<CheckError>,
    },
    /// The down mark was cleared: an active check passed `rise` times in a row, or
    /// [`Pool::set_down`](crate::Pool::set_down) was called with `false`.
    Up,
    /// Ejected by outlier detection (or [`Pool::set_ejected`](crate::Pool::set_ejected)).
    Ejected {
        /// The failed requests in a row that caused the ejection (0 when ejected by hand).
        consecutive_failures: u32,
        /// How long the endpoint stays out, when outlier detection ejected it.
        duration: Option<Duration>,
    },
    /// The ejection ended (its time ran out, it was cleared by hand, or an active check brought
    /// the endpoint back up after it was down).
    Returned,
}

impl HealthChange {
    /// Whether this change takes a mark away (the endpoint may be healthy again).
    pub fn is_recovery(&self) -> bool {
        matches!(self, HealthChange::Up | HealthChange::Returned)
    }
}
