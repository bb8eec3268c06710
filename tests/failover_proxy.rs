//! Failover of requests that never left the proxy, through the README's proxy
//! (`examples/reverse_proxy.rs`'s own `proxy` function) in front of real servers on 127.0.0.1:
//! a `POST` or a gRPC call whose backend is a closed port (connection refused) is sent to
//! another backend, body and all, while a `POST` that reached a backend which then died is
//! never sent twice.
//!
//! Everything is counted (requests, errors per endpoint); the time limits only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

const HANG: Duration = Duration::from_secs(60);

type Pool = lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>;

/// Starts the example's proxy over `endpoints`. Its active health check runs only after an
/// hour, so a dead backend stays in rotation until outlier detection ejects it (after 5
/// failed requests in a row): the failover layer meets it.
async fn start_proxy(
    endpoints: Vec<Endpoint>,
    args: reverse_proxy::Args,
) -> (SocketAddr, Pool, JoinHandle<()>) {
    let args = reverse_proxy::Args {
        check_interval: Duration::from_secs(3600),
        ..args
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    (addr, pool, tokio::spawn(serving))
}

/// Failed attempts the proxy sent to endpoint `id`.
fn errors(pool: &Pool, id: &str) -> u64 {
    pool.stats().endpoint(id).map_or(0, |e| e.errors)
}

/// An HTTP/1.1 server that answers every request with `name:` and the request body, and
/// counts the requests by method.
struct EchoServer {
    addr: SocketAddr,
    posts: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    async fn start(name: &'static str) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let posts = Arc::new(AtomicU64::new(0));
        let counted = posts.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let posts = counted.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let posts = posts.clone();
                        async move {
                            if req.method() == http::Method::POST {
                                posts.fetch_add(1, Ordering::SeqCst);
                            }
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut text = format!("{name}:").into_bytes();
                            text.extend_from_slice(&body);
                            Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        EchoServer { addr, posts, task }
    }

    fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint::new(name).with_addr(self.addr)
    }

    fn posts(&self) -> u64 {
        self.posts.load(Ordering::SeqCst)
    }
}

type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

/// `text` as a body of one frame with a `content-length`, or streamed (chunked) in two.
fn body(text: String, streamed: bool) -> ClientBody {
    if !streamed {
        return Full::new(Bytes::from(text)).boxed_unsync();
    }
    let (a, b) = text.split_at(text.len() / 2);
    let frames = [a.to_owned(), b.to_owned()]
        .map(|part| Ok::<_, Infallible>(Frame::data(Bytes::from(part))));
    StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

/// Sends `method` with `text` through the proxy at `addr`; the status and the answer's text.
async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, ClientBody>,
    addr: SocketAddr,
    method: http::Method,
    text: String,
    streamed: bool,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}/orders"))
        .body(body(text, streamed))
        .expect("request");
    let res = client.request(req).await.expect("the proxy answers");
    let status = res.status();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// 50 `POST`s, with bodies of one frame or streamed in two, over two backends and a closed
/// port: every one is answered by a live backend with its whole body, none fails, and each
/// one that met the closed port (connection refused: it never left the proxy) was sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_that_meet_a_closed_port_are_sent_to_another_backend() {
    common::within(HANG, async {
        let a = EchoServer::start("a").await;
        let b = EchoServer::start("b").await;
        let dead = common::dead_addr().await;
        let endpoints = vec![
            a.endpoint("a"),
            Endpoint::new("dead").with_addr(dead),
            b.endpoint("b"),
        ];
        let (addr, pool, task) = start_proxy(endpoints, Default::default()).await;
        let client = client();
        let mut failures = 0;
        for i in 0..50 {
            let order = format!("order number {i}, one pizza");
            let (status, text) =
                send(&client, addr, http::Method::POST, order.clone(), i % 2 == 1).await;
            if status != StatusCode::OK {
                failures += 1;
                continue;
            }
            assert!(
                text == format!("a:{order}") || text == format!("b:{order}"),
                "{text}"
            );
        }
        let refused = errors(&pool, "dead");
        eprintln!(
            "50 POSTs, one backend a closed port: {failures} failed; {refused} met the closed \
             port and were sent on (each a failed POST before); a={} b={}",
            a.posts(),
            b.posts()
        );
        task.abort();
        assert_eq!(failures, 0);
        assert!(refused >= 1, "round robin sends the closed port its turn");
        assert_eq!(
            a.posts() + b.posts(),
            50,
            "each POST reached one backend once"
        );
    })
    .await;
}

/// What a backend that dies does once it has a request.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Reads the request head, then closes the connection.
    AfterTheHead,
    /// Reads the request head, writes half a response head, then closes.
    MidResponse,
}

/// A backend that reads each request's head and dies as `death` says, counting the requests
/// by method.
struct DyingServer {
    addr: SocketAddr,
    posts: Arc<AtomicU64>,
    gets: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for DyingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DyingServer {
    async fn start(death: Death) -> DyingServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (posts, gets) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (p, g) = (posts.clone(), gets.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let (p, g) = (p.clone(), g.clone());
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let counter = if head.starts_with(b"POST ") { &p } else { &g };
                    counter.fetch_add(1, Ordering::SeqCst);
                    if let Death::MidResponse = death {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
                        let _ = stream.flush().await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        DyingServer {
            addr,
            posts,
            gets,
            task,
        }
    }
}

/// A `POST` that reached its backend, which then died (closed the connection after reading
/// the head, or halfway through the response head), is answered 502 and never sent to another
/// backend: it may have had its effect. A `GET` meeting the same death is sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_backend_which_then_died_is_not_sent_again() {
    common::within(HANG, async {
        for death in [Death::AfterTheHead, Death::MidResponse] {
            let dying = DyingServer::start(death).await;
            let ok = EchoServer::start("ok").await;
            let endpoints = vec![
                Endpoint::new("dying").with_addr(dying.addr),
                ok.endpoint("ok"),
            ];
            let (addr, pool, task) = start_proxy(endpoints, Default::default()).await;
            let client = client();

            // Round robin over two: the dying backend gets every other POST (3 of 6, fewer
            // failures in a row than outlier detection's 5), with a body of one frame, a
            // streamed one and an empty one among them. An empty body is never read, so only
            // the failure's kind keeps that POST from being sent again.
            let mut bad_gateway = 0;
            for i in 0..6 {
                let order = if i % 3 == 2 {
                    String::new()
                } else {
                    format!("order {i}")
                };
                let (status, text) =
                    send(&client, addr, http::Method::POST, order.clone(), i % 3 == 1).await;
                match status {
                    StatusCode::OK => assert_eq!(text, format!("ok:{order}")),
                    StatusCode::BAD_GATEWAY => bad_gateway += 1,
                    other => panic!("{death:?}: {other}"),
                }
            }
            let (dying_posts, ok_posts) = (dying.posts.load(Ordering::SeqCst), ok.posts());
            eprintln!(
                "{death:?}: 6 POSTs, {dying_posts} reached the dying backend and failed \
                 ({bad_gateway} answered 502), {ok_posts} served by the other"
            );
            assert!(dying_posts >= 1, "{death:?}");
            assert_eq!(
                bad_gateway, dying_posts,
                "{death:?}: each one failed, none sent on"
            );
            assert_eq!(dying_posts + ok_posts, 6, "{death:?}: each POST sent once");

            // GETs meeting the same death are retried on the other backend.
            for i in 0..2 {
                let (status, _) =
                    send(&client, addr, http::Method::GET, String::new(), false).await;
                assert_eq!(status, StatusCode::OK, "{death:?}: GET {i}");
            }
            assert!(dying.gets.load(Ordering::SeqCst) >= 1, "{death:?}");
            assert_eq!(
                errors(&pool, "dying"),
                dying_posts + dying.gets.load(Ordering::SeqCst)
            );
            task.abort();
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// gRPC: a real gRPC client (tonic's) through the proxy's h2c listener, to gRPC servers written
// here on hyper's HTTP/2 server (the proxy's behaviour must not depend on tonic's server).

/// `message Text { string text = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct Text {
    #[prost(string, tag = "1")]
    text: String,
}

const ECHO: &str = "/test.Echo/Say";

/// A gRPC server over HTTP/2 (prior knowledge) whose one method answers `Text` with
/// `name:` and the request's text, with `grpc-status: 0` in the trailers.
async fn grpc_server(name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let mut body = req.into_body().collect().await?.to_bytes();
                    // One length-prefixed message: a compression flag, a 4-byte length, then
                    // the protobuf bytes.
                    let message = if body.len() >= 5 {
                        body.advance(5);
                        <Text as prost::Message>::decode(body).unwrap_or_default()
                    } else {
                        Text::default()
                    };
                    let reply = Text {
                        text: format!("{name}:{}", message.text),
                    };
                    let encoded = prost::Message::encode_to_vec(&reply);
                    let mut frame = vec![0u8];
                    frame.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
                    frame.extend_from_slice(&encoded);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = [
                        Ok::<_, Infallible>(Frame::data(Bytes::from(frame))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let mut res = Response::new(StreamBody::new(futures::stream::iter(frames)));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, hyper::Error>(res)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

/// 30 unary gRPC calls (each a `POST` with a streamed body) over two gRPC servers and a
/// stopped one (its port closed): every call succeeds, answered with its own message, and
/// each that met the stopped server was sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_that_meet_a_stopped_server_are_sent_to_another() {
    common::within(HANG, async {
        let (a, task_a) = grpc_server("a").await;
        let (b, task_b) = grpc_server("b").await;
        let stopped = common::dead_addr().await;
        let endpoints = vec![
            Endpoint::new("a").with_addr(a),
            Endpoint::new("stopped").with_addr(stopped),
            Endpoint::new("b").with_addr(b),
        ];
        let args = reverse_proxy::Args {
            upstream: lbkit::proxy::UpstreamProtocol::Http2,
            check: Some(reverse_proxy::Check::Tcp),
            ..Default::default()
        };
        let (addr, pool, task) = start_proxy(endpoints, args).await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to the proxy");
        let mut client = tonic::client::Grpc::new(channel);
        let (mut failed, mut served) = (0, std::collections::BTreeMap::<String, u32>::new());
        for i in 0..30 {
            client.ready().await.expect("ready");
            let call = client
                .unary(
                    tonic::Request::new(Text {
                        text: format!("call {i}"),
                    }),
                    http::uri::PathAndQuery::from_static(ECHO),
                    tonic_prost::ProstCodec::<Text, Text>::default(),
                )
                .await;
            match call {
                Ok(reply) => {
                    let text = reply.into_inner().text;
                    let (server, said) = text.split_once(':').expect("name:text");
                    assert_eq!(said, format!("call {i}"));
                    *served.entry(server.to_owned()).or_default() += 1;
                }
                Err(status) => {
                    eprintln!("call {i}: {status:?}");
                    failed += 1;
                }
            }
        }
        let refused = errors(&pool, "stopped");
        eprintln!(
            "30 gRPC calls, one server stopped: {failed} failed; {refused} met the stopped \
             server and were sent on; served {served:?}"
        );
        task.abort();
        task_a.abort();
        task_b.abort();
        assert_eq!(failed, 0);
        assert!(
            refused >= 1,
            "round robin sends the stopped server its turn"
        );
        assert_eq!(served.values().sum::<u32>(), 30);
        assert_eq!(served.len(), 2, "{served:?}");
    })
    .await;
}
