//! The accept loop shared by the HTTP server, the TLS server and the TCP proxy: a connection
//! limit, accept errors backed off (never fatal), and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The first pause after a failed accept; it doubles on each failure in a row, up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause after failed accepts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Tells a connection that the server is shutting down: finish what is in flight, take no new
/// requests, and close. (A TCP splice has no way to ask its peer to close, so only the HTTP
/// server reads it.)
///
/// Polled on every wake-up of its connection, so polling it takes no lock: a flag and the
/// connection's own waker. (A `watch` or `Notify` shared by all connections locks its waiter
/// list on each poll, a lock every request of every connection would take.)
#[derive(Debug)]
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))]
pub(crate) struct Drain {
    signal: Arc<DrainSignal>,
    waker: Arc<AtomicWaker>,
}

/// What the accept loop shares with its connections' [`Drain`]s.
#[derive(Debug, Default)]
struct DrainSignal {
    draining: AtomicBool,
    /// The wakers of the connections that may wait (dead ones pruned as it grows).
    wakers: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl DrainSignal {
    fn subscribe(self: &Arc<Self>) -> Drain {
        let waker = Arc::new(AtomicWaker::new());
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if wakers.len() == wakers.capacity() {
            wakers.retain(|w| w.strong_count() > 0);
        }
        wakers.push(Arc::downgrade(&waker));
        Drain {
            signal: self.clone(),
            waker,
        }
    }

    fn start(&self) {
        self.draining.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers.iter().filter_map(Weak::upgrade) {
            w.wake();
        }
    }
}

#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))]
impl Drain {
    /// Resolves once the server starts shutting down (never, if it does not).
    pub(crate) async fn started(&mut self) {
        std::future::poll_fn(|cx| {
            if self.signal.draining.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.signal.draining.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Where an accept loop takes its connections from.
#[derive(Debug)]
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))]
pub(crate) enum Listener {
    /// A listener the loop may share with others (the file descriptor duplicated into each
    /// worker): the loop takes a connection slot, then waits for a connection with it.
    Shared(TcpListener),
    /// A listener of this loop alone (one worker's `SO_REUSEPORT` socket, to which the kernel
    /// hands its share of the new connections): the loop accepts a connection, then waits
    /// for a slot for it. Loops sharing a limit then never hold a slot for a listener with
    /// nothing to accept while a connection waits on another's; at the limit each holds at
    /// most one accepted connection, unserved until a slot frees, as in the backlog.
    Own(TcpListener),
}

impl Listener {
    /// The next connection and the slot it takes from `slots`. Waits for a slot while none
    /// is free (new connections wait in the backlog meanwhile), saying so once per wait in
    /// `at_limit_logged`. Cancel-safe: dropped before it returns, it loses no connection (one
    /// accepted from an own listener waits in `waiting` for the next call).
    async fn next(
        &self,
        slots: &Arc<Semaphore>,
        waiting: &mut Option<(TcpStream, SocketAddr)>,
        at_limit_logged: &mut bool,
    ) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
        match self {
            Listener::Shared(listener) => {
                let permit = slot(slots, at_limit_logged).await?;
                let (stream, peer) = listener.accept().await?;
                Ok((stream, peer, permit))
            }
            Listener::Own(listener) => {
                if waiting.is_none() {
                    *waiting = Some(listener.accept().await?);
                }
                let permit = slot(slots, at_limit_logged).await?;
                let (stream, peer) = waiting
                    .take()
                    .ok_or_else(|| std::io::Error::other("no connection waiting"))?;
                Ok((stream, peer, permit))
            }
        }
    }
}

/// A connection slot from `slots`, waiting for one while none is free (and saying so once
/// per wait, in `at_limit_logged`).
async fn slot(
    slots: &Arc<Semaphore>,
    at_limit_logged: &mut bool,
) -> std::io::Result<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        *at_limit_logged = false;
        return Ok(permit);
    }
    if !*at_limit_logged {
        tracing::warn!("connection limit reached: new connections wait in the listen backlog");
        *at_limit_logged = true;
    }
    // The slots are never closed; were they, the loop would pause and retry like on any
    // failed accept.
    slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("connection slots closed"))
}

/// Accepts connections from `listener` and spawns `handle(stream, peer, drain)` for each, with
/// at most `max_connections` open at once.
///
/// At the limit it stops calling `accept`, so new connections wait in the kernel's backlog
/// until one closes (as nginx and HAProxy do at `worker_connections`/`maxconn`). A failed
/// accept (a full file table, `EMFILE`/`ENFILE`, a connection aborted before it was accepted,
/// anything else) is logged and retried after a pause that doubles while failures go on (5 ms
/// up to 1 s); it never ends the loop.
///
/// Runs until `shutdown` resolves; then it stops accepting (the listener is closed), tells
/// every connection through its [`Drain`], waits up to `grace` for them to end, aborts the
/// rest and returns. Dropping the returned future aborts every connection at once.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    handle: F,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    F: FnMut(TcpStream, SocketAddr, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop_sharing(
        Listener::Shared(listener),
        connection_slots(max_connections),
        handle,
        shutdown,
        grace,
    )
    .await
}

/// The slots of a limit of `max_connections`, for [`accept_loop_sharing`].
pub(crate) fn connection_slots(max_connections: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ))
}

/// [`accept_loop`] with its connection limit shared: several loops (one per worker thread)
/// taking their connections' slots from one `slots`, each from its own listener or from one
/// they share.
pub(crate) async fn accept_loop_sharing<F, Fut>(
    listener: Listener,
    slots: Arc<Semaphore>,
    mut handle: F,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    F: FnMut(TcpStream, SocketAddr, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let signal = Arc::new(DrainSignal::default());
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = MIN_BACKOFF;
    let mut at_limit_logged = false;
    let mut waiting = None;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections (each gives its slot back when its task ends).
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.next(&slots, &mut waiting, &mut at_limit_logged) => match accepted {
                Ok((stream, peer, permit)) => {
                    backoff = MIN_BACKOFF;
                    let conn = handle(stream, peer, signal.subscribe());
                    // `map`, not an `async` block awaiting `conn`: that would hold the
                    // connection's future twice (captured, and being awaited), doubling the
                    // memory of every connection's task.
                    conns.spawn(conn.map(move |()| drop(permit)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, pause = ?backoff, "accept failed; pausing");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
        }
    }
    drop(listener);
    let open = conns.len();
    tracing::info!(
        connections = open,
        ?grace,
        "shutting down: draining connections"
    );
    signal.start();
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "grace period over: closing the connections left"
        );
        conns.shutdown().await;
    }
}
