//! [`Server::workers`]: one single-threaded runtime per worker thread, all accepting from one
//! listener, started and stopped together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tower_service::Service;

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
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, worker = i, "cannot share the listener with a worker");
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
                    let listener = match TcpListener::from_std(listener) {
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
