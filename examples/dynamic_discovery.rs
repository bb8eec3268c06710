//! Auto-scaling: endpoints join, change weight and leave while traffic flows.
//!
//! Run it:
//!
//! ```text
//! cargo run --example dynamic_discovery
//! ```
//!
//! It starts five demo backends on 127.0.0.1 (`examples/demo`, each a little slow so that
//! requests overlap), a balancing proxy over the first two (lbkit's `Server` in front of
//! `ErrorResponseLayer`, `BalancerLayer` and `Forward`), and a client that keeps sending
//! requests through the proxy. Every second it prints how many requests each backend answered
//! (by the `x-backend` header of the answers), while a scaler changes the layer's pool:
//! two backends join, one gets three times the weight, one is removed (its in-flight requests
//! finish: it drains) and another joins. Watch the columns follow, and the failure count stay
//! at zero. It stops by itself after about ten seconds.

mod demo;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{RequestBody, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

/// One step of the scaling script: what it does, and doing it.
type Step = (&'static str, Box<dyn Fn()>);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter("lbkit=debug")
        .init();

    let mut backends = Vec::new();
    for n in 1..=5 {
        let name = format!("backend-{n}");
        backends.push(demo::slow_backend(name, Duration::from_millis(2)).await?);
    }

    // The balancer layer over a live pool; the pool handle is kept for the scaler.
    let balancer = BalancerLayer::new([backends[0], backends[1]], RoundRobin::new());
    let pool = balancer.pool().clone();
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(balancer)
        .service(Forward::<RequestBody>::new());

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    tokio::spawn(Server::new(proxy).serve(listener));
    println!("proxy on http://{proxy_addr}; backends 1 and 2 in the pool");

    // A client sending requests through the proxy, four at a time.
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let failures = Arc::new(AtomicU64::new(0));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..4 {
        let (client, counts, failures) = (client.clone(), counts.clone(), failures.clone());
        tokio::spawn(async move {
            loop {
                let uri = format!("http://{proxy_addr}/")
                    .parse::<http::Uri>()
                    .unwrap();
                let answer = async {
                    let res = client.get(uri).await?;
                    let ok = res.status().is_success();
                    let who = res.headers().get(demo::NAME_HEADER).cloned();
                    res.into_body().collect().await?;
                    let who = who.ok_or("no x-backend header")?.to_str()?.to_owned();
                    Ok::<_, BoxError>((ok, who))
                };
                match answer.await {
                    Ok((true, who)) => *counts.lock().unwrap().entry(who).or_default() += 1,
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }

    let steps: [Step; 5] = [
        ("steady", Box::new(|| {})),
        ("scale up: backends 3 and 4 join", {
            let (pool, b) = (pool.clone(), backends.clone());
            Box::new(move || pool.extend([Endpoint::from(b[2]), Endpoint::from(b[3])]))
        }),
        ("backend 1 gets weight 3", {
            let (pool, b) = (pool.clone(), backends.clone());
            Box::new(move || {
                pool.set_weight(&b[0].into(), 3);
            })
        }),
        ("scale down: backend 2 leaves (drains)", {
            let (pool, b) = (pool.clone(), backends.clone());
            Box::new(move || {
                pool.remove(&b[1].into());
            })
        }),
        ("backend 5 joins", {
            let (pool, b) = (pool.clone(), backends.clone());
            Box::new(move || {
                pool.insert(Endpoint::from(b[4]));
            })
        }),
    ];
    for (what, change) in steps {
        change();
        println!("-- {what}");
        for _ in 0..2 {
            counts.lock().unwrap().clear();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let line: Vec<String> = counts
                .lock()
                .unwrap()
                .iter()
                .map(|(who, n)| format!("{who}: {n:>5}"))
                .collect();
            println!(
                "   {}   failures so far: {}",
                line.join("  "),
                failures.load(Ordering::Relaxed)
            );
        }
    }
    Ok(())
}
