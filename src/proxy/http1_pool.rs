//! [`Forward`](super::Forward)'s HTTP/1.1 connections to the backends: a keep-alive pool over
//! hyper's `client::conn::http1`, with a cap on the connections per backend.
//!
//! Why not hyper-util's legacy client, which `Forward` used before: per request it spawns a
//! task that waits to put the connection back into its pool, hashes a `(scheme, authority)`
//! key with SipHash, and moves a large boxed future around; measured under callgrind, that
//! was about a sixth of the proxy's instructions per request. Here a connection goes back to
//! the pool when its response body ends (see [`Returner`]), with no task of its own, and
//! the cap on connections is exact: a request that finds the backend at its cap waits for a
//! connection to come back (or to close), never for an idle one held elsewhere.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::transport::Connector;
use super::ForwardError;
use crate::balance::Target;
use crate::error::BoxError;

/// How many reused connections a request tries that turn out closed (a backend that closed
/// an idle keep-alive connection) before it opens a new one.
const STALE_TRIES: usize = 4;

/// Idle HTTP/1.1 connections per backend, and how many are open.
pub(crate) struct Http1Pool<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Http1Pool<B> {
    fn clone(&self) -> Self {
        Http1Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B> {
    connector: Connector,
    /// The most connections open to one backend at once.
    max: usize,
    /// The most idle connections kept per backend.
    max_idle: usize,
    /// How long a connection may stay idle in the pool.
    idle_timeout: Duration,
    hosts: Mutex<Hosts<B>>,
}

struct Hosts<B> {
    /// Keyed by the authority's text: exact bytes, hashed and compared at once (`Authority`
    /// itself hashes and compares a byte at a time, case-folded).
    map: HashMap<Box<str>, Host<B>, BuildHasherDefault<Fnv>>,
    /// When idle connections were last looked through for expired ones.
    swept: Instant,
}

struct Host<B> {
    /// Most recently used last.
    idle: Vec<Idle<B>>,
    /// Connections open (idle, busy, or tunnels), counted until their task ends.
    open: usize,
    /// Requests waiting for a connection while the backend is at its cap.
    waiters: VecDeque<oneshot::Sender<Handoff<B>>>,
}

impl<B> Default for Host<B> {
    fn default() -> Self {
        Host {
            idle: Vec::new(),
            open: 0,
            waiters: VecDeque::new(),
        }
    }
}

struct Idle<B> {
    tx: SendRequest<B>,
    since: Instant,
    /// The thread whose runtime runs the connection's task (see [`thread_tag`]).
    home: u32,
}

impl<B> Idle<B> {
    /// Whether it can take a request: open, and idle for less than `timeout`.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        !self.tx.is_closed() && now.duration_since(self.since) < timeout
    }
}

/// How many of the most recently idle connections a checkout looks through for one whose task
/// runs on its own thread.
const AFFINITY_SCAN: usize = 8;

/// A small number naming the current thread. On a single-threaded runtime per worker thread
/// ([`Server::workers`](crate::server::Server::workers)), a connection's task runs on the
/// thread that opened it; a request on that same thread reaches it without waking another
/// thread, so checkouts prefer such connections.
fn thread_tag() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local!(static TAG: u32 = NEXT.fetch_add(1, Ordering::Relaxed));
    TAG.with(|t| *t)
}

/// What a waiting request is handed.
enum Handoff<B> {
    /// A connection that just finished its response (and its home thread).
    Conn(SendRequest<B>, u32),
    /// A connection closed: the request may open one in its place.
    Slot(Slot<B>),
}

/// What a request does next after looking in the pool.
enum Checkout<B> {
    Idle(SendRequest<B>, u32),
    /// A slot is taken for it: connect.
    Connect(Slot<B>),
    Wait(oneshot::Receiver<Handoff<B>>),
}

/// A connection counted as open to a backend before it is: given back when dropped (a connect
/// that failed or was given up on, a waiting request dropped after it was handed the slot)
/// unless the connection was made.
struct Slot<B> {
    inner: Arc<Inner<B>>,
    authority: Authority,
    armed: bool,
}

impl<B> Drop for Slot<B> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.closed(&self.authority);
        }
    }
}

impl<B> Inner<B> {
    fn hosts(&self) -> MutexGuard<'_, Hosts<B>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(self: &Arc<Self>, authority: &Authority) -> Checkout<B> {
        let mut hosts = self.hosts();
        let now = Instant::now();
        let host = match hosts.map.get_mut(authority.as_str()) {
            Some(host) => host,
            None => hosts.map.entry(authority.as_str().into()).or_default(),
        };
        // Prefer a connection served by this thread, among the most recently idle.
        let me = thread_tag();
        let len = host.idle.len();
        if let Some(i) = (len.saturating_sub(AFFINITY_SCAN)..len)
            .rev()
            .find(|&i| host.idle[i].home == me)
        {
            let idle = host.idle.remove(i);
            if idle.usable(now, self.idle_timeout) {
                return Checkout::Idle(idle.tx, idle.home);
            }
        }
        while let Some(idle) = host.idle.pop() {
            if idle.usable(now, self.idle_timeout) {
                return Checkout::Idle(idle.tx, idle.home);
            }
        }
        if host.open < self.max {
            host.open += 1;
            return Checkout::Connect(Slot {
                inner: self.clone(),
                authority: authority.clone(),
                armed: true,
            });
        }
        let (tx, rx) = oneshot::channel();
        host.waiters.push_back(tx);
        Checkout::Wait(rx)
    }

    /// A connection is free again: to a waiting request, else into the pool.
    fn put(&self, authority: &Authority, mut tx: SendRequest<B>, home: u32) {
        let mut hosts = self.hosts();
        let now = Instant::now();
        if now.duration_since(hosts.swept) > self.idle_timeout / 2 {
            hosts.swept = now;
            self.sweep(&mut hosts, now);
        }
        let Some(host) = hosts.map.get_mut(authority.as_str()) else {
            return;
        };
        while let Some(waiter) = host.waiters.pop_front() {
            match waiter.send(Handoff::Conn(tx, home)) {
                Ok(()) => return,
                // That request was given up on: the next one.
                Err(Handoff::Conn(back, _)) => tx = back,
                Err(Handoff::Slot(_)) => unreachable!("a connection was sent"),
            }
        }
        if host.idle.len() >= self.max_idle {
            if self.max_idle == 0 {
                // Dropped: hyper closes a connection whose sender is gone.
                return;
            }
            // The least recently used goes.
            host.idle.remove(0);
        }
        host.idle.push(Idle {
            tx,
            since: now,
            home,
        });
    }

    /// A connection's task ended: its slot goes to a waiting request, or is free.
    fn closed(self: &Arc<Self>, authority: &Authority) {
        let mut hosts = self.hosts();
        let Some(host) = hosts.map.get_mut(authority.as_str()) else {
            return;
        };
        let mut slot = Slot {
            inner: self.clone(),
            authority: authority.clone(),
            armed: true,
        };
        while let Some(waiter) = host.waiters.pop_front() {
            match waiter.send(Handoff::Slot(slot)) {
                // The slot passes to that request, still counted.
                Ok(()) => return,
                Err(Handoff::Slot(back)) => slot = back,
                Err(Handoff::Conn(..)) => unreachable!("a slot was sent"),
            }
        }
        // Not handed on: freed here, under the lock, not by the guard.
        slot.armed = false;
        host.open = host.open.saturating_sub(1);
        if host.open == 0 && host.idle.is_empty() {
            hosts.map.remove(authority.as_str());
        }
    }

    /// Drops idle connections past the idle timeout or closed, so that a backend no longer
    /// used keeps no connection open.
    fn sweep(&self, hosts: &mut Hosts<B>, now: Instant) {
        for host in hosts.map.values_mut() {
            host.idle.retain(|idle| idle.usable(now, self.idle_timeout));
        }
    }
}

impl<B> Http1Pool<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool connecting with `connector`, at most `max` connections per backend (at least
    /// 1), at most `max_idle` of them idle, idle ones closed after `idle_timeout`.
    pub(crate) fn new(
        connector: Connector,
        max: usize,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Http1Pool {
            inner: Arc::new(Inner {
                connector,
                max: max.max(1),
                max_idle,
                idle_timeout,
                hosts: Mutex::new(Hosts {
                    map: HashMap::default(),
                    swept: Instant::now(),
                }),
            }),
        }
    }

    /// Sends `req` to `authority` on a pooled connection (or a new one, for which the
    /// connector may need the `target`), and gives back the response with what puts the
    /// connection back when its body ends.
    pub(crate) fn send(
        &self,
        authority: Authority,
        target: Option<Target>,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Returner<B>), ForwardError>> + Send + 'static
    {
        let pool = self.clone();
        async move {
            let mut stale = 0;
            loop {
                let (mut tx, home, fresh) = match pool.inner.checkout(&authority) {
                    Checkout::Idle(tx, home) => (tx, home, false),
                    Checkout::Connect(slot) => (
                        pool.connect(slot, target.as_ref()).await?,
                        thread_tag(),
                        true,
                    ),
                    Checkout::Wait(rx) => match rx.await {
                        Ok(Handoff::Conn(tx, home)) => (tx, home, false),
                        Ok(Handoff::Slot(slot)) => (
                            pool.connect(slot, target.as_ref()).await?,
                            thread_tag(),
                            true,
                        ),
                        Err(_) => return Err(ForwardError::other("connection pool closed".into())),
                    },
                };
                // On a new connection the backend may turn out to speak only HTTP/2: keep
                // what it takes to send a bodiless request again over HTTP/2 then.
                let head = (fresh && http_body::Body::is_end_stream(req.body())).then(|| Head {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    headers: req.headers().clone(),
                });
                // A connection put back as its response body ended may still be finishing
                // that response; one the backend closed while idle fails here, unsent. So
                // does a new one to an HTTP/2-only backend whose preface (its SETTINGS frame,
                // sent on accept) came first: hyper's connection ends on those bytes.
                if let Err(e) = tx.ready().await {
                    if fresh {
                        return Err(ForwardError::unsent(e.into()).resend_over_http2(head));
                    }
                    if stale >= STALE_TRIES {
                        return Err(ForwardError::unsent(e.into()));
                    }
                    stale += 1;
                    continue;
                }
                match tx.try_send_request(req).await {
                    Ok(res) => {
                        let returner = Returner {
                            pool: Some((pool, authority, tx, home)),
                        };
                        return Ok((res, returner));
                    }
                    Err(mut e) => match e.take_message() {
                        // Closed before it was written: on a reused connection, try another.
                        Some(unsent) if !fresh && stale < STALE_TRIES => {
                            stale += 1;
                            req = unsent;
                        }
                        Some(_) => return Err(ForwardError::unsent(e.into_error().into())),
                        None if fresh && answered_in_http2(e.error()) => {
                            return Err(ForwardError::http2_only(head));
                        }
                        None => return Err(ForwardError::from_hyper(e.into_error())),
                    },
                }
            }
        }
    }

    /// Opens a connection in `slot` (given back if this fails or is dropped) and starts its
    /// task, which frees the slot when the connection ends.
    async fn connect(
        &self,
        mut slot: Slot<B>,
        target: Option<&Target>,
    ) -> Result<SendRequest<B>, ForwardError> {
        let io = self
            .inner
            .connector
            .connect(&slot.authority, target)
            .await?;
        let (tx, conn) = http1::Builder::new()
            .handshake::<_, B>(io)
            .await
            .map_err(|e| ForwardError::connect(e.into()))?;
        slot.armed = false;
        let inner = self.inner.clone();
        let host = slot.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, backend = %host, "backend connection ended");
            }
            inner.closed(&host);
        });
        Ok(tx)
    }
}

/// Whether a request on a new connection failed because the backend answered in HTTP/2: an
/// HTTP/2-only server (a gRPC server, hyper's `http2` builder) answers an HTTP/1.1 request with
/// its SETTINGS frame, which does not parse as an HTTP/1.1 status line ("invalid HTTP version
/// parsed"), and never processes the request, which it reads as a bad connection preface.
fn answered_in_http2(e: &hyper::Error) -> bool {
    e.is_parse() && !e.is_parse_status() && e.to_string().contains("HTTP version")
}

/// What it takes to send a bodiless request again (over HTTP/2, see [`answered_in_http2`]).
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: http::Method,
    pub(crate) uri: Uri,
    pub(crate) headers: http::HeaderMap,
}

/// Puts a connection back into its pool once the response on it has ended; dropped before
/// that, the connection is closed (hyper closes a connection whose response body is dropped
/// unread).
pub(crate) struct Returner<B> {
    pool: Option<(Http1Pool<B>, Authority, SendRequest<B>, u32)>,
}

impl<B> Returner<B> {
    /// Nothing to put back (an HTTP/2 response).
    pub(crate) fn none() -> Self {
        Returner { pool: None }
    }

    /// The response has ended: the connection is free for the next request.
    pub(crate) fn put_back(&mut self) {
        if let Some((pool, authority, tx, home)) = self.pool.take() {
            pool.inner.put(&authority, tx, home);
        }
    }

    /// The connection was taken over (an upgrade): it never comes back.
    pub(crate) fn forget(&mut self) {
        self.pool = None;
    }
}

impl<B> std::fmt::Debug for Returner<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Returner")
            .field("pooled", &self.pool.is_some())
            .finish()
    }
}

/// FNV-1a for the pools' maps (keyed by an authority's text): the standard SipHash would cost
/// a few hundred instructions per request. The keys are the
/// balancer's own endpoints, not a client's input, so a hash-flooding defence buys nothing.
#[derive(Clone, Copy)]
pub(super) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
