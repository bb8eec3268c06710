//! The checks behind lbkit's fuzz targets, one function per target, each taking the raw bytes
//! of one input. They call what lbkit does with untrusted input and assert what must hold for
//! any input (no panic, and the properties below); a failed assertion is a crash to libFuzzer.
//!
//! Shared by `fuzz_targets/*.rs` (cargo-fuzz) and by `tests/fuzz_corpus.rs`, which replays
//! `fuzz/corpus/*` through them in a plain `cargo test`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use hickory_proto::op::Message;
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{Name, RData};
use http::header::{HeaderMap, HeaderName, HeaderValue, COOKIE, FORWARDED};
use lbkit::discover::dns::srv_endpoints;
use lbkit::endpoint::{Endpoint, EndpointId};
use lbkit::forwarded::parse::{
    client_from_chain, forwarded_for_nodes, parse_node, x_forwarded_for_nodes,
};
use lbkit::forwarded::{Cidr, ClientAddr, ClientIp, ForwardedHeaders};
use lbkit::hash::stable_hash;
use lbkit::key::{hash_ip, Key};
use lbkit::sticky::{CookieSecret, StickyLayer};

/// The key the sticky seeds were sealed with (`fuzz/corpus/sticky_cookie` holds valid cookies
/// for it, so mutations start from the real format).
pub const STICKY_KEY: [u8; 32] = [0x5a; 32];
/// The cookie name of the sticky target.
pub const STICKY_COOKIE: &str = "lb";

fn sticky() -> &'static StickyLayer {
    static LAYER: OnceLock<StickyLayer> = OnceLock::new();
    // A lifetime of a century: the sealed seeds keep opening, so mutations start from cookies
    // that are valid in every respect.
    LAYER.get_or_init(|| {
        StickyLayer::cookie(STICKY_COOKIE, CookieSecret::from_bytes(STICKY_KEY))
            .lifetime(std::time::Duration::from_secs(100 * 365 * 24 * 3600))
    })
}

/// Splits `data` at `sep` into at most `n` fields.
fn fields(data: &[u8], sep: u8, n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == sep).collect()
}

/// The sticky-session cookie: `StickyLayer::open` on the raw bytes, `endpoint_in` on them as a
/// `Cookie` header, and sealing them as an endpoint id.
///
/// - opening never panics; what opens is an id a cookie can carry (at most 255 bytes);
/// - `endpoint_in` finds the first `lb` cookie that opens among the first 4 `lb` cookies, and
///   nothing else;
/// - any id of up to 255 bytes seals and opens back to itself, under this cookie name only;
///   longer ids do not seal.
pub fn sticky_cookie(data: &[u8]) {
    let layer = sticky();
    if let Some(id) = layer.open(data) {
        assert!(id.as_str().len() <= 255, "opened an id too long to seal");
        // What opens must open again (no hidden state).
        assert_eq!(layer.open(data).as_ref(), Some(&id));
    }

    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, value);
        let found = layer.endpoint_in(&headers);
        // The same search by hand: `name=value` pairs split at `;`, trimmed, quotes removed.
        let expected = data
            .split(|&b| b == b';')
            .filter_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                if pair[..eq].trim_ascii() != STICKY_COOKIE.as_bytes() {
                    return None;
                }
                let v = pair[eq + 1..].trim_ascii();
                Some(match v {
                    [b'"', inner @ .., b'"'] => inner,
                    v => v,
                })
            })
            .take(4)
            .find_map(|v| layer.open(v));
        assert_eq!(found, expected, "endpoint_in disagrees with the cookies");
    }

    if let Ok(text) = std::str::from_utf8(data) {
        let id = EndpointId::new(text);
        match layer.seal(&id) {
            Some(sealed) => {
                assert!(text.len() <= 255);
                assert!(sealed
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                assert_eq!(
                    layer.open(sealed.as_bytes()),
                    Some(id.clone()),
                    "round trip"
                );
                let other = StickyLayer::cookie("other", CookieSecret::from_bytes(STICKY_KEY));
                assert_eq!(
                    other.open(sealed.as_bytes()),
                    None,
                    "opened under another name"
                );
            }
            None => assert!(
                text.len() > 255,
                "an id of {} bytes did not seal",
                text.len()
            ),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// `X-Forwarded-For` and `Forwarded` parsing: the node parsers on the raw bytes, and
/// `ClientIp::resolve` with the bytes as header lines (split at `\n`: odd lines are
/// `X-Forwarded-For` values, even ones `Forwarded`).
///
/// - every parsed address is canonical (an IPv4-mapped IPv6 address reads as IPv4);
/// - `X-Forwarded-For` gives at most one node per comma-separated element, `Forwarded` at most
///   one per element;
/// - the client found in a chain is one of its nodes;
/// - `resolve` gives nothing without a peer, the peer itself when the peer is not trusted
///   (whatever the headers say), and always some address with a peer.
pub fn forwarded(data: &[u8]) {
    let canonical = |ip: &IpAddr| assert_eq!(ip.to_canonical(), *ip, "not canonical: {ip}");
    if let Some(ip) = parse_node(data) {
        canonical(&ip);
    }
    let elements = data.split(|&b| b == b',').count();
    let xff: Vec<Option<IpAddr>> = x_forwarded_for_nodes(data).collect();
    assert!(xff.len() <= elements);
    xff.iter().flatten().for_each(canonical);
    let fwd: Vec<Option<IpAddr>> = forwarded_for_nodes(data).collect();
    assert!(fwd.len() <= elements);
    fwd.iter().flatten().for_each(canonical);

    let private: Cidr = "10.0.0.0/8".parse().expect("cidr");
    for chain in [&xff, &fwd] {
        for trusted in [
            &(|_: IpAddr| true) as &dyn Fn(IpAddr) -> bool,
            &|_: IpAddr| false,
            &|ip: IpAddr| private.contains(ip),
        ] {
            if let Some(client) = client_from_chain(chain.iter().copied(), trusted) {
                assert!(
                    chain.contains(&Some(client)),
                    "client {client} not in the chain"
                );
            }
        }
    }

    let mut headers = HeaderMap::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let Ok(value) = HeaderValue::from_bytes(line) else {
            continue;
        };
        let name = if i % 2 == 0 {
            HeaderName::from_static("x-forwarded-for")
        } else {
            FORWARDED
        };
        headers.append(name, value);
    }
    let proxy = ip("10.0.0.1");
    let outsider = ip("192.0.2.1");
    for kind in [
        ForwardedHeaders::XForwarded,
        ForwardedHeaders::Forwarded,
        ForwardedHeaders::Both,
        ForwardedHeaders::None,
    ] {
        let client_ip = ClientIp::trusting([private]).header(kind);
        assert_eq!(client_ip.resolve(&headers, None), None);
        assert_eq!(client_ip.resolve(&headers, Some(outsider)), Some(outsider));
        let found = client_ip
            .resolve(&headers, Some(proxy))
            .expect("an address");
        canonical(&found);
        assert_eq!(ClientIp::peer().resolve(&headers, Some(proxy)), Some(proxy));
    }
}

/// Hash-key extraction over a request built from the bytes: fields split at `\n` are the
/// request target (path and query), an `x-user` header, a `Cookie` header, an
/// `X-Forwarded-For` header and a `Forwarded` header; fields that are not valid there are left
/// out.
///
/// - every key is deterministic, and equal to the hash of the bytes it names;
/// - `a.or(b)` is `a`, else `b`;
/// - the path key always exists; the client-IP key exists (the request has a peer).
pub fn hash_key(data: &[u8]) {
    let f = fields(data, b'\n', 5);
    let field = |i: usize| f.get(i).copied().unwrap_or_default();
    let uri = std::str::from_utf8(field(0))
        .ok()
        .and_then(|s| s.parse::<http::Uri>().ok())
        .filter(|u| u.path().starts_with('/'))
        .unwrap_or_else(|| http::Uri::from_static("/"));
    let mut builder = http::Request::get(uri.clone());
    for (i, name) in [
        (1, "x-user"),
        (2, "cookie"),
        (3, "x-forwarded-for"),
        (4, "forwarded"),
    ] {
        if let Ok(v) = HeaderValue::from_bytes(field(i)) {
            builder = builder.header(name, v);
        }
    }
    let mut req = builder.body(()).expect("request from valid parts");
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40000);
    req.extensions_mut().insert(ClientAddr(peer));

    let keys = [
        Key::header("x-user"),
        Key::cookie("sid"),
        Key::path(),
        Key::query("user"),
        Key::query(""),
        Key::client_ip(),
        Key::client_ip_trusting(["10.0.0.0/8".parse::<Cidr>().expect("cidr")]),
        Key::from(ClientIp::trusting([peer.ip()]).header(ForwardedHeaders::Both)),
        Key::cookie("sid")
            .or(Key::header("x-user"))
            .or(Key::client_ip()),
    ];
    for key in &keys {
        assert_eq!(
            key.extract(&req),
            key.extract(&req),
            "{key:?} not deterministic"
        );
    }
    let [header, cookie, path, query, _, client, trusting, both, chain] = &keys;
    assert_eq!(
        header.extract(&req),
        req.headers()
            .get("x-user")
            .map(|v| stable_hash(v.as_bytes()))
    );
    assert_eq!(path.extract(&req), Some(stable_hash(uri.path().as_bytes())));
    let user = uri.query().and_then(|q| {
        q.split('&').find_map(|pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (n == "user").then(|| stable_hash(v.as_bytes()))
        })
    });
    assert_eq!(query.extract(&req), user);
    assert_eq!(client.extract(&req), Some(hash_ip(peer.ip())));
    assert!(trusting.extract(&req).is_some());
    assert!(both.extract(&req).is_some());
    let expected = cookie
        .extract(&req)
        .or_else(|| header.extract(&req))
        .or_else(|| client.extract(&req));
    assert_eq!(chain.extract(&req), expected, "or() chain");
}

/// A reader of the structured input of [`dns_srv`].
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
}

/// The target names of the structured input.
fn target(i: u8) -> Name {
    match i % 5 {
        0 => Name::root(),
        i => Name::from_ascii(format!("t{i}.fuzz.test.")).expect("name"),
    }
}

/// DNS SRV handling: the answer's records turned into endpoints (`srv_endpoints`, what
/// `DnsDiscovery::srv` applies to a pool), from either a DNS message (first byte even: the
/// rest is a wire-format message, parsed with hickory-proto as the resolver does; its SRV
/// answers are the records, its A/AAAA answers and additionals the targets' addresses), or a
/// compact form (first byte odd: a count, records of 7 bytes — priority, weight, port,
/// target — then addresses of 5 bytes — target, IPv4).
///
/// - a good answer is exactly the endpoints, tiers and weights that the documented SRV rules
///   give, computed here on their own ([`srv_rules`]); a tier may be left empty when every
///   address of its priority is also reached from a lower one (harmless: the pool uses the
///   lowest tier with a healthy endpoint);
/// - anything else is an empty answer or one with no usable record (so the pool is kept), and
///   only when the rules give no endpoint.
pub fn dns_srv(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut records: Vec<SRV> = Vec::new();
    let mut addrs: HashMap<Name, Vec<IpAddr>> = HashMap::new();
    if mode % 2 == 0 {
        let Ok(msg) = Message::from_vec(rest) else {
            return;
        };
        for r in msg.answers().iter().chain(msg.additionals()) {
            match r.data() {
                RData::SRV(srv) => records.push(srv.clone()),
                RData::A(a) => addrs
                    .entry(r.name().clone())
                    .or_default()
                    .push(IpAddr::V4(a.0)),
                RData::AAAA(a) => addrs
                    .entry(r.name().clone())
                    .or_default()
                    .push(IpAddr::V6(a.0)),
                _ => {}
            }
        }
    } else {
        let mut input = Bytes(rest);
        let n = input.u8().unwrap_or(0) % 16;
        for _ in 0..n {
            let (Some(priority), Some(weight), Some(port), Some(t)) =
                (input.u16(), input.u16(), input.u16(), input.u8())
            else {
                break;
            };
            records.push(SRV::new(priority, weight, port, target(t)));
        }
        while let (Some(t), Some(a), Some(b), Some(c), Some(d)) =
            (input.u8(), input.u8(), input.u8(), input.u8(), input.u8())
        {
            let ip = IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            addrs.entry(target(t)).or_default().push(ip);
        }
    }

    let want = srv_rules(&records, &addrs);
    match srv_endpoints("_http._tcp.fuzz.test.", &records, &addrs) {
        Ok(endpoints) => {
            let got: Vec<(SocketAddr, u8, u32)> = endpoints
                .iter()
                .map(|e| {
                    let sa = e.socket_addr().expect("an address");
                    assert_eq!(e.id().as_str(), sa.to_string());
                    (sa, e.tier().0, e.weight())
                })
                .collect();
            assert!(!got.is_empty(), "a good answer without endpoints");
            assert_eq!(got, want, "endpoints differ from the SRV rules");
        }
        Err(e) => {
            assert!(
                e.is_empty_answer() || e.is_bad_record(),
                "unexpected error kind: {e:?}"
            );
            assert!(want.is_empty(), "no endpoints, expected {want:?}");
        }
    }
}

/// The endpoints the rules of `DnsDiscovery::srv` give, computed here on their own, as
/// (socket address, tier, weight) sorted by address: the live records offer a service (a
/// port, a target other than `"."`) and have a target with a usable address; tiers rank the
/// priorities of the live records (the lowest is 0); each socket address gets the lowest tier
/// of the records reaching it, and the weights (0 counting as 1) of that tier's records added
/// up, clamped to 1..=`MAX_WEIGHT`.
fn srv_rules(records: &[SRV], addrs: &HashMap<Name, Vec<IpAddr>>) -> Vec<(SocketAddr, u8, u32)> {
    // Canonical (IPv4-mapped as IPv4); never unspecified, multicast, broadcast, loopback or
    // link-local (the default of `DnsDiscovery::allow_local`).
    let usable = |ip: &IpAddr| -> Option<IpAddr> {
        let ip = ip.to_canonical();
        let bad = match ip {
            IpAddr::V4(v4) => {
                v4.is_unspecified()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.is_loopback()
                    || v4.is_link_local()
            }
            IpAddr::V6(v6) => {
                v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_loopback()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        (!bad).then_some(ip)
    };
    let ips_of = |r: &SRV| -> Vec<IpAddr> {
        addrs
            .get(r.target())
            .map(|ips| ips.iter().filter_map(usable).collect())
            .unwrap_or_default()
    };
    let live: Vec<&SRV> = records
        .iter()
        .filter(|r| r.port() != 0 && !r.target().is_root() && !ips_of(r).is_empty())
        .collect();
    let mut priorities: Vec<u16> = live.iter().map(|r| r.priority()).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let rank = |p: u16| {
        priorities
            .iter()
            .position(|&q| q == p)
            .expect("live priority") as u8
    };
    // Socket address -> (tier, summed weight).
    let mut by_addr: std::collections::BTreeMap<SocketAddr, (u8, u32)> = Default::default();
    for r in &live {
        for ip in ips_of(r) {
            let tier = rank(r.priority());
            let weight = u32::from(r.weight()).max(1);
            let e = by_addr
                .entry(SocketAddr::new(ip, r.port()))
                .or_insert((tier, 0));
            if tier < e.0 {
                *e = (tier, weight);
            } else if tier == e.0 {
                e.1 = e.1.saturating_add(weight);
            }
        }
    }
    by_addr
        .into_iter()
        .map(|(sa, (tier, w))| (sa, tier, w.clamp(1, Endpoint::MAX_WEIGHT)))
        .collect()
}

/// The request and response header rewriting of the proxy: the input's first byte chooses the
/// forwarding headers written and whether the peer is a trusted proxy; the rest is header lines
/// (`name: value`, split at `\n`; invalid lines are skipped) put through `remove_hop_by_hop`
/// and `append_forwarded` as a request, and through `hide_backend_authority` as a response.
///
/// - no standard hop-by-hop header is left, nor any header a `Connection` value named, except
///   the end-to-end ones a client must not be able to strip;
/// - `Host`, `Authorization` and `Cookie` come out as they went in;
/// - from an untrusted peer, the forwarding headers are the proxy's alone: `X-Forwarded-For` is
///   the peer, `X-Forwarded-Host` the `Host` (or absent), `X-Forwarded-Proto` this hop's
///   scheme, `Forwarded` one element for the peer, and no `X-Forwarded-Port` or `X-Real-IP`;
/// - from a trusted peer, the chain ends with the peer;
/// - after `hide_backend_authority`, no `Location` names the backend's authority.
pub fn headers(data: &[u8]) {
    use lbkit::forwarded::append_forwarded;
    use lbkit::proxy::headers::{
        hide_backend_authority, remove_hop_by_hop, HOP_BY_HOP, NEVER_HOP_BY_HOP,
    };

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let kind = match mode & 3 {
        0 => ForwardedHeaders::XForwarded,
        1 => ForwardedHeaders::Forwarded,
        2 => ForwardedHeaders::Both,
        _ => ForwardedHeaders::None,
    };
    let trusted = mode & 4 != 0;
    let peer: SocketAddr = if mode & 8 != 0 {
        "[2001:db8::7]:4711".parse().expect("addr")
    } else {
        "192.0.2.7:4711".parse().expect("addr")
    };

    let mut headers = HeaderMap::new();
    for line in rest.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let kept = |h: &HeaderMap, name: &str| -> Vec<HeaderValue> {
        h.get_all(name).iter().cloned().collect()
    };
    let protected = ["host", "authorization", "cookie"];
    let before: Vec<Vec<HeaderValue>> = protected.iter().map(|n| kept(&headers, n)).collect();
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();

    let mut request = headers.clone();
    remove_hop_by_hop(&mut request, false);
    for name in &HOP_BY_HOP {
        assert!(!request.contains_key(name), "{name} left");
    }
    for name in &named {
        if !NEVER_HOP_BY_HOP.contains(&name.as_str()) {
            assert!(!request.contains_key(name.as_str()), "named {name} left");
        }
    }
    append_forwarded(&mut request, kind, Some(peer), "http", trusted);
    for (name, was) in protected.iter().zip(&before) {
        assert_eq!(&kept(&request, name), was, "{name} changed");
    }
    let ip = peer.ip().to_string();
    if !trusted {
        assert!(!request.contains_key("x-forwarded-port"));
        assert!(!request.contains_key("x-real-ip"));
        let xff = kept(&request, "x-forwarded-for");
        let fwd = kept(&request, "forwarded");
        if matches!(kind, ForwardedHeaders::XForwarded | ForwardedHeaders::Both) {
            assert_eq!(xff, [HeaderValue::from_str(&ip).expect("ip")]);
            assert_eq!(kept(&request, "x-forwarded-proto"), ["http"]);
            let host = kept(&request, "host");
            let xfh = kept(&request, "x-forwarded-host");
            match host.first() {
                Some(h) => assert_eq!(xfh, std::slice::from_ref(h)),
                None => assert!(xfh.is_empty()),
            }
        } else {
            assert!(xff.is_empty());
            assert!(!request.contains_key("x-forwarded-host"));
        }
        if matches!(kind, ForwardedHeaders::Forwarded | ForwardedHeaders::Both) {
            assert_eq!(fwd.len(), 1);
            let value = fwd[0].to_str().expect("ascii");
            // One element, this hop's: it starts the value (no earlier chain is kept), and
            // only its own `host` (quoted, so it may hold commas) follows.
            let node = match peer.ip() {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
            };
            let ours = format!("for={node};proto=http");
            let rest = value.strip_prefix(&ours);
            assert!(
                rest.is_some_and(|r| r.is_empty() || r.starts_with(";host=")),
                "one element: {value}"
            );
        } else {
            assert!(fwd.is_empty());
        }
    } else if matches!(kind, ForwardedHeaders::XForwarded | ForwardedHeaders::Both) {
        // Kept chains are appended to; an unreadable one is replaced.
        let xff = request
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .expect("x-forwarded-for written");
        assert!(xff.ends_with(&ip), "{xff}");
    }

    let backend: http::uri::Authority = "10.0.0.9:8080".parse().expect("authority");
    let mut response = headers;
    hide_backend_authority(&mut response, &backend);
    // The (one) `Location` and `Content-Location` of an answer: an http(s) URI naming the
    // backend is made relative.
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        let Some(v) = response.get(&name) else {
            continue;
        };
        let value = v.to_str().unwrap_or("");
        let uri = value.split_once('#').map_or(value, |(u, _)| u);
        if let Ok(uri) = uri.parse::<http::Uri>() {
            let web = uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"));
            if web {
                assert_ne!(uri.authority(), Some(&backend), "{name} names the backend");
            }
        }
    }
}

/// The PROXY protocol header parser (`ppp`, through lbkit's bounds): never panics; a header
/// lbkit encodes for an address parses back to that address; what parses from the input is
/// within the bounds (a v1 line of at most 107 bytes, a v2 payload of at most 4 KiB).
pub fn proxy_protocol(data: &[u8]) {
    use lbkit::server::{encode_v2, parse_header};
    if parse_header(data).is_ok() {
        assert!(data.len() <= 16 + 4096, "accepted {} bytes", data.len());
    }
    // Round trip: the first 36 bytes choose two addresses.
    if data.len() >= 36 {
        let v6 = |b: &[u8]| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16"));
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let client = SocketAddr::from((v6(&data[0..16]).to_canonical(), port(&data[32..34])));
        let local = SocketAddr::from((v6(&data[16..32]).to_canonical(), port(&data[34..36])));
        let header = encode_v2(client, local).expect("encode");
        let parsed = parse_header(&header).expect("lbkit's own header parses");
        if client.is_ipv4() == local.is_ipv4() {
            assert_eq!(parsed, Some(client));
        }
    }
}
