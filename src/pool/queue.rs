//! Waiting for an endpoint under its in-flight limit: the pool's bounded queue.
//!
//! Nothing here is on the path of a request that finds a free slot. A request that finds every
//! eligible endpoint at its limit takes a place in the queue ([`QueueSlot`], bounded by the
//! pool's queue size) and waits ([`SlotWait`]) until a request ends anywhere in the pool, then
//! tries again. Waiters are woken all at once (`Notify::notify_waiters`): each may avoid other
//! endpoints, so the one a freed slot suits cannot be told in advance; the queue is bounded, so
//! the herd is too.

use std::pin::Pin;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;

use crate::endpoint::state::PoolShared;

/// What a pick under the in-flight limit found.
#[derive(Debug)]
pub(crate) enum Acquired<R> {
    /// An endpoint took the request; its in-flight count already includes it.
    Picked(R),
    /// Endpoints may take the request, but every one is at its limit.
    Saturated,
    /// No endpoint may take the request.
    NoEndpoint,
}

/// One counted waiter: counted in `PoolShared::waiters` from creation to drop.
#[derive(Debug)]
struct Waiter(Arc<PoolShared>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// Waits for a request of the pool to end (or the endpoints or the limit to change).
    ///
    /// Armed on creation and by [`rearm`](SlotWait::rearm): check for a free slot after
    /// arming, and poll only when none was found; an end between the two is not missed.
    pub(crate) struct SlotWait {
        #[pin]
        notified: OwnedNotified,
        waiter: Waiter,
    }
}

impl std::fmt::Debug for SlotWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotWait").finish_non_exhaustive()
    }
}

impl SlotWait {
    /// Starts waiting, armed.
    pub(crate) fn new(shared: &Arc<PoolShared>) -> Self {
        // A `Notified` sees every `notify_waiters` from its creation on, polled or not.
        let notified = shared.slot_freed.clone().notified_owned();
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence of `PoolShared::wake_all`: either the check that follows sees
        // the request that ended, or the one that ended sees this waiter and wakes it.
        fence(Ordering::SeqCst);
        SlotWait {
            notified,
            waiter: Waiter(shared.clone()),
        }
    }

    /// Arms again after a wake-up that found no free slot.
    pub(crate) fn rearm(self: Pin<&mut Self>) {
        let mut this = self.project();
        let fresh = this.waiter.0.slot_freed.clone().notified_owned();
        this.notified.set(fresh);
        fence(Ordering::SeqCst);
    }

    /// Ready once woken since the last arming.
    pub(crate) fn poll_woken(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        std::future::Future::poll(self.project().notified, cx)
    }
}

/// A place in the pool's queue, given back when dropped.
#[derive(Debug)]
pub(crate) struct QueueSlot(Arc<PoolShared>);

impl QueueSlot {
    /// Takes a place if fewer than `size` requests wait.
    pub(crate) fn take(shared: &Arc<PoolShared>, size: u64) -> Option<Self> {
        shared
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < size).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(shared.clone()))
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}
