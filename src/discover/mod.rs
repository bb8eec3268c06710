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

mod adapter;
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod dns;

pub use adapter::{feed, PoolDiscover};

#[allow(unused_imports)] // for the docs above
use crate::pool::Pool;
