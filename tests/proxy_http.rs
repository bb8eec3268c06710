//! The HTTP forwarding proxy over real sockets on 127.0.0.1: real hyper backends, the proxy
//! served by a real hyper server, and hyper clients (or raw TCP for malformed input).
//!
//! What is checked: headers set and stripped both ways, `Host` and the URI path kept, a
//! WebSocket upgrade end to end, 100 MB streamed each way with bounded memory, the error
//! statuses (502 refused and reset, 503 no endpoint, 504 timeout) with bodies and headers that
//! never name a backend, malformed requests answered 4xx by hyper without reaching a backend,
//! and HTTP/2 on both sides of the proxy.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use lbkit::forwarded::{ClientAddr, ForwardedHeaders};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tower::{Service, ServiceBuilder};

type BackendBody = BoxBody<Bytes, Infallible>;

/// Every test ends within this, or fails; only a hang takes that long.
const LIMIT: Duration = Duration::from_secs(120);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test did not finish in time")
}

fn full(b: impl Into<Bytes>) -> BackendBody {
    Full::new(b.into()).boxed()
}

// ---------------------------------------------------------------------------------------------
// Backends

/// What a backend saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
}

/// A real hyper backend on 127.0.0.1 (HTTP/1.1 with upgrades, or HTTP/2 only); it records
/// every request head it gets, and stops with its connections when dropped.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    fn endpoint(&self) -> Endpoint {
        Endpoint::from(self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn last(&self) -> Seen {
        self.seen().pop().expect("the backend saw a request")
    }
}

async fn backend<H, F>(http2: bool, handler: H) -> Backend
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BackendBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    backend_on(listener, http2, handler)
}

/// [`backend`], on `listener`.
fn backend_on<H, F>(listener: TcpListener, http2: bool, handler: H) -> Backend
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<BackendBody>> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (handler, log) = (handler.clone(), log.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                log.lock().unwrap().push(Seen {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    version: req.version(),
                    headers: req.headers().clone(),
                });
                let res = handler(req);
                async move { Ok::<_, Infallible>(res.await) }
            });
            conns.spawn(async move {
                let io = TokioIo::new(stream);
                let _ = if http2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                };
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Backend { addr, seen, task }
}

/// A backend answering `ok` with hop-by-hop and identifying response headers that the proxy
/// must strip or hide.
async fn chatty_backend() -> Backend {
    backend(false, |_req| async {
        Response::builder()
            .header("connection", "x-backend-secret")
            .header("x-backend-secret", "s3cret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=\"inner\"")
            .header("proxy-connection", "keep-alive")
            .header("trailer", "x-checksum")
            .header("upgrade", "h2c")
            .header("server", "backend/1.0")
            .header("x-powered-by", "testsuite")
            .header("x-kept", "yes")
            .body(full("ok"))
            .unwrap()
    })
    .await
}

/// A TCP listener that accepts connections and runs `on_conn` on each, for backends that
/// misbehave below HTTP.
fn raw_backend<F, Fut>(on_conn: F) -> (SocketAddr, JoinHandle<()>, Arc<AtomicU64>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let listener = TcpListener::from_std(std_listener).unwrap();
        let mut conns = JoinSet::new();
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            conns.spawn(on_conn(s));
        }
    });
    (addr, task, accepted)
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// The proxy served by hyper-util's auto server (HTTP/1.1 with upgrades, or h2c) on 127.0.0.1,
/// with `ClientAddr` set per connection as a real deployment does; stops when dropped.
struct Proxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `proxy` on `listener` (see [`Proxy`]).
fn serve_proxy_on<S, B>(listener: TcpListener, proxy: S) -> Proxy
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let svc = ServiceBuilder::new()
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(ClientAddr(peer));
                    req
                })
                .service(proxy.clone());
            conns.spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        TowerToHyperService::new(svc),
                    )
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Proxy { addr, task }
}

/// The usual stack: error mapping, a round-robin balancer over `endpoints`, and `forward`.
async fn start_proxy(endpoints: Vec<Endpoint>, forward: Forward<Incoming>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_proxy_on(listener, endpoints, forward)
}

/// [`start_proxy`], on `listener`.
fn start_proxy_on(
    listener: TcpListener,
    endpoints: Vec<Endpoint>,
    forward: Forward<Incoming>,
) -> Proxy {
    serve_proxy_on(
        listener,
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
            .service(forward),
    )
}

// ---------------------------------------------------------------------------------------------
// Clients

/// An HTTP/1.1 connection to `addr`, with hyper's low-level client (which sends the headers it
/// is given, hop-by-hop ones included).
async fn h1_client<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    h1_client_on(TcpStream::connect(addr).await.unwrap()).await
}

/// [`h1_client`], over `stream`.
async fn h1_client_on<B>(stream: TcpStream) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

async fn send<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    h1_client(addr).await.send_request(req).await.unwrap()
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "shop.example")
}

async fn text(res: Response<Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Fails if any response header (name or value) mentions the backend's address or port.
fn assert_no_backend_in_headers(headers: &HeaderMap, backend: SocketAddr) {
    let port = backend.port().to_string();
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !v.contains(&port) && !name.as_str().contains(&port),
            "header {name}: {v} names the backend {backend}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Headers

#[tokio::test]
async fn request_hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    within(async {
        let be = chatty_backend().await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let req = get("/a/b?c=d")
            .header("connection", "keep-alive, x-drop-me")
            .header("x-drop-me", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers, deflate;q=0.5")
            .header("trailer", "x-checksum")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("proxy-connection", "keep-alive")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-keep", "yes")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send(proxy.addr, req).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "ok");

        let seen = be.last();
        let h = &seen.headers;
        for gone in [
            "connection",
            "x-drop-me",
            "keep-alive",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
            "upgrade",
            "transfer-encoding",
        ] {
            assert!(!h.contains_key(gone), "{gone} reached the backend: {h:?}");
        }
        assert_eq!(h["x-keep"], "yes");
        // TE is hop-by-hop, but its `trailers` token is passed on (RFC 9110 §10.1.4).
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["host"], "shop.example", "Host is preserved");
        // In origin form, as HTTP/1.1 asks of a request to an origin server.
        assert_eq!(seen.uri, "/a/b?c=d");
        // The client is not a trusted proxy: its own X-Forwarded-For is dropped.
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert!(!h.contains_key("forwarded"));
        assert_eq!(seen.version, Version::HTTP_11);
    })
    .await;
}

#[tokio::test]
async fn response_hop_by_hop_and_hidden_headers_are_stripped() {
    within(async {
        let be = chatty_backend().await;
        let forward = Forward::new()
            .hide_response_header(http::header::SERVER)
            .hide_response_header(http::HeaderName::from_static("x-powered-by"));
        let proxy = start_proxy(vec![be.endpoint()], forward).await;
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers().clone();
        for gone in [
            "x-backend-secret",
            "keep-alive",
            "proxy-authenticate",
            "proxy-connection",
            "trailer",
            "upgrade",
            "server",
            "x-powered-by",
        ] {
            assert!(!h.contains_key(gone), "{gone} reached the client: {h:?}");
        }
        // The proxy's own server may say `connection: keep-alive`/`close` for its own hop, but
        // never repeat the backend's list.
        for v in h.get_all("connection") {
            assert!(!v.to_str().unwrap().contains("x-backend-secret"));
        }
        assert_eq!(h["x-kept"], "yes");
        assert_no_backend_in_headers(&h, be.addr);
        assert_eq!(text(res).await, "ok");
    })
    .await;
}

#[tokio::test]
async fn redirects_and_cookies_naming_the_backend_are_rewritten() {
    within(async {
        // A backend that builds absolute URLs and cookie domains from the Host it gets: with
        // `preserve_host(false)` that is its own address.
        let be = backend(false, |req: Request<Incoming>| async move {
            let host = req.headers()["host"].to_str().unwrap().to_owned();
            let ip = host.rsplit_once(':').unwrap().0.to_owned();
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", format!("http://{host}/next?page=2"))
                .header("content-location", format!("http://{host}/here"))
                .header(
                    "set-cookie",
                    format!("sid=1; Domain={ip}; Path=/; HttpOnly"),
                )
                .header("set-cookie", "theme=dark; Path=/")
                .body(full("moved"))
                .unwrap()
        })
        .await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new().preserve_host(false)).await;
        let res = send(proxy.addr, get("/old").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::FOUND);
        let h = res.headers().clone();
        assert_eq!(h["location"], "/next?page=2");
        assert_eq!(h["content-location"], "/here");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["sid=1; Path=/; HttpOnly", "theme=dark; Path=/"]);
        assert_no_backend_in_headers(&h, be.addr);
        for v in h.values() {
            assert!(!v.to_str().unwrap_or("").contains("127.0.0.1"), "{v:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn forwarded_header_follows_rfc_7239_and_appends() {
    within(async {
        let be = chatty_backend().await;
        let proxy = start_proxy(
            vec![be.endpoint()],
            // The client stands for a proxy in front: trusted, its chain is appended to.
            Forward::new()
                .forwarded(ForwardedHeaders::Forwarded)
                .trusted_proxies(["127.0.0.1".parse::<lbkit::forwarded::Cidr>().unwrap()]),
        )
        .await;
        let req = get("/")
            .header("forwarded", "for=203.0.113.7;proto=https")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);
        let h = be.last().headers;
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=shop.example"
        );
        for absent in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
            assert!(
                !h.contains_key(absent),
                "{absent} written in Forwarded mode"
            );
        }

        // Both at once, with the scheme a TLS-terminating proxy reports.
        let proxy = start_proxy(
            vec![be.endpoint()],
            Forward::new()
                .forwarded(ForwardedHeaders::Both)
                .proto("https"),
        )
        .await;
        let req = get("/").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);
        let h = be.last().headers;
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=https;host=shop.example"
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");

        // None: the backend learns nothing about the client.
        let proxy = start_proxy(
            vec![be.endpoint()],
            Forward::new().forwarded(ForwardedHeaders::None),
        )
        .await;
        let req = get("/").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);
        let h = be.last().headers;
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-forwarded-for"));
    })
    .await;
}

#[tokio::test]
async fn host_is_preserved_or_rewritten_as_configured() {
    within(async {
        let be = chatty_backend().await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let req = get("/x").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);
        assert_eq!(be.last().headers["host"], "shop.example");

        let proxy = start_proxy(vec![be.endpoint()], Forward::new().preserve_host(false)).await;
        let req = get("/x").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);
        let seen = be.last();
        assert_eq!(seen.headers["host"], be.addr.to_string().as_str());
        // The original host is still told to the backend.
        assert_eq!(seen.headers["x-forwarded-host"], "shop.example");
    })
    .await;
}

#[tokio::test]
async fn requests_are_balanced_over_backends() {
    within(async {
        let a = chatty_backend().await;
        let b = chatty_backend().await;
        let proxy = start_proxy(vec![a.endpoint(), b.endpoint()], Forward::new()).await;
        let mut client = h1_client(proxy.addr).await;
        for _ in 0..10 {
            client.ready().await.unwrap();
            let res = client
                .send_request(get("/").body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            assert_eq!(text(res).await, "ok");
        }
        assert_eq!((a.seen().len(), b.seen().len()), (5, 5));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket

/// A backend that does the WebSocket handshake with `hyper::upgrade::on` and echoes messages.
async fn websocket_backend() -> Backend {
    backend(false, |mut req: Request<Incoming>| async move {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full("not a websocket request"))
                .unwrap();
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = on_upgrade.await.expect("backend upgrade");
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if msg.is_text() || msg.is_binary() {
                    ws.send(msg).await.expect("echo");
                }
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(full(Bytes::new()))
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn websocket_upgrade_passes_through_end_to_end() {
    within(async {
        let be = websocket_backend().await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let url = format!("ws://{}/chat", proxy.addr);
        let (mut ws, res) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("websocket handshake through the proxy");
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_no_backend_in_headers(res.headers(), be.addr);

        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let big = vec![7u8; 256 * 1024];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
        ws.close(None).await.unwrap();

        let seen = be.last();
        assert_eq!(seen.headers["upgrade"], "websocket");
        assert_eq!(seen.headers["connection"], "upgrade");
        assert!(seen.headers.contains_key("sec-websocket-key"));
        assert!(seen.headers.contains_key("x-forwarded-for"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Streaming 100 MB each way

const CHUNK: usize = 64 * 1024;
const TOTAL: u64 = 100 * 1024 * 1024;
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

/// A body of `TOTAL` bytes made lazily from one static chunk, counting what it produced, and
/// keeping in `max_gap` the most bytes it was ahead of `consumed` (counted by the receiving
/// end): the bytes in flight between the two ends. The gap only grows when a chunk is made, so
/// looking then finds its largest value.
fn counted_stream(
    produced: Arc<AtomicU64>,
    consumed: Arc<AtomicU64>,
    max_gap: Arc<AtomicU64>,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send> {
    StreamBody::new(futures::stream::unfold(0u64, move |sent| {
        let (produced, consumed, max_gap) = (produced.clone(), consumed.clone(), max_gap.clone());
        async move {
            if sent >= TOTAL {
                return None;
            }
            let n = CHUNK.min((TOTAL - sent) as usize);
            let now = produced.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            max_gap.fetch_max(
                now.saturating_sub(consumed.load(Ordering::SeqCst)),
                Ordering::SeqCst,
            );
            Some((
                Ok(Frame::data(Bytes::from_static(&ZEROS[..n]))),
                sent + n as u64,
            ))
        }
    }))
}

/// Reads a body to its end without keeping it, counting bytes into `consumed`.
async fn drain<B>(mut body: B, consumed: &AtomicU64)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            consumed.fetch_add(data.len() as u64, Ordering::SeqCst);
        }
    }
}

/// The process's resident set now and its peak, in KiB (Linux).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The kernel buffers the sockets the test sets up have, each way: a few times this (the
/// kernel doubles it), with no autotuning.
const SOCKET_BUFFER: u32 = 64 * 1024;

/// A socket of 127.0.0.1 with [`SOCKET_BUFFER`]-sized kernel buffers (inherited by the
/// connections a listener accepts).
fn small_buffer_socket() -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
    socket.set_send_buffer_size(SOCKET_BUFFER).unwrap();
    socket
}

fn small_buffer_listener() -> TcpListener {
    let socket = small_buffer_socket();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(1024).unwrap()
}

/// The largest buffer the kernel may give a TCP socket that autotunes (field 3 of
/// `/proc/sys/net/ipv4/{name}`), in bytes.
fn autotuned_max(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(32 << 20)
}

/// 100 MiB each way through the proxy: it streams, never holding much of a body. Between the
/// end that makes the body and the end that reads it, the bytes in flight are at most the
/// kernel buffers on the way (small ones on every socket the test makes; the proxy's
/// connection to the backend autotunes up to the kernel's limits) and the few buffers of each
/// HTTP implementation, far less than the body: that bound is the proxy's memory bound, checked
/// whatever else the process does. (The peak RSS is printed too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_stream_both_ways_with_bounded_memory() {
    let (up_received, up_gap) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (down_produced, down_consumed, down_gap) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (r, p, c, g) = (
        up_received.clone(),
        down_produced.clone(),
        down_consumed.clone(),
        down_gap.clone(),
    );
    let be = backend_on(
        small_buffer_listener(),
        false,
        move |req: Request<Incoming>| {
            let (received, produced, consumed, gap) = (r.clone(), p.clone(), c.clone(), g.clone());
            async move {
                if req.method() == Method::POST {
                    // Count the upload as it arrives; never hold it whole.
                    let mut body = req.into_body();
                    let mut n = 0u64;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.expect("upload frame").into_data() {
                            n += data.len() as u64;
                            received.fetch_add(data.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Response::new(full(n.to_string()))
                } else {
                    Response::new(BodyExt::boxed(counted_stream(produced, consumed, gap)))
                }
            }
        },
    );
    let proxy = start_proxy_on(small_buffer_listener(), vec![be.endpoint()], Forward::new());

    within(async {
        let stream = small_buffer_socket().connect(proxy.addr).await.unwrap();
        let mut client = h1_client_on(stream).await;
        // Warm up the connections and pools.
        let res = client
            .send_request(
                Request::post("/warm")
                    .body(Full::new(Bytes::from_static(b"x")).boxed())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(text(res).await, "1");
        up_received.store(0, Ordering::SeqCst);

        // Reset the peak (VmHWM) to the current RSS where the kernel allows it.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let (rss_before, _) = memory_kib();

        // Upload: client -> proxy -> backend.
        let up_sent = Arc::new(AtomicU64::new(0));
        let req = Request::post("/upload")
            .body(BodyExt::boxed(counted_stream(
                up_sent.clone(),
                up_received.clone(),
                up_gap.clone(),
            )))
            .unwrap();
        client.ready().await.unwrap();
        let res = client.send_request(req).await.expect("upload");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, TOTAL.to_string());
        assert_eq!(up_received.load(Ordering::SeqCst), TOTAL);

        // Download: backend -> proxy -> client.
        client.ready().await.unwrap();
        let res = client
            .send_request(
                Request::get("/download")
                    .body(Empty::new().boxed())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        drain(res.into_body(), &down_consumed).await;
        assert_eq!(down_consumed.load(Ordering::SeqCst), TOTAL);

        let (_, peak) = memory_kib();
        let growth_mib = peak.saturating_sub(rss_before) as f64 / 1024.0;
        let (up, down) = (
            up_gap.load(Ordering::SeqCst),
            down_gap.load(Ordering::SeqCst),
        );
        // Every socket the test made: 2 × SOCKET_BUFFER each way (the kernel doubles it), the
        // client's and the proxy's ends of the first hop, the backend's end of the second.
        let ours = 3 * 2 * u64::from(SOCKET_BUFFER);
        // Each HTTP implementation's own buffers (hyper's read and write buffers, a frame or
        // two in flight), a few hundred KiB each, with room to spare.
        let http = 8 << 20;
        let up_bound = ours + autotuned_max("tcp_wmem") + http;
        let down_bound = ours + autotuned_max("tcp_rmem") + http;
        eprintln!(
            "100 MiB each way: at most {} KiB in flight up (bound {} KiB), {} KiB down \
             (bound {} KiB); peak RSS growth {growth_mib:.1} MiB",
            up / 1024,
            up_bound / 1024,
            down / 1024,
            down_bound / 1024,
        );
        assert!(
            up_bound < TOTAL / 2 && down_bound < TOTAL / 2,
            "the kernel's socket buffers are too large to tell streaming from buffering"
        );
        assert!(up <= up_bound, "{up} bytes in flight on the way up");
        assert!(down <= down_bound, "{down} bytes in flight on the way down");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Checks an error answer: status, the short body, and no backend address anywhere.
async fn assert_error(res: Response<Incoming>, status: StatusCode, backend: SocketAddr) {
    assert_eq!(res.status(), status);
    assert_no_backend_in_headers(res.headers(), backend);
    let body = text(res).await;
    let reason = status.canonical_reason().unwrap();
    assert_eq!(body, format!("{} {reason}\n", status.as_u16()));
    assert!(!body.contains(&backend.port().to_string()));
}

#[tokio::test]
async fn refused_backend_gives_502() {
    within(async {
        // Reserved, never listening: connecting is refused.
        let dead = common::dead_addr().await;
        let proxy = start_proxy(vec![Endpoint::from(dead)], Forward::new()).await;
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_error(res, StatusCode::BAD_GATEWAY, dead).await;
    })
    .await;
}

#[tokio::test]
async fn reset_by_backend_gives_502() {
    within(async {
        // Reads the request head, then resets the connection (SO_LINGER 0).
        let (addr, _task, accepted) = raw_backend(|mut s: TcpStream| async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        });
        let proxy = start_proxy(vec![Endpoint::from(addr)], Forward::new()).await;
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_error(res, StatusCode::BAD_GATEWAY, addr).await;
        assert!(accepted.load(Ordering::SeqCst) >= 1);
    })
    .await;
}

#[tokio::test]
async fn no_endpoint_gives_503() {
    within(async {
        let proxy = start_proxy(Vec::new(), Forward::new()).await;
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text(res).await, "503 Service Unavailable\n");
    })
    .await;
}

#[tokio::test]
async fn silent_backend_gives_504_after_the_timeout() {
    within(async {
        // Accepts and reads, but never answers.
        let (addr, _task, _) = raw_backend(|mut s: TcpStream| async move {
            let mut buf = [0u8; 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let proxy = start_proxy(
            vec![Endpoint::from(addr)],
            Forward::new().timeout(Duration::from_millis(300)),
        )
        .await;
        let started = std::time::Instant::now();
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        let waited = started.elapsed();
        assert_error(res, StatusCode::GATEWAY_TIMEOUT, addr).await;
        // Timers never fire early.
        assert!(
            waited >= Duration::from_millis(300),
            "answered after {waited:?}"
        );
    })
    .await;
}

/// Sends raw bytes and returns what came back until the proxy closed (or [`common::HANG`]
/// passed).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(common::HANG, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_never_reach_a_backend() {
    within(async {
        let be = chatty_backend().await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let huge_header = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(512 * 1024)
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage request line", b"GARBAGE\r\n\r\n".to_vec()),
            ("no version", b"GET /\r\nHost: x\r\n\r\n".to_vec()),
            (
                "header without colon",
                b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n".to_vec(),
            ),
            (
                "space in header name",
                b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n".to_vec(),
            ),
            (
                "NUL in header value",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(),
            ),
            (
                "two content lengths",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
                    .to_vec(),
            ),
            (
                "content length not a number",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
            ),
            ("header too large", huge_header.into_bytes()),
        ];
        for (what, bytes) in cases {
            let answer = raw_exchange(proxy.addr, &bytes).await;
            let status: u16 = answer
                .strip_prefix("HTTP/1.1 ")
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no HTTP answer, got {answer:?}"));
            assert!(
                (400..500).contains(&status),
                "{what}: status {status}, answer {answer:?}"
            );
            eprintln!("{what}: {status}");
        }
        assert!(
            be.seen().is_empty(),
            "a malformed request reached the backend"
        );

        // The proxy still serves good requests.
        let res = send(proxy.addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(be.seen().len(), 1);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2

#[tokio::test]
async fn http2_to_an_h2_only_backend() {
    within(async {
        let be = backend(true, |req: Request<Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::builder()
                .header("x-echo-len", body.len().to_string())
                .body(full(body))
                .unwrap()
        })
        .await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new().http2()).await;
        let mut client = h1_client(proxy.addr).await;
        for i in 0..3 {
            let req = Request::post("/echo")
                .header("host", "shop.example")
                .header("connection", "keep-alive, x-drop-me")
                .header("x-drop-me", "1")
                .body(Full::new(Bytes::from(format!("payload {i}"))))
                .unwrap();
            client.ready().await.unwrap();
            let res = client.send_request(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(
                res.version(),
                Version::HTTP_11,
                "the client's hop stays HTTP/1.1"
            );
            assert_eq!(text(res).await, format!("payload {i}"));
        }
        let seen = be.seen();
        assert_eq!(seen.len(), 3);
        for s in seen {
            assert_eq!(s.version, Version::HTTP_2);
            assert!(!s.headers.contains_key("x-drop-me"));
            assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
            // The client's host is the request's `:authority`, with no `Host` beside it
            // (RFC 9113 §8.3.1; nginx refuses the pair with 400); one connection carries all.
            assert_eq!(s.uri, "http://shop.example/echo");
            assert!(!s.headers.contains_key("host"), "{:?}", s.headers);
        }
    })
    .await;
}

#[tokio::test]
async fn http2_client_to_an_http1_backend() {
    within(async {
        let be = chatty_backend().await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://shop.example/h2?x=1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.version(), Version::HTTP_2);
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!res.headers().contains_key("x-backend-secret"));
        assert_eq!(text(res).await, "ok");
        let seen = be.last();
        assert_eq!(seen.version, Version::HTTP_11);
        assert_eq!(seen.uri, "/h2?x=1");
        assert_eq!(seen.method, Method::GET);
        // An HTTP/2 client names the host in `:authority`, not `Host`: the backend still gets
        // the client's host, not its own address.
        assert_eq!(seen.headers["host"], "shop.example");
        assert_eq!(seen.headers["x-forwarded-host"], "shop.example");
    })
    .await;
}

#[tokio::test]
async fn trailers_pass_through_http2_both_ways() {
    within(async {
        // A gRPC-like backend: data, then trailers.
        let be = backend(true, |_req| async {
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"ok"))),
                Ok(Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    t.insert("x-checksum", "abc".parse().unwrap());
                    t
                })),
            ];
            Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(
                frames,
            ))))
        })
        .await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new().http2()).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post("http://shop.example/demo.Greeter/SayHello")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"request")))
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers reached the client");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "ok");
        let seen = be.last();
        assert_eq!(seen.version, Version::HTTP_2);
        assert_eq!(seen.headers["te"], "trailers");
        assert_eq!(seen.headers["content-type"], "application/grpc");
    })
    .await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_the_body_forwarded() {
    within(async {
        let be = backend(false, |req: Request<Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(full(format!("got {}", String::from_utf8_lossy(&body))))
        })
        .await;
        let proxy = start_proxy(vec![be.endpoint()], Forward::new()).await;
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        // The client waits for the interim answer before sending its body.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let n = tokio::time::timeout(common::HANG, s.read(&mut buf))
                .await
                .expect("an answer to Expect: 100-continue")
                .unwrap();
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&got).into_owned();
        assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head:?}");
        s.write_all(b"hello").await.unwrap();
        let mut rest = Vec::new();
        while !String::from_utf8_lossy(&rest).contains("got hello") {
            let n = tokio::time::timeout(common::HANG, s.read(&mut buf))
                .await
                .expect("the final answer")
                .unwrap();
            assert!(n > 0, "closed before the final answer");
            rest.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&rest).contains("HTTP/1.1 200 OK"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Forward's HTTP/1.1 connection pool

/// A raw HTTP/1.1 backend answering `hello` to each request head; it closes the connection
/// after `per_conn` responses (without saying so: as a backend whose keep-alive timeout fires
/// between two requests), and holds each answer until `gate` has a permit.
fn counting_backend(
    per_conn: usize,
    gate: Arc<tokio::sync::Semaphore>,
    open: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
) -> (SocketAddr, JoinHandle<()>, Arc<AtomicU64>) {
    raw_backend(move |mut s| {
        let (gate, open, peak) = (gate.clone(), open.clone(), peak.clone());
        async move {
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            for _ in 0..per_conn {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            open.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                buf.drain(..end);
                gate.acquire().await.unwrap().forget();
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                if s.write_all(answer).await.is_err() {
                    break;
                }
            }
            open.fetch_sub(1, Ordering::SeqCst);
        }
    })
}

#[tokio::test]
async fn sequential_requests_reuse_one_backend_connection() {
    let gate = Arc::new(tokio::sync::Semaphore::new(
        tokio::sync::Semaphore::MAX_PERMITS,
    ));
    let (addr, _task, accepted) =
        counting_backend(usize::MAX, gate, Arc::default(), Arc::default());
    let proxy = start_proxy(vec![addr.into()], Forward::new()).await;
    let mut client = h1_client::<Empty<Bytes>>(proxy.addr).await;
    for _ in 0..50 {
        let res = within(client.send_request(get("/").body(Empty::new()).unwrap()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(text(res).await, "hello");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
}

/// A backend that closes each connection after one response, without `Connection: close`:
/// the pooled connection is found closed by the next request (before it is written, or when
/// hyper tells so), which goes on a new connection; no client sees an error.
#[tokio::test]
async fn connections_the_backend_closed_while_idle_are_never_a_failure() {
    let gate = Arc::new(tokio::sync::Semaphore::new(
        tokio::sync::Semaphore::MAX_PERMITS,
    ));
    let (addr, _task, accepted) = counting_backend(1, gate, Arc::default(), Arc::default());
    let proxy = start_proxy(vec![addr.into()], Forward::new()).await;
    let mut client = h1_client::<Empty<Bytes>>(proxy.addr).await;
    for i in 0..30 {
        let res = within(client.send_request(get("/").body(Empty::new()).unwrap()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        assert_eq!(text(res).await, "hello");
    }
    assert!(accepted.load(Ordering::SeqCst) >= 30);
}

/// With a cap of 2 connections, 20 requests at once never open a third; the waiting ones get
/// the connections as they come free, including when the backend closes them after each
/// response (the freed slot is handed to a waiting request, which connects).
#[tokio::test]
async fn the_connection_cap_holds_and_waiting_requests_are_served() {
    for per_conn in [usize::MAX, 1] {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (open, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (addr, _task, _) = counting_backend(per_conn, gate.clone(), open, peak.clone());
        let forward = Forward::new().max_connections_per_endpoint(2);
        let proxy = start_proxy(vec![addr.into()], forward).await;
        let mut calls = JoinSet::new();
        for _ in 0..20 {
            let addr = proxy.addr;
            calls.spawn(async move {
                text(send(addr, get("/").body(Empty::<Bytes>::new()).unwrap()).await).await
            });
        }
        // Let them all queue up, then release the answers one by one.
        within(async {
            while peak.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        gate.add_permits(20);
        let mut answered = 0;
        while let Some(body) = within(calls.join_next()).await {
            assert_eq!(body.unwrap(), "hello");
            answered += 1;
        }
        assert_eq!(answered, 20);
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "per_conn {per_conn}: over the cap"
        );
    }
}
