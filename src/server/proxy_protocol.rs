//! The PROXY protocol (HAProxy's, versions 1 and 2): how an L4 balancer in front (AWS NLB,
//! HAProxy in TCP mode, another lbkit `TcpProxy`) tells the server behind it who the client is.
//!
//! The header is parsed by the `ppp` crate (the PROXY protocol parser of the Rust ecosystem,
//! both versions); this module reads exactly the header's bytes from the connection, bounded in
//! size and time, and decides whether to believe it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ppp::v2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forwarded::Cidr;

/// The most bytes a version 2 header may carry after its 16-byte prefix (addresses and TLVs).
/// AWS NLB and HAProxy send well under 1 KiB; a longer header is refused.
const MAX_V2_PAYLOAD: usize = 4096;
/// A version 1 header is one line of at most 107 bytes, CRLF included (the specification's
/// bound).
const MAX_V1_LEN: usize = 107;
/// The first bytes of the version 2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Accepting the PROXY protocol on a listener: from the trusted peers (the L4 balancers in
/// front), every connection must start with a PROXY header (version 1 or 2, as nginx's
/// `proxy_protocol` and HAProxy's `accept-proxy` require), whose source address becomes the
/// connection's client address; connections from any other peer are refused, so nobody else
/// can claim an address. No peer is trusted by default.
///
/// The header must arrive within [`timeout`](ProxyProtocol::timeout) (default 5 s); a
/// version 2 header longer than 4 KiB is refused. A `LOCAL` header (version 2; the balancer's
/// own health check) or `UNKNOWN` (version 1) keeps the peer's address.
///
/// ```
/// use lbkit::server::ProxyProtocol;
///
/// let nlb = ProxyProtocol::trusting(["10.0.0.0/8".parse::<lbkit::forwarded::Cidr>().unwrap()]);
/// # let _ = nlb;
/// ```
#[derive(Clone, Debug)]
pub struct ProxyProtocol {
    trusted: Arc<[Cidr]>,
    timeout: Duration,
}

impl ProxyProtocol {
    /// Takes PROXY headers from peers in `peers` and refuses every other peer.
    pub fn trusting<T: Into<Cidr>>(peers: impl IntoIterator<Item = T>) -> Self {
        ProxyProtocol {
            trusted: peers.into_iter().map(Into::into).collect(),
            timeout: Duration::from_secs(5),
        }
    }

    /// How long a trusted peer may take to send the whole header (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether `peer` may send PROXY headers.
    pub fn is_trusted(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// Reads the PROXY header at the start of `stream` from `peer`, and returns the client's
    /// address it names (or `peer` for a `LOCAL`/`UNKNOWN` header). Reads exactly the header:
    /// what follows it stays in the stream for the protocol it carries.
    pub async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, ProxyProtocolError> {
        if !self.is_trusted(peer) {
            return Err(ProxyProtocolError::new(Kind::Untrusted, peer));
        }
        match tokio::time::timeout(self.timeout, read_header(stream)).await {
            Ok(Ok(Some(client))) => Ok(client),
            Ok(Ok(None)) => Ok(peer),
            Ok(Err(kind)) => Err(ProxyProtocolError::new(kind, peer)),
            Err(_) => Err(ProxyProtocolError::new(Kind::Timeout, peer)),
        }
    }
}

/// Reads one header; `Some(client)` for a proxied connection, `None` for a local one.
async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, Kind> {
    let mut buf = [0u8; 16 + MAX_V2_PAYLOAD];
    // Both versions are at least 15 bytes long ("PROXY UNKNOWN\r\n"), so 12 never reads past
    // a header.
    stream.read_exact(&mut buf[..12]).await.map_err(Kind::Io)?;
    if &buf[..12] == V2_SIGNATURE {
        stream
            .read_exact(&mut buf[12..16])
            .await
            .map_err(Kind::Io)?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_V2_PAYLOAD {
            return Err(Kind::TooLong);
        }
        stream
            .read_exact(&mut buf[16..16 + len])
            .await
            .map_err(Kind::Io)?;
        return parse_v2(&buf[..16 + len]);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(Kind::Missing);
    }
    // Version 1: one line. Peek at what has arrived: usually the whole line, read at once.
    let mut len = 12;
    let mut peeked = [0u8; MAX_V1_LEN];
    let n = stream.peek(&mut peeked).await.map_err(Kind::Io)?;
    let end = peeked[..n]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|at| at + 2)
        .filter(|end| len + end <= MAX_V1_LEN);
    match end {
        Some(end) => {
            stream
                .read_exact(&mut buf[len..len + end])
                .await
                .map_err(Kind::Io)?;
            len += end;
        }
        None => {
            // Split over several segments: one byte at a time to the end of the line, so
            // nothing past it is read.
            while !buf[..len].ends_with(b"\r\n") {
                if len >= MAX_V1_LEN {
                    return Err(Kind::TooLong);
                }
                stream
                    .read_exact(&mut buf[len..len + 1])
                    .await
                    .map_err(Kind::Io)?;
                len += 1;
            }
        }
    }
    parse_v1(&buf[..len])
}

/// The client address of a complete version 1 header.
fn parse_v1(header: &[u8]) -> Result<Option<SocketAddr>, Kind> {
    match ppp::v1::Header::try_from(header) {
        Ok(h) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Unknown => None,
        }),
        Err(_) => Err(Kind::Malformed),
    }
}

/// The client address of a complete version 2 header.
fn parse_v2(header: &[u8]) -> Result<Option<SocketAddr>, Kind> {
    let h = v2::Header::try_from(header).map_err(|_| Kind::Malformed)?;
    if h.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        // A UNIX socket or an unspecified family names no IP client: keep the peer.
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
    })
}

/// Parses a complete PROXY header (version 1 or 2) from `data`: the client address it names
/// (`None` for `LOCAL`/`UNKNOWN`), or why it is refused. For the fuzz target; never panics.
#[doc(hidden)]
pub fn parse_header(data: &[u8]) -> Result<Option<SocketAddr>, ProxyProtocolError> {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let result = if data.starts_with(V2_SIGNATURE) {
        if data.len() > 16 + MAX_V2_PAYLOAD {
            Err(Kind::TooLong)
        } else {
            parse_v2(data)
        }
    } else if data.starts_with(b"PROXY ") {
        if data.len() > MAX_V1_LEN {
            Err(Kind::TooLong)
        } else {
            parse_v1(data)
        }
    } else {
        Err(Kind::Missing)
    };
    result.map_err(|kind| ProxyProtocolError::new(kind, unspecified))
}

/// Writes a version 2 `PROXY` header to `backend` saying that `client` connected to `local`:
/// what [`TcpProxy::send_proxy_protocol`](crate::proxy::TcpProxy::send_proxy_protocol) sends
/// before the client's bytes.
pub(crate) async fn write_v2(
    backend: &mut TcpStream,
    client: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<()> {
    let header = encode_v2(client, local)?;
    backend.write_all(&header).await
}

/// The bytes of a version 2 `PROXY` header for a TCP connection from `client` to `local`.
/// For tests and the fuzz target (what [`write_v2`] sends); not a stable API.
#[doc(hidden)]
pub fn encode_v2(client: SocketAddr, local: SocketAddr) -> std::io::Result<Vec<u8>> {
    // Both addresses in one family: an IPv4 client on an IPv6 socket is sent as IPv4.
    let (client, local) = match (client, local) {
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            match (c.ip().to_ipv4_mapped(), l.ip().to_ipv4_mapped()) {
                (Some(c4), Some(l4)) => (
                    SocketAddr::from((c4, c.port())),
                    SocketAddr::from((l4, l.port())),
                ),
                _ => (client, local),
            }
        }
        (SocketAddr::V4(_), SocketAddr::V6(l)) => match l.ip().to_ipv4_mapped() {
            Some(l4) => (client, SocketAddr::from((l4, l.port()))),
            None => (
                SocketAddr::from((client.ip().to_canonical(), client.port())),
                local,
            ),
        },
        (SocketAddr::V6(c), SocketAddr::V4(_)) => match c.ip().to_ipv4_mapped() {
            Some(c4) => (SocketAddr::from((c4, c.port())), local),
            None => (client, local),
        },
        _ => (client, local),
    };
    let addresses: v2::Addresses = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => v2::IPv4 {
            source_address: *c.ip(),
            source_port: c.port(),
            destination_address: *l.ip(),
            destination_port: l.port(),
        }
        .into(),
        (SocketAddr::V6(c), SocketAddr::V6(l)) => v2::IPv6 {
            source_address: *c.ip(),
            source_port: c.port(),
            destination_address: *l.ip(),
            destination_port: l.port(),
        }
        .into(),
        // Mixed families that cannot be mapped: say only that the connection is proxied.
        _ => v2::Addresses::Unspecified,
    };
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        addresses,
    )
    .build()
}

/// Why a connection's PROXY header was refused. The connection is closed.
pub struct ProxyProtocolError {
    kind: Kind,
    peer: SocketAddr,
}

#[derive(Debug)]
enum Kind {
    Untrusted,
    Missing,
    Malformed,
    TooLong,
    Timeout,
    Io(std::io::Error),
}

impl ProxyProtocolError {
    fn new(kind: Kind, peer: SocketAddr) -> Self {
        ProxyProtocolError { kind, peer }
    }

    /// The peer is not one of the trusted balancers.
    pub fn is_untrusted(&self) -> bool {
        matches!(self.kind, Kind::Untrusted)
    }

    /// The connection did not start with a PROXY header, or the header is not valid (including
    /// one longer than allowed).
    pub fn is_malformed(&self) -> bool {
        matches!(self.kind, Kind::Missing | Kind::Malformed | Kind::TooLong)
    }

    /// The header did not arrive in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Timeout)
    }

    /// The connection failed or closed before the header was complete.
    pub fn is_io(&self) -> bool {
        matches!(self.kind, Kind::Io(_))
    }

    /// The peer that sent (or should have sent) the header.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
}

impl fmt::Debug for ProxyProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyProtocolError")
            .field("kind", &self.kind)
            .field("peer", &self.peer)
            .finish()
    }
}

impl fmt::Display for ProxyProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer = self.peer;
        match &self.kind {
            Kind::Untrusted => write!(f, "PROXY protocol: {peer} is not a trusted balancer"),
            Kind::Missing => write!(f, "PROXY protocol: {peer} sent no PROXY header"),
            Kind::Malformed => write!(f, "PROXY protocol: invalid header from {peer}"),
            Kind::TooLong => write!(f, "PROXY protocol: header from {peer} too long"),
            Kind::Timeout => write!(f, "PROXY protocol: no complete header from {peer} in time"),
            Kind::Io(e) => write!(f, "PROXY protocol: reading the header from {peer}: {e}"),
        }
    }
}

impl std::error::Error for ProxyProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Io(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_versions_and_refuses_garbage() {
        let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 4711 80\r\n";
        assert_eq!(
            parse_header(v1).unwrap(),
            Some("203.0.113.9:4711".parse().unwrap())
        );
        assert_eq!(parse_header(b"PROXY UNKNOWN\r\n").unwrap(), None);
        let v6 = encode_v2(
            "[2001:db8::1]:5000".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            parse_header(&v6).unwrap(),
            Some("[2001:db8::1]:5000".parse().unwrap())
        );
        let mapped = encode_v2(
            "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            "[::ffff:10.0.0.1]:80".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            parse_header(&mapped).unwrap(),
            Some("192.0.2.1:5000".parse().unwrap())
        );
        assert!(parse_header(b"GET / HTTP/1.1\r\n")
            .unwrap_err()
            .is_malformed());
        assert!(parse_header(b"PROXY TCP4 x y z w\r\n")
            .unwrap_err()
            .is_malformed());
        let mut long = v6.clone();
        long.resize(16 + MAX_V2_PAYLOAD + 1, 0);
        assert!(parse_header(&long).unwrap_err().is_malformed());
    }
}
