use std::error::Error as StdError;
use std::fmt;

use crate::error::BoxError;

/// Why a request through the [`FailoverLayer`](super::FailoverLayer) failed.
///
/// One opaque type with a kind inside, asked about with `is_*` methods (as `hyper::Error`),
/// with the last attempt's own error (an endpoint's failure, the balancer's
/// [`lbkit::Error`](crate::Error)) as its [`source`](StdError::source) when there is one:
///
/// - [`is_deadline`](Error::is_deadline): the overall deadline passed (during an attempt, or
///   a back-off would have passed it);
/// - [`is_budget_exhausted`](Error::is_budget_exhausted): an attempt failed and the
///   [`RetryBudget`](super::RetryBudget) refused the retry;
/// - [`is_no_endpoint`](Error::is_no_endpoint): no endpoint could take the request at all
///   (none in the pool, none healthy), so no attempt was made;
/// - otherwise the last attempt failed and no other could follow: the policy does not retry
///   it (a `POST` that reached its backend), the attempts ran out, or every endpoint was tried.
///
/// Whatever the kind, [`is_timeout`](Error::is_timeout) says the last attempt was cut at the
/// per-try timeout, [`is_not_sent`](Error::is_not_sent) that it provably never reached its
/// endpoint, and [`attempts`](Error::attempts) how many attempts reached an endpoint.
/// [`ErrorResponseLayer`](crate::proxy::ErrorResponseLayer) answers 504 for a deadline or a
/// timeout, 503 for a spent budget or no endpoint, and otherwise what the last failure says.
///
/// A failed *response* (a 503 from the backend) is not an error: when no retry can follow,
/// the failover layer hands the backend's answer on as it is.
pub struct Error {
    kind: Kind,
    attempts: u32,
    timed_out: bool,
    source: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Failed,
    BudgetExhausted,
    NoEndpoint,
    Deadline,
}

/// The last failure of a request, as the failover future keeps it for its error.
pub(crate) struct Failure {
    pub(crate) error: Option<BoxError>,
    pub(crate) timed_out: bool,
}

impl Error {
    fn new(kind: Kind, attempts: u32, last: Failure) -> Self {
        Error {
            kind,
            attempts,
            timed_out: last.timed_out,
            source: last.error,
        }
    }

    pub(crate) fn failed(attempts: u32, last: Failure) -> Self {
        Error::new(Kind::Failed, attempts, last)
    }

    pub(crate) fn budget_exhausted(attempts: u32, last: Failure) -> Self {
        Error::new(Kind::BudgetExhausted, attempts, last)
    }

    pub(crate) fn no_endpoint(source: BoxError) -> Self {
        Error::new(
            Kind::NoEndpoint,
            0,
            Failure {
                error: Some(source),
                timed_out: false,
            },
        )
    }

    pub(crate) fn deadline(attempts: u32, last: Failure) -> Self {
        Error::new(Kind::Deadline, attempts, last)
    }

    /// Whether the overall [deadline](super::FailoverLayer::deadline) passed before an answer
    /// came (while an attempt was under way, or a back-off would have passed it).
    pub fn is_deadline(&self) -> bool {
        self.kind == Kind::Deadline
    }

    /// Whether an attempt failed and the [`RetryBudget`](super::RetryBudget) refused a retry
    /// that the policy allowed: the fleet is failing widely, and retries would add to its load.
    pub fn is_budget_exhausted(&self) -> bool {
        self.kind == Kind::BudgetExhausted
    }

    /// Whether no endpoint could take the request (the pool is empty, or no endpoint is
    /// healthy), so that no attempt was made. When endpoints run out after failed attempts,
    /// the last failure is returned instead (this is `false`).
    pub fn is_no_endpoint(&self) -> bool {
        self.kind == Kind::NoEndpoint
    }

    /// Whether the last attempt was cut at the [per-try
    /// timeout](super::FailoverLayer::per_try_timeout).
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// Whether the last attempt provably never reached its endpoint: its error carries a
    /// [`NotSent`] (a refused connection, a connect timeout, a pooled connection found closed
    /// before the request was written).
    pub fn is_not_sent(&self) -> bool {
        self.source
            .as_deref()
            .is_some_and(|e| NotSent::find(e).is_some())
    }

    /// How many attempts reached an endpoint (were picked and sent), the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Takes the last attempt's own error out, if there is one.
    pub fn into_source(self) -> Option<BoxError> {
        self.source
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("lbkit::failover::Error");
        d.field("kind", &self.kind)
            .field("attempts", &self.attempts)
            .field("timed_out", &self.timed_out);
        if let Some(src) = &self.source {
            d.field("source", src);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::NoEndpoint => return f.write_str("no endpoint available; nothing was sent"),
            Kind::Failed => "request failed",
            Kind::BudgetExhausted => "retry budget exhausted",
            Kind::Deadline => "deadline passed",
        };
        let n = self.attempts;
        write!(
            f,
            "{what} after {n} attempt{}",
            if n == 1 { "" } else { "s" }
        )?;
        if self.timed_out {
            f.write_str("; the last timed out")?;
        } else if self.is_not_sent() {
            f.write_str("; the last was never sent")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Marks an endpoint's error as proof that the request never reached the endpoint, so it is
/// safe to send elsewhere whatever its method: the connection was refused or timed out while
/// connecting, or a pooled connection was found closed before the request was written.
///
/// The failover layer retries only idempotent requests by default, since a `POST` that reached
/// its backend may have had its effect; one that never left the proxy has not, and is retried
/// like any other (as nginx and HAProxy's `retry-on conn-failure` do). An endpoint service says
/// so by returning an error with a `NotSent` anywhere in its [source](StdError::source) chain;
/// [`Forward`](crate::proxy::Forward) does, and any service can, with `NotSent::new(error)`.
/// The policy asks [`RetryPolicy::is_not_sent`](super::RetryPolicy::is_not_sent).
///
/// It is transparent: it displays as the error it wraps, and its source is that error's
/// source, so logs read the same.
///
/// ```
/// use lbkit::failover::NotSent;
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let e: lbkit::BoxError = Box::new(NotSent::new(refused));
/// assert!(NotSent::find(&*e).is_some());
/// assert_eq!(e.to_string(), "connection refused");
/// ```
pub struct NotSent {
    inner: BoxError,
}

impl NotSent {
    /// Wraps `error`, the reason the request could not be sent.
    pub fn new(error: impl Into<BoxError>) -> Self {
        NotSent {
            inner: error.into(),
        }
    }

    /// The first `NotSent` in `error`'s source chain (`error` included), if any.
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a NotSent> {
        let mut cur = Some(error);
        while let Some(e) = cur {
            if let Some(n) = e.downcast_ref::<NotSent>() {
                return Some(n);
            }
            cur = e.source();
        }
        None
    }

    /// The error it wraps.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.inner
    }

    /// Takes the error it wraps out.
    pub fn into_inner(self) -> BoxError {
        self.inner
    }
}

impl fmt::Debug for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NotSent").field(&self.inner).finish()
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl StdError for NotSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(error: Option<BoxError>, timed_out: bool) -> Failure {
        Failure { error, timed_out }
    }

    #[test]
    fn kinds_questions_and_display() {
        let e = Error::no_endpoint(Box::new(crate::Error::no_endpoint()));
        assert!(e.is_no_endpoint() && !e.is_deadline() && !e.is_budget_exhausted());
        assert_eq!(e.attempts(), 0);
        assert_eq!(e.to_string(), "no endpoint available; nothing was sent");
        assert!(e.source().unwrap().is::<crate::Error>());

        let e = Error::deadline(2, last(None, false));
        assert!(e.is_deadline() && !e.is_timeout() && e.source().is_none());
        assert_eq!(e.to_string(), "deadline passed after 2 attempts");

        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let wrapped = crate::Error::endpoint("a".into(), Box::new(NotSent::new(refused)));
        let e = Error::budget_exhausted(1, last(Some(Box::new(wrapped)), false));
        assert!(e.is_budget_exhausted() && e.is_not_sent() && !e.is_timeout());
        assert_eq!(
            e.to_string(),
            "retry budget exhausted after 1 attempt; the last was never sent"
        );
        // The chain: failover error -> lbkit::Error -> (transparent NotSent) "connection refused".
        let lb = e.source().unwrap();
        assert_eq!(lb.source().unwrap().to_string(), "connection refused");

        let e = Error::failed(3, last(Some("reset".into()), true));
        assert!(e.is_timeout() && !e.is_not_sent() && !e.is_no_endpoint());
        assert_eq!(
            e.to_string(),
            "request failed after 3 attempts; the last timed out"
        );
        assert_eq!(e.into_source().unwrap().to_string(), "reset");
    }

    #[test]
    fn not_sent_is_found_anywhere_in_the_chain_and_is_transparent() {
        let inner: BoxError = "connection refused".into();
        let marked = NotSent::new(inner);
        assert_eq!(marked.get_ref().to_string(), "connection refused");
        let outer = crate::Error::endpoint("a".into(), Box::new(marked));
        assert!(NotSent::find(&outer).is_some());
        let plain = crate::Error::endpoint("a".into(), "reset".into());
        assert!(NotSent::find(&plain).is_none());
        assert_eq!(
            NotSent::new("x").into_inner().to_string(),
            format!("{}", NotSent::new("x"))
        );
    }
}
