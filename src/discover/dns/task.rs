//! The background task: poll, apply a good answer to the pool as one snapshot, keep the last
//! good set on trouble, sleep for the TTL, stop once the pool is gone.

use std::pin::pin;
use std::time::Duration;

use futures::future::{self, Either};
use hickory_resolver::TokioResolver;
use tokio::sync::watch;

use super::DnsDiscovery;
use crate::endpoint::Endpoint;
use crate::pool::WeakPool;
use crate::strategy::Strategy;

impl DnsDiscovery {
    /// The wait after a good answer valid for `ttl`.
    fn next_poll(&self, ttl: Duration) -> Duration {
        ttl.max(self.min_ttl).min(self.max_ttl)
    }

    pub(super) async fn run<S, St>(
        self,
        resolver: TokioResolver,
        pool: WeakPool<S, St>,
        mut versions: watch::Receiver<u64>,
    ) where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let mut last: Option<Vec<Endpoint>> = None;
        loop {
            let wait = match self.query.resolve(&resolver, self.filter).await {
                Ok(answer) => {
                    let Some(pool) = pool.upgrade() else {
                        return;
                    };
                    let wait = self.next_poll(answer.ttl);
                    if last.as_ref() != Some(&answer.endpoints) {
                        tracing::info!(
                            endpoints = answer.endpoints.len(),
                            next_poll = ?wait,
                            "DNS answer changed the endpoint set"
                        );
                    } else {
                        tracing::debug!(endpoints = answer.endpoints.len(), next_poll = ?wait, "DNS answer unchanged");
                    }
                    // Applied even when unchanged, so the pool comes back to what DNS says.
                    pool.update(|c| c.replace_all(answer.endpoints.iter().cloned()));
                    last = Some(answer.endpoints);
                    wait
                }
                Err(_) if pool.upgrade().is_none() => return,
                Err(e) => {
                    tracing::warn!(
                        error = %crate::discover::ErrorChain(&e),
                        kept = last.as_ref().map_or(0, Vec::len),
                        retry_in = ?self.retry_interval,
                        "DNS discovery keeps the last good endpoint set"
                    );
                    self.retry_interval
                }
            };
            if !sleep_while_alive(&mut versions, wait).await {
                tracing::debug!("pool dropped, DNS discovery stops");
                return;
            }
        }
    }
}
/// Sleeps for `wait`; returns false early if the pool is dropped meanwhile.
async fn sleep_while_alive(versions: &mut watch::Receiver<u64>, wait: Duration) -> bool {
    let sleep = pin!(tokio::time::sleep(wait));
    // `changed` fails once the pool (the sender) is gone; new versions just loop.
    let closed = pin!(async { while versions.changed().await.is_ok() {} });
    matches!(future::select(sleep, closed).await, Either::Left(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_is_bounded() {
        let d = DnsDiscovery::host("x.test.", 80)
            .min_ttl(Duration::from_secs(2))
            .max_ttl(Duration::from_secs(60));
        assert_eq!(d.next_poll(Duration::ZERO), Duration::from_secs(2));
        assert_eq!(
            d.next_poll(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            d.next_poll(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        let odd = d.min_ttl(Duration::from_secs(90));
        assert_eq!(
            odd.next_poll(Duration::ZERO),
            Duration::from_secs(60),
            "max wins"
        );
    }
}
