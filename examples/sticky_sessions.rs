//! A tiny shopping cart behind a sticky-session proxy, all in one process, every server
//! (proxy and backends) lbkit's own `Server`.
//!
//! Run it:
//!
//! ```text
//! cargo run --example sticky_sessions
//! RUST_LOG=lbkit=debug cargo run --example sticky_sessions   # also see picks and retries
//! ```
//!
//! Three backends keep shopping carts in memory, keyed by a `session` cookie: a cart lives on
//! the backend that saw it. A proxy in front balances round robin, with a `StickyLayer` so each
//! shopper keeps landing on the backend holding their cart, and a `FailoverLayer` so a request
//! to a backend that died is retried on another one.
//!
//! What to see:
//!
//! - alice and bob each add items; every answer shows their whole cart so far, always from the
//!   same backend: the proxy set its `lb` cookie on the first answer and the client sends it back;
//! - the `lb` cookie is opaque: it names the backend without showing its address;
//! - carol's client drops cookies: round robin spreads her requests and her cart keeps starting
//!   over, which is what stickiness prevents;
//! - alice's backend is stopped: her next request fails over to another backend and gets a new
//!   `lb` cookie, and her cart starts empty there (in-memory state dies with its server; keep
//!   what matters in a shared store).
//!
//! It exits by itself.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{COOKIE, SET_COOKIE};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lbkit::failover::{FailoverLayer, ReplayBody, RetryBudget};
use lbkit::proxy::{ErrorResponseLayer, Forward};
use lbkit::server::{RequestBody, Server};
use lbkit::sticky::{CookieSecret, StickyLayer};
use lbkit::strategy::RoundRobin;
use lbkit::{BalancerLayer, BoxError, Endpoint};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();

    // Three cart backends on ports the OS picks.
    let mut backends = Vec::new();
    for n in 1..=3 {
        backends.push(CartBackend::start(n).await?);
    }
    let endpoints: Vec<Endpoint> = backends.iter().map(|b| Endpoint::from(b.addr)).collect();

    // The proxy: errors become 502/503/504; failed idempotent requests go to another backend;
    // the `lb` cookie pins each client; round robin picks for clients without one.
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        // Body-less requests (GET) can be sent again; uploads would stream, never retried.
        .map_request(|req: Request<RequestBody>| req.map(ReplayBody::new))
        .layer(FailoverLayer::new(RetryBudget::default()))
        .layer(StickyLayer::cookie("lb", CookieSecret::generate()))
        .layer(BalancerLayer::new(endpoints, RoundRobin::new()))
        .service(Forward::<ReplayBody<RequestBody>>::new());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = listener.local_addr()?;
    tokio::spawn(Server::new(proxy).serve(listener));
    println!("proxy on http://{proxy_addr}, backends:");
    for b in &backends {
        println!("  backend-{} on {}", b.n, b.addr);
    }

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut alice = Shopper::new("alice", proxy_addr, client.clone(), true);
    let mut bob = Shopper::new("bob", proxy_addr, client.clone(), true);
    let mut carol = Shopper::new("carol", proxy_addr, client.clone(), false);

    println!("\n== alice and bob shop; the lb cookie keeps each on one backend");
    for (a, b) in [
        ("apple", "bread"),
        ("pear", "milk"),
        ("plum", "eggs"),
        ("fig", "tea"),
    ] {
        alice.add(a).await?;
        bob.add(b).await?;
    }
    let cookie = alice.lb.clone().unwrap_or_default();
    let leaks = backends.iter().any(|b| {
        cookie.contains(&b.addr.to_string()) || cookie.contains(&b.addr.port().to_string())
    });
    println!("alice's lb cookie: {cookie}");
    println!("  (sealed: shows no backend address: {})", !leaks);

    println!("\n== carol's client drops cookies: round robin, her cart keeps starting over");
    for item in ["cake", "jam", "honey"] {
        carol.add(item).await?;
    }

    println!("\n== alice's backend stops; she fails over and starts a new cart elsewhere");
    let home = alice.last_backend.clone();
    if let Some(i) = backends
        .iter()
        .position(|b| Some(format!("backend-{}", b.n)) == home)
    {
        let gone = backends.remove(i);
        println!("stopping backend-{}", gone.n);
        drop(gone);
    }
    alice.show().await?;
    alice.add("kiwi").await?;
    alice.show().await?;
    bob.show().await?;

    println!("\ndone");
    Ok(())
}

/// One demo backend: carts in memory, keyed by the `session` cookie. Stopped when dropped.
struct CartBackend {
    n: usize,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for CartBackend {
    fn drop(&mut self) {
        // The server's future owns the connections: aborting its task closes them all.
        self.task.abort();
    }
}

impl CartBackend {
    async fn start(n: usize) -> Result<CartBackend, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let carts: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let svc = tower::service_fn(move |req: Request<RequestBody>| {
            let answer = handle(n, &carts, &req);
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer)))) }
        });
        let task = tokio::spawn(Server::new(svc).serve(listener));
        Ok(CartBackend { n, addr, task })
    }
}

/// `POST /cart?add=ITEM` adds an item; any request answers with the whole cart.
fn handle(
    n: usize,
    carts: &Mutex<HashMap<String, Vec<String>>>,
    req: &Request<RequestBody>,
) -> String {
    let session = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("session="))
        .unwrap_or("anonymous")
        .to_owned();
    let mut carts = carts.lock().unwrap();
    let cart = carts.entry(session.clone()).or_default();
    if req.method() == Method::POST {
        if let Some(item) = req.uri().query().and_then(|q| q.strip_prefix("add=")) {
            cart.push(item.to_owned());
        }
    }
    format!("backend-{n}|{session}'s cart: [{}]", cart.join(", "))
}

/// A client with a session: sends the `session` cookie and, if it keeps cookies, the proxy's
/// `lb` cookie.
struct Shopper {
    name: &'static str,
    proxy: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
    keeps_cookies: bool,
    lb: Option<String>,
    last_backend: Option<String>,
}

impl Shopper {
    fn new(
        name: &'static str,
        proxy: SocketAddr,
        client: Client<HttpConnector, Empty<Bytes>>,
        keeps_cookies: bool,
    ) -> Self {
        Shopper {
            name,
            proxy,
            client,
            keeps_cookies,
            lb: None,
            last_backend: None,
        }
    }

    async fn add(&mut self, item: &str) -> Result<(), BoxError> {
        self.send(
            Method::POST,
            &format!("/cart?add={item}"),
            &format!("adds {item:<6}"),
        )
        .await
    }

    async fn show(&mut self) -> Result<(), BoxError> {
        self.send(Method::GET, "/cart", "looks      ").await
    }

    async fn send(&mut self, method: Method, path: &str, what: &str) -> Result<(), BoxError> {
        let mut cookie = format!("session={}", self.name);
        if let Some(lb) = &self.lb {
            cookie.push_str("; lb=");
            cookie.push_str(lb);
        }
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.proxy))
            .header(COOKIE, cookie)
            .body(Empty::new())?;
        let res = self.client.request(req).await?;
        let status = res.status();
        let new_lb = res
            .headers()
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.strip_prefix("lb="))
            .map(str::to_owned);
        let text = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
        let (backend, cart) = text.split_once('|').unwrap_or(("?", text.trim()));
        let note = match &new_lb {
            Some(_) if self.keeps_cookies => "  <- new lb cookie",
            _ => "",
        };
        println!(
            "{:<6} {what} -> {status} from {backend}: {cart}{note}",
            self.name
        );
        if self.keeps_cookies && new_lb.is_some() {
            self.lb = new_lb;
        }
        self.last_backend = Some(backend.to_owned());
        Ok(())
    }
}
