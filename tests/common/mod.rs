//! Shared helpers of the integration tests: real hyper HTTP/1.1 servers on 127.0.0.1 that answer
//! with their own name (optionally after a delay that tests change at run time) and count the
//! requests they get, and a [`lbkit::Balancer`] over them whose endpoint services are one
//! hyper-util client.
//!
//! Every test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::strategy::Strategy;
use lbkit::{Balancer, BoxError, Endpoint};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;

/// The body the test servers answer with.
type ServerBody = UnsyncBoxBody<Bytes, Infallible>;

/// The request body the balancer's endpoint services send.
pub type ReqBody = Full<Bytes>;

/// One real HTTP/1.1 server on 127.0.0.1; it stops (with all its connections) when dropped.
#[derive(Debug)]
pub struct TestServer {
    name: String,
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
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
        Endpoint::new(self.name.as_str()).addr(self.addr)
    }

    /// Requests received so far (counted when they arrive, before any delay).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
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
}

/// Accepts connections on `listener` and serves each with `handler` over HTTP/1.1 until the
/// returned task is aborted.
fn spawn_server<H, Fut>(listener: TcpListener, handler: H) -> JoinHandle<()>
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
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let res = handler(req);
                    async move { Ok::<_, Infallible>(res.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    })
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// Starts a server named `name` that answers every request with its name, after its delay.
pub async fn start_server(name: &str) -> TestServer {
    let (listener, addr) = bind().await;
    let delay_ms = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(name.to_owned());
    let (d, h) = (delay_ms.clone(), hits.clone());
    let task = spawn_server(listener, move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        let delay = d.load(Ordering::SeqCst);
        let body = body.clone();
        async move {
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
    let task = spawn_server(listener, move |_req| {
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
        task,
    };
    (server, senders_rx)
}

/// An address on 127.0.0.1 where nothing listens (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let (listener, addr) = bind().await;
    drop(listener);
    addr
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

/// Polls `cond` every few milliseconds until it holds; panics naming `what` after `limit`.
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

/// Runs `test`, failing if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, test: F) -> F::Output {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}
