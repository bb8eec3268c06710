//! Stickiness on real HTTP/1.1 servers on 127.0.0.1: sealed affinity cookies (pinning,
//! re-balancing when the endpoint goes, tampered cookies ignored, no address leaked) and key
//! affinity through consistent hashing (a header, the client IP behind a trusted proxy).

mod common;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::failover::{FailoverLayer, RetryBudget};
use lbkit::forwarded::ClientAddr;
use lbkit::key::{HashKeyLayer, Key};
use lbkit::sticky::{CookieSecret, StickyLayer};
use lbkit::strategy::{Maglev, Ring, RoundRobin, Strategy};
use lbkit::{Balancer, BoxError, Endpoint, EndpointId};
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Servers and client

/// A server on 127.0.0.1 that answers with its name; stopped (with its connections) when
/// dropped.
struct Server {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(name: &str) -> Server {
        // A port reserved for the test process: a killed server leaves an address where
        // connecting is refused (no other test's listener can take it).
        let (listener, addr) = common::listen_reserved();
        let hits = Arc::new(AtomicU64::new(0));
        let (h, body) = (hits.clone(), Bytes::from(name.to_owned()));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, body) = (h.clone(), body.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Server {
            name: name.to_owned(),
            addr,
            hits,
            task,
        }
    }

    async fn start_n(n: usize) -> Vec<Server> {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(Server::start(&format!("s{i}")).await);
        }
        v
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.name.as_str()).with_addr(self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

type ReqBody = Full<Bytes>;

/// An endpoint's service: sends requests to the endpoint's address with a shared client.
#[derive(Clone)]
struct HttpEndpoint {
    client: Client<HttpConnector, ReqBody>,
    addr: SocketAddr,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

impl Service<Request<ReqBody>> for HttpEndpoint {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> BoxFut {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{}{path}", self.addr).parse().expect("uri");
        let fut = self.client.request(req);
        Box::pin(async move { fut.await.map_err(BoxError::from) })
    }
}

type HttpBalancer<St> = Balancer<HttpEndpoint, St, lbkit::balance::CompleteOnBody>;

/// An HTTP balancer over `endpoints`.
fn balancer<St: Strategy>(
    endpoints: impl IntoIterator<Item = Endpoint>,
    strategy: St,
) -> HttpBalancer<St> {
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    Balancer::new(endpoints, strategy, move |ep: &Endpoint| HttpEndpoint {
        client: client.clone(),
        addr: ep.socket_addr().expect("endpoint address"),
    })
}

/// What one request got back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    server: String,
    /// The value of the affinity cookie set by the response, if any.
    set_cookie: Option<String>,
    /// The whole `Set-Cookie` header.
    set_cookie_header: Option<String>,
}

/// Sends `GET /` with the `Cookie` header `cookie` (if any) and other `headers`.
async fn send<S, B>(
    svc: &S,
    cookie: Option<HeaderValue>,
    build: impl FnOnce(&mut Request<ReqBody>),
) -> Answer
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let mut req = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert(COOKIE, c);
    }
    build(&mut req);
    let res = svc.clone().oneshot(req).await.expect("request");
    let status = res.status();
    let header = res
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().expect("ascii Set-Cookie").to_owned());
    let set_cookie = header.as_ref().map(|h| {
        let pair = h.split(';').next().unwrap();
        pair.strip_prefix("lb=")
            .expect("cookie named lb")
            .to_owned()
    });
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        server: String::from_utf8(bytes.to_vec()).unwrap(),
        set_cookie,
        set_cookie_header: header,
    }
}

fn cookie(value: &str) -> Option<HeaderValue> {
    Some(format!("lb={value}").parse().unwrap())
}

async fn within<F: Future>(limit: Duration, test: F) -> F::Output {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

fn layer() -> StickyLayer {
    StickyLayer::cookie(
        "lb",
        CookieSecret::from_bytes(*b"a test key, 32 bytes, not secret"),
    )
}

// ---------------------------------------------------------------------------------------------
// Cookie affinity

/// The first response sets a cookie; 100 requests with it land on that endpoint (round robin
/// would spread them) and get no new cookie. Taken down, the endpoint's clients move once, with
/// a new cookie, and stay where they moved even after it comes back.
#[tokio::test]
async fn cookie_pins_requests_and_moves_when_the_endpoint_goes_down() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let bal = balancer(servers.iter().map(Server::endpoint), RoundRobin::new());
        let pool = bal.pool().clone();
        let sticky = layer();
        let svc = sticky.clone().layer(bal);

        let first = send(&svc, None, |_| {}).await;
        assert_eq!(first.status, StatusCode::OK);
        let header = first.set_cookie_header.as_deref().expect("a first cookie");
        assert!(
            header.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
            "{header}"
        );
        let value = first.set_cookie.clone().unwrap();
        assert_eq!(
            sticky.open(value.as_bytes()).unwrap(),
            first.server.as_str()
        );

        let pinned = first.server.clone();
        let before: Vec<u64> = servers.iter().map(Server::hits).collect();
        for _ in 0..100 {
            let a = send(&svc, cookie(&value), |_| {}).await;
            assert_eq!(a.server, pinned);
            assert!(
                a.set_cookie.is_none(),
                "cookie re-set while the endpoint is the same"
            );
        }
        for (s, b) in servers.iter().zip(&before) {
            let expected = if s.name == pinned { 100 } else { 0 };
            assert_eq!(s.hits() - b, expected, "{}", s.name);
        }

        // Its endpoint goes down: re-balanced, and the cookie replaced.
        assert!(pool.set_down(&EndpointId::new(pinned.as_str()), true));
        let moved = send(&svc, cookie(&value), |_| {}).await;
        assert_eq!(moved.status, StatusCode::OK);
        assert_ne!(moved.server, pinned);
        let new_value = moved.set_cookie.expect("cookie replaced");
        assert_ne!(new_value, value);
        assert_eq!(
            sticky.open(new_value.as_bytes()).unwrap(),
            moved.server.as_str()
        );
        for _ in 0..20 {
            let a = send(&svc, cookie(&new_value), |_| {}).await;
            assert_eq!(a.server, moved.server);
            assert!(a.set_cookie.is_none());
        }

        // The old endpoint is back: clients that moved stay; the old cookie works again.
        pool.set_down(&EndpointId::new(pinned.as_str()), false);
        for _ in 0..10 {
            assert_eq!(
                send(&svc, cookie(&new_value), |_| {}).await.server,
                moved.server
            );
            assert_eq!(send(&svc, cookie(&value), |_| {}).await.server, pinned);
        }

        // Removed from the pool altogether: re-balanced too.
        assert!(pool.remove(&EndpointId::new(pinned.as_str())));
        let a = send(&svc, cookie(&value), |_| {}).await;
        assert_ne!(a.server, pinned);
        assert_eq!(
            sticky.open(a.set_cookie.unwrap().as_bytes()).unwrap(),
            a.server.as_str()
        );
    })
    .await;
}

/// The pinned server is killed (nobody marks it down): with the failover layer in front, the
/// next request fails on it, is retried on another endpoint, and gets a cookie for that one.
#[tokio::test]
async fn killed_endpoint_fails_over_and_the_cookie_follows() {
    within(Duration::from_secs(30), async {
        let mut servers = Server::start_n(3).await;
        let bal = balancer(servers.iter().map(Server::endpoint), RoundRobin::new());
        let sticky = layer();
        let svc = FailoverLayer::new(RetryBudget::default()).layer(sticky.clone().layer(bal));

        let first = send(&svc, None, |_| {}).await;
        let value = first.set_cookie.expect("a first cookie");
        for _ in 0..100 {
            assert_eq!(
                send(&svc, cookie(&value), |_| {}).await.server,
                first.server
            );
        }
        let i = servers.iter().position(|s| s.name == first.server).unwrap();
        drop(servers.remove(i));

        let moved = send(&svc, cookie(&value), |_| {}).await;
        assert_eq!(moved.status, StatusCode::OK);
        assert_ne!(moved.server, first.server);
        let new_value = moved.set_cookie.expect("cookie replaced");
        assert_eq!(
            sticky.open(new_value.as_bytes()).unwrap(),
            moved.server.as_str()
        );
        let hits: u64 = servers.iter().map(Server::hits).sum();
        for _ in 0..20 {
            let a = send(&svc, cookie(&new_value), |_| {}).await;
            assert_eq!(a.server, moved.server);
            assert!(a.set_cookie.is_none());
        }
        let moved_to = servers.iter().find(|s| s.name == moved.server).unwrap();
        assert!(moved_to.hits() >= 21);
        assert_eq!(servers.iter().map(Server::hits).sum::<u64>(), hits + 20);
    })
    .await;
}

/// Tampered, garbled, truncated, foreign, non-UTF-8, empty and oversized cookies are ignored:
/// the request is balanced as if it had none, and gets a fresh, valid cookie. A cookie sealed
/// with another key cannot steer requests to the endpoint it names.
/// Rotating the key: a layer with a new key that accepts the old one keeps old cookies' clients
/// where they were and re-seals their cookies with the new key; without the old key they would
/// be re-balanced.
#[tokio::test]
async fn a_rotated_key_keeps_clients_in_place_and_reseals_their_cookies() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let bal = balancer(servers.iter().map(Server::endpoint), RoundRobin::new());
        let old_key = CookieSecret::from_bytes(*b"a test key, 32 bytes, not secret");
        let new_key = CookieSecret::from_bytes(*b"the next key, also 32 bytes long");
        let old = StickyLayer::cookie("lb", old_key.clone()).layer(bal.clone());
        let rotated = StickyLayer::cookie("lb", new_key.clone())
            .accept_previous_key(old_key)
            .layer(bal.clone());
        let new_only = StickyLayer::cookie("lb", new_key.clone());

        let first = send(&old, None, |_| {}).await;
        let old_cookie = first.set_cookie.expect("a cookie from the old key");
        for _ in 0..10 {
            let a = send(&rotated, cookie(&old_cookie), |_| {}).await;
            assert_eq!(a.server, first.server, "the client stays on its endpoint");
            let resealed = a.set_cookie.expect("the old cookie is replaced");
            assert_eq!(
                new_only.open(resealed.as_bytes()).map(|id| id.to_string()),
                Some(first.server.clone()),
                "the new cookie is sealed with the new key"
            );
            // With the re-sealed cookie, no cookie is set again.
            let b = send(&rotated, cookie(&resealed), |_| {}).await;
            assert_eq!(b.server, first.server);
            assert!(b.set_cookie.is_none());
        }
        // A layer that does not accept the old key ignores the old cookie.
        assert_eq!(new_only.open(old_cookie.as_bytes()), None);
    })
    .await;
}

#[tokio::test]
async fn tampered_cookies_are_ignored_and_replaced() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let svc = layer().layer(balancer(
            servers.iter().map(Server::endpoint),
            RoundRobin::new(),
        ));
        let sticky = layer();

        let value = send(&svc, None, |_| {}).await.set_cookie.unwrap();
        let mut flipped = value.clone().into_bytes();
        let mid = flipped.len() / 2;
        flipped[mid] = if flipped[mid] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let other_key = StickyLayer::cookie("lb", CookieSecret::generate());
        let foreign = other_key.seal(&EndpointId::new("s0")).unwrap();
        let random: String = (0..60)
            .map(|_| {
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                alphabet[rand::random_range(0..alphabet.len())] as char
            })
            .collect();

        let bad: Vec<(&str, HeaderValue)> = vec![
            ("flipped", cookie(&flipped).unwrap()),
            ("truncated", cookie(&value[..value.len() / 2]).unwrap()),
            ("random", cookie(&random).unwrap()),
            ("another key", cookie(&foreign).unwrap()),
            ("not base64", cookie("<<>>!!").unwrap()),
            ("empty", cookie("").unwrap()),
            ("oversized", cookie(&"A".repeat(5000)).unwrap()),
            (
                "non-utf-8",
                HeaderValue::from_bytes(b"lb=\xff\xfe\x80abc").unwrap(),
            ),
            (
                "garbled header",
                HeaderValue::from_bytes(b";;==;lb;=lb=\"").unwrap(),
            ),
        ];
        for (what, header) in bad {
            let a = send(&svc, Some(header), |_| {}).await;
            assert_eq!(a.status, StatusCode::OK, "{what}");
            let fresh = a
                .set_cookie
                .unwrap_or_else(|| panic!("{what}: no fresh cookie"));
            assert_eq!(
                sticky.open(fresh.as_bytes()).unwrap(),
                a.server.as_str(),
                "{what}: the fresh cookie names the endpoint that answered"
            );
        }

        // The foreign cookie names s0, but requests carrying it are balanced as usual.
        let mut servers_seen = HashSet::new();
        for _ in 0..6 {
            servers_seen.insert(send(&svc, cookie(&foreign), |_| {}).await.server);
        }
        assert_eq!(
            servers_seen.len(),
            3,
            "round robin over all, not pinned to s0"
        );

        // A valid cookie next to garbage still counts.
        let mixed = format!("x=1; lb={flipped}; lb={value}");
        let pinned = sticky.open(value.as_bytes()).unwrap();
        for _ in 0..5 {
            let a = send(&svc, Some(mixed.parse().unwrap()), |_| {}).await;
            assert_eq!(a.server, pinned.as_str());
            assert!(a.set_cookie.is_none());
        }
    })
    .await;
}

/// Endpoints whose ids are their addresses: no cookie value shows the address or the port.
#[tokio::test]
async fn cookie_never_reveals_the_address() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let endpoints: Vec<Endpoint> = servers.iter().map(|s| Endpoint::from(s.addr)).collect();
        let sticky = layer();
        let svc = sticky.clone().layer(balancer(endpoints, RoundRobin::new()));
        let mut seen = HashMap::new();
        for _ in 0..30 {
            let a = send(&svc, None, |_| {}).await;
            let value = a.set_cookie.unwrap();
            let id = sticky.open(value.as_bytes()).unwrap();
            let server = servers.iter().find(|s| s.name == a.server).unwrap();
            assert_eq!(id, EndpointId::from(server.addr));
            for s in &servers {
                assert!(!value.contains(&s.addr.to_string()));
                assert!(
                    !value.contains(&s.addr.port().to_string()),
                    "{value} shows a port"
                );
            }
            assert!(!value.contains("127.0.0.1"));
            assert!(value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            *seen.entry(a.server).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Key affinity without cookies

/// `HashKeyLayer` on a header with Maglev (and with the bounded-load ring): one user's
/// requests all land on one endpoint; different users spread.
#[tokio::test]
async fn header_key_with_consistent_hashing_pins_each_user() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let endpoints: Vec<_> = servers.iter().map(Server::endpoint).collect();
        let hashing = HashKeyLayer::header("x-user");
        let maglev = hashing.layer(balancer(endpoints.clone(), Maglev::new()));
        user_affinity(&maglev, "maglev").await;
        let ring = hashing.layer(balancer(endpoints, Ring::new()));
        user_affinity(&ring, "ring").await;
    })
    .await;
}

async fn user_affinity<S, B>(svc: &S, strategy: &str)
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let ask = |user: &str| {
        let user: HeaderValue = user.parse().unwrap();
        async move {
            send(svc, None, |r| {
                r.headers_mut().insert("x-user", user);
            })
            .await
            .server
        }
    };
    let alice = ask("alice").await;
    for _ in 0..100 {
        assert_eq!(ask("alice").await, alice, "{strategy}");
    }
    let mut used = HashSet::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let first = ask(&user).await;
        for _ in 0..3 {
            assert_eq!(ask(&user).await, first, "{strategy}: {user} moved");
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "{strategy}: 30 users all on {used:?}");
}

/// The client-IP key: from a trusted proxy, `X-Forwarded-For` decides (each client lands
/// where it would if it connected directly); from anyone else, it is ignored, so a client
/// cannot pick its endpoint by forging the header.
#[tokio::test]
async fn client_ip_key_honours_forwarded_for_only_from_trusted_proxies() {
    within(Duration::from_secs(30), async {
        let servers = Server::start_n(3).await;
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let key = Key::client_ip_trusting([proxy]);
        let svc = HashKeyLayer::new(key).layer(balancer(
            servers.iter().map(Server::endpoint),
            Maglev::new(),
        ));
        let from = |peer: &str, xff: Option<&str>| {
            let svc = svc.clone();
            let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
            let xff = xff.map(|x| x.parse::<HeaderValue>().unwrap());
            async move {
                send(&svc, None, move |r| {
                    r.extensions_mut().insert(ClientAddr(peer));
                    if let Some(x) = xff {
                        r.headers_mut().insert("x-forwarded-for", x);
                    }
                })
                .await
                .server
            }
        };

        // Through the trusted proxy, each client lands where its own address leads.
        let mut spread = HashSet::new();
        for n in 1..=20 {
            let client = format!("203.0.113.{n}");
            let direct = from(&client, None).await;
            let forwarded = from("127.0.0.1", Some(&format!("198.51.100.99, {client}"))).await;
            assert_eq!(direct, forwarded, "{client}");
            for _ in 0..3 {
                assert_eq!(from("127.0.0.1", Some(&client)).await, direct);
            }
            spread.insert(direct);
        }
        assert!(spread.len() >= 2, "20 clients all on {spread:?}");

        // From an untrusted peer, the header is ignored: the peer's address decides.
        let peer = "192.0.2.77";
        let own = from(peer, None).await;
        for n in 1..=20 {
            let forged = format!("203.0.113.{n}");
            assert_eq!(
                from(peer, Some(&forged)).await,
                own,
                "forged {forged} was honoured"
            );
        }
        // Malformed header from the trusted proxy: falls back to the proxy's own address.
        let proxy_own = from("127.0.0.1", None).await;
        assert_eq!(from("127.0.0.1", Some("not an address")).await, proxy_own);
    })
    .await;
}
