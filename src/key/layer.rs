use std::task::{Context, Poll};

use http::header::HeaderName;
use tower_layer::Layer;
use tower_service::Service;

use super::Key;
use crate::hints::PickHints;

/// A [`Layer`] that gives each request a hash key for consistent hashing: it extracts a
/// [`Key`] and writes its hash into the request's [`PickHints`].
///
/// With a consistent-hashing strategy ([`Maglev`](crate::strategy::Maglev),
/// [`Ring`](crate::strategy::Ring)) behind it, requests with the same key go to the same
/// endpoint while it is eligible, and only about `1/n` of the keys move when one of `n`
/// endpoints comes or goes: key affinity without cookies. Requests without a key are left
/// alone (those strategies then pick at random). Other strategies ignore the hash.
///
/// ```
/// use lbkit::key::HashKeyLayer;
/// use lbkit::{strategy::Maglev, BalancerLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(HashKeyLayer::header("x-user"))
///     .layer(BalancerLayer::new(["a:80", "b:80", "c:80"], Maglev::new()))
///     .service(service_fn(|req: http::Request<()>| async move {
///         let to = req.extensions().get::<lbkit::balance::Target>().unwrap();
///         Ok::<_, std::convert::Infallible>(http::Response::new(to.endpoint().id().to_string()))
///     }));
/// let ask = |user: &'static str| {
///     let svc = svc.clone();
///     async move {
///         let req = http::Request::builder().header("x-user", user).body(()).unwrap();
///         svc.oneshot(req).await.unwrap().into_body().into_inner().to_string()
///     }
/// };
/// let first = ask("alice").await;
/// for _ in 0..10 {
///     assert_eq!(ask("alice").await, first);
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HashKeyLayer {
    key: Key,
}

impl HashKeyLayer {
    /// Hashes requests on `key`.
    pub fn new(key: Key) -> Self {
        HashKeyLayer { key }
    }

    /// Hashes requests on the value of header `name` (see [`Key::header`]).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name.
    pub fn header<N>(name: N) -> Self
    where
        N: TryInto<HeaderName>,
        N::Error: std::fmt::Debug,
    {
        HashKeyLayer::new(Key::header(name))
    }

    /// The key requests are hashed on.
    pub fn key(&self) -> &Key {
        &self.key
    }
}

impl<S> Layer<S> for HashKeyLayer {
    type Service = HashKey<S>;

    fn layer(&self, inner: S) -> HashKey<S> {
        HashKey {
            inner,
            key: self.key.clone(),
        }
    }
}

/// The service of [`HashKeyLayer`]: sets each request's hash key, then calls the inner
/// service.
#[derive(Clone, Debug)]
pub struct HashKey<S> {
    inner: S,
    key: Key,
}

impl<S> HashKey<S> {
    /// Wraps `inner`, hashing requests on `key`.
    pub fn new(inner: S, key: Key) -> Self {
        HashKey { inner, key }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> Service<http::Request<B>> for HashKey<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if let Some(hash) = self.key.extract(&req) {
            PickHints::of_mut(&mut req).set_hash(hash);
        }
        self.inner.call(req)
    }
}
