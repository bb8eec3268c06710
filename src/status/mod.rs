//! A live status page for operators (feature `status-page`): every endpoint of one or more
//! pools as a row of an HTML table, the same as JSON, and drain / undrain / weight changes by
//! plain HTML forms, as HAProxy's stats page (`stats admin`) and nginx Plus's dashboard give.
//!
//! [`StatusPage`] is a tower `Service` over `http::Request<B>` for
//! any request body; serve it with [`Server`](crate::server::Server) (feature `http-proxy`),
//! axum (`Router::route_service`) or hyper. It answers, under its path (default `/status`):
//!
//! | request | answer |
//! |---|---|
//! | `GET /status` | an HTML page: one table per pool (endpoint, state, time in it, weight, in flight, requests, errors, p50/p90/p99 and peak-EWMA latency, last health check), rows coloured by state, reloaded every 5 s by a `<meta http-equiv="refresh">`; no script, no external asset |
//! | `GET /status.json` | the same numbers as JSON (below) |
//! | `POST /status/drain` | `pool=NAME&endpoint=ID`: the endpoint's weight goes to 0 (no new requests; those in flight finish); the weight it had is remembered |
//! | `POST /status/undrain` | `pool=NAME&endpoint=ID`: the remembered weight comes back (1 if none was remembered) |
//! | `POST /status/weight` | `pool=NAME&endpoint=ID&weight=N`: sets the weight (0 to [`Endpoint::MAX_WEIGHT`](crate::Endpoint::MAX_WEIGHT)) |
//! | `GET /` | a redirect to the page |
//!
//! Admin actions are off unless [`StatusPage::admin`] turns them on; then the page shows their
//! forms. A change posted as a form answers `303 See Other` back to the page (so a reload
//! does not post again); bad input (an unknown pool or endpoint, a weight that is not a
//! number or is too large, a missing field) gets a `400` with a one-line reason, and changes
//! nothing. Only `POST` changes state; other methods on an action get `405`.
//!
//! Tools post the same fields as a JSON object instead (`content-type: application/json`,
//! `{"pool": "backends", "endpoint": "127.0.0.1:3001", "weight": 3}`, the weight a number or
//! a string) and get JSON back: `200` with `{"pool", "endpoint", "action", "weight"}` (the
//! weight now in force), or the status with `{"error": "..."}`. Any other content type gets
//! `415`.
//!
//! Drain is weight 0, as HAProxy's `set server ... state drain` and nginx's `drain`
//! parameter: the endpoint stays in the pool and keeps its statistics and health checks, but
//! gets no new requests (sticky clients move too). A discovery source that re-inserts the
//! endpoint with its own weight (DNS, a static list fed again) undoes a drain or a weight
//! change, as a configuration reload undoes HAProxy's runtime API.
//!
//! **Expose it on a local admin port only**, never on the public listener: it lists every
//! backend and, with `admin`, lets whoever reaches it take them out of rotation. Bind its own
//! listener to `127.0.0.1` (or a management network), as the README's proxy does with
//! `--status 127.0.0.1:9000`. On top of that it defends a local port against a browser used as
//! a proxy: a `POST` from another origin (an `Origin` that is not this page's host, or
//! `Sec-Fetch-Site: cross-site`/`same-site`) gets `403` (cross-site request forgery), and so
//! does any request whose `Host` is not an IP address, `localhost`, or a name allowed with
//! [`StatusPage::allow_host`] (DNS rebinding).
//!
//! The JSON, for tools (durations in milliseconds, `null` when unknown):
//!
//! ```text
//! {"pools": [{"name": "backends", "strategy": "round_robin", "version": 7, "panic": false,
//!    "tier": 0, "in_flight": 0, "requests": 12, "errors": 0, "eligible": 3,
//!    "endpoints": [{"id": "127.0.0.1:3001", "addr": "127.0.0.1:3001", "state": "up",
//!       "health": "healthy", "eligible": true, "drained": false, "warming_up": false,
//!       "weight": 2, "effective_weight": 2.0, "tier": 0, "in_flight": 0, "requests": 6,
//!       "errors": 0, "cancelled": 0, "consecutive_failures": 0, "state_for_ms": 5012.4,
//!       "latency_ms": {"count": 6, "mean": 1.2, "p50": 1.1, "p90": 1.9, "p99": 1.9,
//!                      "p999": 1.9},
//!       "latency_ewma_ms": 1.3,
//!       "last_check": {"ok": true, "error": null, "took_ms": 0.8, "ago_ms": 412.0}}]}]}
//! ```
//!
//! `state` is what the page shows: `up`, `down` (active checks), `ejected` (outlier
//! detection), `drain` (healthy, weight 0) or `warming` (slow start).
//!
//! ```no_run
//! # #[cfg(feature = "http-proxy")]
//! # async fn run() -> std::io::Result<()> {
//! use std::time::Duration;
//! use lbkit::status::StatusPage;
//! use lbkit::{strategy::PowerOfTwoChoices, BalancerLayer};
//!
//! let balancer = BalancerLayer::new(["127.0.0.1:3001", "127.0.0.1:3002"], PowerOfTwoChoices::new());
//! let status = StatusPage::new()
//!     .pool("backends", balancer.pool())
//!     .admin(true)
//!     .refresh(Some(Duration::from_secs(2)));
//! // A separate, local port: not the proxy's public listener.
//! let admin = tokio::net::TcpListener::bind("127.0.0.1:9000").await?;
//! tokio::spawn(lbkit::server::Server::new(status).serve(admin));
//! # Ok(()) }
//! ```

mod admin;
mod html;
mod json;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower_service::Service;

use crate::endpoint::{EndpointId, Health};
use crate::error::BoxError;
use crate::pool::Pool;
use crate::stats::{EndpointStats, PoolStats};
use crate::strategy::Strategy;

/// What the status page needs of a pool: its statistics and a way to re-weight an endpoint.
/// Implemented for every [`Pool`], so that pools of different service and strategy types sit
/// on one page.
trait Source: Send + Sync {
    fn stats(&self) -> PoolStats;
    fn set_weight(&self, id: &EndpointId, weight: u32) -> bool;
}

impl<S, St> Source for Pool<S, St>
where
    S: Clone + Send + Sync + 'static,
    St: Strategy,
    Pool<S, St>: Send + Sync,
{
    fn stats(&self) -> PoolStats {
        Pool::stats(self)
    }

    fn set_weight(&self, id: &EndpointId, weight: u32) -> bool {
        Pool::set_weight(self, id, weight)
    }
}

#[derive(Clone)]
struct Named {
    name: String,
    source: Arc<dyn Source>,
}

#[derive(Clone)]
struct Inner {
    pools: Vec<Named>,
    path: String,
    title: String,
    refresh: Option<Duration>,
    admin: bool,
    allowed_hosts: Vec<String>,
    /// The weight each drained endpoint had, by pool index and id, for undrain.
    drained: Arc<Mutex<HashMap<(usize, EndpointId), u32>>>,
}

/// A tower service that serves pools' statistics as an HTML page and as JSON, with optional
/// drain / undrain / weight forms. See the [module docs](self).
///
/// Cheap to clone (a reference count); clones share the pools and the remembered weights of
/// drained endpoints. Add pools before serving it: the builder methods are for setting up.
#[derive(Clone)]
pub struct StatusPage {
    inner: Arc<Inner>,
}

impl fmt::Debug for StatusPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inner.pools.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("StatusPage")
            .field("pools", &names)
            .field("path", &self.inner.path)
            .field("admin", &self.inner.admin)
            .finish_non_exhaustive()
    }
}

impl Default for StatusPage {
    fn default() -> Self {
        StatusPage::new()
    }
}

impl StatusPage {
    /// A page with no pool yet, at `/status` (and `/status.json`), titled "lbkit status",
    /// reloading every 5 s, read-only (see [`admin`](StatusPage::admin)).
    pub fn new() -> Self {
        StatusPage {
            inner: Arc::new(Inner {
                pools: Vec::new(),
                path: "/status".to_owned(),
                title: "lbkit status".to_owned(),
                refresh: Some(Duration::from_secs(5)),
                admin: false,
                allowed_hosts: Vec::new(),
                drained: Arc::new(Mutex::new(HashMap::new())),
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        // Set-up happens before the page is cloned into a server; a clone made earlier keeps
        // the settings it had.
        Arc::make_mut(&mut self.inner)
    }

    /// Adds a pool, shown as a table titled `name` (and addressed as `pool=name` by the admin
    /// forms). Pools appear in the order added; any [`Pool`] fits, whatever its service and
    /// strategy types. The page holds a handle: the pool lives as long as the page.
    pub fn pool<S, St>(mut self, name: impl Into<String>, pool: &Pool<S, St>) -> Self
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
        Pool<S, St>: Send + Sync,
    {
        let named = Named {
            name: name.into(),
            source: Arc::new(pool.clone()),
        };
        self.inner_mut().pools.push(named);
        self
    }

    /// Sets the page's path (default `/status`); the JSON is at the same path with `.json`
    /// appended, the admin actions below it (`/status/drain`, ...). A path without a leading
    /// `/` gets one; a trailing `/` is dropped; `/` alone keeps the path as it was (`/`
    /// always redirects to the page).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        let trimmed = path.trim_matches('/');
        if !trimmed.is_empty() {
            self.inner_mut().path = format!("/{trimmed}");
        }
        self
    }

    /// Sets the page's title (default "lbkit status"): name the proxy or the host here.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.inner_mut().title = title.into();
        self
    }

    /// Sets how often the page reloads itself (default every 5 s, as a glance at a dashboard
    /// expects; `None`: never). Whole seconds, at least one.
    pub fn refresh(mut self, every: Option<Duration>) -> Self {
        self.inner_mut().refresh = every.map(|d| d.max(Duration::from_secs(1)));
        self
    }

    /// Turns the admin actions (drain, undrain, weight) on or off (default off: a status page
    /// is read-only unless asked, as HAProxy's `stats admin` must be). Turn it on only where
    /// the port is reachable by operators alone (see the [module docs](self)).
    pub fn admin(mut self, on: bool) -> Self {
        self.inner_mut().admin = on;
        self
    }

    /// Also accepts requests whose `Host` is `name` (with any port), such as the machine's
    /// name on a management network. By default only IP addresses and `localhost` are
    /// accepted, which keeps a malicious web page from reading or posting to the page
    /// through DNS rebinding.
    pub fn allow_host(mut self, name: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        self.inner_mut().allowed_hosts.push(name);
        self
    }
}

/// A response with a body of `text` and a content type.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

/// A plain-text error or note.
fn text(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut msg = msg.into();
    msg.push('\n');
    respond(status, "text/plain; charset=utf-8", msg)
}

/// `303 See Other` to `location`, with a short note.
fn see_other(location: &str, note: String) -> Response<Full<Bytes>> {
    let mut res = text(StatusCode::SEE_OTHER, note);
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut res = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed: use {allow}"),
    );
    res.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

/// What the page calls an endpoint's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    Warming,
    Drain,
    Down,
    Ejected,
}

impl State {
    fn of(e: &EndpointStats) -> State {
        match e.health {
            Health::Down => State::Down,
            Health::Ejected => State::Ejected,
            _ if e.weight == 0 => State::Drain,
            _ if e.warming_up => State::Warming,
            _ => State::Up,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Warming => "warming",
            State::Drain => "drain",
            State::Down => "down",
            State::Ejected => "ejected",
        }
    }
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Down => "down",
        Health::Ejected => "ejected",
    }
}

/// Milliseconds, as a float.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether `host` (a `Host` header's value) is an IP address or `localhost`, with or
/// without a port, or one of `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok()
                    && (port.is_empty() || port.strip_prefix(':').is_some_and(is_port));
            }
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    let name = name.to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

impl StatusPage {
    /// Every pool's statistics, in order, with its name.
    fn snapshot(&self) -> Vec<(&str, PoolStats)> {
        self.inner
            .pools
            .iter()
            .map(|p| (p.name.as_str(), p.source.stats()))
            .collect()
    }

    /// Whether the request comes from a host name this page answers to; `Err` is the reason.
    fn check_host<B>(&self, req: &Request<B>) -> Result<(), String> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        match host {
            // HTTP/1.0 without Host: nothing to rebind.
            None => Ok(()),
            Some(h) if host_allowed(h, &self.inner.allowed_hosts) => Ok(()),
            Some(h) => Err(format!(
                "host {h:?} not allowed: use an IP address or localhost (or StatusPage::allow_host)"
            )),
        }
    }

    fn route<B>(&self, req: Request<B>) -> Routed<B> {
        if let Err(why) = self.check_host(&req) {
            return Routed::Done(text(StatusCode::FORBIDDEN, why));
        }
        let path = req.uri().path();
        let page = self.inner.path.as_str();
        let read = matches!(*req.method(), Method::GET | Method::HEAD);
        if path == page {
            if !read {
                return Routed::Done(method_not_allowed("GET, HEAD"));
            }
            let html = html::render(self, &self.snapshot());
            return Routed::Done(respond(StatusCode::OK, "text/html; charset=utf-8", html));
        }
        if path.strip_suffix(".json") == Some(page) {
            if !read {
                return Routed::Done(method_not_allowed("GET, HEAD"));
            }
            let body = json::render(&self.snapshot());
            return Routed::Done(respond(StatusCode::OK, "application/json", body));
        }
        if path == "/" {
            return Routed::Done(see_other(page, format!("see {page}")));
        }
        let action = path
            .strip_prefix(page)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(admin::Action::from_path);
        match action {
            Some(_) if !self.inner.admin => Routed::Done(text(
                StatusCode::FORBIDDEN,
                "admin actions are off on this status page (StatusPage::admin)",
            )),
            Some(_) if req.method() != Method::POST => Routed::Done(method_not_allowed("POST")),
            Some(action) => match admin::check_origin(&req) {
                Ok(()) => Routed::Admin(action, req),
                Err(why) => Routed::Done(text(StatusCode::FORBIDDEN, why)),
            },
            None => Routed::Done(text(
                StatusCode::NOT_FOUND,
                format!("not found: see {page}"),
            )),
        }
    }
}

/// Where a request goes.
enum Routed<B> {
    Done(Response<Full<Bytes>>),
    Admin(admin::Action, Request<B>),
}

impl<B> Service<Request<B>> for StatusPage
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let head = req.method() == Method::HEAD;
        let res = match self.route(req) {
            Routed::Done(res) => res,
            Routed::Admin(action, req) => {
                let page = self.clone();
                return Box::pin(async move { Ok(admin::run(&page, action, req).await) });
            }
        };
        let res = if head {
            res.map(|_| Full::new(Bytes::new()))
        } else {
            res
        };
        Box::pin(std::future::ready(Ok(res)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_allowed_are_addresses_and_localhost() {
        let none: &[String] = &[];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9000",
            "[::1]:9000",
            "[::1]",
            "localhost:9000",
            "LOCALHOST",
            "10.1.2.3:80",
        ] {
            assert!(host_allowed(ok, none), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9000",
            "127.0.0.1.evil.example",
            "[::1",
            "localhost:abc",
            "",
        ] {
            assert!(!host_allowed(bad, none), "{bad}");
        }
        assert!(host_allowed("lb1.mgmt:9000", &["lb1.mgmt".to_owned()]));
    }
}
