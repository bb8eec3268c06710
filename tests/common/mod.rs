//! Shared helpers of the integration tests: real hyper HTTP/1.1 servers on 127.0.0.1 that answer
//! with their own name (optionally after a delay that tests change at run time) and count the
//! requests they get, and a [`lbkit::Balancer`] over them whose endpoint services are one
//! hyper-util client.
//!
//! Every test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::health::{CheckError, HealthChange, HealthCheck, HealthEvent};
use lbkit::strategy::Strategy;
use lbkit::{Balancer, BoxError, Endpoint, EndpointId};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;

/// The body the test servers answer with.
type ServerBody = UnsyncBoxBody<Bytes, Infallible>;

/// The request body the balancer's endpoint services send.
pub type ReqBody = Full<Bytes>;

/// How long a test waits for something that must happen: long enough for any machine, however
/// slow or busy; reached only when the test hangs.
pub const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Ports.

/// Reserves a port of 127.0.0.1 for the rest of this test process and returns its address.
///
/// The port is held by a socket bound with `SO_REUSEADDR` that never listens: connecting to it
/// is refused (RST) while no server listens there, no other socket's `bind(0)` is handed it
/// (nor is it used as an outgoing port), and a server can bind it with [`try_bind_at`] (also
/// `SO_REUSEADDR`) at any time, again after an earlier one closed. So a stopped backend's
/// address stays dead, and a backend restarted on its port gets it back, whatever the other
/// tests of the process (or other processes) bind meanwhile.
pub fn reserve_port() -> SocketAddr {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("local addr");
    // Held (not listening) until the process exits.
    std::mem::forget(socket);
    addr
}

/// Listens on `addr` with `SO_REUSEADDR` (a port from [`reserve_port`], or port 0 for any).
pub fn try_bind_at(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Listens on `addr` again once the server that had it is gone (an aborted task drops its
/// listener a moment later): retries until it can, for up to [`HANG`].
pub async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + HANG;
    loop {
        match try_bind_at(addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() >= deadline => panic!("cannot bind {addr} again: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// A listener on a port reserved for the rest of the process (see [`reserve_port`]).
pub fn listen_reserved() -> (TcpListener, SocketAddr) {
    let addr = reserve_port();
    (try_bind_at(addr).expect("bind a reserved port"), addr)
}

/// An address on 127.0.0.1 where nothing listens, and nothing will: its port is reserved (see
/// [`reserve_port`]), so connecting to it is refused for as long as the test runs.
pub async fn dead_addr() -> SocketAddr {
    reserve_port()
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// Holds a server's answers: a request that arrives while its gate holds `n` waits until the
/// gate has been advanced `n` times since (see [`TestServer::hold`]).
#[derive(Debug)]
struct Gate {
    /// How many advances a request arriving now waits for; 0: none.
    hold: AtomicU64,
    /// Advances so far.
    level: watch::Sender<u64>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            hold: AtomicU64::new(0),
            level: watch::Sender::new(0),
        }
    }

    /// Waits as long as the gate holds a request arriving now.
    async fn pass(&self) {
        // The level first: a `release` in between then lets this request go.
        let mut level = self.level.subscribe();
        let target = *level.borrow_and_update() + self.hold.load(Ordering::SeqCst);
        let _ = level.wait_for(|l| *l >= target).await;
    }
}

/// Advances by [`TestServer::release`]: more than any test holds for.
const RELEASE: u64 = 1 << 40;

/// One real HTTP/1.1 server on 127.0.0.1; it stops (with all its connections) when dropped.
#[derive(Debug)]
pub struct TestServer {
    name: String,
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    /// Connections open now.
    open: Arc<AtomicU64>,
    gate: Arc<Gate>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The accept loop owns the connections' JoinSet: aborting it aborts them all.
        self.task.abort();
    }
}

impl TestServer {
    /// The server's name, which is also its endpoint id and the body it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An endpoint named after the server, at its address.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.name.as_str()).with_addr(self.addr)
    }

    /// Requests received so far (counted when they arrive, before any delay).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet ended).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Sets how long the server waits before answering the requests that arrive from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The delay in milliseconds, shared with the server.
    pub fn delay_handle(&self) -> Arc<AtomicU64> {
        self.delay_ms.clone()
    }

    /// Holds the answers to the requests that arrive from now on until [`advance`] was called
    /// `n` times after their arrival, or [`release`]. A held request is in flight for as long
    /// as the test wants, however fast the machine: a slow backend without a clock.
    ///
    /// [`advance`]: TestServer::advance
    /// [`release`]: TestServer::release
    pub fn hold(&self, n: u64) {
        self.gate.hold.store(n, Ordering::SeqCst);
    }

    /// Counts one step for the held requests (see [`hold`](TestServer::hold)).
    pub fn advance(&self) {
        self.gate.level.send_modify(|l| *l += 1);
    }

    /// Answers every held request, and holds no more.
    pub fn release(&self) {
        self.gate.hold.store(0, Ordering::SeqCst);
        self.gate.level.send_modify(|l| *l += RELEASE);
    }
}

/// Accepts connections on `listener` and serves each with `handler` over HTTP/1.1 until the
/// returned task is aborted; `open` counts the connections open.
fn spawn_server<H, Fut>(listener: TcpListener, open: Arc<AtomicU64>, handler: H) -> JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ServerBody>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            open.fetch_add(1, Ordering::SeqCst);
            let open = open.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let res = handler(req);
                    async move { Ok::<_, Infallible>(res.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
            while conns.try_join_next().is_some() {}
        }
    })
}

/// A listener on a port reserved for the rest of the process: a server stopped by the test
/// leaves a dead address (and can start again on it).
async fn bind() -> (TcpListener, SocketAddr) {
    listen_reserved()
}

/// Starts a server named `name` that answers every request with its name, after its delay
/// (and its gate, see [`TestServer::hold`]).
pub async fn start_server(name: &str) -> TestServer {
    let (listener, _) = bind().await;
    serve_name(listener, name)
}

/// Serves `name` (after the delay the returned handle sets) on `listener`.
fn serve_name(listener: TcpListener, name: &str) -> TestServer {
    let addr = listener.local_addr().expect("local addr");
    let delay_ms = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Gate::new());
    let open = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(name.to_owned());
    let (d, h, g) = (delay_ms.clone(), hits.clone(), gate.clone());
    let task = spawn_server(listener, open.clone(), move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        let delay = d.load(Ordering::SeqCst);
        let body = body.clone();
        let g = g.clone();
        async move {
            g.pass().await;
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            Response::new(Full::new(body).boxed_unsync())
        }
    });
    TestServer {
        name: name.to_owned(),
        addr,
        delay_ms,
        hits,
        open,
        gate,
        task,
    }
}

/// Starts `n` servers named `s0`, `s1`, ...
pub async fn start_servers(n: usize) -> Vec<TestServer> {
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        servers.push(start_server(&format!("s{i}")).await);
    }
    servers
}

/// The endpoints of `servers`, in order.
pub fn endpoints(servers: &[TestServer]) -> Vec<Endpoint> {
    servers.iter().map(TestServer::endpoint).collect()
}

/// Requests received by each of `servers`, in order.
pub fn hits(servers: &[TestServer]) -> Vec<u64> {
    servers.iter().map(TestServer::hits).collect()
}

/// The sending half of one streamed response body: each `Frame` sent is one chunk; dropping it
/// ends the body.
pub type BodySender = futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// Starts a server named `name` whose responses stream a body the test writes: for each
/// request, the sender of its body arrives on the returned receiver.
pub async fn start_streaming_server(
    name: &str,
) -> (TestServer, mpsc::UnboundedReceiver<BodySender>) {
    let (listener, addr) = bind().await;
    let hits = Arc::new(AtomicU64::new(0));
    let (senders_tx, senders_rx) = mpsc::unbounded_channel();
    let h = hits.clone();
    let open = Arc::new(AtomicU64::new(0));
    let task = spawn_server(listener, open.clone(), move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        // If the test is gone, the body ends at once; nothing else to do.
        let _ = senders_tx.send(tx);
        async move { Response::new(StreamBody::new(rx).boxed_unsync()) }
    });
    let server = TestServer {
        name: name.to_owned(),
        addr,
        delay_ms: Arc::new(AtomicU64::new(0)),
        hits,
        open,
        gate: Arc::new(Gate::new()),
        task,
    };
    (server, senders_rx)
}

/// The hyper-util client the endpoint services share: HTTP/1.1 with keep-alive.
pub type HttpClient = Client<HttpConnector, ReqBody>;

/// A new HTTP/1.1 keep-alive client.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// An endpoint's service: sends each request with the shared client to the endpoint's socket
/// address (the request's path and query are kept, its authority replaced).
#[derive(Clone, Debug)]
pub struct HttpEndpoint {
    client: HttpClient,
    addr: Option<SocketAddr>,
}

impl HttpEndpoint {
    /// The service of `endpoint`, sending with `client`.
    pub fn new(client: HttpClient, endpoint: &Endpoint) -> Self {
        HttpEndpoint {
            client,
            addr: endpoint.socket_addr(),
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

impl Service<Request<ReqBody>> for HttpEndpoint {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The legacy client is always ready: it queues for a pooled connection itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> ResponseFuture {
        let Some(addr) = self.addr else {
            return Box::pin(async { Err("endpoint has no socket address".into()) });
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match format!("http://{addr}{path}").parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return Box::pin(async move { Err(BoxError::from(e)) }),
        }
        let fut = self.client.request(req);
        Box::pin(async move { fut.await.map_err(BoxError::from) })
    }
}

/// A balancer over `endpoints` with `strategy`, whose endpoint services share one client.
pub fn balancer<St: Strategy>(
    endpoints: impl IntoIterator<Item = Endpoint>,
    strategy: St,
) -> Balancer<HttpEndpoint, St> {
    let client = http_client();
    Balancer::new(endpoints, strategy, move |ep: &Endpoint| {
        HttpEndpoint::new(client.clone(), ep)
    })
}

/// A `GET /` request.
pub fn get() -> Request<ReqBody> {
    Request::get("/")
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

/// The whole body of a response as text.
pub async fn body_text<B>(body: B) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.expect("read body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

/// Sends `GET /` through `balancer` and returns the name of the server that answered.
pub async fn ask<St: Strategy>(
    balancer: &Balancer<HttpEndpoint, St>,
) -> Result<String, lbkit::Error> {
    use tower::ServiceExt;
    let res = balancer.clone().oneshot(get()).await?;
    Ok(body_text(res.into_body()).await)
}

/// Polls `cond` every few milliseconds until it holds; panics naming `what` after `limit`
/// (which only catches a hang: pass [`HANG`] or more).
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The next health event of `id` that `accept` takes (other events are skipped); panics
/// after [`HANG`].
pub async fn next_event(
    events: &mut broadcast::Receiver<HealthEvent>,
    id: &EndpointId,
    accept: impl Fn(&HealthChange) -> bool,
) -> HealthEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if e.endpoint() == id && accept(e.change()) => return e,
                Ok(_) => {}
                Err(e) => panic!("health events of the pool: {e} (waiting for {id})"),
            }
        }
    };
    tokio::time::timeout(HANG, wait)
        .await
        .unwrap_or_else(|_| panic!("no awaited health event of {id} within {HANG:?}"))
}

/// Runs `test`, failing if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, test: F) -> F::Output {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// Health checks, counted.

/// The verdicts of every health check a [`Logged`] check ran, per endpoint, with when each
/// ended: tests count check rounds instead of timing them.
#[derive(Clone, Debug, Default)]
pub struct CheckLog {
    by_id: Arc<Mutex<HashMap<EndpointId, Verdicts>>>,
}

/// When each check of an endpoint ended, and whether it passed.
type Verdicts = Vec<(Instant, bool)>;

impl CheckLog {
    fn record(&self, id: &EndpointId, passed: bool) {
        let mut map = self.by_id.lock().unwrap();
        map.entry(id.clone())
            .or_default()
            .push((Instant::now(), passed));
    }

    fn count(&self, id: &EndpointId, filter: impl Fn(Instant, bool) -> bool) -> usize {
        let map = self.by_id.lock().unwrap();
        map.get(id)
            .map_or(0, |v| v.iter().filter(|(at, ok)| filter(*at, *ok)).count())
    }

    /// Checks of `id` that passed so far.
    pub fn passed(&self, id: &EndpointId) -> usize {
        self.count(id, |_, ok| ok)
    }

    /// Checks of `id` that failed so far (timed out included).
    pub fn failed(&self, id: &EndpointId) -> usize {
        self.count(id, |_, ok| !ok)
    }

    /// Checks of `id` so far.
    pub fn checks(&self, id: &EndpointId) -> usize {
        self.count(id, |_, _| true)
    }

    /// Checks of `id` that passed (`passed`) or failed (`!passed`) and ended after `after` and
    /// no later than `until`. A check ends before the checker acts on its verdict, and the next
    /// one starts an interval later, so with `until` a health event's time this counts exactly
    /// the checks that led to the event.
    pub fn between(&self, id: &EndpointId, passed: bool, after: Instant, until: Instant) -> usize {
        self.count(id, |at, ok| ok == passed && at > after && at <= until)
    }
}

/// A health check that records each verdict in a [`CheckLog`] (a check the checker's timeout
/// cuts short counts as failed, as it does for the checker).
pub struct Logged<C> {
    inner: C,
    log: CheckLog,
}

impl<C> Logged<C> {
    /// `inner`, recording into `log`.
    pub fn new(inner: C, log: &CheckLog) -> Self {
        Logged {
            inner,
            log: log.clone(),
        }
    }
}

/// Records a failed check if dropped before its verdict (timed out).
struct Unfinished {
    log: CheckLog,
    id: EndpointId,
    done: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.done {
            self.log.record(&self.id, false);
        }
    }
}

impl<C: HealthCheck> HealthCheck for Logged<C> {
    fn check(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<(), CheckError>> {
        let fut = self.inner.check(endpoint);
        let mut guard = Unfinished {
            log: self.log.clone(),
            id: endpoint.id().clone(),
            done: false,
        };
        Box::pin(async move {
            let verdict = fut.await;
            guard.done = true;
            guard.log.record(&guard.id, verdict.is_ok());
            verdict
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Faults (tests/faults.rs, tests/soak.rs): backends that hang or reset, the whole proxy stack
// served on 127.0.0.1, a load generator and memory readings.

pub mod fault {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use lbkit::balance::Target;
    use lbkit::failover::{FailoverLayer, ReplayBody, RetryBudget};
    use lbkit::health::{HealthCheck, HealthChecker, HttpCheck, OutlierDetection, TcpCheck};
    use lbkit::proxy::{ErrorResponseLayer, Forward};
    use lbkit::server::RequestBody;
    use lbkit::strategy::AnyStrategy;
    use lbkit::{BalancerLayer, Endpoint, EndpointId, PickHints, Pool};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::{JoinHandle, JoinSet};
    use tower::{Service, ServiceBuilder};

    use super::{CheckLog, HttpClient, Logged, TestServer};

    pub use super::{rebind, try_bind_at};

    /// [`try_bind_at`], panicking on failure.
    pub fn bind_at(addr: SocketAddr) -> TcpListener {
        try_bind_at(addr).expect("bind 127.0.0.1")
    }

    /// Starts a server like [`super::start_server`] (answers its name, after its delay), on
    /// `addr`: a backend restarted on the port it had (reserved for the process when the
    /// server was first started, so nothing else took it meanwhile).
    pub async fn start_server_at(name: &str, addr: SocketAddr) -> TestServer {
        super::serve_name(rebind(addr).await, name)
    }

    /// How a [`FaultServer`] misbehaves once it has read a request head.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fault {
        /// Keeps the connection open and never answers.
        Hang,
        /// Resets the connection (TCP RST) before sending anything.
        ResetBeforeHead,
        /// Sends a `200 OK` head announcing 1000 bytes, 100 of them, then closes the
        /// connection: the body ends short.
        ResetMidBody,
    }

    /// A raw TCP "HTTP server" with a fault; it stops (with its connections) when dropped.
    #[derive(Debug)]
    pub struct FaultServer {
        name: String,
        addr: SocketAddr,
        hits: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl Drop for FaultServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FaultServer {
        /// Starts a server named `name` on a port of 127.0.0.1 reserved for the process.
        pub fn start(name: &str, fault: Fault) -> FaultServer {
            Self::serve(name, super::listen_reserved().0, fault)
        }

        /// Starts a server named `name` on `addr` (a backend that turns faulty on its port).
        pub async fn start_at(name: &str, addr: SocketAddr, fault: Fault) -> FaultServer {
            Self::serve(name, rebind(addr).await, fault)
        }

        fn serve(name: &str, listener: TcpListener, fault: Fault) -> FaultServer {
            let addr = listener.local_addr().expect("local addr");
            let hits = Arc::new(AtomicU64::new(0));
            let h = hits.clone();
            let task = tokio::spawn(async move {
                let mut conns = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    conns.spawn(misbehave(stream, fault, h.clone()));
                    while conns.try_join_next().is_some() {}
                }
            });
            FaultServer {
                name: name.to_owned(),
                addr,
                hits,
                task,
            }
        }

        /// An endpoint named after the server, at its address.
        pub fn endpoint(&self) -> Endpoint {
            Endpoint::new(self.name.as_str()).with_addr(self.addr)
        }

        /// Request heads read so far.
        pub fn hits(&self) -> u64 {
            self.hits.load(Ordering::SeqCst)
        }
    }

    /// Reads request heads from `stream` and misbehaves on the first one.
    async fn misbehave(mut stream: TcpStream, fault: Fault, hits: Arc<AtomicU64>) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // Read up to the end of the first request head.
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        match fault {
            Fault::Hang => {
                // Hold the connection until the peer closes it.
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
            }
            Fault::ResetBeforeHead => {
                let _ = stream.set_zero_linger();
                drop(stream);
            }
            Fault::ResetMidBody => {
                let head =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n";
                let _ = stream.write_all(head).await;
                let _ = stream.write_all(&[b'x'; 100]).await;
                let _ = stream.flush().await;
                // End with a FIN, after the head and the first bytes: whenever the proxy reads,
                // it gets them first, then the end of a body 900 bytes short. (A reset could
                // overtake the bytes and discard them at the proxy, which would then see no
                // response head at all.) Then read until the proxy closes, so that no unread
                // request bytes turn the close into a reset either.
                let _ = stream.shutdown().await;
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        }
    }

    /// Per-endpoint attempt counters, kept by the proxy's endpoint services ([`Tap`]).
    #[derive(Debug, Default)]
    pub struct TapStats {
        calls: AtomicU64,
        /// Nanoseconds since [`Taps::epoch`] of the last call, plus one (0: never called).
        last: AtomicU64,
    }

    /// The attempt counters of every endpoint id the proxy has served.
    #[derive(Clone, Debug)]
    pub struct Taps {
        epoch: Instant,
        by_id: Arc<Mutex<HashMap<EndpointId, Arc<TapStats>>>>,
    }

    impl Taps {
        fn new() -> Self {
            Taps {
                epoch: Instant::now(),
                by_id: Arc::default(),
            }
        }

        fn stats(&self, id: &EndpointId) -> Arc<TapStats> {
            let mut map = self.by_id.lock().unwrap();
            map.entry(id.clone()).or_default().clone()
        }

        /// Attempts sent to `id` so far (every retry counts).
        pub fn calls(&self, id: &str) -> u64 {
            self.stats(&EndpointId::new(id))
                .calls
                .load(Ordering::SeqCst)
        }

        /// When the last attempt was sent to `id`, if any.
        pub fn last_call(&self, id: &str) -> Option<Instant> {
            let last = self.stats(&EndpointId::new(id)).last.load(Ordering::SeqCst);
            (last > 0).then(|| self.epoch + Duration::from_nanos(last - 1))
        }
    }

    /// The forwarding service behind the balancer, counting the attempts sent to each endpoint
    /// (read from the request's `Target`).
    #[derive(Clone, Debug)]
    pub struct Tap<S> {
        inner: S,
        taps: Taps,
    }

    impl<S, B> Service<Request<B>> for Tap<S>
    where
        S: Service<Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<B>) -> S::Future {
            if let Some(target) = req.extensions().get::<Target>() {
                let stats = self.taps.stats(target.endpoint().id());
                stats.calls.fetch_add(1, Ordering::SeqCst);
                let at = self.taps.epoch.elapsed().as_nanos() as u64 + 1;
                stats.last.fetch_max(at, Ordering::SeqCst);
            }
            self.inner.call(req)
        }
    }

    /// The request body the proxy forwards: the client's, retryable when empty.
    pub type ProxyReqBody = ReplayBody<RequestBody>;
    /// The proxy's pool (the balancer layer's).
    pub type ProxyPool = Pool<Target, AnyStrategy>;

    /// Which active health check the proxy runs.
    #[derive(Clone, Copy, Debug)]
    pub enum Check {
        /// A TCP connect.
        Tcp,
        /// `GET /`, any 2xx or 3xx.
        Http,
    }

    /// The settings of a [`ProxyStack`]: what a real deployment would configure.
    #[derive(Clone, Debug)]
    pub struct StackConfig {
        pub strategy: &'static str,
        /// `Forward::timeout`: the backend's response head must arrive within it.
        pub forward_timeout: Duration,
        pub per_try_timeout: Duration,
        pub deadline: Duration,
        pub max_attempts: u32,
        /// `None`: `RetryBudget::default()`.
        pub budget: Option<(Duration, u32, f32)>,
        pub check: Option<Check>,
        pub check_interval: Duration,
        pub check_timeout: Duration,
        pub check_jitter: Duration,
        pub fall: u32,
        pub rise: u32,
        /// Consecutive failures that eject an endpoint; `None`: no outlier detection.
        pub outlier_failures: Option<u32>,
        pub ejection_time: Duration,
        pub max_ejection_percent: u8,
    }

    impl Default for StackConfig {
        fn default() -> Self {
            StackConfig {
                strategy: "round_robin",
                forward_timeout: Duration::from_secs(2),
                per_try_timeout: Duration::from_secs(1),
                deadline: Duration::from_secs(3),
                max_attempts: 3,
                budget: None,
                check: Some(Check::Tcp),
                check_interval: Duration::from_millis(100),
                // Far more than a connect on 127.0.0.1 takes, even on a busy machine: a check
                // of a live backend never times out.
                check_timeout: Duration::from_secs(1),
                check_jitter: Duration::from_millis(10),
                fall: 2,
                rise: 2,
                outlier_failures: Some(3),
                ejection_time: Duration::from_secs(30),
                max_ejection_percent: 50,
            }
        }
    }

    impl StackConfig {
        /// The longest time the active checker takes to mark a stopped backend down:
        /// `fall` checks, each up to an interval plus jitter apart, the last one up to its
        /// timeout long.
        pub fn check_detection_bound(&self) -> Duration {
            (self.check_interval + self.check_jitter) * self.fall + self.check_timeout
        }
    }

    /// The proxy stack a real deployment serves (the README's, with a test's settings), on
    /// 127.0.0.1 behind lbkit's `Server`: `ErrorResponseLayer` -> `ReplayBody` -> routing hint
    /// -> `FailoverLayer` -> `BalancerLayer` -> `Forward` (through a [`Tap`] that counts the
    /// attempts per endpoint), with a `HealthChecker` and `OutlierDetection` on the pool. A request with an
    /// `x-route: <endpoint id>` header prefers that endpoint (a test's way to aim at one).
    /// Stops (with its health tasks) when dropped.
    #[derive(Debug)]
    pub struct ProxyStack {
        pub addr: SocketAddr,
        pub pool: ProxyPool,
        pub budget: Arc<RetryBudget>,
        pub taps: Taps,
        /// The verdicts of the active health checks.
        pub checks: CheckLog,
        pub config: StackConfig,
        task: JoinHandle<()>,
        health: Vec<lbkit::pool::PoolTask>,
    }

    impl Drop for ProxyStack {
        fn drop(&mut self) {
            self.task.abort();
            for t in &self.health {
                t.abort();
            }
        }
    }

    impl ProxyStack {
        /// Starts the stack over `endpoints`.
        pub async fn start(endpoints: Vec<Endpoint>, config: StackConfig) -> ProxyStack {
            let strategy: AnyStrategy = config.strategy.parse().expect("strategy");
            let forward = Forward::<ProxyReqBody>::new().timeout(config.forward_timeout);
            let taps = Taps::new();
            let balancer = BalancerLayer::new(endpoints, strategy);
            let pool = balancer.pool().clone();
            let mut health = Vec::new();
            let checks = CheckLog::default();
            if let Some(check) = config.check {
                let settings = |c: Box<dyn HealthCheck>| {
                    HealthChecker::new(Logged::new(c, &checks))
                        .interval(config.check_interval)
                        .timeout(config.check_timeout)
                        .jitter(config.check_jitter)
                        .fall(config.fall)
                        .rise(config.rise)
                };
                health.push(match check {
                    Check::Tcp => settings(Box::new(TcpCheck::new())).spawn(&pool),
                    Check::Http => settings(Box::new(HttpCheck::get("/"))).spawn(&pool),
                });
            }
            if let Some(n) = config.outlier_failures {
                health.push(
                    OutlierDetection::new()
                        .consecutive_failures(n)
                        .base_ejection_time(config.ejection_time)
                        .max_ejection_time(config.ejection_time)
                        .max_ejection_percent(config.max_ejection_percent)
                        .spawn(&pool),
                );
            }
            let budget = Arc::new(match config.budget {
                Some((ttl, min, pct)) => RetryBudget::new(ttl, min, pct),
                None => RetryBudget::default(),
            });
            let failover = FailoverLayer::new(budget.clone())
                .max_attempts(config.max_attempts)
                .per_try_timeout(config.per_try_timeout)
                .deadline(config.deadline);
            let proxy = ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .map_request(|req: Request<RequestBody>| req.map(ReplayBody::new))
                .map_request(route_hint)
                .layer(failover)
                .layer(balancer)
                .service(Tap {
                    inner: forward,
                    taps: taps.clone(),
                });
            let listener = bind_at("127.0.0.1:0".parse().expect("addr"));
            let addr = listener.local_addr().expect("local addr");
            // lbkit's own server, as the README's proxy runs (it sets `ClientAddr`).
            let task = tokio::spawn(lbkit::server::Server::new(proxy).serve(listener));
            ProxyStack {
                addr,
                pool,
                budget,
                taps,
                checks,
                config,
                task,
                health,
            }
        }
    }

    /// Prefers the endpoint named in the `x-route` header, if any.
    fn route_hint<B>(mut req: Request<B>) -> Request<B> {
        let route = req
            .headers()
            .get("x-route")
            .and_then(|v| v.to_str().ok())
            .map(EndpointId::from);
        if let Some(id) = route {
            PickHints::of_mut(&mut req).prefer(id);
        }
        req
    }

    /// How one client request ended.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Outcome {
        /// A complete `200` response; the body (the backend's name).
        Ok(String),
        /// Another status, with the body.
        Status(StatusCode, String),
        /// The response head arrived but its body failed.
        BodyError(StatusCode),
        /// No response: the request failed (connection error, client timeout).
        Error(String),
    }

    impl Outcome {
        pub fn is_ok(&self) -> bool {
            matches!(self, Outcome::Ok(_))
        }

        /// The kind of outcome, for counting: `"200"`, `"503"`, `"200 then a broken body"`,
        /// `"error: ..."`.
        pub fn label(&self) -> String {
            match self {
                Outcome::Ok(_) => "200".to_owned(),
                Outcome::Status(s, _) => s.as_u16().to_string(),
                Outcome::BodyError(s) => format!("{} then a broken body", s.as_u16()),
                Outcome::Error(e) => format!("error: {}", e.chars().take(80).collect::<String>()),
            }
        }
    }

    /// Sends `req` with `client` (to the proxy, with a `limit` on the whole exchange) and
    /// reads the whole response.
    pub async fn exchange(
        client: &HttpClient,
        req: Request<Full<Bytes>>,
        limit: Duration,
    ) -> Outcome {
        let fut = async {
            let res = match client.request(req).await {
                Ok(res) => res,
                Err(e) => return Outcome::Error(format!("{e:?}")),
            };
            let status = res.status();
            match res.into_body().collect().await {
                Ok(body) => {
                    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                    if status == StatusCode::OK {
                        Outcome::Ok(text)
                    } else {
                        Outcome::Status(status, text)
                    }
                }
                Err(_) => Outcome::BodyError(status),
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Error(format!("no answer within {limit:?}")),
        }
    }

    /// A `GET /` to the proxy at `addr`.
    pub fn get(addr: SocketAddr) -> Request<Full<Bytes>> {
        Request::get(format!("http://{addr}/"))
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    /// What a load run saw (bounded: counts, a few failures, the latencies).
    #[derive(Debug, Default)]
    pub struct LoadReport {
        pub sent: u64,
        pub ok: u64,
        /// Requests that did not end in a complete `200`.
        pub failures: u64,
        /// The failures by kind (see [`Outcome::label`]).
        pub failure_kinds: HashMap<String, u64>,
        /// The first few failures, with when they ended.
        pub samples: Vec<(Instant, Outcome)>,
        /// Answers per backend name.
        pub by_backend: HashMap<String, u64>,
        /// Sorted.
        pub latencies: Vec<Duration>,
    }

    impl LoadReport {
        fn record(&mut self, outcome: Outcome, took: Duration) {
            self.sent += 1;
            self.latencies.push(took);
            match outcome {
                Outcome::Ok(name) => {
                    self.ok += 1;
                    *self.by_backend.entry(name).or_default() += 1;
                }
                other => {
                    self.failures += 1;
                    *self.failure_kinds.entry(other.label()).or_default() += 1;
                    if self.samples.len() < 5 {
                        self.samples.push((Instant::now(), other));
                    }
                }
            }
        }

        fn merge(&mut self, other: LoadReport) {
            self.sent += other.sent;
            self.ok += other.ok;
            self.failures += other.failures;
            for (k, v) in other.failure_kinds {
                *self.failure_kinds.entry(k).or_default() += v;
            }
            self.samples.extend(other.samples);
            for (k, v) in other.by_backend {
                *self.by_backend.entry(k).or_default() += v;
            }
            self.latencies.extend(other.latencies);
        }

        /// The `p`-th percentile latency (0 to 100).
        pub fn percentile(&self, p: f64) -> Duration {
            if self.latencies.is_empty() {
                return Duration::ZERO;
            }
            let i = ((self.latencies.len() - 1) as f64 * p / 100.0).round() as usize;
            self.latencies[i]
        }

        /// A few failures, for a message.
        pub fn sample_failures(&self) -> Vec<&Outcome> {
            self.samples.iter().map(|(_, o)| o).collect()
        }
    }

    /// Steady load: `clients` tasks, each with its own keep-alive connection, send requests
    /// one after the other until stopped or each has sent `max_each`, pausing `pause` between
    /// requests.
    pub struct Load {
        stop: Arc<AtomicBool>,
        sent: Arc<AtomicU64>,
        tasks: Vec<JoinHandle<LoadReport>>,
    }

    impl Load {
        /// `GET /` to the proxy at `addr`.
        pub fn start(addr: SocketAddr, clients: usize, max_each: u64, pause: Duration) -> Load {
            Load::start_with(clients, max_each, pause, move || get(addr))
        }

        /// Requests made by `make`.
        pub fn start_with<F>(clients: usize, max_each: u64, pause: Duration, make: F) -> Load
        where
            F: Fn() -> Request<Full<Bytes>> + Send + Sync + 'static,
        {
            let make = Arc::new(make);
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let tasks = (0..clients)
                .map(|_| {
                    let (stop, sent, make) = (stop.clone(), sent.clone(), make.clone());
                    tokio::spawn(async move {
                        let client = super::http_client();
                        let mut report = LoadReport::default();
                        while !stop.load(Ordering::Relaxed) && report.sent < max_each {
                            let started = Instant::now();
                            let outcome = exchange(&client, make(), Duration::from_secs(10)).await;
                            report.record(outcome, started.elapsed());
                            sent.fetch_add(1, Ordering::Relaxed);
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        report
                    })
                })
                .collect();
            Load { stop, sent, tasks }
        }

        /// Requests sent so far, over all clients.
        pub fn sent(&self) -> u64 {
            self.sent.load(Ordering::Relaxed)
        }

        /// Waits until at least `n` more requests were sent; panics if that takes longer
        /// than `limit` (which only catches a hang: pass [`super::HANG`] or more).
        pub async fn wait_for(&self, n: u64, limit: Duration) {
            let target = self.sent() + n;
            let deadline = Instant::now() + limit;
            while self.sent() < target {
                assert!(
                    Instant::now() < deadline,
                    "the load sent {} of {n} more requests in {limit:?}",
                    n - (target - self.sent()),
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// Stops the clients and gathers their reports.
        pub async fn stop(self) -> LoadReport {
            self.stop.store(true, Ordering::Relaxed);
            self.finish().await
        }

        /// Waits until every client has sent its `max_each` requests, and gathers their reports.
        pub async fn finish(self) -> LoadReport {
            let mut total = LoadReport::default();
            for t in self.tasks {
                total.merge(t.await.expect("load task"));
            }
            total.latencies.sort_unstable();
            total
        }
    }

    /// A line of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`); 0 where there is none.
    pub fn proc_status_kib(field: &str) -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// The resident memory of this process, in KiB.
    pub fn rss_kib() -> u64 {
        proc_status_kib("VmRSS")
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// A temporary directory of its own (under the system's), removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbkit-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `contents` to the file `name` in the directory; its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test certificate authority named `name` (rcgen, ECDSA P-256): what signs certificates
/// with it, and its certificate as PEM.
pub fn test_ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}
