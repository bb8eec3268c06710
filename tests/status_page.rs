//! The status page (`lbkit::status::StatusPage`, feature `status-page`) as operators meet it:
//! the README's proxy (`examples/reverse_proxy.rs`, its own `proxy` and `status_page`
//! functions) serves it on a separate local port; the HTML and the JSON, fetched over real
//! sockets, say what `Pool::stats` says; the admin forms drain, undrain and re-weight the
//! pool, and bad or cross-site posts change nothing.
//!
//! No assertion depends on how fast the machine is: time limits only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestServer;
use lbkit::balance::Target;
use lbkit::endpoint::Health;
use lbkit::server::Server;
use lbkit::stats::EndpointStats;
use lbkit::status::StatusPage;
use lbkit::strategy::AnyStrategy;
use lbkit::{Balancer, Endpoint, Pool};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HANG: Duration = Duration::from_secs(30);

/// One HTTP/1.1 exchange on a new connection: status, head (lower-cased) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

async fn exchange(addr: SocketAddr, request: String) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut raw))
        .await
        .expect("no answer")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head[9..12].parse().expect("a status code");
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// `GET path` from `addr`, with `Host: 127.0.0.1:PORT`.
async fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"),
    )
    .await
}

/// `POST path` with a form body and extra header lines.
async fn post(addr: SocketAddr, path: &str, form: &str, extra: &str) -> Answer {
    exchange(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
             content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n{extra}\r\n{form}",
            form.len()
        ),
    )
    .await
}

/// `POST path` with a form and extra header lines, which must be answered `status`: the
/// answer's body.
async fn post_expect(addr: SocketAddr, path: &str, form: &str, extra: &str, status: u16) -> String {
    let res = post(addr, path, form, extra).await;
    assert_eq!(res.status, status, "{path} {form} {extra}: {}", res.body);
    res.body
}

struct Proxy {
    addr: SocketAddr,
    status: SocketAddr,
    pool: Pool<Target, AnyStrategy>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The example's proxy over `endpoints` (health checks every 100 ms) and its status page on a
/// second listener, as `--status` serves it.
async fn start_proxy(endpoints: Vec<Endpoint>) -> Proxy {
    let args = reverse_proxy::Args {
        check_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    let status_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let status = status_listener.local_addr().expect("addr");
    let page = tokio::spawn(reverse_proxy::status_page(&pool, status_listener));
    Proxy {
        addr,
        status,
        pool,
        _tasks: vec![tokio::spawn(serving), page],
    }
}

/// Sends `n` requests through the proxy, one after another; returns how many got a 200.
async fn send(addr: SocketAddr, n: usize) -> usize {
    let mut ok = 0;
    for i in 0..n {
        if get(addr, &format!("/r{i}")).await.status == 200 {
            ok += 1;
        }
    }
    ok
}

/// The cells of the table row of endpoint `id`, tags stripped.
fn row_cells(html: &str, id: &str) -> Vec<String> {
    let start = html
        .find(&format!("<td class=\"id\">{id}"))
        .unwrap_or_else(|| panic!("no row for {id} in {html}"));
    let row_start = html[..start].rfind("<tr").expect("a row start");
    let row = &html[row_start..start + html[start..].find("</tr>").expect("a row end")];
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = &cell[cell.find('>').expect("a tag end") + 1..];
            let inner = inner.split("</td>").next().unwrap_or("");
            // Strip tags: what a reader sees.
            let mut text = String::new();
            let mut in_tag = false;
            for c in inner.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            text.trim().to_owned()
        })
        .collect()
}

/// What the page calls an endpoint's state.
fn state(e: &EndpointStats) -> &'static str {
    match e.health {
        Health::Down => "down",
        Health::Ejected => "ejected",
        _ if e.weight == 0 => "drain",
        _ if e.warming_up => "warming",
        _ => "up",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_status_page_shows_pool_stats_as_html_and_json() {
    let servers = common::start_servers(3).await;
    let mut endpoints = common::endpoints(&servers);
    endpoints[0] = endpoints[0].clone().with_weight(2);
    endpoints.push(Endpoint::new("dead").with_addr(common::dead_addr().await));
    let proxy = start_proxy(endpoints).await;

    // Every endpoint checked at least once, the dead one marked down.
    common::wait_until(HANG, "a health check of every endpoint", || {
        let stats = proxy.pool.stats();
        stats.endpoints.iter().all(|e| e.last_check.is_some())
            && stats.endpoint("dead").map(|e| e.health) == Some(Health::Down)
    })
    .await;
    assert_eq!(send(proxy.addr, 40).await, 40);
    common::wait_until(HANG, "no request in flight", || proxy.pool.in_flight() == 0).await;

    let json = get(proxy.status, "/status.json").await;
    assert_eq!(json.status, 200);
    assert!(
        json.head.contains("content-type: application/json"),
        "{}",
        json.head
    );
    let html = get(proxy.status, "/status").await;
    // Counters and latency histograms only move with traffic, and there is none now.
    let stats = proxy.pool.stats();
    assert_eq!(stats.requests(), 40);

    let doc: Value = serde_json::from_str(&json.body).expect("valid JSON");
    let pools = doc["pools"].as_array().expect("a list of pools");
    assert_eq!(pools.len(), 1);
    let pool = &pools[0];
    assert_eq!(pool["name"], "backends");
    assert_eq!(pool["strategy"], stats.strategy);
    assert_eq!(pool["requests"], 40);
    assert_eq!(pool["errors"], stats.errors());
    assert_eq!(pool["eligible"], 3);
    let listed = pool["endpoints"].as_array().expect("endpoints");
    assert_eq!(listed.len(), stats.endpoints.len());
    for (j, e) in listed.iter().zip(&stats.endpoints) {
        assert_eq!(j["id"], e.id.as_str());
        assert_eq!(j["addr"], e.addr.expect("an address").to_string());
        assert_eq!(j["state"], state(e));
        assert_eq!(j["eligible"], e.eligible);
        assert_eq!(j["weight"], e.weight);
        assert_eq!(j["requests"], e.requests);
        assert_eq!(j["errors"], e.errors);
        assert_eq!(j["in_flight"], 0);
        assert_eq!(j["latency_ms"]["count"], e.latency.count);
        let p50 = j["latency_ms"]["p50"].as_f64().expect("a p50");
        assert!(
            (p50 - ms(e.latency.p50)).abs() < 1e-6,
            "{p50} vs {:?}",
            e.latency.p50
        );
        let p99 = j["latency_ms"]["p99"].as_f64().expect("a p99");
        assert!(
            (p99 - ms(e.latency.p99)).abs() < 1e-6,
            "{p99} vs {:?}",
            e.latency.p99
        );
        // Checks go on meanwhile; a live backend's check passes unless the machine is so
        // loaded that it times out, so only the dead one's outcome is certain.
        let check = &j["last_check"];
        assert_eq!(
            check["ok"].as_bool(),
            Some(check["error"].is_null()),
            "{check}"
        );
        if e.id.as_str() == "dead" {
            assert_eq!(check["ok"], false, "{check}");
        }
    }
    let by_id = |id: &str| listed.iter().find(|e| e["id"] == id).expect("listed");
    let dead = by_id("dead");
    assert_eq!(dead["health"], "down");
    assert_eq!(dead["requests"], 0);
    assert!(
        dead["last_check"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{dead}"
    );
    let s0 = by_id("s0");
    assert_eq!(s0["weight"], 2);
    assert!(s0["requests"].as_u64() > by_id("s1")["requests"].as_u64());

    // The HTML: a self-contained page with one row per endpoint, the same numbers.
    assert_eq!(html.status, 200);
    assert!(
        html.head.contains("content-type: text/html"),
        "{}",
        html.head
    );
    let page = &html.body;
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
    assert!(!page.contains("<script"), "no script");
    assert!(!page.contains("src="), "no external asset");
    assert!(!page.contains("<link"), "no stylesheet fetched");
    assert!(page.contains("<h2>pool backends</h2>"));
    for e in &stats.endpoints {
        let cells = row_cells(page, e.id.as_str());
        assert_eq!(cells[1], state(e), "{cells:?}");
        assert_eq!(cells[3], e.weight.to_string(), "{cells:?}");
        assert_eq!(cells[4], "0", "in flight: {cells:?}");
        assert_eq!(cells[5], e.requests.to_string(), "{cells:?}");
        assert!(cells[6].starts_with(&e.errors.to_string()), "{cells:?}");
        let check = &cells[11];
        assert!(
            check.starts_with("OK in") || check.starts_with("FAIL"),
            "{cells:?}"
        );
        if e.id.as_str() == "dead" {
            assert!(check.starts_with("FAIL connection failed"), "{cells:?}");
        }
        // The admin forms, since the proxy turns them on.
        assert!(cells[12].contains("drain"), "{cells:?}");
    }
    assert!(page.contains("<tr class=\"down\"><td class=\"id\">dead"));
    assert!(page.contains("<tr class=\"up\"><td class=\"id\">s0"));

    // HEAD has the head and no body; `/` leads to the page.
    let head = exchange(
        proxy.status,
        format!(
            "HEAD /status HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            proxy.status
        ),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let root = get(proxy.status, "/").await;
    assert_eq!(root.status, 303);
    assert!(root.head.contains("location: /status"));
    assert_eq!(get(proxy.status, "/nope").await.status, 404);
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_forms_drain_undrain_and_reweight_and_refuse_bad_input() {
    let servers: Vec<TestServer> = common::start_servers(3).await;
    let mut endpoints = common::endpoints(&servers);
    endpoints[0] = endpoints[0].clone().with_weight(2);
    let proxy = start_proxy(endpoints).await;
    let (page, pool) = (proxy.status, &proxy.pool);
    let weight = |id: &str| pool.stats().endpoint(id).map(|e| e.weight);
    let eligible = |id: &str| pool.stats().endpoint(id).is_some_and(|e| e.eligible);
    common::wait_until(HANG, "every endpoint eligible", || {
        pool.stats().eligible() == 3
    })
    .await;

    // Drain: weight 0, out of rotation; requests go elsewhere.
    let res = post(page, "/status/drain", "pool=backends&endpoint=s0", "").await;
    assert_eq!(res.status, 303, "{}", res.body);
    assert!(res.head.contains("location: /status"));
    assert_eq!(weight("s0"), Some(0));
    assert!(!eligible("s0"));
    // (Its server still sees the health checks: count what the proxy sent it.)
    let requests = |id: &str| pool.stats().endpoint(id).map_or(0, |e| e.requests);
    let before = requests("s0");
    assert_eq!(send(proxy.addr, 20).await, 20);
    assert_eq!(requests("s0"), before, "a drained endpoint gets no request");
    let doc: Value = serde_json::from_str(&get(page, "/status.json").await.body).unwrap();
    let j = &doc["pools"][0]["endpoints"][0]; // in id order: s0 first
    assert_eq!(
        (
            j["id"].as_str(),
            j["state"].as_str(),
            j["drained"].as_bool()
        ),
        (Some("s0"), Some("drain"), Some(true))
    );
    let html = get(page, "/status").await.body;
    assert_eq!(row_cells(&html, "s0")[1], "drain");
    assert!(
        html.contains("action=\"/status/undrain\""),
        "an undrain button"
    );

    // Undrain: the weight it had comes back.
    let form = |id: &str| format!("pool=backends&endpoint={id}");
    post_expect(page, "/status/undrain", &form("s0"), "", 303).await;
    assert_eq!(weight("s0"), Some(2));
    assert!(eligible("s0"));

    // Re-weight, with the id percent-encoded as a browser sends it.
    let reweight = |w: u32| format!("pool=backends&endpoint=%73%31&weight={w}");
    post_expect(page, "/status/weight", &reweight(7), "", 303).await;
    assert_eq!(weight("s1"), Some(7));
    // Weight 0 then undrain: back to 7.
    post_expect(page, "/status/weight", &reweight(0), "", 303).await;
    assert_eq!(weight("s1"), Some(0));
    post_expect(page, "/status/undrain", &form("s1"), "", 303).await;
    assert_eq!(weight("s1"), Some(7));

    // Bad input: a 400 (or 403/405/415) naming the problem, and nothing changes.
    let bad = [
        (
            "/status/weight",
            "pool=backends&endpoint=s2&weight=abc",
            "not a whole number",
        ),
        (
            "/status/weight",
            "pool=backends&endpoint=s2&weight=-3",
            "not a whole number",
        ),
        (
            "/status/weight",
            "pool=backends&endpoint=s2&weight=10001",
            "too large",
        ),
        (
            "/status/weight",
            "pool=backends&endpoint=s2",
            "missing field \"weight\"",
        ),
        (
            "/status/drain",
            "pool=backends&endpoint=nope",
            "no endpoint \"nope\"",
        ),
        (
            "/status/drain",
            "pool=nope&endpoint=s2",
            "no pool named \"nope\"",
        ),
        ("/status/drain", "endpoint=s2", "missing field \"pool\""),
        (
            "/status/drain",
            "pool=backends&pool=backends&endpoint=s2",
            "given twice",
        ),
    ];
    for (path, form, why) in bad {
        let res = post(page, path, form, "").await;
        assert_eq!(res.status, 400, "{path} {form}: {}", res.body);
        assert!(res.body.contains(why), "{path} {form}: {}", res.body);
    }
    // A JSON object missing its fields: a 400 answered as JSON.
    let res = exchange(
        page,
        format!(
            "POST /status/drain HTTP/1.1\r\nhost: {page}\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
        ),
    )
    .await;
    assert_eq!(res.status, 400, "{}", res.body);
    let answer: serde_json::Value = serde_json::from_str(&res.body).expect("a JSON error");
    assert_eq!(answer["error"], "drain: missing field \"pool\"");
    let res = exchange(
        page,
        format!(
            "POST /status/drain HTTP/1.1\r\nhost: {page}\r\nconnection: close\r\n\
             content-type: text/plain\r\ncontent-length: 2\r\n\r\nhi"
        ),
    )
    .await;
    assert_eq!(res.status, 415, "{}", res.body);
    let res = get(page, "/status/drain?pool=backends&endpoint=s2").await;
    assert_eq!(res.status, 405, "only POST changes state");
    assert!(res.head.contains("allow: post"));
    let res = exchange(
        page,
        "POST /status HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            .to_owned(),
    )
    .await;
    assert_eq!(res.status, 405);
    // Another site's page posting through the operator's browser, and DNS rebinding.
    let drain = "/status/drain";
    let evil = "origin: http://evil.example\r\n";
    let body = post_expect(page, drain, &form("s2"), evil, 403).await;
    assert!(body.contains("cross-origin"), "{body}");
    let cross_site = "sec-fetch-site: cross-site\r\n";
    post_expect(page, drain, &form("s2"), cross_site, 403).await;
    let same_origin = format!("origin: http://{page}\r\n");
    post_expect(page, drain, &form("s2"), &same_origin, 303).await;
    post_expect(page, "/status/undrain", &form("s2"), "", 303).await;
    let rebound = exchange(
        page,
        "GET /status.json HTTP/1.1\r\nhost: evil.example:9000\r\nconnection: close\r\n\r\n"
            .to_owned(),
    )
    .await;
    assert_eq!(rebound.status, 403);
    assert!(rebound.body.contains("not allowed"));
    assert_eq!(weight("s2"), Some(1));
    assert_eq!(weight("s0"), Some(2));
    assert_eq!(weight("s1"), Some(7));
    drop(servers);
}

#[tokio::test]
async fn pools_of_any_type_share_a_read_only_page_with_every_text_escaped() {
    let hostile = "<script>alert(1)</script>";
    let quoted = "a\"b'c&d";
    let balancer = Balancer::new(
        [Endpoint::new(hostile), Endpoint::new(quoted)],
        lbkit::strategy::RoundRobin::new(),
        |_| {
            tower::service_fn(|_req: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            })
        },
    );
    let other = Pool::new(lbkit::strategy::PowerOfTwoChoices::new(), |_| ());
    other.insert(Endpoint::new("plain"));
    let status = StatusPage::new()
        .title("<b>lb</b>")
        .path("admin/lb/")
        .refresh(None)
        .pool("<i>api</i>", balancer.pool())
        .pool("other", &other);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(Server::new(status).serve(listener));

    let html = get(addr, "/admin/lb").await;
    assert_eq!(html.status, 200);
    let page = &html.body;
    for raw in [hostile, quoted, "<b>lb</b>", "<i>api</i>"] {
        assert!(!page.contains(raw), "{raw} unescaped in {page}");
    }
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains("a&quot;b&#39;c&amp;d"));
    assert!(page.contains("<title>&lt;b&gt;lb&lt;/b&gt;</title>"));
    assert!(page.contains("<h2>pool &lt;i&gt;api&lt;/i&gt;</h2>"));
    assert!(page.contains("<h2>pool other</h2>"));
    assert!(
        !page.contains("http-equiv"),
        "no reload when refresh is off"
    );
    assert!(!page.contains("<form"), "read-only by default");
    assert!(page.contains("href=\"/admin/lb.json\""));

    let doc: Value = serde_json::from_str(&get(addr, "/admin/lb.json").await.body).unwrap();
    assert_eq!(doc["pools"][0]["name"], "<i>api</i>");
    assert_eq!(doc["pools"][0]["strategy"], "round_robin");
    let ids: Vec<&str> = doc["pools"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [hostile, quoted]);
    assert_eq!(doc["pools"][1]["endpoints"][0]["id"], "plain");
    assert_eq!(doc["pools"][1]["strategy"], "p2c");

    let res = post(addr, "/admin/lb/drain", "pool=other&endpoint=plain", "").await;
    assert_eq!(res.status, 403);
    assert!(res.body.contains("admin actions are off"));
    assert_eq!(other.stats().endpoint("plain").map(|e| e.weight), Some(1));
    task.abort();
}
