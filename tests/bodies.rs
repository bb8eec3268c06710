//! Request bodies from hostile clients, over real sockets on 127.0.0.1 (issue 13, item 5):
//! lbkit's `Server` → `ErrorResponseLayer` → body buffering → `FailoverLayer` →
//! `BalancerLayer` → `Forward` in front of two real HTTP/1.1 backends.
//!
//! - the replay buffer keeps to its limit exactly: a body one byte over it is forwarded but
//!   not retried (it was retried, buffered whole, before);
//! - a `ReplayBuffer` caps the bytes held for replay by all requests at once: past the cap a
//!   body is forwarded without being buffered (and is not retried), and the bytes come back
//!   when the requests end;
//! - a body that stalls ends its request when the server's body read timeout expires.

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{wait_until, HANG};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lbkit::failover::{FailoverLayer, ReplayBody, ReplayBuffer, RetryBudget};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{RequestBody, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

async fn within<F: Future>(f: F) -> F::Output {
    // Only a hang takes that long.
    tokio::time::timeout(HANG * 2, f)
        .await
        .expect("test did not finish in time")
}

/// What the two backends share: the request ids seen (the first attempt of each request,
/// whichever backend gets it, is answered `503`, so the proxy retries on the other one when
/// the body can be sent again), and a gate the first attempt of `x-hold` requests waits at.
#[derive(Clone)]
struct Fleet {
    seen: Arc<Mutex<HashSet<String>>>,
    gate: Arc<Semaphore>,
}

/// A backend on 127.0.0.1: reads the whole body, answers `503` to the first attempt of a
/// request id and `200 len=N` to later ones; stopped when dropped.
struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            seen: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

fn backend(fleet: Fleet) -> Backend {
    let (listener, addr) = common::listen_reserved();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let fleet = fleet.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let fleet = fleet.clone();
                    async move {
                        let id = req.headers()["x-id"].to_str().unwrap().to_owned();
                        let hold = req.headers().contains_key("x-hold");
                        let len = match req.into_body().collect().await {
                            Ok(b) => b.to_bytes().len(),
                            Err(_) => return Ok(Response::new(Full::new(Bytes::new()))),
                        };
                        let first = fleet.seen.lock().unwrap().insert(id);
                        if first && hold {
                            fleet.gate.acquire().await.unwrap().forget();
                        }
                        let status = match first {
                            true => StatusCode::SERVICE_UNAVAILABLE,
                            false => StatusCode::OK,
                        };
                        let body = Full::new(Bytes::from(format!("len={len}")));
                        let res = Response::builder().status(status).body(body).unwrap();
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Backend { addr, task }
}

/// The body the failover layer and below answer with.
type AnswerBody = lbkit::balance::TrackedBody<lbkit::proxy::ForwardBody<ReplayBody<RequestBody>>>;
/// What the failover layer and below answer.
type Answer = Response<AnswerBody>;
/// The proxy's service, as the server calls it.
type ProxySvc = BoxCloneSyncService<
    Request<RequestBody>,
    Response<lbkit::proxy::ProxyBody<AnswerBody>>,
    Infallible,
>;

/// The proxy over `backends`, served by lbkit's server on 127.0.0.1; `buffering` turns the
/// client's request into one with a `ReplayBody` (buffered or not) before the failover layer.
fn proxy<L>(backends: &[Backend], buffering: L) -> (SocketAddr, JoinHandle<()>)
where
    L: tower::Layer<BoxCloneSyncService<Request<ReplayBody<RequestBody>>, Answer, BoxError>>,
    L::Service: Service<Request<RequestBody>, Response = Answer, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as Service<Request<RequestBody>>>::Future: Send + 'static,
{
    let (addr, task, _) = proxy_with(backends, buffering, |server| server);
    (addr, task)
}

/// As [`proxy`], with the server configured by `server`; also returns the balancer's pool.
fn proxy_with<L>(
    backends: &[Backend],
    buffering: L,
    server: impl FnOnce(Server<ProxySvc>) -> Server<ProxySvc>,
) -> (
    SocketAddr,
    JoinHandle<()>,
    lbkit::Pool<lbkit::balance::Target, RoundRobin>,
)
where
    L: tower::Layer<BoxCloneSyncService<Request<ReplayBody<RequestBody>>, Answer, BoxError>>,
    L::Service: Service<Request<RequestBody>, Response = Answer, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as Service<Request<RequestBody>>>::Future: Send + 'static,
{
    let endpoints: Vec<Endpoint> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Endpoint::new(format!("b{i}")).with_addr(b.addr))
        .collect();
    let balancer = BalancerLayer::new(endpoints, RoundRobin::new());
    let pool = balancer.pool().clone();
    let inner = ServiceBuilder::new()
        .layer(FailoverLayer::new(RetryBudget::unlimited()))
        .layer(balancer)
        .service(Forward::<ReplayBody<RequestBody>>::new())
        .map_err(BoxError::from);
    let inner = BoxCloneSyncService::new(inner);
    let svc: ProxySvc = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .service(buffering.layer(inner)),
    );
    let (listener, addr) = common::listen_reserved();
    let server = server(Server::new(svc));
    (addr, tokio::spawn(server.serve(listener)), pool)
}

/// Sends `PUT /` with `len` bytes of body and request id `id` (and `x-hold` if `hold`) on a
/// new connection; returns the status and body text.
async fn put(addr: SocketAddr, id: &str, len: usize, hold: bool) -> (StatusCode, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::put("/").header("host", "x").header("x-id", id);
    if hold {
        req = req.header("x-hold", "1");
    }
    let req = req.body(Full::new(Bytes::from(vec![b'x'; len]))).unwrap();
    let res = send.send_request(req).await.unwrap();
    let status = res.status();
    (status, common::body_text(res.into_body()).await)
}

#[tokio::test]
async fn the_replay_buffer_keeps_to_its_limit_exactly() {
    within(async {
        let fleet = Fleet::new();
        let backends = [backend(fleet.clone()), backend(fleet.clone())];
        // `ReplayBody::buffer` with a 16-byte limit in front of the failover layer.
        let buffering = tower::layer::layer_fn(|inner: BoxCloneSyncService<_, _, BoxError>| {
            tower::service_fn(move |req: Request<RequestBody>| {
                let inner = inner.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = ReplayBody::buffer(body, 16).await?;
                    inner.oneshot(Request::from_parts(parts, body)).await
                }
            })
        });
        let (addr, task) = proxy(&backends, buffering);
        // At the limit: buffered, retried on the other backend after the first one's 503.
        assert_eq!(
            put(addr, "a", 16, false).await,
            (StatusCode::OK, "len=16".into())
        );
        // One byte over: forwarded whole, but not kept for a retry.
        let (status, body) = put(addr, "b", 17, false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "len=17")
        );
        task.abort();
    })
    .await
}

#[tokio::test]
async fn replay_buffers_of_all_requests_stay_under_the_cap() {
    within(async {
        let fleet = Fleet::new();
        let backends = [backend(fleet.clone()), backend(fleet.clone())];
        // 1 MiB per body, 10 bytes for all of them.
        let buffers = ReplayBuffer::new(1 << 20, 10);
        let (addr, task) = proxy(&backends, buffers.clone());

        // The first request's body is held (8 bytes) while its first attempt waits.
        let first = tokio::spawn(put(addr, "held", 8, true));
        wait_until(HANG, "the first body to be buffered", || {
            buffers.held() == 8
        })
        .await;
        // 8 more would cross the cap: forwarded unbuffered, so its 503 is not retried.
        let (status, body) = put(addr, "over", 8, false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "len=8")
        );
        // 2 bytes still fit.
        assert_eq!(
            put(addr, "small", 2, false).await,
            (StatusCode::OK, "len=2".into())
        );
        assert_eq!(buffers.held(), 8);

        // The first request goes on: 503, then retried from its buffer on the other backend.
        fleet.gate.add_permits(1);
        assert_eq!(first.await.unwrap(), (StatusCode::OK, "len=8".into()));
        wait_until(HANG, "the buffers to be given back", || buffers.held() == 0).await;
        // Room again.
        assert_eq!(
            put(addr, "again", 8, false).await,
            (StatusCode::OK, "len=8".into())
        );
        task.abort();
    })
    .await
}

#[tokio::test]
async fn a_stalled_body_ends_its_request_at_the_read_timeout() {
    within(async {
        let fleet = Fleet::new();
        let backends = [backend(fleet.clone()), backend(fleet.clone())];
        let no_buffering = tower::layer::layer_fn(|inner: BoxCloneSyncService<_, _, BoxError>| {
            tower::service_fn(move |req: Request<RequestBody>| {
                inner.clone().oneshot(req.map(ReplayBody::new))
            })
        });
        let (addr, task, pool) = proxy_with(&backends, no_buffering, |server| {
            server.body_read_timeout(Duration::from_millis(300))
        });
        // Headers and 10 bytes of a 100-byte body, then nothing (the connection stays open).
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                b"PUT / HTTP/1.1\r\nhost: x\r\nx-id: stalled\r\ncontent-length: 100\r\n\r\n0123456789",
            )
            .await
            .unwrap();
        // The proxy answers 408 and closes the connection.
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        // The backend request was aborted, and it is not the backend's failure.
        wait_until(HANG, "the aborted request to end", || pool.in_flight() == 0).await;
        for (endpoint, state) in pool.endpoints() {
            assert_eq!(state.errors(), 0, "{} counted a failure", endpoint.id());
        }
        let cancelled: u64 = pool.endpoints().iter().map(|(_, s)| s.cancelled()).sum();
        assert_eq!(cancelled, 1, "the aborted request counts as cancelled");
        // The proxy serves the next client as usual (a backend reads its whole body, and
        // answers the first attempt of a request with 503; unbuffered, it is not retried).
        let (status, body) = put(addr, "next", 4, false).await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "len=4"));
        task.abort();
    })
    .await
}
