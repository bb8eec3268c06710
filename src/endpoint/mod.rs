//! Endpoints: what the balancer spreads requests over.
//!
//! An [`Endpoint`] describes one backend: its identity ([`EndpointId`]), an optional socket
//! address, a weight, a [`Tier`] and optionally the zone it runs in (for
//! [zone-aware routing](crate::pool::ZoneAware)). The pool keeps live state beside it (in-flight requests,
//! latency, health) in an [`EndpointState`] whose counters are atomics, so reading and updating
//! them on the request path takes no lock.

mod candidates;
#[cfg(feature = "serde")]
mod config;
mod histogram;
pub(crate) mod state;

pub use candidates::Candidates;
pub(crate) use candidates::Chunked;
pub use histogram::{HistogramSnapshot, LatencySummary};
pub use state::{CheckOutcome, EndpointState, Health};

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::hash::stable_hash;

/// The identity of an endpoint: an address (`"10.0.0.7:8080"`) or a name (`"api-1"`).
///
/// Two endpoints with the same id are the same endpoint. The id is what consistent hashing and
/// sticky sessions are keyed on, so it should be stable across restarts of the balancer.
/// Cloning is cheap (a reference count).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(Arc<str>);

impl EndpointId {
    /// Creates an id from any string.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        EndpointId(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable 64-bit hash of the id (the same in every process and on every platform).
    pub fn stable_hash(&self) -> u64 {
        stable_hash(self.0.as_bytes())
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for EndpointId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for EndpointId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl From<&str> for EndpointId {
    fn from(s: &str) -> Self {
        EndpointId::new(s)
    }
}

impl From<String> for EndpointId {
    fn from(s: String) -> Self {
        EndpointId::new(s)
    }
}

impl From<SocketAddr> for EndpointId {
    fn from(addr: SocketAddr) -> Self {
        EndpointId::new(addr.to_string())
    }
}

/// The tier of an endpoint: lower tiers are preferred.
///
/// Requests go to the lowest tier that has a healthy endpoint; a [`Tier::BACKUP`] endpoint only
/// gets traffic while no [`Tier::PRIMARY`] endpoint is healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tier(pub u8);

impl Tier {
    /// The tier of ordinary endpoints (0).
    pub const PRIMARY: Tier = Tier(0);
    /// The first backup tier (1), used only while no primary is healthy.
    pub const BACKUP: Tier = Tier(1);
}

/// A description of one backend: id, optional address, optional host name, weight, tier and
/// zone.
///
/// ```
/// use lbkit::endpoint::{Endpoint, Tier};
///
/// let a = Endpoint::from("127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()).with_weight(5);
/// let b = Endpoint::new("spare").with_tier(Tier::BACKUP).with_zone("eu-west-1a");
/// assert_eq!(a.id().as_str(), "127.0.0.1:8080");
/// assert_eq!(a.weight(), 5);
/// assert_eq!(b.tier(), Tier::BACKUP);
/// assert_eq!(b.zone(), Some("eu-west-1a"));
/// assert_eq!(a.zone(), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    id: EndpointId,
    addr: Option<SocketAddr>,
    host: Option<Arc<str>>,
    weight: u32,
    tier: Tier,
    pub(crate) zone: Option<Arc<str>>,
}

impl Endpoint {
    /// The largest weight an endpoint may have; larger weights are clamped to it.
    pub const MAX_WEIGHT: u32 = 10_000;

    /// An endpoint with the given id, weight 1, primary tier and no socket address.
    pub fn new(id: impl Into<EndpointId>) -> Self {
        Endpoint {
            id: id.into(),
            addr: None,
            host: None,
            weight: 1,
            tier: Tier::PRIMARY,
            zone: None,
        }
    }

    /// Sets the socket address the endpoint's service connects to.
    pub fn with_addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Sets the host name the backend is known by (`"api.internal.example"`): the name a TLS
    /// connection to it asks for (SNI) and checks its certificate against (see
    /// [`Forward::tls`](crate::proxy::Forward::tls)). The address, not the name, is what is
    /// connected to. DNS discovery sets it to the name it looked up.
    pub fn with_host(mut self, host: impl Into<Arc<str>>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets the weight (relative share of traffic). A weight of 0 takes the endpoint out of
    /// rotation without removing it; weights above [`Endpoint::MAX_WEIGHT`] are clamped.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.min(Self::MAX_WEIGHT);
        self
    }

    /// Sets the tier.
    pub fn with_tier(mut self, tier: Tier) -> Self {
        self.tier = tier;
        self
    }

    /// Sets the zone (availability zone, rack, data centre) the endpoint runs in, as
    /// [zone-aware routing](crate::pool::ZoneAware) groups endpoints; an empty name clears it.
    pub fn with_zone(mut self, zone: impl Into<Arc<str>>) -> Self {
        let zone = zone.into();
        self.zone = (!zone.is_empty()).then_some(zone);
        self
    }

    /// The endpoint's id.
    pub fn id(&self) -> &EndpointId {
        &self.id
    }

    /// The endpoint's socket address, if it has one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The endpoint's host name, if it has one (see [`with_host`](Endpoint::with_host)).
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// The endpoint's configured weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The endpoint's tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The zone the endpoint runs in, if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
}

impl From<SocketAddr> for Endpoint {
    /// An endpoint whose id is the address's text and whose address is `addr`.
    fn from(addr: SocketAddr) -> Self {
        Endpoint::new(addr).with_addr(addr)
    }
}

impl From<&str> for Endpoint {
    /// An endpoint named `id`; when `id` parses as a socket address, it is also the address.
    fn from(id: &str) -> Self {
        match id.parse::<SocketAddr>() {
            Ok(addr) => Endpoint::new(id).with_addr(addr),
            Err(_) => Endpoint::new(id),
        }
    }
}

/// An endpoint as a strategy sees it: its description, its live state and the weight in force.
///
/// Candidates are built by the pool when it publishes a snapshot; strategies read them and never
/// change them. Cloning is cheap (two reference counts).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) state: Arc<EndpointState>,
    pub(crate) hash: u64,
    pub(crate) weight: u32,
}

impl Candidate {
    pub(crate) fn new(endpoint: Arc<Endpoint>, state: Arc<EndpointState>, weight: u32) -> Self {
        let hash = endpoint.id().stable_hash();
        Candidate {
            endpoint,
            state,
            hash,
            weight,
        }
    }

    /// The endpoint's description.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The endpoint's id.
    #[inline]
    pub fn id(&self) -> &EndpointId {
        self.endpoint.id()
    }

    /// The stable hash of the endpoint's id (see [`EndpointId::stable_hash`]).
    pub fn id_hash(&self) -> u64 {
        self.hash
    }

    /// The weight in force for this snapshot (at least 1). While an endpoint of the snapshot
    /// ramps up under [`SlowStart`](crate::health::SlowStart), all weights of the snapshot are
    /// scaled by ten, and a ramping endpoint's is reduced.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The endpoint's live state.
    #[inline]
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.state
    }

    /// Requests currently in flight to this endpoint.
    #[inline]
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight()
    }
}
