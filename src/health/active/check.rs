use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::CheckError;
use crate::endpoint::Endpoint;
use crate::error::BoxError;

/// The future of one health check, as the built-in checks write it.
pub(crate) type CheckFuture = BoxFuture<'static, Result<(), CheckError>>;

/// One way to probe an endpoint: `Ok` means healthy.
///
/// The [`HealthChecker`](super::HealthChecker) runs it once per interval per endpoint and
/// bounds it with its timeout, so an implementation need not time itself out. Built in:
/// [`TcpCheck`], `HttpCheck` (feature `http-proxy`), and adapters for
/// closures and tower services ([`check_fn`]).
///
/// A check of your own returns a boxed future:
///
/// ```
/// use futures::future::BoxFuture;
/// use lbkit::{Endpoint, health::{CheckError, HealthCheck}};
///
/// /// Healthy while the endpoint's id names no file under /run/drain.
/// struct NotDrained;
///
/// impl HealthCheck for NotDrained {
///     fn check(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<(), CheckError>> {
///         let marker = std::path::Path::new("/run/drain").join(endpoint.id().as_str());
///         Box::pin(async move {
///             match tokio::fs::try_exists(&marker).await {
///                 Ok(false) => Ok(()),
///                 Ok(true) => Err(CheckError::failed("drained by the operator")),
///                 Err(e) => Err(CheckError::from_error(e.into())),
///             }
///         })
///     }
/// }
/// ```
pub trait HealthCheck: Send + Sync + 'static {
    /// Starts one check of `endpoint`: a boxed future (`Box::pin(async move { … })`).
    fn check(&self, endpoint: &Endpoint) -> BoxFuture<'static, Result<(), CheckError>>;
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

/// A check made from a closure: what [`check_fn`] returns.
#[derive(Clone)]
struct FnCheck<F> {
    f: F,
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
///
/// A tower `Service` of the endpoint makes a check the same way: call a clone of it, and
/// count any response as healthy.
///
/// ```
/// use lbkit::{Endpoint, health::{check_fn, HealthChecker}};
/// use tower::{service_fn, ServiceExt};
///
/// let probe = service_fn(|ep: Endpoint| async move {
///     Ok::<_, std::io::Error>(ep.id().to_string())
/// });
/// let checker = HealthChecker::new(check_fn(move |ep: Endpoint| {
///     let call = probe.clone().oneshot(ep);
///     async move { call.await.map(drop) }
/// }));
/// # drop(checker);
/// ```
pub fn check_fn<F, Fut, E>(f: F) -> impl HealthCheck
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
