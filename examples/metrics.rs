//! Serves lbkit's metrics in Prometheus text format (feature `metrics`), while a little
//! traffic flows through a balancer over three in-process endpoints: `a` answers in about
//! 10 ms, `b` in about 40 ms, and `c` fails one request in ten.
//!
//! ```text
//! cargo run --example metrics                 # runs for 10 s, or until Ctrl-C
//! cargo run --example metrics -- --seconds 60 --port 9187
//! cargo run --example metrics -- --failure-penalty 0   # failures do not weigh on c's cost
//! ```
//!
//! `GET /metrics` is an axum route, and the router is served by lbkit's own `Server` (a router
//! is a tower service). While it runs, try the `curl` command it prints: `lbkit_requests_total`,
//! `lbkit_errors_total`, `lbkit_latency_seconds` (a histogram), `lbkit_in_flight`,
//! `lbkit_endpoint_healthy` and the other series are labelled with `pool="demo"` and each
//! endpoint. Peak EWMA sends fewer requests to the slower `b`, and, as its failures weigh on
//! its cost (`PoolBuilder::failure_penalty`), fewer to `c` than its speed alone would earn it;
//! `c`'s errors count up. At the end the example prints the share of the requests `c` got and
//! the errors clients saw, the pool's statistics (`Pool::stats`) and the `lbkit_` lines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use lbkit::balance::CompleteOnResponse;
use lbkit::hash::mix64;
use lbkit::metrics::MetricsExporter;
use lbkit::server::Server;
use lbkit::strategy::PeakEwma;
use lbkit::{Balancer, BoxError, Endpoint, Pool};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tower::{service_fn, ServiceExt};

/// The sequence number of a request of the demo traffic.
#[derive(Clone, Copy)]
struct Seq(u64);

/// One in-process endpoint: answers with its name after a delay, or fails.
fn endpoint(
    ep: &Endpoint,
) -> impl tower::Service<
    http::Request<()>,
    Response = String,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<String, BoxError>> + Send,
> + Clone {
    let name = ep.id().to_string();
    service_fn(move |req: http::Request<()>| {
        let name = name.clone();
        // A pseudo-random number per request, from its sequence number.
        let r = mix64(req.extensions().get::<Seq>().map_or(0, |s| s.0));
        async move {
            let base = if name == "b" { 40 } else { 10 };
            tokio::time::sleep(Duration::from_millis(base / 2 + r % base)).await;
            if name == "c" && r.is_multiple_of(10) {
                return Err(BoxError::from("c failed"));
            }
            Ok(name)
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut seconds = 10u64;
    let mut port = 0u16;
    let mut penalty = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--seconds" => seconds = value.parse()?,
            "--port" => port = value.parse()?,
            "--failure-penalty" => penalty = Some(value.parse::<f64>()?),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }

    // The recorder first: metrics recorded before it is installed are lost. Buckets for the
    // latency make it a Prometheus histogram (aggregatable across instances) rather than a
    // summary.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("lbkit_latency_seconds".to_owned()),
            &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
        )?
        .install_recorder()?;

    let mut builder = Pool::builder(PeakEwma::new());
    if let Some(penalty) = penalty {
        builder = builder.failure_penalty(penalty);
    }
    let pool = builder.build(endpoint);
    pool.extend(["a", "b", "c"].map(Endpoint::from));
    // The endpoints answer plain strings, not HTTP responses: count until the answer arrives.
    let balancer = Balancer::from_pool(pool).with_completion(CompleteOnResponse);
    let export = MetricsExporter::new("demo").spawn(balancer.pool(), Duration::from_secs(1));

    // GET /metrics renders the recorder's state in Prometheus text format.
    let app = axum::Router::new().route(
        "/metrics",
        get({
            let prometheus = prometheus.clone();
            move || std::future::ready(prometheus.render())
        }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(Server::new(app).serve(listener));
    println!("serving metrics for {seconds} s (Ctrl-C to stop); try:");
    println!("  curl -s http://{addr}/metrics | grep '^lbkit_'");

    // About 100 requests a second, each on its own task.
    let failed = Arc::new(AtomicU64::new(0));
    let traffic = {
        let balancer = balancer.clone();
        let failed = failed.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0u64..u64::MAX {
                tick.tick().await;
                let mut req = http::Request::new(());
                req.extensions_mut().insert(Seq(i));
                let b = balancer.clone();
                let failed = failed.clone();
                tokio::spawn(async move {
                    // The balancer counts errors per endpoint; count what clients saw.
                    if b.oneshot(req).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    };
    tokio::select! {
        () = traffic => {}
        _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
        _ = tokio::signal::ctrl_c() => println!("interrupted"),
    }

    // Let the last requests end and the exporter run once more, so the final numbers are in
    // the text below.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    export.abort();
    let stats = balancer.pool().stats();
    println!(
        "\nPool::stats ({} requests, {} errors):",
        stats.requests(),
        stats.errors()
    );
    for e in &stats.endpoints {
        println!(
            "  {}: {} requests, {} errors, p50 {:?}, p99 {:?}, ewma {:?}",
            e.id, e.requests, e.errors, e.latency.p50, e.latency.p99, e.latency_ewma
        );
    }
    let to_c = stats
        .endpoints
        .iter()
        .find(|e| e.id == "c")
        .map_or(0, |e| e.requests);
    let failed = failed.load(Ordering::Relaxed);
    let percent = |n: u64| 100.0 * n as f64 / stats.requests().max(1) as f64;
    println!(
        "  c got {to_c} of {} requests ({:.1} %); clients saw {failed} errors ({:.1} %)",
        stats.requests(),
        percent(to_c),
        percent(failed)
    );
    println!("\nmetrics:");
    for line in prometheus.render().lines().filter(|l| {
        l.starts_with("lbkit_requests_total")
            || l.starts_with("lbkit_errors_total")
            || l.starts_with("lbkit_latency_seconds_count")
    }) {
        println!("  {line}");
    }
    Ok(())
}
