//! TLS termination over real sockets on 127.0.0.1: a self-signed certificate made with rcgen
//! and written as PEM files, the proxy behind `lbkit::server::Server::tls`, and rustls clients that
//! trust that certificate and ask for HTTP/1.1 or HTTP/2 by ALPN.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{tls, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower::ServiceBuilder;

use common::TempDir;

async fn within<F: Future>(f: F) -> F::Output {
    // Only a hang takes that long.
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test did not finish in time")
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (certificate PEM, key PEM, DER).
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().clone(),
    )
}

/// A backend answering `NAME proto=X-Forwarded-Proto`, or doing a WebSocket echo on upgrade.
struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let io = TokioIo::new(on_upgrade.await.expect("upgrade"));
                        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                        while let Some(Ok(msg)) = ws.next().await {
                            if msg.is_text() && ws.send(msg).await.is_err() {
                                break;
                            }
                        }
                    });
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    );
                }
                let proto = req
                    .headers()
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned();
                Ok(Response::new(Full::new(Bytes::from(format!(
                    "{name} proto={proto}"
                )))))
            });
            conns.spawn(async move {
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

/// The TLS proxy on 127.0.0.1 over `endpoints`; stops when the handle is dropped.
struct TlsProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_tls_proxy(config: Arc<tls::ServerConfig>, endpoints: Vec<Endpoint>) -> TlsProxy {
    let (addr, task) =
        spawn_tls_proxy(config, endpoints, std::future::pending(), Duration::ZERO).await;
    TlsProxy { addr, task }
}

/// The TLS proxy on 127.0.0.1 over `endpoints`, serving until `shutdown` (then draining for
/// up to `grace`).
async fn spawn_tls_proxy(
    config: Arc<tls::ServerConfig>,
    endpoints: Vec<Endpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> (SocketAddr, JoinHandle<()>) {
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
        .service(Forward::<lbkit::server::RequestBody>::new().proto("https"));
    // A port reserved for the test process: once the server stops listening, connecting to it
    // is refused (no other test's listener can take it).
    let (listener, addr) = common::listen_reserved();
    let server = Server::new(proxy)
        .tls(config)
        .tls_handshake_timeout(Duration::from_secs(2));
    let task = tokio::spawn(server.serve_with_shutdown(listener, shutdown, grace));
    (addr, task)
}

/// A self-signed certificate and its key written to `dir` as PEM files, loaded as a server
/// config; and the certificate, for clients to trust.
fn pem_config(dir: &TempDir) -> (Arc<tls::ServerConfig>, CertificateDer<'static>) {
    let (cert_pem, key_pem, der) = self_signed();
    let cert = dir.write("cert.pem", cert_pem);
    let key = dir.write("key.pem", key_pem);
    let config = tls::server_config_from_pem(&cert, &key).expect("valid PEM files");
    (config, der)
}

/// A rustls client trusting only `cert`, offering `alpn` (nothing when empty).
async fn connect(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

async fn text(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Two backends, the PEM files, and the TLS proxy in front.
async fn setup() -> (TempDir, CertificateDer<'static>, [Backend; 2], TlsProxy) {
    let dir = TempDir::new();
    let (config, der) = pem_config(&dir);
    let backends = [backend("a").await, backend("b").await];
    let endpoints = backends.iter().map(|b| Endpoint::from(b.addr)).collect();
    let proxy = start_tls_proxy(config, endpoints).await;
    (dir, der, backends, proxy)
}

#[tokio::test]
async fn http1_over_tls_by_alpn_is_balanced() {
    within(async {
        let (_dir, cert, _backends, proxy) = setup().await;
        let tls = connect(proxy.addr, &cert, &[b"http/1.1"]).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut answers = Vec::new();
        for _ in 0..4 {
            send.ready().await.unwrap();
            let req = Request::get("/")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.version(), Version::HTTP_11);
            answers.push(text(res).await);
        }
        answers.sort();
        assert_eq!(
            answers,
            [
                "a proto=https",
                "a proto=https",
                "b proto=https",
                "b proto=https"
            ]
        );
    })
    .await;
}

/// Graceful shutdown: the server stops accepting, closes an idle HTTP/1.1 keep-alive
/// connection and an HTTP/2 one (GOAWAY) after their requests, and returns before its grace
/// period (an hour, which the test would never see the end of) is over.
#[tokio::test]
async fn shutdown_closes_connections_gracefully() {
    within(async {
        let dir = TempDir::new();
        let (config, der) = pem_config(&dir);
        let backends = [backend("a").await];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = spawn_tls_proxy(
            config,
            vec![Endpoint::from(backends[0].addr)],
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(3600),
        )
        .await;

        let tls1 = connect(addr, &der, &[b"http/1.1"]).await.unwrap();
        let (mut send1, conn1) = hyper::client::conn::http1::handshake(TokioIo::new(tls1))
            .await
            .unwrap();
        let conn1 = tokio::spawn(conn1);
        let tls2 = connect(addr, &der, &[b"h2"]).await.unwrap();
        let (mut send2, conn2) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls2))
                .await
                .unwrap();
        let conn2 = tokio::spawn(conn2);
        let get = || {
            Request::get("https://localhost/")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        send1.ready().await.unwrap();
        assert_eq!(
            text(send1.send_request(get()).await.unwrap()).await,
            "a proto=https"
        );
        send2.ready().await.unwrap();
        assert_eq!(
            text(send2.send_request(get()).await.unwrap()).await,
            "a proto=https"
        );

        stop.send(()).unwrap();
        // Both client connections are closed by the server, and the server returns.
        conn1.await.unwrap().unwrap();
        conn2.await.unwrap().unwrap();
        server.await.unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    })
    .await;
}

#[tokio::test]
async fn http2_over_tls_by_alpn_is_balanced() {
    within(async {
        let (_dir, cert, _backends, proxy) = setup().await;
        let tls = connect(proxy.addr, &cert, &[b"h2"]).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        // Four requests at once on the one HTTP/2 connection.
        let mut calls = JoinSet::new();
        for _ in 0..4 {
            let mut send = send.clone();
            calls.spawn(async move {
                let req = Request::get("https://localhost/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let res = send.send_request(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                assert_eq!(res.version(), Version::HTTP_2);
                text(res).await
            });
        }
        let mut answers = calls.join_all().await;
        answers.sort();
        assert_eq!(
            answers,
            [
                "a proto=https",
                "a proto=https",
                "b proto=https",
                "b proto=https"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_client_without_alpn_gets_http1() {
    within(async {
        let (_dir, cert, _backends, proxy) = setup().await;
        let tls = connect(proxy.addr, &cert, &[]).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), None);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(text(res).await.ends_with("proto=https"));
    })
    .await;
}

#[tokio::test]
async fn websocket_over_tls_passes_through() {
    within(async {
        let (_dir, cert, _backends, proxy) = setup().await;
        let tls = connect(proxy.addr, &cert, &[b"http/1.1"]).await.unwrap();
        let (mut ws, res) = tokio_tungstenite::client_async("wss://localhost/chat", tls)
            .await
            .expect("websocket handshake over TLS");
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("over tls")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));
    })
    .await;
}

#[tokio::test]
async fn failed_handshakes_leave_the_server_serving() {
    within(async {
        let (_dir, cert, _backends, proxy) = setup().await;
        // Plain HTTP on the TLS port: the handshake fails and the connection is closed.
        let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(common::HANG, plain.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("proto="));

        // A client that trusts another certificate refuses the proxy's.
        let (_, _, other) = self_signed();
        assert!(connect(proxy.addr, &other, &[b"h2"]).await.is_err());

        // A client that never finishes its handshake is dropped after the timeout (2 s here),
        // and meanwhile others are served.
        let mut idle = TcpStream::connect(proxy.addr).await.unwrap();

        let tls = connect(proxy.addr, &cert, &[b"http/1.1"]).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            send.send_request(req).await.unwrap().status(),
            StatusCode::OK
        );

        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(common::HANG, idle.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent client is closed after the handshake timeout"
        );
    })
    .await;
}

#[tokio::test]
async fn errors_over_tls_name_no_backend() {
    within(async {
        let dir = TempDir::new();
        let (cert_pem, key_pem, der) = self_signed();
        let config = tls::server_config_from_pem(
            dir.write("cert.pem", cert_pem),
            dir.write("key.pem", key_pem),
        )
        .unwrap();
        // Reserved, never listening: connecting is refused.
        let dead = common::dead_addr().await;
        let proxy = start_tls_proxy(config, vec![Endpoint::from(dead)]).await;
        let tls = connect(proxy.addr, &der, &[b"h2"]).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("https://localhost/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        let port = dead.port().to_string();
        for (name, value) in res.headers() {
            assert!(!value.to_str().unwrap_or("").contains(&port), "{name}");
        }
        assert_eq!(text(res).await, "502 Bad Gateway\n");
    })
    .await;
}

#[test]
fn bad_pem_input_gives_typed_errors() {
    let dir = TempDir::new();
    let (cert_pem, key_pem, _) = self_signed();
    let (_, other_key_pem, _) = self_signed();
    let cert = dir.write("cert.pem", &cert_pem);
    let key = dir.write("key.pem", &key_pem);
    assert!(tls::server_config_from_pem(&cert, &key).is_ok());

    let missing = dir.0.join("missing.pem");
    let e = tls::server_config_from_pem(&missing, &key).unwrap_err();
    assert!(e.is_io(), "{e:?}");
    assert_eq!(e.path(), Some(missing.as_path()));

    let e = tls::server_config_from_pem(&cert, &missing).unwrap_err();
    assert!(e.is_io(), "{e:?}");

    let garbage = dir.write("garbage.pem", "this is not PEM at all\n");
    let e = tls::server_config_from_pem(&garbage, &key).unwrap_err();
    assert!(e.is_no_certificate(), "{e:?}");
    let e = tls::server_config_from_pem(&cert, &garbage).unwrap_err();
    assert!(e.is_no_key(), "{e:?}");

    // The certificate given as the key: PEM, but no private key in it.
    let e = tls::server_config_from_pem(&cert, &cert).unwrap_err();
    assert!(e.is_no_key(), "{e:?}");
    assert!(e.to_string().contains("cert.pem"), "{e}");

    let truncated = dir.write("truncated.pem", &cert_pem[..cert_pem.len() / 2]);
    let e = tls::server_config_from_pem(&truncated, &key).unwrap_err();
    assert!(e.is_bad_pem(), "{e:?}");

    let bad_base64 = dir.write(
        "bad64.pem",
        "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n",
    );
    let e = tls::server_config_from_pem(&cert, &bad_base64).unwrap_err();
    assert!(e.is_bad_pem(), "{e:?}");

    // Valid base64, but not a key.
    let not_a_key = dir.write(
        "not-a-key.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n",
    );
    let e = tls::server_config_from_pem(&cert, &not_a_key).unwrap_err();
    assert!(e.is_bad_pem(), "{e:?}");

    let other_key = dir.write("other-key.pem", &other_key_pem);
    let e = tls::server_config_from_pem(&cert, &other_key).unwrap_err();
    assert!(e.is_key_mismatch(), "{e:?}");

    // The same from memory.
    let e = from_pem_text(cert_pem.as_bytes(), other_key_pem.as_bytes()).unwrap_err();
    assert!(e.is_key_mismatch(), "{e:?}");
    assert!(from_pem_text(cert_pem.as_bytes(), key_pem.as_bytes()).is_ok());
    // No message carries key material.
    assert!(!e.to_string().contains("PRIVATE"));
}

/// A server configuration from PEM text in memory, as a user with a certificate from a secret
/// store builds it.
fn from_pem_text(cert: &[u8], key: &[u8]) -> Result<Arc<tls::ServerConfig>, tls::TlsError> {
    tls::TlsConfig::new(tls::CertStore::builder().default_pem(cert, key).build()?).build()
}

#[test]
fn alpn_offers_h2_then_http1() {
    let (cert_pem, key_pem, _) = self_signed();
    let config = from_pem_text(cert_pem.as_bytes(), key_pem.as_bytes()).expect("valid PEM");
    assert_eq!(
        config.alpn_protocols,
        [b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}
