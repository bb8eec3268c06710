//! lbkit inside an axum app: `/api/*` is proxied to three local backends through lbkit, the
//! other routes are served by axum itself, and tower-http layers add compression (for both)
//! and a `Cache-Control` header (for the local pages).
//!
//! ```text
//! cargo run --example axum_app
//! ```
//!
//! At start it asks itself for a proxied page with `Accept-Encoding: gzip` and prints the sizes,
//! then serves on 127.0.0.1:3000 until Ctrl-C. Try, from another terminal:
//!
//! ```text
//! curl -s http://127.0.0.1:3000/                           # served by axum
//! for i in 1 2 3 4; do curl -s http://127.0.0.1:3000/api/hello; done   # proxied, balanced
//! curl -si --compressed http://127.0.0.1:3000/api/report   # content-encoding: gzip, by tower-http
//! curl -si http://127.0.0.1:3000/about                     # cache-control from SetResponseHeaderLayer
//! ```
//!
//! The proxy is an ordinary tower service (`ErrorResponseLayer` + `BalancerLayer` +
//! `Forward`), so axum routes to it with `route_service`, and the layers that wrap the router
//! wrap it too: that is where compression and caching hooks go, rather than in lbkit.
//! `route_service` keeps the full path (`/api/hello` reaches the backend as is); use
//! `nest_service("/api", proxy)` to strip the prefix instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::proxy::{ClientAddr, ErrorResponseLayer, Forward};
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::net::TcpListener;
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

    // The lbkit proxy, as a tower service taking axum's request body.
    let proxy = ServiceBuilder::new()
        // axum knows the peer as ConnectInfo; lbkit's Forward reads ClientAddr.
        .map_request(|mut req: Request<Body>| {
            if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
                let peer = *peer;
                req.extensions_mut().insert(ClientAddr(peer));
            }
            req
        })
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
        .route_service("/api/{*rest}", proxy)
        .merge(local)
        // Compresses local and proxied responses alike when the client accepts gzip.
        .layer(CompressionLayer::new());

    let listener = match TcpListener::bind(LISTEN).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {LISTEN}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    });

    demo(addr).await?;
    println!("\naxum app with lbkit on http://{addr}  (Ctrl-C to stop)");
    println!("try: for i in 1 2 3 4; do curl -s http://{addr}/api/hello; done");
    println!("     curl -si --compressed http://{addr}/api/report | head");
    server.await??;
    println!("bye");
    Ok(())
}

/// Asks the app for a few pages, as a client would, and prints what came back.
async fn demo(addr: SocketAddr) -> Result<(), BoxError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for path in ["/", "/api/hello", "/api/hello", "/api/hello"] {
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

/// A backend that says who it is, with a large report at `/api/report`.
async fn spawn_backend(n: usize) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let body = if req.uri().path() == "/api/report" {
                    report()
                } else {
                    format!("backend-{n} got {} {}\n", req.method(), req.uri())
                };
                let res = Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .header(http::header::SERVER, "demo-backend")
                    .body(Full::new(Bytes::from(body)))
                    .expect("valid response");
                Ok::<_, Infallible>(res)
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
