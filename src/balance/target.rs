//! Where the balancer routed a request ([`Target`]), and a client wrapper that sends it there
//! ([`TargetUri`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::uri::{Authority, Scheme};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::endpoint::Endpoint;
use crate::error::BoxError;

/// The endpoint a request was routed to, in the request's extensions.
///
/// A [`BalancerLayer`](super::BalancerLayer) inserts it, so that one inner service (a forwarding proxy, a client) can
/// serve every endpoint by reading where to send each request.
#[derive(Clone, Debug)]
pub struct Target(Arc<TargetInner>);

#[derive(Debug)]
struct TargetInner {
    endpoint: Endpoint,
    authority: Option<http::uri::Authority>,
    socket_addr: Option<std::net::SocketAddr>,
}

impl Target {
    /// A target for `endpoint`.
    pub fn new(endpoint: &Endpoint) -> Self {
        let authority = match endpoint.socket_addr() {
            Some(addr) => http::uri::Authority::try_from(addr.to_string()).ok(),
            None => http::uri::Authority::try_from(endpoint.id().as_str()).ok(),
        };
        let socket_addr = endpoint
            .socket_addr()
            .or_else(|| endpoint.id().as_str().parse().ok());
        Target(Arc::new(TargetInner {
            endpoint: endpoint.clone(),
            authority,
            socket_addr,
        }))
    }

    /// The endpoint to send the request to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }

    /// The endpoint's socket address, when its address or id is one (`10.0.0.1:80`,
    /// `[::1]:443`): where an L4 proxy ([`TcpProxy`](crate::proxy::TcpProxy)) connects.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.0.socket_addr
    }

    /// The endpoint as a URI authority (`host:port`): its socket address, or else its id when
    /// that is a valid authority. Computed once per endpoint, so forwarding does not format it
    /// per request.
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.0.authority.as_ref()
    }
}

/// Sends each request where the balancer routed it: replaces the request URI's scheme and
/// authority with its [`Target`]'s (path and query are kept) and calls the inner client.
///
/// This turns a client that sends to the URI it is given, such as hyper-util's
/// `client::legacy::Client` (with your own connector, TLS included), into the inner service of
/// a [`BalancerLayer`](super::BalancerLayer): client-side balancing with no hand-written
/// `service_fn`. Its errors are boxed; a request without a [`Target`] (no balancer in front) or
/// whose endpoint is no valid authority fails without reaching the client.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Empty;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use lbkit::balance::TargetUri;
/// use lbkit::{strategy::PowerOfTwoChoices, BalancerLayer};
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
/// let balanced = ServiceBuilder::new()
///     .layer(BalancerLayer::new(["10.0.0.1:80", "10.0.0.2:80"], PowerOfTwoChoices::new()))
///     .service(TargetUri::new(client));
/// // `balanced.oneshot(Request::get("/items").body(Empty::new())?)` asks one of the two hosts
/// // for `/items`; clones of `balanced` can be spawned.
/// # let _ = balanced;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct TargetUri<S> {
    inner: S,
    scheme: Scheme,
}

impl<S> TargetUri<S> {
    /// Sends with `inner` over plain `http`.
    pub fn new(inner: S) -> Self {
        TargetUri {
            inner,
            scheme: Scheme::HTTP,
        }
    }

    /// Sends with the `https` scheme (give the inner client a TLS connector).
    pub fn https(mut self) -> Self {
        self.scheme = Scheme::HTTPS;
        self
    }
}

impl<S, B> Service<http::Request<B>> for TargetUri<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = TargetUriFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let authority = req
            .extensions()
            .get::<Target>()
            .map(|t| t.authority().cloned());
        let authority: Authority = match authority {
            Some(Some(a)) => a,
            Some(None) => return TargetUriFuture::failed("the endpoint is no valid URI authority"),
            None => {
                return TargetUriFuture::failed(
                    "no Target on the request: put a BalancerLayer in front",
                )
            }
        };
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(authority);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        match http::Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return TargetUriFuture::failed(e),
        }
        TargetUriFuture {
            state: TargetUriState::Called {
                fut: self.inner.call(req),
            },
            into_box: Into::into,
        }
    }
}

pin_project! {
    /// The response future of [`TargetUri`].
    pub struct TargetUriFuture<F, E> {
        #[pin]
        state: TargetUriState<F>,
        // Chosen where `E: Into<BoxError>` is known, so that the `Future` impl needs no bound
        // on `E` (see `EndpointCall`).
        into_box: fn(E) -> BoxError,
    }
}

pin_project! {
    #[project = TargetUriProj]
    enum TargetUriState<F> {
        Failed { error: Option<BoxError> },
        Called { #[pin] fut: F },
    }
}

impl<F, E> TargetUriFuture<F, E> {
    fn failed(error: impl Into<BoxError>) -> Self
    where
        E: Into<BoxError>,
    {
        TargetUriFuture {
            state: TargetUriState::Failed {
                error: Some(error.into()),
            },
            into_box: Into::into,
        }
    }
}

impl<F, E> std::fmt::Debug for TargetUriFuture<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetUriFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for TargetUriFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            TargetUriProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
            TargetUriProj::Called { fut } => {
                Poll::Ready(ready!(fut.poll(cx)).map_err(*this.into_box))
            }
        }
    }
}
