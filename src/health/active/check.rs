use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tower::util::ServiceExt;
use tower_service::Service;

use super::CheckError;
use crate::endpoint::Endpoint;
use crate::error::BoxError;

/// The future of one health check.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), CheckError>> + Send + 'static>>;

/// One way to probe an endpoint: `Ok` means healthy.
///
/// The [`HealthChecker`](super::HealthChecker) runs it once per interval per endpoint and
/// bounds it with its timeout, so an implementation need not time itself out. Built in:
/// [`TcpCheck`], `HttpCheck` (feature `http-proxy`), and adapters for
/// closures ([`check_fn`]) and tower services ([`check_service`]).
pub trait HealthCheck: Send + Sync + 'static {
    /// Starts one check of `endpoint`.
    fn check(&self, endpoint: &Endpoint) -> CheckFuture;
}

impl<C: HealthCheck + ?Sized> HealthCheck for Arc<C> {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        (**self).check(endpoint)
    }
}

impl<C: HealthCheck + ?Sized> HealthCheck for Box<C> {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        (**self).check(endpoint)
    }
}

/// The address to probe: the endpoint's socket address, with its port replaced by `port`.
pub(super) fn target(endpoint: &Endpoint, port: Option<u16>) -> Result<SocketAddr, CheckError> {
    let mut addr = endpoint.socket_addr().ok_or_else(|| {
        CheckError::failed(format!(
            "endpoint {} has no socket address to check",
            endpoint.id()
        ))
    })?;
    if let Some(port) = port {
        addr.set_port(port);
    }
    Ok(addr)
}

/// Healthy when a TCP connection to the endpoint's address opens (HAProxy's default check).
///
/// The connection is closed at once. Catches a stopped process or a dead host; not a process
/// that accepts connections but cannot serve (use an `HttpCheck` for that).
#[derive(Clone, Debug, Default)]
pub struct TcpCheck {
    port: Option<u16>,
}

impl TcpCheck {
    /// A check that connects to the endpoint's own address.
    pub fn new() -> Self {
        TcpCheck::default()
    }

    /// Connects to `port` on the endpoint's host instead of its own port (for a separate
    /// health port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }
}

impl HealthCheck for TcpCheck {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let addr = target(endpoint, self.port);
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr?)
                .await
                .map_err(CheckError::refused)?;
            drop(stream);
            Ok(())
        })
    }
}

/// A check made from a closure; see [`check_fn`].
#[derive(Clone)]
pub struct FnCheck<F> {
    f: F,
}

impl<F> fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCheck").finish_non_exhaustive()
    }
}

/// A check from any async function of the endpoint: `Ok(())` means healthy.
///
/// Errors become [`CheckError`]s with [`CheckError::from_error`]: return a `CheckError` to
/// choose the kind.
///
/// ```
/// use lbkit::{Endpoint, health::{check_fn, HealthChecker}};
///
/// let checker = HealthChecker::new(check_fn(|ep: Endpoint| async move {
///     if ep.id().as_str().starts_with("db-") {
///         Ok(())
///     } else {
///         Err(format!("{} is not a database", ep.id()))
///     }
/// }));
/// # drop(checker);
/// ```
pub fn check_fn<F, Fut, E>(f: F) -> FnCheck<F>
where
    F: Fn(Endpoint) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    FnCheck { f }
}

impl<F, Fut, E> HealthCheck for FnCheck<F>
where
    F: Fn(Endpoint) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let fut = (self.f)(endpoint.clone());
        Box::pin(async move { fut.await.map_err(|e| CheckError::from_error(e.into())) })
    }
}

/// A check made from a tower service; see [`check_service`].
pub struct ServiceCheck<S> {
    service: Mutex<S>,
}

impl<S> fmt::Debug for ServiceCheck<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceCheck").finish_non_exhaustive()
    }
}

/// A check from a tower `Service` called with the endpoint: any response means healthy, an
/// error means unhealthy (converted with [`CheckError::from_error`]).
///
/// Each check calls a clone of `service` once it is ready.
pub fn check_service<S>(service: S) -> ServiceCheck<S>
where
    S: Service<Endpoint> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    ServiceCheck {
        service: Mutex::new(service),
    }
}

impl<S> HealthCheck for ServiceCheck<S>
where
    S: Service<Endpoint> + Clone + Send + 'static,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let service = self
            .service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let call = service.oneshot(endpoint.clone());
        Box::pin(async move {
            call.await
                .map(drop)
                .map_err(|e| CheckError::from_error(e.into()))
        })
    }
}
