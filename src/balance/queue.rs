use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::completion::InFlight;
use super::future::EndpointCall;
use super::target::Target;
use crate::error::Error;
use crate::hints::{PickRecord, RequestHints};
use crate::pool::queue::{Acquired, QueueSlot, SlotWait};
use crate::pool::Pool;
use crate::strategy::Strategy;

/// How a balancer turns the pool entry of the endpoint it picked into the service it calls.
///
/// The balancer binds once per request, right after the pick; a request that waited in the
/// pool's queue (see
/// [`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint))
/// binds when an endpoint takes it, so the binding is kept with it.
pub trait Bind<P, Req> {
    /// The service the request is sent to.
    type Service;

    /// The service for the endpoint whose pool entry (a clone) is `entry`; may tag `req` for
    /// it.
    fn bind(&self, entry: P, req: &mut Req) -> Self::Service;
}

/// The binding of a [`Balancer`](super::Balancer): each pool entry is its endpoint's service,
/// and a clone of it is called.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryService;

impl<S: Clone, Req> Bind<S, Req> for EntryService {
    type Service = S;

    #[inline]
    fn bind(&self, entry: S, _req: &mut Req) -> S {
        entry
    }
}

/// The binding of a [`BalancerLayer`](super::BalancerLayer)'s service: the picked endpoint's
/// [`Target`] goes into the request's extensions, and a clone of the one inner service is
/// called.
#[derive(Clone, Debug)]
pub struct TagTarget<S>(pub(super) S);

impl<S: Clone, B> Bind<Target, http::Request<B>> for TagTarget<S> {
    type Service = S;

    #[inline]
    fn bind(&self, target: Target, req: &mut http::Request<B>) -> S {
        req.extensions_mut().insert(target);
        self.0.clone()
    }
}

/// A request picked and counted at an endpoint, bound and called: what a
/// [`ResponseFuture`](super::ResponseFuture) runs.
pub(super) struct Started<S: Service<Req>, Req> {
    pub(super) handle: InFlight,
    pub(super) call: EndpointCall<S, Req>,
    pub(super) record: Option<PickRecord>,
}

/// Why no endpoint took a request, with the request handed back.
pub(super) struct NotStarted<Req> {
    pub(super) saturated: bool,
    pub(super) req: Req,
}

/// Makes the call of a bound service (`EndpointCall::new`, chosen where its bounds are known).
pub(super) type MakeCall<S, Req> = fn(S, Req) -> EndpointCall<S, Req>;

/// Picks an endpoint of `pool` for `req` under the in-flight limit, counts the request there,
/// binds and calls it.
#[inline]
pub(super) fn start<P, St, Req, Bd>(
    pool: &Pool<P, St>,
    bind: &Bd,
    mut req: Req,
    make_call: MakeCall<Bd::Service, Req>,
) -> Result<Started<Bd::Service, Req>, NotStarted<Req>>
where
    P: Clone,
    St: Strategy,
    Req: RequestHints,
    Bd: Bind<P, Req>,
    Bd::Service: Service<Req>,
{
    let hints = req.hints();
    let record = hints.and_then(|h| h.pick_record());
    let picked = pool.acquire(hints, |candidate, entry| {
        if let Some(record) = record {
            record.set(candidate.id());
        }
        (InFlight::counted(candidate.clone()), entry.clone())
    });
    let record = record.cloned();
    match picked {
        Acquired::Picked((handle, entry)) => {
            let service = bind.bind(entry, &mut req);
            Ok(Started {
                handle,
                call: make_call(service, req),
                record,
            })
        }
        Acquired::Saturated => Err(NotStarted {
            saturated: true,
            req,
        }),
        Acquired::NoEndpoint => Err(NotStarted {
            saturated: false,
            req,
        }),
    }
}

pin_project! {
    /// A request waiting in the pool's queue for an endpoint under its in-flight limit.
    pub(super) struct Queued<P, St: Strategy, Req, Bd>
    where
        Bd: Bind<P, Req>,
        Bd::Service: Service<Req>,
    {
        pool: Pool<P, St>,
        bind: Bd,
        req: Option<Req>,
        make_call: MakeCall<Bd::Service, Req>,
        #[pin]
        wait: SlotWait,
        #[pin]
        timeout: Sleep,
        // Its place in the queue, given back when the request leaves it.
        _slot: QueueSlot,
    }
}

impl<P, St, Req, Bd> Queued<P, St, Req, Bd>
where
    P: Clone,
    St: Strategy,
    Req: RequestHints,
    Bd: Bind<P, Req> + Clone,
    Bd::Service: Service<Req>,
{
    /// Queues `req` if the queue has room; otherwise hands it back.
    pub(super) fn enter(
        pool: &Pool<P, St>,
        bind: &Bd,
        req: Req,
        make_call: MakeCall<Bd::Service, Req>,
    ) -> Result<Pin<Box<Self>>, Req> {
        let (size, timeout) = pool.queue_limits();
        let Some(slot) = QueueSlot::take(pool.shared(), size) else {
            return Err(req);
        };
        Ok(Box::pin(Queued {
            pool: pool.clone(),
            bind: bind.clone(),
            req: Some(req),
            make_call,
            wait: SlotWait::new(pool.shared()),
            timeout: tokio::time::sleep(timeout),
            _slot: slot,
        }))
    }

    /// Ready with the started call once an endpoint takes the request, or with an error when
    /// none may take it any more or the queue timeout runs out.
    pub(super) fn poll_start(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Started<Bd::Service, Req>, Error>> {
        let mut this = self.project();
        loop {
            let req = this.req.take().expect("polled after completion");
            match start(this.pool, this.bind, req, *this.make_call) {
                Ok(started) => return Poll::Ready(Ok(started)),
                Err(NotStarted {
                    saturated: false, ..
                }) => return Poll::Ready(Err(Error::no_endpoint())),
                Err(NotStarted { req, .. }) => *this.req = Some(req),
            }
            if this.wait.as_mut().poll_woken(cx).is_ready() {
                // Woken: a slot freed (and perhaps taken again by now); arm and try again.
                this.wait.as_mut().rearm();
                continue;
            }
            if this.timeout.as_mut().poll(cx).is_ready() {
                tracing::debug!("queue timeout: every endpoint still at its request limit");
                return Poll::Ready(Err(Error::overloaded()));
            }
            return Poll::Pending;
        }
    }
}
