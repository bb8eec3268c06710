//! Upgraded connections (WebSocket): the client's and the backend's connections spliced
//! together after `101 Switching Protocols`, closed when either side closes, when no byte
//! passed either way for the idle timeout, or when the server the client came through shuts
//! down; counted as in flight at their endpoint while open.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::balance::TunnelGuard;
use crate::server::TunnelScope;

/// How long a tunnel may pass no byte either way before it is closed, unless
/// [`Forward::tunnel_idle_timeout`](super::Forward::tunnel_idle_timeout) says otherwise.
pub(super) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The client's side of an upgrade the proxy agreed to pass on, taken from the request.
#[derive(Debug)]
pub(super) struct ClientUpgrade {
    on_upgrade: OnUpgrade,
    /// The client connection's scope, when lbkit's server accepted it.
    scope: Option<TunnelScope>,
}

impl ClientUpgrade {
    /// Takes the client's side of the upgrade out of `req`.
    pub(super) fn take<B>(req: &mut http::Request<B>) -> Self {
        ClientUpgrade {
            scope: req.extensions().get::<TunnelScope>().cloned(),
            on_upgrade: hyper::upgrade::on(req),
        }
    }

    /// The backend agreed (`res` is its `101`): splices the two connections in a task of their
    /// own, and leaves a [`TunnelGuard`] in `res` so that a balancer in front counts the
    /// request in flight until the tunnel closes.
    pub(super) fn splice<B>(self, res: &mut http::Response<B>, idle_timeout: Duration) {
        let backend = hyper::upgrade::on(&mut *res);
        let guard = TunnelGuard::default();
        res.extensions_mut().insert(guard.clone());
        tokio::spawn(async move {
            tunnel(self, backend, idle_timeout).await;
            drop(guard);
        });
    }
}

async fn tunnel(client: ClientUpgrade, backend: OnUpgrade, idle_timeout: Duration) {
    let ClientUpgrade { on_upgrade, scope } = client;
    let (client, backend) = match futures::future::try_join(on_upgrade, backend).await {
        Ok(both) => both,
        Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
    };
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Watched::new(TokioIo::new(client), start, &last);
    let mut backend = Watched::new(TokioIo::new(backend), start, &last);
    let server_gone = async {
        match scope {
            Some(mut scope) => scope.ended().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut client, &mut backend) => match res {
            Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection failed"),
        },
        () = idle(start, &last, idle_timeout) => {
            tracing::debug!(timeout = ?idle_timeout, "upgraded connection idle: closed");
        }
        () = server_gone => tracing::debug!("server shut down: upgraded connection closed"),
    }
}

/// Resolves once no byte was read from either side for `timeout`.
async fn idle(start: Instant, last: &AtomicU64, timeout: Duration) {
    loop {
        let seen = start + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = seen + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// One side of a tunnel that notes (in milliseconds since `start`) when it last read bytes.
struct Watched<'a, T> {
    io: T,
    start: Instant,
    last: &'a AtomicU64,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, start: Instant, last: &'a AtomicU64) -> Self {
        Watched { io, start, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = this.start.elapsed().as_millis();
            this.last
                .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
