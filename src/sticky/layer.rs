use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use tower_layer::Layer;

use super::seal::{CookieSecret, Sealer};
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

/// How many cookies of the layer's name one request may offer: only the first ones are opened
/// (each with every key), the rest ignored, so a `Cookie` header stuffed with thousands of
/// values costs no more than a few decryptions. A browser sends one; a few more come from
/// cookies of the same name set for other paths or domains.
pub(super) const MAX_CANDIDATES: usize = 4;

/// How far in the future an issue time may lie (clocks of proxies sharing a key differ a
/// little) before the cookie counts as forged.
const CLOCK_SKEW: u64 = 60;

/// When the `Secure` attribute is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Secure {
    /// On requests that came over TLS ([`ClientTls`](crate::forwarded::ClientTls)).
    Auto,
    Always,
    Never,
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
    /// How long after its issue a cookie is honoured, in seconds.
    lifetime: u64,
    secure: Secure,
    http_only: bool,
    same_site: SameSite,
    /// `; Path=/; HttpOnly; SameSite=Lax` and so on, rendered once, without and with `Secure`.
    attributes: [String; 2],
}

/// What a request's cookie says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Found {
    /// The endpoint it names.
    pub(super) id: EndpointId,
    /// Whether it should be set again: sealed with a previous key, or past half its lifetime.
    pub(super) renew: bool,
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Config {
    fn render(&mut self) {
        for (secure, out) in self.attributes.iter_mut().enumerate() {
            let mut a = String::with_capacity(64);
            let _ = write!(a, "; Path={}", self.path);
            if let Some(d) = &self.domain {
                let _ = write!(a, "; Domain={d}");
            }
            if let Some(age) = self.max_age {
                let _ = write!(a, "; Max-Age={}", age.as_secs());
            }
            if secure == 1 {
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
            *out = a;
        }
    }

    /// The endpoint named by a valid, unexpired cookie among the first [`MAX_CANDIDATES`] of
    /// the layer's name in `headers`, if any.
    pub(super) fn endpoint_in(&self, headers: &http::HeaderMap) -> Option<Found> {
        let now = unix_now();
        crate::key::cookie_values(headers, &self.name)
            .take(MAX_CANDIDATES)
            .find_map(|v| self.open_at(v, now))
    }

    /// Opens a cookie value with the current key, then with the previous ones, and checks its
    /// age against `now`.
    fn open_at(&self, value: &[u8], now: u64) -> Option<Found> {
        if !Sealer::plausible(value) {
            return None;
        }
        let (id, issued, current) = match self.sealer.open(&self.name, value) {
            Some((id, issued)) => (id, issued, true),
            None => {
                let (id, issued) = self
                    .previous
                    .iter()
                    .find_map(|s| s.open(&self.name, value))?;
                (id, issued, false)
            }
        };
        if issued > now.saturating_add(CLOCK_SKEW) {
            return None;
        }
        let age = now.saturating_sub(issued);
        if age >= self.lifetime {
            return None;
        }
        Some(Found {
            id,
            renew: !current || age >= self.lifetime / 2,
        })
    }

    /// The `Set-Cookie` value pinning a client to `id`; with `Secure` if the layer says so, or
    /// by default when the request came over TLS (`tls`).
    pub(super) fn set_cookie(&self, id: &EndpointId, tls: bool) -> Option<HeaderValue> {
        let value = self.sealer.seal(&self.name, id, unix_now())?;
        let secure = match self.secure {
            Secure::Auto => tls,
            Secure::Always => true,
            Secure::Never => false,
        };
        let attributes = &self.attributes[usize::from(secure)];
        let mut s = String::with_capacity(self.name.len() + 1 + value.len() + attributes.len());
        s.push_str(&self.name);
        s.push('=');
        s.push_str(&value);
        s.push_str(attributes);
        HeaderValue::try_from(s).ok()
    }
}

/// How long a cookie is honoured after its issue unless [`StickyLayer::lifetime`] says
/// otherwise.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

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
/// The cookie value is the endpoint id sealed with ChaCha20-Poly1305 under a [`CookieSecret`]
/// (see [`StickyLayer::seal`]): it reveals no address, and a value that was not made with the
/// key (forged, garbled, truncated, not UTF-8) is ignored as if absent, and replaced. The
/// layer keeps no state, so proxies sharing the key honour each other's cookies.
///
/// It works with any strategy and any [`Balancer`](crate::Balancer) below it, inside or
/// outside a [`FailoverLayer`](crate::failover::FailoverLayer): either way the cookie names the
/// endpoint that finally served the request.
///
/// Cookie attributes default to `Path=/; HttpOnly; SameSite=Lax`, with no `Max-Age` (a
/// session cookie), and `Secure` on responses to requests that came over TLS (see
/// [`secure`](StickyLayer::secure)).
///
/// Against stolen or harvested cookies, the cookie carries its issue time, sealed with the
/// endpoint id: it is honoured for its [`lifetime`](StickyLayer::lifetime) (24 hours by
/// default) and ignored after that, as if absent, so the client is re-balanced and gets a
/// fresh cookie. A cookie past half its lifetime is honoured and set again, so a client that
/// keeps coming back keeps its endpoint. Only the first 4 cookies of the layer's name in a
/// request are opened; the rest are ignored, so a request stuffed with cookies costs no more
/// than a few decryptions.
///
/// ```
/// use std::time::Duration;
/// use lbkit::sticky::{SameSite, CookieSecret, StickyLayer};
/// use lbkit::{strategy::RoundRobin, BalancerLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let sticky = StickyLayer::cookie("lb", CookieSecret::generate())
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
    pub fn cookie(name: impl Into<String>, key: CookieSecret) -> Self {
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
            lifetime: DEFAULT_LIFETIME.as_secs(),
            secure: Secure::Auto,
            http_only: true,
            same_site: SameSite::Lax,
            attributes: Default::default(),
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
    /// use lbkit::sticky::{CookieSecret, StickyLayer};
    ///
    /// let (old, new) = (CookieSecret::generate(), CookieSecret::generate());
    /// let before = StickyLayer::cookie("lb", old.clone());
    /// let after = StickyLayer::cookie("lb", new).accept_previous_key(old);
    /// let cookie = before.seal(&"backend-1".into()).unwrap();
    /// assert_eq!(after.open(cookie.as_bytes()).unwrap(), "backend-1");
    /// ```
    pub fn accept_previous_key(self, key: CookieSecret) -> Self {
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
    /// closes). Whole seconds. This is what the browser is told; how long the layer honours a
    /// cookie is its [`lifetime`](Self::lifetime), whichever is shorter wins.
    pub fn max_age(self, max_age: Duration) -> Self {
        self.edit(|c| c.max_age = Some(max_age))
    }

    /// How long after it was issued a cookie is honoured (default 24 hours, a working day's
    /// session; whole seconds, at least one). The issue time is sealed into the cookie, so
    /// a copied, logged or otherwise harvested cookie stops working at the end of its lifetime
    /// whatever the client does; an expired cookie counts as none: the client is re-balanced
    /// and gets a fresh cookie. A cookie honoured past half its lifetime is set again, so a
    /// client that comes back at least once per half lifetime keeps its endpoint for good.
    ///
    /// Proxies sharing a key should share the lifetime too (and their clocks: an issue time
    /// more than a minute ahead of the clock is taken for a forgery).
    pub fn lifetime(self, lifetime: Duration) -> Self {
        self.edit(|c| c.lifetime = lifetime.as_secs().max(1))
    }

    /// Sets whether the cookie is `Secure`, sent over HTTPS only. By default it is `Secure` on
    /// responses to requests that came over TLS, which the request's
    /// [`ClientTls`](crate::forwarded::ClientTls) extension tells (lbkit's
    /// [`Server`](crate::server) inserts it on connections it terminated TLS for), and not
    /// otherwise. Set `true` when TLS ends in front of this proxy, so every cookie is `Secure`.
    pub fn secure(self, secure: bool) -> Self {
        self.edit(|c| {
            c.secure = match secure {
                true => Secure::Always,
                false => Secure::Never,
            }
        })
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

    /// A cookie value naming endpoint `id`, issued now, as the layer sets it (a fresh random
    /// nonce each time, so two values for one endpoint differ). `None` for ids longer than 255
    /// bytes, which cannot be sticky.
    pub fn seal(&self, id: &EndpointId) -> Option<String> {
        self.config.sealer.seal(&self.config.name, id, unix_now())
    }

    /// The endpoint a cookie value names, if this layer (or another with the same key and
    /// cookie name) made it, with the current key or one given to
    /// [`accept_previous_key`](Self::accept_previous_key), and it is within its
    /// [`lifetime`](Self::lifetime); `None` for anything else.
    pub fn open(&self, value: &[u8]) -> Option<EndpointId> {
        self.config.open_at(value, unix_now()).map(|f| f.id)
    }

    /// The endpoint named by a valid affinity cookie among `headers`' `Cookie` headers (only
    /// the first 4 cookies of the layer's name are looked at).
    pub fn endpoint_in(&self, headers: &http::HeaderMap) -> Option<EndpointId> {
        self.config.endpoint_in(headers).map(|f| f.id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_renewal_skew_and_candidates() {
        let key = CookieSecret::from_bytes([3; 32]);
        let layer = StickyLayer::cookie("lb", key.clone()).lifetime(Duration::from_secs(100));
        let c = &layer.config;
        let id = EndpointId::new("a");
        let at = |issued: u64| c.sealer.seal("lb", &id, issued).unwrap();
        let now = 1_000_000;
        let found = |renew| {
            Some(Found {
                id: id.clone(),
                renew,
            })
        };
        // Fresh, past half its lifetime (renewed), expired.
        assert_eq!(c.open_at(at(now).as_bytes(), now), found(false));
        assert_eq!(c.open_at(at(now - 49).as_bytes(), now), found(false));
        assert_eq!(c.open_at(at(now - 50).as_bytes(), now), found(true));
        assert_eq!(c.open_at(at(now - 99).as_bytes(), now), found(true));
        assert_eq!(c.open_at(at(now - 100).as_bytes(), now), None);
        assert_eq!(c.open_at(at(0).as_bytes(), now), None);
        // From a clock a little ahead: fine; far ahead: a forgery.
        assert_eq!(
            c.open_at(at(now + CLOCK_SKEW).as_bytes(), now),
            found(false)
        );
        assert_eq!(c.open_at(at(now + CLOCK_SKEW + 1).as_bytes(), now), None);
        assert_eq!(c.open_at(at(u64::MAX).as_bytes(), now), None);
        // A previous key's cookie is honoured and renewed, within the same lifetime.
        let next = StickyLayer::cookie("lb", CookieSecret::generate()).accept_previous_key(key);
        let n = &next.config;
        assert_eq!(
            n.open_at(at(now).as_bytes(), now).map(|f| f.renew),
            Some(true)
        );
        assert_eq!(
            n.open_at(at(now - DEFAULT_LIFETIME.as_secs()).as_bytes(), now),
            None
        );

        // Only the first MAX_CANDIDATES cookies of the name are opened.
        let valid = format!("lb={}", at(unix_now()));
        let mut headers = http::HeaderMap::new();
        let junk = ["lb=x; other=1"; MAX_CANDIDATES - 1].join("; ");
        headers.insert(
            http::header::COOKIE,
            format!("{junk}; {valid}").parse().unwrap(),
        );
        assert_eq!(layer.endpoint_in(&headers), Some(id.clone()));
        headers.insert(
            http::header::COOKIE,
            format!("lb=y; {junk}; {valid}").parse().unwrap(),
        );
        assert_eq!(layer.endpoint_in(&headers), None);
    }

    #[test]
    fn secure_by_default_only_over_tls() {
        let id = EndpointId::new("a");
        let attrs = |layer: &StickyLayer, tls| {
            let v = layer.config.set_cookie(&id, tls).unwrap();
            let v = v.to_str().unwrap().to_owned();
            v.split_once(';').unwrap().1.to_owned()
        };
        let auto = StickyLayer::cookie("lb", CookieSecret::generate());
        assert_eq!(attrs(&auto, false), " Path=/; HttpOnly; SameSite=Lax");
        assert_eq!(
            attrs(&auto, true),
            " Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        let never = auto.clone().secure(false);
        assert_eq!(attrs(&never, true), " Path=/; HttpOnly; SameSite=Lax");
        let always = auto.secure(true);
        assert_eq!(
            attrs(&always, false),
            " Path=/; Secure; HttpOnly; SameSite=Lax"
        );
    }
}
