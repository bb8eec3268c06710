//! TLS from the proxy to the backends over real sockets on 127.0.0.1: a test CA made with
//! rcgen signs the backends' certificates, the backends are hyper servers behind tokio-rustls
//! (HTTP/1.1 and HTTP/2 by ALPN), and `Forward::tls` reaches them trusting that CA. Also
//! backends on Unix sockets through `Forward::connect_with`, the defaults of Forward's
//! timeouts and its idle-connection settings.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

mod common;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::proxy::{ErrorResponseLayer, Forward, ForwardError, UpstreamTls};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use rcgen::{CertificateParams, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tower::{ServiceBuilder, ServiceExt};

async fn within<F: Future>(f: F) -> F::Output {
    // Only a hang takes that long.
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test did not finish in time")
}

/// A test certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, PEM.
struct Issued {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let (issuer, pem) = common::test_ca(name);
        Ca { issuer, pem }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    fn issue(&self, names: &[&str]) -> Issued {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// What a TLS backend saw of a connection and request, in its answer.
fn describe<B>(req: &Request<B>, alpn: &str, sni: &str, client_cert: bool) -> String {
    format!(
        "{:?} alpn={alpn} sni={sni} client-cert={client_cert} {} {}",
        req.version(),
        req.uri().path(),
        req.uri().scheme_str().unwrap_or("-"),
    )
}

/// A hyper server (HTTP/1.1 and HTTP/2) behind tokio-rustls on 127.0.0.1, serving `issued`,
/// offering `alpn`, asking for a client certificate from `client_ca` if given. Answers each
/// request with what it saw ([`describe`]). Stops when dropped.
struct TlsBackend {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_backend(issued: &Issued, alpn: &[&[u8]], client_ca: Option<&Ca>) -> TlsBackend {
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                .unwrap();
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap(),
            )
        }
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicU64::new(0));
    let counted = handshakes.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let (_, conn) = tls.get_ref();
                let alpn = conn
                    .alpn_protocol()
                    .map_or("-".to_owned(), |p| String::from_utf8_lossy(p).into_owned());
                let sni = conn.server_name().unwrap_or("-").to_owned();
                let client_cert = conn.peer_certificates().is_some();
                let service = hyper::service::service_fn(move |req| {
                    let body = describe(&req, &alpn, &sni, client_cert);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsBackend {
        addr,
        handshakes,
        task,
    }
}

/// Sends `GET path` through a balancer over `endpoints` and `forward`; the answer's status and
/// body, or the error.
async fn get(
    endpoints: Vec<Endpoint>,
    forward: Forward<Empty<Bytes>>,
    path: &str,
    version: Version,
) -> Result<(StatusCode, String), BoxError> {
    let svc = ServiceBuilder::new()
        .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
        .service(forward);
    let mut req = Request::get(path).body(Empty::<Bytes>::new()).unwrap();
    *req.version_mut() = version;
    let res = svc.oneshot(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The [`ForwardError`] in an error's source chain.
fn forward_error<'a>(e: &'a (dyn StdError + 'static)) -> &'a ForwardError {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<ForwardError>() {
            return f;
        }
        cur = e.source();
    }
    panic!("no ForwardError in {e:?}")
}

/// The whole chain of an error, for messages.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

fn trusting(ca: &Ca) -> UpstreamTls {
    UpstreamTls::builder()
        .ca_pem(ca.pem.clone())
        .build()
        .unwrap()
}

#[tokio::test]
async fn https_backend_is_reached_with_the_name_of_the_endpoint() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"h2", b"http/1.1"], None).await;
        let endpoint = Endpoint::from(backend.addr).with_host("backend.test");
        let forward = Forward::new().tls(trusting(&ca));

        // Two requests over HTTP/1.1: ALPN says so, SNI is the endpoint's host name, and the
        // second reuses the pooled TLS connection.
        for path in ["/one", "/two"] {
            let (status, body) = get(
                vec![endpoint.clone()],
                forward.clone(),
                path,
                Version::HTTP_11,
            )
            .await
            .unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                body,
                format!("HTTP/1.1 alpn=http/1.1 sni=backend.test client-cert=false {path} -")
            );
        }
        assert_eq!(backend.handshakes.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn h2_over_tls_is_chosen_by_alpn() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"h2", b"http/1.1"], None).await;
        let endpoint = Endpoint::from(backend.addr).with_host("backend.test");

        // Every request over HTTP/2.
        let forward = Forward::new().tls(trusting(&ca)).http2();
        let (status, body) = get(vec![endpoint.clone()], forward, "/h2", Version::HTTP_11)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        // `:scheme` is https over TLS.
        assert_eq!(
            body,
            "HTTP/2.0 alpn=h2 sni=backend.test client-cert=false /h2 https"
        );

        // The client's own version: an HTTP/2 request over h2, an HTTP/1.1 one over http/1.1.
        let forward = Forward::new()
            .tls(trusting(&ca))
            .upstream(lbkit::proxy::UpstreamProtocol::SameAsClient);
        let (_, body) = get(
            vec![endpoint.clone()],
            forward.clone(),
            "/a",
            Version::HTTP_2,
        )
        .await
        .unwrap();
        assert!(body.starts_with("HTTP/2.0 alpn=h2 "), "{body}");
        let (_, body) = get(vec![endpoint], forward, "/b", Version::HTTP_11)
            .await
            .unwrap();
        assert!(body.starts_with("HTTP/1.1 alpn=http/1.1 "), "{body}");
    })
    .await;
}

#[tokio::test]
async fn a_backend_without_the_protocol_fails_the_handshake() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        // Speaks only HTTP/1.1: an HTTP/2 connection finds no protocol in common.
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"http/1.1"], None).await;
        let endpoint = Endpoint::from(backend.addr).with_host("backend.test");
        let forward = Forward::new().tls(trusting(&ca)).http2();
        let e = get(vec![endpoint], forward, "/", Version::HTTP_11)
            .await
            .unwrap_err();
        let f = forward_error(&*e);
        assert!(f.is_tls() && f.is_not_sent(), "{}", chain(&*e));
    })
    .await;
}

#[tokio::test]
async fn untrusted_certificates_and_wrong_names_are_typed_errors_and_502s() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        let other_ca = Ca::new("someone else's CA");
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"http/1.1"], None).await;
        let named = Endpoint::from(backend.addr).with_host("backend.test");

        let cases = [
            // Signed by a CA the proxy does not trust.
            (
                "unknown CA",
                named.clone(),
                trusting(&other_ca),
                "UnknownIssuer",
            ),
            // Trusted, but for another name.
            (
                "wrong host",
                Endpoint::from(backend.addr).with_host("other.test"),
                trusting(&ca),
                "not valid for name",
            ),
            // No host name: checked against the address, which the certificate does not name.
            (
                "address",
                Endpoint::from(backend.addr),
                trusting(&ca),
                "not valid for name",
            ),
            // A fixed name overrides the endpoint's (right) one.
            (
                "fixed name",
                named.clone(),
                UpstreamTls::builder()
                    .ca_pem(ca.pem.clone())
                    .server_name("fixed.test")
                    .build()
                    .unwrap(),
                "not valid for name",
            ),
        ];
        for (case, endpoint, tls, why) in cases {
            let forward = Forward::new().tls(tls.clone());
            let e = get(vec![endpoint.clone()], forward, "/", Version::HTTP_11)
                .await
                .unwrap_err();
            let f = forward_error(&*e);
            assert!(f.is_tls(), "{case}: {}", chain(&*e));
            assert!(f.is_not_sent() && !f.is_connect(), "{case}");
            assert!(chain(&*e).contains(why), "{case}: {}", chain(&*e));

            // Behind the error layer: a 502, the body naming no backend.
            let svc = ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(BalancerLayer::new(vec![endpoint], RoundRobin::new()))
                .service(Forward::new().tls(tls));
            let res = svc
                .oneshot(Request::get("/").body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{case}");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"502 Bad Gateway\n", "{case}");
        }

        // A fixed name the certificate has: fine, even with a wrong endpoint host name.
        let tls = UpstreamTls::builder()
            .ca_pem(ca.pem.clone())
            .server_name("backend.test")
            .build()
            .unwrap();
        let endpoint = Endpoint::from(backend.addr).with_host("other.test");
        let (status, body) = get(
            vec![endpoint],
            Forward::new().tls(tls),
            "/",
            Version::HTTP_11,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("sni=backend.test"), "{body}");

        // A certificate for the IP address: no host name needed; IP addresses are not sent as
        // SNI.
        let by_ip = tls_backend(&ca.issue(&["127.0.0.1"]), &[b"http/1.1"], None).await;
        let (_, body) = get(
            vec![Endpoint::from(by_ip.addr)],
            Forward::new().tls(trusting(&ca)),
            "/",
            Version::HTTP_11,
        )
        .await
        .unwrap();
        assert!(body.contains("sni=-"), "{body}");
    })
    .await;
}

#[tokio::test]
async fn client_certificates_reach_backends_that_ask_for_them() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"http/1.1"], Some(&ca)).await;
        let endpoint = Endpoint::from(backend.addr).with_host("backend.test");

        // Without one, the backend refuses the connection. Under TLS 1.3 the client's side of
        // the handshake is over before the server checks the client's certificate, so the
        // refusal (an alert) arrives as the request's answer: a failed request, not a failed
        // handshake.
        let e = get(
            vec![endpoint.clone()],
            Forward::new().tls(trusting(&ca)),
            "/",
            Version::HTTP_11,
        )
        .await
        .unwrap_err();
        let _ = forward_error(&*e);
        assert!(chain(&*e).contains("CertificateRequired"), "{}", chain(&*e));

        let client = ca.issue(&["proxy.test"]);
        let tls = UpstreamTls::builder()
            .ca_pem(ca.pem.clone())
            .client_cert_pem(client.cert_pem.clone(), client.key_pem.clone())
            .build()
            .unwrap();
        let (status, body) = get(
            vec![endpoint],
            Forward::new().tls(tls),
            "/",
            Version::HTTP_11,
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("client-cert=true"), "{body}");
    })
    .await;
}

#[test]
fn bad_tls_settings_are_typed_errors() {
    let e = UpstreamTls::builder().build().unwrap_err();
    assert!(e.is_no_certificate(), "{e:?}");
    let e = UpstreamTls::builder()
        .ca_pem("not PEM at all")
        .build()
        .unwrap_err();
    assert!(e.is_no_certificate(), "{e:?}");
    let e = UpstreamTls::builder()
        .ca_file("/nonexistent/ca.pem")
        .build()
        .unwrap_err();
    assert!(e.is_io(), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    let ca = Ca::new("lbkit test CA");
    let e = UpstreamTls::builder()
        .ca_pem(ca.pem.clone())
        .server_name("not a name!")
        .build()
        .unwrap_err();
    assert!(e.is_bad_name(), "{e:?}");
    let (a, b) = (ca.issue(&["a.test"]), ca.issue(&["b.test"]));
    let e = UpstreamTls::builder()
        .ca_pem(ca.pem.clone())
        .client_cert_pem(a.cert_pem, b.key_pem)
        .build()
        .unwrap_err();
    assert!(e.is_key_mismatch(), "{e:?}");
}

/// The response timeout is on by default, at 60 s: on tokio's paused clock, which jumps to
/// the next timer whenever the runtime has nothing else to do, a backend that never answers
/// gives a timeout error after exactly that long of the clock's time.
#[tokio::test(start_paused = true)]
async fn the_response_timeout_defaults_to_60_s() {
    // Accepts and reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let started = tokio::time::Instant::now();
    // No connect timeout: the only timer is the response timeout.
    let forward = Forward::new().connect_timeout(None);
    let e = get(vec![Endpoint::from(addr)], forward, "/", Version::HTTP_11)
        .await
        .unwrap_err();
    assert!(forward_error(&*e).is_timeout(), "{}", chain(&*e));
    assert_eq!(started.elapsed().as_secs(), 60);
}

#[tokio::test]
async fn idle_connections_are_capped_per_endpoint() {
    within(async {
        let be = common::start_server("idle").await;
        // Four requests at once need four connections; then at most one stays open.
        be.hold(1);
        let forward = Forward::<Empty<Bytes>>::new().max_idle_per_endpoint(1);
        let svc = ServiceBuilder::new()
            .layer(BalancerLayer::new(vec![be.endpoint()], RoundRobin::new()))
            .service(forward);
        let mut calls = Vec::new();
        for _ in 0..4 {
            let svc = svc.clone();
            calls.push(tokio::spawn(async move {
                let res = svc
                    .oneshot(Request::get("/").body(Empty::<Bytes>::new()).unwrap())
                    .await
                    .unwrap();
                res.into_body().collect().await.unwrap();
            }));
        }
        while be.hits() < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(be.open_connections(), 4);
        be.release();
        for call in calls {
            call.await.unwrap();
        }
        // The three beyond the cap are closed as they come free.
        while be.open_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// The README's proxy (`examples/reverse_proxy.rs`) with `--backend-ca` and `--backend-name`:
/// a client speaking plain HTTP to it reaches an HTTPS backend.
#[tokio::test]
async fn the_readme_proxy_reaches_https_backends() {
    within(async {
        let ca = Ca::new("lbkit test CA");
        let backend = tls_backend(&ca.issue(&["backend.test"]), &[b"h2", b"http/1.1"], None).await;
        let args = reverse_proxy::Args {
            backend_tls: Some(
                UpstreamTls::builder()
                    .ca_pem(ca.pem.clone())
                    .server_name("backend.test")
                    .build()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_pool, serving) = reverse_proxy::proxy(
            vec![Endpoint::from(backend.addr)],
            &args,
            listener,
            std::future::pending(),
        );
        let _serving = tokio::spawn(serving);
        let client = common::http_client();
        let res = client
            .get(format!("http://{addr}/through").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            b"HTTP/1.1 alpn=http/1.1 sni=backend.test client-cert=false /through -"
        );
    })
    .await;
}

/// Backends on Unix sockets, reached through a connector of the test's own: endpoints named
/// `app-1` and `app-2`, each socket's path looked up by the endpoint's id.
#[cfg(unix)]
#[tokio::test]
async fn unix_socket_backends_through_connect_with() {
    within(async {
        let dir = std::env::temp_dir().join(format!("lbkit-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut servers = Vec::new();
        for name in ["app-1", "app-2"] {
            let path = dir.join(format!("{name}.sock"));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            servers.push(tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let service = hyper::service::service_fn(move |_req| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            }));
        }
        let sockets = dir.clone();
        let forward = Forward::<Empty<Bytes>>::new().connect_with(move |target| {
            tokio::net::UnixStream::connect(
                sockets.join(format!("{}.sock", target.endpoint().id())),
            )
        });
        // One balancer for all four requests: round robin takes turns.
        let svc = ServiceBuilder::new()
            .layer(BalancerLayer::new(
                [Endpoint::new("app-1"), Endpoint::new("app-2")],
                RoundRobin::new(),
            ))
            .service(forward.clone());
        let mut answers = Vec::new();
        for _ in 0..4 {
            let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            answers.push(String::from_utf8_lossy(&body).into_owned());
        }
        answers.sort();
        assert_eq!(answers, ["app-1", "app-1", "app-2", "app-2"]);

        // A socket that is not there: a connect error, not sent.
        let e = get(vec![Endpoint::new("app-3")], forward, "/", Version::HTTP_11)
            .await
            .unwrap_err();
        let f = forward_error(&*e);
        assert!(f.is_connect() && f.is_not_sent(), "{}", chain(&*e));
        for server in servers {
            server.abort();
        }
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
