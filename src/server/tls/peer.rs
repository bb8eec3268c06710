//! The names inside certificates, read with x509-parser: a client certificate's identity for
//! the request layers ([`PeerCertificate`]), and the DNS names a served certificate is chosen
//! by.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// One subject alternative name of a certificate (RFC 5280, 4.2.1.6): the kinds a client
/// identity is checked against in practice (DNS names, SPIFFE-style URIs, IP addresses, e-mail
/// addresses).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubjectAltName {
    /// A `dNSName`, as written in the certificate (e.g. `client.example.com`).
    Dns(String),
    /// A `uniformResourceIdentifier` (e.g. a SPIFFE id, `spiffe://example.org/ns/web`).
    Uri(String),
    /// An `iPAddress`.
    Ip(IpAddr),
    /// An `rfc822Name` (an e-mail address).
    Email(String),
}

impl fmt::Display for SubjectAltName {
    /// As OpenSSL prints them: `DNS:a.example`, `URI:spiffe://x`, `IP:10.0.0.1`, `email:a@b`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectAltName::Dns(name) => write!(f, "DNS:{name}"),
            SubjectAltName::Uri(uri) => write!(f, "URI:{uri}"),
            SubjectAltName::Ip(ip) => write!(f, "IP:{ip}"),
            SubjectAltName::Email(email) => write!(f, "email:{email}"),
        }
    }
}

/// The verified certificate a client presented on a TLS connection (mTLS): the server inserts
/// it into the extensions of every request of that connection, so layers and handlers can
/// authorize, route or hash on the client's identity.
///
/// Only present when the listener asks for client certificates
/// ([`ClientAuth`](super::ClientAuth)) and the client sent one that verified against the CA
/// bundle; a client without a certificate on an optional listener has no extension. Cloning
/// is cheap (one shared allocation per connection, parsed once at the handshake).
///
/// ```
/// # use http::Request;
/// use lbkit::server::tls::PeerCertificate;
///
/// fn client_id<B>(req: &Request<B>) -> Option<&str> {
///     req.extensions().get::<PeerCertificate>()?.uris().next()
/// }
/// # assert_eq!(client_id(&Request::new(())), None);
/// ```
#[derive(Clone)]
pub struct PeerCertificate(Arc<Peer>);

struct Peer {
    chain: Vec<CertificateDer<'static>>,
    subject: String,
    sans: Vec<SubjectAltName>,
}

impl PeerCertificate {
    /// The identity in `chain` (the client's certificate first, as rustls gives it), or `None`
    /// for an empty chain. A certificate x509-parser cannot read (rustls accepted it, so this
    /// is unlikely) gives an empty subject and no SANs, but keeps its DER.
    pub fn from_chain(chain: Vec<CertificateDer<'static>>) -> Option<Self> {
        let leaf = chain.first()?;
        let (subject, sans) = match names(leaf) {
            Ok(names) => names,
            Err(e) => {
                tracing::debug!(error = %e, "client certificate names unreadable");
                (String::new(), Vec::new())
            }
        };
        Some(PeerCertificate(Arc::new(Peer {
            chain,
            subject,
            sans,
        })))
    }

    /// The client's certificate, DER-encoded.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.0.chain[0]
    }

    /// The chain the client sent, its own certificate first (intermediates, if it sent any,
    /// after it).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.0.chain
    }

    /// The subject's distinguished name as a string, RFC 4514 style (`CN=client, O=Example`).
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// All subject alternative names of the kinds in [`SubjectAltName`], in certificate order.
    pub fn sans(&self) -> &[SubjectAltName] {
        &self.0.sans
    }

    /// The DNS names among the [SANs](Self::sans).
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.0.sans.iter().filter_map(|san| match san {
            SubjectAltName::Dns(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The URIs among the [SANs](Self::sans) (SPIFFE ids, for one).
    pub fn uris(&self) -> impl Iterator<Item = &str> {
        self.0.sans.iter().filter_map(|san| match san {
            SubjectAltName::Uri(uri) => Some(uri.as_str()),
            _ => None,
        })
    }

    /// The IP addresses among the [SANs](Self::sans).
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.0.sans.iter().filter_map(|san| match san {
            SubjectAltName::Ip(ip) => Some(*ip),
            _ => None,
        })
    }
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("subject", &self.0.subject)
            .field("sans", &self.0.sans)
            .field("chain_len", &self.0.chain.len())
            .finish()
    }
}

/// The subject (as a string) and the subject alternative names of a DER certificate.
pub(super) fn names(
    der: &[u8],
) -> Result<(String, Vec<SubjectAltName>), x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    let subject = cert.subject().to_string();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            sans.extend(match name {
                GeneralName::DNSName(n) => Some(SubjectAltName::Dns((*n).to_owned())),
                GeneralName::URI(u) => Some(SubjectAltName::Uri((*u).to_owned())),
                GeneralName::RFC822Name(e) => Some(SubjectAltName::Email((*e).to_owned())),
                GeneralName::IPAddress(b) => ip(b).map(SubjectAltName::Ip),
                _ => None,
            });
        }
    }
    Ok((subject, sans))
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The identity on a finished server-side handshake, if the client sent a certificate.
pub(crate) fn peer_certificate(conn: &rustls::ServerConnection) -> Option<PeerCertificate> {
    PeerCertificate::from_chain(conn.peer_certificates()?.to_vec())
}
