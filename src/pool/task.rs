//! The handle of a background task that serves a pool.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;

/// A running background task that serves a [`Pool`](super::Pool): an active health checker,
/// outlier detection, a slow-start driver, DNS discovery or a metrics exporter (each one's
/// `spawn` returns it).
///
/// The task ends by itself when the pool it serves is dropped. Dropping this handle does *not*
/// stop it; [`abort`](PoolTask::abort) does. Awaiting the handle waits for the task to end (and
/// passes on a panic of the task).
#[derive(Debug)]
pub struct PoolTask {
    join: JoinHandle<()>,
}

impl PoolTask {
    pub(crate) fn new(join: JoinHandle<()>) -> Self {
        PoolTask { join }
    }

    /// Stops the task. What it did stays done, except that outlier detection lets the
    /// endpoints it ejected return and a slow-start driver gives ramping endpoints their full
    /// weight; a checker leaves its marks, DNS discovery the endpoints it found.
    pub fn abort(&self) {
        self.join.abort();
    }

    /// Whether the task has ended (its pool was dropped, or it was aborted).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

impl Future for PoolTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match std::task::ready!(Pin::new(&mut self.join).poll(cx)) {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            _ => Poll::Ready(()),
        }
    }
}
