//! TLS termination the way operators run it: an HTTPS balancing proxy on 127.0.0.1:8443 in
//! front of three plain-HTTP demo backends (`examples/demo`), serving several certificates
//! chosen by SNI and reloading them on SIGHUP without dropping a connection.
//!
//! ```text
//! cargo run --example tls_termination
//! ```
//!
//! At start it makes a test CA and three certificates with rcgen and writes them as PEM files
//! (chain and key, as certbot or a Kubernetes secret would) into a temporary directory:
//! `api.example.test`, the wildcard `*.apps.example.test`, and a default certificate for
//! `localhost` that also answers clients without SNI. A `CertStore` loads them, a `TlsConfig`
//! gives the listener its rustls configuration (session resumption on, ALPN `h2` and
//! `http/1.1`), and lbkit's `Server` serves the proxy with `.tls(config)`. It asks itself once
//! per name to show which certificate answers, then serves until Ctrl-C. Try, from another
//! terminal (the CA path and the process id are printed at start):
//!
//! ```text
//! CA=/tmp/lbkit-tls-example-<pid>/ca.pem
//! curl --cacert $CA --resolve api.example.test:8443:127.0.0.1 https://api.example.test:8443/
//! curl --cacert $CA --resolve x.apps.example.test:8443:127.0.0.1 https://x.apps.example.test:8443/headers
//! curl --cacert $CA https://localhost:8443/         # the default certificate
//! curl -k --http1.1 https://127.0.0.1:8443/         # no SNI: the default certificate too
//! openssl s_client -connect 127.0.0.1:8443 -servername api.example.test </dev/null 2>/dev/null \
//!     | openssl x509 -noout -subject -serial       # which certificate, and its serial
//! kill -USR1 <pid>   # renews the files on disk (what certbot does); nothing changes yet
//! kill -HUP <pid>    # reloads them: new handshakes get the new serials, open connections go on
//! ```
//!
//! A broken file on SIGHUP (try `echo junk > $(dirname $CA)/api.pem`, then HUP) is logged,
//! and the certificates loaded before keep serving; SIGUSR1 writes good files again.
//!
//! With flags it serves your own certificate (to every client) in front of your own backends,
//! as `benches/e2e/tls_handshake.sh` runs it beside nginx and HAProxy; SIGHUP reloads it:
//!
//! ```text
//! cargo run --release --example tls_termination -- --listen 127.0.0.1:9443 \
//!     --cert chain.pem --key key.pem --backends 127.0.0.1:9001,127.0.0.1:9002 --threads 2
//! ```

mod demo;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::tls::{CertStore, TlsConfig};
use lbkit::server::{RequestBody, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tower::ServiceBuilder;
use tracing_subscriber::EnvFilter;

// As in the README's proxy (`examples/reverse_proxy.rs`): mimalloc serves a proxy's small,
// short-lived allocations faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LISTEN: &str = "127.0.0.1:8443";

/// What the flags set; without any, the example makes its own CA, certificates and backends.
#[derive(Default)]
struct Args {
    /// `--listen ADDR` (default 127.0.0.1:8443).
    listen: Option<String>,
    /// `--cert PEM --key PEM`: serve this chain and key to every client, not the example's.
    cert: Option<(PathBuf, PathBuf)>,
    /// `--backends ADDR,ADDR,...`: these backends, not the demo ones.
    backends: Vec<SocketAddr>,
    /// `--threads N`: N worker threads, one event loop each (`Server::workers`); default: the
    /// runtime's threads.
    threads: Option<usize>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args::default();
    let (mut cert, mut key) = (None, None);
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        match (flag.as_str(), argv.next()) {
            ("--listen", Some(v)) => args.listen = Some(v),
            ("--cert", Some(v)) => cert = Some(PathBuf::from(v)),
            ("--key", Some(v)) => key = Some(PathBuf::from(v)),
            ("--threads", Some(v)) => args.threads = Some(v.parse()?),
            ("--backends", Some(v)) => {
                for addr in v.split(',').filter(|a| !a.is_empty()) {
                    args.backends.push(addr.parse()?);
                }
            }
            _ => {
                eprintln!(
                    "usage: tls_termination [--listen ADDR] [--cert CHAIN.pem --key KEY.pem] \
                     [--backends ADDR,ADDR,...] [--threads N]"
                );
                std::process::exit(2);
            }
        }
    }
    args.cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    Ok(args)
}

/// The certificates served: file stem and names (the first one is also the name asked for).
const SITES: [(&str, &str); 3] = [
    ("api", "api.example.test"),
    ("apps", "*.apps.example.test"),
    ("default", "localhost"),
];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = parse_args()?;

    // Either the certificate given by flags, served to every client, or the example's own: a
    // CA and the sites' certificates, written as PEM files like the ones a CA would give you.
    let (certs, example) = match &args.cert {
        Some((cert, key)) => (CertStore::builder().default_cert(cert, key).build()?, None),
        None => {
            let dir =
                std::env::temp_dir().join(format!("lbkit-tls-example-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let ca = Ca::new()?;
            std::fs::write(dir.join("ca.pem"), &ca.pem)?;
            ca.write_sites(&dir)?;
            let pem = |stem: &str| {
                (
                    dir.join(format!("{stem}.pem")),
                    dir.join(format!("{stem}.key")),
                )
            };
            let (api, api_key) = pem("api");
            let (apps, apps_key) = pem("apps");
            let (default, default_key) = pem("default");
            let certs = CertStore::builder()
                .cert(&api, &api_key)
                .cert(&apps, &apps_key)
                .default_cert(&default, &default_key)
                .build()?;
            (certs, Some((ca, dir)))
        }
    };
    let config = TlsConfig::new(certs.clone()).build()?;

    let mut endpoints: Vec<Endpoint> = args.backends.iter().copied().map(Endpoint::from).collect();
    if endpoints.is_empty() {
        for n in 1..=3 {
            endpoints.push(Endpoint::from(demo::backend(format!("backend-{n}")).await?));
        }
    }
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
        .service(Forward::<RequestBody>::new().proto("https"));

    let listener = demo::listen(args.listen.as_deref().unwrap_or(LISTEN)).await;
    let addr = listener.local_addr()?;
    let mut server = Server::new(proxy).tls(config);
    if let Some(n) = args.threads {
        // One event loop per worker thread, as the README's proxy serves with `--threads`.
        server = server.workers(n);
    }
    let serving =
        tokio::spawn(server.serve_with_shutdown(listener, demo::ctrl_c(), Duration::from_secs(10)));

    // Ask ourselves once per name, trusting the CA: which certificate answers.
    if let Some((ca, _)) = &example {
        for name in ["api.example.test", "x.apps.example.test", "localhost"] {
            println!("{name:<20} -> {}", ask(addr, &ca.pem, name).await?);
        }
    }

    // SIGHUP reloads the files; SIGUSR1 renews the example's files on disk first (as certbot
    // would).
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let dir = example.as_ref().map(|(_, dir)| dir.clone());
    let reloader = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hup.recv() => match certs.reload() {
                    // `reload` logs its outcome, and keeps the old certificates on error.
                    Ok(()) => println!("SIGHUP: certificates reloaded ({:?})", certs.names()),
                    Err(e) => println!("SIGHUP: reload failed, old certificates kept: {e}"),
                },
                Some(()) = usr1.recv() => match &example {
                    Some((ca, dir)) => match ca.write_sites(dir) {
                        Ok(()) => println!("SIGUSR1: renewed the files (SIGHUP loads them)"),
                        Err(e) => println!("SIGUSR1: could not write certificates: {e}"),
                    },
                    None => println!("SIGUSR1: the certificate is yours to renew"),
                },
                else => break,
            }
        }
    });

    println!(
        "\nHTTPS proxy on https://{addr}, pid {}",
        std::process::id()
    );
    if let Some(dir) = &dir {
        println!("CA: {}", dir.join("ca.pem").display());
        println!("SIGUSR1 renews the certificate files, SIGHUP reloads them, Ctrl-C stops.");
    }
    serving.await?;
    reloader.abort();
    if let Some(dir) = &dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("bye");
    Ok(())
}

/// The example's certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Result<Ca, BoxError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "lbkit example CA");
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// Writes a new certificate (chain: leaf, then the CA) and key for every site into `dir`.
    /// Each has a new key and serial, as a renewal has.
    fn write_sites(&self, dir: &Path) -> Result<(), BoxError> {
        for (stem, name) in SITES {
            let mut params = CertificateParams::new(vec![name.to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &self.issuer)?;
            // The key first: a reload between the two writes sees a mismatch and keeps the
            // old pair (the next SIGHUP loads the new one).
            write_atomically(&dir.join(format!("{stem}.key")), &key.serialize_pem())?;
            write_atomically(
                &dir.join(format!("{stem}.pem")),
                &format!("{}{}", cert.pem(), self.pem),
            )?;
        }
        Ok(())
    }
}

/// Writes `path` by renaming a temporary file over it, so a reader never sees half a file.
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// One GET over TLS to `addr` asking for `name` by SNI, trusting only the CA in `ca_pem`:
/// the subject of the certificate that answered, and the answer's first line.
async fn ask(addr: SocketAddr, ca_pem: &str, name: &str) -> Result<String, BoxError> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_owned())?, tcp)
        .await?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    // The same parser that gives a server its clients' identities reads the subject here.
    let subject = lbkit::server::tls::PeerCertificate::from_chain(chain.to_vec())
        .map(|c| c.subject().to_owned())
        .unwrap_or_default();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header(http::header::HOST, name)
        .body(Empty::<Bytes>::new())?;
    let res = send.send_request(req).await?;
    let body = res.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(format!(
        "certificate {subject}: {}",
        text.lines().next().unwrap_or("")
    ))
}
