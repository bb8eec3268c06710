//! Kubernetes discovery (cargo feature `kube`): a pool follows a Service's EndpointSlices.
//!
//! [`KubeDiscovery`] watches the `discovery.k8s.io/v1` EndpointSlices labelled
//! `kubernetes.io/service-name=<service>` in one namespace, with kube-rs's runtime watcher
//! (one list, then a watch; on a broken or expired watch it lists again, with backoff), and
//! after every change sets the pool's endpoints to what the slices say, as one snapshot:
//!
//! | endpoint's conditions | in the pool |
//! |---|---|
//! | `ready` | in rotation (weight 1) |
//! | not ready, `serving` and `terminating` | draining: kept with weight 0, so it gets no new request and its requests in flight finish |
//! | otherwise | removed |
//!
//! As the API says, an unset `ready` counts as ready, an unset `serving` as `ready`'s value,
//! an unset `terminating` as not terminating. Each address of an endpoint is one lbkit
//! endpoint, its id `ip:port`, with the endpoint's `zone` as its zone (for
//! [zone-aware routing](crate::pool::ZoneAware)). The port is the slice's port of the name
//! given with [`port_name`](KubeDiscovery::port_name), or its only (first) port; a slice
//! without it, or of address type `FQDN`, is skipped. An address in several slices (as
//! during a rollout of slices) counts once, in rotation if any slice says it is ready.
//!
//! While the API server cannot be reached, the pool keeps its last endpoints; a slice that
//! is deleted takes its endpoints with it. The task stops when every handle and balancer
//! over the pool is dropped.
//!
//! The watch needs RBAC to `list` and `watch` `endpointslices` in the namespace.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use futures::{Stream, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::Instrument;

use crate::endpoint::Endpoint;
use crate::pool::{Pool, PoolTask, WeakPool};
use crate::strategy::Strategy;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Follows a Kubernetes Service's EndpointSlices into a pool (see the [module docs](self)).
///
/// ```no_run
/// # async fn run() -> Result<(), lbkit::discover::kube::KubeError> {
/// use lbkit::discover::kube::KubeDiscovery;
/// use lbkit::strategy::PowerOfTwoChoices;
/// use lbkit::{Endpoint, Pool};
///
/// let pool = Pool::new(PowerOfTwoChoices::new(), |e: &Endpoint| e.socket_addr());
/// // The client from the kubeconfig, or the pod's service account in a cluster.
/// let task = KubeDiscovery::new("default", "web").port_name("http").spawn(&pool).await?;
/// # drop(task); Ok(()) }
/// ```
#[derive(Clone)]
pub struct KubeDiscovery {
    namespace: String,
    service: String,
    port: Option<String>,
    client: Option<Client>,
}

impl fmt::Debug for KubeDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeDiscovery")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("port", &self.port)
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl KubeDiscovery {
    /// Discovery of the endpoints of Service `service` in `namespace`, on its slices' only
    /// (or first) port, with the client inferred when spawned.
    pub fn new(namespace: impl Into<String>, service: impl Into<String>) -> Self {
        KubeDiscovery {
            namespace: namespace.into(),
            service: service.into(),
            port: None,
            client: None,
        }
    }

    /// Uses the slices' port of this name (the Service port's name, such as `"http"`).
    pub fn port_name(mut self, name: impl Into<String>) -> Self {
        self.port = Some(name.into());
        self
    }

    /// Uses this client (default: [`Client::try_default`], the kubeconfig or the pod's
    /// service account).
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Spawns the task that keeps `pool`'s membership in step with the Service's
    /// EndpointSlices and returns a handle to it. Until the first list arrives, the pool keeps
    /// what it has. Dropping the handle leaves the task running; it ends with the pool.
    ///
    /// Fails ([`KubeError::is_config`]) when the namespace, service or port name is not a
    /// valid Kubernetes name, or when no client was given and none can be inferred. Must be
    /// called from within a tokio runtime.
    pub async fn spawn<S, St>(self, pool: &Pool<S, St>) -> Result<PoolTask, KubeError>
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        check_name("namespace", &self.namespace)?;
        check_name("service", &self.service)?;
        if let Some(port) = &self.port {
            check_name("port name", port)?;
        }
        let client = match &self.client {
            Some(client) => client.clone(),
            None => Client::try_default().await.map_err(|e| {
                KubeError::config("no Kubernetes client could be inferred").with_source(e)
            })?,
        };
        let api: Api<EndpointSlice> = Api::namespaced(client, &self.namespace);
        let selector = format!("{SERVICE_LABEL}={}", self.service);
        let events =
            watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        let span = tracing::info_span!("kube_discovery", namespace = %self.namespace, service = %self.service);
        let join = tokio::spawn(
            self.run(events, pool.downgrade(), pool.watch())
                .instrument(span),
        );
        Ok(PoolTask::new(join))
    }

    async fn run<S, St, E>(
        self,
        events: E,
        pool: WeakPool<S, St>,
        mut versions: watch::Receiver<u64>,
    ) where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
        E: Stream<Item = Result<Event<EndpointSlice>, watcher::Error>> + Send,
    {
        let mut events = std::pin::pin!(events);
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                // `changed` fails once the pool (the sender) is gone; new versions just loop.
                () = async { while versions.changed().await.is_ok() {} } => None,
            };
            let changed = match event {
                None => {
                    tracing::debug!("pool dropped, Kubernetes discovery stops");
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %super::ErrorChain(&e), kept = slices.len(), "EndpointSlice watch failed; the pool keeps its endpoints");
                    false
                }
                Some(Ok(Event::Init)) => {
                    listing = Some(BTreeMap::new());
                    false
                }
                Some(Ok(Event::InitApply(slice))) => {
                    listing
                        .get_or_insert_default()
                        .insert(slice_name(&slice), slice);
                    false
                }
                Some(Ok(Event::InitDone)) => {
                    slices = listing.take().unwrap_or_default();
                    true
                }
                Some(Ok(Event::Apply(slice))) => {
                    slices.insert(slice_name(&slice), slice);
                    true
                }
                Some(Ok(Event::Delete(slice))) => {
                    slices.remove(&slice_name(&slice));
                    true
                }
            };
            if changed {
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let endpoints = self.endpoints(slices.values());
                tracing::info!(
                    slices = slices.len(),
                    ready = endpoints.iter().filter(|e| e.weight() > 0).count(),
                    draining = endpoints.iter().filter(|e| e.weight() == 0).count(),
                    "EndpointSlices changed"
                );
                pool.update(|c| c.replace_all(endpoints));
            }
        }
    }

    /// The endpoints `slices` describe: ready ones with weight 1, serving and terminating
    /// ones with weight 0 (draining), in address order.
    pub fn endpoints<'a>(
        &self,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Vec<Endpoint> {
        let mut out: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
        for slice in slices {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue;
            }
            let ports = slice.ports.as_deref().unwrap_or_default();
            let port = match &self.port {
                Some(name) => ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name.as_str())),
                None => ports.first(),
            };
            let Some(port) = port
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            if port == 0 {
                continue;
            }
            for ep in &slice.endpoints {
                let conditions = ep.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let weight = match (ready, serving && terminating) {
                    (true, _) => 1,
                    (false, true) => 0,
                    (false, false) => continue,
                };
                for address in &ep.addresses {
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        tracing::debug!(%address, "EndpointSlice address is not an IP address; skipped");
                        continue;
                    };
                    let addr = SocketAddr::new(ip, port);
                    if out.get(&addr).is_some_and(|e| e.weight() >= weight) {
                        continue;
                    }
                    let mut endpoint = Endpoint::from(addr).with_weight(weight);
                    if let Some(zone) = &ep.zone {
                        endpoint = endpoint.with_zone(zone.as_str());
                    }
                    out.insert(addr, endpoint);
                }
            }
        }
        out.into_values().collect()
    }
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// A namespace, Service or port name: 1 to 63 lowercase letters, digits and `-`, starting and
/// ending with a letter or digit (RFC 1123 label), so it cannot smuggle a second selector.
fn check_name(what: &str, name: &str) -> Result<(), KubeError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(KubeError::config(format!(
            "{what} {name:?} is not a Kubernetes name (1 to 63 of a-z, 0-9 and '-')"
        )))
    }
}

/// Why Kubernetes discovery could not start.
///
/// Asked about with `is_*` methods; an inferred client's failure is its
/// [`source`](StdError::source).
pub struct KubeError {
    detail: String,
    source: Option<kube::Error>,
}

impl KubeError {
    fn config(detail: impl Into<String>) -> Self {
        KubeError {
            detail: detail.into(),
            source: None,
        }
    }

    fn with_source(mut self, source: kube::Error) -> Self {
        self.source = Some(source);
        self
    }

    /// Whether the settings were unusable: a name that is not a Kubernetes name, or no
    /// client given and none inferred. (The only kind so far: once started, the discovery
    /// logs watch failures and keeps the last endpoints.)
    pub fn is_config(&self) -> bool {
        true
    }
}

impl fmt::Debug for KubeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeError")
            .field("detail", &self.detail)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for KubeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kubernetes discovery: {}", self.detail)
    }
}

impl StdError for KubeError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };

    fn slice(ports: &[(&str, i32)], endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|&(name, port)| EndpointPort {
                        name: Some(name.into()),
                        port: Some(port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn ep(
        ip: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            zone: Some("z".into()),
            ..Default::default()
        }
    }

    #[test]
    fn conditions_ports_and_duplicates() {
        let d = KubeDiscovery::new("default", "web").port_name("http");
        let a = slice(
            &[("metrics", 9090), ("http", 8080)],
            vec![
                ep("10.0.0.1", Some(true), None, None),
                ep("10.0.0.2", Some(false), Some(true), Some(true)),
                ep("10.0.0.3", Some(false), Some(false), Some(true)),
                ep("10.0.0.4", None, None, None),
                ep("not-an-ip", Some(true), None, None),
            ],
        );
        // The same address draining in one slice and ready in another: ready.
        let b = slice(
            &[("http", 8080)],
            vec![ep("10.0.0.2", Some(true), None, None)],
        );
        // No port of that name, a port out of range: skipped.
        let c = slice(
            &[("grpc", 8081)],
            vec![ep("10.0.0.9", Some(true), None, None)],
        );
        let e = slice(
            &[("http", 70_000)],
            vec![ep("10.0.0.8", Some(true), None, None)],
        );
        let got = d.endpoints([&a, &c, &e]);
        let view: Vec<_> = got
            .iter()
            .map(|e| (e.id().to_string(), e.weight(), e.zone()))
            .collect();
        assert_eq!(
            view,
            [
                ("10.0.0.1:8080".to_owned(), 1, Some("z")),
                ("10.0.0.2:8080".to_owned(), 0, Some("z")),
                ("10.0.0.4:8080".to_owned(), 1, Some("z")),
            ]
        );
        let got = d.endpoints([&a, &b]);
        assert_eq!(got[1].weight(), 1);
        // Without a port name: the first port.
        let got = KubeDiscovery::new("default", "web").endpoints([&a]);
        assert_eq!(got[0].socket_addr().map(|a| a.port()), Some(9090));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "Web", "web,x=y", "-web", "web-", &"a".repeat(64)] {
            assert!(check_name("service", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("service", "web-2").is_ok());
    }
}
