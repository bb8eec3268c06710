//! The error type of lbkit's services.

use std::error::Error as StdError;
use std::fmt;

use crate::endpoint::EndpointId;

/// A type-erased error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The error of a balanced request.
///
/// One opaque type with a kind inside, asked about with `is_*` methods (as `hyper::Error`):
/// either no endpoint could take the request ([`is_no_endpoint`](Error::is_no_endpoint)),
/// returned at once and never after a wait, or every endpoint that could was at its in-flight
/// limit and the pool's queue was full or its wait ran out
/// ([`is_overloaded`](Error::is_overloaded)), or the picked endpoint's own service failed
/// ([`is_endpoint`](Error::is_endpoint)), with that error as the [`source`](StdError::source)
/// and the endpoint's id at hand for retrying elsewhere.
pub struct Error {
    kind: Kind,
    endpoint: Option<EndpointId>,
    source: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NoEndpoint,
    Overloaded,
    Endpoint,
}

impl Error {
    /// No endpoint is available: the pool is empty, or none is healthy, or all that are were
    /// excluded for this request.
    pub(crate) fn no_endpoint() -> Self {
        Error {
            kind: Kind::NoEndpoint,
            endpoint: None,
            source: None,
        }
    }

    /// Every endpoint the request could go to is at its in-flight limit, and the queue was
    /// full or the wait in it ran out.
    pub(crate) fn overloaded() -> Self {
        Error {
            kind: Kind::Overloaded,
            endpoint: None,
            source: None,
        }
    }

    /// The service of endpoint `id` failed with `source`.
    pub(crate) fn endpoint(id: EndpointId, source: BoxError) -> Self {
        Error {
            kind: Kind::Endpoint,
            endpoint: Some(id),
            source: Some(source),
        }
    }

    /// Whether no endpoint was available for the request.
    pub fn is_no_endpoint(&self) -> bool {
        self.kind == Kind::NoEndpoint
    }

    /// Whether the request was refused because every endpoint it could go to was at its
    /// in-flight limit (see
    /// [`PoolBuilder::max_requests_per_endpoint`](crate::pool::PoolBuilder::max_requests_per_endpoint))
    /// and it could not wait: the queue was full, or the queue timeout ran out. The request
    /// reached no endpoint, so it is safe to send again later; a proxy answers 503.
    pub fn is_overloaded(&self) -> bool {
        self.kind == Kind::Overloaded
    }

    /// Whether the picked endpoint's service failed.
    pub fn is_endpoint(&self) -> bool {
        self.kind == Kind::Endpoint
    }

    /// The endpoint the request went to, if it got that far.
    pub fn endpoint_id(&self) -> Option<&EndpointId> {
        self.endpoint.as_ref()
    }

    /// Takes the endpoint service's own error out, if there is one.
    pub fn into_source(self) -> Option<BoxError> {
        self.source
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("lbkit::Error");
        d.field("kind", &self.kind);
        if let Some(id) = &self.endpoint {
            d.field("endpoint", id);
        }
        if let Some(src) = &self.source {
            d.field("source", src);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.endpoint) {
            (Kind::NoEndpoint, _) => f.write_str("no endpoint available"),
            (Kind::Overloaded, _) => f.write_str("every endpoint is at its request limit"),
            (Kind::Endpoint, Some(id)) => write!(f, "endpoint {id} failed"),
            (Kind::Endpoint, None) => f.write_str("endpoint failed"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// The gRPC status a tonic client should see for a balanced call that failed in lbkit
/// (feature `tonic`).
///
/// Without it, tonic turns an error it does not know into `UNKNOWN`, which clients and retry
/// policies treat as an application failure. With it (`balancer.map_err(tonic::Status::from)`
/// in front of `tonic::client::Grpc`), no endpoint available is `UNAVAILABLE`, which gRPC
/// clients may retry; an endpoint's own error keeps the `Status` inside it if there is one
/// (a tonic channel's), a timeout is `DEADLINE_EXCEEDED`, and any other failure of the
/// endpoint before it answered (refused, reset) is `UNAVAILABLE`, as gRPC's transports report
/// it.
///
/// ```
/// use lbkit::{strategy::RoundRobin, Balancer, Endpoint};
/// use tower::{ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let no_endpoints: Vec<Endpoint> = Vec::new();
/// let balancer = Balancer::new(no_endpoints, RoundRobin::new(), |_: &Endpoint| {
///     service_fn(|_: http::Request<()>| async {
///         Ok::<_, tonic::Status>(http::Response::new(String::new()))
///     })
/// });
/// let error = balancer.oneshot(http::Request::new(())).await.unwrap_err();
/// assert_eq!(tonic::Status::from(error).code(), tonic::Code::Unavailable);
/// # }
/// ```
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let id = e.endpoint.clone();
        let Some(source) = e.source else {
            return tonic::Status::unavailable("no endpoint available");
        };
        let source = match source.downcast::<tonic::Status>() {
            Ok(status) => return *status,
            Err(source) => source,
        };
        let mut cur: Option<&(dyn StdError + 'static)> = Some(&*source);
        while let Some(err) = cur {
            if let Some(status) = err.downcast_ref::<tonic::Status>() {
                return status.clone();
            }
            if err.is::<tokio::time::error::Elapsed>() || err.is::<tower::timeout::error::Elapsed>()
            {
                return tonic::Status::deadline_exceeded(chain(id.as_ref(), &*source));
            }
            cur = err.source();
        }
        tonic::Status::unavailable(chain(id.as_ref(), &*source))
    }
}

/// `endpoint ID failed: ERROR: ITS SOURCE: …`.
#[cfg(feature = "tonic")]
fn chain(id: Option<&EndpointId>, error: &(dyn StdError + 'static)) -> String {
    use std::fmt::Write;
    let mut out = match id {
        Some(id) => format!("endpoint {id} failed"),
        None => "endpoint failed".to_owned(),
    };
    let mut cur = Some(error);
    while let Some(e) = cur {
        let _ = write!(out, ": {e}");
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_display() {
        let e = Error::no_endpoint();
        assert!(e.is_no_endpoint() && !e.is_endpoint());
        assert_eq!(e.to_string(), "no endpoint available");
        let e = Error::overloaded();
        assert!(e.is_overloaded() && !e.is_no_endpoint() && !e.is_endpoint());
        let e = Error::endpoint("a".into(), "refused".into());
        assert!(e.is_endpoint());
        assert_eq!(e.endpoint_id().unwrap().as_str(), "a");
        assert_eq!(e.source().unwrap().to_string(), "refused");
    }
}
