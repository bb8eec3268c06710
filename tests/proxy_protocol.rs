//! The PROXY protocol over real sockets: the README's proxy (`--proxy-protocol`) takes the
//! client's address from a v1 or v2 header sent by a trusted balancer and writes it into
//! `X-Forwarded-For`; an untrusted peer's connection is refused; `TcpProxy` accepts a header
//! and sends v2 to a backend that reads it (lbkit's own server with `proxy_protocol`).

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use lbkit::forwarded::{Cidr, ClientAddr};
use lbkit::proxy::TcpProxy;
use lbkit::server::{encode_v2, ProxyProtocol, Server};
use lbkit::strategy::RoundRobin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous: only catches a hang.
const HANG: Duration = Duration::from_secs(30);

/// Sends `prefix` then a `GET /headers` on a new connection to `addr`, and reads the answer
/// to its end (empty when the connection is refused).
async fn exchange(addr: SocketAddr, prefix: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut out = prefix.to_vec();
    out.extend_from_slice(
        b"GET /headers HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\r\n",
    );
    // A refused connection may be closed before all of it is written.
    let _ = s.write_all(&out).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, s.read_to_end(&mut answer))
        .await
        .expect("no hang");
    String::from_utf8_lossy(&answer).into_owned()
}

async fn readme_proxy(trusted: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let backend = reverse_proxy::demo::backend("backend-1")
        .await
        .expect("demo backend");
    let args = reverse_proxy::Args {
        proxy_protocol: vec![trusted.parse::<Cidr>().expect("cidr")],
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_pool, serving) = reverse_proxy::proxy(
        vec![lbkit::Endpoint::from(backend)],
        &args,
        listener,
        std::future::pending(),
    );
    (addr, tokio::spawn(serving))
}

#[tokio::test]
async fn v1_and_v2_from_a_trusted_balancer_set_the_client_address() {
    let (addr, task) = readme_proxy("127.0.0.0/8").await;
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 4711 8080\r\n";
    let answer = exchange(addr, v1).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-forwarded-for: 203.0.113.9\n"),
        "{answer}"
    );

    let v2 = encode_v2(
        "[2001:db8::7]:5000".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    )
    .expect("header");
    let answer = exchange(addr, &v2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-forwarded-for: 2001:db8::7\n"),
        "{answer}"
    );

    // A trusted balancer that sends no header: refused, not served as the balancer.
    let answer = exchange(addr, b"").await;
    assert!(answer.is_empty(), "{answer}");
    task.abort();
}

#[tokio::test]
async fn an_untrusted_peer_is_refused_whatever_it_sends() {
    let (addr, task) = readme_proxy("10.0.0.0/8").await;
    for prefix in [&b"PROXY TCP4 203.0.113.9 127.0.0.1 4711 8080\r\n"[..], b""] {
        let answer = exchange(addr, prefix).await;
        assert!(answer.is_empty(), "served an untrusted peer: {answer}");
    }
    task.abort();
}

/// A server that answers each request with the `ClientAddr` it was given, behind a PROXY
/// protocol listener trusting loopback.
async fn addr_echo() -> SocketAddr {
    let svc = tower::service_fn(|req: http::Request<lbkit::server::RequestBody>| {
        let addr = ClientAddr::of(&req)
            .map(|a| a.to_string())
            .unwrap_or_default();
        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Full::new(bytes::Bytes::from(addr)),
        )))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let trusted = ProxyProtocol::trusting(["127.0.0.0/8".parse::<Cidr>().unwrap()]);
    tokio::spawn(Server::new(svc).proxy_protocol(trusted).serve(listener));
    addr
}

#[tokio::test]
async fn tcp_proxy_sends_v2_and_accepts_a_header_itself() {
    let backend = addr_echo().await;
    // Sending only: the backend learns the real client (its ephemeral port tells it apart
    // from the proxy's own connection, both on 127.0.0.1).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = listener.local_addr().expect("addr");
    let proxy = TcpProxy::new([backend], RoundRobin::new()).send_proxy_protocol(true);
    let task = tokio::spawn(proxy.serve(listener));
    let mut s = TcpStream::connect(front).await.expect("connect");
    let me = s.local_addr().expect("local");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut answer))
        .await
        .expect("no hang")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&me.to_string()), "{answer} (client {me})");
    task.abort();

    // Accepting and sending: the client named by the balancer in front reaches the backend.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = listener.local_addr().expect("addr");
    let trusted = ProxyProtocol::trusting(["127.0.0.1".parse::<Cidr>().unwrap()]);
    let proxy = TcpProxy::new([backend], RoundRobin::new())
        .accept_proxy_protocol(trusted)
        .send_proxy_protocol(true);
    let task = tokio::spawn(proxy.serve(listener));
    let v1 = b"PROXY TCP4 198.51.100.4 127.0.0.1 6000 80\r\n";
    let answer = exchange(front, v1).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("198.51.100.4:6000"), "{answer}");
    task.abort();
}
