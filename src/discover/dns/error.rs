//! [`DnsError`]: why a poll gave no endpoints.

use std::error::Error as StdError;
use std::fmt;

use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::ResolveError;

/// Why a DNS poll gave no endpoints; the pool keeps its last good set.
///
/// One opaque type asked about with `is_*` methods: the lookup failed
/// ([`is_lookup`](DnsError::is_lookup)), the answer was empty
/// ([`is_empty_answer`](DnsError::is_empty_answer)), every record in it was unusable
/// ([`is_bad_record`](DnsError::is_bad_record)), or the resolver could not be set up
/// ([`is_config`](DnsError::is_config)). A failed lookup carries hickory's error as its
/// [`source`](StdError::source).
pub struct DnsError {
    kind: Kind,
    name: String,
    srv: Option<String>,
    detail: Option<String>,
    source: Option<ResolveError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Config,
    Lookup,
    Empty,
    BadRecord,
}

impl DnsError {
    pub(super) fn new(kind: Kind, name: &str) -> Self {
        DnsError {
            kind,
            name: name.to_owned(),
            srv: None,
            detail: None,
            source: None,
        }
    }

    /// A lookup's error: an answer that there is no such name or record is an empty answer;
    /// anything else (timeout, SERVFAIL, refused, unreadable replies) a failed lookup.
    pub(super) fn from_resolve(name: &str, e: ResolveError) -> Self {
        if is_no_such_record(&e) {
            return DnsError::new(Kind::Empty, name).with_source(e);
        }
        let mut err = DnsError::new(Kind::Lookup, name);
        // hickory words an error code as "no records found"; say which code it was.
        if let Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) =
            e.proto().map(|p| p.kind())
        {
            err = err.with_detail(format!("the server answered {response_code}"));
        }
        err.with_source(e)
    }

    pub(super) fn with_source(mut self, e: ResolveError) -> Self {
        self.source = Some(e);
        self
    }

    pub(super) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Marks the error as met while resolving a target of the SRV name `srv`.
    pub(super) fn for_srv(mut self, srv: &str) -> Self {
        self.srv = Some(srv.to_owned());
        self
    }

    /// The name whose lookup gave this error: the discovered name, or the SRV target that
    /// failed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lookup failed: a timeout, SERVFAIL or another error code, an unreadable reply, no
    /// reachable server.
    pub fn is_lookup(&self) -> bool {
        self.kind == Kind::Lookup
    }

    /// The server answered that there is nothing: NXDOMAIN, no records of the type, or SRV
    /// targets without addresses.
    pub fn is_empty_answer(&self) -> bool {
        self.kind == Kind::Empty
    }

    /// The answer had records but none was usable (an SRV port 0 or target `"."`, an
    /// unspecified or multicast address).
    pub fn is_bad_record(&self) -> bool {
        self.kind == Kind::BadRecord
    }

    /// The discovery cannot start: the system configuration could not be read, the name is
    /// not a valid DNS name, or the port is 0.
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }
}

impl fmt::Debug for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("DnsError");
        d.field("kind", &self.kind).field("name", &self.name);
        if let Some(srv) = &self.srv {
            d.field("srv", srv);
        }
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        match self.kind {
            Kind::Config => write!(f, "DNS discovery of {name} cannot start")?,
            Kind::Lookup => write!(f, "DNS lookup of {name} failed")?,
            Kind::Empty => write!(f, "DNS answer for {name} is empty")?,
            Kind::BadRecord => write!(f, "DNS answer for {name} has no usable record")?,
        }
        if let Some(srv) = &self.srv {
            write!(f, " (SRV target of {srv})")?;
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl StdError for DnsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Whether the server answered that there is no such name or record (as opposed to failing).
pub(super) fn is_no_such_record(e: &ResolveError) -> bool {
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NoError | ResponseCode::NXDomain,
            ..
        })
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_went_wrong() {
        let e = DnsError::new(Kind::Empty, "a.test.");
        assert!(e.is_empty_answer() && !e.is_lookup());
        assert_eq!(e.to_string(), "DNS answer for a.test. is empty");
        let e = DnsError::new(Kind::Lookup, "t.test.").for_srv("_x._tcp.test.");
        assert_eq!(
            e.to_string(),
            "DNS lookup of t.test. failed (SRV target of _x._tcp.test.)"
        );
    }
}
