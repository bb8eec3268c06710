//! TLS termination the way operators run it, over real sockets on 127.0.0.1: certificates
//! chosen by SNI (exact, wildcard, default, RSA and ECDSA side by side), reloaded from
//! replaced files (a Kubernetes-style symlink swap, in-place rewrites, a watch), client
//! certificates (mTLS) whose identity reaches the handler, session resumption and ALPN per
//! listener. Every certificate is made with rcgen and issued by a test CA.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use lbkit::server::tls::PeerCertificate;
use lbkit::server::tls::{CertStore, ClientAuth, TlsConfig};
use lbkit::server::Server;
use rcgen::{CertificateParams, DnType, Issuer, KeyPair, SanType};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;

/// Only a hang takes that long.
const HANG: Duration = Duration::from_secs(30);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test did not finish in time")
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A 2048-bit RSA key (PKCS#8), made once with `openssl genpkey`: ring cannot generate RSA keys.
const RSA_KEY: &str = include_str!("tls_rsa_key.pem");

/// A test certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let (issuer, pem) = common::test_ca(name);
        Ca { issuer, pem }
    }

    /// A server certificate for `names` (ECDSA P-256, or RSA): (chain PEM with the CA after
    /// the leaf, key PEM, leaf DER).
    fn server(&self, names: &[&str], rsa: bool) -> Issued {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        self.issue(params, rsa)
    }

    /// A client certificate with subject `CN=cn` and the given SANs.
    fn client(&self, cn: &str, sans: Vec<SanType>) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        self.issue(params, false)
    }

    fn issue(&self, params: CertificateParams, rsa: bool) -> Issued {
        let key = if rsa {
            KeyPair::from_pem(RSA_KEY).unwrap()
        } else {
            KeyPair::generate().unwrap()
        };
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn root(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()
    }
}

use tokio_rustls::rustls::pki_types::pem::PemObject;

struct Issued {
    chain_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Issued {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbkit-tls-certs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// `name.pem` and `name.key` from `issued`: (certificate path, key path).
    fn pair(&self, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.pem"), &issued.chain_pem),
            self.write(&format!("{name}.key"), &issued.key_pem),
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The server: a handler answering with the client's identity.

/// Answers `200` with `subject|san,san,...` of the request's [`PeerCertificate`], or
/// `anonymous`.
#[derive(Clone)]
struct WhoAmI;

impl<B> tower::Service<Request<B>> for WhoAmI {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let answer = match req.extensions().get::<PeerCertificate>() {
            Some(peer) => format!(
                "{}|{}",
                peer.subject(),
                peer.sans()
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => "anonymous".to_owned(),
        };
        std::future::ready(Ok(Response::new(Full::new(Bytes::from(answer)))))
    }
}

/// The TLS server on 127.0.0.1 with `config`; stops when dropped.
struct Running {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(config: TlsConfig) -> Running {
    let config = config.build().expect("valid TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(
        Server::new(WhoAmI)
            .tls(config)
            .tls_handshake_timeout(Duration::from_secs(10))
            .serve(listener),
    );
    Running { addr, task }
}

// ---------------------------------------------------------------------------------------------
// Clients.

fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// A client verifier that accepts any server certificate (but checks the handshake
/// signatures), offering only `schemes`: for seeing which certificate the server chose even
/// when its names do not match.
#[derive(Debug)]
struct AnyCert {
    provider: Arc<CryptoProvider>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// What a test client does about the server's certificate and its own.
enum Trust<'a> {
    /// Verify against this CA, as a browser would.
    Ca(&'a Ca),
    /// Accept anything, offering these signature schemes (all of the provider's if empty).
    Any(Vec<SignatureScheme>),
}

fn client_config(trust: Trust<'_>, identity: Option<&Issued>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match trust {
        Trust::Ca(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.root()).unwrap();
            builder.with_root_certificates(roots)
        }
        Trust::Any(schemes) => {
            let schemes = if schemes.is_empty() {
                provider
                    .signature_verification_algorithms
                    .supported_schemes()
            } else {
                schemes
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert {
                    provider: provider.clone(),
                    schemes,
                }))
        }
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain(), id.key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` asking for `sni` (`None`: no SNI extension, as when connecting
/// by IP address).
async fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    sni: Option<&str>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = config.clone();
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_owned()).unwrap(),
        None => {
            let mut c = (*config).clone();
            c.enable_sni = false;
            config = Arc::new(c);
            ServerName::IpAddress(addr.ip().into())
        }
    };
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate the server presented.
fn served(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
}

/// An HTTP/1.1 client over an established TLS connection.
async fn http1(tls: TlsStream<TcpStream>) -> SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// `GET /` on `send`: the status and the body.
async fn get(send: &mut SendRequest<Empty<Bytes>>) -> Result<(StatusCode, String), hyper::Error> {
    send.ready().await?;
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let res = send.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A new TLS connection with `config`, one `GET /`: the answer.
async fn ask(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    sni: Option<&str>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let tls = connect(addr, config, sni).await?;
    let mut send = http1(tls).await;
    let (status, body) = get(&mut send).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// SNI.

#[tokio::test]
async fn sni_chooses_exact_wildcard_and_default_certificates() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let a = ca.server(&["a.test"], false);
        let b = ca.server(&["b.test", "www.b.test"], false);
        let wild = ca.server(&["*.wild.test"], false);
        let fallback = ca.server(&["default.test"], false);
        let (a_cert, a_key) = dir.pair("a", &a);
        let (b_cert, b_key) = dir.pair("b", &b);
        let (w_cert, w_key) = dir.pair("wild", &wild);
        let (d_cert, d_key) = dir.pair("default", &fallback);
        let store = CertStore::builder()
            .cert(&a_cert, &a_key)
            .cert(&b_cert, &b_key)
            .cert(&w_cert, &w_key)
            .default_cert(&d_cert, &d_key)
            .build()
            .unwrap();
        assert_eq!(
            store.names(),
            [
                "*.wild.test",
                "a.test",
                "b.test",
                "default.test",
                "www.b.test"
            ]
        );
        assert!(store.has_default());
        let server = serve(TlsConfig::new(store)).await;

        // Clients that verify the certificate against the CA, as browsers do.
        let verifying = client_config(Trust::Ca(&ca), None, &[b"http/1.1"]);
        for (sni, expected) in [
            ("a.test", &a),
            ("b.test", &b),
            ("www.b.test", &b),
            ("x.wild.test", &wild),
            ("y.wild.test", &wild),
            ("default.test", &fallback),
        ] {
            let tls = connect(server.addr, &verifying, Some(sni)).await.unwrap();
            assert_eq!(served(&tls), expected.der, "{sni}");
            // The chain file's CA certificate is sent after the leaf.
            assert_eq!(tls.get_ref().1.peer_certificates().unwrap().len(), 2);
            let mut send = http1(tls).await;
            assert_eq!(
                get(&mut send).await.unwrap(),
                (StatusCode::OK, "anonymous".into())
            );
        }

        // The wildcard covers one label only; other names and clients without SNI get the
        // default certificate (which a verifying client rejects for those names).
        let any = client_config(Trust::Any(vec![]), None, &[]);
        for sni in [
            Some("deep.x.wild.test"),
            Some("wild.test"),
            Some("unknown.test"),
            None,
        ] {
            let tls = connect(server.addr, &any, sni).await.unwrap();
            assert_eq!(served(&tls), fallback.der, "{sni:?}");
        }
        assert!(connect(server.addr, &verifying, Some("deep.x.wild.test"))
            .await
            .is_err());
    })
    .await;
}

#[tokio::test]
async fn without_a_default_unknown_names_and_no_sni_fail_the_handshake() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let a = ca.server(&["a.test"], false);
        let (cert, key) = dir.pair("a", &a);
        let store = CertStore::builder().cert(&cert, &key).build().unwrap();
        assert_eq!(store.names(), ["a.test"]);
        assert!(!store.has_default());
        let server = serve(TlsConfig::new(store)).await;
        let any = client_config(Trust::Any(vec![]), None, &[]);
        for sni in [None, Some("unknown.test")] {
            let err = connect(server.addr, &any, sni).await.unwrap_err();
            // rustls answers with an alert when no certificate resolves.
            assert!(err.to_string().contains("AccessDenied"), "{sni:?}: {err}");
        }
        // The named certificate is still served.
        let tls = connect(server.addr, &any, Some("a.test")).await.unwrap();
        assert_eq!(served(&tls), a.der);
    })
    .await;
}

#[tokio::test]
async fn rsa_and_ecdsa_certificates_side_by_side() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let rsa = ca.server(&["both.test"], true);
        let ecdsa = ca.server(&["both.test"], false);
        let (r_cert, r_key) = dir.pair("rsa", &rsa);
        let (e_cert, e_key) = dir.pair("ecdsa", &ecdsa);
        // RSA given first: ECDSA is still preferred when the client can use it.
        let store = CertStore::builder()
            .cert(&r_cert, &r_key)
            .cert(&e_cert, &e_key)
            .build()
            .unwrap();
        let server = serve(TlsConfig::new(store)).await;

        let modern = client_config(Trust::Ca(&ca), None, &[]);
        let tls = connect(server.addr, &modern, Some("both.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), ecdsa.der);

        let rsa_only = client_config(
            Trust::Any(vec![
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PKCS1_SHA256,
            ]),
            None,
            &[],
        );
        let tls = connect(server.addr, &rsa_only, Some("both.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), rsa.der);
        let mut send = http1(tls).await;
        assert_eq!(get(&mut send).await.unwrap().0, StatusCode::OK);

        let ecdsa_only = client_config(
            Trust::Any(vec![SignatureScheme::ECDSA_NISTP256_SHA256]),
            None,
            &[],
        );
        let tls = connect(server.addr, &ecdsa_only, Some("both.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), ecdsa.der);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Reload.

/// A Kubernetes secret volume: `dir/cert.pem -> ..data/cert.pem`, `..data -> ..<version>`;
/// an update writes a new version directory and swaps `..data` atomically.
struct SecretVolume {
    dir: TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(issued: &Issued) -> SecretVolume {
        let dir = TempDir::new();
        let mut volume = SecretVolume { dir, version: 0 };
        volume.update(&issued.chain_pem, &issued.key_pem);
        std::os::unix::fs::symlink("..data/cert.pem", volume.cert()).unwrap();
        std::os::unix::fs::symlink("..data/key.pem", volume.key()).unwrap();
        volume
    }

    fn cert(&self) -> PathBuf {
        self.dir.path("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path("key.pem")
    }

    fn update(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        self.dir.write(&format!("{version}/cert.pem"), cert_pem);
        self.dir.write(&format!("{version}/key.pem"), key_pem);
        let tmp = self.dir.path("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path("..data")).unwrap();
    }
}

#[tokio::test]
async fn reload_serves_replaced_files_and_keeps_open_connections() {
    within(async {
        let ca = Ca::new("test CA");
        let v1 = ca.server(&["reload.test"], false);
        let mut volume = SecretVolume::new(&v1);
        let store = CertStore::builder()
            .cert(volume.cert(), volume.key())
            .build()
            .unwrap();
        let server = serve(TlsConfig::new(store.clone())).await;
        // Fresh client configs: a resumed session would not show the certificate anew.
        let client = || client_config(Trust::Ca(&ca), None, &[b"http/1.1"]);

        let before = connect(server.addr, &client(), Some("reload.test"))
            .await
            .unwrap();
        assert_eq!(served(&before), v1.der);
        let mut open = http1(before).await;
        assert_eq!(get(&mut open).await.unwrap().0, StatusCode::OK);

        // A renewal through the secret volume's symlink swap, then a reload.
        let v2 = ca.server(&["reload.test"], false);
        volume.update(&v2.chain_pem, &v2.key_pem);
        store.reload().expect("the new files load");
        let after = connect(server.addr, &client(), Some("reload.test"))
            .await
            .unwrap();
        assert_eq!(served(&after), v2.der);
        // The connection opened before goes on.
        assert_eq!(get(&mut open).await.unwrap().0, StatusCode::OK);
        assert_eq!(get(&mut open).await.unwrap().0, StatusCode::OK);

        // A broken renewal: a key that belongs to another certificate. The reload fails,
        // naming the key file, and v2 is still served.
        let stray = ca.server(&["reload.test"], false);
        volume.update(&v2.chain_pem, &stray.key_pem);
        let e = store.reload().unwrap_err();
        assert!(e.is_key_mismatch(), "{e:?}");
        assert_eq!(e.path(), Some(volume.key().as_path()));
        let tls = connect(server.addr, &client(), Some("reload.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), v2.der);

        // Truncated certificate PEM written in place, through the symlinks: same.
        let half = &v2.chain_pem[..v2.chain_pem.len() / 3];
        volume.update(half, &v2.key_pem);
        let e = store.reload().unwrap_err();
        assert!(e.is_bad_pem(), "{e:?}");
        assert_eq!(e.path(), Some(volume.cert().as_path()));
        assert!(e.to_string().contains("cert.pem"), "{e}");
        // A certificate that no longer names the host: the store keeps serving v2.
        let renamed = ca.server(&["127.0.0.1"], false);
        volume.update(&renamed.chain_pem, &renamed.key_pem);
        let e = store.reload().unwrap_err();
        assert!(e.is_bad_name(), "{e:?}");
        // Files gone entirely.
        std::fs::remove_file(volume.cert()).unwrap();
        let e = store.reload().unwrap_err();
        assert!(e.is_io(), "{e:?}");
        let tls = connect(server.addr, &client(), Some("reload.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), v2.der);
        assert_eq!(get(&mut open).await.unwrap().0, StatusCode::OK);

        // Fixed: the next reload serves v3.
        let v3 = ca.server(&["reload.test"], false);
        volume.update(&v3.chain_pem, &v3.key_pem);
        std::os::unix::fs::symlink("..data/cert.pem", volume.cert()).unwrap();
        store.reload().unwrap();
        let tls = connect(server.addr, &client(), Some("reload.test"))
            .await
            .unwrap();
        assert_eq!(served(&tls), v3.der);
    })
    .await;
}

/// Polls new handshakes until one shows `expected` (only a hang reaches the timeout).
async fn until_served(addr: SocketAddr, ca: &Ca, sni: &str, expected: &CertificateDer<'static>) {
    tokio::time::timeout(HANG, async {
        loop {
            let client = client_config(Trust::Ca(ca), None, &[]);
            if let Ok(tls) = connect(addr, &client, Some(sni)).await {
                if served(&tls) == *expected {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the watch picks up the new certificate");
}

#[tokio::test]
async fn watch_reloads_files_rewritten_in_place() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let v1 = ca.server(&["watched.test"], false);
        let (cert, key) = dir.pair("watched", &v1);
        let store = CertStore::builder().cert(&cert, &key).build().unwrap();
        let server = serve(TlsConfig::new(store.clone())).await;
        let watch = store.watch(Duration::from_millis(10));

        // Rewritten in place, key first: the watch may see the new key with the old
        // certificate (a mismatch it reports and keeps v1 for) before both are new.
        let v2 = ca.server(&["watched.test"], false);
        std::fs::write(&key, &v2.key_pem).unwrap();
        std::fs::write(&cert, &v2.chain_pem).unwrap();
        until_served(server.addr, &ca, "watched.test", &v2.der).await;

        // Broken for a moment (the watch may or may not read it then; if it does, it logs
        // why and keeps v2), then fixed: picked up.
        std::fs::write(&cert, "not PEM").unwrap();
        let v3 = ca.server(&["watched.test"], false);
        std::fs::write(&key, &v3.key_pem).unwrap();
        std::fs::write(&cert, &v3.chain_pem).unwrap();
        until_served(server.addr, &ca, "watched.test", &v3.der).await;

        // The watch ends by itself once the store and its server are gone.
        drop(server);
        drop(store);
        tokio::time::timeout(HANG, watch)
            .await
            .expect("the watch ends when its store is dropped")
            .unwrap();
    })
    .await;
}

/// Handshakes racing reloads on purpose: every handshake succeeds and gets one of the two
/// certificates, whole (never a key from one and a chain from the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_racing_reloads_all_succeed() {
    within(async {
        let ca = Ca::new("test CA");
        let v1 = ca.server(&["race.test"], false);
        let v2 = ca.server(&["race.test"], false);
        let mut volume = SecretVolume::new(&v1);
        let store = CertStore::builder()
            .cert(volume.cert(), volume.key())
            .build()
            .unwrap();
        let server = serve(TlsConfig::new(store.clone())).await;
        let addr = server.addr;

        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            // No resumption: every handshake a full one, resolving the certificate.
            let mut client = (*client_config(Trust::Ca(&ca), None, &[])).clone();
            client.resumption = tokio_rustls::rustls::client::Resumption::disabled();
            let client = Arc::new(client);
            let (d1, d2) = (v1.der.clone(), v2.der.clone());
            clients.spawn(async move {
                for _ in 0..15 {
                    let tls = connect(addr, &client, Some("race.test")).await.unwrap();
                    let der = served(&tls);
                    assert!(der == d1 || der == d2);
                    let mut send = http1(tls).await;
                    assert_eq!(get(&mut send).await.unwrap().0, StatusCode::OK);
                }
            });
        }
        let mut reloads = 0;
        while !clients.is_empty() {
            let next = if reloads % 2 == 0 { &v2 } else { &v1 };
            volume.update(&next.chain_pem, &next.key_pem);
            store.reload().unwrap();
            reloads += 1;
            tokio::task::yield_now().await;
            while let Some(done) = clients.try_join_next() {
                done.unwrap();
            }
        }
        assert!(reloads > 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Client certificates.

fn client_identity(ca: &Ca) -> Issued {
    ca.client(
        "client-one",
        vec![
            SanType::DnsName("client.test".try_into().unwrap()),
            SanType::URI("spiffe://lbkit.test/ns/web".try_into().unwrap()),
            SanType::IpAddress(IpAddr::from([10, 1, 2, 3])),
        ],
    )
}

const IDENTITY: &str = "CN=client-one|DNS:client.test,URI:spiffe://lbkit.test/ns/web,IP:10.1.2.3";

/// A client without (or with a wrong) certificate on a listener that requires one: the
/// handshake or the first request fails (with TLS 1.3, the server's refusal may arrive after
/// the client considers its handshake done).
async fn refused(addr: SocketAddr, config: &Arc<ClientConfig>) -> bool {
    match connect(addr, config, Some("mtls.test")).await {
        Err(_) => true,
        Ok(tls) => {
            let mut send = http1(tls).await;
            get(&mut send).await.is_err()
        }
    }
}

/// A server asking for client certificates from `client_ca`, with its certificate for
/// `mtls.test` from `server_ca`.
struct Mtls {
    server_ca: Ca,
    client_ca: Ca,
    server: Running,
    _dir: TempDir,
}

impl Mtls {
    /// Client certificates required, or optional.
    async fn serve(required: bool) -> Mtls {
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        let dir = TempDir::new();
        let (cert, key) = dir.pair("mtls", &server_ca.server(&["mtls.test"], false));
        let ca_bundle = dir.write("clients-ca.pem", &client_ca.pem);
        let store = CertStore::builder().cert(&cert, &key).build().unwrap();
        let auth = if required {
            ClientAuth::required(&ca_bundle)
        } else {
            ClientAuth::optional(&ca_bundle)
        };
        let server = serve(TlsConfig::new(store).client_auth(auth)).await;
        Mtls {
            server_ca,
            client_ca,
            server,
            _dir: dir,
        }
    }
}

impl Running {
    /// Whether a client whose certificate comes from another CA is refused.
    async fn refuses_strangers(&self, server_ca: &Ca) -> bool {
        let stranger = Ca::new("other CA").client("intruder", vec![]);
        let config = client_config(Trust::Ca(server_ca), Some(&stranger), &[]);
        refused(self.addr, &config).await
    }
}

#[tokio::test]
async fn mtls_required_refuses_clients_without_a_certificate_and_passes_the_identity() {
    within(async {
        let Mtls {
            server_ca,
            client_ca,
            server,
            _dir,
        } = Mtls::serve(true).await;

        let anonymous = client_config(Trust::Ca(&server_ca), None, &[]);
        assert!(refused(server.addr, &anonymous).await);
        assert!(server.refuses_strangers(&server_ca).await);

        let id = client_identity(&client_ca);
        let good = client_config(Trust::Ca(&server_ca), Some(&id), &[b"http/1.1"]);
        let tls = connect(server.addr, &good, Some("mtls.test"))
            .await
            .unwrap();
        let mut send = http1(tls).await;
        // Every request of the connection carries the identity.
        for _ in 0..2 {
            assert_eq!(
                get(&mut send).await.unwrap(),
                (StatusCode::OK, IDENTITY.to_owned())
            );
        }
        // A resumed session keeps the identity of its full handshake.
        let tls = connect(server.addr, &good, Some("mtls.test"))
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed)
        );
        let mut send = http1(tls).await;
        assert_eq!(get(&mut send).await.unwrap().1, IDENTITY);
    })
    .await;
}

#[tokio::test]
async fn mtls_optional_serves_anonymous_clients_without_an_identity() {
    within(async {
        let Mtls {
            server_ca,
            client_ca,
            server,
            _dir,
        } = Mtls::serve(false).await;

        let anonymous = client_config(Trust::Ca(&server_ca), None, &[]);
        assert_eq!(
            ask(server.addr, &anonymous, Some("mtls.test"))
                .await
                .unwrap(),
            "anonymous"
        );
        let id = client_identity(&client_ca);
        let good = client_config(Trust::Ca(&server_ca), Some(&id), &[]);
        assert_eq!(
            ask(server.addr, &good, Some("mtls.test")).await.unwrap(),
            IDENTITY
        );
        // Optional does not mean unverified: a certificate from another CA is refused.
        assert!(server.refuses_strangers(&server_ca).await);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Resumption and ALPN.

/// Two connections with one client config (one request on the first, so the client has read
/// the server's tickets): how the second handshake went.
async fn second_handshake(addr: SocketAddr, client: &Arc<ClientConfig>) -> Option<HandshakeKind> {
    let first = connect(addr, client, Some("resume.test")).await.unwrap();
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    let mut send = http1(first).await;
    assert_eq!(get(&mut send).await.unwrap().0, StatusCode::OK);
    let second = connect(addr, client, Some("resume.test")).await.unwrap();
    let kind = second.get_ref().1.handshake_kind();
    let mut send = http1(second).await;
    assert_eq!(get(&mut send).await.unwrap().0, StatusCode::OK);
    kind
}

#[tokio::test]
async fn sessions_resume_by_default_with_tickets_or_the_cache() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let (cert, key) = dir.pair("resume", &ca.server(&["resume.test"], false));
        let store = CertStore::builder().cert(&cert, &key).build().unwrap();
        let tls13 = || client_config(Trust::Ca(&ca), None, &[]);
        let tls12 = || {
            let mut roots = RootCertStore::empty();
            roots.add(ca.root()).unwrap();
            Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS12])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        };

        // Default: tickets (and the cache).
        let server = serve(TlsConfig::new(store.clone())).await;
        assert_eq!(
            second_handshake(server.addr, &tls13()).await,
            Some(HandshakeKind::Resumed)
        );
        assert_eq!(
            second_handshake(server.addr, &tls12()).await,
            Some(HandshakeKind::Resumed)
        );

        // No tickets: the server-side cache resumes.
        let server = serve(TlsConfig::new(store.clone()).session_tickets(false)).await;
        assert_eq!(
            second_handshake(server.addr, &tls13()).await,
            Some(HandshakeKind::Resumed)
        );
        assert_eq!(
            second_handshake(server.addr, &tls12()).await,
            Some(HandshakeKind::Resumed)
        );

        // Neither: every handshake is a full one.
        let server = serve(
            TlsConfig::new(store)
                .session_tickets(false)
                .session_cache(0),
        )
        .await;
        assert_eq!(
            second_handshake(server.addr, &tls13()).await,
            Some(HandshakeKind::Full)
        );
        assert_eq!(
            second_handshake(server.addr, &tls12()).await,
            Some(HandshakeKind::Full)
        );
    })
    .await;
}

#[tokio::test]
async fn alpn_is_chosen_per_listener() {
    within(async {
        let ca = Ca::new("test CA");
        let dir = TempDir::new();
        let (cert, key) = dir.pair("alpn", &ca.server(&["alpn.test"], false));
        let store = CertStore::builder().cert(&cert, &key).build().unwrap();
        let default = serve(TlsConfig::new(store.clone())).await;
        let h1_only = serve(TlsConfig::new(store).alpn(["http/1.1"])).await;
        let client = client_config(Trust::Ca(&ca), None, &[b"h2", b"http/1.1"]);

        let tls = connect(default.addr, &client, Some("alpn.test"))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let tls = connect(h1_only.addr, &client, Some("alpn.test"))
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut send = http1(tls).await;
        assert_eq!(
            get(&mut send).await.unwrap(),
            (StatusCode::OK, "anonymous".into())
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn bad_stores_and_ca_bundles_are_typed_errors_naming_the_file() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new();
    let (cert, key) = dir.pair("ok", &ca.server(&["ok.test"], false));
    let missing = dir.path("missing.pem");

    let e = CertStore::builder().build().unwrap_err();
    assert!(e.is_no_certificate(), "{e:?}");

    let e = CertStore::builder()
        .cert(&cert, &key)
        .cert(&missing, &key)
        .build()
        .unwrap_err();
    assert!(e.is_io(), "{e:?}");
    assert_eq!(e.path(), Some(missing.as_path()));

    // A certificate with no DNS name serves nothing unless it is the default or names are
    // given for it.
    let (ip_cert, ip_key) = dir.pair("ip", &ca.server(&["127.0.0.1"], false));
    let e = CertStore::builder()
        .cert(&ip_cert, &ip_key)
        .build()
        .unwrap_err();
    assert!(e.is_bad_name(), "{e:?}");
    assert_eq!(e.path(), Some(ip_cert.as_path()));
    assert!(CertStore::builder()
        .default_cert(&ip_cert, &ip_key)
        .build()
        .is_ok());
    let store = CertStore::builder()
        .cert_for(["Named.Test.", "*.named.test"], &ip_cert, &ip_key)
        .build()
        .unwrap();
    assert_eq!(store.names(), ["*.named.test", "named.test"]);
    for bad in [&["*"][..], &["a.*.test"], &["bad name.test"], &[]] {
        let e = CertStore::builder()
            .cert_for(bad.iter().copied(), &cert, &key)
            .build()
            .unwrap_err();
        assert!(e.is_bad_name(), "{bad:?}: {e:?}");
        assert_eq!(e.path(), Some(cert.as_path()));
    }

    // A certificate whose DER inside valid PEM is garbage.
    let junk = dir.write(
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    );
    let e = CertStore::builder().cert(&junk, &key).build().unwrap_err();
    assert!(e.is_bad_certificate(), "{e:?}");
    assert_eq!(e.path(), Some(junk.as_path()));

    // CA bundles for client certificates.
    let store = CertStore::builder().cert(&cert, &key).build().unwrap();
    let e = TlsConfig::new(store.clone())
        .client_auth(ClientAuth::required(&missing))
        .build()
        .unwrap_err();
    assert!(e.is_io(), "{e:?}");
    assert_eq!(e.path(), Some(missing.as_path()));
    let e = TlsConfig::new(store.clone())
        .client_auth(ClientAuth::optional(&key))
        .build()
        .unwrap_err();
    assert!(e.is_no_certificate(), "{e:?}");
    assert_eq!(e.path(), Some(key.as_path()));
    let e = TlsConfig::new(store.clone())
        .client_auth(ClientAuth::required(&junk))
        .build()
        .unwrap_err();
    assert!(e.is_bad_certificate(), "{e:?}");
    let bundle = dir.write("ca.pem", &ca.pem);
    assert!(TlsConfig::new(store)
        .client_auth(ClientAuth::required(&bundle))
        .build()
        .is_ok());
    // Errors never carry key material.
    assert!(!format!("{e} {e:?}").contains("PRIVATE"));
}
