//! TLS from [`Forward`](super::Forward) to the backends ([`UpstreamTls`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::uri::Authority;
use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::ForwardError;
use crate::server::tls::{parse_certs, parse_key, TlsError, TlsErrorKind as Kind};

/// TLS to the backends (HTTPS upstreams, nginx's `proxy_pass https://` or HAProxy's `ssl` on
/// a `server` line), for [`Forward::tls`](super::Forward::tls).
///
/// Each new connection to a backend does a TLS handshake that checks the backend's
/// certificate against the trusted CAs and against a name, which is, first found:
/// the name set with [`server_name`](UpstreamTlsBuilder::server_name) (every backend presents
/// a certificate for it, as with nginx's `proxy_ssl_name`); the endpoint's host name
/// ([`Endpoint::with_host`](crate::Endpoint::with_host), which DNS discovery sets to the name
/// it looked up); else the endpoint's address (an IP address in the certificate's subject
/// alternative names, or the host of an endpoint named `host:port`). The same name is sent as
/// SNI, unless it is an IP address.
///
/// The HTTP version goes by ALPN: connections of the HTTP/1.1 pool offer `http/1.1` and those
/// of the HTTP/2 pool `h2` (which requests go over which is [`UpstreamProtocol`]'s choice), so
/// a backend that does not speak the protocol chosen fails the handshake (a
/// [`ForwardError::is_tls`]) rather than a request later. A backend that answers with no ALPN
/// at all is spoken to in the chosen protocol.
///
/// A failed handshake (an untrusted or expired certificate, a wrong name, no protocol in
/// common) fails the request with [`ForwardError::is_tls`], which
/// [`ErrorResponseLayer`](super::ErrorResponseLayer) answers with 502; as the request was not
/// sent, the failover layer may try another endpoint. The handshake is bounded by the
/// [`connect_timeout`](super::Forward::connect_timeout).
///
/// ```no_run
/// use lbkit::proxy::{Forward, UpstreamTls};
/// use lbkit::Endpoint;
///
/// # fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let tls = UpstreamTls::builder()
///     .ca_file("/etc/lbkit/backend-ca.pem")          // the CA that signed the backends
///     .client_cert_files("proxy.pem", "proxy.key")  // if the backends ask for one (mTLS)
///     .build()?;
/// let forward = Forward::<lbkit::server::RequestBody>::new().tls(tls);
/// // Checked against `api.internal`, connected to at 10.0.0.7:8443:
/// let endpoint = Endpoint::from("10.0.0.7:8443").with_host("api.internal");
/// # let _ = (forward, endpoint); Ok(()) }
/// ```
///
/// [`UpstreamProtocol`]: super::UpstreamProtocol
/// [`ForwardError::is_tls`]: super::ForwardError::is_tls
#[derive(Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// A builder: trusted CAs from PEM, an optional client certificate and a fixed name.
    pub fn builder() -> UpstreamTlsBuilder {
        UpstreamTlsBuilder::default()
    }

    /// TLS with a rustls configuration of your own: other roots (such as the `webpki-roots`
    /// or the platform's), a custom certificate verifier, session settings. Its ALPN list is
    /// replaced per pool (see above); it should use the `ring` provider or another installed
    /// one.
    pub fn from_config(config: impl Into<Arc<ClientConfig>>) -> Self {
        UpstreamTls {
            config: config.into(),
            server_name: None,
        }
    }

    /// The connector of one pool, offering `alpn`.
    pub(crate) fn connect(&self, alpn: &[u8]) -> TlsConnect {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnect {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: self.server_name.clone(),
        }
    }
}

/// Builds an [`UpstreamTls`]; nothing is read until [`build`](UpstreamTlsBuilder::build).
#[derive(Default)]
pub struct UpstreamTlsBuilder {
    cas: Vec<Pem>,
    client: Option<(Pem, Pem)>,
    server_name: Option<String>,
}

/// PEM text, in memory or in a file.
enum Pem {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Pem {
    fn read(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            Pem::Bytes(b) => Ok(b.clone()),
            Pem::File(path) => {
                std::fs::read(path).map_err(|e| TlsError::new(Kind::Io, Some(e.into())).at(path))
            }
        }
    }

    fn path(&self) -> Option<&Path> {
        match self {
            Pem::Bytes(_) => None,
            Pem::File(path) => Some(path),
        }
    }
}

/// Names the file an error is about, if it came from one.
fn at(e: TlsError, pem: &Pem) -> TlsError {
    match pem.path() {
        Some(path) => e.at(path),
        None => e,
    }
}

impl fmt::Debug for UpstreamTlsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTlsBuilder")
            .field("cas", &self.cas.len())
            .field("client_cert", &self.client.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl UpstreamTlsBuilder {
    /// Trusts the CA certificates in this PEM text (one or more `CERTIFICATE` sections).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.cas.push(Pem::Bytes(pem.into()));
        self
    }

    /// Trusts the CA certificates in this PEM file.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.cas.push(Pem::File(path.as_ref().to_owned()));
        self
    }

    /// Presents this certificate chain (PEM, leaf first) and private key (PEM) to backends
    /// that ask for a client certificate (mutual TLS).
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client = Some((Pem::Bytes(cert.into()), Pem::Bytes(key.into())));
        self
    }

    /// Like [`client_cert_pem`](Self::client_cert_pem), from files.
    pub fn client_cert_files(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.client = Some((
            Pem::File(cert.as_ref().to_owned()),
            Pem::File(key.as_ref().to_owned()),
        ));
        self
    }

    /// Checks every backend's certificate against `name` and sends it as SNI, whatever the
    /// endpoint's own host name (nginx's `proxy_ssl_name`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads the PEM text and builds the rustls configuration (TLS 1.2 and 1.3, the `ring`
    /// provider).
    ///
    /// Fails with a [`TlsError`] naming the file, if any: a file cannot be read
    /// ([`is_io`](TlsError::is_io)), no CA was given or a CA PEM holds no certificate
    /// ([`is_no_certificate`](TlsError::is_no_certificate)), malformed PEM
    /// ([`is_bad_pem`](TlsError::is_bad_pem)), a CA that cannot be a trust anchor
    /// ([`is_bad_certificate`](TlsError::is_bad_certificate)), a client key that does not fit
    /// its certificate ([`is_key_mismatch`](TlsError::is_key_mismatch)), or a server name that
    /// is no DNS name or IP address ([`is_bad_name`](TlsError::is_bad_name)).
    pub fn build(self) -> Result<UpstreamTls, TlsError> {
        if self.cas.is_empty() {
            return Err(TlsError::new(
                Kind::NoCertificate,
                Some("no CA to trust: give ca_pem or ca_file".into()),
            ));
        }
        let mut roots = RootCertStore::empty();
        for pem in &self.cas {
            for cert in parse_certs(&pem.read()?).map_err(|e| at(e, pem))? {
                roots
                    .add(cert)
                    .map_err(|e| at(TlsError::new(Kind::BadCertificate, Some(e.into())), pem))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new(Kind::Config, Some(e.into())))?
            .with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = parse_certs(&cert.read()?).map_err(|e| at(e, cert))?;
                let key_der = parse_key(&key.read()?).map_err(|e| at(e, key))?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    let kind = match e {
                        rustls::Error::InconsistentKeys(_) => Kind::KeyMismatch,
                        _ => Kind::BadPem,
                    };
                    at(TlsError::new(kind, Some(e.into())), key)
                })?
            }
        };
        let server_name = match self.server_name {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name)
                    .map_err(|e| TlsError::new(Kind::BadName, Some(e.into())))?,
            ),
        };
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// One pool's TLS: its rustls connector (with the pool's ALPN) and the fixed name, if any.
#[derive(Clone)]
pub(crate) struct TlsConnect {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl TlsConnect {
    /// The handshake over `tcp` with the backend at `authority`, whose host name is `host`.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        authority: &Authority,
        host: Option<&str>,
    ) -> Result<TlsStream<TcpStream>, ForwardError> {
        let name = match (&self.server_name, host) {
            (Some(name), _) => name.clone(),
            (None, Some(host)) => ServerName::try_from(host.to_owned()).map_err(|e| {
                ForwardError::tls(format!("endpoint host name {host:?}: {e}").into())
            })?,
            (None, None) => {
                let host = authority.host();
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                ServerName::try_from(host.to_owned()).map_err(|e| {
                    ForwardError::tls(format!("endpoint address {host:?}: {e}").into())
                })?
            }
        };
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| ForwardError::tls(e.into()))
    }
}
