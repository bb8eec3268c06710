//! `examples/config_proxy.rs` (its `ConfigProxy`, compiled into this test) over real sockets
//! on 127.0.0.1: a TOML file starts the proxy, requests spread over the pool, the JSON admin
//! API lists and drains endpoints, `SIGHUP` reloads the file (endpoints added and removed, a
//! removed endpoint's request in flight finishing) while a keep-alive client connection stays
//! open, an invalid file is refused with the key at fault and the old configuration stays, and
//! a TLS listener terminates TLS.
//!
//! No assertion depends on how fast the machine is: waits are on conditions, and the time
//! limits only catch hangs.

#[path = "../examples/config_proxy.rs"]
#[allow(dead_code)]
mod config_proxy;

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{start_server, wait_until, within, TempDir, TestServer};
use config_proxy::{Config, ConfigError, ConfigProxy};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const HANG: Duration = Duration::from_secs(60);

/// A file with one plain listener and an admin port (both on ports the OS picks) and one pool
/// `web` over `servers`, with a TCP check.
fn file(servers: &[&TestServer]) -> String {
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ id = \"{}\", addr = \"{}\" }}", s.name(), s.addr()))
        .collect();
    format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[pools.web]
strategy = "round_robin"
endpoints = [{}]
check = {{ kind = "tcp", interval = "200ms" }}
outlier = {{ consecutive_failures = 5 }}
"#,
        endpoints.join(", ")
    )
}

/// An HTTP/1.1 client connection (kept alive) to `addr`.
async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Sends `req` on `sender`; the status and body.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, String) {
    sender.ready().await.expect("connection open");
    let res = sender.send_request(req).await.expect("answer");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "127.0.0.1")
        .body(Full::default())
        .unwrap()
}

/// `GET /` on `sender`: who answered.
async fn who(sender: &mut SendRequest<Full<Bytes>>) -> String {
    let (status, body) = send(sender, get("/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The admin API's JSON for pool `web`: its endpoints' ids.
async fn admin_ids(admin: SocketAddr) -> Vec<String> {
    let json = admin_json(admin).await;
    json["pools"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn admin_json(admin: SocketAddr) -> serde_json::Value {
    let mut c = connect(admin).await;
    let (status, body) = send(&mut c, get("/status.json")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// `POST /status/ACTION` with `{"pool": "web", "endpoint": ENDPOINT}`: the status and JSON.
async fn admin_post(
    admin: SocketAddr,
    action: &str,
    endpoint: &str,
) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({"pool": "web", "endpoint": endpoint});
    let mut c = connect(admin).await;
    let req = Request::post(format!("/status/{action}"))
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (status, body) = send(&mut c, req).await;
    (status, serde_json::from_str(&body).expect("JSON answer"))
}

/// Requests on `sender` until every one of `names` answered (each within 100 requests: round
/// robin over two or three endpoints needs a few); every answer must be one of `names`.
async fn answered_by_all(sender: &mut SendRequest<Full<Bytes>>, names: &[&str]) {
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let who = who(sender).await;
        assert!(
            names.contains(&who.as_str()),
            "{who} answered, not one of {names:?}"
        );
        seen.insert(who);
        if seen.len() == names.len() {
            return;
        }
    }
    panic!("only {seen:?} answered, expected {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_runs_the_proxy_and_sighup_reloads_it_without_dropping_connections() {
    within(HANG, async {
        let (a, b, c) = (
            start_server("a").await,
            start_server("b").await,
            start_server("c").await,
        );
        let dir = TempDir::new();
        let path = dir.write("proxy.toml", file(&[&a, &b]));
        let proxy = Arc::new(ConfigProxy::start(&path).await.expect("valid file"));
        let _hup = proxy.reload_on_sighup().expect("SIGHUP handler");
        let listen = proxy.listen_addrs()[0];
        let admin = proxy.admin_addr().expect("admin port");

        // Requests spread over the pool, on one keep-alive connection kept for the whole test.
        let mut client = connect(listen).await;
        answered_by_all(&mut client, &["a", "b"]).await;

        // The admin API lists the endpoints with their health, in-flight count and latency.
        let json = admin_json(admin).await;
        let pool = &json["pools"][0];
        assert_eq!(pool["name"], "web");
        assert_eq!(pool["strategy"], "round_robin");
        for e in pool["endpoints"].as_array().unwrap() {
            assert_eq!(e["health"], "healthy", "{e}");
            assert!(e["in_flight"].is_u64(), "{e}");
            assert!(e["requests"].as_u64().unwrap() >= 1, "{e}");
            assert!(e["latency_ms"]["p50"].is_number(), "{e}");
        }

        // The pool's statistics serialise (feature `serde`) with durations in human form.
        let stats = serde_json::to_value(proxy.pool("web").unwrap().stats()).unwrap();
        assert_eq!(stats["strategy"], "round_robin");
        let ep = &stats["endpoints"][0];
        assert_eq!(
            (&ep["id"], &ep["health"], &ep["weight"]),
            (&"a".into(), &"healthy".into(), &1.into())
        );
        assert!(ep["requests"].as_u64().unwrap() >= 1, "{ep}");
        let p50 = ep["latency"]["p50"].as_str().expect("a duration");
        assert!(
            humantime_serde::re::humantime::parse_duration(p50).is_ok(),
            "{p50}"
        );
        assert!(ep.get("histogram").is_none(), "{ep}");

        // POST drain takes `b` out of rotation at once; undrain brings it back.
        let (status, answer) = admin_post(admin, "drain", "b").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["weight"], 0);
        for _ in 0..6 {
            assert_eq!(who(&mut client).await, "a");
        }
        let (status, answer) = admin_post(admin, "undrain", "b").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["weight"], 1);
        let (status, answer) = admin_post(admin, "weight", "x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            answer["error"].as_str().unwrap().contains("weight"),
            "{answer}"
        );
        answered_by_all(&mut client, &["a", "b"]).await;

        // A request to `b` held in flight: drain `a` so that it goes to `b`, then undrain.
        b.hold(1);
        admin_post(admin, "drain", "a").await;
        let hits = b.hits();
        let held = tokio::spawn(async move {
            let mut other = connect(listen).await;
            send(&mut other, get("/")).await
        });
        wait_until(HANG, "the held request reaches b", || b.hits() > hits).await;
        admin_post(admin, "undrain", "a").await;

        // The file now lists `a` and `c`: SIGHUP applies it through the pool's live handle.
        dir.write("proxy.toml", file(&[&a, &c]));
        sighup();
        let pool = proxy.pool("web").unwrap().clone();
        wait_until(HANG, "the reload adds c and removes b", || {
            let stats = pool.stats();
            stats.endpoint("c").is_some() && stats.endpoint("b").is_none() && proxy.reloads() == 1
        })
        .await;
        assert_eq!(admin_ids(admin).await, ["a", "c"]);

        // The removed endpoint's request in flight finishes.
        b.release();
        let (status, body) = held.await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b"));

        // The same client connection goes on, now over `a` and `c` only.
        answered_by_all(&mut client, &["a", "c"]).await;

        // An invalid file is refused with the key at fault; the pool stays as it was.
        dir.write("proxy.toml", file(&[&a]).replace("round_robin", "fastest"));
        let err = proxy.reload().unwrap_err();
        assert!(matches!(err, ConfigError::Parse(..)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("strategy") && msg.contains("unknown strategy \"fastest\""),
            "{msg}"
        );
        let bad_route = format!("{}\n[[routes]]\npool = \"nope\"\n", file(&[&a]));
        dir.write("proxy.toml", &bad_route);
        let err = proxy.reload().unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes[0].pool: no pool named \"nope\" (pools: web)"
        );
        // The same through SIGHUP: logged, nothing changes.
        let reloads = proxy.reloads();
        sighup();
        wait_until(HANG, "the SIGHUP reload", || proxy.reloads() > reloads).await;
        answered_by_all(&mut client, &["a", "c"]).await;
        assert_eq!(admin_ids(admin).await, ["a", "c"]);

        // A change that needs a restart is reported, and the endpoints and the limit per
        // endpoint still apply.
        let web = proxy.pool("web").unwrap();
        assert_eq!(web.max_requests_per_endpoint(), 0);
        let moved = file(&[&a, &b])
            .replace("round_robin", "least_connections")
            .replace(
                "outlier = {",
                "limits = { max_requests_per_endpoint = 64 }\noutlier = {",
            );
        dir.write("proxy.toml", &moved);
        let report = proxy.reload().expect("valid file");
        assert_eq!((report.added, report.removed), (1, 1));
        assert_eq!(report.restart_needed.len(), 1, "{report:?}");
        assert!(report.restart_needed[0].contains("pools.web"), "{report:?}");
        assert_eq!(web.max_requests_per_endpoint(), 64);
        answered_by_all(&mut client, &["a", "b"]).await;
    })
    .await;
}

/// Sends SIGHUP to this process (whose handler `reload_on_sighup` installed).
fn sighup() {
    // SAFETY: kill(2) and getpid(2) take and return plain integers.
    let sent = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

#[tokio::test]
async fn bad_files_are_refused_naming_the_key() {
    let dir = TempDir::new();
    let a = start_server("a").await;
    let good = file(&[&a]);
    let cases = [
        (
            good.replace("\"tcp\"", "\"icmp\""),
            "unknown variant `icmp`",
        ),
        (good.replace("\"200ms\"", "\"soon\""), "interval"),
        (
            good.replace("consecutive_failures = 5", "consecutive_failures = 0"),
            "at least 1",
        ),
        (
            good.replace("kind = \"tcp\"", "kind = \"tcp\", path = \"/\""),
            "pools.web.check.path: only http checks take it",
        ),
        (
            good.replace(&format!("addr = \"{}\"", a.addr()), "weight = 2"),
            "pools.web.endpoints[0]: \"a\" has no socket address",
        ),
        (good.replace("[admin]", "[admn]"), "unknown field `admn`"),
        (
            good.replace("[[listeners]]\nlisten = \"127.0.0.1:0\"\n", ""),
            "missing field `listeners`",
        ),
        (
            format!("{good}\n[pools.api]\nendpoints = []\n"),
            "routes: with more than one pool",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.write("bad.toml", &text);
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        let started = ConfigProxy::start(&path).await;
        assert!(started.is_err());
    }
    let err = Config::load(&dir.0.join("missing.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read(..)), "{err}");
}

#[test]
fn the_example_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config_proxy.toml");
    let config = Config::load(&path).expect("the example's file is valid");
    assert_eq!(config.pools.len(), 2);
    assert_eq!(config.routes.len(), 2);
    assert_eq!(config.pools["web"].endpoints[1].weight(), 2);
}

#[tokio::test]
async fn a_tls_listener_terminates_tls_with_the_files_named() {
    within(HANG, async {
        use tokio_rustls::rustls::pki_types::ServerName;
        use tokio_rustls::rustls::{ClientConfig, RootCertStore};

        let a = start_server("a").await;
        let dir = TempDir::new();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        dir.write("site.pem", ck.cert.pem());
        dir.write("site.key", ck.signing_key.serialize_pem());
        let text = file(&[&a]).replace(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n",
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"site.pem\", key = \"site.key\" }\n",
        );
        let path = dir.write("proxy.toml", &text);
        let proxy = ConfigProxy::start(&path).await.expect("valid file");

        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(proxy.listen_addrs()[0]).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        assert_eq!(who(&mut sender).await, "a");
        // A reload reads the certificate files again; a valid file keeps serving.
        proxy.reload().expect("valid file");
        assert_eq!(who(&mut sender).await, "a");
    })
    .await;
}
