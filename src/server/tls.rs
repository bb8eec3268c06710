//! TLS termination for [`Server::tls`](super::Server::tls) the way operators run it:
//! certificates chosen by SNI from PEM files and reloaded without a restart ([`CertStore`]),
//! optional client certificates whose identity reaches the requests ([`ClientAuth`],
//! [`PeerCertificate`]), session resumption on by default and ALPN per listener
//! ([`TlsConfig`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use lbkit::proxy::{ErrorResponseLayer, Forward};
//! use lbkit::server::tls::{CertStore, TlsConfig};
//! use lbkit::server::Server;
//! use lbkit::{strategy::RoundRobin, BalancerLayer};
//! use tower::ServiceBuilder;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let certs = CertStore::builder()
//!     .cert("example.com.pem", "example.com.key")      // its SANs: example.com, www.example.com
//!     .cert("wildcard.pem", "wildcard.key")            // *.example.com
//!     .default_cert("default.pem", "default.key")      // no SNI, or an unknown name
//!     .build()?;
//! let config = TlsConfig::new(certs.clone()).build()?;
//! let _watch = certs.watch(Duration::from_secs(30)); // renewed files are picked up
//!
//! let proxy = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(BalancerLayer::new(["127.0.0.1:3001", "127.0.0.1:3002"], RoundRobin::new()))
//!     // The clients speak https: say so in X-Forwarded-Proto / Forwarded.
//!     .service(Forward::<lbkit::server::RequestBody>::new().proto("https"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! Server::new(proxy).tls(config).serve(listener).await;
//! # Ok(()) }
//! ```
//!
//! For one certificate, [`server_config_from_pem`] is the short way. Needs the `tls` cargo
//! feature. rustls uses its `ring` crypto provider, which builds with a plain C compiler (no
//! cmake or nasm).

mod config;
mod peer;
mod store;

pub use config::{ClientAuth, TlsConfig};
pub(crate) use peer::peer_certificate;
pub use peer::{PeerCertificate, SubjectAltName};
pub use store::{CertStore, CertStoreBuilder};
pub(crate) use Kind as TlsErrorKind;

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls::ServerConfig;

use crate::error::BoxError;

/// The ALPN protocol id of HTTP/2.
const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol id of HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a TLS server configuration could not be built, or certificates not (re)loaded.
///
/// One opaque type with a kind inside, asked about with `is_*` methods. Its message names the
/// file it is about, when there is one, but never the key material.
pub struct TlsError {
    kind: Kind,
    path: Option<PathBuf>,
    source: Option<BoxError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Io,
    BadPem,
    NoCertificate,
    NoKey,
    KeyMismatch,
    BadCertificate,
    BadName,
    Config,
}

impl TlsError {
    pub(crate) fn new(kind: Kind, source: Option<BoxError>) -> Self {
        TlsError {
            kind,
            path: None,
            source,
        }
    }

    pub(crate) fn at(mut self, path: &Path) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    /// A PEM file could not be read.
    pub fn is_io(&self) -> bool {
        self.kind == Kind::Io
    }

    /// The PEM text is malformed (a broken section, bad base64), or the key inside it is not a
    /// key rustls can use.
    pub fn is_bad_pem(&self) -> bool {
        self.kind == Kind::BadPem
    }

    /// The certificate PEM holds no `CERTIFICATE` section.
    pub fn is_no_certificate(&self) -> bool {
        self.kind == Kind::NoCertificate
    }

    /// The key PEM holds no private key (PKCS#8, PKCS#1 or SEC1).
    pub fn is_no_key(&self) -> bool {
        self.kind == Kind::NoKey
    }

    /// The private key does not belong to the certificate.
    pub fn is_key_mismatch(&self) -> bool {
        self.kind == Kind::KeyMismatch
    }

    /// A certificate is not one rustls or x509-parser can read (broken DER inside valid PEM),
    /// or a CA certificate cannot be used as a trust anchor.
    pub fn is_bad_certificate(&self) -> bool {
        self.kind == Kind::BadCertificate
    }

    /// A certificate serves no name: it has no DNS name in its subject alternative names and
    /// is not the default, or a name given for it is not a DNS name or one-label wildcard.
    pub fn is_bad_name(&self) -> bool {
        self.kind == Kind::BadName
    }

    /// The path of the file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsError")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Io => "cannot read PEM file",
            Kind::BadPem => "malformed PEM or unusable key",
            Kind::NoCertificate => "no certificate in PEM",
            Kind::NoKey => "no private key in PEM",
            Kind::KeyMismatch => "private key does not match the certificate",
            Kind::BadCertificate => "unusable certificate",
            Kind::BadName => "certificate serves no valid name",
            Kind::Config => "invalid TLS configuration",
        })?;
        if let Some(path) = &self.path {
            write!(f, " ({})", path.display())?;
        }
        Ok(())
    }
}

impl TlsError {
    /// What the underlying error says, for a log line next to the message.
    fn source_message(&self) -> Option<String> {
        self.source.as_ref().map(|e| e.to_string())
    }
}

impl StdError for TlsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

fn pem_error(e: rustls_pki_types::pem::Error, missing: Kind) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::new(missing, None),
        rustls_pki_types::pem::Error::Io(e) => TlsError::new(Kind::Io, Some(e.into())),
        e => TlsError::new(Kind::BadPem, Some(e.into())),
    }
}

/// A server configuration serving one certificate chain file and private key file, both PEM
/// (the chain leaf first, as `certbot` and `openssl` write them), to every client whatever
/// name it asks for, with [`TlsConfig`]'s defaults (ALPN `h2` then `http/1.1`, session
/// resumption). For PEM text in memory, several certificates, reloads or client
/// certificates, build a [`CertStore`] (`CertStore::builder().default_pem(cert, key)`) and a
/// [`TlsConfig`].
///
/// Every problem is a [`TlsError`] naming the file: unreadable, malformed PEM, no
/// certificate, no key, or a key that does not match the certificate. Never panics.
pub fn server_config_from_pem(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertStore::builder()
        .default_cert(cert_path, key_path)
        .build()?;
    TlsConfig::new(certs).build()
}

pub(crate) fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, Kind::NoCertificate))?;
    if certs.is_empty() {
        return Err(TlsError::new(Kind::NoCertificate, None));
    }
    Ok(certs)
}

pub(crate) fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_error(e, Kind::NoKey))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_config_from_pem_bytes(
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        TlsConfig::new(
            CertStore::builder()
                .default_pem(cert_pem, key_pem)
                .build()?,
        )
        .build()
    }

    #[test]
    fn empty_and_garbage_pem_are_typed_errors() {
        let e = server_config_from_pem_bytes(b"", b"").unwrap_err();
        assert!(e.is_no_certificate(), "{e:?}");
        let bad = b"-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
        let e = server_config_from_pem_bytes(bad, b"").unwrap_err();
        assert!(e.is_bad_pem(), "{e:?}");
        let e =
            server_config_from_pem("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert!(e.is_io(), "{e:?}");
        assert_eq!(e.path(), Some(Path::new("/nonexistent/cert.pem")));
        assert!(e.to_string().contains("/nonexistent/cert.pem"));
    }
}
