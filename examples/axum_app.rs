//! lbkit inside an axum app: `/api` and everything below it is proxied to three local backends
//! through lbkit, the other routes are served by axum itself, and tower-http layers add
//! compression (for both) and a `Cache-Control` header (for the local pages).
//!
//! ```text
//! cargo run --example axum_app
//! ```
//!
//! At start it asks itself for a few pages, local and proxied, and for a large proxied one with
//! `Accept-Encoding: gzip`, printing its sizes; then it serves on 127.0.0.1:3000 until Ctrl-C.
//! Try, from another terminal:
//!
//! ```text
//! curl -s http://127.0.0.1:3000/                           # served by axum
//! for i in 1 2 3 4; do curl -s http://127.0.0.1:3000/api/hello; done   # proxied, balanced
//! curl -s http://127.0.0.1:3000/api                        # the bare prefix is proxied too
//! curl -si --compressed http://127.0.0.1:3000/api/report   # content-encoding: gzip, by tower-http
//! curl -si http://127.0.0.1:3000/about                     # cache-control from SetResponseHeaderLayer
//! ```
//!
//! The proxy is an ordinary tower service (`ErrorResponseLayer` + `BalancerLayer` +
//! `Forward`), so axum routes to it with `route_service` (at `/api`, `/api/` and
//! `/api/{*rest}`: axum 0.8's wildcard does not match the bare prefix), and the layers that wrap
//! the router wrap it too: that is where compression and caching hooks go, rather than in
//! lbkit. `route_service` keeps the full path (`/api/hello` reaches the backend as is); use
//! `nest_service("/api", proxy)` to strip the prefix instead.
//!
//! The router is a tower service too, so lbkit's `Server` serves it (rather than
//! `axum::serve`): with its timeouts and connection limit, graceful shutdown on Ctrl-C, and the
//! client's address (`ClientAddr`) on every request, from which `Forward` writes
//! `X-Forwarded-For` (the backends echo it: `for 127.0.0.1`). The backends are served by the
//! same `Server`, through `examples/demo`.

mod demo;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::Server;
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::set_header::SetResponseHeaderLayer;

const LISTEN: &str = "127.0.0.1:3000";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut backends = Vec::new();
    for n in 1..=3 {
        backends.push(Endpoint::from(spawn_backend(n).await?));
    }

    // The lbkit proxy, as a tower service taking axum's request body. The router passes the
    // request's extensions on, so `Forward` finds the `ClientAddr` the server put there.
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(BalancerLayer::new(backends, PowerOfTwoChoices::new()))
        .service(
            Forward::<Body>::new()
                .timeout(Duration::from_secs(10))
                .hide_response_header(http::header::SERVER),
        );

    // Local pages, with a caching hint.
    let local = Router::new()
        .route("/", get(|| async { "served by axum; try /api/hello\n" }))
        .route("/about", get(|| async { "lbkit inside axum\n" }))
        .layer(SetResponseHeaderLayer::if_not_present(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60"),
        ));

    let app = Router::new()
        .route_service("/api", proxy.clone())
        .route_service("/api/", proxy.clone())
        .route_service("/api/{*rest}", proxy)
        .merge(local)
        // Compresses local and proxied responses alike when the client accepts gzip.
        .layer(CompressionLayer::new());

    let listener = demo::listen(LISTEN).await;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(Server::new(app).serve_with_shutdown(
        listener,
        demo::ctrl_c(),
        Duration::from_secs(10),
    ));

    ask_itself(addr).await?;
    println!("\naxum app with lbkit on http://{addr}  (Ctrl-C to stop)");
    println!("try: for i in 1 2 3 4; do curl -s http://{addr}/api/hello; done");
    println!("     curl -si --compressed http://{addr}/api/report | head");
    server.await?;
    println!("bye");
    Ok(())
}

/// Asks the app for a few pages, as a client would, and prints what came back.
async fn ask_itself(addr: SocketAddr) -> Result<(), BoxError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for path in ["/", "/api", "/api/hello", "/api/hello"] {
        let res = client.get(format!("http://{addr}{path}").parse()?).await?;
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "GET {path:<11} -> {}",
            String::from_utf8_lossy(&body).trim_end()
        );
    }
    let req = Request::get(format!("http://{addr}/api/report"))
        .header(http::header::ACCEPT_ENCODING, "gzip")
        .body(Empty::new())?;
    let res = client.request(req).await?;
    let encoding = res
        .headers()
        .get(http::header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_else(|| "identity".into());
    let wire = res.into_body().collect().await?.to_bytes().len();
    println!(
        "GET /api/report with Accept-Encoding: gzip -> {wire} bytes on the wire ({encoding}), {} before compression",
        report().len()
    );
    Ok(())
}

/// A large, very compressible page.
fn report() -> String {
    (1..=400)
        .map(|i| format!("line {i:3}: all systems nominal\n"))
        .collect()
}

/// A backend that says who it is and for which client, with a large report at `/api/report`.
async fn spawn_backend(n: usize) -> Result<SocketAddr, BoxError> {
    let svc = tower::service_fn(move |req: Request<lbkit::server::RequestBody>| async move {
        let body = if req.uri().path() == "/api/report" {
            report()
        } else {
            let client = req.headers().get("x-forwarded-for");
            let client = client.and_then(|v| v.to_str().ok()).unwrap_or("?");
            format!(
                "backend-{n} got {} {} for {client}\n",
                req.method(),
                req.uri()
            )
        };
        let res = Response::builder()
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(http::header::SERVER, "demo-backend")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response");
        Ok::<_, Infallible>(res)
    });
    Ok(demo::serve(svc).await?)
}
