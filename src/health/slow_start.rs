//! Slow start: a weight ramp for endpoints that come (back) up, so a cold server (empty caches,
//! a JIT not yet warm, a fresh connection pool) is not flooded with its full share at once.
//!
//! With [`SlowStart`] running on a pool, an endpoint starts a ramp when it becomes healthy again
//! (its down mark or its ejection is cleared) and when it is added to a pool that already had
//! endpoints (the first endpoints of a pool are not ramped: there is no one to spare them).
//! During the ramp the endpoint's weight in the snapshot is
//!
//! ```text
//! weight × max(min_share, (elapsed / window) ^ (1 / aggression))
//! ```
//!
//! as in Envoy's slow start. A background task republishes the pool's snapshot ten times per
//! window so the weight climbs in steps of a tenth; after `window` the endpoint has its full
//! weight and the task sleeps until the next ramp. Weights are integers, so while any endpoint
//! of a snapshot ramps, every weight in that snapshot is scaled by ten (proportions are kept);
//! [`Candidate::weight`](crate::endpoint::Candidate::weight) shows the scaled weight.
//!
//! Every built-in strategy honours weights, so the ramp works with all of them; with the
//! consistent-hashing ones (Maglev, the ring) a change of weight also moves some keys, so a
//! ramp there moves keys onto the endpoint in steps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub use crate::pool::ramp::SlowStart;
use crate::pool::PoolTask;
use crate::pool::{Pool, WeakPool};
use crate::strategy::Strategy;

impl SlowStart {
    /// Installs slow start on `pool` and spawns the task that republishes its snapshot during
    /// ramps. The task holds no strong reference to the pool: it ends when every
    /// [`Pool`] and balancer over the pool is dropped. Aborting it (through the returned
    /// handle) removes slow start from the pool and gives ramping endpoints their full weight.
    ///
    /// Run one per pool; a second replaces the settings of the first. Must be called from
    /// within a tokio runtime.
    pub fn spawn<S, St>(self, pool: &Pool<S, St>) -> PoolTask
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        pool.set_slow_start(Some(self));
        let wake = pool.ramp_wake();
        let guard = Uninstall(pool.downgrade());
        let join = tokio::spawn(drive(guard, wake, self.step()));
        PoolTask::new(join)
    }
}

/// Takes slow start off the pool when the driving task ends or is aborted.
struct Uninstall<S: Clone, St: Strategy>(WeakPool<S, St>);

impl<S: Clone, St: Strategy> Drop for Uninstall<S, St> {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.set_slow_start(None);
        }
    }
}

async fn drive<S, St>(pool: Uninstall<S, St>, wake: Arc<Notify>, step: Duration)
where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
{
    loop {
        // Register for a wake-up before looking, so a ramp that starts (or a pool that goes)
        // in between is not missed.
        let notified = wake.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let ramping = match pool.0.upgrade() {
            Some(p) => p.is_ramping(),
            None => return,
        };
        if ramping {
            tokio::time::sleep(step).await;
            match pool.0.upgrade() {
                Some(p) => p.republish(),
                None => return,
            }
        } else {
            notified.await;
        }
    }
}
