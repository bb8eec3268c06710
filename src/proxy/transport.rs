//! How [`Forward`](super::Forward)'s pools reach a backend: a TCP connection (hyper-util's
//! `HttpConnector`: connect timeout, `TCP_NODELAY`, name resolution for an endpoint named by
//! host), then, with [`Forward::tls`](super::Forward::tls), a TLS handshake over it.
//!
//! The connection is an enum, not a boxed trait object: the plain-TCP path costs no allocation
//! and no dynamic call per read or write.

use std::io;
use std::pin::Pin;
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

/// A connection to a backend.
pub(crate) enum BackendIo {
    Tcp(TcpStream),
    /// Boxed: a TLS stream is over a kilobyte, a TCP stream a few words, and the box is made
    /// once per connection.
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Opens connections to backends for one pool.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    /// Bounds the TLS handshake as `tcp` bounds the TCP connect.
    #[cfg(feature = "tls")]
    connect_timeout: Option<Duration>,
    #[cfg(feature = "tls")]
    tls: Option<super::upstream_tls::TlsConnect>,
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
            #[cfg(feature = "tls")]
            connect_timeout,
            #[cfg(feature = "tls")]
            tls: None,
        }
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
        if self.tls.is_some() {
            return Scheme::HTTPS;
        }
        Scheme::HTTP
    }

    /// A connection to `authority` (the endpoint's address), TLS asking for `host` (the
    /// endpoint's host name) when TLS is on.
    pub(crate) async fn connect(
        &self,
        authority: &Authority,
        #[cfg_attr(not(feature = "tls"), allow(unused_variables))] host: Option<&str>,
    ) -> Result<TokioIo<BackendIo>, ForwardError> {
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
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(feature = "tls")]
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
