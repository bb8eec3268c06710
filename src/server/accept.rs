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
use tokio::sync::Semaphore;
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
        listener,
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
/// taking their connections' slots from one `slots`.
pub(crate) async fn accept_loop_sharing<F, Fut>(
    listener: TcpListener,
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
    let mut slot = None;
    let mut backoff = MIN_BACKOFF;
    let mut at_limit_logged = false;
    loop {
        if slot.is_none() {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    slot = Some(permit);
                    at_limit_logged = false;
                }
                Err(_) if !at_limit_logged => {
                    tracing::warn!(
                        "connection limit reached: new connections wait in the listen backlog"
                    );
                    at_limit_logged = true;
                }
                Err(_) => {}
            }
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections (each gives its slot back when its task ends).
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept(), if slot.is_some() => match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_BACKOFF;
                    let permit = slot.take();
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
