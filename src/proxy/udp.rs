//! An L4 (UDP) balancer: datagrams from each client address (a *flow*) go to one endpoint
//! picked by the same pool, strategies and health as HTTP and TCP traffic, over an upstream
//! socket of the flow's own, so replies find their way back to the right client.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{Interest, Ready};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use crate::balance::{InFlight, Target};
use crate::endpoint::{Endpoint, EndpointId, EndpointState};
use crate::hash::mix64;
use crate::hints::PickHints;
use crate::key::hash_ip;
use crate::pool::{Pool, Snapshot};
use crate::strategy::Strategy;

/// The largest UDP payload (65 535 bytes less the IPv4 and UDP headers); every buffer holds
/// one, so no datagram is ever truncated.
const MAX_DATAGRAM: usize = 65_507;

/// Shards of the flow table: a datagram locks one of them, never the whole table.
const SHARDS: usize = 64;

/// Datagrams relayed from one upstream socket per wake-up before the task yields to others.
const RELAY_BATCH: usize = 32;

/// Datagrams of one flow that may wait for its upstream socket to take them (right after the
/// socket opened, before the runtime knows it is writable, or while its send buffer is full);
/// more are dropped, as a full network queue would.
const MAX_QUEUED: usize = 32;

thread_local! {
    /// The receive buffer of the flow tasks running on this thread: a flow costs a socket and a
    /// small task, not 64 KiB of its own. Only borrowed between two awaits.
    static RELAY_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// Settings of a [`UdpProxy`].
#[derive(Clone, Debug)]
struct Config {
    idle_timeout: Duration,
    max_flows: usize,
    hash_client_ip: bool,
}

/// A UDP load balancer over a [`Pool`] of socket addresses.
///
/// A *flow* is the datagrams from one client address (IP and port). The first datagram of a
/// flow picks an endpoint with the hash of the client's address in its
/// [`PickHints`] (so Maglev or a ring send a client to the same endpoint again after its flow
/// expired, and keep most clients in place when the pool changes), and opens an upstream
/// socket of its own, bound to an ephemeral port and connected to the endpoint: the
/// endpoint's replies arrive on that socket and go back to the client from the address it
/// wrote to. Later datagrams of the flow go to the same endpoint whatever the strategy, as
/// long as the endpoint stays eligible (in the pool, healthy, in rotation); once it is not
/// (marked down, ejected, removed), the flow's next datagram moves it to a newly picked
/// endpoint. An error on the upstream socket (an ICMP "port unreachable" shows up as
/// `ECONNREFUSED`) counts as a failure of the endpoint, for outlier detection, and moves the
/// flow on its next datagram to another endpoint.
///
/// A flow counts as one request in flight to its endpoint for its whole life, so least
/// connections and power of two choices balance flows. A flow with no datagram either way for
/// the [idle timeout](UdpProxy::idle_timeout) (60 s) ends. At most
/// [`max_flows`](UdpProxy::max_flows) (10 000) are open at once; datagrams of new clients past
/// that are dropped and counted in [`UdpStats::dropped_flow_limit`], while open flows go on.
///
/// The flow table is split in shards, each behind its own lock, so the receive loop and the
/// flow tasks seldom meet; a datagram of a known flow takes one shard lock, a few atomic loads
/// and a `send` on the flow's socket, and allocates nothing. Each flow has a task that waits
/// for its upstream socket (the runtime's reactor does the polling, and the idle timer lives
/// with the flow, so no hand-made poll set is needed); the receive buffers are one per worker
/// thread, not one per flow.
///
/// Clones share the pool and the flow table: one proxy may serve several sockets (for
/// example several bound with `SO_REUSEPORT`, one receive loop each).
///
/// ```no_run
/// use lbkit::proxy::UdpProxy;
/// use lbkit::strategy::Maglev;
///
/// # async fn run() -> std::io::Result<()> {
/// let resolvers = ["127.0.0.1:5301".parse().unwrap(), "127.0.0.1:5302".parse().unwrap()];
/// let proxy = UdpProxy::new(resolvers, Maglev::new());
/// let socket = tokio::net::UdpSocket::bind("127.0.0.1:5300").await?;
/// proxy.serve(socket).await
/// # }
/// ```
pub struct UdpProxy<St: Strategy> {
    pool: Pool<Target, St>,
    config: Arc<Config>,
    table: Arc<FlowTable>,
}

impl<St: Strategy> Clone for UdpProxy<St> {
    fn clone(&self) -> Self {
        UdpProxy {
            pool: self.pool.clone(),
            config: self.config.clone(),
            table: self.table.clone(),
        }
    }
}

impl<St: Strategy> fmt::Debug for UdpProxy<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpProxy")
            .field("pool", &self.pool)
            .field("config", &self.config)
            .field("flows", &self.flows())
            .finish()
    }
}

/// Counters of a [`UdpProxy`], from [`UdpProxy::stats`]: totals since it was made, over all
/// the sockets it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UdpStats {
    /// Flows open now.
    pub flows: usize,
    /// Flows opened, moves included.
    pub flows_opened: u64,
    /// Flows ended after their idle timeout.
    pub flows_expired: u64,
    /// Flows moved to another endpoint because theirs was no longer eligible or failed.
    pub flows_moved: u64,
    /// Datagrams sent from clients to endpoints.
    pub datagrams_to_backends: u64,
    /// Datagrams sent from endpoints back to clients.
    pub datagrams_to_clients: u64,
    /// Datagrams of new clients dropped because [`UdpProxy::max_flows`] flows were open.
    pub dropped_flow_limit: u64,
    /// Datagrams dropped because no endpoint was eligible (or no upstream socket could be
    /// opened).
    pub dropped_no_backend: u64,
    /// Datagrams dropped because a socket's send buffer was full or sending failed.
    pub dropped_send: u64,
    /// Errors on upstream sockets (such as `ECONNREFUSED` after an ICMP port unreachable),
    /// each counted as a failure of the flow's endpoint.
    pub backend_errors: u64,
}

/// The flows of a proxy, keyed by client address and the socket they came in on.
struct FlowTable {
    shards: Box<[Mutex<Shard>]>,
    /// Flows whose task runs (a moved flow's old task may outlive its entry for a moment).
    open: AtomicUsize,
    /// Ids of the sockets served, so flows of different sockets never mix.
    next_socket: AtomicU64,
    /// The origin of [`Flow::last`].
    epoch: Instant,
    opened: AtomicU64,
    expired: AtomicU64,
    moved: AtomicU64,
    dropped_flow_limit: AtomicU64,
    dropped_no_backend: AtomicU64,
    dropped_send: AtomicU64,
    backend_errors: AtomicU64,
    /// Datagrams of flows that ended (live flows count their own).
    retired_up: AtomicU64,
    retired_down: AtomicU64,
}

/// A client's address and the id of the socket its datagrams came in on.
type FlowKey = (SocketAddr, u64);

/// One shard of the flow table.
type Shard = HashMap<FlowKey, Arc<Flow>>;

impl FlowTable {
    fn new() -> Self {
        FlowTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            open: AtomicUsize::new(0),
            next_socket: AtomicU64::new(0),
            epoch: Instant::now(),
            opened: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            dropped_flow_limit: AtomicU64::new(0),
            dropped_no_backend: AtomicU64::new(0),
            dropped_send: AtomicU64::new(0),
            backend_errors: AtomicU64::new(0),
            retired_up: AtomicU64::new(0),
            retired_down: AtomicU64::new(0),
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // A panic under a shard lock cannot leave a map half-changed in a way that matters:
        // each change is one insert or remove.
        self.shards[(hash % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the table was made, the clock of [`Flow::last`].
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// One client's flow: its upstream socket, connected to its endpoint.
struct Flow {
    key: FlowKey,
    hash: u64,
    upstream: UdpSocket,
    /// The socket the client wrote to; replies go out of it.
    frontend: Arc<UdpSocket>,
    endpoint: EndpointId,
    state: Arc<EndpointState>,
    /// The pool version at which the endpoint was last seen eligible.
    checked: AtomicU64,
    /// When a datagram last went either way ([`FlowTable::now_ms`]).
    last: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
    /// The upstream socket failed: the next datagram moves the flow elsewhere.
    failed: AtomicBool,
    /// Ends the flow's task (it was replaced by a moved flow).
    stop: Notify,
    /// Whether datagrams wait in `queue`: later ones queue behind them, to keep their order.
    queued: AtomicBool,
    /// Datagrams for the endpoint that the flow's task sends when the socket is writable.
    queue: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes the flow's task to send the queue.
    wake: Notify,
}

impl Flow {
    /// Whether datagrams may still go to the flow's endpoint: it did not fail and is eligible
    /// in `snap` (checked once per pool version; otherwise a few atomic loads).
    fn usable<S, T>(&self, snap: &Snapshot<S, T>) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        let version = snap.version();
        if self.checked.load(Ordering::Relaxed) == version {
            return true;
        }
        let eligible = snap
            .position(&self.endpoint)
            .is_some_and(|i| Arc::ptr_eq(snap.eligible()[i].state(), &self.state));
        if eligible {
            self.checked.store(version, Ordering::Relaxed);
        }
        eligible
    }

    fn touch(&self, table: &FlowTable) {
        self.last.store(table.now_ms(), Ordering::Relaxed);
    }

    /// Marks the flow failed; returns whether it was not already.
    fn fail(&self) -> bool {
        !self.failed.swap(true, Ordering::AcqRel)
    }

    fn lock_queue(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a datagram for the flow's task to send; returns false if the queue is full.
    fn enqueue(&self, datagram: &[u8]) -> bool {
        let mut queue = self.lock_queue();
        if queue.len() >= MAX_QUEUED {
            return false;
        }
        queue.push_back(datagram.to_vec());
        self.queued.store(true, Ordering::Release);
        drop(queue);
        self.wake.notify_one();
        true
    }

    /// Sends the queued datagrams, in order, waiting for the socket to take each. The queue
    /// counts as empty only once the last one is sent, so none is overtaken.
    async fn send_queued(&self, table: &FlowTable) -> io::Result<()> {
        loop {
            let next = {
                let mut queue = self.lock_queue();
                match queue.pop_front() {
                    Some(d) => d,
                    None => {
                        self.queued.store(false, Ordering::Release);
                        return Ok(());
                    }
                }
            };
            if let Err(e) = self.upstream.send(&next).await {
                self.lock_queue().clear();
                self.queued.store(false, Ordering::Release);
                return Err(e);
            }
            self.up.fetch_add(1, Ordering::Relaxed);
            self.touch(table);
        }
    }

    /// Handles the readiness of the upstream socket: a pending error (ICMP port unreachable,
    /// reported by the kernel as an error event, not as readable) is returned; datagrams are
    /// relayed.
    fn on_ready(&self, ready: Ready, table: &FlowTable) -> io::Result<Option<Vec<u8>>> {
        if ready.is_error() {
            let pending = self.upstream.take_error()?;
            // Clears the error readiness, so the next wait does not return at once.
            let _ = self.upstream.try_io(Interest::ERROR, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
            if let Some(e) = pending {
                return Err(e);
            }
        }
        if ready.is_readable() {
            return self.relay(table);
        }
        Ok(None)
    }

    /// Relays the datagrams waiting on the upstream socket to the client. Returns a datagram
    /// that must wait for room in the client socket's send buffer, or the socket's error.
    fn relay(&self, table: &FlowTable) -> io::Result<Option<Vec<u8>>> {
        RELAY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            for _ in 0..RELAY_BATCH {
                let n = match self.upstream.try_recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) => return Err(e),
                };
                self.down.fetch_add(1, Ordering::Relaxed);
                self.touch(table);
                match self.frontend.try_send_to(&buf[..n], self.key.0) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Some(buf[..n].to_vec()))
                    }
                    Err(e) => {
                        tracing::debug!(client = %self.key.0, error = %e, "sending to the client failed");
                        table.dropped_send.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(None)
        })
    }
}

/// Owned by a flow's task: when the task ends (or is aborted), takes the flow out of the
/// table and adds its counts to the totals.
struct FlowEntry {
    table: Arc<FlowTable>,
    flow: Arc<Flow>,
}

impl Drop for FlowEntry {
    fn drop(&mut self) {
        let flow = &self.flow;
        {
            let mut shard = self.table.shard(flow.hash);
            if shard.get(&flow.key).is_some_and(|f| Arc::ptr_eq(f, flow)) {
                shard.remove(&flow.key);
            }
        }
        let t = &self.table;
        t.retired_up
            .fetch_add(flow.up.load(Ordering::Relaxed), Ordering::Relaxed);
        t.retired_down
            .fetch_add(flow.down.load(Ordering::Relaxed), Ordering::Relaxed);
        t.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What became of one datagram sent on a flow.
enum Sent {
    Done,
    /// The endpoint refused it (a pending ICMP error); the flow is marked failed.
    Refused,
}

impl<St: Strategy> UdpProxy<St> {
    /// A UDP balancer over `backends` with `strategy`.
    pub fn new(backends: impl IntoIterator<Item = SocketAddr>, strategy: St) -> Self {
        let pool = Pool::new(strategy, Target::new);
        pool.extend(backends.into_iter().map(Endpoint::from));
        Self::from_pool(pool)
    }

    /// A UDP balancer over `pool`, which may be changed (and health-checked) while it serves.
    /// The pool's entries are [`Target`]s, as a [`BalancerLayer`](crate::BalancerLayer)'s and
    /// a [`TcpProxy`](super::TcpProxy)'s are, so one pool (one set of endpoints, one health
    /// state) can serve them all. Endpoints without a socket address (an id that is not one)
    /// get no flows: their datagrams are dropped and counted in
    /// [`UdpStats::dropped_no_backend`].
    pub fn from_pool(pool: Pool<Target, St>) -> Self {
        UdpProxy {
            pool,
            config: Arc::new(Config {
                idle_timeout: Duration::from_secs(60),
                max_flows: 10_000,
                hash_client_ip: false,
            }),
            table: Arc::new(FlowTable::new()),
        }
    }

    /// The pool of backends.
    pub fn pool(&self) -> &Pool<Target, St> {
        &self.pool
    }

    /// Ends a flow after this long without a datagram either way (default 60 s, a little
    /// above the 30 s that Linux conntrack and most NATs keep a UDP mapping, so a client that
    /// keeps its NAT mapping alive keeps its flow too).
    pub fn idle_timeout(mut self, t: Duration) -> Self {
        Arc::make_mut(&mut self.config).idle_timeout = t;
        self
    }

    /// The most flows open at once (default 10 000, at least 1): each costs an upstream socket
    /// (a file descriptor) and a task. Past it, datagrams of new clients are dropped and
    /// counted in [`UdpStats::dropped_flow_limit`]; open flows are not affected.
    pub fn max_flows(mut self, max: usize) -> Self {
        Arc::make_mut(&mut self.config).max_flows = max.max(1);
        self
    }

    /// Hashes only the client's IP, not its port (default off: IP and port), so that hashing
    /// strategies send every flow of one host to the same endpoint.
    pub fn hash_client_ip(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.config).hash_client_ip = on;
        self
    }

    /// Flows open now, over every socket this proxy (and its clones) serves.
    pub fn flows(&self) -> usize {
        self.table.open.load(Ordering::Acquire)
    }

    /// The proxy's counters. Datagram counts of open flows are read shard by shard, so call
    /// it for monitoring, not per datagram.
    pub fn stats(&self) -> UdpStats {
        let t = &*self.table;
        let (mut up, mut down) = (
            t.retired_up.load(Ordering::Relaxed),
            t.retired_down.load(Ordering::Relaxed),
        );
        for shard in t.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for flow in shard.values() {
                up += flow.up.load(Ordering::Relaxed);
                down += flow.down.load(Ordering::Relaxed);
            }
        }
        UdpStats {
            flows: self.flows(),
            flows_opened: t.opened.load(Ordering::Relaxed),
            flows_expired: t.expired.load(Ordering::Relaxed),
            flows_moved: t.moved.load(Ordering::Relaxed),
            datagrams_to_backends: up,
            datagrams_to_clients: down,
            dropped_flow_limit: t.dropped_flow_limit.load(Ordering::Relaxed),
            dropped_no_backend: t.dropped_no_backend.load(Ordering::Relaxed),
            dropped_send: t.dropped_send.load(Ordering::Relaxed),
            backend_errors: t.backend_errors.load(Ordering::Relaxed),
        }
    }

    /// Receives datagrams on `socket` and balances them until this future is dropped, which
    /// also ends the flows it opened. Receive errors are logged and retried, never fatal, so
    /// this returns `Ok` only after a shutdown.
    pub async fn serve(self, socket: UdpSocket) -> io::Result<()> {
        self.serve_with_shutdown(socket, std::future::pending())
            .await
    }

    /// As [`serve`](Self::serve), until `shutdown` resolves; then stops receiving, ends the
    /// flows that came in on `socket` (closing their upstream sockets), closes `socket` and
    /// returns `Ok`. UDP has no connection to drain: a client whose flow ends simply gets no
    /// more answers from this proxy.
    ///
    /// ```no_run
    /// # async fn run(proxy: lbkit::proxy::UdpProxy<lbkit::strategy::Maglev>) -> std::io::Result<()> {
    /// let socket = tokio::net::UdpSocket::bind("127.0.0.1:5300").await?;
    /// let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
    /// proxy.serve_with_shutdown(socket, ctrl_c).await
    /// # }
    /// ```
    pub async fn serve_with_shutdown(
        self,
        socket: UdpSocket,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let socket = Arc::new(socket);
        let socket_id = self.table.next_socket.fetch_add(1, Ordering::Relaxed);
        let mut flows = JoinSet::new();
        let mut versions = self.pool.watch();
        let mut snap = self.pool.snapshot();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(_) = flows.join_next(), if !flows.is_empty() => {}
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, client)) => {
                        // The pool's version is an atomic read; the snapshot is loaded again
                        // only after the pool changed.
                        if versions.has_changed().unwrap_or(false) {
                            versions.borrow_and_update();
                            snap = self.pool.snapshot();
                        }
                        self.forward(&socket, socket_id, &snap, &buf[..n], client, &mut flows);
                    }
                    Err(e) => {
                        // Some systems report an ICMP error for an earlier send here; others
                        // errors (out of memory) are worth a pause.
                        tracing::debug!(error = %e, "receiving a datagram failed");
                        if !matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
                        ) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                },
            }
        }
        // Aborting a flow's task drops its entry, which takes it out of the table.
        flows.shutdown().await;
        Ok(())
    }

    /// The hash of a client's address: its IP canonicalized as `Key::client_ip` does (an
    /// IPv4 client over an IPv6 socket hashes as over IPv4), and its port unless only the IP
    /// is hashed.
    fn flow_hash(&self, client: SocketAddr) -> u64 {
        let ip = hash_ip(client.ip());
        if self.config.hash_client_ip {
            ip
        } else {
            mix64(ip ^ u64::from(client.port()))
        }
    }

    /// Sends one datagram from `client` on its flow, opening or moving the flow first if need
    /// be.
    fn forward(
        &self,
        socket: &Arc<UdpSocket>,
        socket_id: u64,
        snap: &Snapshot<Target, St::State>,
        datagram: &[u8],
        client: SocketAddr,
        flows: &mut JoinSet<()>,
    ) {
        let key = (client, socket_id);
        let hash = self.flow_hash(client);
        let table = &*self.table;
        let mut found = table.shard(hash).get(&key).cloned();
        // A refused datagram moves the flow and is sent once more, on the new one.
        for _ in 0..2 {
            let flow = match found.take() {
                Some(flow) if flow.usable(snap) => flow,
                old => {
                    let Some(flow) = self.open(socket, key, hash, snap, old.as_deref(), flows)
                    else {
                        return;
                    };
                    if let Some(old) = old {
                        table.moved.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%client, from = %old.endpoint, to = %flow.endpoint, "flow moved");
                        old.stop.notify_one();
                    }
                    flow
                }
            };
            match self.send(&flow, datagram) {
                Sent::Done => return,
                Sent::Refused => found = Some(flow),
            }
        }
    }

    /// Sends `datagram` to the flow's endpoint: at once if the socket takes it, else queued for
    /// the flow's task (dropped if the queue is full, as the network would); an error marks
    /// the flow failed.
    fn send(&self, flow: &Flow, datagram: &[u8]) -> Sent {
        let table = &*self.table;
        let sent = if flow.queued.load(Ordering::Acquire) {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            flow.upstream.try_send(datagram)
        };
        match sent {
            Ok(_) => {
                flow.up.fetch_add(1, Ordering::Relaxed);
                flow.touch(table);
                Sent::Done
            }
            // Also right after the socket opened: the runtime learns it is writable only
            // from its first readiness event.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !flow.enqueue(datagram) {
                    table.dropped_send.fetch_add(1, Ordering::Relaxed);
                }
                Sent::Done
            }
            Err(e) if !is_backend_error(&e) => {
                // A local condition (such as no buffer space): the backend is not to blame.
                tracing::debug!(client = %flow.key.0, error = %e, "sending to the backend failed");
                table.dropped_send.fetch_add(1, Ordering::Relaxed);
                Sent::Done
            }
            Err(e) => {
                tracing::debug!(client = %flow.key.0, backend = %flow.endpoint, error = %e, "the backend refused a datagram");
                if flow.fail() {
                    table.backend_errors.fetch_add(1, Ordering::Relaxed);
                    // Its task marks the endpoint's failure as it ends.
                    flow.stop.notify_one();
                }
                Sent::Refused
            }
        }
    }

    /// Opens a flow for `key` on an endpoint picked from `snap` (not `old`'s endpoint if that
    /// one failed), starts its task and puts it in the table. Drops the datagram (returning
    /// `None`) at the flow limit for a new client, or with no endpoint to go to.
    fn open(
        &self,
        socket: &Arc<UdpSocket>,
        key: FlowKey,
        hash: u64,
        snap: &Snapshot<Target, St::State>,
        old: Option<&Flow>,
        flows: &mut JoinSet<()>,
    ) -> Option<Arc<Flow>> {
        let table = &self.table;
        // The flow's place, taken first so that receive loops of several sockets never open
        // more than the limit between them. A move replaces a flow, so only new clients are
        // held to the limit.
        let open = table.open.fetch_add(1, Ordering::AcqRel);
        if old.is_none() && open >= self.config.max_flows {
            table.open.fetch_sub(1, Ordering::AcqRel);
            table.dropped_flow_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut hints = PickHints::default();
        hints.set_hash(hash);
        if let Some(old) = old.filter(|o| o.failed.load(Ordering::Acquire)) {
            hints.avoid(old.endpoint.clone());
        }
        // The pool's per-endpoint limit on requests in flight bounds flows per endpoint.
        let limit = self.pool.max_requests_per_endpoint();
        let Some(i) = snap.pick(self.pool.strategy(), Some(&hints), limit) else {
            tracing::debug!(client = %key.0, "no backend available; datagram dropped");
            table.open.fetch_sub(1, Ordering::AcqRel);
            table.dropped_no_backend.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let candidate = snap.eligible()[i].clone();
        let upstream = match snap.service(i).and_then(|t| t.socket_addr()) {
            Some(addr) => connect_upstream(addr),
            None => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "the endpoint has no socket address",
            )),
        };
        let upstream = match upstream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(client = %key.0, backend = %candidate.id(), error = %e, "opening an upstream socket failed; datagram dropped");
                table.open.fetch_sub(1, Ordering::AcqRel);
                table.dropped_no_backend.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let flow = Arc::new(Flow {
            key,
            hash,
            upstream,
            frontend: socket.clone(),
            endpoint: candidate.id().clone(),
            state: candidate.state().clone(),
            checked: AtomicU64::new(snap.version()),
            last: AtomicU64::new(table.now_ms()),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            stop: Notify::new(),
            queued: AtomicBool::new(false),
            queue: Mutex::default(),
            wake: Notify::new(),
        });
        table.opened.fetch_add(1, Ordering::Relaxed);
        table.shard(hash).insert(key, flow.clone());
        let entry = FlowEntry {
            table: self.table.clone(),
            flow: flow.clone(),
        };
        flows.spawn(run_flow(
            entry,
            InFlight::start(candidate),
            self.config.idle_timeout,
        ));
        Some(flow)
    }
}

/// Whether a send error is the backend's (or the way to it): an ICMP error of an earlier
/// datagram, reported by the kernel on the connected socket.
fn is_backend_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// A socket bound to an ephemeral port of `target`'s address family and connected to it, so
/// the kernel hands it only `target`'s datagrams (and its ICMP errors).
fn connect_upstream(target: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// The task of one flow: relays the endpoint's datagrams to the client until the flow idles
/// out, is replaced, or is aborted; counts an upstream error as a failure of the endpoint.
async fn run_flow(entry: FlowEntry, guard: InFlight, idle: Duration) {
    let flow = entry.flow.clone();
    let table = &*entry.table;
    let mut guard = Some(guard);
    let idle_ms = idle.as_millis() as u64;
    // Re-armed only when it fires, not on every datagram.
    let timer =
        sleep_until(table.epoch + Duration::from_millis(flow.last.load(Ordering::Relaxed)) + idle);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            () = flow.stop.notified() => break,
            () = &mut timer => {
                let last = flow.last.load(Ordering::Relaxed);
                if table.now_ms().saturating_sub(last) >= idle_ms {
                    table.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(client = %flow.key.0, backend = %flow.endpoint, "flow idle; closed");
                    break;
                }
                timer.as_mut().reset(table.epoch + Duration::from_millis(last) + idle);
            }
            () = flow.wake.notified(), if guard.is_some() => {
                if let Err(e) = flow.send_queued(table).await {
                    backend_failed(&flow, table, &mut guard, &e);
                }
            }
            // An ICMP error is reported as an error event, not as readable.
            ready = flow.upstream.ready(Interest::READABLE | Interest::ERROR), if guard.is_some() => {
                match ready.and_then(|ready| flow.on_ready(ready, table)) {
                    Ok(None) => {}
                    Ok(Some(waiting)) => {
                        if let Err(e) = flow.frontend.send_to(&waiting, flow.key.0).await {
                            tracing::debug!(client = %flow.key.0, error = %e, "sending to the client failed");
                            table.dropped_send.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => backend_failed(&flow, table, &mut guard, &e),
                }
            }
        }
    }
    if let Some(mut g) = guard {
        if flow.failed.load(Ordering::Acquire) {
            g.fail();
        }
    }
    drop(entry);
}

/// Counts an error of a flow's upstream socket as a failure of its endpoint, now. The flow
/// stays in the table, failed, until its client's next datagram moves it (or it idles out).
fn backend_failed(flow: &Flow, table: &FlowTable, guard: &mut Option<InFlight>, e: &io::Error) {
    tracing::debug!(client = %flow.key.0, backend = %flow.endpoint, error = %e, "backend error");
    if flow.fail() {
        table.backend_errors.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(mut g) = guard.take() {
        g.fail();
    }
}
