//! Client-side balancing: one hyper client spreading calls over three hosts with power of two
//! choices, no proxy in between.
//!
//! ```text
//! cargo run --example client_side
//! ```
//!
//! It starts three demo hosts (`examples/demo`; host-3 is ten times slower than the others),
//! sends 300 calls through the balanced client, 30 at a time, prints how they were spread (by
//! the `x-backend` header each host puts on its answers), and exits (within a second). Power
//! of two choices sends each call to the less busy of two random hosts, counting calls in
//! flight until their response body ends, so the slow host, whose calls stay in flight longer,
//! gets far fewer of them (typically about 135 / 140 / 25). Try `RoundRobin::new()` instead of
//! `PowerOfTwoChoices::new()` below: every host then gets 100, and the run takes several times
//! longer.
//!
//! The building blocks: `BalancerLayer` wraps one inner service and tells it, per call, which
//! endpoint was picked (the `Target` request extension); the inner service here is
//! `TargetUri` around a pooled hyper-util client: it rewrites each call's URI to the picked
//! host (keeping path and query) and sends. For HTTPS hosts, give the client a TLS connector
//! (such as hyper-rustls's) and use `TargetUri::new(client).https()`.

mod demo;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::balance::TargetUri;
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Three hosts; host-3 takes 50 ms per call, the others 5 ms.
    let mut hosts = Vec::new();
    for (n, delay_ms) in [(1, 5), (2, 5), (3, 50)] {
        let addr = demo::slow_backend(format!("host-{n}"), Duration::from_millis(delay_ms)).await?;
        println!("host-{n} on {addr}, answers in {delay_ms} ms");
        hosts.push(Endpoint::from(addr));
    }

    // One pooled keep-alive client for all hosts; `TargetUri` points each call at the host
    // the balancer picked.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let balanced = ServiceBuilder::new()
        .layer(BalancerLayer::new(hosts, PowerOfTwoChoices::new()))
        .service(TargetUri::new(client));

    // 300 calls, at most 30 in flight.
    let started = Instant::now();
    let calls = futures::stream::iter(0..300).map(|i| {
        let balanced = balanced.clone();
        async move {
            let req = Request::get(format!("/item/{i}")).body(Empty::new())?;
            let res = balanced.oneshot(req).await?;
            let host = res.headers().get(demo::NAME_HEADER).cloned();
            // The call counts as in flight until its body ends: read it.
            res.into_body().collect().await?;
            Ok::<_, BoxError>(host.ok_or("no x-backend header")?.to_str()?.to_owned())
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
