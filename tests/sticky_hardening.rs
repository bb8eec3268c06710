//! Sticky cookies against hostile clients, over real sockets on 127.0.0.1 (issue 13, item 7):
//! lbkit's `Server` (plain and TLS) → `StickyLayer` → `BalancerLayer` → `Forward` in front of
//! two real HTTP/1.1 backends that answer with their names.
//!
//! - a cookie past its lifetime is not honoured (the client is re-balanced and gets a fresh
//!   cookie), while the same cookie is honoured by a proxy with a longer lifetime;
//! - only the first 4 affinity cookies of a request are opened: a valid one behind 4 others
//!   is ignored, one among the first 4 is honoured (also when sealed with a key being rotated
//!   out);
//! - the cookie is `Secure` on responses to requests that came over TLS, and not over plain
//!   HTTP.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{endpoints, start_servers, TempDir, TestServer, HANG};
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{tls, RequestBody, Server};
use lbkit::sticky::{CookieSecret, StickyLayer};
use lbkit::strategy::RoundRobin;
use lbkit::BalancerLayer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;

async fn within<F: Future>(f: F) -> F::Output {
    // Only a hang takes that long.
    tokio::time::timeout(HANG * 2, f)
        .await
        .expect("test did not finish in time")
}

/// A proxy on 127.0.0.1 over the backends; stopped when dropped.
struct Proxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// lbkit's server → `sticky` → round robin over `backends` → `Forward`, with TLS if `tls` is
/// given.
fn proxy(
    sticky: StickyLayer,
    backends: &[TestServer],
    tls: Option<Arc<tls::ServerConfig>>,
) -> Proxy {
    let svc = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .layer(sticky)
        .layer(BalancerLayer::new(endpoints(backends), RoundRobin::new()))
        .service(Forward::<RequestBody>::new());
    let (listener, addr) = common::listen_reserved();
    let mut server = Server::new(svc);
    if let Some(config) = tls {
        server = server.tls(config);
    }
    Proxy {
        addr,
        task: tokio::spawn(server.serve(listener)),
    }
}

/// What one answer of the proxy says: the backend that served it and the `Set-Cookie` it
/// carries, if any.
#[derive(Debug)]
struct Answer {
    served_by: String,
    set_cookie: Option<String>,
}

impl Answer {
    /// The `lb=VALUE` pair of the `Set-Cookie`.
    fn cookie(&self) -> String {
        let set = self.set_cookie.as_deref().expect("a Set-Cookie");
        set.split(';').next().unwrap().to_owned()
    }
}

/// Sends `GET /` with `cookie` (if any) on a new HTTP/1.1 connection over `io`.
async fn ask_over<I>(io: I, cookie: Option<&str>) -> Answer
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", "localhost");
    if let Some(c) = cookie {
        req = req.header(COOKIE, c);
    }
    let res = send
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("response");
    assert_eq!(res.status(), StatusCode::OK);
    let set_cookie = res
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        served_by: String::from_utf8(body.to_vec()).unwrap(),
        set_cookie,
    }
}

async fn ask(proxy: &Proxy, cookie: Option<&str>) -> Answer {
    ask_over(TcpStream::connect(proxy.addr).await.unwrap(), cookie).await
}

/// Asks until the round robin would send the next cookie-less request to the other backend
/// than `pinned`, then checks that a request with `cookie` still goes to `pinned` (with no
/// new cookie, or a renewed one for the same endpoint when `renew`), so stickiness, not luck,
/// kept it there.
async fn assert_honoured(proxy: &Proxy, cookie: &str, pinned: &str) {
    let a = ask(proxy, Some(cookie)).await;
    assert_eq!(a.served_by, pinned, "cookie not honoured");
    assert_eq!(
        a.set_cookie, None,
        "an honoured, fresh cookie is not set again"
    );
    // Twice in a row under round robin: once would be luck half the time.
    let a = ask(proxy, Some(cookie)).await;
    assert_eq!(a.served_by, pinned, "cookie not honoured");
}

#[tokio::test]
async fn an_expired_cookie_is_not_honoured_and_is_replaced() {
    within(async {
        let backends = start_servers(2).await;
        let key = CookieSecret::generate();
        // Two proxies sharing the key: one honours cookies for an hour, one for 2 seconds.
        let long = proxy(
            StickyLayer::cookie("lb", key.clone()).lifetime(Duration::from_secs(3600)),
            &backends,
            None,
        );
        let short = proxy(
            StickyLayer::cookie("lb", key.clone()).lifetime(Duration::from_secs(2)),
            &backends,
            None,
        );
        let first = ask(&long, None).await;
        let cookie = first.cookie();
        assert_honoured(&long, &cookie, &first.served_by).await;

        // Older than 2 s for certain (issue times are whole seconds: age >= 3 s after 3.1 s).
        tokio::time::sleep(Duration::from_millis(3100)).await;

        // The long-lived proxy still honours it ...
        assert_honoured(&long, &cookie, &first.served_by).await;
        // ... the short-lived one treats it as absent: a new cookie, every time, for whatever
        // endpoint round robin picked.
        for _ in 0..4 {
            let a = ask(&short, Some(&cookie)).await;
            let fresh = a.cookie();
            assert_ne!(fresh, cookie);
            let opened = StickyLayer::cookie("lb", key.clone())
                .open(fresh.trim_start_matches("lb=").as_bytes())
                .expect("the new cookie is valid");
            assert_eq!(opened, a.served_by.as_str());
        }
        // The fresh cookie works on the short-lived proxy.
        let a = ask(&short, None).await;
        assert_honoured(&short, &a.cookie(), &a.served_by).await;
    })
    .await
}

#[tokio::test]
async fn only_the_first_four_affinity_cookies_are_opened() {
    within(async {
        let backends = start_servers(2).await;
        let (old, key) = (CookieSecret::generate(), CookieSecret::generate());
        let layer = StickyLayer::cookie("lb", key.clone()).accept_previous_key(old.clone());
        let p = proxy(layer.clone(), &backends, None);
        let first = ask(&p, None).await;
        let valid = first.cookie();
        // Values of the right length and alphabet, sealed with a key the proxy does not know:
        // each costs a decryption per key if it is opened at all.
        let stranger = StickyLayer::cookie("lb", CookieSecret::generate());
        let junk: Vec<String> = (0..4)
            .map(|_| format!("lb={}", stranger.seal(&"s0".into()).unwrap()))
            .collect();

        // Fourth of four: honoured.
        let header = format!("{}; {valid}", junk[..3].join("; "));
        assert_honoured(&p, &header, &first.served_by).await;

        // Fifth: never opened, so the request carries no valid cookie; it gets a new one (for
        // whatever endpoint round robin picks), every time.
        let header = format!("{}; {valid}", junk.join("; "));
        for _ in 0..4 {
            let a = ask(&p, Some(&header)).await;
            assert!(a.set_cookie.is_some(), "the fifth cookie was opened: {a:?}");
        }
        // A thousand of them cost no more (and the proxy still answers).
        let stuffed = format!("{}; {valid}", vec![junk[0].as_str(); 1000].join("; "));
        let a = ask(&p, Some(&stuffed)).await;
        assert!(a.set_cookie.is_some());

        // Key rotation still works within the bound: a cookie sealed with the old key, third
        // of three, is honoured and set again with the current key.
        let before = StickyLayer::cookie("lb", old);
        let old_cookie = format!(
            "lb={}",
            before.seal(&first.served_by.as_str().into()).unwrap()
        );
        let header = format!("{}; {old_cookie}", junk[..2].join("; "));
        let a = ask(&p, Some(&header)).await;
        assert_eq!(a.served_by, first.served_by);
        let renewed = a.cookie();
        assert_eq!(
            StickyLayer::cookie("lb", key)
                .open(renewed.trim_start_matches("lb=").as_bytes())
                .expect("sealed with the current key"),
            first.served_by.as_str()
        );
        assert_honoured(&p, &renewed, &first.served_by).await;
    })
    .await
}

#[tokio::test]
async fn the_cookie_is_secure_behind_tls_by_default() {
    within(async {
        let backends = start_servers(2).await;
        let dir = TempDir::new();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.0.join("cert.pem");
        let key = dir.0.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let config = tls::server_config_from_pem(&cert, &key).unwrap();
        let sticky = StickyLayer::cookie("lb", CookieSecret::generate());
        let over_tls = proxy(sticky.clone(), &backends, Some(config));
        let plain = proxy(sticky.clone(), &backends, None);

        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut client = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(over_tls.addr).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .unwrap();
        let a = ask_over(stream, None).await;
        let set = a.set_cookie.expect("a cookie");
        assert!(
            set.split("; ").any(|attr| attr == "Secure"),
            "no Secure over TLS: {set}"
        );

        let a = ask(&plain, None).await;
        let set = a.set_cookie.expect("a cookie");
        assert!(
            !set.split("; ").any(|attr| attr == "Secure"),
            "Secure over plain HTTP: {set}"
        );
        // Unless asked for (TLS ends in front of the proxy).
        let forced = proxy(sticky.secure(true), &backends, None);
        let set = ask(&forced, None).await.set_cookie.expect("a cookie");
        assert!(set.split("; ").any(|attr| attr == "Secure"), "{set}");
    })
    .await
}
