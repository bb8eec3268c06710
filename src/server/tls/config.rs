//! [`TlsConfig`]: a listener's rustls configuration from a [`CertStore`]: client
//! certificates, session resumption and ALPN.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{NoServerSessionStorage, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use super::store::CertStore;
use super::{parse_certs, Kind, TlsError, ALPN_H2, ALPN_HTTP11};

/// How many TLS sessions the server remembers for resumption by default: HAProxy's
/// `tune.ssl.cachesize` (20 000); a few hundred bytes each (more with client certificates,
/// whose chain a session keeps).
const SESSION_CACHE: usize = 20_000;

/// One TLS listener's configuration: which certificates it serves (a [`CertStore`]), whether
/// it asks for client certificates, session resumption and ALPN. [`build`](Self::build) gives
/// the rustls `ServerConfig` for [`Server::tls`](crate::server::Server::tls).
///
/// Defaults, as nginx and HAProxy ship them: no client certificates; session resumption on,
/// with TLS 1.3 tickets (stateless, keys made at start and rotated every 6 hours by rustls'
/// ring ticketer) and a cache of 20 000 sessions for TLS 1.2 session ids and clients without
/// tickets; ALPN `h2` then `http/1.1`. TLS 1.2 and 1.3 with rustls' safe cipher suites.
///
/// Resumption is per process: tickets from one instance do not resume on another.
///
/// ```no_run
/// use lbkit::server::tls::{CertStore, ClientAuth, TlsConfig};
/// # fn run() -> Result<(), lbkit::server::tls::TlsError> {
/// let certs = CertStore::builder().default_cert("cert.pem", "key.pem").build()?;
/// // An internal listener: clients must show a certificate from our CA, HTTP/1.1 only.
/// let config = TlsConfig::new(certs)
///     .client_auth(ClientAuth::required("clients-ca.pem"))
///     .alpn(["http/1.1"])
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct TlsConfig {
    certs: CertStore,
    client_auth: Option<ClientAuth>,
    alpn: Vec<Vec<u8>>,
    session_cache: usize,
    tickets: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("certs", &self.certs)
            .field("client_auth", &self.client_auth)
            .field(
                "alpn",
                &self
                    .alpn
                    .iter()
                    .map(|p| String::from_utf8_lossy(p))
                    .collect::<Vec<_>>(),
            )
            .field("session_cache", &self.session_cache)
            .field("tickets", &self.tickets)
            .finish()
    }
}

impl TlsConfig {
    /// A configuration serving `certs`, with the defaults above.
    pub fn new(certs: CertStore) -> Self {
        TlsConfig {
            certs,
            client_auth: None,
            alpn: vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            session_cache: SESSION_CACHE,
            tickets: true,
        }
    }

    /// Asks clients for certificates and verifies them against a CA bundle (default: not
    /// asked). The verified identity reaches every request of the connection as a
    /// [`PeerCertificate`](super::PeerCertificate) extension.
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = Some(auth);
        self
    }

    /// The protocols offered by ALPN, most preferred first (default `h2`, `http/1.1`). The
    /// server serves what was chosen: `h2` as HTTP/2, `http/1.1` as HTTP/1.1, anything else
    /// (or none) by sniffing the HTTP/2 preface. Empty: no ALPN (clients that insist on it
    /// fail the handshake, as the RFC wants).
    pub fn alpn<P: AsRef<[u8]>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// How many sessions the server remembers for resumption by session id (TLS 1.2) or
    /// stateful tickets (TLS 1.3 when [tickets](Self::session_tickets) are off). Default
    /// 20 000; 0 turns the cache off.
    pub fn session_cache(mut self, sessions: usize) -> Self {
        self.session_cache = sessions;
        self
    }

    /// Whether the server issues session tickets (default on): the session is sealed into
    /// the ticket the client keeps, so resumption costs the server no memory.
    pub fn session_tickets(mut self, on: bool) -> Self {
        self.tickets = on;
        self
    }

    /// The rustls configuration: the store resolves certificates by SNI (and follows its
    /// reloads), the client verifier from the CA bundle, resumption, ALPN.
    ///
    /// Fails if the CA bundle cannot be read or holds no usable certificate (the error names
    /// it), or if rustls refuses the settings.
    pub fn build(self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(Kind::Config, Some(e.into())))?;
        let builder = match &self.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => {
                let roots = auth.roots()?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
                let verifier = if auth.required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::new(Kind::Config, Some(e.into())).at(&auth.ca))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(self.certs));
        config.alpn_protocols = self.alpn;
        config.session_storage = if self.session_cache == 0 {
            Arc::new(NoServerSessionStorage {})
        } else {
            ServerSessionMemoryCache::new(self.session_cache)
        };
        if self.tickets {
            config.ticketer = rustls::crypto::ring::Ticketer::new()
                .map_err(|e| TlsError::new(Kind::Config, Some(e.into())))?;
        }
        Ok(Arc::new(config))
    }
}

/// Client certificates (mutual TLS) on a listener: which CAs a client certificate must chain
/// to, and whether clients without one are still served.
///
/// The CA bundle is PEM (one or more `CERTIFICATE` sections), read when the
/// [`TlsConfig`] is built. A client certificate is checked as a TLS client certificate by
/// webpki (chain to one of the CAs, validity dates, the `clientAuth` extended key usage when
/// present); its identity then reaches the requests as a
/// [`PeerCertificate`](super::PeerCertificate).
#[derive(Clone, Debug)]
pub struct ClientAuth {
    ca: PathBuf,
    required: bool,
}

impl ClientAuth {
    /// Every client must present a certificate that verifies against the CAs in `ca_bundle`;
    /// a client without one, or with another, fails the handshake (nginx's `ssl_verify_client
    /// on`).
    pub fn required(ca_bundle: impl AsRef<Path>) -> Self {
        ClientAuth {
            ca: ca_bundle.as_ref().to_owned(),
            required: true,
        }
    }

    /// Clients may present a certificate; one that does must verify against `ca_bundle`
    /// (nginx's `ssl_verify_client optional`). Requests from clients without one carry no
    /// [`PeerCertificate`](super::PeerCertificate).
    pub fn optional(ca_bundle: impl AsRef<Path>) -> Self {
        ClientAuth {
            ca: ca_bundle.as_ref().to_owned(),
            required: false,
        }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let pem = std::fs::read(&self.ca)
            .map_err(|e| TlsError::new(Kind::Io, Some(e.into())).at(&self.ca))?;
        let mut roots = RootCertStore::empty();
        for cert in parse_certs(&pem).map_err(|e| e.at(&self.ca))? {
            roots
                .add(cert)
                .map_err(|e| TlsError::new(Kind::BadCertificate, Some(e.into())).at(&self.ca))?;
        }
        Ok(Arc::new(roots))
    }
}
