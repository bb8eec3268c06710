//! [`Forward`](super::Forward)'s HTTP/2 connections to the backends: one multiplexed h2c
//! connection per backend over hyper's `client::conn::http2`, opened once however many
//! requests arrive while it is being opened, and opened again when the backend closes it.
//!
//! Why not hyper-util's client, which `Forward` used for HTTP/2 before: it takes the backend
//! from the request's URI, and so sends the backend's address as `:authority` beside the
//! client's `Host`. An intermediary that turns an HTTP/1.1 request into an HTTP/2 one sets
//! `:authority` from `Host` and sends no `Host` (RFC 9113 §8.3.1); strict servers (nginx
//! among them) refuse the pair with 400. Here the connection is chosen by the endpoint, and
//! the request's URI only says what the client asked.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::future::{FutureExt, Shared};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::TokioExecutor;

use super::http1_pool::Fnv;
use super::transport::Connector;
use super::ForwardError;
use crate::balance::Target;
use crate::error::BoxError;

/// A connection being opened, awaited by every request that needs it meanwhile.
type Connecting<B> =
    Shared<Pin<Box<dyn Future<Output = Result<SendRequest<B>, Arc<ForwardError>>> + Send>>>;

enum Conn<B> {
    Open(SendRequest<B>),
    Connecting(Connecting<B>),
}

/// One HTTP/2 connection per backend.
pub(crate) struct Http2Pool<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Http2Pool<B> {
    fn clone(&self) -> Self {
        Http2Pool {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B> {
    connector: Connector,
    /// Keyed by the authority's text (see `http1_pool`'s map).
    conns: Mutex<HashMap<Box<str>, Conn<B>, BuildHasherDefault<Fnv>>>,
}

impl<B> Http2Pool<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(connector: Connector) -> Self {
        Http2Pool {
            inner: Arc::new(Inner {
                connector,
                conns: Mutex::new(HashMap::default()),
            }),
        }
    }

    /// Sends `req` (its URI absolute, naming what the client asked for) to `backend` (the
    /// connector may need its `target`).
    pub(crate) fn send(
        &self,
        backend: Authority,
        target: Option<Target>,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, ForwardError>> + Send + 'static {
        let pool = self.clone();
        async move {
            let mut retried = false;
            loop {
                let (mut tx, fresh) = pool.sender(&backend, &target).await?;
                if tx.ready().await.is_err() {
                    pool.forget(&backend, &tx);
                    if fresh || retried {
                        return Err(ForwardError::unsent("backend connection closed".into()));
                    }
                    retried = true;
                    continue;
                }
                match tx.try_send_request(req).await {
                    Ok(res) => return Ok(res),
                    Err(mut e) => match e.take_message() {
                        // Refused before it was sent (a connection going away): once more on
                        // a new connection.
                        Some(unsent) if !retried => {
                            pool.forget(&backend, &tx);
                            retried = true;
                            req = unsent;
                        }
                        Some(_) => return Err(ForwardError::unsent(e.into_error().into())),
                        None => return Err(ForwardError::from_hyper(e.into_error())),
                    },
                }
            }
        }
    }

    /// The backend's connection, opened if there is none (or it closed); whether it is new.
    async fn sender(
        &self,
        backend: &Authority,
        target: &Option<Target>,
    ) -> Result<(SendRequest<B>, bool), ForwardError> {
        let connecting = {
            let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
            match conns.get(backend.as_str()) {
                Some(Conn::Open(tx)) if !tx.is_closed() => return Ok((tx.clone(), false)),
                Some(Conn::Connecting(c)) => c.clone(),
                _ => {
                    let c = self
                        .connect(backend.clone(), target.clone())
                        .boxed()
                        .shared();
                    conns.insert(backend.as_str().into(), Conn::Connecting(c.clone()));
                    c
                }
            }
        };
        let result = connecting.await;
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(tx) => {
                if matches!(conns.get(backend.as_str()), Some(Conn::Connecting(_))) {
                    conns.insert(backend.as_str().into(), Conn::Open(tx.clone()));
                }
                Ok((tx, true))
            }
            Err(e) => {
                if matches!(conns.get(backend.as_str()), Some(Conn::Connecting(_))) {
                    conns.remove(backend.as_str());
                }
                Err(e.same_kind())
            }
        }
    }

    /// Drops `tx`'s connection from the pool if it is still the backend's.
    fn forget(&self, backend: &Authority, tx: &SendRequest<B>) {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Conn::Open(open)) = conns.get(backend.as_str()) {
            if open.is_closed() || tx.is_closed() {
                conns.remove(backend.as_str());
            }
        }
    }

    fn connect(
        &self,
        backend: Authority,
        target: Option<Target>,
    ) -> impl Future<Output = Result<SendRequest<B>, Arc<ForwardError>>> + Send + 'static {
        let connector = self.inner.connector.clone();
        let inner = Arc::downgrade(&self.inner);
        async move {
            let io = connector
                .connect(&backend, target.as_ref())
                .await
                .map_err(Arc::new)?;
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake::<_, B>(io)
                .await
                .map_err(|e| Arc::new(ForwardError::connect(e.into())))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %backend, "backend HTTP/2 connection ended");
                }
                // Gone: the next request opens another.
                if let Some(inner) = inner.upgrade() {
                    let mut conns = inner.conns.lock().unwrap_or_else(|e| e.into_inner());
                    if matches!(conns.get(backend.as_str()), Some(Conn::Open(tx)) if tx.is_closed())
                    {
                        conns.remove(backend.as_str());
                    }
                }
            });
            Ok(tx)
        }
    }
}
