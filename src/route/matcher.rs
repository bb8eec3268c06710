//! What a route matches: host, path prefix, method, headers and cookies, all of which must hold.

use http::header::{HeaderName, HeaderValue, HOST};
use http::{Method, Request};

use crate::key::cookie_values;

/// The conditions of one route; a request matches when all of them hold. Start from
/// [`Match::any`] and add conditions ([`host`](Match::host), [`path_prefix`](Match::path_prefix),
/// [`method`](Match::method), [`header`](Match::header), [`cookie`](Match::cookie)).
///
/// ```
/// use lbkit::route::Match;
///
/// let m = Match::any().host("*.example.com").path_prefix("/api").header("x-beta", "1");
/// let req = http::Request::get("/api/users")
///     .header("host", "eu.example.com:8443")
///     .header("x-beta", "1")
///     .body(())
///     .unwrap();
/// assert!(m.matches(&req));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Match {
    host: Option<Host>,
    path_prefix: Option<String>,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    cookies: Vec<(String, Vec<u8>)>,
}

/// A host name to match, lowercase, without port.
#[derive(Clone, Debug)]
enum Host {
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (one label or more, as nginx's
    /// wildcard names), stored as `.example.com`.
    Suffix(String),
}

impl Match {
    /// Every request (add conditions to narrow it).
    pub fn any() -> Self {
        Match::default()
    }

    /// Also requires the host `host` (from the `Host` header, or from an HTTP/2 request's
    /// `:authority`), compared without case and without the port. `*.example.com` matches
    /// every name below `example.com` (not `example.com` itself).
    pub fn host(mut self, host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        self.host = Some(match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => Host::Suffix(suffix.to_owned()),
            _ => Host::Exact(host),
        });
        self
    }

    /// Also requires the path to be `prefix` or to lie below it: `/api` matches `/api`,
    /// `/api/` and `/api/users`, not `/apix` (a prefix that ends in `/` matches what starts
    /// with it).
    pub fn path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }

    /// Also requires the method.
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Also requires a `name` header whose value is exactly `value` (any of several).
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name or `value` not a valid header value: these are
    /// written in the code, not taken from requests.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        let value = HeaderValue::from_str(value).expect("a valid header value");
        self.headers.push((name, value));
        self
    }

    /// Also requires a cookie `name` whose value is exactly `value`.
    pub fn cookie(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.cookies.push((name.into(), value.into()));
        self
    }

    /// Whether `req` meets every condition.
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        if let Some(m) = &self.method {
            if req.method() != m {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix {
            if !path_under(req.uri().path(), prefix) {
                return false;
            }
        }
        if let Some(host) = &self.host {
            if !request_host(req).is_some_and(|h| host.matches(h)) {
                return false;
            }
        }
        let headers = req.headers();
        self.headers
            .iter()
            .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value))
            && self
                .cookies
                .iter()
                .all(|(name, value)| cookie_values(headers, name).any(|v| v == value.as_slice()))
    }
}

impl Host {
    fn matches(&self, host: &str) -> bool {
        match self {
            Host::Exact(h) => host.eq_ignore_ascii_case(h),
            Host::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// The request's host name without its port: the `Host` header, else the URI's authority.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.headers().get(HOST) {
        Some(v) => v.to_str().ok()?,
        None => req.uri().authority()?.as_str(),
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // `[::1]:8080`: the brackets and what follows go.
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn path_under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, path: &str) -> Request<()> {
        Request::get(path).header("host", host).body(()).unwrap()
    }

    #[test]
    fn hosts_paths_headers_and_cookies() {
        let m = Match::any().host("Shop.Example");
        assert!(m.matches(&req("shop.example:8080", "/")));
        assert!(!m.matches(&req("shop.example.evil", "/")));
        let w = Match::any().host("*.example.com");
        assert!(w.matches(&req("a.b.example.com", "/")));
        assert!(!w.matches(&req("example.com", "/")));
        assert!(!w.matches(&req("badexample.com", "/")));
        assert!(Match::any().host("::1").matches(&req("[::1]:80", "/")));
        let h2 = Request::get("https://api.example/x").body(()).unwrap();
        assert!(Match::any().host("api.example").matches(&h2));

        let p = Match::any().path_prefix("/api");
        for (path, ok) in [
            ("/api", true),
            ("/api/", true),
            ("/api/x", true),
            ("/apix", false),
            ("/", false),
        ] {
            assert_eq!(p.matches(&req("a", path)), ok, "{path}");
        }
        assert!(Match::any()
            .path_prefix("/")
            .matches(&req("a", "/anything")));

        let c = Match::any().cookie("beta", "yes").header("x-a", "1");
        let r = Request::get("/")
            .header("cookie", "x=1; beta=yes")
            .header("x-a", "0")
            .header("x-a", "1")
            .body(())
            .unwrap();
        assert!(c.matches(&r));
        let r = Request::get("/")
            .header("cookie", "beta=no")
            .header("x-a", "1")
            .body(())
            .unwrap();
        assert!(!c.matches(&r));
    }
}
