//! One pool for L4 and L7: a `BalancerLayer`'s pool also serves a `TcpProxy`, so one set of
//! endpoints has one health state. A backend that the HTTP health check marks down stops
//! getting TCP connections too; when it is healthy again it gets them again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use lbkit::endpoint::Health;
use lbkit::health::{HealthChecker, HttpCheck};
use lbkit::proxy::TcpProxy;
use lbkit::server::Server;
use lbkit::strategy::RoundRobin;
use lbkit::BalancerLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP backend named `name`; `/health` answers 503 while `sick` is set.
async fn backend(name: &'static str, sick: Arc<AtomicBool>) -> SocketAddr {
    let svc = tower::service_fn(move |req: http::Request<lbkit::server::RequestBody>| {
        let status = if req.uri().path() == "/health" && sick.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        let res = http::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(name)))
            .expect("response");
        std::future::ready(Ok::<_, std::convert::Infallible>(res))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(Server::new(svc).serve(listener));
    addr
}

/// One request over a new TCP connection through `proxy`: the backend's name.
async fn through_tcp(proxy: SocketAddr) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("no hang")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.rsplit("\r\n\r\n").next().unwrap_or("").to_owned()
}

/// Waits (generously) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_http_check_takes_a_backend_out_of_tcp_traffic_too() {
    let sick = Arc::new(AtomicBool::new(false));
    let a = backend("a", Arc::new(AtomicBool::new(false))).await;
    let b = backend("b", sick.clone()).await;
    let layer = BalancerLayer::new([a, b], RoundRobin::new());
    let pool = layer.pool().clone();
    HealthChecker::new(HttpCheck::get("/health"))
        .interval(Duration::from_millis(50))
        .rise(1)
        .fall(1)
        .spawn(&pool);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = listener.local_addr().expect("addr");
    tokio::spawn(TcpProxy::from_pool(pool.clone()).serve(listener));

    let mut seen = HashSet::new();
    for _ in 0..4 {
        seen.insert(through_tcp(proxy).await);
    }
    assert_eq!(seen, HashSet::from(["a".to_owned(), "b".to_owned()]));

    sick.store(true, Ordering::SeqCst);
    let b_id = b.to_string();
    let health = || pool.stats().endpoint(&b_id).map(|e| e.health);
    eventually("b marked down", || health() == Some(Health::Down)).await;
    for _ in 0..6 {
        assert_eq!(through_tcp(proxy).await, "a");
    }

    sick.store(false, Ordering::SeqCst);
    eventually("b back up", || health() == Some(Health::Healthy)).await;
    let mut seen = HashSet::new();
    for _ in 0..4 {
        seen.insert(through_tcp(proxy).await);
    }
    assert!(seen.contains("b"), "{seen:?}");
    drop(layer);
}
