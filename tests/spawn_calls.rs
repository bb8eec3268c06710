//! Balanced client calls can be spawned (`tokio::spawn`, `JoinSet::spawn`), the way every real
//! client makes them: a hyper-util client behind `TargetUri` (the pattern of
//! `examples/client_side.rs`), and a hand-written `service_fn` whose error type is concrete.
//! This file compiling is half the test. Real HTTP over 127.0.0.1.
//!
//! (A `service_fn` whose `async` block returns `Result<_, BoxError>` cannot be spawned through
//! any tower middleware that bounds `S::Error: Into<BoxError>`: rustc erases the box's lifetime
//! in the spawned future and then cannot prove the conversion for every lifetime. The
//! `BalancerLayer` docs say so and point at the two patterns tested here.)

mod common;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::balance::{Target, TargetUri};
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{BalancerLayer, BoxError};
use tokio::task::JoinSet;
use tower::{ServiceBuilder, ServiceExt};

/// Spawns 30 calls through `balanced` and one more with `tokio::spawn`; every call must come back
/// from one of the servers.
macro_rules! spawn_calls {
    ($balanced:expr) => {{
        let balanced = $balanced;
        let mut calls = JoinSet::new();
        for _ in 0..30 {
            let balanced = balanced.clone();
            calls.spawn(async move {
                let res = balanced.oneshot(Request::new(Empty::new())).await?;
                let body = res.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(String::from_utf8_lossy(&body).into_owned())
            });
        }
        let one = tokio::spawn(balanced.clone().oneshot(Request::new(Empty::new())));
        assert!(one.await.unwrap().is_ok());
        let mut answers = 0;
        while let Some(answer) = calls.join_next().await {
            let name = answer.unwrap().unwrap();
            assert!(name.starts_with('s'), "{name}");
            answers += 1;
        }
        assert_eq!(answers, 30);
    }};
}

#[tokio::test]
async fn calls_through_target_uri_can_be_spawned() {
    let servers = common::start_servers(3).await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    spawn_calls!(ServiceBuilder::new()
        .layer(BalancerLayer::new(
            common::endpoints(&servers),
            PowerOfTwoChoices::new(),
        ))
        .service(TargetUri::new(client)));
}

#[tokio::test]
async fn calls_of_a_service_fn_with_a_concrete_error_can_be_spawned() {
    let servers = common::start_servers(3).await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = tower::service_fn(move |mut req: Request<Empty<Bytes>>| {
        let client = client.clone();
        let host = req
            .extensions()
            .get::<Target>()
            .and_then(|t| t.authority().cloned())
            .expect("the balancer sets the target");
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(host)
            .path_and_query("/")
            .build()
            .expect("uri");
        client.request(req)
    });
    spawn_calls!(ServiceBuilder::new()
        .layer(BalancerLayer::new(
            common::endpoints(&servers),
            PowerOfTwoChoices::new(),
        ))
        .service(send));
}
