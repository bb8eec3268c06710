//! A balancing reverse proxy in front of three demo backends, all in one process.
//!
//! Run it:
//!
//! ```text
//! cargo run --example reverse_proxy
//! cargo run --example reverse_proxy -- --strategy p2c --listen 127.0.0.1:9000
//! ```
//!
//! Then try, from another terminal:
//!
//! ```text
//! for i in 1 2 3 4 5 6; do curl -s http://127.0.0.1:8080/; done   # answers rotate over the backends
//! curl -si http://127.0.0.1:8080/headers                           # what a backend sees: X-Forwarded-*
//! ```
//!
//! Backend 1 has weight 2, so with the default smooth weighted round robin it answers half of
//! the requests, interleaved with the others. Strategies: round_robin, random,
//! least_connections, p2c, peak_ewma, maglev, ring. Every backend is health-checked
//! (`GET /` each second) and watched by outlier detection. Stop with Ctrl-C.
//!
//! Other flags: `--backends 127.0.0.1:9001,127.0.0.1:9002` balances over backends of your
//! own instead of the demo ones (the end-to-end benchmark, `benches/e2e/compare.sh`, uses it),
//! and `--threads N` sets the runtime's worker threads (default: one per core).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use lbkit::balance::RouteToEndpoint;
use lbkit::health::{HealthChecker, HttpCheck, OutlierDetection};
use lbkit::proxy::{ClientAddr, ErrorResponseLayer, Forward};
use lbkit::strategy::AnyStrategy;
use lbkit::{Balancer, Endpoint};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// A proxy allocates small, short-lived buffers and header maps per request; mimalloc serves
// those faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    strategy: AnyStrategy,
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    threads: Option<usize>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        strategy: "round_robin".parse()?,
        listen: "127.0.0.1:8080".parse()?,
        backends: Vec::new(),
        threads: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        match (arg.as_str(), argv.next()) {
            ("--strategy", Some(v)) => args.strategy = v.parse()?,
            ("--listen", Some(v)) => args.listen = v.parse()?,
            ("--threads", Some(v)) => args.threads = Some(v.parse()?),
            ("--backends", Some(v)) => {
                for addr in v.split(',').filter(|a| !a.is_empty()) {
                    args.backends.push(addr.parse()?);
                }
            }
            _ => {
                eprintln!(
                    "usage: reverse_proxy [--strategy NAME] [--listen ADDR] \
                     [--backends ADDR,ADDR,...] [--threads N]"
                );
                std::process::exit(2);
            }
        }
    }
    Ok(args)
}

fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = parse_args()?;
    // One thread: a current-thread runtime, one event loop like one nginx worker. More: a
    // work-stealing runtime with that many workers.
    let mut runtime = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let Args {
        strategy,
        listen,
        backends,
        ..
    } = args;

    let mut endpoints = Vec::new();
    if backends.is_empty() {
        // Three demo backends on ports the OS picks.
        for n in 1..=3 {
            let addr = spawn_backend(n).await?;
            let weight = if n == 1 { 2 } else { 1 };
            endpoints.push(Endpoint::from(addr).with_weight(weight));
            tracing::info!(backend = n, %addr, weight, "demo backend listening");
        }
    } else {
        endpoints.extend(backends.iter().copied().map(Endpoint::from));
    }
    let backend_count = endpoints.len();

    // Each endpoint's service is the shared forwarding client, routed to that endpoint.
    let forward = Forward::<Incoming>::new()
        .timeout(Duration::from_secs(10))
        .hide_response_header(http::header::SERVER);
    let balancer = Balancer::new(endpoints, strategy, move |ep: &Endpoint| {
        RouteToEndpoint::new(forward.clone(), ep)
    })
    .http();
    // Active checks find a stopped backend; outlier detection one that answers 5xx.
    HealthChecker::new(HttpCheck::get("/"))
        .interval(Duration::from_secs(1))
        .spawn(balancer.pool());
    OutlierDetection::new().spawn(balancer.pool());
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .service(balancer);

    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e} (choose another with --listen ADDR)");
            std::process::exit(1);
        }
    };
    let strategy_name = lbkit::strategy::Strategy::name(&strategy);
    println!("lbkit proxy on http://{listen} ({strategy_name}) over {backend_count} backends");
    println!("try: for i in 1 2 3 4 5 6; do curl -s http://{listen}/; done");

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ClientAddr(peer));
                req
            })
            .service(proxy.clone());
        tokio::spawn(async move {
            let conn = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = conn
                .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
                .await
            {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    println!("bye");
    Ok(())
}

/// A demo backend that says who it is and echoes the headers it received at `/headers`.
async fn spawn_backend(n: usize) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let body = if req.uri().path() == "/headers" {
                    let mut text = format!("backend-{n} received:\n");
                    for (name, value) in req.headers() {
                        text.push_str(&format!("  {name}: {}\n", value.to_str().unwrap_or("?")));
                    }
                    text
                } else {
                    format!("hello from backend-{n}: {} {}\n", req.method(), req.uri())
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
