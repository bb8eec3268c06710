//! TLS termination: an HTTPS balancing proxy on 127.0.0.1:8443 in front of three plain-HTTP
//! demo backends (`examples/demo`), with a self-signed certificate made at start.
//!
//! ```text
//! cargo run --example tls_termination
//! ```
//!
//! It writes a self-signed certificate for `localhost` and 127.0.0.1 (made with rcgen) as PEM
//! files into a temporary directory, loads them with `tls::server_config_from_pem` as a real
//! deployment loads its own, and serves the proxy with lbkit's `Server` and `.tls(config)`
//! (ALPN offers `h2` and `http/1.1`). It asks itself once over HTTP/1.1 and once over HTTP/2 to
//! show both work, and then serves until Ctrl-C (requests in flight finish). Try, from another
//! terminal:
//!
//! ```text
//! curl -k https://127.0.0.1:8443/                 # HTTP/2 by ALPN; answers rotate over the backends
//! curl -k --http1.1 https://127.0.0.1:8443/       # HTTP/1.1 by ALPN
//! curl -k https://127.0.0.1:8443/headers          # the backend sees X-Forwarded-Proto: https
//! curl --cacert <printed cert path> https://localhost:8443/   # trust the cert instead of -k
//! ```

mod demo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{tls, RequestBody, Server};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tower::ServiceBuilder;
use tracing_subscriber::EnvFilter;

const LISTEN: &str = "127.0.0.1:8443";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    // A self-signed certificate, written as PEM files like the ones a CA would give you.
    let dir = std::env::temp_dir().join(format!("lbkit-tls-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem())?;
    std::fs::write(&key_path, certified.signing_key.serialize_pem())?;
    let config = tls::server_config_from_pem(&cert_path, &key_path)?;

    let mut endpoints = Vec::new();
    for n in 1..=3 {
        endpoints.push(Endpoint::from(demo::backend(format!("backend-{n}")).await?));
    }
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
        .service(Forward::<RequestBody>::new().proto("https"));

    let listener = demo::listen(LISTEN).await;
    let addr = listener.local_addr()?;
    let serving = tokio::spawn(Server::new(proxy).tls(config).serve_with_shutdown(
        listener,
        demo::ctrl_c(),
        Duration::from_secs(10),
    ));

    // Ask ourselves once per protocol, trusting the new certificate.
    let cert = certified.cert.der().clone();
    for alpn in ["http/1.1", "h2"] {
        let answer = ask(addr, &cert, alpn).await?;
        println!("over {alpn:<8}: {answer}");
    }

    println!(
        "\nHTTPS proxy on https://{addr} (certificate: {})",
        cert_path.display()
    );
    println!("try: curl -k https://127.0.0.1:8443/   (Ctrl-C to stop)");
    serving.await?;
    let _ = std::fs::remove_dir_all(&dir);
    println!("bye");
    Ok(())
}

/// One GET over TLS with `alpn`, trusting only `cert`; returns the answer's first line.
async fn ask(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    alpn: &str,
) -> Result<String, BoxError> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone())?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let io = TokioIo::new(tls);
    let req = Request::get("https://localhost/").body(Empty::<Bytes>::new())?;
    let res = if alpn == "h2" {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.headers.insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
        parts.uri = "/".parse()?;
        send.send_request(Request::from_parts(parts, body)).await?
    };
    let version = res.version();
    let body = res.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(format!("{version:?} {}", text.lines().next().unwrap_or("")))
}
