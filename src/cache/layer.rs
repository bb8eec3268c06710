use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http_cache_semantics::CachePolicy;
use tower_layer::Layer;

use super::flight::Flights;
use super::service::Cache;
use super::store::Store;

/// A clock for the cache's freshness rules (`SystemTime::now` by default; see
/// [`CacheLayer::clock`]).
pub(super) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub(super) capacity: u64,
    pub(super) max_object: usize,
    pub(super) stale_if_error: Option<Duration>,
    pub(super) store_set_cookie: bool,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) revalidated: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) not_stored: AtomicU64,
    pub(super) passed: AtomicU64,
}

/// What the services of one layer share: the store, the flights, the settings.
pub(super) struct Shared {
    pub(super) store: Store,
    pub(super) flights: Flights,
    pub(super) settings: Settings,
    pub(super) clock: Clock,
    /// Requests waiting for another request's fetch right now.
    pub(super) waiting: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn new(settings: Settings, clock: Clock) -> Self {
        Shared {
            store: Store::new(settings.capacity),
            flights: Flights::new(),
            settings,
            clock,
            waiting: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub(super) fn count(&self, counter: impl FnOnce(&Counters) -> &AtomicU64) {
        counter(&self.counters).fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a response may be stored: the RFC 9111 rules for a shared cache (method,
    /// status, `no-store`, `private`, `Authorization`), plus: no `Vary: *` (it never
    /// matches), and no `Set-Cookie` unless allowed.
    pub(super) fn may_store(&self, policy: &CachePolicy, headers: &HeaderMap) -> bool {
        policy.is_storable()
            && (self.settings.store_set_cookie || !headers.contains_key(header::SET_COOKIE))
            && !headers
                .get_all(header::VARY)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|v| v.trim() == "*")
    }

    pub(super) fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            coalesced: get(&c.coalesced),
            misses: get(&c.misses),
            revalidated: get(&c.revalidated),
            stale: get(&c.stale),
            not_stored: get(&c.not_stored),
            passed: get(&c.passed),
            bytes: self.store.weighted_size(),
            entries: self.store.entry_count(),
            in_flight: self.flights.len() as u64,
            waiting: get(&self.waiting),
        }
    }
}

/// What a cache has done since it was made, and what it holds.
///
/// Requests that reached the backend are `misses + passed`; requests the cache answered
/// without the backend are `hits + coalesced`. `revalidated`, `not_stored` and `stale` count
/// what became of some misses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests answered from a fresh stored response.
    pub hits: u64,
    /// Requests that waited for a concurrent request's fetch of the same response and were
    /// answered with it.
    pub coalesced: u64,
    /// `GET` and `HEAD` requests the cache sent to the backend: fetches and revalidations,
    /// whatever came back.
    pub misses: u64,
    /// Misses that revalidated a stale response (`304 Not Modified`), served again.
    pub revalidated: u64,
    /// Misses answered with a stale response because the backend failed (`stale-if-error`).
    pub stale: u64,
    /// Misses whose response was not stored (not storable, too large, trailers).
    pub not_stored: u64,
    /// Requests passed through untouched (other methods, range requests).
    pub passed: u64,
    /// Bytes held: bodies, headers and a fixed overhead per entry; at most the capacity.
    pub bytes: u64,
    /// Entries held (responses, `Vary` rules, recently uncacheable keys).
    pub entries: u64,
    /// Fetches in progress that other requests may join.
    pub in_flight: u64,
    /// Requests waiting for another request's fetch (coalesced misses) right now.
    pub waiting: u64,
}

/// A [`Layer`] that puts a shared HTTP response cache (RFC 9111) in front of a service,
/// usually a [`Balancer`](crate::Balancer), so repeated requests do not reach the backends.
///
/// What it stores and serves, by the rules of a **shared** cache (the policy is
/// [`http-cache-semantics`](https://docs.rs/http-cache-semantics), a port of the reference
/// JavaScript implementation of RFC 7234/9111):
///
/// - `GET` and `HEAD` responses with a cacheable status, fresh for `s-maxage`, else `max-age`,
///   else until `Expires` (else a heuristic 10 % of the time since `Last-Modified`);
///   `public` makes a response storable without an explicit lifetime;
/// - never stored: `no-store` (request or response), `private`, responses to requests with
///   `Authorization` unless the response says `public`, `s-maxage` or `must-revalidate`
///   (RFC 9111 section 3.5), responses with `Set-Cookie` unless
///   [`store_set_cookie`](Self::store_set_cookie) (a shared cache must not hand one user's
///   cookie to another), `Vary: *`, bodies with trailers, and bodies larger than the
///   [maximum object size](Self::max_object_size) (those stream through);
/// - `Vary`: a response is served only to requests with the same values of the headers it
///   varies on; each combination is stored apart;
/// - `no-cache` (response or request), and stale responses, are revalidated: the request goes
///   to the backend with `If-None-Match` (the stored `ETag`) or `If-Modified-Since` (the
///   stored `Last-Modified`); a `304 Not Modified` refreshes the stored response, which is
///   served; anything else replaces it;
/// - the client's own `If-None-Match`/`If-Modified-Since` are answered by the cache: `304` when
///   they match the response it serves (the backend is asked for the whole response, so a
///   miss fills the cache even for a conditional request);
/// - `Age` on every response served from the cache;
/// - a non-error answer to an unsafe method (`POST`, `PUT`, `DELETE`, ...) drops the stored
///   responses of its URL (RFC 9111 section 4.4);
/// - concurrent misses for one response are coalesced: one request goes to the backend, the
///   others wait for its answer and are served from it when it matches them (a key whose last
///   response could not be stored skips this for 10 s, so uncacheable URLs are not
///   serialized);
/// - optionally, [`stale_if_error`](Self::stale_if_error) (RFC 5861): when the backend fails
///   (an error, or `500`/`502`/`503`/`504`), a stale response is served instead, unless it
///   said `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache`. A response's own
///   `stale-if-error=N` directive applies even when the layer's default is off.
///
/// Range requests and other methods pass through untouched. Memory is bounded by
/// [`new`](Self::new)'s capacity in bytes (bodies, headers and a fixed overhead per entry), with
/// moka's TinyLFU admission and LRU eviction. A hit takes no lock and copies no body: the
/// stored body is a reference-counted [`Bytes`](bytes::Bytes).
///
/// Every service made by one layer (and its clones) shares one cache.
///
/// ```
/// use lbkit::cache::CacheLayer;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cache = CacheLayer::new(64 << 20); // 64 MiB
/// let svc = ServiceBuilder::new()
///     .layer(cache.clone())
///     .service(service_fn(|_req: http::Request<()>| async {
///         let res = http::Response::builder()
///             .header("cache-control", "max-age=60")
///             .body(http_body_util::Full::new(bytes::Bytes::from("hello")))
///             .unwrap();
///         Ok::<_, std::convert::Infallible>(res)
///     }));
/// for _ in 0..3 {
///     let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
///     assert_eq!(res.status(), 200);
/// }
/// // One request went to the inner service; two were answered from the cache.
/// assert_eq!(cache.stats().misses, 1);
/// assert_eq!(cache.stats().hits, 2);
/// # }
/// ```
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl CacheLayer {
    /// The default [maximum object size](CacheLayer::max_object_size): 1 MiB.
    pub const DEFAULT_MAX_OBJECT_SIZE: usize = 1 << 20;

    /// A cache holding at most `capacity` bytes, with the defaults: objects up to
    /// [`DEFAULT_MAX_OBJECT_SIZE`](Self::DEFAULT_MAX_OBJECT_SIZE) (or the capacity, if
    /// smaller), no `stale-if-error` unless a response asks for it, no `Set-Cookie` stored.
    pub fn new(capacity: u64) -> Self {
        let settings = Settings {
            capacity,
            max_object: Self::DEFAULT_MAX_OBJECT_SIZE
                .min(usize::try_from(capacity).unwrap_or(usize::MAX)),
            stale_if_error: None,
            store_set_cookie: false,
        };
        CacheLayer {
            shared: Arc::new(Shared::new(settings, Arc::new(SystemTime::now))),
        }
    }

    fn rebuild(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings;
        change(&mut settings);
        CacheLayer {
            shared: Arc::new(Shared::new(settings, self.shared.clock.clone())),
        }
    }

    /// Sets the largest body stored, in bytes (default
    /// [`DEFAULT_MAX_OBJECT_SIZE`](Self::DEFAULT_MAX_OBJECT_SIZE), 1 MiB, so that one large
    /// download cannot push out many small hot responses, and that a cacheable
    /// response is held in memory only up to that size while it is read). Larger bodies
    /// stream to the client and are not stored. Capped by the capacity.
    ///
    /// Settings apply to a new, empty cache: set them before layering services.
    pub fn max_object_size(self, bytes: usize) -> Self {
        self.rebuild(|s| {
            s.max_object = bytes.min(usize::try_from(s.capacity).unwrap_or(usize::MAX))
        })
    }

    /// Serves a stale stored response for up to `window` past its freshness when the backend
    /// fails (an error, or `500`, `502`, `503`, `504`), as RFC 5861's `stale-if-error` does
    /// (default: off; a response's own `stale-if-error=N` still applies). Never for responses
    /// that forbid stale use (`must-revalidate`, `proxy-revalidate`, `s-maxage`, `no-cache`).
    pub fn stale_if_error(self, window: Duration) -> Self {
        self.rebuild(|s| s.stale_if_error = Some(window))
    }

    /// Stores responses that set cookies (default `false`: a shared cache that stores
    /// `Set-Cookie` hands one client's cookie to every other; allow it only for backends whose
    /// cookies are the same for everyone). The freshness rules still apply: the policy treats
    /// such a response as stale unless it says `public` or `immutable`.
    pub fn store_set_cookie(self, allow: bool) -> Self {
        self.rebuild(|s| s.store_set_cookie = allow)
    }

    /// Replaces the clock that freshness and `Age` are computed with (default
    /// `SystemTime::now`), for tests that move time by hand.
    pub fn clock(self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        let settings = self.shared.settings;
        CacheLayer {
            shared: Arc::new(Shared::new(settings, Arc::new(clock))),
        }
    }

    /// What the cache has done so far and what it holds.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache::new(inner, self.shared.clone())
    }
}
