//! How [`Forward`](super::Forward)'s pools reach a backend: a TCP connection (hyper-util's
//! `HttpConnector`: connect timeout, `TCP_NODELAY`, name resolution for an endpoint named by
//! host), then, with [`Forward::tls`](super::Forward::tls), a TLS handshake over it; or the
//! user's own connector ([`Forward::connect_with`](super::Forward::connect_with)).
//!
//! The connection is an enum, not a boxed trait object: the plain-TCP path costs no allocation
//! and no dynamic call per read or write.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

use super::ForwardError;
use crate::balance::Target;

/// A connection to a backend.
pub(crate) enum BackendIo {
    Tcp(TcpStream),
    /// Boxed: a TLS stream is over a kilobyte, a TCP stream a few words, and the box is made
    /// once per connection.
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// From the user's connector.
    Custom(Box<dyn Stream>),
}

/// What a connector of the user's may give: any tokio byte stream.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

type ConnectFn = dyn Fn(&Target) -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>
    + Send
    + Sync;

/// A connector of the user's (see [`Forward::connect_with`](super::Forward::connect_with)).
#[derive(Clone)]
pub(crate) struct CustomConnect(Arc<ConnectFn>);

impl CustomConnect {
    pub(crate) fn new<F, Fut, S>(connect: F) -> Self
    where
        F: Fn(&Target) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        CustomConnect(Arc::new(move |target| {
            let connecting = connect(target);
            Box::pin(async move { Ok(Box::new(connecting.await?) as Box<dyn Stream>) })
        }))
    }
}

impl fmt::Debug for CustomConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CustomConnect")
    }
}

/// Opens connections to backends for one pool.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    /// Bounds the TLS handshake and a custom connect as `tcp` bounds the TCP connect.
    connect_timeout: Option<Duration>,
    #[cfg(feature = "tls")]
    tls: Option<super::upstream_tls::TlsConnect>,
    custom: Option<CustomConnect>,
}

impl Connector {
    /// Plain TCP, each connect given up after `connect_timeout`.
    pub(crate) fn tcp(connect_timeout: Option<Duration>) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(true);
        tcp.set_connect_timeout(connect_timeout);
        Connector {
            tcp,
            connect_timeout,
            #[cfg(feature = "tls")]
            tls: None,
            custom: None,
        }
    }

    /// The user's connector instead of TCP (and TLS).
    pub(crate) fn with_custom(mut self, custom: CustomConnect) -> Self {
        self.custom = Some(custom);
        self
    }

    /// Whether connecting needs the request's [`Target`] (a custom connector, or TLS for the
    /// endpoint's host name).
    pub(crate) fn needs_target(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return true;
        }
        self.custom.is_some()
    }

    /// TLS over TCP with `tls`.
    #[cfg(feature = "tls")]
    pub(crate) fn with_tls(mut self, tls: super::upstream_tls::TlsConnect) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The scheme of the requests sent over these connections (HTTP/2's `:scheme`).
    pub(crate) fn scheme(&self) -> Scheme {
        #[cfg(feature = "tls")]
        if self.tls.is_some() && self.custom.is_none() {
            return Scheme::HTTPS;
        }
        Scheme::HTTP
    }

    /// A connection to `authority` (the endpoint's address), TLS asking for the host name of
    /// the `target`'s endpoint when TLS is on; or the custom connector's connection to
    /// `target`.
    pub(crate) async fn connect(
        &self,
        authority: &Authority,
        target: Option<&Target>,
    ) -> Result<TokioIo<BackendIo>, ForwardError> {
        if let Some(custom) = &self.custom {
            let Some(target) = target else {
                return Err(ForwardError::no_target());
            };
            let connecting = (custom.0)(target);
            let io = match self.connect_timeout {
                None => connecting.await,
                Some(limit) => tokio::time::timeout(limit, connecting)
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            };
            let io = io.map_err(|e| ForwardError::connect(e.into()))?;
            return Ok(TokioIo::new(BackendIo::Custom(io)));
        }
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| ForwardError::other(e.into()))?;
        let tcp = self
            .tcp
            .clone()
            .call(uri)
            .await
            .map_err(|e| ForwardError::connect(e.into()))?
            .into_inner();
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let host = target.and_then(|t| t.endpoint().host());
            let handshake = tls.handshake(tcp, authority, host);
            let stream = match self.connect_timeout {
                None => handshake.await?,
                Some(limit) => tokio::time::timeout(limit, handshake)
                    .await
                    .map_err(|_| ForwardError::connect("TLS handshake timed out".into()))??,
            };
            return Ok(TokioIo::new(BackendIo::Tls(Box::new(stream))));
        }
        Ok(TokioIo::new(BackendIo::Tcp(tcp)))
    }
}

impl AsyncRead for BackendIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            BackendIo::Custom(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            BackendIo::Custom(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            BackendIo::Custom(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => s.is_write_vectored(),
            BackendIo::Custom(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            BackendIo::Custom(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            BackendIo::Custom(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
