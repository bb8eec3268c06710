use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::headers::{hide_backend_authority, is_upgrade, remove_hop_by_hop};
use super::http1_pool::{Head, Http1Pool, Returner};
use super::http2_pool::Http2Pool;
use super::transport::{Connector, CustomConnect};
use super::tunnel::{ClientUpgrade, DEFAULT_IDLE_TIMEOUT};
use super::ForwardError;
use crate::balance::Target;
use crate::error::BoxError;
use crate::forwarded::{append_forwarded, Cidr, ClientAddr, ForwardedHeaders};

/// Settings of a [`Forward`] service.
#[derive(Clone, Debug)]
struct Config {
    forwarded: ForwardedHeaders,
    /// Peers whose forwarding headers are kept and appended to.
    trusted: Vec<Cidr>,
    proto: &'static str,
    timeout: Option<Duration>,
    preserve_host: bool,
    upstream: UpstreamProtocol,
    hide: Vec<http::HeaderName>,
    /// The protocols a client may upgrade to (lowercase).
    upgrades: Vec<&'static str>,
    /// How long a TCP connect (and a TLS handshake) to a backend may take.
    connect_timeout: Option<Duration>,
    /// The most connections open to one backend.
    max_connections: usize,
    /// The most idle HTTP/1.1 connections kept per backend.
    max_idle: usize,
    /// How long an idle HTTP/1.1 connection to a backend is kept.
    idle_timeout: Duration,
    /// TLS to the backends.
    #[cfg(feature = "tls")]
    tls: Option<super::UpstreamTls>,
    /// A connector of the user's, instead of TCP and TLS.
    custom: Option<CustomConnect>,
    /// How long an upgraded connection may pass no byte before it is closed.
    tunnel_idle_timeout: Duration,
}

/// The default of [`Forward::connect_timeout`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of [`Forward::timeout`].
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default of [`Forward::max_connections_per_endpoint`].
const MAX_CONNECTIONS: usize = 1024;
/// The default of [`Forward::max_idle_per_endpoint`].
const MAX_IDLE: usize = 128;
/// The default of [`Forward::idle_timeout`].
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An HTTP reverse-proxy service: sends each request to the endpoint in its [`Target`]
/// extension (which a [`BalancerLayer`](crate::BalancerLayer) sets) over pooled keep-alive
/// connections.
///
/// On the way it rewrites the URI to the endpoint, keeps the client's `Host` (or, from an
/// HTTP/2 client, its `:authority`; see [`preserve_host`](Forward::preserve_host)), removes
/// hop-by-hop headers in both directions (keeping only `TE: trailers`, so trailers and gRPC
/// pass through), writes `X-Forwarded-For`/`-Proto`/`-Host` or `Forwarded` (see
/// [`forwarded`](Forward::forwarded)) from the [`ClientAddr`] extension, and can hide response
/// headers that reveal the backend; a `Location` or cookie `Domain` naming the backend's own
/// address is rewritten away
/// ([`hide_backend_authority`](super::headers::hide_backend_authority)). Bodies stream through
/// in both directions without being buffered. A protocol upgrade (WebSocket) is passed through end to end: when the backend
/// answers `101 Switching Protocols`, the two upgraded connections are spliced (see
/// [`upgrades`](Forward::upgrades) for which protocols may, and
/// [`tunnel_idle_timeout`](Forward::tunnel_idle_timeout) for how long they stay open).
///
/// The protocol spoken to the backend is chosen per request (see [`UpstreamProtocol`]):
/// HTTP/1.1 by default, HTTP/2 with [`http2`](Forward::http2), or the client's own with
/// [`upstream`](Forward::upstream)`(UpstreamProtocol::SameAsClient)`; gRPC requests always go
/// over HTTP/2, which gRPC requires. A backend that answers HTTP/1.1 in HTTP/2 (an
/// HTTP/2-only server) is spoken to in HTTP/2 from then on; see [`UpstreamProtocol::Http1`].
///
/// Errors are [`ForwardError`]s telling a refused connection, a timeout and other failures
/// apart; [`ErrorResponseLayer`](super::ErrorResponseLayer) turns them into 502/503/504.
pub struct Forward<B> {
    // Behind one `Arc`: the balancer clones an endpoint's service for every request, and a
    // hyper-util client is several reference counts of its own.
    clients: Arc<Clients<B>>,
    config: Arc<Config>,
}

/// Which HTTP version [`Forward`] speaks to the backends.
///
/// Whatever the choice, a gRPC request (`content-type: application/grpc`, `application/grpc+proto`
/// or `application/grpc;…`; not gRPC-Web) goes over HTTP/2: gRPC needs HTTP/2's trailers, and
/// a gRPC server speaks nothing else (nginx's `grpc_pass` does the same). An upgrade
/// (WebSocket) from an HTTP/1.1 client goes over HTTP/1.1 unless `Http2` is chosen.
///
/// HTTP/2 without TLS is *h2c with prior knowledge*: the connection starts with the HTTP/2
/// preface, as gRPC clients and HAProxy's `proto h2` do (the `Upgrade: h2c` dance of RFC 7540
/// was dropped by RFC 9113).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to every backend, gRPC excepted (the default: any HTTP server speaks it, so
    /// browsers' HTTP/2 requests reach HTTP/1.1-only backends too).
    ///
    /// A backend found to speak only HTTP/2 gets HTTP/2 (h2c) from then on, here and with
    /// `SameAsClient`: such a server answers an HTTP/1.1 request on a new connection with an
    /// HTTP/2 frame and never processes it. That request is sent again over HTTP/2 at once if
    /// it had no body; one with a body fails as never sent
    /// ([`ForwardError::is_not_sent`]), which the failover layer sends elsewhere whatever its
    /// method.
    #[default]
    Http1,
    /// HTTP/2 (h2c) for every request: for backends that speak only HTTP/2, as most gRPC
    /// servers do (HAProxy's `proto h2`).
    Http2,
    /// The client's own version: a request that came over HTTP/2 goes on over HTTP/2, one that
    /// came over HTTP/1.x over HTTP/1.1 (and gRPC over HTTP/2). For backends that speak both
    /// (such as hyper's or Go's servers with h2c on), so that one listener can serve browsers
    /// and gRPC and each keeps its protocol end to end. Not for HTTP/1.1-only backends: their
    /// HTTP/2 clients' requests would fail.
    SameAsClient,
}

impl UpstreamProtocol {
    /// Whether `req` goes to the backend over HTTP/2.
    #[inline]
    fn is_http2<B>(self, req: &Request<B>, upgrade: bool) -> bool {
        match self {
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::SameAsClient if !upgrade && req.version() == Version::HTTP_2 => true,
            _ => !upgrade && crate::grpc::is_grpc(req.headers()),
        }
    }
}

impl std::str::FromStr for UpstreamProtocol {
    type Err = BoxError;

    /// `http1` (or `http/1.1`), `h2` (or `http2`) and `same`.
    fn from_str(s: &str) -> Result<Self, BoxError> {
        match s {
            "http1" | "http/1.1" => Ok(UpstreamProtocol::Http1),
            "h2" | "http2" => Ok(UpstreamProtocol::Http2),
            "same" => Ok(UpstreamProtocol::SameAsClient),
            _ => Err(format!("unknown upstream protocol {s:?} (http1, h2 or same)").into()),
        }
    }
}

/// The two connection pools of a [`Forward`]: HTTP/1.1 ([`Http1Pool`]) and HTTP/2
/// ([`Http2Pool`]: requests multiplexed on one connection per backend). The request's protocol
/// picks the pool. Each pool connects only when first used.
struct Clients<B> {
    http1: Http1Pool<B>,
    http2: Http2Pool<OrEmpty<B>>,
    /// `https` over TLS (HTTP/2's `:scheme`), else `http`.
    scheme: Scheme,
    /// Whether the pools need the request's target to connect (TLS, a custom connector).
    needs_target: bool,
    /// The backends found to speak only HTTP/2.
    http2_only: Http2Only,
}

/// The backends that answered HTTP/1.1 in HTTP/2, spoken to in HTTP/2 from then on: read on
/// every request without a lock (nothing at all until one is found), written rarely.
#[derive(Default)]
struct Http2Only {
    any: AtomicBool,
    backends: ArcSwap<Vec<Authority>>,
}

impl Http2Only {
    /// At most this many backends are remembered (a larger fleet of HTTP/2-only backends
    /// should be given [`UpstreamProtocol::Http2`]).
    const MAX: usize = 1024;

    #[inline]
    fn contains(&self, backend: &Authority) -> bool {
        self.any.load(Ordering::Relaxed) && self.backends.load().contains(backend)
    }

    fn insert(&self, backend: &Authority) {
        self.backends.rcu(|known| {
            let mut known = Vec::clone(known);
            if known.len() < Self::MAX && !known.contains(backend) {
                known.push(backend.clone());
            }
            known
        });
        self.any.store(true, Ordering::Relaxed);
    }
}

impl<B> Clients<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Both pools for `config` (the HTTP/1.1 one with its caps of connections per backend),
    /// over TLS when it is set (each pool offering its protocol by ALPN).
    fn new(config: &Config) -> Self {
        let tcp = Connector::tcp(config.connect_timeout);
        let (mut http1, mut http2) = (tcp.clone(), tcp);
        #[cfg(feature = "tls")]
        if let Some(tls) = &config.tls {
            http1 = http1.with_tls(tls.connect(b"http/1.1"));
            http2 = http2.with_tls(tls.connect(b"h2"));
        }
        if let Some(custom) = &config.custom {
            http1 = http1.with_custom(custom.clone());
            http2 = http2.with_custom(custom.clone());
        }
        let scheme = http2.scheme();
        let needs_target = http2.needs_target();
        Clients {
            http1: Http1Pool::new(
                http1,
                config.max_connections,
                config.max_idle,
                config.idle_timeout,
            ),
            http2: Http2Pool::new(http2),
            needs_target,
            scheme,
            http2_only: Http2Only::default(),
        }
    }

    /// Sends `req` over HTTP/1.1; if `backend` answers in HTTP/2, remembers that and sends the
    /// request again over HTTP/2 when it has no body. A new connection that ended before the
    /// request was written (an HTTP/2-only backend's preface came first, or the backend
    /// closed it) gets a bodiless request tried over HTTP/2 too: the backend is remembered as
    /// HTTP/2-only if that answers, and the first failure is returned if not.
    async fn send_http1(
        self: Arc<Self>,
        backend: Authority,
        target: Option<Target>,
        req: Request<B>,
    ) -> Result<(Response<Incoming>, Returner<B>), ForwardError> {
        let mut e = match self.http1.send(backend.clone(), target.clone(), req).await {
            Ok(sent) => return Ok(sent),
            Err(e) => e,
        };
        let (http2_only, head) = e.take_http2_resend();
        if http2_only {
            self.learned_http2_only(&backend);
        }
        let Some(Head {
            method,
            uri,
            headers,
        }) = head
        else {
            return Err(e);
        };
        let mut req = Request::new(OrEmpty::Empty);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let req = to_http2(req, &backend, &self.scheme)?;
        match self.http2.send(backend.clone(), target, req).await {
            Ok(res) => {
                if !http2_only {
                    self.learned_http2_only(&backend);
                }
                Ok((res, Returner::none()))
            }
            Err(h2) if http2_only => Err(h2),
            Err(_) => Err(e),
        }
    }

    fn learned_http2_only(&self, backend: &Authority) {
        tracing::debug!(%backend, "the backend speaks only HTTP/2: HTTP/2 from now on");
        self.http2_only.insert(backend);
    }
}

/// A request body sent over HTTP/2: the request's own, or none for a request sent again
/// (see [`Head`]).
enum OrEmpty<B> {
    Body(B),
    Empty,
}

impl<B: http_body::Body + Unpin> http_body::Body for OrEmpty<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        match self.get_mut() {
            OrEmpty::Body(body) => Pin::new(body).poll_frame(cx),
            OrEmpty::Empty => Poll::Ready(None),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            OrEmpty::Body(body) => body.is_end_stream(),
            OrEmpty::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            OrEmpty::Body(body) => body.size_hint(),
            OrEmpty::Empty => http_body::SizeHint::with_exact(0),
        }
    }
}

/// Makes `req` (its headers ready for the backend, `Host` naming the host asked for) an
/// HTTP/2 request: HTTP/2 names the host in `:authority`, taken from the URI, and sends no
/// `Host` (RFC 9113 §8.3.1): the host the client asked for (or, without `preserve_host`, the
/// endpoint `backend`), while the pool picks the connection by endpoint; `:scheme` is `scheme`.
fn to_http2<B>(
    mut req: Request<B>,
    backend: &Authority,
    scheme: &Scheme,
) -> Result<Request<B>, ForwardError> {
    let host = req
        .headers_mut()
        .remove(http::header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| backend.clone());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(host);
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    match Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => return Err(ForwardError::other(e.into())),
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(req)
}

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Forward {
            clients: self.clients.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B> fmt::Debug for Forward<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("config", &self.config)
            .finish()
    }
}

impl<B> Default for Forward<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<B> Forward<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A forwarding service with new connection pools speaking HTTP/1.1 without TLS to the
    /// backends ([`UpstreamProtocol::Http1`]: gRPC over HTTP/2), `X-Forwarded-*` headers, and
    /// these defaults:
    ///
    /// | setting | default | nginx / HAProxy |
    /// |---|---|---|
    /// | [`connect_timeout`](Self::connect_timeout) | 5 s | `proxy_connect_timeout` 60 s / `timeout connect` (5 s in the usual configuration) |
    /// | [`timeout`](Self::timeout) (response head) | 60 s | `proxy_read_timeout` 60 s / `timeout server` |
    /// | [`max_connections_per_endpoint`](Self::max_connections_per_endpoint) | 1024 | — / `maxconn` per server |
    /// | [`max_idle_per_endpoint`](Self::max_idle_per_endpoint) | 128 | `keepalive` (per upstream) / — |
    /// | [`idle_timeout`](Self::idle_timeout) | 90 s | `keepalive_timeout` 60 s / `pool-purge-delay` 5 s |
    ///
    /// Why these: a backend that accepts no connection within 5 s is down or overloaded, and
    /// the request is better tried elsewhere (it was not sent) than held for a minute; a
    /// backend that sends no response head within 60 s is stuck for most APIs, and a proxy
    /// without a bound would hold the client, the connection and the in-flight count forever
    /// (turn it off with [`no_timeout`](Self::no_timeout) for long polling).
    pub fn new() -> Self {
        Self::from_config(Config {
            forwarded: ForwardedHeaders::default(),
            trusted: Vec::new(),
            proto: "http",
            timeout: Some(RESPONSE_TIMEOUT),
            preserve_host: true,
            upstream: UpstreamProtocol::Http1,
            hide: Vec::new(),
            upgrades: vec!["websocket"],
            connect_timeout: Some(CONNECT_TIMEOUT),
            max_connections: MAX_CONNECTIONS,
            max_idle: MAX_IDLE,
            idle_timeout: IDLE_TIMEOUT,
            #[cfg(feature = "tls")]
            tls: None,
            custom: None,
            tunnel_idle_timeout: DEFAULT_IDLE_TIMEOUT,
        })
    }

    /// A service with new clients built for `config`.
    fn from_config(config: Config) -> Self {
        Forward {
            clients: Arc::new(Clients::new(&config)),
            config: Arc::new(config),
        }
    }

    /// Fails a request with [`ForwardError::is_connect`] when the TCP connection to the
    /// backend is not up within `timeout` (default 5 s, as HAProxy's usual `timeout connect`;
    /// `None`: only the operating system's own limit, which can be minutes for a host that
    /// drops packets). With [`tls`](Self::tls), the TLS handshake gets as long again. Starts
    /// a new connection pool.
    pub fn connect_timeout(self, timeout: Option<Duration>) -> Self {
        let mut config = (*self.config).clone();
        config.connect_timeout = timeout;
        Self::from_config(config)
    }

    /// Opens at most `max` connections to each backend at once (default 1024, Envoy's
    /// `max_connections`; at least 1): a request that needs one more waits for a connection
    /// to come free (handed over as its response ends) or to close (bounded by
    /// [`timeout`](Forward::timeout), if set). Over HTTP/1.1 one connection carries one
    /// request at a time, so this also caps the requests in flight to a backend; cap those in
    /// the balancer's pool
    /// ([`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint))
    /// at or below it, so that requests beyond it queue there and get a 503 when the queue is
    /// full, rather than waiting here. This caps HTTP/1.1 connections; over HTTP/2 the
    /// requests to a backend share one connection. A WebSocket tunnel holds its connection
    /// until it closes. Starts a new connection pool.
    pub fn max_connections_per_endpoint(self, max: usize) -> Self {
        let mut config = (*self.config).clone();
        config.max_connections = max.max(1);
        Self::from_config(config)
    }

    /// Keeps at most `max` idle HTTP/1.1 connections to each backend (default 128, as nginx's
    /// `keepalive`; 0 closes every connection after its response): a connection freed while
    /// `max` are idle closes the least recently used one. Starts a new connection pool.
    pub fn max_idle_per_endpoint(self, max: usize) -> Self {
        let mut config = (*self.config).clone();
        config.max_idle = max;
        Self::from_config(config)
    }

    /// Closes an HTTP/1.1 connection to a backend that has been idle for `timeout` (default
    /// 90 s, as hyper-util's client): keep it below the backends' own keep-alive timeout, so
    /// that the proxy, not the backend, closes idle connections and no request meets a
    /// connection closing under it. Idle connections are looked through as connections are
    /// used and freed, so one may stay open longer while its backend gets no traffic. Starts
    /// a new connection pool.
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        let mut config = (*self.config).clone();
        config.idle_timeout = timeout;
        Self::from_config(config)
    }

    /// Speaks TLS to the backends (HTTPS upstreams): see [`UpstreamTls`](super::UpstreamTls)
    /// for the certificate checks, the name asked for and how ALPN picks the HTTP version.
    /// Requests go over HTTP/1.1 or HTTP/2 as [`upstream`](Self::upstream) says. Starts a new
    /// connection pool.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(self, tls: super::UpstreamTls) -> Self {
        let mut config = (*self.config).clone();
        config.tls = Some(tls);
        Self::from_config(config)
    }

    /// Opens connections to the backends with `connect` instead of TCP (and
    /// [`tls`](Self::tls)): any tokio byte stream, such as a Unix socket, a TLS library of
    /// your own, or a tunnel. It is called with the request's [`Target`] (the endpoint: its
    /// id, address and host name) whenever a pool needs a new connection, bounded by the
    /// [`connect_timeout`](Self::connect_timeout); its error fails the request with
    /// [`ForwardError::is_connect`]. The pools key connections by the endpoint's authority
    /// (its address, or its id when that is `host` or `host:port`), so each endpoint needs
    /// one: a Unix-socket backend is an endpoint named, say, `app-1`, whose path the closure
    /// looks up. HTTP/2's `:scheme` is `http`. Starts a new connection pool.
    ///
    /// ```no_run
    /// # #[cfg(unix)] {
    /// use lbkit::proxy::Forward;
    /// use lbkit::{strategy::RoundRobin, BalancerLayer};
    ///
    /// // Endpoints `app-1` and `app-2` listen on /run/app-1.sock and /run/app-2.sock.
    /// let forward = Forward::<lbkit::server::RequestBody>::new().connect_with(|target| {
    ///     let path = format!("/run/{}.sock", target.endpoint().id());
    ///     tokio::net::UnixStream::connect(path)
    /// });
    /// let balancer = BalancerLayer::new(["app-1", "app-2"], RoundRobin::new());
    /// # let _ = (forward, balancer); }
    /// ```
    pub fn connect_with<F, Fut, S>(self, connect: F) -> Self
    where
        F: Fn(&Target) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<S>> + Send + 'static,
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let mut config = (*self.config).clone();
        config.custom = Some(CustomConnect::new(connect));
        Self::from_config(config)
    }
}

impl<B> Forward<B> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Chooses the protocol spoken to the backends (default [`UpstreamProtocol::Http1`]; gRPC
    /// always over HTTP/2).
    pub fn upstream(mut self, protocol: UpstreamProtocol) -> Self {
        self.config_mut().upstream = protocol;
        self
    }

    /// Speaks HTTP/2 without TLS (h2c, prior knowledge) to the backends for every request, as
    /// HTTP/2-only servers expect: the same as
    /// [`upstream`](Self::upstream)`(UpstreamProtocol::Http2)`.
    pub fn http2(self) -> Self {
        self.upstream(UpstreamProtocol::Http2)
    }

    /// The protocols a client may switch to through the proxy (default: `websocket` only).
    /// A request asking to upgrade to anything else (`h2c`, a custom protocol) is forwarded as
    /// a plain request, its `Upgrade` header removed, so it cannot open a tunnel past the
    /// checks that apply per request. Names are compared without regard to case; an empty list
    /// turns upgrades off.
    pub fn upgrades(mut self, protocols: impl IntoIterator<Item = &'static str>) -> Self {
        self.config_mut().upgrades = protocols.into_iter().collect();
        self
    }

    /// How long an upgraded connection (a WebSocket) may pass no byte either way before the
    /// proxy closes it (default 10 minutes; HAProxy's `timeout tunnel`, nginx's
    /// `proxy_read_timeout` for WebSockets), so abandoned tunnels do not pile up. Applications
    /// that keep quiet connections open longer should ping more often than this.
    ///
    /// An upgraded connection also closes when either side closes it, counts as a request in
    /// flight at its endpoint while open (for least connections, P2C and peak EWMA, when a
    /// [`BalancerLayer`](crate::BalancerLayer) is in front), and, when lbkit's
    /// [`Server`](crate::server::Server) accepted the client, counts as the client's connection
    /// until it closes: it is waited for on graceful shutdown and closed when the grace
    /// period ends.
    pub fn tunnel_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().tunnel_idle_timeout = timeout;
        self
    }

    /// Which forwarding headers to write (default [`ForwardedHeaders::XForwarded`]).
    pub fn forwarded(mut self, kind: ForwardedHeaders) -> Self {
        self.config_mut().forwarded = kind;
        self
    }

    /// The peers trusted to report another client (load balancers or proxies in front of this
    /// one): from them, `X-Forwarded-For` and `Forwarded` are kept and appended to, and their
    /// `X-Forwarded-Host`, `-Proto` and `-Port` pass through. From any other peer (default:
    /// every peer) the client's own forwarding headers are dropped and rewritten from the
    /// connection, so a client cannot spoof its address, scheme or host to the backends; see
    /// [`append_forwarded`]. Use the same ranges as for
    /// [`ClientIp::trusting`](crate::forwarded::ClientIp::trusting).
    pub fn trusted_proxies<T: Into<Cidr>>(mut self, proxies: impl IntoIterator<Item = T>) -> Self {
        self.config_mut().trusted = proxies.into_iter().map(Into::into).collect();
        self
    }

    /// The scheme the clients use, for `X-Forwarded-Proto` (default `"http"`; a TLS-terminating
    /// proxy sets `"https"`).
    pub fn proto(mut self, proto: &'static str) -> Self {
        self.config_mut().proto = proto;
        self
    }

    /// Fails a request with [`ForwardError::is_timeout`] (a 504 from
    /// [`ErrorResponseLayer`](super::ErrorResponseLayer)) when the backend has not sent its
    /// response head within `timeout` of the request's start, connecting included (default
    /// 60 s, as nginx's `proxy_read_timeout`). The body then streams with no limit here.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().timeout = Some(timeout);
        self
    }

    /// Waits for a response head as long as it takes (no [`timeout`](Self::timeout)): for
    /// long polling, or when a layer in front bounds the request already.
    pub fn no_timeout(mut self) -> Self {
        self.config_mut().timeout = None;
        self
    }

    /// Whether to keep the client's `Host` header (default `true`, as HAProxy); `false` sets it
    /// to the endpoint's address.
    pub fn preserve_host(mut self, preserve: bool) -> Self {
        self.config_mut().preserve_host = preserve;
        self
    }

    /// Removes a response header before it reaches the client (for example `server` or
    /// `x-powered-by`, which reveal what the backend runs).
    pub fn hide_response_header(mut self, name: http::HeaderName) -> Self {
        self.config_mut().hide.push(name);
        self
    }
}

impl<B> Service<Request<B>> for Forward<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ForwardBody<B>>;
    type Error = ForwardError;
    type Future = ForwardFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> ForwardFuture<B> {
        let cfg = &*self.config;
        let Some((authority, target)) = req.extensions().get::<Target>().and_then(|t| {
            let authority = t.authority()?.clone();
            // Only TLS (the host name) and a custom connector need the target: no reference
            // count to touch otherwise.
            let target = self.clients.needs_target.then(|| t.clone());
            Some((authority, target))
        }) else {
            return ForwardFuture::failed(ForwardError::no_target());
        };
        let upgrade = is_upgrade(req.headers()) && upgrade_allowed(req.headers(), &cfg.upgrades);
        // Chosen before the headers are rewritten: from the client's version and content-type.
        let http2 = cfg.upstream.is_http2(&req, upgrade)
            || (!upgrade && self.clients.http2_only.contains(&authority));
        let client_upgrade = upgrade.then(|| ClientUpgrade::take(&mut req));
        let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
        // An HTTP/2 client names the host in `:authority` (the URI), not in `Host`: carry it
        // over, or the backend would see its own address and X-Forwarded-Host would be lost.
        let client_host = match req.headers().contains_key(http::header::HOST) {
            true => None,
            false => req
                .uri()
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()),
        };

        let headers = req.headers_mut();
        if let Some(host) = client_host {
            headers.insert(http::header::HOST, host);
        }
        // `TE: trailers` says the client takes trailer fields; passed on, it lets the backend
        // send them (gRPC servers require it), and the proxy streams trailers through
        // (RFC 9110 §10.1.4). Every other TE coding is this hop's business only.
        let te_trailers = accepts_trailers(headers);
        remove_hop_by_hop(headers, upgrade);
        if te_trailers {
            headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        }
        let trusted = client.is_some_and(|c| {
            let ip = c.ip().to_canonical();
            cfg.trusted.iter().any(|net| net.contains(ip))
        });
        append_forwarded(headers, cfg.forwarded, client, cfg.proto, trusted);
        if !cfg.preserve_host || !headers.contains_key(http::header::HOST) {
            if let Ok(v) = http::HeaderValue::from_str(authority.as_str()) {
                headers.insert(http::header::HOST, v);
            }
        }

        let inner = if http2 {
            let req = match to_http2(req.map(OrEmpty::Body), &authority, &self.clients.scheme) {
                Ok(req) => req,
                Err(e) => return ForwardFuture::failed(e),
            };
            let sent = self.clients.http2.send(authority.clone(), target, req);
            Sending::Http2(Box::pin(sent))
        } else {
            // HTTP/1.1 to an origin server: the origin form, path and query (RFC 9112 §3.2.1).
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
            *req.version_mut() = Version::HTTP_11;
            let clients = self.clients.clone();
            Sending::Http1(Box::pin(clients.send_http1(authority.clone(), target, req)))
        };

        ForwardFuture {
            inner: Some(inner),
            sleep: cfg.timeout.map(tokio::time::sleep),
            error: None,
            client_upgrade,
            config: Some(self.config.clone()),
            backend: Some(authority),
        }
    }
}

/// A request on its way: over HTTP/1.1 in lbkit's pool, over HTTP/2 in hyper-util's client.
enum Sending<B> {
    Http1(Http1Sending<B>),
    Http2(Http2Sending),
}

/// The future of a request sent in the HTTP/2 pool.
type Http2Sending = Pin<Box<dyn Future<Output = Result<Response<Incoming>, ForwardError>> + Send>>;

/// The future of a request sent in the HTTP/1.1 pool.
type Http1Sending<B> =
    Pin<Box<dyn Future<Output = Result<(Response<Incoming>, Returner<B>), ForwardError>> + Send>>;

pin_project! {
    /// The response future of [`Forward`].
    pub struct ForwardFuture<B> {
        inner: Option<Sending<B>>,
        #[pin]
        sleep: Option<Sleep>,
        error: Option<ForwardError>,
        client_upgrade: Option<ClientUpgrade>,
        config: Option<Arc<Config>>,
        backend: Option<http::uri::Authority>,
    }
}

impl<B> ForwardFuture<B> {
    fn failed(e: ForwardError) -> Self {
        ForwardFuture {
            inner: None,
            sleep: None,
            error: Some(e),
            client_upgrade: None,
            config: None,
            backend: None,
        }
    }
}

impl<B> fmt::Debug for ForwardFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ForwardFuture<B> {
    type Output = Result<Response<ForwardBody<B>>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(ForwardError::other("polled after completion".into())));
        };
        let polled = match inner {
            Sending::Http1(fut) => fut.as_mut().poll(cx),
            Sending::Http2(fut) => fut.as_mut().poll(cx).map_ok(|res| (res, Returner::none())),
        };
        let res = match polled {
            Poll::Ready(res) => res,
            Poll::Pending => {
                if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
                    ready!(sleep.poll(cx));
                    *this.inner = None;
                    return Poll::Ready(Err(ForwardError::timeout()));
                }
                return Poll::Pending;
            }
        };
        *this.inner = None;
        let (mut res, mut returner) = res?;
        if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // The connection is the tunnel's now, never back in the pool.
            returner.forget();
            if let Some(client_side) = this.client_upgrade.take() {
                let idle = this
                    .config
                    .as_ref()
                    .map_or(DEFAULT_IDLE_TIMEOUT, |c| c.tunnel_idle_timeout);
                client_side.splice(&mut res, idle);
            }
        }
        let upgrade = res.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        remove_hop_by_hop(res.headers_mut(), upgrade);
        for name in this.config.iter().flat_map(|c| &c.hide) {
            res.headers_mut().remove(name);
        }
        if let Some(backend) = this.backend.as_ref() {
            hide_backend_authority(res.headers_mut(), backend);
        }
        if http_body::Body::is_end_stream(res.body()) {
            returner.put_back();
        }
        Poll::Ready(Ok(res.map(|inner| ForwardBody { inner, returner })))
    }
}

pin_project! {
    /// The body of a response from a backend, streamed through as it arrives (hyper's
    /// [`Incoming`]). When it has been read to its end, its HTTP/1.1 connection goes back to
    /// [`Forward`]'s pool for the next request; dropped before that, the connection is closed.
    pub struct ForwardBody<B> {
        #[pin]
        inner: Incoming,
        returner: Returner<B>,
    }
}

impl<B> fmt::Debug for ForwardBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B> http_body::Body for ForwardBody<B> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            None => this.returner.put_back(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.returner.put_back(),
            Some(Err(_)) => this.returner.forget(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether every protocol the `Upgrade` header names is in `allowed`.
fn upgrade_allowed(headers: &http::HeaderMap, allowed: &[&'static str]) -> bool {
    let mut named = headers
        .get_all(http::header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\0").split(','))
        .map(|p| p.split('/').next().unwrap_or("").trim())
        .peekable();
    named.peek().is_some() && named.all(|p| allowed.iter().any(|a| a.eq_ignore_ascii_case(p)))
}

/// Whether a `TE` header lists `trailers`.
fn accepts_trailers(headers: &http::HeaderMap) -> bool {
    headers.get_all(http::header::TE).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, content_type: Option<&'static str>) -> Request<()> {
        let mut req = Request::new(());
        *req.version_mut() = version;
        if let Some(ct) = content_type {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(ct),
            );
        }
        req
    }

    #[test]
    fn the_upstream_protocol_is_chosen_per_request() {
        use UpstreamProtocol::*;
        let h1 = request(Version::HTTP_11, None);
        let h2 = request(Version::HTTP_2, Some("text/html"));
        let grpc = request(Version::HTTP_11, Some("application/grpc+proto"));
        let grpc_web = request(Version::HTTP_11, Some("application/grpc-web"));
        // (protocol, request, upgrade) -> over HTTP/2?
        let cases = [
            (Http1, &h1, false, false),
            (Http1, &h2, false, false),
            (Http1, &grpc, false, true),
            (Http1, &grpc_web, false, false),
            (Http2, &h1, false, true),
            (Http2, &h1, true, true),
            (SameAsClient, &h1, false, false),
            (SameAsClient, &h2, false, true),
            (SameAsClient, &h2, true, false),
            (SameAsClient, &grpc, false, true),
        ];
        for (protocol, req, upgrade, http2) in cases {
            assert_eq!(
                protocol.is_http2(req, upgrade),
                http2,
                "{protocol:?} {:?} {:?} upgrade={upgrade}",
                req.version(),
                req.headers().get(http::header::CONTENT_TYPE)
            );
        }
        assert_eq!("h2".parse::<UpstreamProtocol>().unwrap(), Http2);
        assert_eq!("http1".parse::<UpstreamProtocol>().unwrap(), Http1);
        assert_eq!("same".parse::<UpstreamProtocol>().unwrap(), SameAsClient);
        assert!("h3".parse::<UpstreamProtocol>().is_err());
    }
}
