use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower_service::Service;

use super::accept::{accept_loop_sharing, connection_slots, Drain, Listener};
use super::body::RequestBody;
use super::conn::{drive, started, Activity, BoxedFutures, ConnService, Driven, IdleRules};
use super::idle::{self, Sniffed};
use super::workers;
use crate::error::BoxError;

/// A hardened HTTP/1.1 and HTTP/2 server for a tower service: see the [module docs](super) for
/// what it protects against and its defaults.
///
/// Each accepted connection speaks HTTP/2 by prior knowledge or ALPN (served with hyper-util's
/// `auto` builder), or HTTP/1.1 with upgrades otherwise (plain ones with hyper's `http1`
/// builder, parked without buffers while idle), so WebSockets pass through
/// [`Forward`](crate::proxy::Forward)); each request carries the peer's
/// [`ClientAddr`](crate::forwarded::ClientAddr). With [`tls`](Server::tls) (feature `tls`) it
/// terminates TLS first and serves what ALPN chose.
pub struct Server<S> {
    service: S,
    settings: Settings,
}

#[derive(Clone, Debug)]
struct Settings {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    max_header_bytes: usize,
    h2_max_concurrent_streams: u32,
    h2_keep_alive_interval: Option<Duration>,
    h2_keep_alive_timeout: Duration,
    body_read_timeout: Duration,
    workers: usize,
    #[cfg(feature = "tls")]
    tls: Option<Tls>,
    #[cfg(feature = "proxy-protocol")]
    proxy_protocol: Option<super::ProxyProtocol>,
}

#[cfg(feature = "tls")]
#[derive(Clone)]
struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

#[cfg(feature = "tls")]
impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Clone for Server<S> {
    fn clone(&self) -> Self {
        Server {
            service: self.service.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S> fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S> Server<S> {
    /// A server for `service`, with the default limits (see the [module docs](super)).
    pub fn new(service: S) -> Self {
        Server {
            service,
            settings: Settings {
                header_read_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(60),
                max_connections: 10_000,
                max_header_bytes: 64 * 1024,
                h2_max_concurrent_streams: 128,
                h2_keep_alive_interval: Some(Duration::from_secs(20)),
                h2_keep_alive_timeout: Duration::from_secs(20),
                body_read_timeout: Duration::from_secs(30),
                workers: 1,
                #[cfg(feature = "tls")]
                tls: None,
                #[cfg(feature = "proxy-protocol")]
                proxy_protocol: None,
            },
        }
    }

    /// How long a client may take to send a request head (default 30 s; nginx's
    /// `client_header_timeout` is 60 s, HAProxy configurations usually set `timeout
    /// http-request` to 10 s). A new connection must send its first request in full (or, for
    /// HTTP/2, open its first stream) within this time, or it is closed. On HTTP/1.1, where
    /// waiting for the next request and receiving its head are one wait, a kept-alive
    /// connection with no request in flight is closed gracefully after the shorter of this and
    /// the [idle timeout](Server::idle_timeout) (checked every half of it, so after between one
    /// and one and a half times that).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.settings.header_read_timeout = timeout;
        self
    }

    /// How long a connection may stay open with no request in flight before it is closed
    /// gracefully (default 60 s; nginx's `keepalive_timeout` is 75 s). Checked every half of
    /// it, so an idle connection closes after between one and one and a half times this.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.idle_timeout = timeout;
        self
    }

    /// How long a client may send no data while its request body is being read (default 30 s;
    /// nginx's `client_body_timeout` is 60 s). The timer runs per frame, only while the
    /// service waits for the next one: a slow upload that keeps sending is never cut, one that
    /// stalls is. On expiry the body fails with
    /// [`BodyError::is_timeout`](super::BodyError::is_timeout), whatever the service was
    /// doing for the request is dropped (a backend request is aborted, and counts as
    /// cancelled, not as the backend's failure), and the client gets `408 Request Timeout`
    /// (an HTTP/1.1 connection is then closed). `Duration::MAX` turns it off.
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.settings.body_read_timeout = timeout;
        self
    }

    /// Serves on `n` threads of its own, each running a single-threaded tokio runtime
    /// (default 1: no thread of its own, the connections are served on the runtime that runs
    /// [`serve`](Self::serve)). When the listener was bound with
    /// [`bind_reuse_port`](super::bind_reuse_port) (`SO_REUSEPORT`, Linux), each worker gets a
    /// listener of its own on that address and the kernel spreads new connections among them;
    /// otherwise (a listener bound without it, or another platform) they all accept from the
    /// given one. This is nginx's and HAProxy's
    /// layout, one event loop per core: a connection, its requests and whatever they set off
    /// (timers, tunnels, backend connections [`Forward`](crate::proxy::Forward) opens for
    /// them) stay on the thread that accepted it, with no work stealing and no wake-up of
    /// another thread on the request path. A multi-threaded runtime running `serve` instead
    /// moves tasks between its workers, which costs CPU on every request (see BENCHMARKS.md).
    ///
    /// The service is cloned into each worker; what its clones share (a balancer's pool,
    /// `Forward`'s connection pools) is shared across the workers. The [connection
    /// limit](Self::max_connections) and graceful shutdown cover all of them. Background tasks
    /// (health checks, discovery) stay on the runtime they were spawned on. `n` is at least 1;
    /// one per core (`std::thread::available_parallelism`) is the usual choice.
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = n.max(1);
        self
    }

    /// The most client connections open at once (default 10 000). Past it the server stops
    /// accepting; new connections wait in the kernel's listen backlog until one closes.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.settings.max_connections = max.max(1);
        self
    }

    /// The largest request head, in bytes (default 64 KiB, at least 8 KiB): for HTTP/1.1 the
    /// size of the read buffer that must hold the head, for HTTP/2 the header list size
    /// announced to the client.
    pub fn max_header_bytes(mut self, max: usize) -> Self {
        self.settings.max_header_bytes = max.max(8 * 1024);
        self
    }

    /// The most HTTP/2 streams a client may have open on one connection (default 128, as
    /// nginx's `http2_max_concurrent_streams`).
    pub fn http2_max_concurrent_streams(mut self, max: u32) -> Self {
        self.settings.h2_max_concurrent_streams = max;
        self
    }

    /// HTTP/2 keep-alive: a `PING` every `interval` on a connection that sent nothing, closed
    /// when the answer takes longer than `timeout` (default: every 20 s, 20 s). `None` turns
    /// the pings off.
    pub fn http2_keep_alive(mut self, interval: Option<Duration>, timeout: Duration) -> Self {
        self.settings.h2_keep_alive_interval = interval;
        self.settings.h2_keep_alive_timeout = timeout;
        self
    }

    /// Terminates TLS with `config` (built with [`TlsConfig`](super::tls::TlsConfig) from a
    /// reloadable [`CertStore`](super::tls::CertStore), or with
    /// [`server_config_from_pem`](super::tls::server_config_from_pem) for one certificate)
    /// and serves HTTP/2 or HTTP/1.1 as ALPN chose. A verified client certificate (mTLS) is
    /// put into every request of its connection as a
    /// [`PeerCertificate`](super::tls::PeerCertificate). A client gets 10 s for the handshake
    /// (see [`tls_handshake_timeout`](Server::tls_handshake_timeout)). Give
    /// [`Forward`](crate::proxy::Forward) `.proto("https")` so the backends learn the clients'
    /// scheme.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.settings.tls = Some(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            handshake_timeout: Duration::from_secs(10),
        });
        self
    }

    /// Takes the client's address from a PROXY protocol header (v1 or v2) that the L4 balancer
    /// in front sends at the start of each connection (before TLS, when both are on); the
    /// address becomes the requests' [`ClientAddr`](crate::forwarded::ClientAddr). Connections
    /// from peers the [`ProxyProtocol`](super::ProxyProtocol) does not trust are closed (feature
    /// `proxy-protocol`).
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
    pub fn proxy_protocol(mut self, proxy_protocol: super::ProxyProtocol) -> Self {
        self.settings.proxy_protocol = Some(proxy_protocol);
        self
    }

    /// How long a client may take to finish the TLS handshake before it is dropped (default
    /// 10 s). Only with [`tls`](Server::tls).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        if let Some(tls) = &mut self.settings.tls {
            tls.handshake_timeout = timeout;
        }
        self
    }
}

impl<S, B> Server<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Accepts connections from `listener` and serves them until this future is dropped, which
    /// also closes the connections it is serving. Accept errors never end it.
    pub async fn serve(self, listener: TcpListener) {
        self.serve_with_shutdown(listener, std::future::pending(), Duration::ZERO)
            .await
    }

    /// As [`serve`](Self::serve), until `shutdown` resolves; then stops accepting (closing
    /// `listener`) and shuts every connection down gracefully: requests in flight finish, an
    /// HTTP/1.1 connection closes after its current response, an HTTP/2 one sends `GOAWAY`.
    /// Connections still open after `grace` are closed, and it returns. An upgraded connection
    /// (a WebSocket that [`Forward`](crate::proxy::Forward) tunnels) counts as its client
    /// connection until it closes: it is waited for, and closed when `grace` is over.
    pub async fn serve_with_shutdown(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let slots = connection_slots(self.settings.max_connections);
        if self.settings.workers > 1 {
            return workers::serve(self, listener, slots, shutdown, grace).await;
        }
        self.serve_sharing(Listener::Shared(listener), slots, shutdown, grace)
            .await
    }

    /// How many worker threads [`workers`](Self::workers) asked for.
    pub(super) fn worker_count(&self) -> usize {
        self.settings.workers
    }

    /// The accept loop of one worker, its connections counted in `slots`.
    pub(super) async fn serve_sharing(
        self,
        listener: Listener,
        slots: Arc<tokio::sync::Semaphore>,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let conn = ConnParts::new(self);
        accept_loop_sharing(
            listener,
            slots,
            move |stream, peer, drain| conn.clone().serve(stream, peer, Some(drain)),
            shutdown,
            grace,
        )
        .await
    }

    /// Serves one connection accepted elsewhere, from `peer`, with this server's settings
    /// (but outside its connection limit and graceful shutdown): TLS handshake if configured,
    /// then HTTP until the client closes or the connection times out, and until the tunnels
    /// of its upgraded requests close (dropping the future closes them). Errors are logged,
    /// not returned.
    pub fn serve_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        ConnParts::new(self.clone()).serve(stream, peer, None)
    }
}

/// Which protocol a connection speaks.
#[derive(Clone, Copy)]
enum Proto {
    /// Sniffed: HTTP/2 if the client starts with its preface, else HTTP/1.1.
    Auto,
    /// HTTP/1.1, as ALPN chose.
    #[cfg(feature = "tls")]
    H1,
    /// HTTP/2, as ALPN chose.
    #[cfg(feature = "tls")]
    H2,
}

/// What is known about a connection once it is set up: the peer's address, whether it is TLS
/// and, after a TLS handshake, its verified client certificate.
struct ConnInfo {
    peer: SocketAddr,
    tls: bool,
    #[cfg(feature = "tls")]
    peer_cert: Option<super::tls::PeerCertificate>,
}

/// What a connection needs: a clone of the service, and what every connection of the server
/// shares.
#[derive(Clone)]
struct ConnParts<S> {
    service: S,
    shared: Arc<Shared>,
}

struct Shared {
    rules: IdleRules,
    /// The request body read timeout, if any.
    body_timeout: Option<Duration>,
    /// Plain HTTP/1.1 connections (sniffed by `idle::sniff`), parked while idle.
    http1: idle::Http1,
    /// Sniffs the protocol (HTTP/2 preface or HTTP/1.1).
    auto: auto::Builder<TokioExecutor>,
    /// For TLS connections whose ALPN chose one protocol.
    #[cfg(feature = "tls")]
    h1: auto::Builder<TokioExecutor>,
    #[cfg(feature = "tls")]
    h2: auto::Builder<TokioExecutor>,
    #[cfg(feature = "tls")]
    tls: Option<Tls>,
    #[cfg(feature = "proxy-protocol")]
    proxy_protocol: Option<super::ProxyProtocol>,
}

impl<S, B> ConnParts<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn new(server: Server<S>) -> Self {
        let s = server.settings;
        let mut auto = auto::Builder::new(TokioExecutor::new());
        // No hyper header-read timer for HTTP/1.1: it arms (and allocates) a timer for every
        // request, about 2 us of CPU each. The connection's idle rule bounds the same wait
        // (see `header_read_timeout`).
        auto.http1()
            .header_read_timeout(None::<Duration>)
            .max_buf_size(s.max_header_bytes)
            .keep_alive(true);
        // The same settings for the HTTP/1.1 connections served without `auto`.
        let mut http1 = http1::Builder::new();
        http1
            .header_read_timeout(None::<Duration>)
            .max_buf_size(s.max_header_bytes)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(s.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(s.h2_keep_alive_interval)
            .keep_alive_timeout(s.h2_keep_alive_timeout);
        let shared = Shared {
            body_timeout: (s.body_read_timeout != Duration::MAX).then_some(s.body_read_timeout),
            rules: IdleRules {
                first_request: s.header_read_timeout,
                idle: s.idle_timeout,
                idle_h1: s.idle_timeout.min(s.header_read_timeout),
            },
            http1: idle::Http1 {
                builder: http1,
                open: AtomicUsize::new(0),
            },
            #[cfg(feature = "tls")]
            h1: auto.clone().http1_only(),
            #[cfg(feature = "tls")]
            h2: auto.clone().http2_only(),
            auto,
            #[cfg(feature = "tls")]
            tls: s.tls,
            #[cfg(feature = "proxy-protocol")]
            proxy_protocol: s.proxy_protocol,
        };
        ConnParts {
            service: server.service,
            shared: Arc::new(shared),
        }
    }

    /// Serves one connection to its end (the future owns what it needs, so it can be spawned).
    async fn serve(self, stream: TcpStream, peer: SocketAddr, drain: Option<Drain>) {
        let _ = stream.set_nodelay(true);
        #[cfg(feature = "proxy-protocol")]
        let (stream, peer) = {
            let mut stream = stream;
            let peer = match &self.shared.proxy_protocol {
                // Boxed, as everything that is not the plain path: the connection's task is
                // as large as its largest state, and an idle connection should cost little.
                Some(pp) => match Box::pin(pp.accept(&mut stream, peer)).await {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection refused");
                        return;
                    }
                },
                None => peer,
            };
            (stream, peer)
        };
        #[cfg(feature = "tls")]
        if self.shared.tls.is_some() {
            return Box::pin(self.tls(stream, peer, drain)).await;
        }
        let conn = ConnInfo {
            peer,
            tls: false,
            #[cfg(feature = "tls")]
            peer_cert: None,
        };
        self.plain(stream, conn, drain).await
    }

    /// A TLS connection: the handshake, then HTTP as ALPN chose.
    #[cfg(feature = "tls")]
    async fn tls(self, stream: TcpStream, peer: SocketAddr, drain: Option<Drain>) {
        if let Some(tls) = &self.shared.tls {
            let accept = tls.acceptor.accept(stream);
            let stream = match tokio::time::timeout(tls.handshake_timeout, accept).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let session = stream.get_ref().1;
            let proto = match session.alpn_protocol() {
                Some(b"h2") => Proto::H2,
                Some(b"http/1.1") => Proto::H1,
                _ => Proto::Auto,
            };
            let conn = ConnInfo {
                peer,
                tls: true,
                peer_cert: super::tls::peer_certificate(session),
            };
            self.http(proto, stream, conn, drain, Instant::now()).await;
        }
    }

    /// A plain TCP connection: HTTP/1.1 parked while idle (see [`idle`]), anything else
    /// (HTTP/2 by prior knowledge) through hyper-util's `auto`.
    async fn plain(self, stream: TcpStream, conn: ConnInfo, mut drain: Option<Drain>) {
        let accepted = Instant::now();
        let sniffed = tokio::select! {
            biased;
            () = started(&mut drain) => return,
            () = tokio::time::sleep_until(accepted + self.shared.rules.first_request) => {
                tracing::debug!("no request in time: closing the connection");
                return;
            }
            sniffed = idle::sniff(&stream) => sniffed,
        };
        match sniffed {
            Ok(Sniffed::Http1) => {}
            Ok(Sniffed::Other) => {
                let http = self.http(Proto::Auto, stream, conn, drain, accepted);
                return Box::pin(http).await;
            }
            Ok(Sniffed::Closed) | Err(_) => return,
        }
        let ConnParts { service, shared } = self;
        let activity = Arc::new(Activity::default());
        let peer = conn.peer;
        let service = conn_service(service, &shared, conn, &activity);
        let _open = OpenConn::new(&shared.http1.open);
        let result = idle::serve_http1(
            &shared.http1,
            stream,
            service,
            &activity,
            shared.rules,
            accepted,
            &mut drain,
        )
        .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        activity.tunnels_closed().await;
    }

    async fn http<I>(
        self,
        proto: Proto,
        io: I,
        conn: ConnInfo,
        mut drain: Option<Drain>,
        accepted: Instant,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ConnParts { service, shared } = self;
        let builder = match proto {
            Proto::Auto => &shared.auto,
            #[cfg(feature = "tls")]
            Proto::H1 => &shared.h1,
            #[cfg(feature = "tls")]
            Proto::H2 => &shared.h2,
        };
        let activity = Arc::new(Activity::default());
        let peer = conn.peer;
        let service = BoxedFutures(conn_service(service, &shared, conn, &activity));
        // Boxed: the connection's task (spawned per connection) stays the same small size
        // whichever way the connection is served.
        let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
        let result = drive(
            conn.as_mut(),
            &activity,
            shared.rules,
            accepted,
            &mut drain,
            None,
            |c| c.graceful_shutdown(),
        )
        .await;
        if let Driven::Done(Err(e)) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        // An upgraded connection lives on in its tunnel: it still counts as this connection
        // (under the connection limit, waited for on shutdown) until the tunnel closes.
        activity.tunnels_closed().await;
    }
}

/// Counts a connection as open until dropped (its future ends or is dropped).
struct OpenConn<'a>(&'a AtomicUsize);

impl<'a> OpenConn<'a> {
    fn new(open: &'a AtomicUsize) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConn(open)
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service hyper calls for each request of one connection.
fn conn_service<S>(
    service: S,
    shared: &Shared,
    conn: ConnInfo,
    activity: &Arc<Activity>,
) -> ConnService<S> {
    ConnService {
        inner: service,
        peer: conn.peer,
        tls: conn.tls,
        body_timeout: shared.body_timeout,
        #[cfg(feature = "tls")]
        peer_cert: conn.peer_cert,
        activity: activity.clone(),
    }
}
