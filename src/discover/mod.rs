//! Discovery: where a pool's endpoints come from.
//!
//! - A static list: [`Balancer::new`](crate::Balancer::new) or [`Pool::extend`].
//! - A live handle: the [`Pool`] itself, cheap to clone and usable from any task, to add,
//!   remove and re-weight endpoints while traffic flows (auto-scaling). A burst of changes made
//!   in one [`Pool::update`] is published as one snapshot; a removed endpoint gets no new
//!   requests and its in-flight ones finish (it drains).
//! - From `tower::discover`: [`feed`] applies a [`Discover`](tower::discover::Discover) stream of
//!   `Change::Insert`/`Change::Remove` to a pool, batching what arrives together.
//! - To `tower::discover`: [`PoolDiscover`] follows a pool's eligible endpoints as a `Discover`
//!   stream, so tower's own balancers can run over an lbkit pool and its health checks.
//! - From DNS (cargo feature `dns`): [`dns::DnsDiscovery`] follows the A/AAAA or SRV records
//!   of a name, polled at their TTL; a failed or empty lookup keeps the last good set.
//! - From Kubernetes (cargo feature `kube`): [`kube::KubeDiscovery`] watches a Service's
//!   EndpointSlices: ready endpoints in rotation, serving-but-terminating ones draining, each
//!   with its zone.

mod adapter;
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod dns;
#[cfg(feature = "kube")]
#[cfg_attr(docsrs, doc(cfg(feature = "kube")))]
pub mod kube;

pub use adapter::{feed, PoolDiscover};

#[allow(unused_imports)] // for the docs above
use crate::pool::Pool;

/// An error and its sources on one line, for the discovery tasks' logs.
#[cfg(any(feature = "dns", feature = "kube"))]
struct ErrorChain<'a>(&'a dyn std::error::Error);

#[cfg(any(feature = "dns", feature = "kube"))]
impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
