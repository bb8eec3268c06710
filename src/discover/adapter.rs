use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::poll_fn;
use futures::stream::{BoxStream, Stream, StreamExt};
use tower::discover::{Change, Discover};

use crate::endpoint::{Endpoint, EndpointId};
use crate::pool::{Pool, WeakPool};
use crate::strategy::Strategy;

/// The most changes applied as one snapshot.
const MAX_BATCH: usize = 4096;

/// Applies the changes of a tower [`Discover`] to `pool` until the stream ends (`Ok`) or fails
/// (the error). Keys become endpoints through `Into<Endpoint>` (a `SocketAddr`, a `&str`…).
///
/// Changes that are ready together are applied as one snapshot, so a burst of a thousand
/// inserts costs one rebuild. Build the pool with
/// [`PoolBuilder::build_with_services`](crate::pool::PoolBuilder::build_with_services): the
/// services come from the stream.
///
/// ```
/// use lbkit::{discover, pool::Pool, strategy::RoundRobin};
/// use tower::discover::Change;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pool = Pool::builder(RoundRobin::new()).build_with_services();
/// let changes = futures::stream::iter([
///     Ok::<_, std::convert::Infallible>(Change::Insert("a", "service a")),
///     Ok(Change::Insert("b", "service b")),
///     Ok(Change::Remove("a")),
/// ]);
/// discover::feed(&pool, changes).await.unwrap();
/// let ids: Vec<_> = pool.endpoints().into_iter().map(|(e, _)| e.id().clone()).collect();
/// assert_eq!(ids, ["b"]);
/// # }
/// ```
pub async fn feed<D, S, St>(pool: &Pool<S, St>, discover: D) -> Result<(), D::Error>
where
    D: Discover<Service = S>,
    D::Key: Clone + Into<Endpoint>,
    S: Clone,
    St: Strategy,
{
    let mut discover = std::pin::pin!(discover);
    let mut end: Option<Result<(), D::Error>> = None;
    loop {
        let batch = poll_fn(|cx| {
            let mut batch = Vec::new();
            while batch.len() < MAX_BATCH {
                match discover.as_mut().poll_discover(cx) {
                    Poll::Ready(Some(Ok(change))) => batch.push(change),
                    Poll::Ready(Some(Err(e))) => {
                        end = Some(Err(e));
                        break;
                    }
                    Poll::Ready(None) => {
                        end = Some(Ok(()));
                        break;
                    }
                    Poll::Pending if batch.is_empty() => return Poll::Pending,
                    Poll::Pending => break,
                }
            }
            Poll::Ready(batch)
        })
        .await;
        if !batch.is_empty() {
            tracing::debug!(changes = batch.len(), "applying discovered changes");
            pool.update(|c| {
                for change in batch {
                    match change {
                        Change::Insert(key, service) => c.insert_with_service(key.into(), service),
                        Change::Remove(key) => {
                            let endpoint: Endpoint = key.into();
                            c.remove(endpoint.id());
                        }
                    }
                }
            });
        }
        if let Some(end) = end.take() {
            return end;
        }
    }
}

/// A pool's eligible endpoints as a tower [`Discover`] stream: `Change::Insert` when an
/// endpoint becomes eligible (added, or healthy again), `Change::Remove` when it stops being
/// eligible. The stream ends when the pool is dropped.
///
/// Made with [`PoolDiscover::new`]; the keys are [`EndpointId`]s and the services clones of the
/// pool's.
pub struct PoolDiscover<S> {
    inner: BoxStream<'static, Result<Change<EndpointId, S>, Infallible>>,
}

impl<S> fmt::Debug for PoolDiscover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolDiscover").finish_non_exhaustive()
    }
}

struct Follow<S, St: Strategy> {
    pool: WeakPool<S, St>,
    versions: tokio::sync::watch::Receiver<u64>,
    emitted: HashSet<EndpointId>,
    queue: VecDeque<Change<EndpointId, S>>,
    first: bool,
}

impl<S> PoolDiscover<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Follows `pool`. The stream does not keep the pool alive: it ends once every handle and
    /// balancer over the pool is gone.
    pub fn new<St: Strategy>(pool: &Pool<S, St>) -> Self
    where
        St::State: Send + Sync,
    {
        let state = Follow {
            versions: pool.watch(),
            pool: pool.downgrade(),
            emitted: HashSet::new(),
            queue: VecDeque::new(),
            first: true,
        };
        let inner = futures::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(change) = st.queue.pop_front() {
                    return Some((Ok(change), st));
                }
                // Wait for the next snapshot; the channel closes when the pool is dropped.
                if !st.first && st.versions.changed().await.is_err() {
                    return None;
                }
                st.first = false;
                st.versions.borrow_and_update();
                let snap = st.pool.upgrade()?.snapshot();
                let now: HashSet<&EndpointId> = snap.eligible().iter().map(|c| c.id()).collect();
                let gone: Vec<EndpointId> = st
                    .emitted
                    .iter()
                    .filter(|id| !now.contains(id))
                    .cloned()
                    .collect();
                for id in gone {
                    st.emitted.remove(&id);
                    st.queue.push_back(Change::Remove(id));
                }
                for (c, svc) in snap.eligible().iter().zip(snap.services()) {
                    if st.emitted.insert(c.id().clone()) {
                        st.queue
                            .push_back(Change::Insert(c.id().clone(), svc.clone()));
                    }
                }
            }
        });
        PoolDiscover {
            inner: inner.boxed(),
        }
    }
}

impl<S> Stream for PoolDiscover<S> {
    type Item = Result<Change<EndpointId, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}
