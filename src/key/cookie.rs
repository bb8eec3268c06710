//! Reading cookies from request headers, without allocating.

use http::header::{HeaderMap, COOKIE};

/// The values of every cookie named `name` in the `Cookie` headers, in order (HTTP/2 may
/// split cookies over several header lines). Values are raw bytes: a double-quoted value has
/// its quotes removed, nothing else is decoded. Malformed pairs are skipped.
pub(crate) fn cookie_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            if pair[..eq].trim_ascii() != name.as_bytes() {
                return None;
            }
            let value = pair[eq + 1..].trim_ascii();
            Some(match value {
                [b'"', inner @ .., b'"'] => inner,
                v => v,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cookies_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; lb=xyz; LB=no".parse().unwrap());
        h.append(COOKIE, "junk; lb=\"q\"; =; lb=".parse().unwrap());
        let v: Vec<&[u8]> = cookie_values(&h, "lb").collect();
        assert_eq!(v, [&b"xyz"[..], b"q", b""]);
        assert_eq!(cookie_values(&h, "none").count(), 0);
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            http::HeaderValue::from_bytes(b"lb=\xff\xfe; x=1").unwrap(),
        );
        assert_eq!(cookie_values(&h, "lb").next(), Some(&b"\xff\xfe"[..]));
    }
}
