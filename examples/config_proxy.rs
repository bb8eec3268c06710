//! A reverse proxy run from a configuration file, as operators run HAProxy or nginx: listeners
//! (plain and TLS), routes by host and path prefix, pools with their strategy, endpoints,
//! health check, outlier detection and limits; a JSON admin API on a separate local port; and
//! the file read again on `SIGHUP`, without dropping a connection.
//!
//! Run it (`examples/config_proxy.toml` balances over backends on ports 3001 to 3003; `--demo`
//! starts three demo backends there, or run your own servers, or change the file):
//!
//! ```text
//! cargo run --example config_proxy -- examples/config_proxy.toml --demo
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl -s http://127.0.0.1:8080/                    # balanced over the pool the route names
//! curl -s http://127.0.0.1:9000/status.json         # every endpoint: health, in flight, latency
//! curl -s -H 'content-type: application/json' \
//!      -d '{"pool": "web", "endpoint": "127.0.0.1:3002"}' http://127.0.0.1:9000/status/drain
//! curl -s -H 'content-type: application/json' \
//!      -d '{"pool": "web", "endpoint": "127.0.0.1:3002", "weight": 3}' \
//!      http://127.0.0.1:9000/status/weight             # also /status/undrain
//! kill -HUP $(pgrep -f 'target/debug/examples/config_proxy')   # after editing the file
//! ```
//!
//! The admin API is `lbkit::status::StatusPage` with its admin actions on: `GET /status.json`
//! lists every pool's endpoints (state, health, weight, in flight, requests, errors, latency
//! quantiles and EWMA, last health check), `POST /status/drain`, `/status/undrain` and
//! `/status/weight` take a JSON object (`pool`, `endpoint`, and `weight` for the last) and
//! answer with the endpoint's new weight; `/status` is the same as an HTML page with forms.
//! It listens on its own port (`[admin] listen`): keep that on loopback or a management network.
//!
//! The file (see `examples/config_proxy.toml` for every key):
//!
//! - `[[listeners]]`: `listen = "ADDR"`, and `tls = { cert = "chain.pem", key = "key.pem" }`
//!   to terminate TLS there (paths relative to the file; the files are read again on reload,
//!   so a renewed certificate is served from the next handshake on);
//! - `[admin]`: `listen = "127.0.0.1:9000"` (optional);
//! - `[[routes]]`: `host`, `path` (a prefix) and the `pool` that gets what they match, tried
//!   in order; with a single pool, routes may be left out (everything goes there). Requests
//!   that match no route get `404`;
//! - `[pools.NAME]`: `strategy` (`round_robin`, `random`, `least_connections`, `p2c`,
//!   `peak_ewma`, `maglev`, `ring`), `endpoints` (`"ADDR"` or `{ addr, id, weight, tier }`),
//!   `check` (`kind = "http" | "grpc" | "tcp"`, `path`, `interval`, `timeout`, `rise`, `fall`),
//!   `outlier` (`consecutive_failures`, `base_ejection_time`, `failure_percentage`, ...),
//!   `limits` (`max_requests_per_endpoint`, `queue_size`, `queue_timeout`, `panic_threshold`);
//! - `[retry_budget]`: `ttl`, `min_per_sec`, `retry_percent` (each pool has its own budget).
//!
//! Durations are written `"250ms"`, `"5s"`, `"1m 30s"`. The settings types are the library's
//! (`lbkit::config`, feature `serde`); a bad file is refused with the key and line at fault.
//!
//! On `SIGHUP` the file is read again. If it is invalid, the error is logged and the proxy
//! goes on with what it had. Otherwise each pool's endpoints are brought to the file's,
//! through the pool's live handle (`Pool::update`): new endpoints get traffic from the next
//! request, removed ones get no new requests and their requests in flight finish, changed
//! weights apply at once (undoing a drain or re-weight made through the admin API, as a reload
//! of HAProxy undoes its runtime API), and so do a pool's `max_requests_per_endpoint` and
//! `panic_threshold`. Client connections, idle or busy, are not touched. A change to the
//! listeners, the admin port, the routes, the set of pools, a pool's strategy, check, outlier
//! detection or queue (`queue_size`, `queue_timeout`), or the retry budget is not applied: the
//! log says which parts need a restart.
//!
//! The stack per pool and listener, outermost first: `Server` (HTTP/1.1 and h2c, or TLS with
//! ALPN) → `Routes` → `ErrorResponseLayer` (502/503/504) → `FailoverLayer` (idempotent
//! requests retried on another endpoint within the budget) → `BalancerLayer` over the pool
//! (health checks, outlier detection) → `Forward`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use lbkit::balance::Target;
use lbkit::config::{CheckConfig, OutlierConfig, PoolLimits, RetryBudgetConfig};
use lbkit::failover::{FailoverLayer, ReplayBody};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::route::{Match, Routes};
use lbkit::server::tls::{CertStore, TlsConfig};
use lbkit::server::{RequestBody, Server};
use lbkit::status::StatusPage;
use lbkit::strategy::{AnyStrategy, Strategy};
use lbkit::{BalancerLayer, BoxError, Endpoint, Pool};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tracing_subscriber::EnvFilter;

mod demo;

/// The configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect (at least one).
    pub listeners: Vec<Listener>,
    /// The admin API's local port.
    pub admin: Option<Admin>,
    /// Which pool gets which requests, tried in order.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The pools, by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// The retry budget of each pool's failover layer.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// The address to bind.
    pub listen: SocketAddr,
    /// TLS termination, if any.
    pub tls: Option<TlsFiles>,
}

/// A certificate chain and its key, as PEM files.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The chain (leaf first), relative to the configuration file.
    pub cert: PathBuf,
    /// The private key, relative to the configuration file.
    pub key: PathBuf,
}

/// The admin API.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// The address to bind (keep it local).
    pub listen: SocketAddr,
}

/// One route.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The `Host` matched (any when left out).
    pub host: Option<String>,
    /// The path prefix matched (any when left out).
    pub path: Option<String>,
    /// The pool that gets what the route matches.
    pub pool: String,
}

/// One pool.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The strategy (default round robin).
    #[serde(default = "round_robin")]
    pub strategy: AnyStrategy,
    /// The endpoints, each with a socket address.
    pub endpoints: Vec<Endpoint>,
    /// The active health check (none when left out).
    pub check: Option<CheckConfig>,
    /// Passive outlier detection (none when left out).
    pub outlier: Option<OutlierConfig>,
    /// Limits on requests in flight and queued.
    #[serde(default)]
    pub limits: PoolLimits,
}

fn round_robin() -> AnyStrategy {
    AnyStrategy::RoundRobin(lbkit::strategy::RoundRobin::new())
}

impl PoolConfig {
    /// Whether what a reload cannot change differs: the strategy, check, outlier detection
    /// and the queue's limits (the endpoints, the limit per endpoint and the panic threshold
    /// apply at once).
    fn settings_differ(&self, other: &PoolConfig) -> bool {
        self.strategy.name() != other.strategy.name()
            || self.check != other.check
            || self.outlier != other.outlier
            || self.limits.queue_size != other.limits.queue_size
            || self.limits.queue_timeout != other.limits.queue_timeout
    }
}

/// Why a configuration file was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read(PathBuf, std::io::Error),
    /// The file is not valid TOML for this format (the error names the key and line).
    Parse(PathBuf, toml::de::Error),
    /// A value that parses but cannot be used: the key at fault and why.
    Invalid {
        /// The key, such as `pools.web.endpoints[1]`.
        key: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            ConfigError::Parse(path, e) => write!(f, "{}: {e}", path.display()),
            ConfigError::Invalid { key, reason } => write!(f, "{key}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Reads and checks the file at `path`; TLS paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for l in &mut config.listeners {
            if let Some(tls) = &mut l.tls {
                tls.cert = dir.join(&tls.cert);
                tls.key = dir.join(&tls.key);
            }
        }
        config.check()?;
        Ok(config)
    }

    /// What serde cannot check: references between sections, addresses, check kinds.
    fn check(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is needed"));
        }
        if self.pools.is_empty() {
            return Err(invalid("pools", "at least one pool is needed"));
        }
        if self.routes.is_empty() && self.pools.len() > 1 {
            return Err(invalid(
                "routes",
                "with more than one pool, routes must say which requests go where",
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !self.pools.contains_key(&route.pool) {
                let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
                return Err(invalid(
                    format!("routes[{i}].pool"),
                    format!(
                        "no pool named {:?} (pools: {})",
                        route.pool,
                        known.join(", ")
                    ),
                ));
            }
            if let Some(path) = &route.path {
                if !path.starts_with('/') {
                    return Err(invalid(format!("routes[{i}].path"), "must start with /"));
                }
            }
        }
        for (name, pool) in &self.pools {
            let mut seen = std::collections::HashSet::new();
            for (i, e) in pool.endpoints.iter().enumerate() {
                let key = || format!("pools.{name}.endpoints[{i}]");
                if e.socket_addr().is_none() {
                    return Err(invalid(
                        key(),
                        format!(
                            "{:?} has no socket address (write IP:PORT)",
                            e.id().as_str()
                        ),
                    ));
                }
                if !seen.insert(e.id().clone()) {
                    return Err(invalid(key(), format!("{} is listed twice", e.id())));
                }
            }
            if let Some(check) = &pool.check {
                check.checker().map_err(|e| {
                    invalid(format!("pools.{name}.check.{}", e.field()), e.reason())
                })?;
            }
        }
        Ok(())
    }
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Endpoints added, over all pools.
    pub added: usize,
    /// Endpoints removed (they finish their requests in flight).
    pub removed: usize,
    /// Parts of the file that changed but need a restart to apply.
    pub restart_needed: Vec<String>,
}

/// A running proxy: its pools, listeners and admin API. Dropping it stops them.
pub struct ConfigProxy {
    path: PathBuf,
    /// The configuration in force (the file's endpoints, the rest as at start).
    config: Mutex<Config>,
    pools: BTreeMap<String, Pool<Target, AnyStrategy>>,
    certs: Vec<CertStore>,
    listen_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    /// Reloads attempted so far, applied or refused.
    reloads: AtomicU64,
    _servers: Servers,
}

/// The servers' tasks, stopped when dropped (also when `start` fails half-way).
#[derive(Default)]
struct Servers(Vec<JoinHandle<()>>);

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl ConfigProxy {
    /// Loads the file at `path`, builds the pools, binds the listeners and the admin port and
    /// starts serving (on the current tokio runtime).
    pub async fn start(path: impl Into<PathBuf>) -> Result<ConfigProxy, BoxError> {
        let path = path.into();
        let config = Config::load(&path)?;
        let mut pools = BTreeMap::new();
        let mut budgets = BTreeMap::new();
        for (name, pc) in &config.pools {
            let pool = Pool::builder(pc.strategy)
                .limits(&pc.limits)
                .build(Target::new);
            pool.extend(pc.endpoints.iter().cloned());
            if let Some(check) = &pc.check {
                check.checker()?.spawn(&pool);
            }
            if let Some(outlier) = &pc.outlier {
                outlier.detector().spawn(&pool);
            }
            budgets.insert(name.clone(), Arc::new(config.retry_budget.budget()));
            pools.insert(name.clone(), pool);
        }

        // The router of one listener: each route to its pool's stack (`proto` is the scheme
        // the clients use, for `X-Forwarded-Proto`).
        let routes = |proto: &'static str| {
            let forward = Forward::<ReplayBody<RequestBody>>::new()
                .timeout(Duration::from_secs(10))
                .proto(proto);
            let stack = |name: &str| {
                ServiceBuilder::new()
                    .layer(ErrorResponseLayer::new())
                    // Keep the request body so that a failed attempt can be sent again.
                    .map_request(|req: Request<RequestBody>| req.map(ReplayBody::new))
                    .layer(
                        FailoverLayer::new(budgets[name].clone())
                            .per_try_timeout(Duration::from_secs(10))
                            .deadline(Duration::from_secs(30)),
                    )
                    .layer(BalancerLayer::from_pool(pools[name].clone()))
                    .service(forward.clone())
            };
            match config.pools.keys().next() {
                Some(only) if config.routes.is_empty() => Routes::new().fallback(stack(only)),
                _ => config.routes.iter().fold(Routes::new(), |routes, r| {
                    let mut m = Match::any();
                    if let Some(host) = &r.host {
                        m = m.host(host);
                    }
                    if let Some(path) = &r.path {
                        m = m.path_prefix(path.clone());
                    }
                    routes.route(m, stack(&r.pool))
                }),
            }
        };

        let mut tasks = Servers::default();
        let mut certs = Vec::new();
        let mut listen_addrs = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let listener = TcpListener::bind(l.listen)
                .await
                .map_err(|e| format!("listeners[{i}]: cannot listen on {}: {e}", l.listen))?;
            listen_addrs.push(listener.local_addr()?);
            let proto = if l.tls.is_some() { "https" } else { "http" };
            let server = Server::new(routes(proto));
            let task = match &l.tls {
                Some(files) => {
                    let store = CertStore::builder()
                        .default_cert(&files.cert, &files.key)
                        .build()
                        .map_err(|e| format!("listeners[{i}].tls: {e}"))?;
                    let tls = TlsConfig::new(store.clone()).build()?;
                    certs.push(store);
                    tokio::spawn(server.tls(tls).serve(listener))
                }
                None => tokio::spawn(server.serve(listener)),
            };
            tasks.0.push(task);
            tracing::info!(listen = %listen_addrs[i], tls = l.tls.is_some(), "listening");
        }

        let admin_addr = match &config.admin {
            Some(admin) => {
                let listener = TcpListener::bind(admin.listen)
                    .await
                    .map_err(|e| format!("admin: cannot listen on {}: {e}", admin.listen))?;
                let addr = listener.local_addr()?;
                let mut page = StatusPage::new().title("lbkit config_proxy").admin(true);
                for (name, pool) in &pools {
                    page = page.pool(name, pool);
                }
                let admin = tokio::spawn(Server::new(page).serve(listener));
                tasks.0.push(admin);
                tracing::info!(%addr, "admin API: GET /status.json, POST /status/{{drain,undrain,weight}}");
                Some(addr)
            }
            None => None,
        };

        Ok(ConfigProxy {
            path,
            config: Mutex::new(config),
            pools,
            certs,
            listen_addrs,
            admin_addr,
            reloads: AtomicU64::new(0),
            _servers: tasks,
        })
    }

    /// The addresses the listeners are bound to, in the file's order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// The admin API's address, if the file asks for one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool<Target, AnyStrategy>> {
        self.pools.get(name)
    }

    /// How many reloads were attempted so far (applied or refused).
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::SeqCst)
    }

    /// Reads the file again and applies it (what `SIGHUP` does): each pool's endpoints become
    /// the file's; certificates are read again. An invalid file changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let result = Config::load(&self.path).map(|new| self.apply(new));
        self.reloads.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn apply(&self, new: Config) -> Reloaded {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = Reloaded::default();
        let mut restart = |part: &str| report.restart_needed.push(part.to_owned());
        if new.listeners != current.listeners {
            restart("listeners");
        }
        if new.admin != current.admin {
            restart("admin");
        }
        if new.routes != current.routes {
            restart("routes");
        }
        if new.retry_budget != current.retry_budget {
            restart("retry_budget");
        }
        for name in new.pools.keys().filter(|n| !current.pools.contains_key(*n)) {
            restart(&format!("pools.{name} (new pool)"));
        }
        for name in current.pools.keys().filter(|n| !new.pools.contains_key(*n)) {
            restart(&format!("pools.{name} (removed pool)"));
        }
        for (name, pc) in &new.pools {
            let (Some(old), Some(pool)) = (current.pools.get_mut(name), self.pools.get(name))
            else {
                continue;
            };
            if pc.settings_differ(old) {
                restart(&format!(
                    "pools.{name} (strategy, check, outlier or queue limits)"
                ));
            }
            if pc.limits.max_requests_per_endpoint != old.limits.max_requests_per_endpoint {
                pool.set_max_requests_per_endpoint(pc.limits.max_requests_per_endpoint);
                old.limits.max_requests_per_endpoint = pc.limits.max_requests_per_endpoint;
            }
            if pc.limits.panic_threshold != old.limits.panic_threshold {
                pool.set_panic_threshold(pc.limits.panic_threshold);
                old.limits.panic_threshold = pc.limits.panic_threshold;
            }
            let before: std::collections::HashSet<_> =
                old.endpoints.iter().map(|e| e.id().clone()).collect();
            let after: std::collections::HashSet<_> =
                pc.endpoints.iter().map(|e| e.id().clone()).collect();
            report.added += after.difference(&before).count();
            report.removed += before.difference(&after).count();
            // One new snapshot per pool: removed endpoints drain, the others keep their state.
            pool.update(|c| c.replace_all(pc.endpoints.iter().cloned()));
            old.endpoints = pc.endpoints.clone();
        }
        for store in &self.certs {
            // A broken file keeps the certificate in use (and says so in the log).
            if let Err(e) = store.reload() {
                tracing::warn!(error = %e, "certificate not reloaded");
            }
        }
        if !report.restart_needed.is_empty() {
            tracing::warn!(
                parts = %report.restart_needed.join(", "),
                "changed in the file but not applied: restart the proxy for these"
            );
        }
        tracing::info!(
            added = report.added,
            removed = report.removed,
            "configuration reloaded"
        );
        report
    }

    /// Reloads the file on every `SIGHUP` until the proxy is dropped; an invalid file is
    /// logged and changes nothing. The handler is in place when this returns.
    pub fn reload_on_sighup(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = signal(SignalKind::hangup())?;
        let proxy = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(proxy) = proxy.upgrade() else { return };
                tracing::info!(file = %proxy.path.display(), "SIGHUP: reloading");
                if let Err(e) = proxy.reload() {
                    tracing::error!(error = %e, "configuration not reloaded: keeping the one in force");
                }
            }
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, demo) = match args.as_slice() {
        [path] => (path, false),
        [path, flag] if flag == "--demo" => (path, true),
        _ => {
            eprintln!("usage: config_proxy FILE.toml [--demo]   (see examples/config_proxy.toml)");
            std::process::exit(2);
        }
    };
    if demo {
        // The example file's backends: demo servers that say who they are.
        for port in 3001..=3003 {
            let listener = demo::listen(&format!("127.0.0.1:{port}")).await;
            let name = format!("backend-{port}");
            tokio::spawn(Server::new(demo::hello(&name, Duration::ZERO)).serve(listener));
        }
    }
    let proxy = match ConfigProxy::start(&path).await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("config_proxy: {e}");
            std::process::exit(1);
        }
    };
    let _hup = proxy.reload_on_sighup()?;
    for addr in proxy.listen_addrs() {
        println!("lbkit config_proxy on {addr}");
    }
    if let Some(admin) = proxy.admin_addr() {
        println!("admin API on http://{admin}/status.json");
    }
    println!("reload: kill -HUP {}", std::process::id());
    let _ = tokio::signal::ctrl_c().await;
    println!("bye");
    Ok(())
}
