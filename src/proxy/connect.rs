use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use crate::error::BoxError;

/// A connector that opens at most `max` connections to each host (`host:port` of the URI) at
/// once: a connection holds a permit of its host's semaphore until it is closed, and a connect
/// beyond the cap waits for one.
///
/// hyper-util's legacy client caps its *idle* connections per host
/// (`pool_max_idle_per_host`) but opens a new connection whenever a request finds none idle,
/// so a burst of requests (a client opening and resetting HTTP/2 streams, say) becomes a burst
/// of backend connections. Wrapped in this connector, the client opens no more than `max` per
/// backend (as HAProxy's `maxconn` per server and Envoy's per-host `max_connections`): a
/// request that needs another connection waits for an idle one or for a slot, and a request
/// given up on while it waits leaves the queue without connecting. For a hyper-util client of
/// your own (a client-side balancer); [`Forward`](super::Forward) caps its connections in its
/// own pool (see
/// [`max_connections_per_endpoint`](super::Forward::max_connections_per_endpoint)).
///
/// The semaphores live in a map taken under a lock once per new connection, never per
/// request; a host's entry goes when its last connection does and another host is added.
pub struct LimitedConnector<C> {
    inner: C,
    max: usize,
    hosts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl<C: Clone> Clone for LimitedConnector<C> {
    fn clone(&self) -> Self {
        LimitedConnector {
            inner: self.inner.clone(),
            max: self.max,
            hosts: self.hosts.clone(),
        }
    }
}

impl<C> std::fmt::Debug for LimitedConnector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedConnector")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl<C> LimitedConnector<C> {
    /// Wraps `inner` (such as hyper-util's `HttpConnector`), allowing `max` open connections
    /// per host (at least 1).
    pub fn new(inner: C, max: usize) -> Self {
        LimitedConnector {
            inner,
            max: max.max(1),
            hosts: Arc::default(),
        }
    }

    /// The most connections open to one host.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The semaphore of the host of `uri`, made on first use.
    fn semaphore(&self, uri: &Uri) -> Arc<Semaphore> {
        let host = uri.authority().map_or("", |a| a.as_str());
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sem) = hosts.get(host) {
            return sem.clone();
        }
        // A new host: first forget those with no connection left (nothing else holds their
        // semaphore), so the map follows the endpoints as they come and go.
        hosts.retain(|_, sem| Arc::strong_count(sem) > 1);
        let sem = Arc::new(Semaphore::new(self.max));
        hosts.insert(host.to_owned(), sem.clone());
        sem
    }
}

type ConnectFuture<T> =
    Pin<Box<dyn Future<Output = Result<LimitedConnection<T>, BoxError>> + Send>>;

impl<C> Service<Uri> for LimitedConnector<C>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Response: Send,
    C::Error: Into<BoxError>,
{
    type Response = LimitedConnection<C::Response>;
    type Error = BoxError;
    type Future = ConnectFuture<C::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let sem = self.semaphore(&uri);
        // The ready inner connector goes with this call; its clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let permit = sem
                .acquire_owned()
                .await
                .map_err(|_| BoxError::from("connection limit closed"))?;
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(LimitedConnection {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection made by a [`LimitedConnector`]: the inner connection and its host's permit,
/// released when the connection is dropped (closed).
#[derive(Debug)]
pub struct LimitedConnection<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connection> Connection for LimitedConnection<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: Read + Unpin> Read for LimitedConnection<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for LimitedConnection<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_without_connections_are_forgotten() {
        let c = LimitedConnector::new((), 2);
        let a = c.semaphore(&Uri::from_static("http://a:1/"));
        assert!(Arc::ptr_eq(
            &a,
            &c.semaphore(&Uri::from_static("http://a:1/x"))
        ));
        drop(a);
        let _b = c.semaphore(&Uri::from_static("http://b:1/"));
        let hosts = c.hosts.lock().unwrap();
        assert_eq!(hosts.len(), 1, "a had no connection left");
        assert!(hosts.contains_key("b:1"));
    }
}
