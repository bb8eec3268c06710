//! [`CertStore`]: the certificates a TLS listener serves, chosen by SNI through rustls'
//! certificate resolver, and swapped atomically when the files they came from change.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::peer::{names, SubjectAltName};
use super::{parse_certs, parse_key, Kind, TlsError};

/// The certificates one or more TLS listeners serve, chosen per handshake by the name the
/// client asks for (SNI), and reloadable from their files while the server runs.
///
/// Built with [`CertStore::builder`]: each certificate chain and key come from PEM files (the
/// chain with its leaf first, as certbot and Kubernetes secrets hold them). A certificate
/// serves the DNS names in its subject alternative names, or the names given with
/// [`cert_for`](CertStoreBuilder::cert_for); a name is exact (`api.example.com`) or a wildcard
/// (`*.example.com`, which matches exactly one label: `a.example.com`, not `example.com` nor
/// `a.b.example.com`). An exact name wins over a wildcard. The
/// [default certificate](CertStoreBuilder::default_cert) answers clients that send no SNI
/// (old clients, or a connection by IP address) and names no certificate serves, as nginx's
/// `default_server` and HAProxy's first `crt` do; without one, such a handshake fails with a
/// TLS alert (`access_denied`) and a debug log line on the server.
///
/// One name may have several certificates with different key types (RSA and ECDSA side by
/// side): the client gets an ECDSA (or Ed25519) one when its signature algorithms allow it,
/// RSA otherwise, as HAProxy does with its `.ecdsa`/`.rsa` bundles.
///
/// [`reload`](CertStore::reload) reads every file again and swaps the whole set at once;
/// [`watch`](CertStore::watch) does that when the files change. Connections already
/// established keep their session; new handshakes get the new certificates. A file that fails
/// to load keeps everything as it was.
///
/// The store is a cheap handle (clones share the set). It is rustls' certificate resolver
/// itself (`ResolvesServerCert`), which [`TlsConfig`](super::TlsConfig) installs; a handshake
/// reads the current set with one lock-free atomic load (arc-swap, as the endpoint table),
/// so a reload never blocks a handshake.
///
/// ```no_run
/// use std::time::Duration;
/// use lbkit::server::tls::{CertStore, TlsConfig};
///
/// # async fn run() -> Result<(), lbkit::server::tls::TlsError> {
/// let certs = CertStore::builder()
///     .cert("/etc/tls/example.com/fullchain.pem", "/etc/tls/example.com/privkey.pem")
///     .cert("/etc/tls/example.com/ecdsa.pem", "/etc/tls/example.com/ecdsa-key.pem")
///     .cert_for(["*.apps.example.com"], "/etc/tls/apps.pem", "/etc/tls/apps-key.pem")
///     .default_cert("/etc/tls/default.pem", "/etc/tls/default-key.pem")
///     .build()?;
/// let config = TlsConfig::new(certs.clone()).build()?;
/// // Pick up renewals (certbot, cert-manager) by themselves; SIGHUP can call `reload` too.
/// let _watch = certs.watch(Duration::from_secs(10));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Vec<Entry>,
    provider: Arc<CryptoProvider>,
    table: ArcSwap<Table>,
    /// Held while loading, so that two reloads never interleave; the fingerprint of the files
    /// last tried, so that a watch retries a broken file only once it changed again.
    reloading: Mutex<u64>,
}

/// Where one certificate and its key come from, and what it serves.
struct Entry {
    source: Source,
    /// The names given instead of the certificate's own, normalized.
    names: Option<Vec<String>>,
    default: bool,
}

enum Source {
    Files { cert: PathBuf, key: PathBuf },
    Pem { cert: Vec<u8>, key: Vec<u8> },
}

/// Builds a [`CertStore`]: the certificates are loaded (and every problem reported) by
/// [`build`](Self::build).
#[derive(Default)]
#[must_use]
pub struct CertStoreBuilder {
    entries: Vec<Entry>,
    /// The first problem with names given to `cert_for`, and the certificate they were for.
    bad_name: Option<(String, PathBuf)>,
}

impl fmt::Debug for CertStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStoreBuilder")
            .field("certificates", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl CertStoreBuilder {
    /// A certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1 or
    /// SEC1; RSA, ECDSA P-256/P-384 or Ed25519), served for the DNS names in the certificate's
    /// subject alternative names. [`build`](Self::build) fails if it has none.
    pub fn cert(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.entries.push(Entry {
            source: files(cert, key),
            names: None,
            default: false,
        });
        self
    }

    /// A certificate chain and key (as in [`cert`](Self::cert)) served for `names` instead
    /// of the names in the certificate, as nginx's `server_name` does. A name is a DNS name or
    /// a wildcard of one label (`*.example.com`); case and a trailing dot do not matter.
    /// [`build`](Self::build) fails on an empty list or a malformed name.
    pub fn cert_for<N: AsRef<str>>(
        mut self,
        names: impl IntoIterator<Item = N>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Self {
        let mut list = Vec::new();
        for name in names {
            match normalize(name.as_ref()) {
                Some(n) => list.push(n),
                None => {
                    let why = format!("not a DNS name or one-label wildcard: {:?}", name.as_ref());
                    self.bad_name.get_or_insert((why, cert.as_ref().to_owned()));
                }
            }
        }
        if list.is_empty() {
            let why = "no names given".to_owned();
            self.bad_name.get_or_insert((why, cert.as_ref().to_owned()));
        }
        self.entries.push(Entry {
            source: files(cert, key),
            names: Some(list),
            default: false,
        });
        self
    }

    /// The certificate for clients that send no SNI or a name no other certificate serves
    /// (also serving the names in it, if any). Give it twice, with an RSA and an ECDSA key,
    /// to offer both. Without a default, such handshakes fail.
    pub fn default_cert(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.entries.push(Entry {
            source: files(cert, key),
            names: None,
            default: true,
        });
        self
    }

    /// As [`default_cert`](Self::default_cert), from PEM text in memory (a certificate read
    /// from a secret store, or made at start-up); unlike files, it is the same on every
    /// [`CertStore::reload`].
    pub fn default_pem(mut self, cert: &[u8], key: &[u8]) -> Self {
        self.entries.push(Entry {
            source: Source::Pem {
                cert: cert.to_vec(),
                key: key.to_vec(),
            },
            names: None,
            default: true,
        });
        self
    }

    /// Loads every certificate and key, with rustls' ring provider.
    ///
    /// Fails with a [`TlsError`] naming the file at fault: unreadable, malformed PEM, no
    /// certificate or key in it, a key that does not match its certificate or that rustls
    /// cannot use, a certificate that is not X.509 ([`is_bad_certificate`]), or one that
    /// serves no name ([`is_bad_name`]: a non-default certificate without DNS names, a
    /// malformed name). An empty builder is an error too ([`is_no_certificate`]).
    ///
    /// [`is_bad_certificate`]: TlsError::is_bad_certificate
    /// [`is_bad_name`]: TlsError::is_bad_name
    /// [`is_no_certificate`]: TlsError::is_no_certificate
    pub fn build(self) -> Result<CertStore, TlsError> {
        if let Some((why, path)) = self.bad_name {
            return Err(TlsError::new(Kind::BadName, Some(why.into())).at(&path));
        }
        if self.entries.is_empty() {
            return Err(TlsError::new(
                Kind::NoCertificate,
                Some("the certificate store is empty".into()),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = read_all(&self.entries);
        let fingerprint = loaded.fingerprint;
        let table = Table::build(&self.entries, loaded, &provider)?;
        Ok(CertStore {
            inner: Arc::new(Inner {
                entries: self.entries,
                provider,
                table: ArcSwap::from_pointee(table),
                reloading: Mutex::new(fingerprint),
            }),
        })
    }
}

fn files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Source {
    Source::Files {
        cert: cert.as_ref().to_owned(),
        key: key.as_ref().to_owned(),
    }
}

impl CertStore {
    /// A builder with no certificates.
    pub fn builder() -> CertStoreBuilder {
        CertStoreBuilder::default()
    }

    /// Reads every certificate and key file again and, if all of them load, serves them from
    /// the next handshake on. Connections already established are not touched.
    ///
    /// Replaced files are read through their paths, so a renewal that rewrites them (certbot)
    /// or swaps a symlink to a new directory (a Kubernetes secret volume) is picked up. If any
    /// file fails to load, the certificates in use stay, a warning is logged, and the error
    /// (naming the file) is returned. Reads the files on the calling thread (a few kilobytes
    /// each); reloads never run at the same time.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut last = self
            .inner
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let loaded = read_all(&self.inner.entries);
        *last = loaded.fingerprint;
        self.inner.apply(loaded)
    }

    /// Watches the files: every `interval`, reads them, and [reloads](Self::reload) when their
    /// contents changed since they were last loaded (or last failed to load, so a broken file
    /// is reported once, and retried when it changes again). Comparing contents, not
    /// modification times, catches every kind of replacement (rewrites in the same second, a
    /// symlink swapped to an older file) and needs no file-notification machinery; the cost
    /// is reading a few kilobytes per interval. 10 s to a minute is plenty for renewals.
    ///
    /// The task runs on the current tokio runtime (reading on its blocking pool) and ends by
    /// itself when the store and every server using it are dropped; abort the handle to stop
    /// it sooner.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = interval.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let checked = tokio::task::spawn_blocking(move || inner.reload_if_changed());
                if checked.await.is_err() {
                    return;
                }
            }
        })
    }

    /// The names served, exact and wildcard (`*.example.com`), sorted: for logs and admin
    /// pages.
    pub fn names(&self) -> Vec<String> {
        let table = self.inner.table.load();
        let mut names: Vec<String> = table
            .exact
            .keys()
            .cloned()
            .chain(table.wildcard.keys().map(|k| format!("*.{k}")))
            .collect();
        names.sort();
        names
    }

    /// Whether a default certificate answers clients without SNI and unknown names.
    pub fn has_default(&self) -> bool {
        !self.inner.table.load().default.is_empty()
    }
}

impl Inner {
    fn reload_if_changed(&self) {
        let mut last = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let loaded = read_all(&self.entries);
        if loaded.fingerprint == *last {
            return;
        }
        *last = loaded.fingerprint;
        // `apply` logs the outcome.
        let _ = self.apply(loaded);
    }

    fn apply(&self, loaded: Loaded) -> Result<(), TlsError> {
        match Table::build(&self.entries, loaded, &self.provider) {
            Ok(table) => {
                self.table.store(Arc::new(table));
                tracing::info!(
                    certificates = self.entries.len(),
                    "TLS certificates reloaded"
                );
                Ok(())
            }
            Err(e) => {
                let cause = e.source_message().map(|c| format!(": {c}"));
                tracing::warn!(
                    error = format!("{e}{}", cause.unwrap_or_default()),
                    "TLS certificate reload failed: still serving the certificates loaded before"
                );
                Err(e)
            }
        }
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("names", &self.names())
            .field("default", &self.has_default())
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.inner
            .table
            .load()
            .resolve(hello.server_name(), hello.signature_schemes())
    }
}

/// One entry's certificate and key PEM text.
type Pems = (Vec<u8>, Vec<u8>);

/// The bytes of every file (or why one could not be read), and their fingerprint.
struct Loaded {
    files: Vec<Result<Pems, TlsError>>,
    fingerprint: u64,
}

fn read_all(entries: &[Entry]) -> Loaded {
    let mut hasher = DefaultHasher::new();
    let files = entries
        .iter()
        .map(|entry| {
            let read = match &entry.source {
                Source::Files { cert, key } => read(cert).and_then(|c| Ok((c, read(key)?))),
                Source::Pem { cert, key } => Ok((cert.clone(), key.clone())),
            };
            match &read {
                Ok((c, k)) => (0u8, c, k).hash(&mut hasher),
                Err(e) => (1u8, e.to_string()).hash(&mut hasher),
            }
            read
        })
        .collect();
    Loaded {
        files,
        fingerprint: hasher.finish(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::new(Kind::Io, Some(e.into())).at(path))
}

/// One set of certificates, as served between two reloads.
#[derive(Default)]
struct Table {
    /// Exact names (lower case, no trailing dot) to their certificates, best first.
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Vec<Arc<CertifiedKey>>,
}

impl Table {
    fn build(
        entries: &[Entry],
        loaded: Loaded,
        provider: &CryptoProvider,
    ) -> Result<Table, TlsError> {
        let mut table = Table::default();
        for (entry, files) in entries.iter().zip(loaded.files) {
            let (cert_pem, key_pem) = files?;
            let (cert_path, key_path) = match &entry.source {
                Source::Files { cert, key } => (Some(cert.as_path()), Some(key.as_path())),
                Source::Pem { .. } => (None, None),
            };
            let at = |e: TlsError, path: Option<&Path>| match path {
                Some(p) => e.at(p),
                None => e,
            };
            let chain = parse_certs(&cert_pem).map_err(|e| at(e, cert_path))?;
            let key = parse_key(&key_pem).map_err(|e| at(e, key_path))?;
            let (_, sans) = names(&chain[0]).map_err(|e| {
                at(
                    TlsError::new(Kind::BadCertificate, Some(e.to_string().into())),
                    cert_path,
                )
            })?;
            let signing = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| at(TlsError::new(Kind::BadPem, Some(e.into())), key_path))?;
            let certified = CertifiedKey::new(chain, signing);
            match certified.keys_match() {
                Ok(())
                | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
                Err(e @ rustls::Error::InconsistentKeys(_)) => {
                    return Err(at(
                        TlsError::new(Kind::KeyMismatch, Some(e.into())),
                        key_path,
                    ))
                }
                Err(e) => {
                    return Err(at(
                        TlsError::new(Kind::BadCertificate, Some(e.into())),
                        cert_path,
                    ))
                }
            }
            let certified = Arc::new(certified);
            let names: Vec<String> = match &entry.names {
                Some(names) => names.clone(),
                None => sans
                    .iter()
                    .filter_map(|san| match san {
                        SubjectAltName::Dns(name) => normalize(name),
                        _ => None,
                    })
                    .collect(),
            };
            if names.is_empty() && !entry.default {
                return Err(at(
                    TlsError::new(
                        Kind::BadName,
                        Some("the certificate has no DNS name: give names with `cert_for`".into()),
                    ),
                    cert_path,
                ));
            }
            for name in names {
                let slot = match name.strip_prefix("*.") {
                    Some(parent) => table.wildcard.entry(parent.to_owned()).or_default(),
                    None => table.exact.entry(name).or_default(),
                };
                slot.push(certified.clone());
            }
            if entry.default {
                table.default.push(certified);
            }
        }
        // ECDSA and EdDSA before RSA (smaller, faster handshakes); otherwise the order given.
        let rsa_last = |list: &mut Vec<Arc<CertifiedKey>>| {
            list.sort_by_key(|ck| ck.key.algorithm() == SignatureAlgorithm::RSA);
        };
        table.exact.values_mut().for_each(rsa_last);
        table.wildcard.values_mut().for_each(rsa_last);
        rsa_last(&mut table.default);
        Ok(table)
    }

    /// The certificate for a client asking for `server_name` with `schemes`.
    fn resolve(
        &self,
        server_name: Option<&str>,
        schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let named = server_name.and_then(|name| self.lookup(name));
        let candidates = named.unwrap_or(&self.default);
        if candidates.is_empty() {
            tracing::debug!(
                server_name,
                "no certificate for this name and no default certificate"
            );
            return None;
        }
        candidates
            .iter()
            .find(|ck| ck.key.choose_scheme(schemes).is_some())
            .or_else(|| candidates.first())
            .cloned()
    }

    fn lookup(&self, name: &str) -> Option<&Vec<Arc<CertifiedKey>>> {
        let lower;
        let mut name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            name = &lower;
        }
        if let Some(found) = self.exact.get(name) {
            return Some(found);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// A name as served: lower case, no trailing dot; `None` if it is not a DNS name or a
/// wildcard of one whole label (`*.example.com`) over at least two labels.
fn normalize(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    let labels_ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !labels_ok || (wild && !rest.contains('.')) {
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_and_checked() {
        assert_eq!(normalize("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(normalize("*.Example.com").as_deref(), Some("*.example.com"));
        assert_eq!(normalize("localhost").as_deref(), Some("localhost"));
        for bad in [
            "",
            ".",
            "*",
            "*.com",
            "a.*.com",
            "*a.example.com",
            "a..b",
            "-a.b",
            "a b.c",
        ] {
            assert_eq!(normalize(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_wildcard_matches_one_label() {
        let ck = |n: u8| {
            let key = rustls::crypto::ring::sign::any_supported_type(
                &rcgen::KeyPair::generate()
                    .map(|k| rustls_pki_types::PrivateKeyDer::Pkcs8(k.serialize_der().into()))
                    .unwrap(),
            )
            .unwrap();
            Arc::new(CertifiedKey::new(vec![vec![n].into()], key))
        };
        let mut table = Table::default();
        table.exact.insert("a.example.com".into(), vec![ck(1)]);
        table.wildcard.insert("example.com".into(), vec![ck(2)]);
        let schemes = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let got = |table: &Table, name: Option<&str>| {
            table
                .resolve(name, &schemes)
                .map(|ck| ck.cert[0].as_ref()[0])
        };
        assert_eq!(got(&table, Some("a.example.com")), Some(1));
        assert_eq!(got(&table, Some("A.Example.com.")), Some(1));
        assert_eq!(got(&table, Some("b.example.com")), Some(2));
        assert_eq!(got(&table, Some("x.b.example.com")), None);
        assert_eq!(got(&table, Some("example.com")), None);
        assert_eq!(got(&table, None), None);
        table.default.push(ck(3));
        assert_eq!(got(&table, Some("x.b.example.com")), Some(3));
        assert_eq!(got(&table, None), Some(3));
    }
}
