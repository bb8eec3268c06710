use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tower_layer::Layer;

use super::seal::{Sealer, StickyKey};
use super::service::Sticky;
use crate::endpoint::EndpointId;

/// The `SameSite` attribute of the affinity cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SameSite {
    /// Sent only with requests from the same site.
    Strict,
    /// Also sent when following a link from another site (the default).
    #[default]
    Lax,
    /// Sent with every request, including from other sites; browsers require
    /// [`secure`](StickyLayer::secure) with it.
    None,
}

#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) name: Box<str>,
    pub(super) sealer: Sealer,
    /// Keys being rotated out: cookies sealed with them are still honoured, and replaced.
    previous: Vec<Sealer>,
    path: Box<str>,
    domain: Option<Box<str>>,
    max_age: Option<Duration>,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
    /// `; Path=/; HttpOnly; SameSite=Lax` and so on, rendered once.
    attributes: String,
}

impl Config {
    fn render(&mut self) {
        let mut a = String::with_capacity(64);
        let _ = write!(a, "; Path={}", self.path);
        if let Some(d) = &self.domain {
            let _ = write!(a, "; Domain={d}");
        }
        if let Some(age) = self.max_age {
            let _ = write!(a, "; Max-Age={}", age.as_secs());
        }
        if self.secure {
            a.push_str("; Secure");
        }
        if self.http_only {
            a.push_str("; HttpOnly");
        }
        a.push_str(match self.same_site {
            SameSite::Strict => "; SameSite=Strict",
            SameSite::Lax => "; SameSite=Lax",
            SameSite::None => "; SameSite=None",
        });
        self.attributes = a;
    }

    /// The endpoint named by a valid cookie in `headers`, if any, and whether the cookie was
    /// sealed with the current key (`false`: with a previous one, so it should be replaced).
    pub(super) fn endpoint_in(&self, headers: &http::HeaderMap) -> Option<(EndpointId, bool)> {
        crate::key::cookie_values(headers, &self.name).find_map(|v| self.open(v))
    }

    /// Opens a cookie value with the current key, then with the previous ones.
    fn open(&self, value: &[u8]) -> Option<(EndpointId, bool)> {
        if let Some(id) = self.sealer.open(&self.name, value) {
            return Some((id, true));
        }
        self.previous
            .iter()
            .find_map(|s| s.open(&self.name, value))
            .map(|id| (id, false))
    }

    /// The `Set-Cookie` value pinning a client to `id`.
    pub(super) fn set_cookie(&self, id: &EndpointId) -> Option<HeaderValue> {
        let value = self.sealer.seal(&self.name, id)?;
        let mut s =
            String::with_capacity(self.name.len() + 1 + value.len() + self.attributes.len());
        s.push_str(&self.name);
        s.push('=');
        s.push_str(&value);
        s.push_str(&self.attributes);
        HeaderValue::try_from(s).ok()
    }
}

/// A [`Layer`] for cookie-based sticky sessions: a client that was served by an endpoint keeps
/// going to it while it is eligible.
///
/// On the way in, a valid affinity cookie makes its endpoint the request's preferred one
/// ([`PickHints::prefer`](crate::hints::PickHints::prefer)); the balancer honours it while
/// that endpoint is present, healthy, in the tier in use and not avoided (by a failover
/// retry), and otherwise picks with its strategy as usual. On the way out, when the endpoint
/// that answered (the balancer records it, see
/// [`PickHints::record_pick`](crate::hints::PickHints::record_pick)) differs from the cookie's,
/// or the request had no valid cookie, the layer appends a `Set-Cookie` naming that endpoint. So a
/// client whose endpoint went away is re-balanced once and then sticks to its new endpoint.
///
/// The cookie value is the endpoint id sealed with ChaCha20-Poly1305 under a [`StickyKey`]
/// (see [`StickyLayer::seal`]): it reveals no address, and a value that was not made with the
/// key (forged, garbled, truncated, not UTF-8) is ignored as if absent, and replaced. The
/// layer keeps no state, so proxies sharing the key honour each other's cookies.
///
/// It works with any strategy and any [`Balancer`](crate::Balancer) below it, inside or
/// outside a [`FailoverLayer`](crate::failover::FailoverLayer): either way the cookie names the
/// endpoint that finally served the request.
///
/// Cookie attributes default to `Path=/; HttpOnly; SameSite=Lax`, with no `Max-Age` (a
/// session cookie). The cookie is only set when the endpoint changes, so a `Max-Age` counts
/// from the first response of that endpoint.
///
/// ```
/// use std::time::Duration;
/// use lbkit::sticky::{SameSite, StickyKey, StickyLayer};
/// use lbkit::{strategy::RoundRobin, BalancerLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let sticky = StickyLayer::cookie("lb", StickyKey::generate())
///     .max_age(Duration::from_secs(3600))
///     .secure(true)
///     .same_site(SameSite::Strict);
/// let svc = ServiceBuilder::new()
///     .layer(sticky)
///     .layer(BalancerLayer::new(["a:80", "b:80"], RoundRobin::new()))
///     .service(service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
/// let set = res.headers()["set-cookie"].to_str().unwrap().to_owned();
/// assert!(set.starts_with("lb="));
/// assert!(set.ends_with("; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Strict"));
///
/// // Send it back: same endpoint, no new cookie.
/// let cookie = set.split(';').next().unwrap();
/// let req = http::Request::builder().header("cookie", cookie).body(()).unwrap();
/// let res = svc.oneshot(req).await.unwrap();
/// assert!(res.headers().get("set-cookie").is_none());
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StickyLayer {
    config: Arc<Config>,
}

impl StickyLayer {
    /// Affinity through the cookie `name`, sealed with `key`.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid cookie name (an HTTP token: letters, digits and
    /// ``!#$%&'*+-.^_`|~``).
    pub fn cookie(name: impl Into<String>, key: StickyKey) -> Self {
        let name = name.into();
        assert!(
            !name.is_empty() && name.bytes().all(is_token_byte),
            "StickyLayer::cookie: {name:?} is not a valid cookie name"
        );
        let mut config = Config {
            name: name.into_boxed_str(),
            sealer: Sealer::new(&key),
            previous: Vec::new(),
            path: "/".into(),
            domain: None,
            max_age: None,
            secure: false,
            http_only: true,
            same_site: SameSite::Lax,
            attributes: String::new(),
        };
        config.render();
        StickyLayer {
            config: Arc::new(config),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let c = Arc::make_mut(&mut self.config);
        f(c);
        c.render();
        self
    }

    /// Also honours cookies sealed with `key`, a key being rotated out: a client with such a
    /// cookie keeps its endpoint and gets the cookie again, sealed with the current key. Call it
    /// once per old key; drop the old keys once their cookies have expired or been replaced.
    ///
    /// ```
    /// use lbkit::sticky::{StickyKey, StickyLayer};
    ///
    /// let (old, new) = (StickyKey::generate(), StickyKey::generate());
    /// let before = StickyLayer::cookie("lb", old.clone());
    /// let after = StickyLayer::cookie("lb", new).accept_previous_key(old);
    /// let cookie = before.seal(&"backend-1".into()).unwrap();
    /// assert_eq!(after.open(cookie.as_bytes()).unwrap(), "backend-1");
    /// ```
    pub fn accept_previous_key(self, key: StickyKey) -> Self {
        self.edit(|c| c.previous.push(Sealer::new(&key)))
    }

    /// Sets the cookie's `Path` (default `/`).
    ///
    /// # Panics
    ///
    /// If `path` contains `;` or a control character.
    pub fn path(self, path: impl Into<String>) -> Self {
        let path = path.into();
        assert!(
            is_attr_value(&path),
            "StickyLayer::path: invalid path {path:?}"
        );
        self.edit(|c| c.path = path.into_boxed_str())
    }

    /// Sets the cookie's `Domain` (default none: the host that set it only).
    ///
    /// # Panics
    ///
    /// If `domain` contains `;` or a control character.
    pub fn domain(self, domain: impl Into<String>) -> Self {
        let domain = domain.into();
        assert!(
            is_attr_value(&domain),
            "StickyLayer::domain: invalid domain {domain:?}"
        );
        self.edit(|c| c.domain = Some(domain.into_boxed_str()))
    }

    /// Sets the cookie's `Max-Age` (default none: a session cookie, dropped when the browser
    /// closes). Whole seconds.
    pub fn max_age(self, max_age: Duration) -> Self {
        self.edit(|c| c.max_age = Some(max_age))
    }

    /// Sets whether the cookie is `Secure`, sent over HTTPS only (default `false`).
    pub fn secure(self, secure: bool) -> Self {
        self.edit(|c| c.secure = secure)
    }

    /// Sets whether the cookie is `HttpOnly`, hidden from scripts (default `true`).
    pub fn http_only(self, http_only: bool) -> Self {
        self.edit(|c| c.http_only = http_only)
    }

    /// Sets the cookie's `SameSite` (default [`SameSite::Lax`]).
    pub fn same_site(self, same_site: SameSite) -> Self {
        self.edit(|c| c.same_site = same_site)
    }

    /// The cookie's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// A cookie value naming endpoint `id`, as the layer sets it (a fresh random nonce each
    /// time, so two values for one endpoint differ). `None` for ids longer than 255 bytes,
    /// which cannot be sticky.
    pub fn seal(&self, id: &EndpointId) -> Option<String> {
        self.config.sealer.seal(&self.config.name, id)
    }

    /// The endpoint a cookie value names, if this layer (or another with the same key and
    /// cookie name) made it, with the current key or one given to
    /// [`accept_previous_key`](Self::accept_previous_key); `None` for anything else.
    pub fn open(&self, value: &[u8]) -> Option<EndpointId> {
        self.config.open(value).map(|(id, _)| id)
    }

    /// The endpoint named by a valid affinity cookie among `headers`' `Cookie` headers.
    pub fn endpoint_in(&self, headers: &http::HeaderMap) -> Option<EndpointId> {
        self.config.endpoint_in(headers).map(|(id, _)| id)
    }
}

impl<S> Layer<S> for StickyLayer {
    type Service = Sticky<S>;

    fn layer(&self, inner: S) -> Sticky<S> {
        Sticky::new(inner, self.config.clone())
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_attr_value(s: &str) -> bool {
    s.bytes().all(|b| b != b';' && !b.is_ascii_control()) && s.is_ascii()
}
