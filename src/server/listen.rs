//! Binding a listener whose address the [`Server`](super::Server)'s workers can each listen on
//! (`SO_REUSEPORT`).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Binds a listener on `addr`, as [`TcpListener::bind`] does, with `SO_REUSEPORT` set on Linux:
/// a [`Server`](super::Server) serving on [several workers](super::Server::workers) from it
/// then gives each worker a socket of its own on the same address, and the kernel spreads the
/// new connections among them by a hash of their addresses (as nginx's `listen ...
/// reuseport` does), instead of every worker waking for every connection on one listener and
/// the quickest taking it. Elsewhere it binds without `SO_REUSEPORT` and the workers share the
/// listener.
///
/// Other sockets with `SO_REUSEPORT`, of the same user, may bind the same address too and get
/// a share of its connections: a new process of the same proxy during a restart, for example.
pub async fn bind_reuse_port(addr: SocketAddr) -> io::Result<TcpListener> {
    reuse_port_socket(addr)
}

/// A socket listening on `addr` with `SO_REUSEADDR` (as [`TcpListener::bind`] sets on Unix)
/// and, on Linux, `SO_REUSEPORT`; registered with the current runtime.
pub(crate) fn reuse_port_socket(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    #[cfg(target_os = "linux")]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // The backlog TcpListener::bind uses.
    socket.listen(1024)
}
