//! Client-side balancing: one hyper client spreading calls over three hosts with power of two
//! choices, no proxy in between.
//!
//! ```text
//! cargo run --example client_side
//! ```
//!
//! It starts three local hosts (host-3 is ten times slower than the others), sends 300 calls
//! through the balanced client, 30 at a time, prints how they were spread, and exits (within a
//! second). Power of two choices sends each call to the less busy of two random hosts, counting
//! calls in flight until their response body ends, so the slow host, whose calls stay in
//! flight longer, gets far fewer of them (typically 137 / 141 / 22). Try `RoundRobin::new()`
//! instead of `PowerOfTwoChoices::new()` below: every host then gets 100, and the run takes
//! several times longer.
//!
//! The building blocks: `BalancerLayer` wraps one inner service and tells it, per call, which
//! endpoint was picked (the `Target` request extension); the inner service here is a plain
//! `tower::service_fn` that rewrites the URI to that host and sends with a pooled hyper-util
//! client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::balance::Target;
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Three hosts; host-3 takes 50 ms per call, the others 5 ms.
    let mut hosts = Vec::new();
    for (n, delay_ms) in [(1, 5), (2, 5), (3, 50)] {
        let addr = spawn_host(n, Duration::from_millis(delay_ms)).await?;
        println!("host-{n} on {addr}, answers in {delay_ms} ms");
        hosts.push(Endpoint::from(addr));
    }

    // One pooled keep-alive client for all hosts.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = tower::service_fn(move |mut req: Request<Empty<Bytes>>| {
        let client = client.clone();
        async move {
            let host = req
                .extensions()
                .get::<Target>()
                .and_then(|t| t.authority().cloned())
                .ok_or("no target: the balancer sets it")?;
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(path)
                .build()?;
            Ok::<_, BoxError>(client.request(req).await?)
        }
    });
    let balanced = ServiceBuilder::new()
        .layer(BalancerLayer::new(hosts, PowerOfTwoChoices::new()))
        .service(send);

    // 300 calls, at most 30 in flight.
    let started = Instant::now();
    let calls = futures::stream::iter(0..300).map(|i| {
        let balanced = balanced.clone();
        async move {
            let req = Request::get(format!("/item/{i}")).body(Empty::new())?;
            let res = balanced.oneshot(req).await?;
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
        }
    });
    let answers: Vec<Result<String, BoxError>> = futures::StreamExt::buffer_unordered(calls, 30)
        .collect()
        .await;

    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for answer in answers {
        *spread.entry(answer?).or_default() += 1;
    }
    println!(
        "300 calls in {:.2} s, spread by power of two choices:",
        started.elapsed().as_secs_f64()
    );
    for (host, n) in &spread {
        println!("  {host}: {n:3} {}", "#".repeat(n / 4));
    }
    Ok(())
}

/// A host that answers `host-N` after `delay`.
async fn spawn_host(n: usize, delay: Duration) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = service_fn(move |_req: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("host-{n}")))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
