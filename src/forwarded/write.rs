//! Writing the forwarding headers of one hop.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Which forwarding headers the proxy writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeaders {
    /// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` (the default: what most
    /// backends read).
    #[default]
    XForwarded,
    /// The standard `Forwarded` header of RFC 7239.
    Forwarded,
    /// Both.
    Both,
    /// Neither: the backend does not learn the client's address.
    None,
}

/// Writes the forwarding headers of one hop as `kind` says: `client` is the connection's peer,
/// `proto` the scheme the client used (`"http"` or `"https"`), and the original `Host` header
/// is taken from `headers`.
///
/// What the proxy asserts comes from its own connection unless the peer is a proxy you trust
/// (`peer_trusted`, decided by the caller, e.g. with [`ClientIp::is_trusted`]):
///
/// - From an untrusted peer (the default: a client on the internet), the request's own
///   `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Host`, `-Proto`, `-Port` and `X-Real-IP`
///   are dropped, and the headers `kind` names are written from the connection alone. A client
///   cannot make the backend believe it came from elsewhere, over another scheme or for
///   another host.
/// - From a trusted peer, its `X-Forwarded-For` and `Forwarded` chains are kept and this hop is
///   appended; its `X-Forwarded-Host`, `-Proto` and `-Port` are kept, since they describe the
///   original client's request better than this hop can.
///
/// Without a `client` address nothing is trusted (fail closed). A `kind` of
/// [`ForwardedHeaders::None`] writes nothing but still drops what an untrusted peer sent.
///
/// ```
/// use http::HeaderMap;
/// use lbkit::forwarded::{append_forwarded, ForwardedHeaders};
///
/// let mut h = HeaderMap::new();
/// h.insert("host", "shop.example".parse().unwrap());
/// h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
/// h.insert("x-forwarded-host", "evil.example".parse().unwrap());
/// let peer = Some("203.0.113.9:4711".parse().unwrap());
/// append_forwarded(&mut h, ForwardedHeaders::XForwarded, peer, "https", false);
/// assert_eq!(h["x-forwarded-for"], "203.0.113.9");
/// assert_eq!(h["x-forwarded-host"], "shop.example");
/// assert_eq!(h["x-forwarded-proto"], "https");
/// ```
///
/// [`ClientIp::is_trusted`]: crate::forwarded::ClientIp::is_trusted
pub fn append_forwarded(
    headers: &mut HeaderMap,
    kind: ForwardedHeaders,
    client: Option<SocketAddr>,
    proto: &'static str,
    peer_trusted: bool,
) {
    let trusted = peer_trusted && client.is_some();
    let host = headers.get(header::HOST).cloned();
    if !trusted {
        // One pass over the names, then removals only for what is there: nearly every request
        // carries none of these, and a `remove` per absent name costs a hash each.
        let mut present = 0u8;
        for name in headers.keys() {
            if !may_be_among(SPOOFABLE_LENGTHS, name) {
                continue;
            }
            if let Some(i) = SPOOFABLE.iter().position(|s| s == name) {
                present |= 1 << i;
            }
        }
        for (i, name) in SPOOFABLE.iter().enumerate() {
            if present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
    if matches!(kind, ForwardedHeaders::XForwarded | ForwardedHeaders::Both) {
        if let Some(addr) = client {
            let mut buf = IpText::new();
            let ip = buf.write(addr.ip().to_canonical());
            let value = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::to_str) {
                Some(Ok(prev)) if !prev.trim().is_empty() => {
                    HeaderValue::try_from(format!("{prev}, {ip}")).ok()
                }
                _ => HeaderValue::from_str(ip).ok(),
            };
            if let Some(v) = value {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        if !trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        }
        if let Some(h) = &host {
            if !trusted || !headers.contains_key(&X_FORWARDED_HOST) {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
            }
        }
    }
    if matches!(kind, ForwardedHeaders::Forwarded | ForwardedHeaders::Both) {
        let mut elem = String::with_capacity(64);
        if let Some(addr) = client {
            elem.push_str("for=");
            push_node(&mut elem, addr.ip().to_canonical());
            elem.push(';');
        }
        elem.push_str("proto=");
        elem.push_str(proto);
        if let Some(h) = host.as_ref().and_then(|h| h.to_str().ok()) {
            elem.push_str(";host=");
            push_quoted_if_needed(&mut elem, h);
        }
        let value = match headers.get(header::FORWARDED).map(HeaderValue::to_str) {
            Some(Ok(prev)) if !prev.trim().is_empty() => format!("{prev}, {elem}"),
            _ => elem,
        };
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(header::FORWARDED, v);
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The lengths of a list of header names as a bit set (bit `n` for a name of `n` bytes; the
/// names must be shorter than 32 bytes), for [`may_be_among`].
pub(crate) const fn name_lengths(names: &[&str]) -> u32 {
    let mut mask = 0u32;
    let mut i = 0;
    while i < names.len() {
        assert!(names[i].len() < 32, "a header name of 32 bytes or more");
        mask |= 1 << names[i].len();
        i += 1;
    }
    mask
}

/// Whether `name` may be one of the names whose [`name_lengths`] are `lengths`: most names of
/// a message (`host`, `accept`, `content-length`, ...) are ruled out by their length alone,
/// before they are compared with each name of the list.
#[inline]
pub(crate) fn may_be_among(lengths: u32, name: &HeaderName) -> bool {
    let len = name.as_str().len();
    len < 32 && lengths & (1 << len) != 0
}

/// The lengths of the [`SPOOFABLE`] names.
const SPOOFABLE_LENGTHS: u32 = name_lengths(&[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "forwarded",
]);

/// What only a trusted peer may assert: dropped from anyone else's request.
static SPOOFABLE: [HeaderName; 6] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
    header::FORWARDED,
];

/// An IP address written as text on the stack (`Display` into a `String` allocates, and the
/// address is written for every request).
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new() -> Self {
        IpText {
            buf: [0; 45],
            len: 0,
        }
    }

    /// Writes `ip` (IPv4 dotted, IPv6 as `Display` writes it) and returns it.
    fn write(&mut self, ip: IpAddr) -> &str {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
        // 45 bytes hold the longest IPv6 text (an IPv4-mapped form with all groups).
        let _ = match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                write_u8(&mut cursor, a);
                for o in [b, c, d] {
                    let _ = cursor.write_all(b".");
                    write_u8(&mut cursor, o);
                }
                Ok(())
            }
            IpAddr::V6(v6) => write!(cursor, "{v6}"),
        };
        self.len = cursor.position() as usize;
        // Only ASCII digits, dots, colons and hex letters were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

fn write_u8(out: &mut std::io::Cursor<&mut [u8]>, n: u8) {
    use std::io::Write;
    let digits = [b'0' + n / 100, b'0' + n / 10 % 10, b'0' + n % 10];
    let skip = if n >= 100 {
        0
    } else if n >= 10 {
        1
    } else {
        2
    };
    let _ = out.write_all(&digits[skip..]);
}

/// A `for=` node: IPv4 bare, IPv6 bracketed and quoted (RFC 7239 §6).
fn push_node(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => out.push_str(&v4.to_string()),
        IpAddr::V6(v6) => {
            out.push_str("\"[");
            out.push_str(&v6.to_string());
            out.push_str("]\"");
        }
    }
}

fn push_quoted_if_needed(out: &mut String, v: &str) {
    let token = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        out.push_str(v);
    } else {
        out.push('"');
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_filter_lets_every_spoofable_name_through() {
        assert!(SPOOFABLE.iter().all(|n| may_be_among(SPOOFABLE_LENGTHS, n)));
        assert!(!may_be_among(SPOOFABLE_LENGTHS, &header::HOST));
        assert!(!may_be_among(SPOOFABLE_LENGTHS, &header::CONTENT_LENGTH));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn appends_x_forwarded_for_and_forwarded() {
        let mut h = map(&[("host", "shop.example"), ("x-forwarded-for", "203.0.113.9")]);
        let client: SocketAddr = "[2001:db8::1]:4711".parse().unwrap();
        append_forwarded(&mut h, ForwardedHeaders::Both, Some(client), "https", true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=shop.example"
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "203.0.113.9",
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new().write(ip), ip.to_string());
        }
    }

    #[test]
    fn none_writes_nothing() {
        let mut h = HeaderMap::new();
        append_forwarded(
            &mut h,
            ForwardedHeaders::None,
            Some(([10, 0, 0, 1], 1).into()),
            "http",
            false,
        );
        assert!(h.is_empty());
    }

    #[test]
    fn without_a_host_or_a_client_address_the_clients_values_are_dropped() {
        let mut h = map(&[
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        append_forwarded(&mut h, ForwardedHeaders::Both, None, "http", true);
        assert!(h.get("x-forwarded-host").is_none());
        assert!(h.get("x-forwarded-for").is_none());
        assert_eq!(h["forwarded"], "proto=http");
        let mut h = map(&[("x-forwarded-proto", "https")]);
        append_forwarded(&mut h, ForwardedHeaders::None, None, "http", true);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn an_untrusted_peer_cannot_assert_anything() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        let peer: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        append_forwarded(&mut h, ForwardedHeaders::Both, Some(peer), "http", false);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-forwarded-port").is_none());
        assert!(h.get("x-real-ip").is_none());
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7;proto=http;host=shop.example"
        );
    }

    #[test]
    fn a_trusted_peer_keeps_its_chain_and_what_it_asserted() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "www.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let lb: SocketAddr = "[::ffff:10.0.0.2]:5000".parse().unwrap();
        append_forwarded(&mut h, ForwardedHeaders::XForwarded, Some(lb), "http", true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.2");
        assert_eq!(h["x-forwarded-host"], "www.example");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
