//! Routing requests to different services (each usually its own balancer stack over its own
//! pool) by host, path prefix, method, header or cookie, with weighted splits for canaries:
//! the L7 part of "send `/api` to one fleet and `/static` to another" for users who do not
//! route with axum.
//!
//! [`Routes`] tries its routes in the order they were added and sends the request to the first
//! whose [`Match`] holds; a [`split`](Routes::split) route spreads what it matches over several
//! services by weight. Without a match the request goes to the [`fallback`](Routes::fallback),
//! or is answered `404 Not Found`.
//!
//! ```
//! use lbkit::route::{Match, Routes};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! fn named(name: &'static str) -> impl tower::Service<
//!     http::Request<String>, Response = http::Response<String>, Error = std::convert::Infallible,
//!     Future = impl Send> + Clone + Send + 'static {
//!     service_fn(move |_req: http::Request<String>| async move {
//!         Ok(http::Response::new(name.to_string()))
//!     })
//! }
//! let routes = Routes::new()
//!     .route(Match::any().host("api.example.com"), named("api"))
//!     .route(Match::any().path_prefix("/static"), named("static"))
//!     // 9 in 10 requests to the stable fleet, 1 in 10 to the canary.
//!     .split(Match::any(), [(9, named("stable")), (1, named("canary"))]);
//!
//! let req = http::Request::get("/static/app.js").body(String::new()).unwrap();
//! let res = routes.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.body().get_ref().unwrap(), "static");
//! # }
//! ```

mod matcher;

pub use matcher::Match;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::util::{BoxCloneSyncService, Oneshot, ServiceExt};
use tower_service::Service;

use crate::hints::PickHints;

type Target<B, RB, E> = BoxCloneSyncService<Request<B>, Response<RB>, E>;
/// A split's services with their weights.
type Weighted<B, RB, E> = Arc<[(u64, Target<B, RB, E>)]>;
/// The routes in order.
type Table<B, RB, E> = Arc<[(Match, Dest<B, RB, E>)]>;

/// Where a route sends what it matches: one service, or several by weight.
enum Dest<B, RB, E> {
    One(Target<B, RB, E>),
    Split(Split<B, RB, E>),
}

impl<B, RB, E> Clone for Dest<B, RB, E> {
    fn clone(&self) -> Self {
        match self {
            Dest::One(s) => Dest::One(s.clone()),
            Dest::Split(s) => Dest::Split(s.clone()),
        }
    }
}

/// Services chosen by weight: request `i` goes to the service at slot `(i * stride) % total`
/// of the cumulative weights (`stride` coprime with `total`), so every `total` requests give each
/// service exactly its weight, interleaved; a request with a hash key (a
/// [`HashKeyLayer`](crate::key::HashKeyLayer) above) goes by its key, so one client stays on
/// one side of a canary.
struct Split<B, RB, E> {
    services: Weighted<B, RB, E>,
    total: u64,
    stride: u64,
    counter: Arc<AtomicU64>,
}

impl<B, RB, E> Clone for Split<B, RB, E> {
    fn clone(&self) -> Self {
        Split {
            services: self.services.clone(),
            total: self.total,
            stride: self.stride,
            counter: self.counter.clone(),
        }
    }
}

impl<B, RB, E> Split<B, RB, E> {
    fn pick(&self, hash: Option<u64>) -> &Target<B, RB, E> {
        let slot = match hash {
            Some(h) => h % self.total,
            None => {
                let i = self.counter.fetch_add(1, Ordering::Relaxed) % self.total;
                // `i * stride` fits: both are below `total`, at most 2^32 (weights are u32).
                i * self.stride % self.total
            }
        };
        let mut acc = 0;
        for (weight, service) in self.services.iter() {
            acc += weight;
            if slot < acc {
                return service;
            }
        }
        &self.services[self.services.len() - 1].1
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A tower service that routes each request to the first route whose [`Match`] holds (see the
/// [module docs](self)).
///
/// Routes hold boxed, cloneable services (`tower::util::BoxCloneSyncService`): each route's
/// stack may differ in type, but all take `Request<B>` and answer `Response<RB>` with the same
/// error type `E` (an [`ErrorResponseLayer`](crate::proxy::ErrorResponseLayer) makes it
/// `Infallible`). A route's service is cloned per request and driven to readiness then called
/// (as `ServiceExt::oneshot` does), so `Routes` itself is always ready.
pub struct Routes<B, RB, E> {
    routes: Table<B, RB, E>,
    fallback: Option<Target<B, RB, E>>,
}

impl<B, RB, E> Clone for Routes<B, RB, E> {
    fn clone(&self) -> Self {
        Routes {
            routes: self.routes.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

impl<B, RB, E> std::fmt::Debug for Routes<B, RB, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (m, dest) in self.routes.iter() {
            match dest {
                Dest::One(_) => list.entry(m),
                Dest::Split(s) => list.entry(&(m, s.services.len())),
            };
        }
        list.finish()
    }
}

impl<B, RB, E> Default for Routes<B, RB, E> {
    fn default() -> Self {
        Routes {
            routes: Arc::from(Vec::new()),
            fallback: None,
        }
    }
}

impl<B, RB, E> Routes<B, RB, E> {
    /// No routes: every request gets `404 Not Found` until routes are added.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(self, m: Match, dest: Dest<B, RB, E>) -> Self {
        let mut routes: Vec<(Match, Dest<B, RB, E>)> = self.routes.iter().cloned().collect();
        routes.push((m, dest));
        Routes {
            routes: routes.into(),
            fallback: self.fallback,
        }
    }

    /// Adds a route: requests that match `m` (and no earlier route) go to `service`.
    pub fn route<S>(self, m: Match, service: S) -> Self
    where
        S: Service<Request<B>, Response = Response<RB>, Error = E> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.push(m, Dest::One(BoxCloneSyncService::new(service)))
    }

    /// Adds a weighted route: requests that match `m` go to one of `services`, each getting its
    /// weight's share (a 95/5 canary: `[(95, stable), (5, canary)]`). Shares are exact over
    /// every run of requests as long as the weights' sum, interleaved; requests that carry a
    /// hash key (from a [`HashKeyLayer`](crate::key::HashKeyLayer) above) are split by key
    /// instead, so a client stays on one side. Zero weights take no traffic; with no positive
    /// weight the route is skipped.
    pub fn split<S>(self, m: Match, services: impl IntoIterator<Item = (u32, S)>) -> Self
    where
        S: Service<Request<B>, Response = Response<RB>, Error = E> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        let services: Vec<(u64, Target<B, RB, E>)> = services
            .into_iter()
            .filter(|(w, _)| *w > 0)
            .map(|(w, s)| (u64::from(w), BoxCloneSyncService::new(s)))
            .collect();
        let total: u64 = services.iter().map(|(w, _)| w).sum();
        if total == 0 {
            return self;
        }
        // A stride coprime with the total visits every slot once per `total` requests, and
        // about half the total apart spreads the services' slots evenly.
        let stride = (total / 2 + 1..=total)
            .find(|s| gcd(*s, total) == 1)
            .unwrap_or(1);
        self.push(
            m,
            Dest::Split(Split {
                services: services.into(),
                total,
                stride,
                counter: Arc::new(AtomicU64::new(0)),
            }),
        )
    }

    /// Where requests that match no route go (default: answered `404 Not Found` with an empty
    /// body).
    pub fn fallback<S>(mut self, service: S) -> Self
    where
        S: Service<Request<B>, Response = Response<RB>, Error = E> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.fallback = Some(BoxCloneSyncService::new(service));
        self
    }
}

impl<B, RB, E> Service<Request<B>> for Routes<B, RB, E>
where
    B: 'static,
    RB: 'static,
    E: 'static,
{
    type Response = Response<RouteBody<RB>>;
    type Error = E;
    type Future = RouteFuture<B, RB, E>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let found = self
            .routes
            .iter()
            .find(|(m, _)| m.matches(&req))
            .map(|(_, dest)| match dest {
                Dest::One(s) => s.clone(),
                Dest::Split(split) => {
                    let hash = req.extensions().get::<PickHints>().and_then(|h| h.hash());
                    split.pick(hash).clone()
                }
            })
            .or_else(|| self.fallback.clone());
        match found {
            Some(service) => RouteFuture {
                state: FutureState::Routed {
                    call: service.oneshot(req),
                },
            },
            None => RouteFuture {
                state: FutureState::NotFound,
            },
        }
    }
}

pin_project! {
    /// The response future of [`Routes`].
    pub struct RouteFuture<B, RB, E> {
        #[pin]
        state: FutureState<B, RB, E>,
    }
}

pin_project! {
    #[project = FutureStateProj]
    enum FutureState<B, RB, E> {
        Routed {
            #[pin]
            call: Oneshot<Target<B, RB, E>, Request<B>>,
        },
        NotFound,
    }
}

impl<B, RB, E> std::fmt::Debug for RouteFuture<B, RB, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.state {
            FutureState::Routed { .. } => f.write_str("RouteFuture::Routed"),
            FutureState::NotFound => f.write_str("RouteFuture::NotFound"),
        }
    }
}

impl<B, RB, E> std::future::Future for RouteFuture<B, RB, E> {
    type Output = Result<Response<RouteBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FutureStateProj::Routed { call } => call.poll(cx).map_ok(|res| {
                res.map(|inner| RouteBody {
                    state: BodyState::Routed { inner },
                })
            }),
            FutureStateProj::NotFound => {
                let mut res = Response::new(RouteBody {
                    state: BodyState::Empty,
                });
                *res.status_mut() = StatusCode::NOT_FOUND;
                Poll::Ready(Ok(res))
            }
        }
    }
}

pin_project! {
    /// The response body of [`Routes`]: the route's own body, or the empty body of a
    /// `404 Not Found` (no allocation, no boxing).
    #[derive(Debug)]
    pub struct RouteBody<B> {
        #[pin]
        state: BodyState<B>,
    }
}

pin_project! {
    #[project = BodyStateProj]
    #[derive(Debug)]
    enum BodyState<B> {
        Routed {
            #[pin]
            inner: B,
        },
        Empty,
    }
}

impl<B> RouteBody<B> {
    /// The route's body, if the response came from a route.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.state {
            BodyState::Routed { inner } => Some(inner),
            BodyState::Empty => None,
        }
    }
}

impl<B: Body> Body for RouteBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().state.project() {
            BodyStateProj::Routed { inner } => inner.poll_frame(cx),
            BodyStateProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Routed { inner } => inner.is_end_stream(),
            BodyState::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Routed { inner } => inner.size_hint(),
            BodyState::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::service_fn;

    fn named(
        name: &'static str,
    ) -> impl Service<
        Request<()>,
        Response = Response<&'static str>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        service_fn(move |_req: Request<()>| async move { Ok(Response::new(name)) })
    }

    async fn to(routes: &Routes<(), &'static str, Infallible>, req: Request<()>) -> String {
        let res = routes.clone().oneshot(req).await.unwrap();
        match res.body().get_ref() {
            Some(name) => name.to_string(),
            None => res.status().as_u16().to_string(),
        }
    }

    #[tokio::test]
    async fn first_match_wins_and_nothing_matched_is_404_or_the_fallback() {
        let routes = Routes::new()
            .route(
                Match::any().path_prefix("/api").method(http::Method::POST),
                named("api-post"),
            )
            .route(Match::any().path_prefix("/api"), named("api"))
            .route(Match::any().header("x-beta", "1"), named("beta"));
        let get = |uri: &str| Request::get(uri).body(()).unwrap();
        assert_eq!(to(&routes, get("/api/x")).await, "api");
        assert_eq!(
            to(&routes, Request::post("/api").body(()).unwrap()).await,
            "api-post"
        );
        assert_eq!(to(&routes, get("/apix")).await, "404");
        let beta = Request::get("/").header("x-beta", "1").body(()).unwrap();
        assert_eq!(to(&routes, beta).await, "beta");
        let routes = routes.fallback(named("default"));
        assert_eq!(to(&routes, get("/other")).await, "default");
    }

    #[tokio::test]
    async fn a_split_gives_exact_interleaved_shares_and_keeps_a_key_on_one_side() {
        let routes = Routes::new().split(
            Match::any(),
            [(3, named("a")), (1, named("b")), (0, named("never"))],
        );
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(to(&routes, Request::new(())).await);
        }
        let a = seen.iter().filter(|s| *s == "a").count();
        assert_eq!((a, seen.len() - a), (6, 2), "{seen:?}");
        assert_ne!(
            seen[..4].iter().filter(|s| *s == "b").count(),
            0,
            "{seen:?}"
        );
        // With a hash key: the same side every time.
        let keyed = || {
            let mut req = Request::new(());
            PickHints::of_mut(&mut req).set_hash(12345);
            req
        };
        let first = to(&routes, keyed()).await;
        for _ in 0..10 {
            assert_eq!(to(&routes, keyed()).await, first);
        }
    }
}
