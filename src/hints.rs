//! Pick hints: what outer layers tell the balancer about one request.
//!
//! Layers in front of a [`Balancer`](crate::Balancer) (hash-key extraction, sticky sessions,
//! failover) write a [`PickHints`] into the request's extensions; the balancer reads it when
//! it picks. The balancer reads hints from any request type that implements [`RequestHints`],
//! which `http::Request` does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
#[derive(Clone, Debug, Default)]
pub struct PickHints {
    hash: Option<u64>,
    preferred: Option<EndpointId>,
    avoid: Vec<EndpointId>,
    record: Option<PickRecord>,
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

    /// Asks the balancer to record which endpoint it picks for this request, and returns the
    /// record to read it from: when the response arrives, or when the request failed or timed
    /// out before any answer (so a retry knows where not to go).
    ///
    /// There is one record per request: layers that ask get the same one, and so do the copies
    /// a failover layer sends again; it holds the latest pick (so a sticky layer outside a
    /// failover layer learns the endpoint that finally answered). Asking costs one small
    /// allocation per request; requests that do not ask pay nothing.
    pub fn record_pick(&mut self) -> PickRecord {
        self.record.get_or_insert_with(PickRecord::default).clone()
    }

    /// The record the balancer writes its pick into, if one was asked for.
    pub fn pick_record(&self) -> Option<&PickRecord> {
        self.record.as_ref()
    }
}

/// Where the balancer sent one request: see [`PickHints::record_pick`].
///
/// ```
/// use lbkit::{Balancer, hints::PickHints, strategy::RoundRobin};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let balancer = Balancer::new(["a"], RoundRobin::new(), |_| {
///     service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     })
/// });
/// let mut req = http::Request::new(());
/// let record = PickHints::of_mut(&mut req).record_pick();
/// balancer.oneshot(req).await.unwrap();
/// assert_eq!(record.endpoint().unwrap(), "a");
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct PickRecord(Arc<RecordInner>);

#[derive(Debug, Default)]
struct RecordInner {
    endpoint: Mutex<Option<EndpointId>>,
    gave_up: AtomicBool,
}

impl PickRecord {
    /// The latest endpoint picked for the request, once the balancer has picked one.
    pub fn endpoint(&self) -> Option<EndpointId> {
        self.slot().clone()
    }

    /// Records `id` as the latest pick.
    pub(crate) fn set(&self, id: &EndpointId) {
        *self.slot() = Some(id.clone());
    }

    /// Forgets the pick, before the request is sent again.
    pub(crate) fn clear(&self) {
        *self.slot() = None;
        self.0.gave_up.store(false, Ordering::Relaxed);
    }

    /// Says that the caller gives up on the current attempt because the endpoint took too long
    /// (a per-try timeout or a deadline, as the failover layer's), just before it drops the
    /// attempt: the balancer then counts it as the endpoint's failure, so that outlier
    /// detection ejects an endpoint that hangs. An attempt dropped without this (a client that
    /// went away) is counted as cancelled, never against the endpoint.
    pub fn give_up(&self) {
        self.0.gave_up.store(true, Ordering::Relaxed);
    }

    /// Whether [`give_up`](PickRecord::give_up) was called for the current attempt.
    pub(crate) fn gave_up(&self) -> bool {
        self.0.gave_up.load(Ordering::Relaxed)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<EndpointId>> {
        // Nothing can be left half-written in an Option: go on after a panic elsewhere.
        self.0.endpoint.lock().unwrap_or_else(|e| e.into_inner())
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
