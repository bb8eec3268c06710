//! The README's proxy, `examples/reverse_proxy.rs`, run as users run it (its own `proxy`
//! function, compiled into this test), in front of real backends on 127.0.0.1: a backend
//! killed under load costs no client a request, and traffic goes back to it once it returns;
//! HTTP/2-only and WebSocket-only backends work with the check that fits them.
//!
//! No assertion depends on how fast the machine is: the load is counted in requests, and the
//! time limits only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

mod common;

use std::time::Duration;

use common::fault::{start_server_at, Load};
use lbkit::endpoint::Health;
use tokio::net::TcpListener;

const HANG: Duration = Duration::from_secs(60);

/// Starts the example's proxy over `endpoints` with short health-check and ejection timers.
async fn start_proxy(
    endpoints: Vec<lbkit::Endpoint>,
) -> (
    std::net::SocketAddr,
    lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>,
    tokio::task::JoinHandle<()>,
) {
    let args = reverse_proxy::Args {
        check_interval: Duration::from_millis(100),
        ejection_time: Duration::from_millis(500),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    (addr, pool, tokio::spawn(serving))
}

/// Sends `request` (raw HTTP/1.1, with `connection: close`) on a new connection to `addr` and
/// reads the whole answer.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> Vec<u8> {
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut client, request.as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(
        HANG,
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut answer),
    )
    .await
    .expect("no answer")
    .expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_request_and_gets_traffic_back() {
    let mut servers = common::start_servers(3).await;
    let (addr, pool, task) = start_proxy(common::endpoints(&servers)).await;

    let load = Load::start(addr, 8, 20_000, Duration::ZERO);
    load.wait_for(300, HANG).await;
    // Kill one backend: its listener and every open connection close at once, with requests
    // in flight on some of them.
    let victim = servers.remove(1);
    let (name, victim_addr) = (victim.name().to_owned(), victim.addr());
    drop(victim);
    let id = lbkit::EndpointId::from(name.as_str());
    common::wait_until(HANG, "the killed backend to be taken out", || {
        pool.health(&id) != Some(Health::Healthy)
    })
    .await;
    load.wait_for(1_000, HANG).await;

    // Bring it back on its port; once the health check and outlier detection let it in,
    // requests reach it again.
    let _back = start_server_at(&name, victim_addr).await;
    common::wait_until(HANG, "the restarted backend to be healthy again", || {
        pool.health(&id) == Some(Health::Healthy)
    })
    .await;
    load.wait_for(300, HANG).await;
    let report = load.stop().await;
    // Round robin over three healthy backends: a third of these go to the one that returned.
    let after = Load::start(addr, 1, 30, Duration::ZERO).finish().await;
    task.abort();

    assert_eq!(
        report.failures,
        0,
        "{} of {} requests failed: {:?} (e.g. {:?})",
        report.failures,
        report.sent,
        report.failure_kinds,
        report.sample_failures()
    );
    assert_eq!(after.failures, 0, "{:?}", after.sample_failures());
    assert!(
        after.by_backend.get(&name).copied().unwrap_or(0) > 0,
        "no request reached the restarted backend: {:?}",
        after.by_backend
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_give_up_never_count_against_a_backend() {
    let servers = common::start_servers(3).await;
    let args = reverse_proxy::Args {
        // No health check while the answers are held below (the first comes after one
        // interval).
        check_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(
        common::endpoints(&servers),
        &args,
        listener,
        std::future::pending(),
    );
    let task = tokio::spawn(serving);
    for s in &servers {
        s.hold(u64::MAX);
    }

    // 30 clients, one after the other: each sends a request, waits until a backend has it,
    // and goes away (as `curl -m 0.2` against a slow page does).
    let total = |servers: &[common::TestServer]| servers.iter().map(|s| s.hits()).sum::<u64>();
    for _ in 0..30 {
        let before = total(&servers);
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        common::wait_until(HANG, "the request to reach a backend", || {
            total(&servers) > before
        })
        .await;
        drop(client);
    }
    common::wait_until(
        HANG,
        "the given-up requests to leave the in-flight count",
        || pool.in_flight() == 0,
    )
    .await;

    let states = pool.endpoints();
    let cancelled: u64 = states.iter().map(|(_, s)| s.cancelled()).sum();
    let errors: u64 = states.iter().map(|(_, s)| s.errors()).sum();
    assert_eq!(
        cancelled, 30,
        "every request given up on is counted as cancelled"
    );
    assert_eq!(
        errors, 0,
        "a client going away is no failure of the backend"
    );
    for (ep, state) in &states {
        assert_eq!(state.health(), Health::Healthy, "{} was taken out", ep.id());
    }

    for s in &servers {
        s.release();
    }
    let after = Load::start(addr, 1, 9, Duration::ZERO).finish().await;
    assert_eq!(after.failures, 0, "{:?}", after.sample_failures());
    task.abort();
}

#[tokio::test]
async fn a_client_cannot_strip_host_to_spoof_what_the_proxy_asserts() {
    let backend = reverse_proxy::demo::backend("backend-1")
        .await
        .expect("demo backend");
    let (addr, _pool, task) = start_proxy(vec![lbkit::Endpoint::from(backend)]).await;
    let request = "GET /headers HTTP/1.1\r\nhost: shop.example\r\nconnection: host, close\r\n\
                   x-forwarded-host: evil.example\r\nx-forwarded-proto: https\r\n\r\n";
    let answer = String::from_utf8(raw_exchange(addr, request).await).expect("utf-8");
    task.abort();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("x-forwarded-host: shop.example"),
        "{answer}"
    );
    assert!(answer.contains("x-forwarded-proto: http\n"), "{answer}");
    assert!(!answer.contains("evil.example"), "{answer}");
}

/// What the proxy asserts about the client comes from the connection: a client's own
/// `X-Forwarded-For`, `Forwarded` and `X-Real-IP` are dropped, unless its address is a
/// trusted proxy (`--trust-proxy`), whose chain is kept and appended to.
#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let backend = reverse_proxy::demo::backend("backend-1")
        .await
        .expect("demo backend");
    let request = "GET /headers HTTP/1.1\r\nhost: shop.example\r\nconnection: close\r\n\
                   x-forwarded-for: 1.2.3.4\r\nforwarded: for=1.2.3.4\r\n\
                   x-real-ip: 1.2.3.4\r\nx-forwarded-proto: https\r\n\r\n";
    for trusted in [false, true] {
        let args = reverse_proxy::Args {
            trusted_proxies: if trusted {
                vec!["127.0.0.0/8".parse().expect("cidr")]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let endpoints = vec![lbkit::Endpoint::from(backend)];
        let (_pool, serving) =
            reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
        let task = tokio::spawn(serving);
        let answer = String::from_utf8(raw_exchange(addr, request).await).expect("utf-8");
        task.abort();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        if trusted {
            assert!(
                answer.contains("x-forwarded-for: 1.2.3.4, 127.0.0.1\n"),
                "{answer}"
            );
            assert!(answer.contains("x-forwarded-proto: https\n"), "{answer}");
        } else {
            assert!(answer.contains("x-forwarded-for: 127.0.0.1\n"), "{answer}");
            assert!(answer.contains("x-forwarded-proto: http\n"), "{answer}");
            assert!(!answer.contains("1.2.3.4"), "{answer}");
        }
    }
}

/// An HTTP/2-only backend (as a gRPC server is: an HTTP/1.1 request gets a protocol error)
/// answering its name, with the protocol it was spoken to in `x-version`.
async fn h2_only_backend(
    name: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let res = http::Response::builder()
                        .header("x-version", format!("{:?}", req.version()))
                        .body(http_body_util::Full::new(bytes::Bytes::from(name)))
                        .expect("response");
                    std::future::ready(Ok::<_, std::convert::Infallible>(res))
                });
            conns.spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_only_backends_work_with_upstream_h2_and_a_tcp_check() {
    let mut backends = Vec::new();
    for name in ["h2-a", "h2-b", "h2-c"] {
        backends.push(h2_only_backend(name).await);
    }
    let endpoints = backends
        .iter()
        .zip(["h2-a", "h2-b", "h2-c"])
        .map(|((addr, _), name)| lbkit::Endpoint::new(name).with_addr(*addr))
        .collect();
    let args = reverse_proxy::Args {
        upstream: lbkit::proxy::UpstreamProtocol::Http2,
        check: Some(reverse_proxy::Check::Tcp),
        check_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    let task = tokio::spawn(serving);

    // HTTP/1.1 clients reach every HTTP/2 backend.
    let report = Load::start(addr, 3, 20, Duration::ZERO).finish().await;
    assert_eq!(report.failures, 0, "{:?}", report.sample_failures());
    assert_eq!(report.by_backend.len(), 3, "{:?}", report.by_backend);

    // So does an HTTP/2 client, and the backend is spoken to in HTTP/2.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let res = tokio::time::timeout(HANG, send.send_request(req))
        .await
        .expect("no answer")
        .expect("response");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.headers()["x-version"], "HTTP/2.0");
    task.abort();
    for (_, t) in backends {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_only_backend_works_with_the_default_upstream_protocol() {
    // The default upstream protocol (HTTP/1.1) and the default check: the proxy's first request
    // meets the backend's HTTP/2 answer on a new connection, and is sent again over HTTP/2.
    let (backend, backend_task) = h2_only_backend("h2-only").await;
    let (addr, _pool, task) = start_proxy(vec![lbkit::Endpoint::from(backend)]).await;
    let get = "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    for _ in 0..3 {
        let answer = String::from_utf8_lossy(&raw_exchange(addr, get).await).to_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-version: http/2.0"), "{answer}");
        assert!(answer.ends_with("h2-only"), "{answer}");
    }
    // A request with a body goes over HTTP/2 too, now that the backend is known.
    let post = "POST /form HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\
                connection: close\r\n\r\nhello";
    let answer = String::from_utf8_lossy(&raw_exchange(addr, post).await).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("x-version: http/2.0"), "{answer}");
    task.abort();
    backend_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_an_http1_request_in_http2_gets_it_again_over_http2() {
    // An HTTP/2-only server that sends its preface only once it has read something: the
    // proxy's HTTP/1.1 request is written, and answered with an HTTP/2 SETTINGS frame.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let backend_task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 4];
                if stream.peek(&mut first).await.is_err() {
                    return;
                }
                if &first != b"PRI " {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                    // An empty SETTINGS frame, then GOAWAY (PROTOCOL_ERROR): the bad preface.
                    let frames = [
                        &[0, 0, 0, 4, 0, 0, 0, 0, 0][..],
                        &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1][..],
                    ]
                    .concat();
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &frames).await;
                    return;
                }
                let svc =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                        let res = http::Response::builder()
                            .header("x-version", format!("{:?}", req.version()))
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                "late-preface",
                            )))
                            .expect("response");
                        std::future::ready(Ok::<_, std::convert::Infallible>(res))
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    let (addr, _pool, task) = start_proxy(vec![lbkit::Endpoint::from(backend)]).await;
    let get = "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    for _ in 0..2 {
        let answer = String::from_utf8_lossy(&raw_exchange(addr, get).await).to_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-version: http/2.0"), "{answer}");
        assert!(answer.ends_with("late-preface"), "{answer}");
    }
    task.abort();
    backend_task.abort();
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_tunnelled_to_the_backend() {
    let backend = reverse_proxy::demo::backend("backend-1")
        .await
        .expect("demo backend");
    let (addr, _pool, task) = start_proxy(vec![lbkit::Endpoint::from(backend)]).await;
    let request =
        "GET /headers HTTP/1.1\r\nhost: x\r\nconnection: upgrade, http2-settings, close\r\n\
                   upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let answer = String::from_utf8_lossy(&raw_exchange(addr, request).await).to_lowercase();
    task.abort();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(
        !answer.contains("upgrade: h2c"),
        "the upgrade reached the backend: {answer}"
    );
}

#[tokio::test]
async fn with_compress_responses_are_gzipped_for_clients_that_accept_it() {
    let backend = reverse_proxy::demo::backend("backend-1")
        .await
        .expect("demo backend");
    for compress in [false, true] {
        let args = reverse_proxy::Args {
            compress,
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
        let task = tokio::spawn(serving);
        let request = "GET /headers HTTP/1.1\r\nhost: x\r\naccept-encoding: gzip\r\nconnection: close\r\n\r\n";
        let answer = raw_exchange(addr, request).await;
        task.abort();
        let head_end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&answer[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let body = &answer[head_end + 4..];
        if compress {
            assert!(head.contains("content-encoding: gzip"), "{head}");
            // A gzip stream (chunked: the first chunk's data starts after its size line).
            let chunk = body.splitn(2, |&b| b == b'\n').nth(1).expect("a chunk");
            assert_eq!(&chunk[..2], [0x1f, 0x8b], "not gzip: {head}");
        } else {
            assert!(!head.contains("content-encoding"), "{head}");
            assert!(String::from_utf8_lossy(body).contains("backend-1 received"));
        }
    }
}

/// One failure classification: a backend answering `500` has its idempotent requests retried
/// on another backend (as outlier detection counts the 500s against it), so clients see none.
#[tokio::test]
async fn a_backend_answering_500_costs_no_client_a_500() {
    let bad = reverse_proxy::demo::serve(tower::service_fn(
        // Its health check (`GET /`) passes; the requests (`/api`) fail.
        |req: http::Request<lbkit::server::RequestBody>| async move {
            let mut res =
                http::Response::new(http_body_util::Full::new(bytes::Bytes::from("oops")));
            if req.uri().path() != "/" {
                *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            Ok::<_, std::convert::Infallible>(res)
        },
    ))
    .await
    .expect("bad backend");
    let good = reverse_proxy::demo::backend("good")
        .await
        .expect("good backend");
    let (addr, pool, task) = start_proxy(vec![
        lbkit::Endpoint::from(bad),
        lbkit::Endpoint::from(good),
    ])
    .await;
    for _ in 0..20 {
        let answer = String::from_utf8(
            raw_exchange(
                addr,
                "GET /api HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await,
        )
        .expect("utf-8");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let stats = pool.stats();
    let bad_stats = stats.endpoint(&bad.to_string()).expect("bad endpoint");
    assert!(
        bad_stats.errors >= 1,
        "the 500s counted against it: {bad_stats:?}"
    );
    task.abort();
}

/// A backend that speaks only WebSocket: a plain request (a health check's `GET /`) gets a
/// 400; a WebSocket handshake is upgraded and every message echoed.
async fn websocket_only_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(
                |mut req: http::Request<hyper::body::Incoming>| async move {
                    let builder = http::Response::builder();
                    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                        return builder.status(400).body(http_body_util::Full::new(
                            bytes::Bytes::from("WebSocket only"),
                        ));
                    };
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                            hyper_util::rt::TokioIo::new(upgraded),
                            Role::Server,
                            None,
                        )
                        .await;
                        while let Some(Ok(msg)) = ws.next().await {
                            if msg.is_close() {
                                break;
                            }
                            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                                break;
                            }
                        }
                    });
                    builder
                        .status(http::StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                },
            );
            conns.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .with_upgrades(),
            );
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_only_backend_works_with_a_tcp_check() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (backend, backend_task) = websocket_only_backend().await;
    let args = reverse_proxy::Args {
        check: Some(reverse_proxy::Check::Tcp),
        check_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let endpoints = vec![lbkit::Endpoint::new("ws").with_addr(backend)];
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    let task = tokio::spawn(serving);

    // Three rounds of the TCP check pass: the backend stays in rotation although its answer
    // to a plain `GET /` (the default check) is a 400.
    let mut seen = Vec::new();
    common::wait_until(HANG, "three passed TCP checks", || {
        let stats = pool.stats();
        let endpoint = &stats.endpoints[0];
        assert_eq!(
            endpoint.health,
            Health::Healthy,
            "{:?}",
            endpoint.last_check
        );
        if let Some(check) = &endpoint.last_check {
            assert!(check.passed(), "{check:?}");
            if !seen.contains(&check.at) {
                seen.push(check.at);
            }
        }
        seen.len() >= 3
    })
    .await;

    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut ws, res) = tokio::time::timeout(
        HANG,
        tokio_tungstenite::client_async(format!("ws://{addr}/echo"), stream),
    )
    .await
    .expect("no handshake")
    .expect("WebSocket handshake through the proxy");
    assert_eq!(res.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..200 {
        let msg = Message::text(format!("message {i}"));
        ws.send(msg.clone()).await.expect("send");
        let echo = tokio::time::timeout(HANG, ws.next())
            .await
            .expect("no echo")
            .expect("stream ended")
            .expect("echo");
        assert_eq!(echo, msg);
    }
    ws.close(None).await.expect("close");
    task.abort();
    backend_task.abort();
}
