//! Header rewriting for forwarded requests: hop-by-hop removal and hiding the backend's own
//! address from responses (the forwarding headers are written by
//! [`forwarded::append_forwarded`](crate::forwarded::append_forwarded)).
//!
//! These are plain functions over [`http::HeaderMap`], usable without the rest of the proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The headers that describe one connection, not the message, and must not be forwarded
/// (RFC 9110 §7.6.1), besides those named in `Connection`.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// [`HOP_BY_HOP`] as one value in memory: a `const` array of header names is built (and
/// dropped) again at every use.
static HOP_BY_HOP_NAMES: [HeaderName; 9] = HOP_BY_HOP;

/// The lengths of the [`HOP_BY_HOP`] names as a bit set (bit `n` for a name of `n` bytes; all
/// are shorter than 32): most names of a message (`host`, `accept`, `content-length`, ...)
/// are ruled out by their length alone, without comparing them with each hop-by-hop name.
const HOP_BY_HOP_LENGTHS: u32 = crate::forwarded::name_lengths(&[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
]);

/// Whether the headers ask to switch protocols (`Connection: upgrade` with an `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

fn connection_tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers a `Connection` list never removes: they carry the message itself (its target host,
/// framing, type, credentials) or what the proxy asserts about the client, so a client must not
/// be able to strip them on the way (`Connection: host` would drop `Host` before the proxy
/// copies it into `X-Forwarded-Host`, letting the client's own `X-Forwarded-Host` through).
pub const NEVER_HOP_BY_HOP: [&str; 11] = [
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "authorization",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
];

/// Removes hop-by-hop headers: the standard ones and every header named in `Connection`,
/// except the end-to-end headers a client must not be able to strip (`Host`,
/// `Content-Length`, `Content-Type`, `Content-Encoding`, `Authorization`, `Cookie` and the
/// forwarding headers).
///
/// With `keep_upgrade`, an upgrade handshake survives: `Upgrade` is kept and `Connection` is set
/// to `upgrade` alone, as a proxy that forwards the upgrade must do.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which hop-by-hop headers are there at all: most messages
    // carry none (or only `Connection: keep-alive`), and a `remove` per absent name would hash
    // every name in the list, for every request and response.
    let mut present = 0u16;
    for name in headers.keys() {
        if !crate::forwarded::may_be_among(HOP_BY_HOP_LENGTHS, name) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP_NAMES.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let upgrade = keep_upgrade && is_upgrade(headers);
    if present & 1 != 0 {
        // Names listed in Connection are hop-by-hop too. Collecting them allocates only when
        // Connection names something beyond the usual keep-alive/close/upgrade.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for t in connection_tokens(v) {
                if ["keep-alive", "close", "upgrade"]
                    .iter()
                    .chain(NEVER_HOP_BY_HOP.iter())
                    .any(|k| t.eq_ignore_ascii_case(k))
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP_NAMES.iter().enumerate() {
        if present & (1 << i) == 0 || (upgrade && name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Makes response headers stop pointing at the backend itself: a `Location` or
/// `Content-Location` whose authority is `backend` becomes a relative reference (path, query
/// and fragment, which the client resolves against the address it used), and a `Set-Cookie`
/// `Domain` attribute naming the backend's host is dropped (the cookie then belongs to the
/// host the client asked). Other values are left alone.
///
/// A backend that does not know it is proxied builds such headers from its own address; this
/// keeps that address away from clients, as nginx's `proxy_redirect default` and
/// `proxy_cookie_domain` do.
///
/// ```
/// use http::{HeaderMap, HeaderValue};
/// use lbkit::proxy::headers::hide_backend_authority;
///
/// let mut h = HeaderMap::new();
/// h.insert("location", HeaderValue::from_static("http://10.0.0.7:8080/next?page=2"));
/// h.insert("set-cookie", HeaderValue::from_static("sid=1; Domain=10.0.0.7; Path=/"));
/// hide_backend_authority(&mut h, &"10.0.0.7:8080".parse().unwrap());
/// assert_eq!(h["location"], "/next?page=2");
/// assert_eq!(h["set-cookie"], "sid=1; Path=/");
/// ```
pub fn hide_backend_authority(headers: &mut HeaderMap, backend: &http::uri::Authority) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let relative = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| relative_if_backend(v, backend));
        if let Some(v) = relative {
            headers.insert(name, v);
        }
    }
    let host = backend.host().trim_start_matches('[').trim_end_matches(']');
    let names_backend = |v: &HeaderValue| {
        v.to_str()
            .is_ok_and(|c| c.split(';').skip(1).any(|a| is_domain_of(a, host)))
    };
    if headers
        .get_all(header::SET_COOKIE)
        .iter()
        .any(names_backend)
    {
        let cookies: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| match v.to_str() {
                Ok(c) if names_backend(v) => {
                    let kept: Vec<&str> = c
                        .split(';')
                        .enumerate()
                        .filter(|(i, a)| *i == 0 || !is_domain_of(a, host))
                        .map(|(_, a)| a)
                        .collect();
                    HeaderValue::from_str(&kept.join(";")).unwrap_or_else(|_| v.clone())
                }
                _ => v.clone(),
            })
            .collect();
        headers.remove(header::SET_COOKIE);
        for c in cookies {
            headers.append(header::SET_COOKIE, c);
        }
    }
}

/// Whether a cookie attribute is `Domain=host` (any case, with or without a leading dot).
fn is_domain_of(attribute: &str, host: &str) -> bool {
    match attribute.trim().split_once('=') {
        Some((name, value)) => {
            name.trim().eq_ignore_ascii_case("domain")
                && value
                    .trim()
                    .trim_start_matches('.')
                    .eq_ignore_ascii_case(host)
        }
        None => false,
    }
}

/// `value` as a relative reference when it is an absolute `http(s)` URI at `backend`.
fn relative_if_backend(value: &str, backend: &http::uri::Authority) -> Option<HeaderValue> {
    let (uri, fragment) = match value.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (value, None),
    };
    let uri: http::Uri = uri.parse().ok()?;
    let authority = uri.authority()?;
    let default_port = match uri.scheme_str()? {
        s if s.eq_ignore_ascii_case("http") => 80,
        s if s.eq_ignore_ascii_case("https") => 443,
        _ => return None,
    };
    let same = authority.host().eq_ignore_ascii_case(backend.host())
        && authority.port_u16().unwrap_or(default_port) == backend.port_u16().unwrap_or(80);
    if !same {
        return None;
    }
    let mut relative = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if let Some(f) = fragment {
        relative.push('#');
        relative.push_str(f);
    }
    HeaderValue::from_str(&relative).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarded::{append_forwarded, ForwardedHeaders};

    #[test]
    fn the_length_filter_lets_every_hop_by_hop_name_through() {
        assert!(HOP_BY_HOP
            .iter()
            .all(|n| crate::forwarded::may_be_among(HOP_BY_HOP_LENGTHS, n)));
        assert!(!crate::forwarded::may_be_among(
            HOP_BY_HOP_LENGTHS,
            &header::HOST
        ));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_standard_and_named_hop_by_hop() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn keeps_upgrade_handshake_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn backend_authority_is_hidden_from_location_and_cookies() {
        let backend: http::uri::Authority = "127.0.0.1:8081".parse().unwrap();
        let mut h = map(&[
            ("location", "HTTP://127.0.0.1:8081/a/b?c=d#top"),
            ("content-location", "http://shop.example/a"),
            ("set-cookie", "a=1; Path=/; domain=.127.0.0.1; HttpOnly"),
            ("set-cookie", "b=2; Domain=shop.example"),
            ("set-cookie", "domain=127.0.0.1"),
        ]);
        hide_backend_authority(&mut h, &backend);
        assert_eq!(h["location"], "/a/b?c=d#top");
        assert_eq!(h["content-location"], "http://shop.example/a");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(
            cookies,
            [
                "a=1; Path=/; HttpOnly",
                "b=2; Domain=shop.example",
                "domain=127.0.0.1"
            ]
        );

        // Another port on the same host is another server: left alone.
        let mut h = map(&[("location", "http://127.0.0.1:9999/x")]);
        hide_backend_authority(&mut h, &backend);
        assert_eq!(h["location"], "http://127.0.0.1:9999/x");
        // The default port matches an authority without one.
        let mut h = map(&[("location", "http://backend/x")]);
        hide_backend_authority(&mut h, &"backend:80".parse().unwrap());
        assert_eq!(h["location"], "/x");
        let mut h = map(&[("location", "http://[::1]:8081")]);
        hide_backend_authority(&mut h, &"[::1]:8081".parse().unwrap());
        assert_eq!(h["location"], "/");
    }

    #[test]
    fn a_connection_list_cannot_strip_host_to_spoof_the_forwarded_host() {
        let mut h = map(&[
            ("host", "shop.example"),
            (
                "connection",
                "host, content-length, x-forwarded-host, x-custom",
            ),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("content-length", "0"),
            ("x-custom", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["host"], "shop.example");
        assert_eq!(h["content-length"], "0");
        assert!(h.get("x-custom").is_none(), "other named headers still go");
        append_forwarded(
            &mut h,
            ForwardedHeaders::XForwarded,
            Some(([10, 0, 0, 1], 1).into()),
            "http",
            false,
        );
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-forwarded-port").is_none());
    }
}
