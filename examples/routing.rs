//! Routing to different pools without axum: `lbkit::route::Routes` sends `/api` to one fleet,
//! `/static` to another, requests for `admin.localhost` to a third, and splits everything else
//! 90/10 between a stable fleet and a canary. Each route is its own lbkit stack (errors mapped,
//! balanced, forwarded) over its own pool; the first route that matches wins.
//!
//! ```text
//! cargo run --example routing
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl -s http://127.0.0.1:8081/api/users              # api-1 / api-2
//! curl -s http://127.0.0.1:8081/static/app.js          # static-1
//! curl -s -H 'host: admin.localhost' http://127.0.0.1:8081/   # admin-1
//! for i in $(seq 10); do curl -s http://127.0.0.1:8081/; done  # 9 x stable, 1 x canary
//! curl -s -H 'cookie: canary=always' http://127.0.0.1:8081/   # the canary, by cookie
//! ```

pub mod demo;

use std::net::SocketAddr;
use std::time::Duration;

use std::convert::Infallible;

use lbkit::balance::{Balanced, TrackedBody};
use lbkit::proxy::{ErrorResponse, ErrorResponseLayer, Forward, ForwardBody, ProxyBody};
use lbkit::route::{Match, Routes};
use lbkit::server::{RequestBody, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError};
use tower::ServiceBuilder;

/// One route's stack: 502/503/504 for failures, round robin over a pool, forwarding.
type Stack = ErrorResponse<Balanced<Forward<RequestBody>, RoundRobin>>;

/// What every route answers.
type Body = ProxyBody<TrackedBody<ForwardBody<RequestBody>>>;

fn pool(backends: &[SocketAddr]) -> Stack {
    ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(BalancerLayer::new(
            backends.iter().copied(),
            RoundRobin::new(),
        ))
        .service(Forward::<RequestBody>::new().timeout(Duration::from_secs(10)))
}

/// The fleets behind the routes, by name.
pub struct Fleets {
    pub api: Vec<SocketAddr>,
    pub statics: Vec<SocketAddr>,
    pub admin: Vec<SocketAddr>,
    pub stable: Vec<SocketAddr>,
    pub canary: Vec<SocketAddr>,
}

/// The routes over `fleets`: what `main` serves and `tests/routing.rs` checks.
pub fn routes(fleets: &Fleets) -> Routes<RequestBody, Body, Infallible> {
    Routes::new()
        .route(Match::any().host("admin.localhost"), pool(&fleets.admin))
        .route(Match::any().path_prefix("/api"), pool(&fleets.api))
        .route(Match::any().path_prefix("/static"), pool(&fleets.statics))
        .route(
            Match::any().cookie("canary", "always"),
            pool(&fleets.canary),
        )
        .split(
            Match::any(),
            [(9, pool(&fleets.stable)), (1, pool(&fleets.canary))],
        )
}

/// Starts one demo backend per name.
pub async fn backends(names: &[&str]) -> Result<Vec<SocketAddr>, BoxError> {
    let mut addrs = Vec::new();
    for name in names {
        addrs.push(demo::backend(*name).await?);
    }
    Ok(addrs)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let fleets = Fleets {
        api: backends(&["api-1", "api-2"]).await?,
        statics: backends(&["static-1"]).await?,
        admin: backends(&["admin-1"]).await?,
        stable: backends(&["stable-1", "stable-2"]).await?,
        canary: backends(&["canary-1"]).await?,
    };
    let listener = demo::listen("127.0.0.1:8081").await;
    println!(
        "routing on http://{}  (Ctrl-C to stop)",
        listener.local_addr()?
    );
    println!("try: curl -s http://{}/api/users", listener.local_addr()?);
    Server::new(routes(&fleets))
        .serve_with_shutdown(listener, demo::ctrl_c(), Duration::from_secs(10))
        .await;
    Ok(())
}
