//! Upgraded connections (WebSocket-style) through lbkit's `Server` → `BalancerLayer` →
//! `Forward`, over real sockets on 127.0.0.1 (issue 13, item 4): while a tunnel is open it
//! counts as a request in flight at its endpoint (so least connections sends new requests
//! elsewhere), and 0 once it closes; a tunnel that passes no byte for the idle timeout is
//! closed; and the server's graceful shutdown closes open tunnels when its grace period ends.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{wait_until, HANG};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{RequestBody, Server};
use lbkit::strategy::LeastConnections;
use lbkit::{BalancerLayer, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceBuilder;

async fn within<F: Future>(f: F) -> F::Output {
    // Only a hang takes that long.
    tokio::time::timeout(HANG * 2, f)
        .await
        .expect("test did not finish in time")
}

/// A backend that answers plain requests with its name and accepts `Upgrade: websocket`
/// with a `101`, then echoes every byte back; stopped when dropped.
struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint::new(name).with_addr(self.addr)
    }
}

fn echo_backend(name: &'static str) -> Backend {
    let (listener, addr) = common::listen_reserved();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            conns.spawn(async move {
                let svc =
                    hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                        if req.headers().get("upgrade").is_none() {
                            return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                                name,
                            ))));
                        }
                        // The backend's side of the tunnel: echo until the proxy closes it.
                        tokio::spawn(echo(hyper::upgrade::on(&mut req)));
                        Ok(Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(Full::new(Bytes::new()))
                            .unwrap())
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Backend { addr, task }
}

async fn echo(on_upgrade: hyper::upgrade::OnUpgrade) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let mut io = TokioIo::new(upgraded);
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = io.read(&mut buf).await {
        if io.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// The proxy: lbkit's server → least connections over `endpoints` → `forward`; serves until
/// `shutdown` fires, then drains for up to `grace`.
struct Proxy {
    addr: SocketAddr,
    balancer: BalancerLayer<LeastConnections>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn proxy(endpoints: Vec<Endpoint>, forward: Forward<RequestBody>, grace: Duration) -> Proxy {
    let balancer = BalancerLayer::new(endpoints, LeastConnections::new());
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(balancer.clone())
        .service(forward);
    let (listener, addr) = common::listen_reserved();
    let (tx, rx) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let task = tokio::spawn(Server::new(svc).serve_with_shutdown(listener, shutdown, grace));
    Proxy {
        addr,
        balancer,
        shutdown: Some(tx),
        task,
    }
}

impl Proxy {
    fn in_flight(&self) -> u64 {
        self.balancer.pool().in_flight()
    }
}

/// Opens a tunnel through the proxy: the upgrade handshake, then one echoed message.
async fn open_tunnel(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_echo(&mut s, b"hello").await;
    s
}

async fn assert_echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

/// Waits until the proxy closes `s` (end of stream or reset).
async fn closed_by_proxy(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sends a plain `GET /` and returns the name of the backend that answered.
async fn ask(addr: SocketAddr) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    common::body_text(res.into_body()).await
}

#[tokio::test]
async fn an_open_tunnel_counts_in_flight_until_it_closes() {
    within(async {
        let (a, b) = (echo_backend("a"), echo_backend("b"));
        let p = proxy(
            vec![a.endpoint("a"), b.endpoint("b")],
            Forward::new(),
            Duration::ZERO,
        );
        let mut tunnel = open_tunnel(p.addr).await;
        // The handshake's response is long done (the echo went through): only the tunnel
        // keeps the request in flight.
        assert_eq!(p.in_flight(), 1, "an open tunnel is a request in flight");
        let pool = p.balancer.pool();
        let busy: Vec<_> = pool
            .endpoints()
            .into_iter()
            .filter(|(_, s)| s.in_flight() == 1)
            .map(|(e, _)| e.id().to_string())
            .collect();
        assert_eq!(busy.len(), 1);
        // Least connections sends every other request to the other backend meanwhile.
        for _ in 0..6 {
            assert_ne!(ask(p.addr).await, busy[0]);
        }
        assert_echo(&mut tunnel, b"still open").await;
        assert_eq!(p.in_flight(), 1);

        drop(tunnel);
        wait_until(
            HANG,
            "the closed tunnel to leave the in-flight count",
            || p.in_flight() == 0,
        )
        .await;
        // Counted once, as one answered request.
        let state = pool.state(&busy[0].as_str().into()).unwrap();
        assert_eq!(state.errors(), 0);
        assert_eq!(state.cancelled(), 0);
    })
    .await
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    within(async {
        let a = echo_backend("a");
        let p = proxy(
            vec![a.endpoint("a")],
            Forward::new().tunnel_idle_timeout(Duration::from_millis(300)),
            Duration::ZERO,
        );
        let mut tunnel = open_tunnel(p.addr).await;
        closed_by_proxy(&mut tunnel).await;
        wait_until(HANG, "the idle tunnel to leave the in-flight count", || {
            p.in_flight() == 0
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn graceful_shutdown_closes_open_tunnels() {
    within(async {
        let a = echo_backend("a");
        let mut p = proxy(
            vec![a.endpoint("a")],
            Forward::new(),
            Duration::from_millis(200),
        );
        let mut tunnel = open_tunnel(p.addr).await;
        p.shutdown.take().unwrap().send(()).unwrap();
        // Closed when the grace period ends; the server then returns.
        closed_by_proxy(&mut tunnel).await;
        (&mut p.task).await.unwrap();
        wait_until(HANG, "the tunnel to leave the in-flight count", || {
            p.in_flight() == 0
        })
        .await;
    })
    .await
}
