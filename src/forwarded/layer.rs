//! Copying the peer address from another server's request extension into [`ClientAddr`].

use std::net::SocketAddr;
use std::task::{Context, Poll};

use tower_layer::Layer;
use tower_service::Service;

use super::ClientAddr;

/// Inserts [`ClientAddr`] into each request from an extension that another server put there,
/// so the proxy's forwarding headers and client-IP keys work behind it.
///
/// lbkit's [`Server`](crate::server::Server) inserts `ClientAddr` itself; this is for the
/// others. With axum served by `into_make_service_with_connect_info::<SocketAddr>()`:
///
/// ```
/// use std::net::SocketAddr;
/// use axum::extract::ConnectInfo;
/// use lbkit::forwarded::ClientAddrLayer;
///
/// let app: axum::Router = axum::Router::new()
///     .layer(ClientAddrLayer::from_extension(|c: &ConnectInfo<SocketAddr>| c.0));
/// ```
///
/// A request that already has a `ClientAddr`, or lacks the extension, is passed on unchanged
/// (and then the proxy treats its client as unknown: it drops the client's forwarding headers).
pub struct ClientAddrLayer<T, F> {
    read: F,
    _extension: std::marker::PhantomData<fn(&T)>,
}

impl<T, F> ClientAddrLayer<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> SocketAddr + Clone,
{
    /// Reads the peer address with `read` from the request extension of type `T`.
    pub fn from_extension(read: F) -> Self {
        ClientAddrLayer {
            read,
            _extension: std::marker::PhantomData,
        }
    }
}

impl<T, F: Clone> Clone for ClientAddrLayer<T, F> {
    fn clone(&self) -> Self {
        ClientAddrLayer {
            read: self.read.clone(),
            _extension: std::marker::PhantomData,
        }
    }
}

impl<T, F> std::fmt::Debug for ClientAddrLayer<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAddrLayer")
            .field("extension", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T, F: Clone> Layer<S> for ClientAddrLayer<T, F> {
    type Service = WithClientAddr<S, T, F>;

    fn layer(&self, inner: S) -> Self::Service {
        WithClientAddr {
            inner,
            read: self.read.clone(),
            _extension: std::marker::PhantomData,
        }
    }
}

/// The service of a [`ClientAddrLayer`].
pub struct WithClientAddr<S, T, F> {
    inner: S,
    read: F,
    _extension: std::marker::PhantomData<fn(&T)>,
}

impl<S: Clone, T, F: Clone> Clone for WithClientAddr<S, T, F> {
    fn clone(&self) -> Self {
        WithClientAddr {
            inner: self.inner.clone(),
            read: self.read.clone(),
            _extension: std::marker::PhantomData,
        }
    }
}

impl<S: std::fmt::Debug, T, F> std::fmt::Debug for WithClientAddr<S, T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithClientAddr")
            .field("inner", &self.inner)
            .field("extension", &std::any::type_name::<T>())
            .finish()
    }
}

impl<S, T, F, B> Service<http::Request<B>> for WithClientAddr<S, T, F>
where
    S: Service<http::Request<B>>,
    T: Send + Sync + 'static,
    F: Fn(&T) -> SocketAddr,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if req.extensions().get::<ClientAddr>().is_none() {
            if let Some(addr) = req.extensions().get::<T>().map(&self.read) {
                req.extensions_mut().insert(ClientAddr(addr));
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[derive(Clone)]
    struct Peer(SocketAddr);

    #[tokio::test]
    async fn copies_the_extension_and_keeps_an_existing_client_addr() {
        let svc = ClientAddrLayer::from_extension(|p: &Peer| p.0).layer(service_fn(
            |req: http::Request<()>| async move {
                Ok::<_, std::convert::Infallible>(ClientAddr::of(&req))
            },
        ));
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut req = http::Request::new(());
        req.extensions_mut().insert(Peer(peer));
        assert_eq!(svc.clone().oneshot(req).await.unwrap(), Some(peer));

        let own: SocketAddr = "198.51.100.1:1".parse().unwrap();
        let mut req = http::Request::new(());
        req.extensions_mut().insert(Peer(peer));
        req.extensions_mut().insert(ClientAddr(own));
        assert_eq!(svc.clone().oneshot(req).await.unwrap(), Some(own));

        let req = http::Request::new(());
        assert_eq!(svc.oneshot(req).await.unwrap(), None);
    }
}
