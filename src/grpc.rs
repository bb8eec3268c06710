//! What lbkit knows of gRPC: status codes, the headers that carry them, and which codes count
//! as a failure of the endpoint.
//!
//! gRPC runs over HTTP/2 and reports its outcome in a `grpc-status` field, not in the HTTP
//! status: a failed call is usually an HTTP `200` whose trailers (or, for a call that fails
//! before any message, whose headers: a *trailers-only* response) say `grpc-status: 14`.
//! HTTP balancers ([`CompleteOnBody`](crate::balance::CompleteOnBody), the default) read that
//! field, so outlier detection sees gRPC failures as it sees 5xx (see [`FailureCodes`]); the
//! proxy's [`ErrorResponseLayer`](crate::proxy::ErrorResponseLayer) answers gRPC requests with
//! gRPC-shaped errors (feature `http-proxy`).
//!
//! A leaf module: it depends on nothing else in lbkit, so the balancer, the health checks and
//! the proxy all use it.

use http::header::{HeaderName, CONTENT_TYPE};
use http::HeaderMap;

/// The `grpc-status` header or trailer: the call's status code, in decimal.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The `grpc-message` header or trailer: a percent-encoded description of a failure.
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))] // the proxy writes it
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The `grpc-timeout` request header: the client's deadline, such as `100m` or `5S`.
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))] // the proxy reads it
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A gRPC status code (`google.rpc.Code`): the number a `grpc-status` field carries, as
/// [`http::StatusCode`] is HTTP's. The seventeen codes gRPC defines are constants
/// ([`Code::UNAVAILABLE`]); another number (a server may send one) is kept as it came and is
/// none of them. With feature `tonic`, `tonic::Code` converts into it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(u32);

impl Code {
    /// Not an error.
    pub const OK: Code = Code(0);
    /// The operation was cancelled, typically by the caller.
    pub const CANCELLED: Code = Code(1);
    /// Unknown error (what a server's unhandled exception usually becomes).
    pub const UNKNOWN: Code = Code(2);
    /// The client specified an invalid argument.
    pub const INVALID_ARGUMENT: Code = Code(3);
    /// The deadline expired before the operation could complete.
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    /// Some requested entity was not found.
    pub const NOT_FOUND: Code = Code(5);
    /// The entity a client tried to create already exists.
    pub const ALREADY_EXISTS: Code = Code(6);
    /// The caller lacks permission.
    pub const PERMISSION_DENIED: Code = Code(7);
    /// Some resource (a quota, the server's capacity) is exhausted: overload, not breakage.
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    /// The system is not in a state required for the operation.
    pub const FAILED_PRECONDITION: Code = Code(9);
    /// The operation was aborted (a concurrency conflict).
    pub const ABORTED: Code = Code(10);
    /// The operation went past the valid range.
    pub const OUT_OF_RANGE: Code = Code(11);
    /// The operation is not implemented or supported by this server.
    pub const UNIMPLEMENTED: Code = Code(12);
    /// An internal invariant of the server broke.
    pub const INTERNAL: Code = Code(13);
    /// The service is currently unavailable; retrying (elsewhere) may work.
    pub const UNAVAILABLE: Code = Code(14);
    /// Unrecoverable data loss or corruption.
    pub const DATA_LOSS: Code = Code(15);
    /// The request lacks valid credentials.
    pub const UNAUTHENTICATED: Code = Code(16);

    /// Its number, as a `grpc-status` field writes it (and tonic's `Code as u32` gives).
    pub const fn as_u32(self) -> u32 {
        self.0
    }

    /// Its name in gRPC's table (`"UNAVAILABLE"`), `None` for a number gRPC does not define.
    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "OK",
            1 => "CANCELLED",
            2 => "UNKNOWN",
            3 => "INVALID_ARGUMENT",
            4 => "DEADLINE_EXCEEDED",
            5 => "NOT_FOUND",
            6 => "ALREADY_EXISTS",
            7 => "PERMISSION_DENIED",
            8 => "RESOURCE_EXHAUSTED",
            9 => "FAILED_PRECONDITION",
            10 => "ABORTED",
            11 => "OUT_OF_RANGE",
            12 => "UNIMPLEMENTED",
            13 => "INTERNAL",
            14 => "UNAVAILABLE",
            15 => "DATA_LOSS",
            16 => "UNAUTHENTICATED",
            _ => return None,
        })
    }
}

/// The code numbered `n`, as a `grpc-status` field writes it.
impl From<u32> for Code {
    fn from(n: u32) -> Code {
        Code(n)
    }
}

impl From<Code> for u32 {
    fn from(code: Code) -> u32 {
        code.0
    }
}

#[cfg(feature = "tonic")]
impl From<tonic::Code> for Code {
    fn from(code: tonic::Code) -> Code {
        Code(code as u32)
    }
}

/// `UNAVAILABLE (14)`; a number gRPC does not define alone.
impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Whether `headers` say the message is gRPC: a `content-type` of `application/grpc`,
/// `application/grpc+proto` (or another `+format`) or `application/grpc;…`.
///
/// gRPC-Web (`application/grpc-web…`) is *not* gRPC here: it is made to run over HTTP/1.1
/// and is answered by its own proxies' rules.
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))] // the proxy and HTTP checks read it
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let prefix = b"application/grpc";
    ct.len() >= prefix.len()
        && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(ct.get(prefix.len()), None | Some(b'+' | b';' | b' '))
}

/// The `grpc-status` code in `headers` (trailers, or the headers of a trailers-only
/// response), if there is a well-formed one.
pub(crate) fn status(headers: &HeaderMap) -> Option<Code> {
    parse_code(headers.get(GRPC_STATUS)?.as_bytes()).map(Code)
}

fn parse_code(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 3 {
        return None;
    }
    digits.iter().try_fold(0u32, |n, &d| match d {
        b'0'..=b'9' => Some(n * 10 + u32::from(d - b'0')),
        _ => None,
    })
}

/// The client's deadline from a `grpc-timeout` header (`TimeoutValue TimeoutUnit`: at most 8
/// digits, then `H`, `M`, `S`, `m`, `u` or `n`), or `None` if absent or malformed.
#[cfg_attr(not(feature = "http-proxy"), allow(dead_code))] // the proxy reads it
pub(crate) fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The set of gRPC status codes that count as a failure of the endpoint that answered them
/// (for outlier detection and [`EndpointState::errors`](crate::endpoint::EndpointState::errors)).
///
/// The default is [`UNAVAILABLE`](Code::UNAVAILABLE), [`DEADLINE_EXCEEDED`](Code::DEADLINE_EXCEEDED)
/// and [`INTERNAL`](Code::INTERNAL): what a broken, hung or crashing server answers (Envoy maps
/// them to 503, 504 and 500, which its `consecutive_5xx` detection counts). Codes that describe
/// the *call* (`NOT_FOUND`, `INVALID_ARGUMENT`, `PERMISSION_DENIED`, …) are not the server's
/// fault. [`RESOURCE_EXHAUSTED`](Code::RESOURCE_EXHAUSTED) is overload, not breakage (as
/// HTTP 429 is): ejecting a busy server would only push its load onto the others, so it is not
/// counted by default. `UNKNOWN` (an application's unhandled error) is left out too, as
/// Envoy's gateway-failure mode does; add it with [`with`](FailureCodes::with) if your servers
/// only fail that way when broken.
///
/// Set it for a pool with
/// [`OutlierDetection::failure_grpc_codes`](crate::health::OutlierDetection::failure_grpc_codes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FailureCodes(u32);

impl FailureCodes {
    /// The default set (see above).
    pub const DEFAULT: FailureCodes = FailureCodes(
        (1 << Code::UNAVAILABLE.0) | (1 << Code::DEADLINE_EXCEEDED.0) | (1 << Code::INTERNAL.0),
    );

    /// No code counts: gRPC failures never count against an endpoint.
    pub const fn none() -> Self {
        FailureCodes(0)
    }

    /// The codes in `codes` (codes above 16, which gRPC does not define, are ignored).
    pub fn new(codes: impl IntoIterator<Item = Code>) -> Self {
        codes.into_iter().fold(Self::none(), Self::with)
    }

    /// This set and `code` (ignored above 16).
    pub const fn with(self, code: Code) -> Self {
        match code.0 {
            n @ 0..=16 => FailureCodes(self.0 | (1 << n)),
            _ => self,
        }
    }

    /// This set without `code`.
    pub const fn without(self, code: Code) -> Self {
        match code.0 {
            n @ 0..=16 => FailureCodes(self.0 & !(1 << n)),
            _ => self,
        }
    }

    /// Whether `code` counts as a failure.
    #[inline]
    pub const fn contains(self, code: Code) -> bool {
        code.0 <= 16 && self.0 & (1 << code.0) != 0
    }

    /// The set as a bit mask (bit `n` for code `n`), for storing in an atomic.
    pub(crate) const fn bits(self) -> u32 {
        self.0
    }

    /// The set from [`bits`](Self::bits).
    pub(crate) const fn from_bits(bits: u32) -> Self {
        FailureCodes(bits & 0x1_ffff)
    }
}

impl Default for FailureCodes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Debug for FailureCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((0..=16).map(Code).filter(|&c| self.contains(c)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
        h
    }

    #[test]
    fn content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;charset=x",
        ] {
            assert!(is_grpc(&headers("content-type", ct)), "{ct}");
        }
        for ct in ["application/grpc-web", "application/grpcx", "text/plain"] {
            assert!(!is_grpc(&headers("content-type", ct)), "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn codes_name_themselves() {
        assert_eq!(format!("{:?}", Code::UNAVAILABLE), "UNAVAILABLE (14)");
        assert_eq!(format!("{:?}", Code::from(99)), "99");
        assert_eq!(u32::from(Code::DATA_LOSS), 15);
        assert_eq!(
            format!("{:?}", FailureCodes::DEFAULT),
            "{DEADLINE_EXCEEDED (4), INTERNAL (13), UNAVAILABLE (14)}"
        );
        #[cfg(feature = "tonic")]
        assert_eq!(
            Code::from(tonic::Code::Unauthenticated),
            Code::UNAUTHENTICATED
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(
            status(&headers("grpc-status", "14")),
            Some(Code::UNAVAILABLE)
        );
        assert_eq!(status(&headers("grpc-status", "0")), Some(Code::OK));
        assert_eq!(status(&headers("grpc-status", "x")), None);
        assert_eq!(status(&headers("grpc-status", "")), None);
        assert_eq!(status(&headers("grpc-status", "99999")), None);
        assert_eq!(status(&HeaderMap::new()), None);
    }

    #[test]
    fn timeouts() {
        let t = |v| timeout(&headers("grpc-timeout", v));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn failure_codes() {
        let d = FailureCodes::default();
        assert!(d.contains(Code::UNAVAILABLE) && d.contains(Code::DEADLINE_EXCEEDED));
        assert!(d.contains(Code::INTERNAL));
        assert!(!d.contains(Code::OK) && !d.contains(Code::RESOURCE_EXHAUSTED));
        assert!(!d.contains(Code::NOT_FOUND) && !d.contains(Code::from(99)));
        let custom = FailureCodes::new([Code::UNKNOWN, Code::from(40)]).without(Code::UNKNOWN);
        assert_eq!(custom, FailureCodes::none());
        assert_eq!(FailureCodes::from_bits(d.bits()), d);
    }
}
