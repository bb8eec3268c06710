//! Health checks at work: three local backends, one of which stops and comes back.
//!
//! ```text
//! cargo run --example health_checks
//! RUST_LOG=lbkit=debug cargo run --example health_checks   # every failed check too
//! ```
//!
//! What to watch (the example exits by itself after about 13 s):
//!
//! - a few times a second a request goes through the balancer; each second a line says how
//!   the last second's requests were spread over the backends;
//! - at 3 s backend `b` stops: the requests that land on it fail until lbkit takes it out,
//!   with a `WARN` event and the reason: outlier detection after five failures in a row
//!   ("endpoint ejected by outlier detection"), or the health check within `fall × interval`
//!   (2 × 500 ms; "endpoint marked down by health check", connection refused), whichever
//!   comes first; from then on `b` gets no requests and none fails (a retry layer would hide
//!   the few failures in between);
//! - at 7 s `b` starts again: after `rise` (2) checks at the faster `down_interval`, an `INFO`
//!   "endpoint up" (and, if it was ejected, "endpoint returned from ejection"), then slow start
//!   ramps `b` from a tenth of its share to all of it over 3 s: watch its count per second
//!   climb;
//! - the health events are also printed as the subscription API sees them (`event: ...`).
//!
//! The backends are the shared demo ones (`examples/demo`; `/health` answers `ok`), each
//! served by lbkit's `Server` in a task of its own: stopping a backend aborts its task, which
//! closes its listener and connections, and starting it again serves on the same port.

mod demo;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::health::{HealthChecker, HttpCheck, OutlierDetection, SlowStart};
use lbkit::hints::PickHints;
use lbkit::server::Server;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, Endpoint, EndpointId};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();

    // Three backends on free local ports, named a, b and c.
    let mut backends = Vec::new();
    let mut names = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let backend = Backend::start(name).await;
        names.insert(EndpointId::from(backend.addr), name);
        backends.push(backend);
    }
    let names = Arc::new(names);

    // A round-robin balancer over them; each endpoint's service is a pooled hyper client.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let balancer = Balancer::new(
        backends.iter().map(|b| Endpoint::from(b.addr)),
        RoundRobin::new(),
        move |ep: &Endpoint| {
            let client = client.clone();
            let addr = ep.socket_addr().expect("backends have addresses");
            tower::service_fn(move |mut req: http::Request<Empty<Bytes>>| {
                *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
                client.request(req)
            })
        },
    );

    // Active checks, passive outlier detection and slow start, all on the balancer's pool.
    let pool = balancer.pool();
    HealthChecker::new(HttpCheck::get("/health").expect_body("ok"))
        .interval(Duration::from_millis(500))
        .down_interval(Duration::from_millis(250))
        .timeout(Duration::from_millis(300))
        .rise(2)
        .fall(2)
        .spawn(pool);
    OutlierDetection::new().spawn(pool);
    SlowStart::new(Duration::from_secs(3)).spawn(pool);

    // The subscription API: print each health event.
    let mut events = pool.health_events();
    let event_names = names.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            let name = event_names.get(e.endpoint()).copied().unwrap_or("?");
            println!(
                "event: {name} {:?} -> {:?} ({:?})",
                e.previous(),
                e.health(),
                e.change()
            );
        }
    });

    let start = Instant::now();
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let mut failed = 0;
    let mut next_report = Duration::from_secs(1);
    let (mut stopped, mut restarted) = (false, false);
    while start.elapsed() < Duration::from_secs(13) {
        let t = start.elapsed();
        if t >= Duration::from_secs(3) && !stopped {
            stopped = true;
            tracing::info!("stopping backend b");
            backends[1].stop().await;
        }
        if t >= Duration::from_secs(7) && !restarted {
            restarted = true;
            tracing::info!("starting backend b again");
            backends[1].restart().await;
        }
        let mut req = http::Request::new(Empty::new());
        let record = PickHints::of_mut(&mut req).record_pick();
        match balancer.clone().oneshot(req).await {
            Ok(res) => {
                let by = record.endpoint();
                let _ = res.into_body().collect().await;
                let name = by.and_then(|id| names.get(&id).copied()).unwrap_or("?");
                *counts.entry(name).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, "request failed");
            }
        }
        if t >= next_report {
            next_report += Duration::from_secs(1);
            tracing::info!(
                "t={:>2}s served: a={} b={} c={} failed={failed}",
                t.as_secs(),
                counts.get("a").unwrap_or(&0),
                counts.get("b").unwrap_or(&0),
                counts.get("c").unwrap_or(&0),
            );
            counts.clear();
            failed = 0;
        }
        sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("done");
}

/// A demo backend that answers `/health` with `ok` and can be stopped (listener and
/// connections closed) and started again on the same port.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tracing::info!(backend = name, %addr, "backend listening");
        let mut backend = Backend {
            name,
            addr,
            task: None,
        };
        backend.serve(listener);
        backend
    }

    /// Serves on `listener` in a task of its own (dropping the server's future, as aborting the
    /// task does, closes the connections it serves).
    fn serve(&mut self, listener: TcpListener) {
        let service = demo::hello(self.name, Duration::ZERO);
        self.task = Some(tokio::spawn(Server::new(service).serve(listener)));
    }

    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => return self.serve(listener),
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
