//! Request keys: what consistent hashing and affinity are keyed on.
//!
//! A [`Key`] says which part of a request identifies "the same user" or "the same object": a
//! header, a cookie, the client's IP address, the path, a query parameter, or a closure of
//! yours. [`Key::extract`] reads it and hashes its bytes with
//! [`stable_hash`] (without copying them), so every balancer in a
//! fleet maps a key to the same number. [`HashKeyLayer`] writes that hash into the request's
//! [`PickHints`](crate::hints::PickHints); a consistent-hashing strategy
//! ([`Maglev`](crate::strategy::Maglev), [`Ring`](crate::strategy::Ring)) behind it sends each
//! key to the same endpoint.
//!
//! The client's IP comes from the connection ([`ClientAddr`](crate::forwarded::ClientAddr)), and
//! from `X-Forwarded-For`/`Forwarded` only when the connection comes from a proxy you trust
//! (see [`ClientIp`] and [`forwarded`](crate::forwarded)).
//!
//! ```
//! use lbkit::key::{Key, HashKeyLayer};
//!
//! // The session cookie when there is one, else the client's address.
//! let layer = HashKeyLayer::new(Key::cookie("session").or(Key::client_ip()));
//! # let _ = layer;
//! ```

mod cookie;
mod layer;

pub(crate) use cookie::cookie_values;
pub use layer::{HashKey, HashKeyLayer};

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::{Extensions, HeaderMap, Method, Uri};

use crate::forwarded::{Cidr, ClientIp};
use crate::hash::stable_hash;

/// Which part of a request to key on; see the [module docs](self).
///
/// Cheap to clone (a reference count). Extraction never allocates, except in closures you
/// give to [`Key::from_fn`].
#[derive(Clone)]
pub struct Key(Arc<Kind>);

type KeyFn = dyn Fn(&RequestView<'_>) -> Option<u64> + Send + Sync;

enum Kind {
    Header(HeaderName),
    Cookie(Box<str>),
    ClientIp(ClientIp),
    Path,
    Query(Box<str>),
    Fn(Box<KeyFn>),
    Or(Key, Key),
}

impl Key {
    /// The value of header `name` (the first, if it appears more than once), as raw bytes.
    /// Requests without it have no key.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name.
    pub fn header<N>(name: N) -> Key
    where
        N: TryInto<HeaderName>,
        N::Error: fmt::Debug,
    {
        let name = name.try_into().expect("Key::header: invalid header name");
        Key::new(Kind::Header(name))
    }

    /// The value of the cookie `name` (the first, if several have that name), as raw bytes.
    pub fn cookie(name: impl Into<String>) -> Key {
        Key::new(Kind::Cookie(name.into().into_boxed_str()))
    }

    /// The IP address of the connection's peer, from the request's
    /// [`ClientAddr`](crate::forwarded::ClientAddr) extension. Forwarding headers are ignored:
    /// behind a proxy, use [`Key::client_ip_trusting`].
    pub fn client_ip() -> Key {
        Key::from(ClientIp::peer())
    }

    /// The client's IP address: the peer's, or, when the peer is in one of `proxies`, the
    /// right-most `X-Forwarded-For` address that is not itself a trusted proxy. See
    /// [`ClientIp`] (for the `Forwarded` header, build one and convert it with `Key::from`).
    ///
    /// ```
    /// use std::net::IpAddr;
    /// use lbkit::key::Key;
    ///
    /// let key = Key::client_ip_trusting(["127.0.0.1".parse::<IpAddr>().unwrap()]);
    /// # let _ = key;
    /// ```
    pub fn client_ip_trusting<T: Into<Cidr>>(proxies: impl IntoIterator<Item = T>) -> Key {
        Key::from(ClientIp::trusting(proxies))
    }

    /// The path of the request URI, as is (not normalised, not decoded).
    pub fn path() -> Key {
        Key::new(Kind::Path)
    }

    /// The value of query parameter `param` (the first, if repeated), as it appears in the URI
    /// (not percent-decoded). `?param` with no `=` is the empty value.
    pub fn query(param: impl Into<String>) -> Key {
        Key::new(Kind::Query(param.into().into_boxed_str()))
    }

    /// A key computed by `f`, which returns the hash to use (hash bytes with
    /// [`stable_hash`] so that every process agrees), or `None`.
    ///
    /// ```
    /// use lbkit::{hash::stable_hash, key::Key};
    ///
    /// // The tenant: the first path segment.
    /// let key = Key::from_fn(|req| {
    ///     let seg = req.uri().path().trim_start_matches('/').split('/').next()?;
    ///     (!seg.is_empty()).then(|| stable_hash(seg.as_bytes()))
    /// });
    /// let req = http::Request::get("/acme/orders/7").body(()).unwrap();
    /// assert_eq!(key.extract(&req), Some(stable_hash(b"acme")));
    /// ```
    pub fn from_fn<F>(f: F) -> Key
    where
        F: Fn(&RequestView<'_>) -> Option<u64> + Send + Sync + 'static,
    {
        Key::new(Kind::Fn(Box::new(f)))
    }

    /// This key, or `other` for requests that do not have this one.
    pub fn or(self, other: Key) -> Key {
        Key::new(Kind::Or(self, other))
    }

    fn new(kind: Kind) -> Key {
        Key(Arc::new(kind))
    }

    /// The hash of the request's key, or `None` if the request has no such key.
    ///
    /// ```
    /// use lbkit::{hash::stable_hash, key::Key};
    ///
    /// let req = http::Request::get("/cart?user=42&x=1").body(()).unwrap();
    /// assert_eq!(Key::query("user").extract(&req), Some(stable_hash(b"42")));
    /// assert_eq!(Key::query("nope").extract(&req), None);
    /// ```
    pub fn extract<B>(&self, req: &http::Request<B>) -> Option<u64> {
        self.extract_parts(&RequestView::new(req))
    }

    /// As [`extract`](Key::extract), from the parts of a request.
    pub fn extract_parts(&self, req: &RequestView<'_>) -> Option<u64> {
        match &*self.0 {
            Kind::Header(name) => req.headers.get(name).map(|v| stable_hash(v.as_bytes())),
            Kind::Cookie(name) => cookie_values(req.headers, name).next().map(stable_hash),
            Kind::ClientIp(c) => {
                let peer = req
                    .extensions
                    .get::<crate::forwarded::ClientAddr>()
                    .map(|a| a.0.ip());
                c.resolve(req.headers, peer).map(hash_ip)
            }
            Kind::Path => Some(stable_hash(req.uri.path().as_bytes())),
            Kind::Query(param) => query_value(req.uri.query()?, param).map(stable_hash),
            Kind::Fn(f) => f(req),
            Kind::Or(a, b) => a.extract_parts(req).or_else(|| b.extract_parts(req)),
        }
    }
}

/// Hashes an IP address's bytes (4 for IPv4, including IPv4-mapped IPv6; 16 for IPv6): the key
/// of [`Key::client_ip`]. For the fuzz target; not a stable API.
#[doc(hidden)]
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => stable_hash(&v4.octets()),
        IpAddr::V6(v6) => stable_hash(&v6.octets()),
    }
}

fn query_value<'a>(query: &'a str, param: &str) -> Option<&'a [u8]> {
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (name == param).then_some(value.as_bytes())
    })
}

impl From<ClientIp> for Key {
    fn from(c: ClientIp) -> Key {
        Key::new(Kind::ClientIp(c))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Kind::Header(n) => f.debug_tuple("Key::header").field(n).finish(),
            Kind::Cookie(n) => f.debug_tuple("Key::cookie").field(n).finish(),
            Kind::ClientIp(c) => f.debug_tuple("Key::client_ip").field(c).finish(),
            Kind::Path => f.write_str("Key::path"),
            Kind::Query(p) => f.debug_tuple("Key::query").field(p).finish(),
            Kind::Fn(_) => f.write_str("Key::from_fn(..)"),
            Kind::Or(a, b) => f.debug_tuple("Key::or").field(a).field(b).finish(),
        }
    }
}

/// The parts of a request a [`Key`] reads: a borrowed view, whatever the body type.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    /// A view of `req`.
    pub fn new<B>(req: &'a http::Request<B>) -> Self {
        RequestView {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// A view of the head of a request taken apart.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        RequestView {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions (such as [`ClientAddr`](crate::forwarded::ClientAddr)).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarded::ClientAddr;

    fn req(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn header_cookie_path_query() {
        let mut r = req("/a/b?x=1&user=bob&flag");
        r.headers_mut().insert("x-user", "alice".parse().unwrap());
        r.headers_mut()
            .insert("cookie", "sid=s-1; other=2".parse().unwrap());
        assert_eq!(
            Key::header("x-user").extract(&r),
            Some(stable_hash(b"alice"))
        );
        assert_eq!(Key::header("x-none").extract(&r), None);
        assert_eq!(Key::cookie("sid").extract(&r), Some(stable_hash(b"s-1")));
        assert_eq!(Key::cookie("nope").extract(&r), None);
        assert_eq!(Key::path().extract(&r), Some(stable_hash(b"/a/b")));
        assert_eq!(Key::query("user").extract(&r), Some(stable_hash(b"bob")));
        assert_eq!(Key::query("flag").extract(&r), Some(stable_hash(b"")));
        assert_eq!(Key::query("us").extract(&r), None);
        assert_eq!(Key::query("x").extract(&req("/")), None);
        let k = Key::header("x-none").or(Key::cookie("sid"));
        assert_eq!(k.extract(&r), Some(stable_hash(b"s-1")));
        assert!(format!("{k:?}").contains("x-none"));
    }

    #[test]
    fn client_ip_key() {
        let mut r = req("/");
        assert_eq!(Key::client_ip().extract(&r), None, "no peer, no key");
        r.extensions_mut()
            .insert(ClientAddr("127.0.0.1:5000".parse().unwrap()));
        r.headers_mut()
            .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        let peer = hash_ip("127.0.0.1".parse().unwrap());
        let client = hash_ip("203.0.113.9".parse().unwrap());
        assert_eq!(Key::client_ip().extract(&r), Some(peer));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(Key::client_ip_trusting([ip]).extract(&r), Some(client));
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(Key::client_ip_trusting([other]).extract(&r), Some(peer));
        // The port does not matter; IPv4-mapped IPv6 is IPv4.
        r.extensions_mut()
            .insert(ClientAddr("[::ffff:127.0.0.1]:9".parse().unwrap()));
        assert_eq!(Key::client_ip().extract(&r), Some(peer));
    }

    #[test]
    fn from_fn_sees_the_request() {
        let k = Key::from_fn(|r| (r.method() == Method::POST).then_some(7));
        let mut r = req("/");
        assert_eq!(k.extract(&r), None);
        *r.method_mut() = Method::POST;
        assert_eq!(k.extract(&r), Some(7));
    }
}
