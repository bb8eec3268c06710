//! The trusted-proxy walk: `X-Forwarded-For` and RFC 7239 `Forwarded` parsing, and trusted
//! address ranges. The parsers never panic and never allocate; anything malformed reads as
//! "not an address".

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::header::{HeaderMap, FORWARDED};

use super::{ClientAddr, ForwardedHeaders};

/// A range of IP addresses in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one address.
///
/// ```
/// use lbkit::forwarded::Cidr;
///
/// let net: Cidr = "10.0.0.0/8".parse().unwrap();
/// assert!(net.contains("10.1.2.3".parse().unwrap()));
/// assert!(!net.contains("11.0.0.1".parse().unwrap()));
/// let one = Cidr::from("::1".parse::<std::net::IpAddr>().unwrap());
/// assert!(one.contains("::1".parse().unwrap()));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of `addr` with a `prefix`-bit network part; `None` if the prefix is longer
    /// than the address (32 bits for IPv4, 128 for IPv6). Host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then(|| Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The first address of the range.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The length of the network part, in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the range. An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) counts as
    /// its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl From<IpAddr> for Cidr {
    fn from(addr: IpAddr) -> Self {
        let addr = addr.to_canonical();
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }
}

impl From<Ipv4Addr> for Cidr {
    fn from(addr: Ipv4Addr) -> Self {
        Cidr::from(IpAddr::V4(addr))
    }
}

impl From<Ipv6Addr> for Cidr {
    fn from(addr: Ipv6Addr) -> Self {
        Cidr::from(IpAddr::V6(addr))
    }
}

/// The error of parsing a [`Cidr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidCidr(());

impl fmt::Display for InvalidCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid address range: expected ADDRESS or ADDRESS/PREFIX")
    }
}

impl std::error::Error for InvalidCidr {}

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            None => s
                .parse::<IpAddr>()
                .map(Cidr::from)
                .map_err(|_| InvalidCidr(())),
            Some((addr, prefix)) => {
                let addr = addr.parse::<IpAddr>().map_err(|_| InvalidCidr(()))?;
                let prefix = prefix.parse::<u8>().map_err(|_| InvalidCidr(()))?;
                // A prefix on an IPv4-mapped IPv6 address counts in IPv6 bits.
                let (addr, prefix) = match (addr, addr.to_canonical()) {
                    (IpAddr::V6(_), IpAddr::V4(v4)) if prefix >= 96 => {
                        (IpAddr::V4(v4), prefix - 96)
                    }
                    _ => (addr, prefix),
                };
                Cidr::new(addr, prefix).ok_or(InvalidCidr(()))
            }
        }
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How to find a request's client address: the connection's peer, or, when the peer is a
/// trusted proxy, the address that proxy reported in `X-Forwarded-For` or `Forwarded`.
///
/// ```
/// use std::net::IpAddr;
/// use lbkit::forwarded::ClientIp;
///
/// let lb: IpAddr = "10.0.0.2".parse().unwrap();
/// let client_ip = ClientIp::trusting(["10.0.0.0/8".parse::<lbkit::forwarded::Cidr>().unwrap()]);
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-forwarded-for", "198.51.100.7, 203.0.113.9, 10.0.0.1".parse().unwrap());
/// // From the trusted load balancer: the right-most address that is not a trusted proxy.
/// assert_eq!(client_ip.resolve(&headers, Some(lb)), Some("203.0.113.9".parse().unwrap()));
/// // From anyone else, the header is ignored.
/// let other: IpAddr = "192.0.2.1".parse().unwrap();
/// assert_eq!(client_ip.resolve(&headers, Some(other)), Some(other));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientIp {
    trusted: Vec<Cidr>,
    header: ForwardedHeaders,
}

impl ClientIp {
    /// The connection's peer address only; forwarding headers are never read.
    pub fn peer() -> Self {
        ClientIp {
            trusted: Vec::new(),
            header: ForwardedHeaders::None,
        }
    }

    /// Reads `X-Forwarded-For` when the peer is in one of `proxies` (see
    /// [`header`](ClientIp::header) to read `Forwarded` instead).
    pub fn trusting<T: Into<Cidr>>(proxies: impl IntoIterator<Item = T>) -> Self {
        ClientIp {
            trusted: proxies.into_iter().map(Into::into).collect(),
            header: ForwardedHeaders::XForwarded,
        }
    }

    /// Sets which header the trusted proxies write: `X-Forwarded-For`
    /// ([`ForwardedHeaders::XForwarded`], the default), RFC 7239 `Forwarded`
    /// ([`ForwardedHeaders::Forwarded`]), either (`Both`: `Forwarded` when present, else
    /// `X-Forwarded-For`), or none. Read only the header your proxies overwrite or append to:
    /// the other one passes through from the client unchecked.
    pub fn header(mut self, header: ForwardedHeaders) -> Self {
        self.header = header;
        self
    }

    /// The trusted proxy ranges.
    pub fn trusted(&self) -> &[Cidr] {
        &self.trusted
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client address of a request with `headers` that came from `peer`.
    ///
    /// `None` without a peer. The peer's address when it is not trusted, when the header is
    /// absent or malformed, or when the client entry is not an address (`unknown`, an
    /// obfuscated node). Otherwise the right-most forwarded address that is not a trusted
    /// proxy, or the left-most one if all of them are.
    pub fn resolve(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if self.header == ForwardedHeaders::None || !self.is_trusted(peer) {
            return Some(peer);
        }
        let trusted = |ip: IpAddr| self.is_trusted(ip);
        let use_forwarded = match self.header {
            ForwardedHeaders::Forwarded => true,
            ForwardedHeaders::Both => headers.contains_key(FORWARDED),
            _ => false,
        };
        let found = if use_forwarded {
            let nodes = headers
                .get_all(FORWARDED)
                .iter()
                .flat_map(|v| forwarded_for_nodes(v.as_bytes()));
            client_from_chain(nodes, trusted)
        } else {
            let nodes = headers
                .get_all("x-forwarded-for")
                .iter()
                .flat_map(|v| x_forwarded_for_nodes(v.as_bytes()));
            client_from_chain(nodes, trusted)
        };
        Some(found.unwrap_or(peer))
    }

    /// The client address of `req`, from its [`ClientAddr`]
    /// extension and headers (see [`resolve`](ClientIp::resolve)).
    pub fn of<B>(&self, req: &http::Request<B>) -> Option<IpAddr> {
        self.resolve(req.headers(), ClientAddr::of(req).map(|a| a.ip()))
    }
}

/// The client in a chain of forwarded nodes, oldest first (as the headers list them): the
/// right-most node that `is_trusted` rejects, or the left-most node if all are trusted.
///
/// `None` for an empty chain, or when that node is not an address (`None` items stand for
/// `unknown`, obfuscated and malformed nodes).
///
/// ```
/// use lbkit::forwarded::parse::{client_from_chain, x_forwarded_for_nodes};
///
/// let proxy = |ip: std::net::IpAddr| ip.to_string().starts_with("10.");
/// let chain = x_forwarded_for_nodes(b"203.0.113.9, 10.0.0.1");
/// assert_eq!(client_from_chain(chain, proxy), Some("203.0.113.9".parse().unwrap()));
/// let chain = x_forwarded_for_nodes(b"203.0.113.9, garbage, 10.0.0.1");
/// assert_eq!(client_from_chain(chain, proxy), None);
/// ```
pub fn client_from_chain<I, F>(chain: I, is_trusted: F) -> Option<IpAddr>
where
    I: IntoIterator<Item = Option<IpAddr>>,
    F: Fn(IpAddr) -> bool,
{
    // One forward pass: the last untrusted node seen is the right-most one.
    let mut first: Option<Option<IpAddr>> = None;
    let mut untrusted: Option<Option<IpAddr>> = None;
    for node in chain {
        if first.is_none() {
            first = Some(node);
        }
        match node {
            Some(ip) if is_trusted(ip) => {}
            other => untrusted = Some(other),
        }
    }
    untrusted.or(first).flatten().map(|ip| ip.to_canonical())
}

/// The nodes of one `X-Forwarded-For` value, left to right: one item per comma-separated
/// entry, `None` for an entry that is not an address. Entries may carry a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
pub fn x_forwarded_for_nodes(value: &[u8]) -> impl Iterator<Item = Option<IpAddr>> + '_ {
    value
        .split(|&b| b == b',')
        .map(trim)
        // `a,,b` and trailing commas: skip empty list elements, as RFC 9110 §5.6.1 allows.
        .filter(|e| !e.is_empty())
        .map(parse_node)
}

/// The `for=` nodes of one RFC 7239 `Forwarded` value, left to right: one item per
/// forwarded-element, `None` when the element has no `for=` (or more than one), when the node
/// is `unknown` or obfuscated (`_hidden`), or when the element is malformed (such as an
/// unterminated quoted string).
///
/// ```
/// use lbkit::forwarded::parse::forwarded_for_nodes;
///
/// let v = br#"for=192.0.2.60;proto=http, For="[2001:db8:cafe::17]:4711", for=unknown"#;
/// let nodes: Vec<_> = forwarded_for_nodes(v).collect();
/// assert_eq!(nodes, [
///     Some("192.0.2.60".parse().unwrap()),
///     Some("2001:db8:cafe::17".parse().unwrap()),
///     None,
/// ]);
/// ```
pub fn forwarded_for_nodes(value: &[u8]) -> ForwardedNodes<'_> {
    ForwardedNodes { rest: value }
}

/// The iterator of [`forwarded_for_nodes`].
#[derive(Clone, Debug)]
pub struct ForwardedNodes<'a> {
    rest: &'a [u8],
}

impl Iterator for ForwardedNodes<'_> {
    type Item = Option<IpAddr>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let (element, rest) = split_top_level(self.rest, b',');
            self.rest = rest;
            let element = trim(element);
            if element.is_empty() {
                continue;
            }
            return Some(element_for(element));
        }
    }
}

/// The `for=` node of one forwarded-element.
fn element_for(element: &[u8]) -> Option<IpAddr> {
    let mut rest = element;
    let mut found: Option<&[u8]> = None;
    while !rest.is_empty() {
        let (pair, tail) = split_top_level(rest, b';');
        rest = tail;
        let pair = trim(pair);
        if pair.is_empty() {
            continue;
        }
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (name, value) = (trim(&pair[..eq]), trim(&pair[eq + 1..]));
        if !name.eq_ignore_ascii_case(b"for") {
            continue;
        }
        if found.is_some() {
            // A parameter may appear once per element (RFC 7239 §4).
            return None;
        }
        found = Some(unquote(value)?);
    }
    parse_node(found?)
}

/// Splits at the first `sep` outside a quoted string; an unterminated quote runs to the end.
fn split_top_level(s: &[u8], sep: u8) -> (&[u8], &[u8]) {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            return (&s[..i], &s[i + 1..]);
        }
    }
    (s, &[])
}

/// A token as is, or the inside of a quoted string without escapes (an address never needs
/// one); `None` for anything else.
fn unquote(value: &[u8]) -> Option<&[u8]> {
    match value {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') && !inner.contains(&b'"') => {
            Some(inner)
        }
        v if !v.is_empty() && !v.contains(&b'"') => Some(v),
        _ => None,
    }
}

/// Parses one forwarded node: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`, surrounded by optional whitespace. `None` for anything else, including
/// `unknown` and obfuscated identifiers.
///
/// ```
/// use lbkit::forwarded::parse::parse_node;
///
/// assert_eq!(parse_node(b"[::1]:80"), Some("::1".parse().unwrap()));
/// assert_eq!(parse_node(b" 192.0.2.1 "), Some("192.0.2.1".parse().unwrap()));
/// assert_eq!(parse_node(b"unknown"), None);
/// assert_eq!(parse_node(b"\xff"), None);
/// ```
pub fn parse_node(node: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(trim(node)).ok()?;
    // Addresses are short; skip the parsers for anything long.
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<Ipv6Addr>()
        .ok()
        .map(|v6| IpAddr::V6(v6).to_canonical())
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(c.contains(ip("::ffff:10.0.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert!(c.contains(ip("fd12::1")));
        assert!(!c.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, "10.0.0.0/8".parse().unwrap());
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            "10.1.2.3/16".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
    }

    #[test]
    fn nodes() {
        assert_eq!(parse_node(b"192.0.2.1:80"), Some(ip("192.0.2.1")));
        assert_eq!(parse_node(b"[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node(b"2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node(b"::ffff:192.0.2.1"), Some(ip("192.0.2.1")));
        for bad in [
            &b""[..],
            b"_hidden",
            b"unknown",
            b"[::1",
            b"1.2.3",
            b"[1.2.3.4]",
        ] {
            assert_eq!(parse_node(bad), None);
        }
    }

    #[test]
    fn xff_chain() {
        let trusted = |i: IpAddr| Cidr::from_str("10.0.0.0/8").unwrap().contains(i);
        let chain = |v: &'static [u8]| client_from_chain(x_forwarded_for_nodes(v), trusted);
        assert_eq!(chain(b"203.0.113.9"), Some(ip("203.0.113.9")));
        assert_eq!(
            chain(b"1.1.1.1, 203.0.113.9, 10.0.0.1"),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(chain(b"10.0.0.3 , 10.0.0.1"), Some(ip("10.0.0.3")));
        assert_eq!(chain(b"203.0.113.9,,"), Some(ip("203.0.113.9")));
        assert_eq!(chain(b""), None);
        assert_eq!(chain(b"1.1.1.1, junk"), None);
        assert_eq!(chain(b"junk, 1.1.1.1"), Some(ip("1.1.1.1")));
    }

    #[test]
    fn forwarded_elements() {
        let nodes = |v: &'static [u8]| forwarded_for_nodes(v).collect::<Vec<_>>();
        assert_eq!(
            nodes(br#"for="_gazonk""#),
            [None],
            "obfuscated identifiers are not addresses"
        );
        assert_eq!(
            nodes(br#"proto=https;for=192.0.2.43, for="[::1]";host="a,b;c""#),
            [Some(ip("192.0.2.43")), Some(ip("::1"))]
        );
        assert_eq!(nodes(b"by=10.0.0.1"), [None]);
        assert_eq!(nodes(b"for=1.1.1.1;for=2.2.2.2"), [None]);
        assert_eq!(nodes(br#"for="1.1.1.1"#), [None]);
        assert_eq!(
            nodes(br#"for="[::1]\"x", for=2.2.2.2"#),
            [None, Some(ip("2.2.2.2"))]
        );
        assert_eq!(nodes(b",, ,"), []);
    }

    #[test]
    fn resolve_only_from_trusted_peers() {
        let c = ClientIp::trusting([ip("127.0.0.1")]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        h.insert(FORWARDED, "for=198.51.100.1".parse().unwrap());
        assert_eq!(
            c.resolve(&h, Some(ip("127.0.0.1"))),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(c.resolve(&h, Some(ip("192.0.2.5"))), Some(ip("192.0.2.5")));
        assert_eq!(c.resolve(&h, None), None);
        let f = c.clone().header(ForwardedHeaders::Forwarded);
        assert_eq!(
            f.resolve(&h, Some(ip("127.0.0.1"))),
            Some(ip("198.51.100.1"))
        );
        let both = c.clone().header(ForwardedHeaders::Both);
        assert_eq!(
            both.resolve(&h, Some(ip("127.0.0.1"))),
            Some(ip("198.51.100.1"))
        );
        h.remove(FORWARDED);
        assert_eq!(
            both.resolve(&h, Some(ip("127.0.0.1"))),
            Some(ip("203.0.113.9"))
        );
        // Malformed: fall back to the peer.
        h.insert("x-forwarded-for", "nonsense".parse().unwrap());
        assert_eq!(c.resolve(&h, Some(ip("127.0.0.1"))), Some(ip("127.0.0.1")));
        assert_eq!(
            ClientIp::peer().resolve(&h, Some(ip("127.0.0.1"))),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn multiple_header_lines_are_one_list() {
        let c = ClientIp::trusting([ip("10.0.0.1"), ip("10.0.0.2")]);
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        assert_eq!(c.resolve(&h, Some(ip("10.0.0.1"))), Some(ip("203.0.113.9")));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_node(&bytes);
            let _ = x_forwarded_for_nodes(&bytes).count();
            let _ = forwarded_for_nodes(&bytes).count();
            let _ = client_from_chain(forwarded_for_nodes(&bytes), |_| true);
        }

        #[test]
        fn forwarded_like_input_never_panics(s in r#"[ ,;="\[\]:a-f0-9.forFOR_\\]{0,80}"#) {
            let _ = forwarded_for_nodes(s.as_bytes()).count();
            let _ = x_forwarded_for_nodes(s.as_bytes()).count();
        }
    }
}
