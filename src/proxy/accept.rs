//! The accept loop shared by the TCP and TLS servers, with graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Tells a connection that the server is shutting down: finish what is in flight, take no new
/// requests, and close.
#[derive(Clone, Debug)]
pub(crate) struct Drain(watch::Receiver<bool>);

impl Drain {
    /// Resolves once the server starts shutting down (never, if it does not).
    pub(crate) async fn started(&mut self) {
        // A closed channel means the server is gone: that is a shutdown too.
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

/// Accepts connections from `listener` and spawns `handle(stream, peer, drain)` for each.
///
/// Until `shutdown` resolves; then it stops accepting (the listener is closed), tells every
/// connection through its [`Drain`], waits up to `grace` for them to end, aborts the rest and
/// returns `Ok`. Dropping the returned future aborts every connection at once. Transient
/// accept errors (a full file table, a connection reset before it was accepted) are logged and
/// waited out; any other is returned.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut handle: F,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(handle(stream, peer, Drain(rx.clone())));
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let open = conns.len();
    tracing::info!(
        connections = open,
        ?grace,
        "shutting down: draining connections"
    );
    let _ = tx.send(true);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "grace period over: closing the connections left"
        );
        conns.shutdown().await;
    }
    Ok(())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}
