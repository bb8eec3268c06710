//! `lbkit::route::Routes` over real sockets, as `examples/routing.rs` serves it: host, path
//! prefix and cookie routes to their own pools, a 90/10 split between a stable fleet and a
//! canary, and `404` for a request that matches no route.

#[path = "../examples/routing.rs"]
#[allow(dead_code)]
mod routing;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use lbkit::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends one raw HTTP/1.1 request and returns the status code and the `x-backend` that
/// answered (empty when none did).
async fn ask(addr: SocketAddr, host: &str, path: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("no hang")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    let status = answer[9..12].parse().expect("status");
    let backend = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-backend: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    (status, backend)
}

#[tokio::test]
async fn routes_by_host_path_cookie_and_weight() {
    let fleets = routing::Fleets {
        api: routing::backends(&["api-1", "api-2"]).await.expect("api"),
        statics: routing::backends(&["static-1"]).await.expect("static"),
        admin: routing::backends(&["admin-1"]).await.expect("admin"),
        stable: routing::backends(&["stable-1", "stable-2"])
            .await
            .expect("stable"),
        canary: routing::backends(&["canary-1"]).await.expect("canary"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(Server::new(routing::routes(&fleets)).serve(listener));

    let shop = "shop.localhost";
    let mut api = HashMap::new();
    for _ in 0..4 {
        let (status, backend) = ask(addr, shop, "/api/users", "").await;
        assert_eq!(status, 200);
        *api.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(api.get("api-1"), Some(&2), "{api:?}");
    assert_eq!(api.get("api-2"), Some(&2), "{api:?}");
    assert_eq!(
        ask(addr, shop, "/static/app.js", "").await,
        (200, "static-1".into())
    );
    // The host route comes first, whatever the path.
    assert_eq!(
        ask(addr, "admin.localhost:8081", "/api/x", "").await,
        (200, "admin-1".into())
    );
    let cookie = "cookie: theme=dark; canary=always\r\n";
    assert_eq!(ask(addr, shop, "/", cookie).await, (200, "canary-1".into()));

    // Everything else (`/apix` is not below `/api`): 9 in 10 to stable, exactly, interleaved.
    let mut split = HashMap::new();
    for _ in 0..20 {
        let (status, backend) = ask(addr, shop, "/apix", "").await;
        assert_eq!(status, 200);
        *split.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(split.get("canary-1"), Some(&2), "{split:?}");
    assert_eq!(split.get("stable-1"), Some(&9), "{split:?}");
    assert_eq!(split.get("stable-2"), Some(&9), "{split:?}");
    server.abort();
}

#[tokio::test]
async fn no_matching_route_is_404() {
    let backend = routing::backends(&["only"]).await.expect("backend");
    let routes = lbkit::route::Routes::new().route(
        lbkit::route::Match::any().path_prefix("/api"),
        tower::ServiceBuilder::new()
            .layer(lbkit::proxy::ErrorResponseLayer::new())
            .layer(lbkit::BalancerLayer::new(
                backend,
                lbkit::strategy::RoundRobin::new(),
            ))
            .service(lbkit::proxy::Forward::<lbkit::server::RequestBody>::new()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(Server::new(routes).serve(listener));
    assert_eq!(ask(addr, "a", "/api", "").await, (200, "only".into()));
    assert_eq!(ask(addr, "a", "/", "").await, (404, String::new()));
    server.abort();
}
