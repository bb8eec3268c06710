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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::time::{Duration, Instant};

use futures::future::{self, Either};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, ResolveError, TokioResolver};
use tokio::sync::watch;
use tracing::Instrument;

pub use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};

use crate::endpoint::{Endpoint, Tier};
use crate::pool::{Pool, PoolTask, WeakPool};
use crate::strategy::Strategy;

/// What is looked up.
#[derive(Clone, Debug)]
enum Query {
    /// A and AAAA records of `name`, every address on `port`.
    Host { name: String, port: u16 },
    /// SRV records of `name`, each target resolved to its addresses.
    Srv { name: String },
}

impl Query {
    fn name(&self) -> &str {
        match self {
            Query::Host { name, .. } | Query::Srv { name } => name,
        }
    }
}

/// Discovers a pool's endpoints in DNS: the A/AAAA or SRV records of one name, polled at their
/// TTL. See the [module docs](self).
///
/// A builder: start with [`host`](DnsDiscovery::host) or [`srv`](DnsDiscovery::srv), adjust,
/// then [`spawn`](DnsDiscovery::spawn) the task that keeps a pool in step, or
/// [`resolve_once`](DnsDiscovery::resolve_once) to look at one answer.
#[derive(Clone, Debug)]
pub struct DnsDiscovery {
    query: Query,
    config: Option<ResolverConfig>,
    opts: Option<ResolverOpts>,
    min_ttl: Duration,
    max_ttl: Duration,
    retry_interval: Duration,
    filter: AddressFilter,
}

/// Which answered addresses may become endpoints.
#[derive(Clone, Copy, Debug)]
struct AddressFilter {
    /// Loopback and link-local addresses too.
    allow_local: bool,
    /// The most endpoints one answer may give.
    max: usize,
}

impl Default for AddressFilter {
    fn default() -> Self {
        AddressFilter {
            allow_local: false,
            max: DnsDiscovery::DEFAULT_MAX_ENDPOINTS,
        }
    }
}

impl AddressFilter {
    /// The address to connect to (IPv4-mapped IPv6 addresses as IPv4), or `None` if it must not
    /// become an endpoint: unspecified, multicast or broadcast always; loopback and link-local
    /// (such as the cloud metadata address 169.254.169.254) unless local addresses are allowed.
    fn usable(&self, ip: IpAddr) -> Option<IpAddr> {
        let ip = ip.to_canonical();
        let never = ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        let local = ip.is_loopback()
            || match ip {
                IpAddr::V4(v4) => v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
        (!never && (self.allow_local || !local)).then_some(ip)
    }
}

impl DnsDiscovery {
    /// The default [`min_ttl`](DnsDiscovery::min_ttl): 1 second.
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
    /// The default [`max_ttl`](DnsDiscovery::max_ttl): 5 minutes.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
    /// The default [`retry_interval`](DnsDiscovery::retry_interval): 5 seconds.
    pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(5);
    /// The default [`max_endpoints`](DnsDiscovery::max_endpoints): 1 024.
    pub const DEFAULT_MAX_ENDPOINTS: usize = 1024;

    fn new(query: Query) -> Self {
        DnsDiscovery {
            query,
            config: None,
            opts: None,
            min_ttl: Self::DEFAULT_MIN_TTL,
            max_ttl: Self::DEFAULT_MAX_TTL,
            retry_interval: Self::DEFAULT_RETRY_INTERVAL,
            filter: AddressFilter::default(),
        }
    }

    /// Also takes loopback (`127.0.0.0/8`, `::1`) and link-local (`169.254.0.0/16`,
    /// `fe80::/10`) addresses from answers (default off). Off, a DNS answer cannot point the
    /// pool at the proxy's own host or at a cloud metadata service (169.254.169.254), also not
    /// in IPv4-mapped IPv6 form (`::ffff:127.0.0.1`). Private addresses (10/8, 172.16/12,
    /// 192.168/16, fc00::/7) are always taken: internal service discovery lives there. Turn it
    /// on for tests and local setups.
    pub fn allow_local(mut self, allow: bool) -> Self {
        self.filter.allow_local = allow;
        self
    }

    /// The most endpoints one answer may give (default 1 024, at least 1); the rest of a larger
    /// answer is skipped, with a warning.
    pub fn max_endpoints(mut self, max: usize) -> Self {
        self.filter.max = max.max(1);
        self
    }

    /// Follows the A and AAAA records of `name`: one endpoint per address, each on `port`,
    /// with weight 1 in the primary tier. The endpoint ids are the socket addresses
    /// (`"10.0.0.7:8080"`, `"[2001:db8::7]:8080"`).
    ///
    /// A name without a final dot goes through the resolver's search list, as in any program;
    /// end it with a dot (`"backend.example.com."`) to ask for exactly that name. Both record
    /// types are asked for unless [`resolver_opts`](DnsDiscovery::resolver_opts) says
    /// otherwise (its [`LookupIpStrategy`]).
    pub fn host(name: impl Into<String>, port: u16) -> Self {
        Self::new(Query::Host {
            name: name.into(),
            port,
        })
    }

    /// Follows the SRV records of `name` (such as `"_http._tcp.backend.example.com."`).
    ///
    /// Each record's target is resolved (A and AAAA) to its addresses; every address becomes
    /// an endpoint with the record's port, weight and, by priority, tier: the lowest priority
    /// value present is [`Tier::PRIMARY`], the next one [`Tier::BACKUP`], then `Tier(2)`, and
    /// so on. A weight of 0 counts as 1, so that zones which publish weight 0 everywhere still
    /// spread the load; weights above [`Endpoint::MAX_WEIGHT`] are clamped. An address that
    /// several records reach keeps the lowest tier, with the weights of that tier added up.
    ///
    /// Records with port 0 or the target `"."` ("no service here") are skipped, and so is a
    /// target that does not exist (NXDOMAIN or no address). A target whose lookup fails (a
    /// timeout, SERVFAIL) fails the whole poll, so that a passing failure never shrinks the
    /// pool.
    pub fn srv(name: impl Into<String>) -> Self {
        Self::new(Query::Srv { name: name.into() })
    }

    /// Asks these name servers instead of the system's. With no
    /// [`resolver_opts`](DnsDiscovery::resolver_opts), the options are hickory's defaults with
    /// both A and AAAA asked for.
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv4Addr};
    /// use lbkit::discover::dns::{DnsDiscovery, NameServerConfigGroup, ResolverConfig};
    ///
    /// let servers = NameServerConfigGroup::from_ips_clear(&[IpAddr::V4(Ipv4Addr::LOCALHOST)], 5353, true);
    /// let dns = DnsDiscovery::host("backend.test.", 8080)
    ///     .resolver_config(ResolverConfig::from_parts(None, vec![], servers));
    /// # let _ = dns;
    /// ```
    pub fn resolver_config(mut self, config: ResolverConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Sets the resolver's options (timeout, attempts, ndots, the A/AAAA strategy…), in place
    /// of the system's or hickory's defaults. The resolver's cache is turned off whatever
    /// `cache_size` says. Start from [`ResolverOpts::default`] and set `ip_strategy` to
    /// [`LookupIpStrategy::Ipv4AndIpv6`] to ask for both A and AAAA.
    pub fn resolver_opts(mut self, opts: ResolverOpts) -> Self {
        self.opts = Some(opts);
        self
    }

    /// The shortest wait between two polls after a good answer (default 1 s), however short
    /// the records' TTL: a TTL of 0 does not make the task spin. When it is longer than
    /// [`max_ttl`](DnsDiscovery::max_ttl), `max_ttl` wins.
    pub fn min_ttl(mut self, min: Duration) -> Self {
        self.min_ttl = min;
        self
    }

    /// The longest wait between two polls after a good answer (default 5 minutes), however long
    /// the records' TTL: this bounds how late the pool follows a change made without lowering
    /// the TTL first.
    pub fn max_ttl(mut self, max: Duration) -> Self {
        self.max_ttl = max;
        self
    }

    /// The wait before trying again after a failed, empty or unusable answer (default 5 s).
    /// The pool keeps its last good set meanwhile.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The name this discovery looks up.
    pub fn name(&self) -> &str {
        self.query.name()
    }

    /// Resolves the name once and returns the endpoints a good answer gives, sorted by
    /// address, without touching any pool. Errors are what would keep a pool as it was.
    ///
    /// Builds a fresh resolver for each call (reading the system configuration if none was
    /// given). Must be called from within a tokio runtime.
    pub async fn resolve_once(&self) -> Result<Vec<Endpoint>, DnsError> {
        let resolver = self.resolver()?;
        Ok(self.resolve(&resolver).await?.endpoints)
    }

    /// Spawns the task that keeps `pool`'s membership in step with DNS (see the
    /// [module docs](self)) and returns a handle to it.
    ///
    /// The first lookup starts at once; until it succeeds the pool keeps what it has. The task
    /// ends when every handle and balancer over the pool is dropped, or when it is aborted
    /// through the handle; dropping the handle leaves it running.
    ///
    /// Fails only when the discovery cannot start ([`DnsError::is_config`]): the name is not a
    /// valid DNS name, the port is 0, or no [`resolver_config`] was given and the system
    /// configuration cannot be read. Must be called from within a tokio runtime.
    ///
    /// [`resolver_config`]: DnsDiscovery::resolver_config
    pub fn spawn<S, St>(self, pool: &Pool<S, St>) -> Result<PoolTask, DnsError>
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let resolver = self.resolver()?;
        let span = tracing::info_span!("dns_discovery", name = %self.query.name());
        let join = tokio::spawn(
            self.run(resolver, pool.downgrade(), pool.watch())
                .instrument(span),
        );
        Ok(PoolTask::new(join))
    }

    /// The resolver: the given or the system configuration, the cache off.
    fn resolver(&self) -> Result<TokioResolver, DnsError> {
        let name = self.name();
        if let Err(e) = Name::from_utf8(name) {
            return Err(
                DnsError::new(Kind::Config, name).with_detail(format!("not a valid DNS name: {e}"))
            );
        }
        if let Query::Host { port: 0, .. } = self.query {
            return Err(DnsError::new(Kind::Config, name).with_detail("port 0"));
        }
        let (config, mut opts) = match (&self.config, &self.opts) {
            (Some(config), Some(opts)) => (config.clone(), opts.clone()),
            (Some(config), None) => (config.clone(), default_opts()),
            (None, opts) => {
                let (config, system) =
                    hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                        DnsError::new(Kind::Config, name)
                            .with_detail("cannot read the system resolver configuration")
                            .with_source(e)
                    })?;
                (config, opts.clone().unwrap_or(system))
            }
        };
        // We poll at the TTL ourselves; a cached answer would hide a change.
        opts.cache_size = 0;
        Ok(
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build(),
        )
    }

    /// One poll: the endpoints of a good answer and how long it stays valid.
    async fn resolve(&self, resolver: &TokioResolver) -> Result<Answer, DnsError> {
        // The cache is off, but an entry may linger until the cache's housekeeping runs.
        resolver.clear_cache();
        match &self.query {
            Query::Host { name, port } => resolve_host(resolver, name, *port, self.filter).await,
            Query::Srv { name } => resolve_srv(resolver, name, self.filter).await,
        }
    }

    /// The wait after a good answer valid for `ttl`.
    fn next_poll(&self, ttl: Duration) -> Duration {
        ttl.max(self.min_ttl).min(self.max_ttl)
    }

    async fn run<S, St>(
        self,
        resolver: TokioResolver,
        pool: WeakPool<S, St>,
        mut versions: watch::Receiver<u64>,
    ) where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let mut last: Option<Vec<Endpoint>> = None;
        loop {
            let wait = match self.resolve(&resolver).await {
                Ok(answer) => {
                    let Some(pool) = pool.upgrade() else {
                        return;
                    };
                    let wait = self.next_poll(answer.ttl);
                    if last.as_ref() != Some(&answer.endpoints) {
                        tracing::info!(
                            endpoints = answer.endpoints.len(),
                            next_poll = ?wait,
                            "DNS answer changed the endpoint set"
                        );
                    } else {
                        tracing::debug!(endpoints = answer.endpoints.len(), next_poll = ?wait, "DNS answer unchanged");
                    }
                    // Applied even when unchanged, so the pool comes back to what DNS says.
                    pool.update(|c| c.replace_all(answer.endpoints.iter().cloned()));
                    last = Some(answer.endpoints);
                    wait
                }
                Err(_) if pool.upgrade().is_none() => return,
                Err(e) => {
                    tracing::warn!(
                        error = %ErrorChain(&e),
                        kept = last.as_ref().map_or(0, Vec::len),
                        retry_in = ?self.retry_interval,
                        "DNS discovery keeps the last good endpoint set"
                    );
                    self.retry_interval
                }
            };
            if !sleep_while_alive(&mut versions, wait).await {
                tracing::debug!("pool dropped, DNS discovery stops");
                return;
            }
        }
    }
}

/// hickory's default options, asking for both A and AAAA.
fn default_opts() -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts
}

/// Sleeps for `wait`; returns false early if the pool is dropped meanwhile.
async fn sleep_while_alive(versions: &mut watch::Receiver<u64>, wait: Duration) -> bool {
    let sleep = pin!(tokio::time::sleep(wait));
    // `changed` fails once the pool (the sender) is gone; new versions just loop.
    let closed = pin!(async { while versions.changed().await.is_ok() {} });
    matches!(future::select(sleep, closed).await, Either::Left(_))
}

/// The endpoints of a good answer and the time it stays valid.
struct Answer {
    endpoints: Vec<Endpoint>,
    ttl: Duration,
}

/// Endpoints gathered from an answer, one per socket address.
#[derive(Default)]
struct EndpointSet {
    /// Address -> (tier rank, summed weight).
    by_addr: BTreeMap<SocketAddr, (u8, u32)>,
}

impl EndpointSet {
    fn add(&mut self, addr: SocketAddr, tier: u8, weight: u32) {
        let entry = self.by_addr.entry(addr).or_insert((tier, 0));
        if tier < entry.0 {
            *entry = (tier, weight);
        } else if tier == entry.0 {
            entry.1 = entry.1.saturating_add(weight);
        }
    }

    fn into_endpoints(self) -> Vec<Endpoint> {
        self.by_addr
            .into_iter()
            .map(|(addr, (tier, weight))| {
                Endpoint::from(addr)
                    .with_weight(weight.clamp(1, Endpoint::MAX_WEIGHT))
                    .with_tier(Tier(tier))
            })
            .collect()
    }
}

/// The time left until `valid_until`.
fn ttl_until(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

async fn resolve_host(
    resolver: &TokioResolver,
    name: &str,
    port: u16,
    filter: AddressFilter,
) -> Result<Answer, DnsError> {
    let lookup = resolver
        .lookup_ip(name)
        .await
        .map_err(|e| DnsError::from_resolve(name, e))?;
    let ttl = ttl_until(lookup.valid_until());
    let mut set = EndpointSet::default();
    let mut skipped = 0usize;
    for ip in lookup.iter() {
        match filter.usable(ip) {
            Some(ip) => set.add(SocketAddr::new(ip, port), 0, 1),
            None => skipped += 1,
        }
    }
    finish(name, set, skipped, ttl, filter.max)
}

async fn resolve_srv(
    resolver: &TokioResolver,
    name: &str,
    filter: AddressFilter,
) -> Result<Answer, DnsError> {
    let srv = resolver
        .srv_lookup(name)
        .await
        .map_err(|e| DnsError::from_resolve(name, e))?;
    let mut valid_until = srv.as_lookup().valid_until();

    let (records, skipped) = usable_srv(srv.iter());
    if records.is_empty() && skipped == 0 {
        return Err(DnsError::new(Kind::Empty, name));
    }

    // Resolve each distinct target once, all at the same time.
    let targets: Vec<&Name> = records
        .iter()
        .map(|r| r.target())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lookups = future::join_all(targets.iter().map(|t| resolver.lookup_ip((*t).clone()))).await;
    let mut addrs: HashMap<&Name, Vec<IpAddr>> = HashMap::new();
    for (target, lookup) in targets.into_iter().zip(lookups) {
        match lookup {
            Ok(lookup) => {
                valid_until = valid_until.min(lookup.valid_until());
                let ips: Vec<IpAddr> = lookup.iter().filter_map(|ip| filter.usable(ip)).collect();
                if ips.is_empty() {
                    tracing::warn!(%target, "SRV target has no usable address; skipped");
                }
                addrs.insert(target, ips);
            }
            Err(e) if is_no_such_record(&e) => {
                tracing::warn!(%target, error = %e, "SRV target does not resolve; skipped");
            }
            Err(e) => {
                let target = target.to_string();
                return Err(DnsError::from_resolve(&target, e).for_srv(name));
            }
        }
    }

    let set = srv_set(&records, &addrs);
    finish(name, set, skipped, ttl_until(valid_until), filter.max)
}

/// The SRV records that offer a service, and how many say "no service here" (port 0, or the
/// target `"."`).
fn usable_srv<'a>(records: impl IntoIterator<Item = &'a SRV>) -> (Vec<&'a SRV>, usize) {
    let mut skipped = 0usize;
    let mut usable = Vec::new();
    for record in records {
        if record.port() == 0 || record.target().is_root() {
            skipped += 1;
        } else {
            usable.push(record);
        }
    }
    (usable, skipped)
}

/// The endpoints of usable SRV `records`, given the usable addresses of each target (a target
/// missing from `addrs` did not resolve).
fn srv_set(records: &[&SRV], addrs: &HashMap<&Name, Vec<IpAddr>>) -> EndpointSet {
    // Tiers rank the priorities that gave at least one address.
    let live: Vec<_> = records
        .iter()
        .filter(|r| addrs.get(r.target()).is_some_and(|ips| !ips.is_empty()))
        .collect();
    let priorities: BTreeSet<u16> = live.iter().map(|r| r.priority()).collect();
    let rank = |priority: u16| {
        let rank = priorities.iter().position(|p| *p == priority).unwrap_or(0);
        u8::try_from(rank).unwrap_or(u8::MAX)
    };
    let mut set = EndpointSet::default();
    for record in live {
        for ip in &addrs[record.target()] {
            set.add(
                SocketAddr::new(*ip, record.port()),
                rank(record.priority()),
                u32::from(record.weight()).max(1),
            );
        }
    }
    set
}

/// What SRV discovery makes of an answer, without any lookup: the endpoints of the SRV
/// `records` of `name`, given the addresses each target resolved to (a target missing from
/// `addrs` did not resolve), or the error that keeps a pool as it is. Addresses are filtered
/// as in a lookup with the default settings (no unspecified, multicast, broadcast, loopback
/// or link-local address; IPv4-mapped addresses as IPv4), with no cap on the count.
///
/// Pure and deterministic: for fuzzing and tests of the answer handling (`fuzz/`), not a
/// stable API.
#[doc(hidden)]
pub fn srv_endpoints(
    name: &str,
    records: &[SRV],
    addrs: &HashMap<Name, Vec<IpAddr>>,
) -> Result<Vec<Endpoint>, DnsError> {
    let (records, skipped) = usable_srv(records);
    if records.is_empty() && skipped == 0 {
        return Err(DnsError::new(Kind::Empty, name));
    }
    let filter = AddressFilter::default();
    let addrs: HashMap<&Name, Vec<IpAddr>> = addrs
        .iter()
        .map(|(target, ips)| {
            (
                target,
                ips.iter().filter_map(|ip| filter.usable(*ip)).collect(),
            )
        })
        .collect();
    let set = srv_set(&records, &addrs);
    finish(name, set, skipped, Duration::ZERO, usize::MAX).map(|answer| answer.endpoints)
}

/// A good answer (at most `max` endpoints of it), or the error that says why there is none.
fn finish(
    name: &str,
    mut set: EndpointSet,
    skipped: usize,
    ttl: Duration,
    max: usize,
) -> Result<Answer, DnsError> {
    if set.by_addr.len() > max {
        tracing::warn!(
            name,
            answered = set.by_addr.len(),
            max,
            "DNS answer has more endpoints than allowed; the rest are skipped"
        );
        // Keep the best tiers (SRV priorities), then the lowest addresses.
        let mut entries: Vec<_> = std::mem::take(&mut set.by_addr).into_iter().collect();
        entries.sort_by_key(|(addr, (tier, _))| (*tier, *addr));
        entries.truncate(max);
        set.by_addr = entries.into_iter().collect();
    }
    if set.by_addr.is_empty() {
        return Err(if skipped > 0 {
            DnsError::new(Kind::BadRecord, name)
                .with_detail(format!("{skipped} record(s), none usable"))
        } else {
            DnsError::new(Kind::Empty, name)
        });
    }
    if skipped > 0 {
        tracing::debug!(skipped, "unusable DNS records skipped");
    }
    Ok(Answer {
        endpoints: set.into_endpoints(),
        ttl,
    })
}

/// Whether the server answered that there is no such name or record (as opposed to failing).
fn is_no_such_record(e: &ResolveError) -> bool {
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NoError | ResponseCode::NXDomain,
            ..
        })
    )
}

/// Why a DNS poll gave no endpoints; the pool keeps its last good set.
///
/// One opaque type asked about with `is_*` methods: the lookup failed
/// ([`is_lookup`](DnsError::is_lookup)), the answer was empty
/// ([`is_empty_answer`](DnsError::is_empty_answer)), every record in it was unusable
/// ([`is_bad_record`](DnsError::is_bad_record)), or the resolver could not be set up
/// ([`is_config`](DnsError::is_config)). A failed lookup carries hickory's error as its
/// [`source`](StdError::source).
pub struct DnsError {
    kind: Kind,
    name: String,
    srv: Option<String>,
    detail: Option<String>,
    source: Option<ResolveError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Config,
    Lookup,
    Empty,
    BadRecord,
}

impl DnsError {
    fn new(kind: Kind, name: &str) -> Self {
        DnsError {
            kind,
            name: name.to_owned(),
            srv: None,
            detail: None,
            source: None,
        }
    }

    /// A lookup's error: an answer that there is no such name or record is an empty answer;
    /// anything else (timeout, SERVFAIL, refused, unreadable replies) a failed lookup.
    fn from_resolve(name: &str, e: ResolveError) -> Self {
        if is_no_such_record(&e) {
            return DnsError::new(Kind::Empty, name).with_source(e);
        }
        let mut err = DnsError::new(Kind::Lookup, name);
        // hickory words an error code as "no records found"; say which code it was.
        if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) =
            e.proto().map(|p| p.kind())
        {
            err = err.with_detail(format!("the server answered {response_code}"));
        }
        err.with_source(e)
    }

    fn with_source(mut self, e: ResolveError) -> Self {
        self.source = Some(e);
        self
    }

    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Marks the error as met while resolving a target of the SRV name `srv`.
    fn for_srv(mut self, srv: &str) -> Self {
        self.srv = Some(srv.to_owned());
        self
    }

    /// The name whose lookup gave this error: the discovered name, or the SRV target that
    /// failed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lookup failed: a timeout, SERVFAIL or another error code, an unreadable reply, no
    /// reachable server.
    pub fn is_lookup(&self) -> bool {
        self.kind == Kind::Lookup
    }

    /// The server answered that there is nothing: NXDOMAIN, no records of the type, or SRV
    /// targets without addresses.
    pub fn is_empty_answer(&self) -> bool {
        self.kind == Kind::Empty
    }

    /// The answer had records but none was usable (an SRV port 0 or target `"."`, an
    /// unspecified or multicast address).
    pub fn is_bad_record(&self) -> bool {
        self.kind == Kind::BadRecord
    }

    /// The discovery cannot start: the system configuration could not be read, the name is
    /// not a valid DNS name, or the port is 0.
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }
}

impl fmt::Debug for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DnsError");
        d.field("kind", &self.kind).field("name", &self.name);
        if let Some(srv) = &self.srv {
            d.field("srv", srv);
        }
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        match self.kind {
            Kind::Config => write!(f, "DNS discovery of {name} cannot start")?,
            Kind::Lookup => write!(f, "DNS lookup of {name} failed")?,
            Kind::Empty => write!(f, "DNS answer for {name} is empty")?,
            Kind::BadRecord => write!(f, "DNS answer for {name} has no usable record")?,
        }
        if let Some(srv) = &self.srv {
            write!(f, " (SRV target of {srv})")?;
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl StdError for DnsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// An error and its sources on one line, for logs.
struct ErrorChain<'a>(&'a DnsError);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn set_keeps_lowest_tier_and_adds_weights_within_it() {
        let mut set = EndpointSet::default();
        set.add(addr("10.0.0.1:80"), 1, 5);
        set.add(addr("10.0.0.1:80"), 0, 2);
        set.add(addr("10.0.0.1:80"), 0, 3);
        set.add(addr("10.0.0.1:80"), 2, 100);
        set.add(addr("10.0.0.2:80"), 0, 0);
        set.add(addr("10.0.0.3:80"), 0, 70_000);
        let eps = set.into_endpoints();
        assert_eq!(eps.len(), 3);
        assert_eq!((eps[0].tier(), eps[0].weight()), (Tier::PRIMARY, 5));
        assert_eq!(eps[1].weight(), 1, "weight 0 counts as 1");
        assert_eq!(eps[2].weight(), Endpoint::MAX_WEIGHT);
    }

    #[test]
    fn poll_interval_is_bounded() {
        let d = DnsDiscovery::host("x.test.", 80)
            .min_ttl(Duration::from_secs(2))
            .max_ttl(Duration::from_secs(60));
        assert_eq!(d.next_poll(Duration::ZERO), Duration::from_secs(2));
        assert_eq!(
            d.next_poll(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            d.next_poll(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        let odd = d.min_ttl(Duration::from_secs(90));
        assert_eq!(
            odd.next_poll(Duration::ZERO),
            Duration::from_secs(60),
            "max wins"
        );
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let e = DnsError::new(Kind::Empty, "a.test.");
        assert!(e.is_empty_answer() && !e.is_lookup());
        assert_eq!(e.to_string(), "DNS answer for a.test. is empty");
        let e = DnsError::new(Kind::Lookup, "t.test.").for_srv("_x._tcp.test.");
        assert_eq!(
            e.to_string(),
            "DNS lookup of t.test. failed (SRV target of _x._tcp.test.)"
        );
    }
}
