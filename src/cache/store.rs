//! What the cache keeps: stored responses, `Vary` rules, keys and the bounded store.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_cache_semantics::{CachePolicy, RequestLike};

use super::body::CacheBody;

/// Bytes counted for a stored entry besides its body and headers (the policy, the key, the
/// store's own bookkeeping).
const ENTRY_OVERHEAD: usize = 256;

/// How long a key whose last response could not be stored skips coalescing: its requests go
/// to the backend at once, side by side, instead of one after another behind a leader whose
/// answer they cannot share (Varnish's "hit-for-miss"). A cacheable answer ends it early.
pub(super) const PASS_TTL: Duration = Duration::from_secs(10);

/// Hop-by-hop headers: about one connection, never stored (RFC 9111 section 3.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A stored response: its policy (the RFC 9111 rules of http-cache-semantics), its head and
/// its whole body.
pub(super) struct Stored {
    pub(super) policy: CachePolicy,
    pub(super) status: StatusCode,
    /// The response's headers without hop-by-hop ones and without `Age` (set when served).
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// When it stops being fresh, by the cache's clock.
    fresh_until: SystemTime,
    /// How long past `fresh_until` it may be served when the backend fails; `None`: never.
    stale_if_error: Option<Duration>,
    /// How long the store keeps it: until stale when it has no validator and may not be served
    /// stale (it is useless then), else until evicted.
    keep: Option<Duration>,
    pub(super) weight: u32,
}

impl Stored {
    /// A stored response from a policy, a head and a body (`request`: the request's headers,
    /// which the policy keeps for `Vary`). `None` when it is too heavy to count.
    pub(super) fn new(
        policy: CachePolicy,
        request: &HeaderMap,
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        now: SystemTime,
        stale_if_error: Option<Duration>,
    ) -> Option<Self> {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        headers.remove(header::AGE);
        let ttl = policy.time_to_live(now);
        let cc = CacheControl::parse(&headers);
        // A response's own `stale-if-error=N` (RFC 5861) wins over the layer's default; the
        // RFC 9111 directives that forbid serving stale forbid it on errors too.
        let stale_if_error = if cc.forbids_stale {
            None
        } else {
            cc.stale_if_error.or(stale_if_error)
        };
        let has_validator =
            headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
        let keep = (!has_validator && stale_if_error.is_none()).then_some(ttl);
        let header_bytes: usize = headers
            .iter()
            .chain(request)
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        let weight = u32::try_from(body.len() + header_bytes + ENTRY_OVERHEAD).ok()?;
        Some(Stored {
            policy,
            status,
            headers,
            body,
            fresh_until: now + ttl,
            stale_if_error,
            keep,
            weight,
        })
    }

    /// Worth keeping: fresh for a while, or revalidatable, or servable stale on errors.
    pub(super) fn is_useful(&self, now: SystemTime) -> bool {
        self.fresh_until > now || self.keep.is_none()
    }

    /// Whether it may be served, stale, because the backend failed (`stale-if-error`).
    pub(super) fn serves_stale_on_error(&self, now: SystemTime) -> bool {
        self.stale_if_error.is_some_and(|window| {
            now.duration_since(self.fresh_until)
                .map_or(true, |stale| stale <= window)
        })
    }

    /// The response to a request it matches, with `Age` for `now`.
    pub(super) fn response<B>(&self, now: SystemTime) -> Response<CacheBody<B>> {
        let mut res = Response::new(CacheBody::full(self.body.clone()));
        *res.status_mut() = self.status;
        let mut headers = self.headers.clone();
        headers.insert(header::AGE, age_value(self.policy.age(now)));
        *res.headers_mut() = headers;
        res
    }

    /// The response from the head the policy made (`Age` and `Date` set) and the stored body.
    pub(super) fn with_head<B>(&self, head: http::response::Parts) -> Response<CacheBody<B>> {
        Response::from_parts(head, CacheBody::full(self.body.clone()))
    }
}

fn age_value(age: Duration) -> HeaderValue {
    HeaderValue::from(age.as_secs())
}

/// The few `Cache-Control` response directives the cache reads itself (the policy reads the
/// rest).
struct CacheControl {
    stale_if_error: Option<Duration>,
    /// `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache`: never served stale
    /// (RFC 9111 sections 4.2.4 and 5.2.2).
    forbids_stale: bool,
}

impl CacheControl {
    fn parse(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl {
            stale_if_error: None,
            forbids_stale: false,
        };
        let directives = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        for directive in directives {
            let (name, value) = match directive.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("stale-if-error") {
                cc.stale_if_error = value.and_then(|v| v.parse().ok()).map(Duration::from_secs);
            } else if [
                "must-revalidate",
                "proxy-revalidate",
                "s-maxage",
                "no-cache",
            ]
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d))
            {
                cc.forbids_stale = true;
            }
        }
        cc
    }
}

/// The `Vary` rule of a URL: the request headers its responses vary on. Responses are stored
/// under a key made of the URL's key, the rule's generation and those headers' values.
pub(super) struct VaryRule {
    names: Box<[HeaderName]>,
    generation: u64,
}

/// What the store holds under a key.
#[derive(Clone)]
pub(super) enum Slot {
    /// A response (under a URL's key when it has no `Vary`, else under a variant's key).
    Response(Arc<Stored>),
    /// The URL's responses vary: look under the variant's key.
    Vary(Arc<VaryRule>),
    /// The last response for this key could not be stored: skip coalescing (see [`PASS_TTL`]).
    Pass,
}

/// What a lookup found.
pub(super) struct Found {
    /// The URL's key.
    pub(super) primary: u64,
    /// The key the response is (or would be) stored under: the URL's, or its variant's.
    pub(super) key: u64,
    pub(super) entry: Option<Arc<Stored>>,
    /// Recently not storable: go to the backend without coalescing.
    pub(super) pass: bool,
}

/// The bounded store: moka's concurrent cache weighted by bytes (TinyLFU admission, LRU
/// eviction), keyed by 64-bit hashes of the request (keyed with per-process random keys, so
/// that no one can aim for a collision; a collision would only ever be a miss, since the
/// policy checks the URL, `Host` and `Vary` headers of every response it serves).
pub(super) struct Store {
    cache: moka::sync::Cache<u64, Slot>,
    hasher: RandomState,
    generation: AtomicU64,
}

struct SlotExpiry;

impl SlotExpiry {
    fn expiry(slot: &Slot) -> Option<Duration> {
        match slot {
            Slot::Response(stored) => stored.keep,
            Slot::Vary(_) => None,
            Slot::Pass => Some(PASS_TTL),
        }
    }
}

impl moka::Expiry<u64, Slot> for SlotExpiry {
    fn expire_after_create(&self, _: &u64, slot: &Slot, _: Instant) -> Option<Duration> {
        SlotExpiry::expiry(slot)
    }

    fn expire_after_update(
        &self,
        _: &u64,
        slot: &Slot,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        SlotExpiry::expiry(slot)
    }
}

impl Store {
    pub(super) fn new(capacity: u64) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &u64, slot: &Slot| match slot {
                Slot::Response(stored) => stored.weight,
                Slot::Vary(rule) => (ENTRY_OVERHEAD + rule.names.len() * 32) as u32,
                Slot::Pass => ENTRY_OVERHEAD as u32,
            })
            .expire_after(SlotExpiry)
            .build();
        Store {
            cache,
            hasher: RandomState::new(),
            generation: AtomicU64::new(0),
        }
    }

    /// The key of a request's URL for `method`: scheme, authority (or `Host`), path and query.
    pub(super) fn primary_key<B>(&self, method: &Method, req: &Request<B>) -> u64 {
        let mut h = self.hasher.build_hasher();
        method.as_str().hash(&mut h);
        let uri = req.uri();
        uri.scheme_str().hash(&mut h);
        match req.headers().get(header::HOST) {
            // The policy compares `Host` headers: keep requests with and without one apart.
            Some(host) => (1u8, host.as_bytes()).hash(&mut h),
            None => (0u8, uri.authority().map(|a| a.as_str())).hash(&mut h),
        }
        uri.path_and_query().map(|pq| pq.as_str()).hash(&mut h);
        h.finish()
    }

    fn variant_key(&self, primary: u64, rule: &VaryRule, headers: &HeaderMap) -> u64 {
        let mut h = self.hasher.build_hasher();
        (primary, rule.generation).hash(&mut h);
        for name in &rule.names {
            for value in headers.get_all(name) {
                value.as_bytes().hash(&mut h);
            }
            // Separates the names' values (absent and empty differ).
            0xffu8.hash(&mut h);
        }
        h.finish()
    }

    /// Looks up the response stored for `req`.
    pub(super) fn lookup<B>(&self, primary: u64, req: &Request<B>) -> Found {
        let mut found = Found {
            primary,
            key: primary,
            entry: None,
            pass: false,
        };
        let slot = match self.cache.get(&primary) {
            Some(Slot::Vary(rule)) => {
                found.key = self.variant_key(primary, &rule, req.headers());
                self.cache.get(&found.key)
            }
            slot => slot,
        };
        match slot {
            Some(Slot::Response(stored)) => found.entry = Some(stored),
            Some(Slot::Pass) => found.pass = true,
            Some(Slot::Vary(_)) | None => {}
        }
        found
    }

    /// Stores `stored`, the response to `req` (under its variant's key when it has `Vary`);
    /// returns the key used.
    pub(super) fn insert(&self, primary: u64, req: &impl RequestLike, stored: Arc<Stored>) {
        let names: Vec<HeaderName> = stored
            .headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        if names.is_empty() {
            self.cache.insert(primary, Slot::Response(stored));
            return;
        }
        // Keep the URL's rule (and so its other variants) when the names are the same.
        let rule = match self.cache.get(&primary) {
            Some(Slot::Vary(rule)) if *rule.names == *names => rule,
            _ => {
                let rule = Arc::new(VaryRule {
                    names: names.into_boxed_slice(),
                    generation: self.generation.fetch_add(1, Ordering::Relaxed),
                });
                self.cache.insert(primary, Slot::Vary(rule.clone()));
                rule
            }
        };
        let key = self.variant_key(primary, &rule, req.headers());
        self.cache.insert(key, Slot::Response(stored));
    }

    /// Marks `key` as recently not storable (see [`PASS_TTL`]), replacing what it held.
    pub(super) fn mark_pass(&self, key: u64) {
        self.cache.insert(key, Slot::Pass);
    }

    /// Forgets the responses of a URL (after an unsafe method changed it): its response or
    /// its `Vary` rule, which makes every variant unreachable (a new rule has a new generation).
    pub(super) fn invalidate(&self, primary: u64) {
        self.cache.invalidate(&primary);
    }

    /// Bytes held, after the store's pending evictions.
    pub(super) fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    /// Entries held (responses, `Vary` rules and pass marks), after pending evictions.
    pub(super) fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(value: &'static str) -> CacheControl {
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
        CacheControl::parse(&headers)
    }

    #[test]
    fn stale_if_error_and_the_directives_that_forbid_stale() {
        let c = cc("max-age=60, stale-if-error=300");
        assert_eq!(c.stale_if_error, Some(Duration::from_secs(300)));
        assert!(!c.forbids_stale);
        for forbidding in [
            "max-age=60, must-revalidate",
            "Proxy-Revalidate",
            "s-maxage=10",
            "no-cache",
        ] {
            assert!(cc(forbidding).forbids_stale, "{forbidding}");
        }
        assert_eq!(cc("stale-if-error=\"abc\"").stale_if_error, None);
    }
}
