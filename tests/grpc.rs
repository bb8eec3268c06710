//! gRPC end to end over real sockets: tonic servers (HTTP/2 only, with a `grpc.health.v1`
//! service) behind the README's proxy (`examples/reverse_proxy.rs`, its own `proxy`
//! function), tonic and raw HTTP/2 clients in front; the HTTP/1.1 / HTTP/2 protocol matrix on
//! one listener; the gRPC health check; gRPC failures for outlier detection; the tonic client
//! balanced client-side (`examples/grpc_client.rs`, run as a test too).
//!
//! No assertion depends on how fast the machine is: calls are counted, and the time limits
//! only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

#[path = "../examples/grpc_client.rs"]
#[allow(dead_code)]
mod grpc_client;

mod common;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use grpc_client::{say_hello, HelloReply, HelloRequest, SAY_HELLO};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::endpoint::Health;
use lbkit::health::{CheckErrorKind, GrpcCheck, HealthCheck, HttpCheck};
use lbkit::proxy::UpstreamProtocol;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, Endpoint, EndpointId};
use reverse_proxy::{Args, Check};
use tokio::net::TcpListener;
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::{Service, ServiceExt};

const HANG: Duration = Duration::from_secs(30);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a test server answers `SayHello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// A reply naming the server.
    Ok,
    /// HTTP 200, headers, then trailers with `grpc-status: 14`.
    UnavailableInTrailers,
    /// A trailers-only answer with `grpc-status: 14` (what tonic sends for an `Err(Status)`).
    UnavailableTrailersOnly,
    /// A trailers-only answer with `grpc-status: 8`: overloaded, not broken.
    ResourceExhausted,
    /// Never answers.
    Hold,
}

/// `HealthCheckRequest { string service = 1; }`, with prost (the check encodes it by hand).
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `HealthCheckResponse { ServingStatus status = 1; }`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[derive(Debug)]
struct ServerState {
    name: String,
    mode: AtomicU8,
    serving: AtomicI32,
    calls: AtomicU64,
    health_checks: AtomicU64,
}

impl ServerState {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            0 => Mode::Ok,
            1 => Mode::UnavailableInTrailers,
            2 => Mode::UnavailableTrailersOnly,
            3 => Mode::ResourceExhausted,
            _ => Mode::Hold,
        }
    }
}

/// A tonic gRPC server (HTTP/2 only) on 127.0.0.1 serving `demo.Greeter` and, if asked,
/// `grpc.health.v1.Health`.
struct GrpcServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    async fn start(name: &str, mode: Mode, with_health: bool) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ServerState {
            name: name.to_owned(),
            mode: AtomicU8::new(mode as u8),
            serving: AtomicI32::new(SERVING),
            calls: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let greeter = Served::<Greeter>(state.clone(), std::marker::PhantomData);
        let health =
            with_health.then(|| Served::<HealthService>(state.clone(), std::marker::PhantomData));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(greeter)
                .add_optional_service(health)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcServer {
            addr,
            state,
            stop,
            task,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.state.name.as_str()).with_addr(self.addr)
    }

    fn id(&self) -> EndpointId {
        EndpointId::from(self.state.name.as_str())
    }

    fn set_serving(&self, status: i32) {
        self.state.serving.store(status, Ordering::Relaxed);
    }

    /// Stops the server: its listener closes, open connections get a GOAWAY and close.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(HANG, self.task)
            .await
            .expect("the server to stop")
            .expect("server task");
    }
}

/// A unary handler made of a closure.
struct Unary<F>(F);

impl<F, Req, Res> UnaryService<Req> for Unary<F>
where
    F: FnMut(Req) -> Result<Res, Status>,
{
    type Response = Res;
    type Future = std::future::Ready<Result<tonic::Response<Res>, Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        std::future::ready((self.0)(request.into_inner()).map(tonic::Response::new))
    }
}

/// One gRPC service of a test server: its name and how it answers.
trait GrpcService: Send + 'static {
    const NAME: &'static str;

    fn answer(state: Arc<ServerState>, req: http::Request<tonic::body::Body>) -> Answer;
}

type Answer = BoxFuture<http::Response<tonic::body::Body>>;

/// The tower service tonic's router serves for a [`GrpcService`].
struct Served<G>(Arc<ServerState>, std::marker::PhantomData<fn() -> G>);

impl<G> Clone for Served<G> {
    fn clone(&self) -> Self {
        Served(self.0.clone(), std::marker::PhantomData)
    }
}

impl<G: GrpcService> NamedService for Served<G> {
    const NAME: &'static str = G::NAME;
}

impl<G: GrpcService> Service<http::Request<tonic::body::Body>> for Served<G> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = G::answer(self.0.clone(), req);
        Box::pin(async move { Ok(answer.await) })
    }
}

/// `demo.Greeter`, answering as the server's [`Mode`] says.
struct Greeter;

impl GrpcService for Greeter {
    const NAME: &'static str = "demo.Greeter";

    fn answer(state: Arc<ServerState>, req: http::Request<tonic::body::Body>) -> Answer {
        state.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if req.uri().path() != SAY_HELLO {
                return Status::unimplemented("no such method").into_http();
            }
            match state.mode() {
                Mode::Ok => {
                    let mut grpc =
                        tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
                    let server = state.name.clone();
                    let hello = Unary(move |r: HelloRequest| {
                        Ok(HelloReply {
                            message: format!("hello, {}", r.name),
                            server: server.clone(),
                        })
                    });
                    grpc.unary(hello, req).await
                }
                Mode::UnavailableInTrailers => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                    trailers.insert("grpc-message", http::HeaderValue::from_static("broken"));
                    let frames = futures::stream::iter([Ok::<_, Infallible>(
                        Frame::<Bytes>::trailers(trailers),
                    )]);
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(tonic::body::Body::new(StreamBody::new(frames)))
                        .expect("response")
                }
                Mode::UnavailableTrailersOnly => Status::unavailable("broken").into_http(),
                Mode::ResourceExhausted => Status::resource_exhausted("busy").into_http(),
                Mode::Hold => std::future::pending().await,
            }
        })
    }
}

/// `grpc.health.v1.Health`, answering the server's serving status.
struct HealthService;

impl GrpcService for HealthService {
    const NAME: &'static str = "grpc.health.v1.Health";

    fn answer(state: Arc<ServerState>, req: http::Request<tonic::body::Body>) -> Answer {
        state.health_checks.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if req.uri().path() != "/grpc.health.v1.Health/Check" {
                return Status::unimplemented("no such method").into_http();
            }
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            let check = Unary(move |r: HealthCheckRequest| match r.service.as_str() {
                "" | "demo.Greeter" => Ok(HealthCheckResponse {
                    status: state.serving.load(Ordering::Relaxed),
                }),
                other => Err(Status::not_found(format!("unknown service {other}"))),
            });
            grpc.unary(check, req).await
        })
    }
}

/// Starts the example's proxy with `args` over `endpoints`.
async fn start_proxy(
    endpoints: Vec<Endpoint>,
    args: Args,
) -> (
    SocketAddr,
    lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    (addr, pool, tokio::spawn(serving))
}

/// The example's arguments with short timers and the gRPC health check.
fn grpc_args() -> Args {
    Args {
        check: Some(Check::Grpc(String::new())),
        check_interval: Duration::from_millis(100),
        ejection_time: Duration::from_secs(600),
        ..Default::default()
    }
}

/// A tonic client of `addr` (h2c), over one HTTP/2 connection.
async fn grpc_client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
}

/// Makes `n` calls one after the other: the servers that answered (and how often), and the
/// status codes of the failed calls.
async fn calls(
    client: &tonic::client::Grpc<Channel>,
    n: usize,
) -> (BTreeMap<String, usize>, Vec<Code>) {
    let (mut by_server, mut failed) = (BTreeMap::new(), Vec::new());
    for i in 0..n {
        let call = say_hello(client.clone(), format!("call {i}"));
        match tokio::time::timeout(HANG, call).await.expect("a call hung") {
            Ok(reply) => *by_server.entry(reply.server).or_default() += 1,
            Err(status) => failed.push(status.code()),
        }
    }
    (by_server, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_through_the_proxy_spread_survive_a_stopped_server_then_get_unavailable() {
    let mut servers = Vec::new();
    for name in ["grpc-1", "grpc-2", "grpc-3"] {
        servers.push(GrpcServer::start(name, Mode::Ok, true).await);
    }
    // The example's defaults but the check: upstream HTTP/1.1, so only the gRPC rule sends
    // these calls over HTTP/2.
    let endpoints = servers.iter().map(GrpcServer::endpoint).collect();
    let (addr, pool, task) = start_proxy(endpoints, grpc_args()).await;
    let client = grpc_client(addr).await;

    let (by_server, failed) = calls(&client, 30).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by_server.len(), 3, "calls not spread: {by_server:?}");

    // One server stops between calls; once the pool has taken it out, no call fails.
    let stopped = servers.remove(1);
    let stopped_id = stopped.id();
    stopped.stop().await;
    common::wait_until(HANG, "the stopped server to be taken out", || {
        pool.health(&stopped_id) != Some(Health::Healthy)
    })
    .await;
    let (by_server, failed) = calls(&client, 30).await;
    assert!(
        failed.is_empty(),
        "{} calls failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        by_server.keys().collect::<Vec<_>>(),
        ["grpc-1", "grpc-3"],
        "{by_server:?}"
    );

    // All down: UNAVAILABLE from the proxy, as a gRPC answer (not UNKNOWN from an HTTP 503).
    for s in servers {
        let id = s.id();
        s.stop().await;
        common::wait_until(HANG, "the stopped server to be taken out", || {
            pool.health(&id) != Some(Health::Healthy)
        })
        .await;
    }
    let (_, failed) = calls(&client, 3).await;
    assert_eq!(failed, [Code::Unavailable; 3]);

    // What the proxy sends: HTTP 200, trailers-only, grpc-status 14 with a message.
    let res = raw_grpc_call(addr, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-message"], "no backend available");
    let body = res.into_body().collect().await.expect("body");
    assert!(body.trailers().is_none() && body.to_bytes().is_empty());
    task.abort();
}

/// One `SayHello` call over a new HTTP/2 connection to `addr`, with `grpc-timeout` if given.
async fn raw_grpc_call(
    addr: SocketAddr,
    timeout: Option<&'static str>,
) -> http::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let msg = prost::Message::encode_to_vec(&HelloRequest { name: "raw".into() });
    let mut framed = vec![0];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let mut req = http::Request::post(format!("http://{addr}{SAY_HELLO}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        req = req.header("grpc-timeout", t);
    }
    let req = req.body(Full::new(Bytes::from(framed))).expect("request");
    tokio::time::timeout(HANG, send.send_request(req))
        .await
        .expect("no answer")
        .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_check_asks_grpc_health_v1() {
    let server = GrpcServer::start("grpc-1", Mode::Ok, true).await;
    let no_health = GrpcServer::start("grpc-2", Mode::Ok, false).await;
    let ep = server.endpoint();
    let kind = |r: Result<(), lbkit::health::CheckError>| r.map_err(|e| e.kind());

    assert_eq!(kind(GrpcCheck::new().check(&ep).await), Ok(()));
    let greeter = GrpcCheck::new().service("demo.Greeter");
    assert_eq!(kind(greeter.check(&ep).await), Ok(()));
    let unknown = GrpcCheck::new().service("nope.Nope").check(&ep).await;
    assert_eq!(kind(unknown), Err(CheckErrorKind::GrpcStatus(5)));
    server.set_serving(NOT_SERVING);
    assert_eq!(
        kind(GrpcCheck::new().check(&ep).await),
        Err(CheckErrorKind::NotServing(2))
    );
    server.set_serving(SERVING);
    // A server without the health service answers UNIMPLEMENTED.
    assert_eq!(
        kind(GrpcCheck::new().check(&no_health.endpoint()).await),
        Err(CheckErrorKind::GrpcStatus(12))
    );
    // An HTTP/1.1-only probe fails on an HTTP/2-only server; the same probe over h2 reaches
    // it (tonic answers a plain GET with HTTP 200 and a gRPC error), and so does the default
    // probe, which finds out that the server speaks only HTTP/2.
    let h1 = HttpCheck::get("/").http2(false).check(&ep).await;
    assert_eq!(kind(h1), Err(CheckErrorKind::Protocol));
    assert_eq!(
        kind(HttpCheck::get("/").http2(true).check(&ep).await),
        Ok(())
    );
    assert_eq!(kind(HttpCheck::get("/").check(&ep).await), Ok(()));
    let checks_before = server.state.health_checks.load(Ordering::Relaxed);
    assert!(checks_before >= 4, "{checks_before}");

    // Through the proxy (`--check grpc`): a NOT_SERVING server gets no calls, and gets them
    // again once it serves.
    let (addr, pool, task) = start_proxy(vec![ep.clone(), no_health.endpoint()], grpc_args()).await;
    common::wait_until(
        HANG,
        "the server without a health service to be down",
        || pool.health(&no_health.id()) == Some(Health::Down),
    )
    .await;
    server.set_serving(NOT_SERVING);
    common::wait_until(HANG, "the NOT_SERVING server to be down", || {
        pool.health(&server.id()) == Some(Health::Down)
    })
    .await;
    let client = grpc_client(addr).await;
    let (_, failed) = calls(&client, 2).await;
    assert_eq!(failed, [Code::Unavailable; 2]);
    let calls_while_down = server.state.calls.load(Ordering::Relaxed);
    assert_eq!(calls_while_down, 0);
    server.set_serving(SERVING);
    common::wait_until(HANG, "the serving server to be up", || {
        pool.health(&server.id()) == Some(Health::Healthy)
    })
    .await;
    let (by_server, failed) = calls(&client, 5).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by_server.get("grpc-1"), Some(&5));
    task.abort();
    server.stop().await;

    // A stopped server: the connection is refused.
    let refused = GrpcCheck::new().check(&ep).await;
    assert_eq!(kind(refused), Err(CheckErrorKind::Refused));
    no_health.stop().await;
}

/// Calls through the proxy until `done` says enough (at most 500 calls).
async fn call_until(
    client: &tonic::client::Grpc<Channel>,
    mut done: impl FnMut() -> bool,
) -> HashMap<Code, usize> {
    let mut codes = HashMap::new();
    for i in 0..500 {
        if done() {
            return codes;
        }
        let call = say_hello(client.clone(), format!("call {i}"));
        let code = match tokio::time::timeout(HANG, call).await.expect("a call hung") {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        *codes.entry(code).or_default() += 1;
    }
    panic!("not done after 500 calls: {codes:?}");
}

fn errors(
    pool: &lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>,
    id: &EndpointId,
) -> u64 {
    pool.endpoints()
        .iter()
        .find(|(e, _)| e.id() == id)
        .map_or(0, |(_, s)| s.errors())
}

/// The proxy over a server named `broken` and others, after calls until `broken` was ejected.
struct Ejected {
    /// The status codes the calls got.
    codes: HashMap<Code, usize>,
    pool: lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>,
    client: tonic::client::Grpc<Channel>,
    proxy: tokio::task::JoinHandle<()>,
    // The servers stop when dropped.
    _servers: Vec<GrpcServer>,
}

/// Starts servers `broken` (answering as `mode`) and `others` behind the proxy, and calls until
/// `broken` is ejected.
async fn call_until_ejected(mode: Mode, others: &[(&str, Mode)]) -> Ejected {
    let mut servers = vec![GrpcServer::start("broken", mode, true).await];
    for (name, mode) in others {
        servers.push(GrpcServer::start(name, *mode, true).await);
    }
    let endpoints = servers.iter().map(GrpcServer::endpoint).collect();
    let (addr, pool, proxy) = start_proxy(endpoints, grpc_args()).await;
    let client = grpc_client(addr).await;
    let broken = EndpointId::from("broken");
    let codes = call_until(&client, || pool.health(&broken) == Some(Health::Ejected)).await;
    Ejected {
        codes,
        pool,
        client,
        proxy,
        _servers: servers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_14_in_trailers_counts_as_a_failure_and_ejects_the_server() {
    let run = call_until_ejected(Mode::UnavailableInTrailers, &[("ok", Mode::Ok)]).await;
    // Outlier detection's default: 5 failures in a row eject.
    assert_eq!(
        run.codes.get(&Code::Unavailable),
        Some(&5),
        "{:?}",
        run.codes
    );
    assert_eq!(errors(&run.pool, &EndpointId::from("broken")), 5);
    assert_eq!(errors(&run.pool, &EndpointId::from("ok")), 0);
    // Ejected: every call goes to the one that works.
    let (by_server, failed) = calls(&run.client, 10).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by_server.get("ok"), Some(&10));
    run.proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_unavailable_counts_but_resource_exhausted_is_overload_not_failure() {
    let others = [("busy", Mode::ResourceExhausted), ("ok", Mode::Ok)];
    let run = call_until_ejected(Mode::UnavailableTrailersOnly, &others).await;
    let codes = &run.codes;
    assert_eq!(codes.get(&Code::Unavailable), Some(&5), "{codes:?}");
    assert_eq!(errors(&run.pool, &EndpointId::from("broken")), 5);
    // The busy server's answers reach the client as they are, and do not count against it.
    assert!(
        codes.get(&Code::ResourceExhausted).copied().unwrap_or(0) >= 4,
        "{codes:?}"
    );
    let busy = EndpointId::from("busy");
    assert_eq!(errors(&run.pool, &busy), 0);
    assert_eq!(run.pool.health(&busy), Some(Health::Healthy));
    assert_eq!(errors(&run.pool, &EndpointId::from("ok")), 0);
    run.proxy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_call_and_is_no_failure_of_the_server() {
    let held = GrpcServer::start("held", Mode::Hold, true).await;
    let (addr, pool, task) = start_proxy(vec![held.endpoint()], grpc_args()).await;

    let res = raw_grpc_call(addr, Some("200m")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "4");
    assert_eq!(
        res.headers()["grpc-message"],
        "deadline (grpc-timeout) exceeded"
    );
    assert_eq!(held.state.calls.load(Ordering::Relaxed), 1);
    common::wait_until(
        HANG,
        "the given-up call to leave the in-flight count",
        || pool.in_flight() == 0,
    )
    .await;
    let states = pool.endpoints();
    assert_eq!(
        states[0].1.errors(),
        0,
        "the client's deadline is no failure"
    );
    assert_eq!(states[0].1.cancelled(), 1);
    task.abort();
}

/// A backend on 127.0.0.1 speaking HTTP/1.1 only, HTTP/2 only, or both (hyper-util's auto
/// server): answers its name, with the protocol it was spoken to in `x-version`; counts the
/// health checks it gets.
async fn http_backend(
    name: &'static str,
    protocols: UpstreamProtocol,
) -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let checks = Arc::new(AtomicU64::new(0));
    let seen = checks.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if req
                        .headers()
                        .get("user-agent")
                        .is_some_and(|u| u == "lbkit-health-check")
                    {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    let res = http::Response::builder()
                        .header("x-version", format!("{:?}", req.version()))
                        .body(Full::new(Bytes::from(name)))
                        .expect("response");
                    std::future::ready(Ok::<_, Infallible>(res))
                });
            let io = TokioIo::new(stream);
            match protocols {
                UpstreamProtocol::Http1 => {
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    });
                }
                UpstreamProtocol::Http2 => {
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    });
                }
                _ => {
                    conns.spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    });
                }
            }
        }
    });
    (addr, checks, task)
}

/// A GET through `proxy` from an HTTP/1.1 or an HTTP/2 client: the backend's `x-version`.
async fn get_version(proxy: SocketAddr, http2: bool) -> String {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let io = TokioIo::new(stream);
    let req = http::Request::get(format!("http://{proxy}/"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let res = if http2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
        tokio::spawn(conn);
        tokio::time::timeout(HANG, send.send_request(req)).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        tokio::time::timeout(HANG, send.send_request(req)).await
    }
    .expect("no answer")
    .expect("response");
    assert_eq!(res.status(), 200, "{res:?}");
    let expected = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert_eq!(res.version(), expected);
    res.headers()["x-version"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_on_one_listener_reach_http1_and_http2_backends() {
    // (what the proxy speaks upstream, what the backend speaks, what it sees from an
    // HTTP/1.1 client, from an HTTP/2 client)
    let cases = [
        (
            UpstreamProtocol::Http1,
            UpstreamProtocol::Http1,
            "HTTP/1.1",
            "HTTP/1.1",
        ),
        (
            UpstreamProtocol::Http2,
            UpstreamProtocol::Http2,
            "HTTP/2.0",
            "HTTP/2.0",
        ),
        (
            UpstreamProtocol::SameAsClient,
            UpstreamProtocol::SameAsClient,
            "HTTP/1.1",
            "HTTP/2.0",
        ),
    ];
    for (upstream, backend, from_h1, from_h2) in cases {
        let (backend_addr, checks, backend_task) = http_backend("b", backend).await;
        let args = Args {
            upstream,
            // GET / in the upstream protocol (h2 for `Http2`).
            check: Some(Check::Http("/".into())),
            check_interval: Duration::from_millis(50),
            ..Default::default()
        };
        let ep = Endpoint::new("b").with_addr(backend_addr);
        let (addr, pool, task) = start_proxy(vec![ep], args).await;
        // A few checks have passed: the HTTP check speaks the backend's protocol.
        common::wait_until(HANG, "three health checks", || {
            checks.load(Ordering::Relaxed) >= 3
        })
        .await;
        assert_eq!(
            pool.health(&EndpointId::from("b")),
            Some(Health::Healthy),
            "{upstream:?}"
        );
        assert_eq!(get_version(addr, false).await, from_h1, "{upstream:?}");
        assert_eq!(get_version(addr, true).await, from_h2, "{upstream:?}");
        task.abort();
        backend_task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_side_balanced_tonic_client_sees_unavailable_with_no_server_up() {
    let servers = [
        GrpcServer::start("grpc-1", Mode::Ok, false).await,
        GrpcServer::start("grpc-2", Mode::Ok, false).await,
    ];
    let endpoints: Vec<Endpoint> = servers.iter().map(GrpcServer::endpoint).collect();
    let balancer = Balancer::new(endpoints, RoundRobin::new(), |ep: &Endpoint| {
        let addr = ep.socket_addr().expect("an address");
        Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy()
    });
    let client = tonic::client::Grpc::new(balancer.map_err(Status::from));
    let reply = say_hello(client.clone(), "up".into())
        .await
        .expect("a reply");
    assert!(reply.server.starts_with("grpc-"));
    for s in servers {
        s.stop().await;
    }
    for _ in 0..2 {
        let status = say_hello(client.clone(), "down".into()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    // No endpoint at all.
    let none: Vec<Endpoint> = Vec::new();
    let empty = Balancer::new(none, RoundRobin::new(), |_: &Endpoint| -> Channel {
        unreachable!("no endpoint to make a channel for")
    });
    let status = say_hello(
        tonic::client::Grpc::new(empty.map_err(Status::from)),
        "x".into(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "no endpoint available");
}

#[test]
fn the_grpc_client_example_runs() {
    grpc_client::main().expect("the grpc_client example");
}

/// An HTTP/2-only backend written with hyper, standing for the gRPC servers users have that
/// are not tonic: counts the connections it accepts, the health checks and the other
/// requests it gets.
struct H2Backend {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    checks: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// How an [`H2Backend`] answers.
#[derive(Clone, Copy, Debug)]
enum H2Answer {
    /// As grpc-go does: a gRPC request gets `grpc-status: 0` (trailers-only), any other
    /// request `415 Unsupported Media Type` with a gRPC error (`grpc-status: 13`).
    GrpcServer,
    /// 200, with the protocol spoken in `x-version`.
    Plain,
}

impl H2Backend {
    async fn start(name: &'static str, answer: H2Answer) -> H2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicU64::new(0));
        let checks = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (conns, chk, reqs) = (connections.clone(), checks.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::Relaxed);
                let (chk, reqs) = (chk.clone(), reqs.clone());
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let is_check = req
                            .headers()
                            .get("user-agent")
                            .is_some_and(|ua| ua == "lbkit-health-check");
                        let counter = if is_check { &chk } else { &reqs };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let res = http::Response::builder()
                            .header("x-server", name)
                            .header("x-version", format!("{:?}", req.version()));
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
                        let res = match answer {
                            H2Answer::GrpcServer if grpc => res
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0"),
                            H2Answer::GrpcServer => res
                                .status(415)
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "13")
                                .header("grpc-message", "invalid gRPC request content-type"),
                            H2Answer::Plain => res,
                        };
                        let res = res.body(Full::new(Bytes::from(name))).expect("response");
                        std::future::ready(Ok::<_, Infallible>(res))
                    });
                served.spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        H2Backend {
            addr,
            connections,
            checks,
            requests,
            task,
        }
    }

    fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint::new(name).with_addr(self.addr)
    }
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The default HTTP check finds out that a backend speaks only HTTP/2 on its first check (an
/// HTTP/1.1 attempt that fails on a protocol error, then h2c), and remembers it: later checks
/// open one connection each, in HTTP/2. A gRPC server's answer to a plain GET (415 with a
/// gRPC error) is up; told to speak HTTP/1.1 only, the check fails on a protocol error.
#[tokio::test]
async fn the_default_http_check_finds_http2_only_backends_and_remembers_them() {
    let backend = H2Backend::start("grpc-go-like", H2Answer::GrpcServer).await;
    let ep = backend.endpoint("b");
    let kind = |r: Result<(), lbkit::health::CheckError>| r.map_err(|e| e.kind());
    let check = HttpCheck::get("/");
    assert_eq!(kind(check.check(&ep).await), Ok(()));
    assert_eq!(backend.connections.load(Ordering::Relaxed), 2);
    assert_eq!(backend.checks.load(Ordering::Relaxed), 1);
    // A clone shares what the check learned.
    for n in 1..=3 {
        assert_eq!(kind(check.clone().check(&ep).await), Ok(()));
        assert_eq!(backend.connections.load(Ordering::Relaxed), 2 + n);
        assert_eq!(backend.checks.load(Ordering::Relaxed), 1 + n);
    }
    // The gRPC exception only holds for the protocol found by the check.
    assert_eq!(
        kind(HttpCheck::get("/").http2(true).check(&ep).await),
        Err(CheckErrorKind::Status(415))
    );
    assert_eq!(
        kind(HttpCheck::get("/").http2(false).check(&ep).await),
        Err(CheckErrorKind::Protocol)
    );
    // Nor when a body is expected.
    assert_eq!(
        kind(HttpCheck::get("/").expect_body("ok").check(&ep).await),
        Err(CheckErrorKind::Status(415))
    );
    // An HTTP/1.1 backend is checked in HTTP/1.1, on one connection.
    let h1 = common::start_server("h1").await;
    assert_eq!(
        kind(HttpCheck::get("/").check(&h1.endpoint()).await),
        Ok(())
    );
    assert_eq!(h1.hits(), 1);
    assert_eq!(h1.open_connections(), 0);
}

/// Sends `n` requests through the proxy at `addr` over one HTTP/2 connection, gRPC-shaped
/// (`POST`, `content-type: application/grpc`) if `grpc`; returns the answers per backend
/// (`x-server`) and the failures.
async fn h2_requests(
    addr: SocketAddr,
    n: usize,
    grpc: bool,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let (mut by_server, mut failed) = (BTreeMap::new(), Vec::new());
    for _ in 0..n {
        let req = if grpc {
            http::Request::post(format!("http://{addr}{SAY_HELLO}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
        } else {
            http::Request::get(format!("http://{addr}/"))
        };
        let req = req.body(Full::new(Bytes::new())).expect("request");
        let res = tokio::time::timeout(HANG, send.clone().send_request(req))
            .await
            .expect("a request hung");
        match res {
            Ok(res)
                if res.status() == 200
                    && res.headers().get("grpc-status").is_none_or(|s| s == "0") =>
            {
                let server = res.headers()["x-server"].to_str().expect("name").to_owned();
                *by_server.entry(server).or_default() += 1;
            }
            Ok(res) => failed.push(format!("{:?}", res.headers())),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (by_server, failed)
}

/// Starts an [`H2Backend`] per name, and their endpoints (named so).
async fn h2_backends(
    names: [&'static str; 3],
    answer: H2Answer,
) -> (Vec<H2Backend>, Vec<Endpoint>) {
    let mut backends = Vec::new();
    for name in names {
        backends.push(H2Backend::start(name, answer).await);
    }
    let endpoints = backends
        .iter()
        .zip(names)
        .map(|(b, name)| b.endpoint(name))
        .collect();
    (backends, endpoints)
}

/// Waits until every backend has passed `n` HTTP/2 health checks (which the default check
/// only sends once it found the backend speaks only HTTP/2).
async fn wait_for_checks(backends: &[H2Backend], n: u64) {
    common::wait_until(HANG, "the backends to be checked over HTTP/2", || {
        backends
            .iter()
            .all(|b| b.checks.load(Ordering::Relaxed) >= n)
    })
    .await;
}

/// The README's proxy with no flags in front of three HTTP/2-only gRPC servers (answering a
/// plain GET as grpc-go does, with 415 and a gRPC error): the default check keeps them up,
/// and gRPC calls through the proxy succeed, 100 of 100, spread over all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_only_grpc_backends_work_with_no_flags() {
    let (backends, endpoints) = h2_backends(["g1", "g2", "g3"], H2Answer::GrpcServer).await;
    let args = Args {
        check_interval: Duration::from_millis(50),
        ..Default::default()
    };
    assert!(args.check.is_none() && args.upstream == UpstreamProtocol::Http1);
    let (addr, pool, task) = start_proxy(endpoints, args).await;
    wait_for_checks(&backends, 3).await;
    for name in ["g1", "g2", "g3"] {
        assert_eq!(pool.health(&EndpointId::new(name)), Some(Health::Healthy));
    }

    let (by_server, failed) = h2_requests(addr, 100, true).await;
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(by_server.values().sum::<usize>(), 100);
    assert_eq!(by_server.len(), 3, "{by_server:?}");
    let reached: u64 = backends
        .iter()
        .map(|b| b.requests.load(Ordering::Relaxed))
        .sum();
    assert_eq!(reached, 100);
    task.abort();
}

/// Plain HTTP/2 requests reach HTTP/2-only backends with `--upstream same` and the default
/// check: 100 of 100, spoken to in HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_only_backends_work_with_upstream_same_and_the_default_check() {
    let (backends, endpoints) = h2_backends(["p1", "p2", "p3"], H2Answer::Plain).await;
    let args = Args {
        upstream: UpstreamProtocol::SameAsClient,
        check_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let (addr, _pool, task) = start_proxy(endpoints, args).await;
    wait_for_checks(&backends, 3).await;
    let (by_server, failed) = h2_requests(addr, 100, false).await;
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(by_server.values().sum::<usize>(), 100);
    assert_eq!(by_server.len(), 3, "{by_server:?}");
    task.abort();
}
