//! Coalescing of concurrent misses: the first request for a key leads (goes to the backend),
//! later ones wait for its outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::store::Stored;

/// Shards of the table of flights, so that misses for different keys rarely meet on a lock
/// (and hits never take one).
const SHARDS: usize = 64;

/// What the leader of a flight tells the requests that waited for it.
#[derive(Clone)]
pub(super) enum Outcome {
    /// This response was stored (or revalidated, or served stale on error) for the key: a
    /// waiter whose request it matches (same `Vary` headers) serves it.
    Serve(Arc<Stored>),
    /// Nothing usable came back (not cacheable, too large, an error): each waiter goes to the
    /// backend itself.
    Pass,
}

type Slot = (u64, watch::Receiver<Option<Outcome>>);

/// The misses in progress, by key.
pub(super) struct Flights {
    shards: Box<[Mutex<HashMap<u64, Slot>>]>,
    next_id: AtomicU64,
}

/// Whether a request leads the flight for its key or waits for another's.
pub(super) enum Joined<'a> {
    Lead(Leader<'a>),
    Wait(watch::Receiver<Option<Outcome>>),
}

/// The leader's side of a flight: publishes the outcome; when dropped (finished, or the leading
/// request cancelled) the flight ends, and waiters that got no outcome try again.
pub(super) struct Leader<'a> {
    flights: &'a Flights,
    key: u64,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
}

impl Flights {
    pub(super) fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // Keys are already uniform hashes; a poisoned shard holds plain data and stays usable.
        let shard = &self.shards[(key % SHARDS as u64) as usize];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leads the flight for `key` if there is none, else waits for it.
    pub(super) fn join(&self, key: u64) -> Joined<'_> {
        let mut shard = self.shard(key);
        if let Some((_, rx)) = shard.get(&key) {
            return Joined::Wait(rx.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        shard.insert(key, (id, rx));
        Joined::Lead(Leader {
            flights: self,
            key,
            id,
            tx,
        })
    }

    /// Flights in progress (for tests and statistics).
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Leader<'_> {
    /// Tells the waiters what came back.
    pub(super) fn publish(&self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut shard = self.flights.shard(self.key);
        if shard.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            shard.remove(&self.key);
        }
    }
}

/// Waits for the leader's outcome; `None` when the leader went away without one.
pub(super) async fn outcome(mut rx: watch::Receiver<Option<Outcome>>) -> Option<Outcome> {
    rx.wait_for(Option::is_some).await.ok()?.clone()
}
