//! Pick hints: what outer layers tell the balancer about one request.
//!
//! Layers in front of a [`Balancer`](crate::Balancer) (hash-key extraction, sticky sessions,
//! failover) write a [`PickHints`] into the request's extensions; the balancer reads it when
//! it picks. The balancer reads hints from any request type that implements [`RequestHints`],
//! which `http::Request` does.

use crate::endpoint::EndpointId;
use crate::hash::stable_hash;

/// Hints for picking the endpoint of one request.
///
/// ```
/// use lbkit::hints::PickHints;
///
/// let mut req = http::Request::new(());
/// let hints = PickHints::of_mut(&mut req);
/// hints.set_hash_key(b"user-42");
/// hints.avoid("10.0.0.7:8080".into());
/// assert!(req.extensions().get::<PickHints>().unwrap().hash().is_some());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PickHints {
    hash: Option<u64>,
    preferred: Option<EndpointId>,
    avoid: Vec<EndpointId>,
}

impl PickHints {
    /// The hints of an HTTP request, inserted empty if it has none yet.
    pub fn of_mut<B>(req: &mut http::Request<B>) -> &mut PickHints {
        req.extensions_mut().get_or_insert_default::<PickHints>()
    }

    /// Sets the hash key from bytes (hashed with [`stable_hash`]).
    pub fn set_hash_key(&mut self, key: &[u8]) -> &mut Self {
        self.hash = Some(stable_hash(key));
        self
    }

    /// Sets an already hashed key.
    pub fn set_hash(&mut self, hash: u64) -> &mut Self {
        self.hash = Some(hash);
        self
    }

    /// Asks for a particular endpoint; it is used while it is eligible (present, healthy, in
    /// the tier in use, and not avoided), and otherwise the strategy picks as usual.
    pub fn prefer(&mut self, id: EndpointId) -> &mut Self {
        self.preferred = Some(id);
        self
    }

    /// Excludes an endpoint for this request (a retry avoids the ones already tried).
    pub fn avoid(&mut self, id: EndpointId) -> &mut Self {
        if !self.avoid.contains(&id) {
            self.avoid.push(id);
        }
        self
    }

    /// The hash key, if any.
    pub fn hash(&self) -> Option<u64> {
        self.hash
    }

    /// The preferred endpoint, if any.
    pub fn preferred(&self) -> Option<&EndpointId> {
        self.preferred.as_ref()
    }

    /// The endpoints to avoid.
    pub fn avoided(&self) -> &[EndpointId] {
        &self.avoid
    }
}

/// A request type the balancer can read [`PickHints`] from.
///
/// Implemented for `http::Request<B>` (hints live in its extensions). For a request type of
/// your own, implement it with the default method to balance without hints, or return hints
/// you keep in the request.
pub trait RequestHints {
    /// The request's hints, if it has any.
    fn hints(&self) -> Option<&PickHints> {
        None
    }
}

impl<B> RequestHints for http::Request<B> {
    #[inline]
    fn hints(&self) -> Option<&PickHints> {
        self.extensions().get::<PickHints>()
    }
}

/// The endpoint that served a response, found in the extensions of `http::Response`s that
/// went through a [`Balancer`](crate::Balancer) with [`CompleteOnBody`](crate::balance::CompleteOnBody).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServedBy(pub EndpointId);

/// The address of the peer a request came from, put in the request's extensions by the server
/// that accepted the connection (see `examples/reverse_proxy.rs`). The proxy writes it into
/// `X-Forwarded-For`/`Forwarded`, and client-IP keys read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub std::net::SocketAddr);
