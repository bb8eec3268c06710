//! The accept loop shared by the TCP and TLS servers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Accepts connections from `listener` and spawns `handle(stream, peer)` for each, until the
/// returned future is dropped (which aborts the connections it spawned). Transient accept
/// errors (a full file table, a connection reset before it was accepted) are logged and
/// waited out; any other is returned.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut handle: F) -> io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(handle(stream, peer));
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
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
