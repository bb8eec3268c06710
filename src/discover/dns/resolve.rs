//! One lookup and what becomes of its records: the address filter, SRV priorities as tiers and
//! weights, the cap on endpoints, and when an answer counts as good.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future;
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::{Name, TokioResolver};

use super::error::{is_no_such_record, Kind};
use super::DnsError;
use crate::endpoint::{Endpoint, Tier};

/// The most endpoints one answer may give unless set otherwise.
pub(super) const DEFAULT_MAX_ENDPOINTS: usize = 1024;

/// Which answered addresses may become endpoints.
#[derive(Clone, Copy, Debug)]
pub(super) struct AddressFilter {
    /// Loopback and link-local addresses too.
    pub(super) allow_local: bool,
    /// The most endpoints one answer may give.
    pub(super) max: usize,
}

impl Default for AddressFilter {
    fn default() -> Self {
        AddressFilter {
            allow_local: false,
            max: DEFAULT_MAX_ENDPOINTS,
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

/// What is looked up.
#[derive(Clone, Debug)]
pub(super) enum Query {
    /// A and AAAA records of `name`, every address on `port`.
    Host { name: String, port: u16 },
    /// SRV records of `name`, each target resolved to its addresses.
    Srv { name: String },
}

impl Query {
    pub(super) fn name(&self) -> &str {
        match self {
            Query::Host { name, .. } | Query::Srv { name } => name,
        }
    }

    /// One poll: the endpoints of a good answer (addresses passing `filter`) and how long it
    /// stays valid.
    pub(super) async fn resolve(
        &self,
        resolver: &TokioResolver,
        filter: AddressFilter,
    ) -> Result<Answer, DnsError> {
        // The cache is off, but an entry may linger until the cache's housekeeping runs.
        resolver.clear_cache();
        match self {
            Query::Host { name, port } => resolve_host(resolver, name, *port, filter).await,
            Query::Srv { name } => resolve_srv(resolver, name, filter).await,
        }
    }
}

/// The endpoints of a good answer and the time it stays valid.
pub(super) struct Answer {
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) ttl: Duration,
}

/// Endpoints gathered from an answer, one per socket address.
#[derive(Default)]
struct EndpointSet {
    /// Address -> (tier rank, summed weight).
    by_addr: BTreeMap<SocketAddr, (u8, u32)>,
    /// Address -> the host name it was found under (the name looked up, or the SRV target),
    /// first found kept: the name a TLS connection to it asks for.
    hosts: BTreeMap<SocketAddr, Arc<str>>,
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

    /// Like [`add`](Self::add), found under the host name `host`.
    fn add_named(&mut self, addr: SocketAddr, tier: u8, weight: u32, host: &Arc<str>) {
        self.add(addr, tier, weight);
        self.hosts.entry(addr).or_insert_with(|| host.clone());
    }

    fn into_endpoints(mut self) -> Vec<Endpoint> {
        self.by_addr
            .into_iter()
            .map(|(addr, (tier, weight))| {
                let endpoint = Endpoint::from(addr)
                    .with_weight(weight.clamp(1, Endpoint::MAX_WEIGHT))
                    .with_tier(Tier(tier));
                match self.hosts.remove(&addr) {
                    Some(host) => endpoint.with_host(host),
                    None => endpoint,
                }
            })
            .collect()
    }
}

/// A DNS name as a host name: without the final dot of a fully qualified name.
fn host_name(name: &str) -> Arc<str> {
    Arc::from(name.strip_suffix('.').unwrap_or(name))
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
    let host = host_name(name);
    for ip in lookup.iter() {
        match filter.usable(ip) {
            Some(ip) => set.add_named(SocketAddr::new(ip, port), 0, 1, &host),
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
        let host = host_name(&record.target().to_utf8());
        for ip in &addrs[record.target()] {
            set.add_named(
                SocketAddr::new(*ip, record.port()),
                rank(record.priority()),
                u32::from(record.weight()).max(1),
                &host,
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
}
