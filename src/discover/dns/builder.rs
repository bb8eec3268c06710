//! What the user sets: the name and record type, the resolver, TTL bounds, the address filter.

use std::time::Duration;

use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{Name, TokioResolver};
use tracing::Instrument;

use super::error::{DnsError, Kind};
use super::resolve::{AddressFilter, Query, DEFAULT_MAX_ENDPOINTS};
use super::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use crate::endpoint::Endpoint;
#[allow(unused_imports)] // for the docs
use crate::endpoint::Tier;
use crate::pool::{Pool, PoolTask};
use crate::strategy::Strategy;

/// Discovers a pool's endpoints in DNS: the A/AAAA or SRV records of one name, polled at their
/// TTL. See the [module docs](super).
///
/// A builder: start with [`host`](DnsDiscovery::host) or [`srv`](DnsDiscovery::srv), adjust,
/// then [`spawn`](DnsDiscovery::spawn) the task that keeps a pool in step, or
/// [`resolve_once`](DnsDiscovery::resolve_once) to look at one answer.
#[derive(Clone, Debug)]
pub struct DnsDiscovery {
    pub(super) query: Query,
    pub(super) config: Option<ResolverConfig>,
    pub(super) opts: Option<ResolverOpts>,
    pub(super) min_ttl: Duration,
    pub(super) max_ttl: Duration,
    pub(super) retry_interval: Duration,
    pub(super) filter: AddressFilter,
}

impl DnsDiscovery {
    /// The default [`min_ttl`](DnsDiscovery::min_ttl): 1 second.
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(1);
    /// The default [`max_ttl`](DnsDiscovery::max_ttl): 5 minutes.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
    /// The default [`retry_interval`](DnsDiscovery::retry_interval): 5 seconds.
    pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(5);
    /// The default [`max_endpoints`](DnsDiscovery::max_endpoints): 1 024.
    pub const DEFAULT_MAX_ENDPOINTS: usize = DEFAULT_MAX_ENDPOINTS;

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
        Ok(self.query.resolve(&resolver, self.filter).await?.endpoints)
    }

    /// Spawns the task that keeps `pool`'s membership in step with DNS (see the
    /// [module docs](super)) and returns a handle to it.
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
}

/// hickory's default options, asking for both A and AAAA.
fn default_opts() -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts
}
