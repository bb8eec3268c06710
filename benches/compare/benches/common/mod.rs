//! Setup shared by the `compare` benchmarks and the `profile` harness: the same endpoint
//! service, addresses, balancers and keys for lbkit, tower and pingora.

#![allow(dead_code)] // each bench target uses a different part

use std::convert::Infallible;
use std::future::{poll_fn, ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use lbkit::strategy::Strategy;
use lbkit::{Endpoint, Pool};
use pingora_load_balancing::selection::{BackendIter, BackendSelection};
use pingora_load_balancing::LoadBalancer;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};
use tower::Service;

/// tower's default for the peak-EWMA starting estimate is the caller's; lbkit's is 30 ms.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
pub const DECAY: Duration = Duration::from_secs(10);

pub type Request = http::Request<()>;

/// The endpoint service of every balancer here: always ready, answers at once, free to clone.
#[derive(Clone, Copy, Debug)]
pub struct ReadyOk;

impl Service<Request> for ReadyOk {
    type Response = ();
    type Error = Infallible;
    type Future = Ready<Result<(), Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _: Request) -> Self::Future {
        ready(Ok(()))
    }
}

/// The address of endpoint `i`, the same for lbkit and pingora.
pub fn addr(i: usize) -> String {
    format!(
        "127.{}.{}.{}:8080",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

pub fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n).map(|i| Endpoint::new(addr(i))).collect()
}

pub fn lbkit_pool<St: Strategy>(strategy: St, n: usize) -> Pool<ReadyOk, St> {
    let pool = Pool::builder(strategy)
        .default_rtt(DEFAULT_RTT)
        .latency_decay(DECAY)
        .build(|_: &Endpoint| ReadyOk);
    pool.extend(endpoints(n));
    assert_eq!(pool.snapshot().eligible().len(), n);
    pool
}

pub fn pingora_lb<S>(n: usize) -> LoadBalancer<S>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let lb = LoadBalancer::<S>::try_from_iter((0..n).map(addr)).expect("valid addresses");
    assert_eq!(lb.backends().get_backend().len(), n);
    assert!(lb.select(b"key", 256).is_some());
    lb
}

/// tower's p2c balancer over `n` always-ready services, with in-flight requests as the load.
pub type TowerP2c = Balance<PendingRequestsDiscover<ServiceList<Vec<ReadyOk>>>, Request>;

pub fn tower_p2c(n: usize) -> TowerP2c {
    let discover = PendingRequestsDiscover::new::<Request>(
        ServiceList::new::<Request>(vec![ReadyOk; n]),
        CompleteOnResponse::default(),
    );
    let mut balance = Balance::new(discover);
    // The first poll_ready takes in the whole list.
    now(poll_fn(|cx| {
        Service::<Request>::poll_ready(&mut balance, cx)
    }))
    .expect("ready");
    balance
}

/// tower's p2c balancer over `n` always-ready services, with peak EWMA as the load.
pub type TowerPeakEwma = Balance<PeakEwmaDiscover<ServiceList<Vec<ReadyOk>>>, Request>;

pub fn tower_peak_ewma(n: usize) -> TowerPeakEwma {
    let discover = PeakEwmaDiscover::new::<Request>(
        ServiceList::new::<Request>(vec![ReadyOk; n]),
        DEFAULT_RTT,
        DECAY,
        CompleteOnResponse::default(),
    );
    let mut balance = Balance::new(discover);
    now(poll_fn(|cx| {
        Service::<Request>::poll_ready(&mut balance, cx)
    }))
    .expect("ready");
    balance
}

/// Polls a future that is ready at once.
#[inline]
pub fn now<F: Future>(fut: F) -> F::Output {
    let fut = pin!(fut);
    match fut.poll(&mut Context::from_waker(futures::task::noop_waker_ref())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("every service here is always ready"),
    }
}

/// Sends one request through `svc`: `poll_ready`, `call`, and the future polled to completion.
#[inline]
pub fn send<S: Service<Request>>(svc: &mut S) -> Result<S::Response, S::Error> {
    now(poll_fn(|cx| svc.poll_ready(cx)))?;
    now(svc.call(Request::new(())))
}

/// A new, well-spread 16-byte key for each request, the same sequence for every implementation
/// (a stand-in for a user id or a URL path).
pub struct Keys(pub u64);

impl Keys {
    #[inline]
    pub fn next(&mut self) -> [u8; 16] {
        self.0 = self.0.wrapping_add(1);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.0.to_le_bytes());
        key[8..].copy_from_slice(&self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        key
    }
}
