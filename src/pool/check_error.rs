use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::BoxError;

/// Why a health check failed.
///
/// Typed, so that a transition event says *why* an endpoint was marked down (see
/// [`HealthChange::Down`](crate::health::HealthChange::Down)); cheap to clone. Custom checks
/// may return one (boxed) to choose their kind; any other error counts as
/// [`CheckErrorKind::Failed`].
#[derive(Clone)]
pub struct CheckError {
    kind: CheckErrorKind,
    after: Option<Duration>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

/// The kind of a [`CheckError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckErrorKind {
    /// The connection could not be made (refused, unreachable, reset during connect).
    Refused,
    /// The check did not finish within its timeout.
    Timeout,
    /// An HTTP check got a status outside the expected range.
    Status(u16),
    /// An HTTP check's response body did not contain the expected text.
    BodyMismatch,
    /// The connection was made but the exchange failed (closed early, not HTTP, …).
    Protocol,
    /// A gRPC health check's call failed with this `grpc-status` (such as 12 `UNIMPLEMENTED`
    /// from a server without the health service).
    GrpcStatus(u32),
    /// A gRPC health check got this serving status instead of `SERVING` (1): 2
    /// `NOT_SERVING`, 0 `UNKNOWN` or 3 `SERVICE_UNKNOWN`.
    NotServing(u64),
    /// A custom check failed, or the check could not run (no address to check).
    Failed,
}

impl CheckError {
    fn new(kind: CheckErrorKind, source: Option<BoxError>) -> Self {
        CheckError {
            kind,
            after: None,
            source: source.map(Arc::from),
        }
    }

    /// The connection could not be made.
    pub fn refused(source: impl Into<BoxError>) -> Self {
        Self::new(CheckErrorKind::Refused, Some(source.into()))
    }

    /// The check did not finish within `after`.
    pub fn timeout(after: Duration) -> Self {
        CheckError {
            after: Some(after),
            ..Self::new(CheckErrorKind::Timeout, None)
        }
    }

    /// An HTTP response had an unexpected status.
    pub fn status(status: u16) -> Self {
        Self::new(CheckErrorKind::Status(status), None)
    }

    /// An HTTP response body did not contain the expected text.
    pub fn body_mismatch() -> Self {
        Self::new(CheckErrorKind::BodyMismatch, None)
    }

    /// The exchange failed after connecting.
    pub fn protocol(source: impl Into<BoxError>) -> Self {
        Self::new(CheckErrorKind::Protocol, Some(source.into()))
    }

    /// A gRPC call failed with status `code`.
    pub fn grpc_status(code: u32) -> Self {
        Self::new(CheckErrorKind::GrpcStatus(code), None)
    }

    /// A gRPC health service answered `status`, not `SERVING`.
    pub fn not_serving(status: u64) -> Self {
        Self::new(CheckErrorKind::NotServing(status), None)
    }

    /// A custom check failed with `source`.
    pub fn failed(source: impl Into<BoxError>) -> Self {
        Self::new(CheckErrorKind::Failed, Some(source.into()))
    }

    /// Converts any error of a custom check: a boxed `CheckError` keeps its kind, an I/O error
    /// of a refused connection is [`Refused`](CheckErrorKind::Refused), a tokio timeout is
    /// [`Timeout`](CheckErrorKind::Timeout), anything else is
    /// [`Failed`](CheckErrorKind::Failed).
    pub fn from_error(error: BoxError) -> Self {
        let error = match error.downcast::<CheckError>() {
            Ok(e) => return *e,
            Err(e) => e,
        };
        if error.is::<tokio::time::error::Elapsed>() {
            return Self::new(CheckErrorKind::Timeout, Some(error));
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Self::refused(error);
            }
        }
        Self::failed(error)
    }

    /// The kind of failure.
    pub fn kind(&self) -> CheckErrorKind {
        self.kind
    }
}

impl fmt::Debug for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CheckError");
        d.field("kind", &self.kind);
        if let Some(after) = self.after {
            d.field("after", &after);
        }
        if let Some(src) = &self.source {
            d.field("source", src);
        }
        d.finish()
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            CheckErrorKind::Refused => f.write_str("connection failed")?,
            CheckErrorKind::Timeout => match self.after {
                Some(after) => write!(f, "timed out after {after:?}")?,
                None => f.write_str("timed out")?,
            },
            CheckErrorKind::Status(s) => write!(f, "unexpected status {s}")?,
            CheckErrorKind::BodyMismatch => f.write_str("response body lacks the expected text")?,
            CheckErrorKind::Protocol => f.write_str("exchange failed")?,
            CheckErrorKind::GrpcStatus(c) => write!(f, "gRPC call failed with grpc-status {c}")?,
            CheckErrorKind::NotServing(2) => f.write_str("gRPC health: NOT_SERVING")?,
            CheckErrorKind::NotServing(s) => write!(f, "gRPC health: not serving (status {s})")?,
            CheckErrorKind::Failed => f.write_str("check failed")?,
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl StdError for CheckError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_errors_keep_or_get_a_kind() {
        let boxed: BoxError = Box::new(CheckError::status(503));
        assert_eq!(
            CheckError::from_error(boxed).kind(),
            CheckErrorKind::Status(503)
        );
        let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(CheckError::from_error(io).kind(), CheckErrorKind::Refused);
        let other = CheckError::from_error("nope".into());
        assert_eq!(other.kind(), CheckErrorKind::Failed);
        assert_eq!(other.to_string(), "check failed: nope");
        assert_eq!(
            CheckError::timeout(Duration::from_millis(100)).to_string(),
            "timed out after 100ms"
        );
    }
}
