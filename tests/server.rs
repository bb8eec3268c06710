//! lbkit's `Server` over real sockets on 127.0.0.1, against clients that misbehave: a request
//! head that never ends, a connection that says nothing, an idle HTTP/2 connection (h2c, and
//! h2 chosen by ALPN over TLS), more connections than the limit, and a graceful shutdown with a
//! request in flight.
//!
//! Timers are set short so the tests are quick, but nothing asserts how fast anything happens:
//! each test waits for a condition (the server closing the connection, a request being served)
//! under a generous limit that only catches hangs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::forwarded::ClientAddr;
use lbkit::server::{bind_reuse_port, RequestBody, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

const HANG: Duration = Duration::from_secs(30);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(HANG, f)
        .await
        .unwrap_or_else(|_| panic!("hung for {HANG:?}: {what}"))
}

type Svc =
    tower::util::BoxCloneSyncService<Request<RequestBody>, Response<Full<Bytes>>, Infallible>;

/// A service answering `peer=<ClientAddr>` and counting its requests.
fn echo_peer(count: Arc<AtomicU64>) -> Svc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<RequestBody>| {
        count.fetch_add(1, Ordering::SeqCst);
        let peer = req
            .extensions()
            .get::<ClientAddr>()
            .map_or("none".to_owned(), |c| c.0.to_string());
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
            format!("peer={peer}"),
        )))))
    }))
}

/// Serves `server` on a new listener; the task stops the server when aborted.
async fn serve(server: Server<Svc>) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (addr, tokio::spawn(server.serve(listener)))
}

/// A listener on 127.0.0.1 bound by the test (`Shared`: the workers share it) or with
/// `bind_reuse_port` (`Own`: on Linux each worker gets a listener of its own).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Listen {
    Shared,
    Own,
}

async fn listen(how: Listen) -> TcpListener {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    match how {
        Listen::Shared => TcpListener::bind(any).await.expect("bind"),
        Listen::Own => bind_reuse_port(any).await.expect("bind"),
    }
}

/// Reads until the server closes the connection (EOF or reset); returns what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/1.1 request on a new connection; the response body.
async fn get(addr: SocketAddr) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
    let res = send.send_request(req).await.expect("response");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn every_request_carries_the_client_address() {
    let (addr, task) = serve(Server::new(echo_peer(Arc::default()))).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    drop(stream);
    let body = within("a request", get(addr)).await;
    assert!(body.starts_with("peer=127.0.0.1:"), "{body}");
    assert_ne!(
        body,
        format!("peer={local}"),
        "a new connection, a new port"
    );
    task.abort();
}

#[tokio::test]
async fn a_service_that_is_send_but_not_sync_can_be_served_from_a_spawned_task() {
    // `BoxCloneService` is `Send` but not `Sync`: the server must not need more.
    let svc = tower::util::BoxCloneService::new(echo_peer(Arc::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(Server::new(svc).serve(listener));
    assert!(within("a request", get(addr)).await.starts_with("peer="));
    task.abort();
}

#[tokio::test]
async fn an_unfinished_request_head_is_closed_after_the_header_read_timeout() {
    let count = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_millis(300);
    let server = Server::new(echo_peer(count.clone()))
        .header_read_timeout(timeout)
        .idle_timeout(Duration::from_secs(600));
    let (addr, task) = serve(server).await;

    let mut slow = TcpStream::connect(addr).await.unwrap();
    // The wait for a head starts when the first response has gone out, after this instant.
    let started = Instant::now();
    // First a whole request, so the connection is past protocol detection and the
    // first-request deadline; then a head that never ends.
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = within("the first response", slow.read(&mut buf))
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    within("the server to close a slow head", read_to_close(&mut slow)).await;
    assert!(started.elapsed() >= timeout, "closed before the timeout");
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the slow request was never served"
    );

    // The server still serves others.
    assert!(within("a request", get(addr)).await.starts_with("peer="));
    task.abort();
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let server = Server::new(echo_peer(Arc::default()))
        .header_read_timeout(Duration::from_millis(200))
        .idle_timeout(Duration::from_secs(600));
    let (addr, task) = serve(server).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let got = within(
        "the server to close a silent connection",
        read_to_close(&mut silent),
    )
    .await;
    assert!(got.is_empty(), "nothing was asked, nothing answered");
    task.abort();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    let count = Arc::new(AtomicU64::new(0));
    let server = Server::new(echo_peer(count.clone()))
        .header_read_timeout(Duration::from_secs(600))
        .idle_timeout(Duration::from_millis(200));
    let (addr, task) = serve(server).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let res = send
        .send_request(
            Request::get("http://x/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .expect("an h2c request");
    assert_eq!(res.version(), http::Version::HTTP_2);
    res.into_body().collect().await.unwrap();
    // Idle from here: the server sends GOAWAY and closes, which ends the client's connection.
    within("the idle h2c connection to close", conn)
        .await
        .expect("connection task")
        .expect("a clean close (GOAWAY), not an error");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn a_silent_h2_client_after_alpn_is_closed() {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    use lbkit::server::tls::{CertStore, TlsConfig};
    let certs = CertStore::builder()
        .default_pem(
            ck.cert.pem().as_bytes(),
            ck.signing_key.serialize_pem().as_bytes(),
        )
        .build()
        .unwrap();
    let config = TlsConfig::new(certs).build().unwrap();
    let server = Server::new(echo_peer(Arc::default()))
        .tls(config)
        .header_read_timeout(Duration::from_millis(200))
        .idle_timeout(Duration::from_secs(600));
    let (addr, task) = serve(server).await;

    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut client = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = within(
        "the TLS handshake",
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
    )
    .await
    .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // Say nothing, not even the HTTP/2 preface: the server must close the connection.
    let mut buf = Vec::new();
    let _ = within(
        "the server to close a silent h2 client",
        tls.read_to_end(&mut buf),
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn past_the_connection_limit_clients_wait_in_the_backlog() {
    connection_limit(1, Listen::Shared).await;
}

/// The limit covers all the workers together.
#[tokio::test]
async fn with_workers_the_connection_limit_is_shared() {
    connection_limit(2, Listen::Shared).await;
}

/// The same when each worker has a listener of its own: a worker whose listener has nothing
/// to accept holds no slot, so the clients the kernel gives to the other one are served up to
/// the limit.
#[tokio::test]
async fn with_workers_on_their_own_listeners_the_connection_limit_is_shared() {
    connection_limit(2, Listen::Own).await;
}

async fn connection_limit(workers: usize, how: Listen) {
    let count = Arc::new(AtomicU64::new(0));
    let server = Server::new(echo_peer(count.clone()))
        .max_connections(2)
        .workers(workers);
    let listener = listen(how).await;
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server.serve(listener));

    // Two connections take both slots and stay open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = within("a response", s.read(&mut buf)).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        open.push(s);
    }
    // A third connects (the kernel completes the handshake) but is not accepted: its request
    // is not served while the two are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served past the connection limit");
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // One closes: the third is accepted and served.
    drop(open.pop());
    let n = within("the waiting client to be served", third.read(&mut buf))
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_eq!(count.load(Ordering::SeqCst), 3);
    task.abort();
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_then_returns() {
    shutdown_with_a_request_in_flight(1, Listen::Shared).await;
}

#[tokio::test]
async fn with_workers_shutdown_lets_the_request_in_flight_finish_then_returns() {
    shutdown_with_a_request_in_flight(2, Listen::Shared).await;
}

/// Every worker's own listener is closed: new connections are refused.
#[tokio::test]
async fn with_workers_on_their_own_listeners_shutdown_closes_them_all() {
    shutdown_with_a_request_in_flight(3, Listen::Own).await;
}

async fn shutdown_with_a_request_in_flight(workers: usize, how: Listen) {
    let release = Arc::new(Notify::new());
    let arrived = Arc::new(Notify::new());
    let (r, a) = (release.clone(), arrived.clone());
    let svc = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_req: Request<RequestBody>| {
            let (r, a) = (r.clone(), a.clone());
            async move {
                a.notify_one();
                r.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("done"))))
            }
        },
    ));
    let listener = listen(how).await;
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    let server = tokio::spawn(Server::new(svc).workers(workers).serve_with_shutdown(
        listener,
        async move { s.notified().await },
        HANG,
    ));

    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    within("the request to arrive", arrived.notified()).await;
    stop.notify_one();
    // New connections are refused once the listener is closed; the one in flight goes on.
    within("the listener to close", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release.notify_one();
    let got = within("the response and the close", read_to_close(&mut client)).await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    // On the test's own runtime the drain reaches the connection before the release does, so
    // the response says it closes. A worker thread may write the response before it sees the
    // drain (the two signals cross threads): the connection is closed after it all the same.
    if workers == 1 {
        assert!(text.contains("connection: close"), "{text}");
    }
    assert!(text.ends_with("done"), "{text}");
    within("the server to return", server).await.unwrap();
}

/// With workers every connection is served on a thread of the server's own, each running its
/// own event loop, and dropping the serving future closes the connections, as without them.
#[tokio::test]
async fn workers_serve_on_their_own_threads_and_stop_when_dropped() {
    let threads = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let arrived = Arc::new(Notify::new());
    let (t, a) = (threads.clone(), arrived.clone());
    let svc = tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |req: Request<RequestBody>| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            t.lock().unwrap().insert(name);
            let hold = req.uri().path() == "/hold";
            let a = a.clone();
            async move {
                if hold {
                    a.notify_one();
                    std::future::pending::<()>().await;
                }
                // A flavour the caller's runtime does not have: the worker's own.
                let flavor = tokio::runtime::Handle::current().runtime_flavor();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{flavor:?}")))))
            }
        },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(Server::new(svc).workers(2).serve(listener));
    for _ in 0..40 {
        assert_eq!(within("a request", get(addr)).await, "CurrentThread");
    }
    let names = threads.lock().unwrap().clone();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.starts_with("lbkit-worker-")),
        "served on {names:?}"
    );

    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    within("the held request to arrive", arrived.notified()).await;
    task.abort();
    let got = within("the connection to close", read_to_close(&mut held)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    within("the listener to close", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A service answering `got N bytes` once it has read the whole request body.
fn echo_len() -> Svc {
    tower::util::BoxCloneSyncService::new(tower::service_fn(|req: Request<RequestBody>| async {
        let body = req.into_body().collect().await.expect("body").to_bytes();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "got {} bytes",
            body.len()
        )))))
    }))
}

/// Reads one response with a `content-length` from `stream`; its status line and body.
async fn read_response(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> (String, String) {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffered[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("content-length");
            if buffered.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buffered[end + 4..end + 4 + len]).into_owned();
                buffered.drain(..end + 4 + len);
                return (head.lines().next().unwrap().to_owned(), body);
            }
        }
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the server closed the connection");
        buffered.extend_from_slice(&buf[..n]);
    }
}

// An idle HTTP/1.1 connection is taken apart after 1 to 2 s without requests (its buffers
// freed) and built again when the client sends more: the pauses below let that happen before
// each step (should the machine be too slow for it, the steps still have to pass).
#[tokio::test]
async fn a_keep_alive_connection_serves_requests_after_idling() {
    let (addr, task) = serve(Server::new(echo_len())).await;
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut buffered = Vec::new();
    let pause = Duration::from_millis(2500);

    conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = within("a first response", read_response(&mut conn, &mut buffered)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "got 0 bytes");

    // A request with a body, after idling.
    tokio::time::sleep(pause).await;
    conn.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\nhello world")
        .await
        .unwrap();
    let (status, body) = within(
        "a POST after idling",
        read_response(&mut conn, &mut buffered),
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "got 11 bytes");

    // Two pipelined requests in one write, after idling.
    tokio::time::sleep(pause).await;
    conn.write_all(
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let (_, first) = within(
        "the first pipelined response",
        read_response(&mut conn, &mut buffered),
    )
    .await;
    let (_, second) = within(
        "the second pipelined response",
        read_response(&mut conn, &mut buffered),
    )
    .await;
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("got 3 bytes", "got 0 bytes")
    );

    // A head that comes in two parts around a pause, and a body that comes later still.
    tokio::time::sleep(pause).await;
    conn.write_all(b"POST / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(pause).await;
    conn.write_all(b"content-length: 5\r\n\r\n").await.unwrap();
    tokio::time::sleep(pause).await;
    conn.write_all(b"12345").await.unwrap();
    let (status, body) = within("a slow request", read_response(&mut conn, &mut buffered)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "got 5 bytes");
    assert!(buffered.is_empty(), "nothing more was sent");
    task.abort();
}

// A connection idling (taken apart, see above) when the server shuts down is closed at once,
// and the server's future ends.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_on_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(Notify::new());
    let signal = stop.clone();
    let server = tokio::spawn(Server::new(echo_len()).serve_with_shutdown(
        listener,
        async move { signal.notified().await },
        HANG * 2,
    ));
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut buffered = Vec::new();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = within("a response", read_response(&mut conn, &mut buffered)).await;
    assert_eq!(body, "got 0 bytes");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.notify_one();
    assert!(within(
        "the server to close the idle connection",
        read_to_close(&mut conn)
    )
    .await
    .is_empty());
    within("the server to stop", server).await.unwrap();
}

/// On Linux, a listener bound with `bind_reuse_port` gives each worker a socket of its own on
/// its address (the kernel lists one listening socket per worker) and every connection is
/// served, whichever socket the kernel gives it to; a listener bound without it is shared by
/// the workers (one socket).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn with_bind_reuse_port_each_worker_listens_on_a_socket_of_its_own() {
    for (how, sockets) in [(Listen::Own, 3), (Listen::Shared, 1)] {
        let listener = listen(how).await;
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let server = Server::new(echo_peer(count.clone())).workers(3);
        let task = tokio::spawn(server.serve(listener));
        for _ in 0..30 {
            let got = within("a request", get(addr)).await;
            assert!(got.starts_with("peer=127.0.0.1:"), "{got}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 30);
        assert_eq!(listening_sockets(addr.port()), sockets, "{how:?}");
        task.abort();
    }
}

/// The sockets listening on 127.0.0.1:`port`, from the kernel's table.
#[cfg(target_os = "linux")]
fn listening_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 3 && f[1] == local && f[3] == "0A")
        .count()
}
