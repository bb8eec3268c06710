//! DNS discovery: a pool that follows the A/AAAA or SRV records of a name (cargo feature `dns`).
//!
//! [`DnsDiscovery`] resolves a name with [hickory-resolver](https://docs.rs/hickory-resolver)
//! and makes the pool's membership follow the answer:
//!
//! - [`DnsDiscovery::host`] (A and AAAA records): one endpoint per address, all on the port you
//!   give, weight 1, primary tier.
//! - [`DnsDiscovery::srv`] (SRV records): each record's target is resolved to its addresses;
//!   the port and weight come from the record, and the priority becomes the [`Tier`]: the
//!   lowest priority value is [`Tier::PRIMARY`], the next [`Tier::BACKUP`], and so on.
//!
//! [`DnsDiscovery::spawn`] starts a background task that resolves the name, applies the answer
//! to the pool as one snapshot ([`Changes::replace_all`](crate::pool::Changes::replace_all)),
//! then sleeps for the answer's TTL, bounded by [`min_ttl`](DnsDiscovery::min_ttl) and
//! [`max_ttl`](DnsDiscovery::max_ttl), and resolves again. Endpoints that stay in the answer
//! keep their live state (in-flight counts, latency, health); endpoints that leave it drain.
//!
//! **DNS trouble never empties the pool.** A failed lookup (timeout, SERVFAIL, an unreadable
//! answer), an empty answer (NXDOMAIN, no records) or an answer with no usable record keeps the
//! last good set, logs a `tracing` warning, and tries again after
//! [`retry_interval`](DnsDiscovery::retry_interval). Only a good answer changes the pool.
//!
//! The discovery owns the pool's whole membership: every good answer replaces the set, so
//! endpoints added to the same pool by hand are removed at the next poll. Build the pool with
//! [`Pool::new`] (or [`PoolBuilder::build`](crate::pool::PoolBuilder::build)), so that it can
//! make a service for each address that appears.
//!
//! The task holds no strong reference to the pool: it stops once every [`Pool`] and balancer
//! over the pool is dropped, even in the middle of a long sleep.
//!
//! ```no_run
//! # async fn run() -> Result<(), lbkit::discover::dns::DnsError> {
//! use std::time::Duration;
//! use lbkit::discover::dns::DnsDiscovery;
//! use lbkit::{strategy::RoundRobin, Endpoint, Pool};
//!
//! // One endpoint per address of backend.internal, on port 8080; the service here is only
//! // the address (a real one would be an HTTP client aimed at it).
//! let pool = Pool::new(RoundRobin::new(), |e: &Endpoint| e.socket_addr());
//! let task = DnsDiscovery::host("backend.internal", 8080)
//!     .min_ttl(Duration::from_secs(5))
//!     .spawn(&pool)?;
//! // ... serve with a Balancer over `pool`; dropping every handle to it stops `task`.
//! # drop(pool); task.await; Ok(()) }
//! ```
//!
//! ## Which name servers
//!
//! By default the system's resolver configuration is used (`/etc/resolv.conf` on Unix, the
//! registry on Windows), with its options. Give [`resolver_config`](DnsDiscovery::resolver_config)
//! to ask other servers (such as a test server on `127.0.0.1`), and
//! [`resolver_opts`](DnsDiscovery::resolver_opts) for timeouts and attempts. The configuration
//! types are re-exported here, so no direct dependency on hickory-resolver is needed. The
//! resolver's own cache is turned off whatever the options say: the discovery polls at the
//! record TTL itself and must see each change.
//!
//! ## The files
//!
//! `builder.rs` holds what the user sets ([`DnsDiscovery`]); `task.rs` the background loop that
//! polls and applies good answers to the pool; `resolve.rs` one lookup and what becomes of its
//! records (the address filter, SRV priorities as tiers, the endpoint cap); `error.rs`
//! [`DnsError`].

mod builder;
mod error;
mod resolve;
mod task;

pub use builder::DnsDiscovery;
pub use error::DnsError;
pub use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
#[doc(hidden)]
pub use resolve::srv_endpoints;

#[allow(unused_imports)] // for the docs above
use crate::{endpoint::Tier, pool::Pool};
