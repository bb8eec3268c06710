//! An L4 (TCP) balancer: accepts connections and splices each to an endpoint picked by the same
//! pool, strategies and health as HTTP traffic.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};

use crate::balance::{InFlight, Target};
use crate::endpoint::{Endpoint, EndpointId};
use crate::hints::PickHints;
use crate::key::hash_ip;
use crate::pool::Pool;
use crate::server::accept::accept_loop;
use crate::strategy::Strategy;

/// Settings of a [`TcpProxy`].
#[derive(Clone, Debug)]
struct Config {
    connect_timeout: Duration,
    idle_timeout: Duration,
    attempts: usize,
    hash_client_ip: bool,
    buffer: usize,
    max_connections: usize,
    #[cfg(feature = "proxy-protocol")]
    accept_proxy: Option<crate::server::ProxyProtocol>,
    #[cfg(feature = "proxy-protocol")]
    send_proxy: bool,
}

/// A TCP load balancer over a [`Pool`] of socket addresses.
///
/// Each accepted connection goes to an endpoint picked by the pool's strategy (with the client's
/// IP as hash key when [`hash_client_ip`](TcpProxy::hash_client_ip) is on, for Maglev or a ring);
/// a connection counts as in flight for its whole life, so least connections and power of two
/// choices balance open connections. When connecting fails, the next attempt goes to another
/// endpoint. Bytes are copied both ways; when one side closes its write half, the other side's
/// write half is shut down too (half-close) and the other direction goes on until it ends. A
/// connection with no traffic either way for the idle timeout is closed.
///
/// ```no_run
/// use lbkit::proxy::TcpProxy;
/// use lbkit::strategy::LeastConnections;
///
/// # async fn run() -> std::io::Result<()> {
/// let backends = ["127.0.0.1:5432".parse().unwrap(), "127.0.0.1:5433".parse().unwrap()];
/// let proxy = TcpProxy::new(backends, LeastConnections::new());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:6432").await?;
/// proxy.serve(listener).await
/// # }
/// ```
pub struct TcpProxy<St: Strategy> {
    pool: Pool<Target, St>,
    config: Arc<Config>,
}

impl<St: Strategy> Clone for TcpProxy<St> {
    fn clone(&self) -> Self {
        TcpProxy {
            pool: self.pool.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St: Strategy> fmt::Debug for TcpProxy<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .finish()
    }
}

impl<St: Strategy> TcpProxy<St> {
    /// A TCP balancer over `backends` with `strategy`.
    pub fn new(backends: impl IntoIterator<Item = SocketAddr>, strategy: St) -> Self {
        let pool = Pool::new(strategy, Target::new);
        pool.extend(backends.into_iter().map(Endpoint::from));
        Self::from_pool(pool)
    }

    /// A TCP balancer over `pool`, which may be changed (and health-checked) while it serves.
    /// The pool's entries are [`Target`]s, as a [`BalancerLayer`](crate::BalancerLayer)'s
    /// are: one pool (one set of endpoints, one health state, one in-flight count per
    /// endpoint) can serve HTTP and TCP at once, e.g.
    /// `TcpProxy::from_pool(balancer_layer.pool().clone())`. Endpoints without a socket
    /// address (an id that is not one) fail their connection attempts.
    pub fn from_pool(pool: Pool<Target, St>) -> Self {
        TcpProxy {
            pool,
            config: Arc::new(Config {
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(300),
                attempts: 3,
                hash_client_ip: false,
                buffer: 16 * 1024,
                max_connections: 10_000,
                #[cfg(feature = "proxy-protocol")]
                accept_proxy: None,
                #[cfg(feature = "proxy-protocol")]
                send_proxy: false,
            }),
        }
    }

    /// The pool of backends.
    pub fn pool(&self) -> &Pool<Target, St> {
        &self.pool
    }

    /// How long connecting to a backend may take before another is tried (default 5 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        Arc::make_mut(&mut self.config).connect_timeout = t;
        self
    }

    /// Closes a connection after this long without a byte either way (default 300 s).
    pub fn idle_timeout(mut self, t: Duration) -> Self {
        Arc::make_mut(&mut self.config).idle_timeout = t;
        self
    }

    /// How many backends to try for one connection before giving up (default 3, at least 1).
    pub fn attempts(mut self, n: usize) -> Self {
        Arc::make_mut(&mut self.config).attempts = n.max(1);
        self
    }

    /// Takes the client's address from a PROXY protocol header (v1 or v2) sent by the trusted
    /// L4 balancer in front, for hashing and for [`send_proxy_protocol`](Self::send_proxy_protocol);
    /// connections from other peers are refused (feature `proxy-protocol`).
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
    pub fn accept_proxy_protocol(mut self, proxy_protocol: crate::server::ProxyProtocol) -> Self {
        Arc::make_mut(&mut self.config).accept_proxy = Some(proxy_protocol);
        self
    }

    /// Sends a PROXY protocol version 2 header to each backend before the client's bytes, so
    /// backends that read it (nginx `proxy_protocol`, HAProxy `accept-proxy`, lbkit's
    /// [`Server::proxy_protocol`](crate::server::Server::proxy_protocol)) learn the client's
    /// address (default off; feature `proxy-protocol`).
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
    pub fn send_proxy_protocol(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.config).send_proxy = on;
        self
    }

    /// Uses the client's IP as the hash key, so that hashing strategies keep a client on one
    /// backend (default off).
    pub fn hash_client_ip(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.config).hash_client_ip = on;
        self
    }

    /// The most client connections open at once (default 10 000). Past it the proxy stops
    /// accepting; new connections wait in the kernel's listen backlog until one closes.
    pub fn max_connections(mut self, max: usize) -> Self {
        Arc::make_mut(&mut self.config).max_connections = max.max(1);
        self
    }

    /// Accepts connections from `listener` and balances them until this future is dropped,
    /// which also closes the connections it is serving. Accept errors (such as running out of
    /// file descriptors) are logged and retried after a pause, never fatal, so this returns
    /// `Ok` only after a shutdown.
    pub async fn serve(self, listener: TcpListener) -> io::Result<()> {
        self.serve_with_shutdown(listener, std::future::pending(), Duration::ZERO)
            .await
    }

    /// As [`serve`](Self::serve), until `shutdown` resolves; then stops accepting (closing
    /// `listener`), lets the open connections run to their end for up to `grace`, closes those
    /// left, and returns `Ok`. For a restart or a deploy of the proxy itself without cutting
    /// connections short.
    ///
    /// ```no_run
    /// # async fn run(proxy: lbkit::proxy::TcpProxy<lbkit::strategy::RoundRobin>) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:6432").await?;
    /// let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
    /// proxy.serve_with_shutdown(listener, ctrl_c, std::time::Duration::from_secs(30)).await
    /// # }
    /// ```
    pub async fn serve_with_shutdown(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) -> io::Result<()> {
        accept_loop(
            listener,
            self.config.max_connections,
            |stream, peer, _drain| {
                // A TCP stream has no way to ask the peer to close: the splice runs to its end
                // (or the grace period's).
                let this = self.clone();
                async move { this.handle(stream, peer).await }
            },
            shutdown,
            grace,
        )
        .await;
        Ok(())
    }

    /// Balances one accepted connection from `peer` to a backend, and splices the two until
    /// both are done. Errors are logged, not returned.
    pub async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        #[cfg(feature = "proxy-protocol")]
        let (client, peer) = {
            let mut client = client;
            let peer = match &self.config.accept_proxy {
                Some(pp) => match pp.accept(&mut client, peer).await {
                    Ok(addr) => addr,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection refused");
                        return;
                    }
                },
                None => peer,
            };
            (client, peer)
        };
        let mut hints = PickHints::default();
        if self.config.hash_client_ip {
            // As `Key::client_ip` hashes it, so an IPv4 client reached over an IPv6 socket
            // (`::ffff:a.b.c.d`) lands where it does over IPv4.
            hints.set_hash(hash_ip(peer.ip()));
        }
        let mut tried: Vec<EndpointId> = Vec::new();
        for _ in 0..self.config.attempts {
            let Some((candidate, target)) = self.pool.pick(Some(&hints)) else {
                tracing::warn!(%peer, "no backend available; closing the connection");
                return;
            };
            let mut guard = InFlight::start(candidate);
            let connect = async {
                match target.socket_addr() {
                    Some(addr) => timeout(self.config.connect_timeout, TcpStream::connect(addr))
                        .await
                        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
                    None => Err(io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        "the endpoint has no socket address",
                    )),
                }
            };
            match connect.await {
                Ok(backend) => {
                    let _ = backend.set_nodelay(true);
                    #[cfg(feature = "proxy-protocol")]
                    let backend = {
                        let mut backend = backend;
                        if self.config.send_proxy {
                            let local = client.local_addr().unwrap_or(peer);
                            if let Err(e) = crate::server::write_v2(&mut backend, peer, local).await
                            {
                                tracing::warn!(%peer, backend = %guard.candidate().id(), error = %e, "sending the PROXY header failed");
                                guard.fail();
                                return;
                            }
                        }
                        backend
                    };
                    match splice(
                        client,
                        backend,
                        self.config.idle_timeout,
                        self.config.buffer,
                    )
                    .await
                    {
                        Ok((up, down)) => tracing::debug!(%peer, up, down, "connection done"),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "connection ended with an error")
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(%peer, backend = %guard.candidate().id(), error = %e, "connect failed")
                }
            }
            guard.fail();
            tried.push(guard.candidate().id().clone());
            drop(guard);
            for id in &tried {
                hints.avoid(id.clone());
            }
        }
        tracing::warn!(%peer, attempts = tried.len(), "no backend accepted the connection");
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, passing on
/// half-closes, and fails with `TimedOut` after `idle` without a byte either way. Returns the
/// bytes copied from `a` to `b` and from `b` to `a`.
pub(crate) async fn splice(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    buffer: usize,
) -> io::Result<(u64, u64)> {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let last = Activity {
        start: Instant::now(),
        nanos: AtomicU64::new(0),
    };
    tokio::try_join!(
        pump(ar, bw, &last, idle, buffer),
        pump(br, aw, &last, idle, buffer)
    )
}

/// When a byte last moved either way, shared by the two directions of one splice.
struct Activity {
    start: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn get(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        let n = self.start.elapsed().as_nanos() as u64;
        self.nanos.fetch_max(n, Ordering::Relaxed);
    }
}

/// One direction of [`splice`]; `last` is the time of the last byte either way.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    last: &Activity,
    idle: Duration,
    buffer: usize,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer.max(1024)];
    let mut total = 0u64;
    loop {
        let n = loop {
            match timeout_at(last.get() + idle, r.read(&mut buf)).await {
                Ok(res) => break res?,
                // The other direction may have moved meanwhile: only idle if neither did.
                Err(_) if last.get().elapsed() >= idle => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"))
                }
                Err(_) => continue,
            }
        };
        if n == 0 {
            // Half-close: pass the end of this direction on, keep the other one going.
            let _ = w.shutdown().await;
            return Ok(total);
        }
        match timeout(idle, w.write_all(&buf[..n])).await {
            Ok(res) => res?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled")),
        }
        last.touch();
        total += n as u64;
    }
}
