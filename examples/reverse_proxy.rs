//! A balancing reverse proxy in front of three demo backends, all in one process: the full
//! stack users copy, every piece from the library.
//!
//! Run it:
//!
//! ```text
//! cargo run --example reverse_proxy
//! cargo run --example reverse_proxy -- --strategy p2c --listen 127.0.0.1:9000
//! cargo run --example reverse_proxy -- --sticky                # affinity cookie `lb`
//! cargo run --example reverse_proxy -- --strategy maglev --hash-header x-user
//! cargo run --example reverse_proxy -- --cache 64               # 64 MiB response cache
//! cargo run --example reverse_proxy -- --status 127.0.0.1:9000  # status page on a local port
//! ```
//!
//! Then try, from another terminal:
//!
//! ```text
//! for i in 1 2 3 4 5 6; do curl -s http://127.0.0.1:8080/; done   # answers rotate over the backends
//! curl -si http://127.0.0.1:8080/headers                           # what a backend sees: X-Forwarded-*
//! ```
//!
//! With `--status 127.0.0.1:9000`, open <http://127.0.0.1:9000/status> in a browser: every
//! backend with its state, weight, traffic, latency and last health check, reloaded every
//! 5 s, with drain / undrain / weight buttons (`lbkit::status::StatusPage`); the same as JSON
//! at `/status.json`. It listens on its own port, not the proxy's public one: keep it on
//! loopback or a management network.
//!
//! The stack, outermost first:
//!
//! - `Server`: HTTP/1.1 and HTTP/2 (h2c), header-read and idle timeouts, a connection limit,
//!   accept errors (such as running out of file descriptors) waited out, graceful shutdown on
//!   Ctrl-C;
//! - `--compress`: tower-http's `CompressionLayer` (gzip) for clients that accept it, unless
//!   the backend already encoded the response;
//! - `ErrorResponseLayer`: failures become 502/503/504 with a short body;
//! - `--cache MiB` (`CacheLayer`): a shared response cache of that many MiB (RFC 9111:
//!   `Cache-Control`, `Vary`, revalidation with `ETag`/`Last-Modified`), concurrent misses for
//!   one URL coalesced into one backend request; off by default;
//! - `FailoverLayer`: a failed idempotent request (connection refused, reset, any 5xx,
//!   per-try timeout) is sent again to another backend, and so is any request (a `POST`, a
//!   gRPC call) whose connection was refused, after a short jittered back-off and within a
//!   retry budget, so a backend that dies under load costs no client a failed request;
//! - `--sticky` (`StickyLayer`) or `--hash-header NAME` (`HashKeyLayer`, for `maglev`/`ring`);
//! - `BalancerLayer`: the strategy picks a backend from a pool that is health-checked every
//!   second and watched by outlier detection (which counts 5xx answers and gRPC calls ending
//!   in `UNAVAILABLE`, `DEADLINE_EXCEEDED` or `INTERNAL`). The check fits the backend: by
//!   default `GET /` over HTTP/1.1, or over h2c for a backend found to speak only HTTP/2 (a
//!   gRPC server, up when it answers as one), so gRPC backends work with no flag; a TCP
//!   connect with `--upstream h2`, as HAProxy's `proto h2` servers get. `--check
//!   http:/healthz` sends `GET /healthz` (over HTTP/2 with `--upstream h2`), `--check grpc`
//!   (or `grpc:SERVICE`)
//!   asks a gRPC server's `grpc.health.v1` service (`SERVING` is up), `--check tcp` suits a
//!   backend that answers no plain GET, such as a WebSocket-only server; each backend takes at
//!   most `--max-requests-per-backend` requests at once (default 256), the others wait in a
//!   queue of `--queue N` (default 1024) for up to `--queue-timeout-ms` (default 5000) and get
//!   a 503 beyond it;
//! - `Forward`: the request goes to the picked backend over pooled keep-alive connections, at
//!   most `--max-conns-per-backend` per backend (default 256) with a 5 s connect timeout:
//!   HTTP/1.1 by default (any backend speaks it; one that answers in HTTP/2, an HTTP/2-only
//!   server, gets HTTP/2 from then on), HTTP/2 (h2c) for every request with
//!   `--upstream h2`, or the client's own protocol with `--upstream same` (for backends that
//!   speak both); gRPC calls always go over HTTP/2. A gRPC call that fails in the proxy is
//!   answered as gRPC (`grpc-status` 14 `UNAVAILABLE`, 4 `DEADLINE_EXCEEDED`), and its
//!   `grpc-timeout` bounds the wait for the backend.
//!
//! gRPC through the proxy, to three gRPC servers: `--backends A,B,C --check grpc`, then point
//! the gRPC client at `http://127.0.0.1:8080` (h2c).
//!
//! Backend 1 has weight 2, so with the default smooth weighted round robin it answers half of
//! the requests, interleaved with the others. Strategies: round_robin, random,
//! least_connections, p2c, peak_ewma, maglev, ring.
//!
//! Other flags: `--backends 127.0.0.1:9001,127.0.0.1:9002` balances over backends of your
//! own instead of the demo ones (the end-to-end benchmark, `benches/e2e/compare.sh`, uses it),
//! `--threads N` serves on N worker threads, each with its own event loop (`Server::workers`,
//! nginx's layout; default: one per core) and, on Linux, its own `SO_REUSEPORT` listener on
//! the address (`server::bind_reuse_port`),
//! `--trust-proxy CIDR,...` believes the forwarding headers (`X-Forwarded-For`, ...) of proxies
//! in front, and `--proxy-protocol CIDR,...` takes the client's address from the PROXY protocol
//! header (v1 or v2) of the L4 balancers in front (AWS NLB, HAProxy in TCP mode), refusing
//! connections from any other peer, and `--backend-ca FILE` speaks TLS to the backends,
//! trusting the CA certificates in FILE and checking each backend's certificate against its
//! address, or against `--backend-name NAME` (the health check is then a TCP connect unless
//! `--check` says otherwise).

pub mod demo;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use http::Request;
use lbkit::balance::Target;
use lbkit::cache::CacheLayer;
use lbkit::failover::{FailoverLayer, ReplayBody, RetryBudget};
use lbkit::forwarded::Cidr;
use lbkit::health::{GrpcCheck, HealthCheck, HealthChecker, HttpCheck, OutlierDetection, TcpCheck};
use lbkit::key::HashKeyLayer;
use lbkit::proxy::{ErrorResponseLayer, Forward, UpstreamProtocol, UpstreamTls};
use lbkit::server::{ProxyProtocol, RequestBody, Server};
use lbkit::status::StatusPage;
use lbkit::sticky::{CookieSecret, StickyLayer};
use lbkit::strategy::AnyStrategy;
use lbkit::{BalancerLayer, BoxError, Endpoint, Pool};
use tokio::net::TcpListener;
use tower::{Layer, ServiceBuilder};
use tower_http::compression::CompressionLayer;
use tracing_subscriber::EnvFilter;

// A proxy allocates small, short-lived buffers and header maps per request; mimalloc serves
// those faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What the flags set (`tests/reverse_proxy.rs` runs this same proxy with shorter timers).
pub struct Args {
    pub strategy: AnyStrategy,
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    pub threads: Option<usize>,
    pub sticky: bool,
    pub hash_header: Option<String>,
    /// The active health check; `None`: `GET /` (any 2xx or 3xx) over HTTP/1.1, or over h2c
    /// to a backend that speaks only HTTP/2 (a gRPC server is up when it answers as one), or a
    /// TCP connect for `UpstreamProtocol::Http2`.
    pub check: Option<Check>,
    /// The protocol spoken to the backends (gRPC always goes over HTTP/2).
    pub upstream: UpstreamProtocol,
    /// Compress responses (gzip) for clients that accept it.
    pub compress: bool,
    /// Proxies in front of this one whose forwarding headers are believed (`--trust-proxy`).
    pub trusted_proxies: Vec<Cidr>,
    /// L4 balancers in front that send a PROXY protocol header (`--proxy-protocol`); empty: off.
    pub proxy_protocol: Vec<Cidr>,
    /// A response cache of this many MiB in front of the failover layer (`None`: no cache).
    pub cache_mib: Option<u64>,
    pub check_interval: Duration,
    pub ejection_time: Duration,
    /// Requests in flight to one backend at most (0: no limit).
    pub max_requests_per_backend: u64,
    /// Requests waiting for a backend under its limit at most, and for how long.
    pub queue: u64,
    pub queue_timeout: Duration,
    /// Connections open to one backend at most.
    pub max_conns_per_backend: usize,
    /// Where to serve the status page (`--status ADDR`, a local admin port; `None`: off).
    pub status: Option<SocketAddr>,
    /// TLS to the backends (`--backend-ca FILE`, `--backend-name NAME`); `None`: plain HTTP.
    pub backend_tls: Option<UpstreamTls>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            strategy: AnyStrategy::RoundRobin(lbkit::strategy::RoundRobin::new()),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            backends: Vec::new(),
            threads: None,
            sticky: false,
            hash_header: None,
            check: None,
            upstream: UpstreamProtocol::Http1,
            compress: false,
            trusted_proxies: Vec::new(),
            proxy_protocol: Vec::new(),
            cache_mib: None,
            check_interval: Duration::from_secs(1),
            ejection_time: Duration::from_secs(30),
            max_requests_per_backend: 256,
            queue: 1024,
            queue_timeout: Duration::from_secs(5),
            max_conns_per_backend: 256,
            status: None,
            backend_tls: None,
        }
    }
}

/// What the active health check asks (`--check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A TCP connect (`--check tcp`).
    Tcp,
    /// `GET PATH`, any 2xx or 3xx, in the upstream protocol (`--check http:/PATH`).
    Http(String),
    /// `grpc.health.v1.Health/Check` for a service (`""`: the server), `SERVING` is up
    /// (`--check grpc` or `--check grpc:SERVICE`).
    Grpc(String),
}

impl std::str::FromStr for Check {
    type Err = BoxError;

    fn from_str(v: &str) -> Result<Self, BoxError> {
        match v {
            "tcp" => Ok(Check::Tcp),
            "grpc" => Ok(Check::Grpc(String::new())),
            _ if v.starts_with("http:/") => Ok(Check::Http(v["http:".len()..].to_owned())),
            _ if v.starts_with("grpc:") => Ok(Check::Grpc(v["grpc:".len()..].to_owned())),
            _ => Err(format!("unknown check {v:?} (tcp, http:/PATH, grpc or grpc:SERVICE)").into()),
        }
    }
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args::default();
    let (mut backend_ca, mut backend_name) = (None, None);
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        if arg == "--sticky" || arg == "--compress" {
            args.sticky |= arg == "--sticky";
            args.compress |= arg == "--compress";
            continue;
        }
        match (arg.as_str(), argv.next()) {
            ("--strategy", Some(v)) => args.strategy = v.parse()?,
            ("--listen", Some(v)) => args.listen = v.parse()?,
            ("--threads", Some(v)) => args.threads = Some(v.parse()?),
            ("--hash-header", Some(v)) => args.hash_header = Some(v),
            ("--cache", Some(v)) => args.cache_mib = Some(v.parse()?),
            ("--check", Some(v)) => args.check = Some(v.parse()?),
            ("--upstream", Some(v)) => args.upstream = v.parse()?,
            ("--trust-proxy", Some(v)) => {
                for net in v.split(',').filter(|n| !n.is_empty()) {
                    args.trusted_proxies.push(net.parse()?);
                }
            }
            ("--proxy-protocol", Some(v)) => {
                for net in v.split(',').filter(|n| !n.is_empty()) {
                    args.proxy_protocol.push(net.parse()?);
                }
            }
            ("--max-requests-per-backend", Some(v)) => args.max_requests_per_backend = v.parse()?,
            ("--queue", Some(v)) => args.queue = v.parse()?,
            ("--queue-timeout-ms", Some(v)) => {
                args.queue_timeout = Duration::from_millis(v.parse()?)
            }
            ("--max-conns-per-backend", Some(v)) => args.max_conns_per_backend = v.parse()?,
            ("--status", Some(v)) => args.status = Some(v.parse()?),
            ("--backend-ca", Some(v)) => backend_ca = Some(v),
            ("--backend-name", Some(v)) => backend_name = Some(v),
            ("--backends", Some(v)) => {
                for addr in v.split(',').filter(|a| !a.is_empty()) {
                    args.backends.push(addr.parse()?);
                }
            }
            _ => {
                eprintln!(
                    "usage: reverse_proxy [--strategy NAME] [--listen ADDR] \
                     [--backends ADDR,ADDR,...] [--threads N] [--sticky] \
                     [--hash-header NAME] [--check tcp|http:/PATH|grpc[:SERVICE]] \
                     [--upstream http1|h2|same] [--compress] [--trust-proxy CIDR,CIDR,...] \
                     [--proxy-protocol CIDR,CIDR,...] \
                     [--max-requests-per-backend N] [--queue N] [--queue-timeout-ms MS] \
                     [--max-conns-per-backend N] [--cache MiB] [--status ADDR] \
                     [--backend-ca FILE [--backend-name NAME]]"
                );
                std::process::exit(2);
            }
        }
    }
    if let Some(ca) = backend_ca {
        let mut tls = UpstreamTls::builder().ca_file(ca);
        if let Some(name) = backend_name {
            tls = tls.server_name(name);
        }
        args.backend_tls = Some(tls.build()?);
    }
    Ok(args)
}

fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = parse_args()?;
    // The main thread runs a single-threaded runtime: the demo backends, health checks and
    // the other background tasks. The server serves on worker threads of its own, one event
    // loop each (see `serve`), unless `--threads 1` asks it to serve on this one.
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let mut endpoints = Vec::new();
    if args.backends.is_empty() {
        // Three demo backends on ports the OS picks.
        for n in 1..=3 {
            let addr = demo::backend(format!("backend-{n}")).await?;
            let weight = if n == 1 { 2 } else { 1 };
            endpoints.push(Endpoint::from(addr).with_weight(weight));
            tracing::info!(backend = n, %addr, weight, "demo backend listening");
        }
    } else {
        endpoints.extend(args.backends.iter().copied().map(Endpoint::from));
    }
    let backend_count = endpoints.len();
    let strategy_name = lbkit::strategy::Strategy::name(&args.strategy);

    // SO_REUSEPORT (Linux): each worker thread gets a listener of its own on the address.
    let listener = match lbkit::server::bind_reuse_port(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "cannot listen on {}: {e} (choose another with --listen ADDR)",
                args.listen
            );
            std::process::exit(1);
        }
    };
    let listen = listener.local_addr()?;
    println!("lbkit proxy on http://{listen} ({strategy_name}) over {backend_count} backends");
    println!("try: for i in 1 2 3 4 5 6; do curl -s http://{listen}/; done");

    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: finishing requests in flight");
    };
    // The status page: its own listener, bound before serving so a busy port is reported.
    let status = match args.status {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("cannot listen on {addr} for the status page: {e}");
                std::process::exit(1);
            }
        },
        None => None,
    };
    let (pool, serving) = proxy(endpoints, &args, listener, ctrl_c);
    if let Some(status) = status {
        println!("status page on http://{}/status", status.local_addr()?);
        tokio::spawn(status_page(&pool, status));
    }
    serving.await;
    println!("bye");
    Ok(())
}

/// The proxy over `endpoints`, served on `listener` until `shutdown` resolves: the pool (to
/// watch or change while it serves) and the future that serves.
pub fn proxy(
    endpoints: Vec<Endpoint>,
    args: &Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Pool<Target, AnyStrategy>, impl Future<Output = ()> + Send) {
    // The pool behind the balancer: active checks find a stopped backend, outlier detection
    // one that fails requests. Both stop when the pool is dropped. Each backend takes a
    // bounded number of requests at once; the others queue, briefly.
    let pool = Pool::builder(args.strategy)
        .max_requests_per_endpoint(args.max_requests_per_backend)
        .queue_size(args.queue)
        .queue_timeout(args.queue_timeout)
        .build(Target::new);
    pool.extend(endpoints);
    let balancer = BalancerLayer::from_pool(pool);
    // The check fits the backends: an HTTP check finds out which backends speak only HTTP/2
    // (they answer an HTTP/1.1 probe with a protocol error) and asks them over h2c, where a
    // gRPC server answering a plain GET as gRPC servers do is up. Backends the proxy speaks
    // HTTP/2 to get a TCP check by default, as HAProxy's `proto h2` servers do, and an HTTP
    // check in HTTP/2.
    let http2 = args.upstream == UpstreamProtocol::Http2;
    // The HTTP and gRPC checks speak no TLS: TLS backends get a TCP check by default.
    let check: Box<dyn HealthCheck> = match &args.check {
        None if http2 || args.backend_tls.is_some() => Box::new(TcpCheck::new()),
        None => Box::new(HttpCheck::get("/")),
        Some(Check::Http(path)) if http2 => Box::new(HttpCheck::get(path).http2(true)),
        Some(Check::Http(path)) => Box::new(HttpCheck::get(path)),
        Some(Check::Grpc(service)) => Box::new(GrpcCheck::new().service(service)),
        Some(Check::Tcp) => Box::new(TcpCheck::new()),
    };
    HealthChecker::new(check)
        .interval(args.check_interval)
        .spawn(balancer.pool());
    let mut forward = Forward::<ReplayBody<RequestBody>>::new();
    if let Some(tls) = &args.backend_tls {
        forward = forward.tls(tls.clone());
    }
    let forward = forward
        .upstream(args.upstream)
        .max_connections_per_endpoint(args.max_conns_per_backend)
        .timeout(Duration::from_secs(10))
        .hide_response_header(http::header::SERVER)
        .trusted_proxies(args.trusted_proxies.iter().copied());
    OutlierDetection::new()
        .base_ejection_time(args.ejection_time)
        .spawn(balancer.pool());
    let pool = balancer.pool().clone();

    let balanced = ServiceBuilder::new()
        // Keep the request body so that a failed attempt can be sent again (bodies that
        // stream are sent once and never retried).
        .map_request(|req: Request<RequestBody>| req.map(ReplayBody::new))
        .layer(
            FailoverLayer::new(RetryBudget::default())
                .per_try_timeout(Duration::from_secs(10))
                .deadline(Duration::from_secs(30)),
        )
        .option_layer(
            args.sticky
                .then(|| StickyLayer::cookie("lb", CookieSecret::generate())),
        )
        .option_layer(args.hash_header.as_deref().map(HashKeyLayer::header))
        .layer(balancer)
        .service(forward);
    // The cache answers hits before any pick and its misses get the failover's retries; it
    // changes the response body type, so the stack is built with or without it.
    let serving = match args.cache_mib {
        Some(mib) => {
            let cached = CacheLayer::new(mib.saturating_mul(1 << 20)).layer(balanced);
            serve(cached, args, listener, shutdown)
        }
        None => serve(balanced, args, listener, shutdown),
    };
    (pool, serving)
}

/// Serves the status page of the proxy's `pool` on `listener` (`--status`), with the admin
/// actions on: drain, undrain and weight by form. Its own listener, never the proxy's: bind
/// it to loopback or a management network.
pub fn status_page(
    pool: &Pool<Target, AnyStrategy>,
    listener: TcpListener,
) -> impl Future<Output = ()> + Send + 'static {
    let page = StatusPage::new()
        .title("lbkit reverse_proxy")
        .pool("backends", pool)
        .admin(true);
    Server::new(page).serve(listener)
}

/// Serves `proxy` behind `ErrorResponseLayer` on `listener` until `shutdown` (then 10 s of
/// grace), reading PROXY protocol headers when asked. Compression wraps the stack only when
/// asked: tower-http's layer costs CPU on every response even when its predicate says no.
fn serve<S, B>(
    proxy: S,
    args: &Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    S: tower::Service<Request<RequestBody>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let proxy = ErrorResponseLayer::new().layer(proxy);
    let grace = Duration::from_secs(10);
    let proxy_protocol = (!args.proxy_protocol.is_empty())
        .then(|| ProxyProtocol::trusting(args.proxy_protocol.iter().copied()));
    // One event loop per worker thread, each serving the connections it accepted.
    let workers = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    fn with_proxy_protocol<S>(server: Server<S>, pp: &Option<ProxyProtocol>) -> Server<S> {
        match pp {
            Some(pp) => server.proxy_protocol(pp.clone()),
            None => server,
        }
    }
    if args.compress {
        let compressed = CompressionLayer::new().layer(proxy);
        Box::pin(
            with_proxy_protocol(Server::new(compressed).workers(workers), &proxy_protocol)
                .serve_with_shutdown(listener, shutdown, grace),
        )
    } else {
        Box::pin(
            with_proxy_protocol(Server::new(proxy).workers(workers), &proxy_protocol)
                .serve_with_shutdown(listener, shutdown, grace),
        )
    }
}
