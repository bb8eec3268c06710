//! [`Server::workers`]: one single-threaded runtime per worker thread, each accepting from a
//! listener of its own (`SO_REUSEPORT`, on Linux, when the given listener has it) or all from
//! the one given, started and stopped together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tower_service::Service;

use super::accept::Listener;
use super::body::RequestBody;
use super::Server;
use crate::error::BoxError;

/// What the workers are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Keep serving.
    No,
    /// Stop accepting and shut the connections down gracefully.
    Drain,
    /// Close everything at once (the serving future was dropped).
    Now,
}

/// Sends [`Stop::Now`] when dropped: dropping the serving future closes every connection at
/// once, as it does without workers.
struct StopGuard(watch::Sender<Stop>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.send_if_modified(|s| {
            let was = *s;
            *s = Stop::Now;
            was != Stop::Now
        });
    }
}

/// A worker's listener, on its way to the worker's runtime.
struct WorkerListener {
    listener: std::net::TcpListener,
    /// Whether it is the worker's own (in an `SO_REUSEPORT` group), not shared by all.
    own: bool,
}

impl WorkerListener {
    /// Worker `i`'s listener: its own from `own` (the first worker's is `shared`), or a
    /// duplicate of `shared` when the workers share it.
    fn new(
        shared: &std::net::TcpListener,
        own: Option<&mut std::vec::IntoIter<std::net::TcpListener>>,
        i: usize,
    ) -> std::io::Result<Self> {
        let is_own = own.is_some();
        let listener = match own {
            Some(own) if i > 0 => own
                .next()
                .ok_or_else(|| std::io::Error::other("no listener of its own left"))?,
            _ => shared.try_clone()?,
        };
        Ok(WorkerListener {
            listener,
            own: is_own,
        })
    }

    /// The listener, registered with the worker's runtime (the current one).
    fn register(self) -> std::io::Result<Listener> {
        let listener = TcpListener::from_std(self.listener)?;
        Ok(if self.own {
            Listener::Own(listener)
        } else {
            Listener::Shared(listener)
        })
    }
}

/// The listeners of workers 1 to `n - 1`: new sockets bound to `listener`'s address in its
/// `SO_REUSEPORT` group, among which (and `listener`, the first worker's) the kernel spreads
/// new connections by a hash of their addresses, as it does for nginx's `listen ...
/// reuseport`. `None` when that cannot be done (not on Linux, or `listener` was bound without
/// `SO_REUSEPORT`, see [`bind_reuse_port`](super::bind_reuse_port)): the workers then all
/// accept from `listener`.
fn own_listeners(
    listener: &TcpListener,
    n: usize,
) -> Option<std::vec::IntoIter<std::net::TcpListener>> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let addr = listener.local_addr().ok()?;
    let mut own = Vec::with_capacity(n);
    for _ in 1..n {
        match super::reuse_port_socket(addr).and_then(TcpListener::into_std) {
            Ok(l) => own.push(l),
            Err(e) => {
                tracing::debug!(error = %e, %addr, "the workers share one listener");
                return None;
            }
        }
    }
    Some(own.into_iter())
}

/// Serves `server` on its [`workers`](Server::workers) threads until `shutdown`, then drains
/// them all within `grace` and returns once every worker has ended.
pub(super) async fn serve<S, B>(
    server: Server<S>,
    listener: TcpListener,
    slots: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let n = server.worker_count();
    let mut own = own_listeners(&listener, n);
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listener to the workers");
            return;
        }
    };
    let (stop, stopped) = watch::channel(Stop::No);
    let guard = StopGuard(stop);
    let mut ended = Vec::with_capacity(n);
    for i in 0..n {
        let listener = match WorkerListener::new(&listener, own.as_mut(), i) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, worker = i, "cannot give a worker a listener");
                continue;
            }
        };
        let (done, ended_rx) = oneshot::channel::<()>();
        let server = server.clone();
        let slots = slots.clone();
        let mut stopped = stopped.clone();
        let started = std::thread::Builder::new()
            .name(format!("lbkit-worker-{i}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, worker = i, "cannot start a worker's runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match listener.register() {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, worker = i, "worker cannot listen");
                            return;
                        }
                    };
                    let mut drain = stopped.clone();
                    let draining = async move {
                        let _ = drain.wait_for(|s| *s != Stop::No).await;
                    };
                    let serving = server.serve_sharing(listener, slots, draining, grace);
                    tokio::select! {
                        () = serving => {}
                        _ = stopped.wait_for(|s| *s == Stop::Now) => {}
                    }
                });
                // Dropping the runtime here closes whatever is left on this worker.
                drop(runtime);
                drop(done);
            });
        match started {
            Ok(_) => ended.push(ended_rx),
            Err(e) => tracing::error!(error = %e, worker = i, "cannot start a worker thread"),
        }
    }
    drop(listener);
    if ended.is_empty() {
        return;
    }
    shutdown.await;
    guard.0.send_if_modified(|s| {
        let was = *s;
        if was == Stop::No {
            *s = Stop::Drain;
        }
        was == Stop::No
    });
    for worker in ended {
        let _ = worker.await;
    }
    // Every worker has ended: nothing is left for the guard to stop.
    drop(guard);
}
