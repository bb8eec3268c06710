//! Settings as plain data, for configuration files (feature `serde`): what an operator writes
//! about a pool, read with any serde format (TOML, YAML, JSON) and turned into the library's
//! builders.
//!
//! | type | becomes | in a file |
//! |---|---|---|
//! | [`Endpoint`](crate::Endpoint) | itself | `"10.0.0.7:8080"` or `{ addr = "10.0.0.7:8080", id = "api-1", weight = 2, tier = 1 }` |
//! | [`AnyStrategy`](crate::strategy::AnyStrategy) | itself | `"p2c"` (a name of [`AnyStrategy::NAMES`](crate::strategy::AnyStrategy::NAMES)) |
//! | [`CheckConfig`] | a [`HealthChecker`] | `{ kind = "http", path = "/healthz", interval = "2s", timeout = "1s", rise = 2, fall = 3 }` |
//! | [`OutlierConfig`] | an [`OutlierDetection`] | `{ consecutive_failures = 5, base_ejection_time = "30s", failure_percentage = 50 }` |
//! | [`RetryBudgetConfig`] | a [`RetryBudget`] | `{ ttl = "10s", min_per_sec = 10, retry_percent = 0.2 }` |
//! | [`PoolLimits`] | settings of a [`PoolBuilder`] | `{ max_requests_per_endpoint = 256, queue_size = 1024, queue_timeout = "5s" }` |
//!
//! Every field may be left out (it takes the builder's default); an unknown field, a value out
//! of range (a percentage above 100, a weight above [`Endpoint::MAX_WEIGHT`], a zero interval)
//! or an unknown strategy or check kind is an error of the format's deserialiser, which names
//! the field (the `toml` crate says the key and line). Durations are written in human form,
//! as humantime reads them: `"250ms"`, `"5s"`, `"1m 30s"`; they serialise the same way.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use lbkit::config::{CheckConfig, OutlierConfig};
//! use lbkit::{Endpoint, Pool, strategy::AnyStrategy};
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct PoolFile {
//!     strategy: AnyStrategy,
//!     endpoints: Vec<Endpoint>,
//!     check: CheckConfig,
//!     #[serde(default)]
//!     outlier: OutlierConfig,
//! }
//!
//! let file: PoolFile = serde_json::from_str(r#"{
//!     "strategy": "least_connections",
//!     "endpoints": ["127.0.0.1:3001", {"addr": "127.0.0.1:3002", "weight": 2}],
//!     "check": {"kind": "tcp", "interval": "500ms"}
//! }"#)?;
//! assert_eq!(file.endpoints[1].weight(), 2);
//!
//! let pool = Pool::builder(file.strategy).build(|ep| ep.id().clone());
//! pool.extend(file.endpoints);
//! file.check.checker()?.spawn(&pool);
//! file.outlier.detector().spawn(&pool);
//!
//! let bad = serde_json::from_str::<PoolFile>(r#"{"strategy": "fastest", "endpoints": [],
//!     "check": {"kind": "tcp"}}"#);
//! assert!(bad.unwrap_err().to_string().contains("unknown strategy \"fastest\""));
//! # Ok(()) }
//! ```
//!
//! [`Endpoint::MAX_WEIGHT`]: crate::Endpoint::MAX_WEIGHT

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::failover::RetryBudget;
use crate::health::{HealthCheck, HealthChecker, OutlierDetection, TcpCheck};
use crate::pool::PoolBuilder;
use crate::strategy::Strategy;

/// A setting that cannot be used as written, with the field it is about.
///
/// Deserialising checks ranges already; this is for what only building can tell, such as a
/// check kind that needs a cargo feature this build lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    /// The field at fault (such as `"kind"`).
    pub fn field(&self) -> &str {
        self.field
    }

    /// Why the field cannot be used.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// What an active health check asks, and how often: a [`HealthChecker`] in a file.
///
/// `kind` is `"http"` (the default: `GET path`, any 2xx or 3xx, see [`HttpCheck`]), `"grpc"`
/// (`grpc.health.v1`, `SERVING` is up, see [`GrpcCheck`]) or `"tcp"` (a connect); each takes
/// only its own fields (`path`, `host`, `http2` and `expect_status` for `http`, `service` for
/// `grpc`; `port` for all three).
///
/// [`HttpCheck`]: crate::health::HttpCheck
/// [`GrpcCheck`]: crate::health::GrpcCheck
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CheckConfig {
    /// What to ask.
    pub kind: CheckKind,
    /// `http`: the path (and query) asked for (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `http`: the statuses that pass, `[low, high]` inclusive (default `[200, 399]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<[u16; 2]>,
    /// `http`: the `Host` header sent (default: the endpoint's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `http`: speak HTTP/2 only (`true`), HTTP/1.1 only (`false`); default: HTTP/1.1, or h2c
    /// to an endpoint found to speak only HTTP/2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2: Option<bool>,
    /// `grpc`: the service asked about (default `""`: the whole server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port checked, when not the endpoint's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// From the start of one check of an endpoint to the next (default 2 s; not zero).
    #[serde(serialize_with = "humantime_serde::serialize")]
    #[serde(deserialize_with = "positive")]
    pub interval: Duration,
    /// The longest one check may take (default 1 s; not zero).
    #[serde(serialize_with = "humantime_serde::serialize")]
    #[serde(deserialize_with = "positive")]
    pub timeout: Duration,
    /// Passed checks in a row that bring a down endpoint back (default 2; at least 1).
    #[serde(deserialize_with = "at_least_one")]
    pub rise: u32,
    /// Failed checks in a row that mark an endpoint down (default 3; at least 1).
    #[serde(deserialize_with = "at_least_one")]
    pub fall: u32,
}

/// The kinds of [`CheckConfig`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CheckKind {
    /// An HTTP request (feature `http-proxy`).
    #[default]
    Http,
    /// A `grpc.health.v1.Health/Check` call (feature `http-proxy`).
    Grpc,
    /// A TCP connect.
    Tcp,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            kind: CheckKind::Http,
            path: None,
            expect_status: None,
            host: None,
            http2: None,
            service: None,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl CheckConfig {
    /// The checker these settings describe; spawn it on a pool with [`HealthChecker::spawn`].
    /// Fails on a field that does not belong to the kind (a `service` for an `http` check)
    /// and on an `http` or `grpc` check in a build without the `http-proxy` feature.
    pub fn checker(&self) -> Result<HealthChecker<Box<dyn HealthCheck>>, ConfigError> {
        let only = |field: &'static str, set: bool, kind: &str| {
            if set {
                Err(ConfigError {
                    field,
                    reason: format!("only {kind} checks take it"),
                })
            } else {
                Ok(())
            }
        };
        let http = self.kind == CheckKind::Http;
        only("path", !http && self.path.is_some(), "http")?;
        only("host", !http && self.host.is_some(), "http")?;
        only("http2", !http && self.http2.is_some(), "http")?;
        only(
            "expect_status",
            !http && self.expect_status.is_some(),
            "http",
        )?;
        only(
            "service",
            self.kind != CheckKind::Grpc && self.service.is_some(),
            "grpc",
        )?;
        if let Some([lo, hi]) = self.expect_status {
            if lo > hi || !(100..=599).contains(&lo) || !(100..=599).contains(&hi) {
                return Err(ConfigError {
                    field: "expect_status",
                    reason: format!("[{lo}, {hi}] is not a range of statuses from 100 to 599"),
                });
            }
        }
        let check = self.check()?;
        Ok(HealthChecker::new(check)
            .interval(self.interval)
            .timeout(self.timeout)
            .rise(self.rise)
            .fall(self.fall))
    }

    fn check(&self) -> Result<Box<dyn HealthCheck>, ConfigError> {
        match self.kind {
            CheckKind::Tcp => {
                let check = TcpCheck::new();
                Ok(Box::new(match self.port {
                    Some(p) => check.port(p),
                    None => check,
                }))
            }
            #[cfg(feature = "http-proxy")]
            CheckKind::Http => {
                let mut check = crate::health::HttpCheck::get(self.path.as_deref().unwrap_or("/"));
                if let Some([lo, hi]) = self.expect_status {
                    check = check.expect_status(lo..=hi);
                }
                if let Some(host) = &self.host {
                    check = check.host(host);
                }
                if let Some(http2) = self.http2 {
                    check = check.http2(http2);
                }
                if let Some(port) = self.port {
                    check = check.port(port);
                }
                Ok(Box::new(check))
            }
            #[cfg(feature = "http-proxy")]
            CheckKind::Grpc => {
                let mut check = crate::health::GrpcCheck::new()
                    .service(self.service.as_deref().unwrap_or_default());
                if let Some(port) = self.port {
                    check = check.port(port);
                }
                Ok(Box::new(check))
            }
            #[cfg(not(feature = "http-proxy"))]
            CheckKind::Http | CheckKind::Grpc => Err(ConfigError {
                field: "kind",
                reason: "http and grpc checks need lbkit's `http-proxy` feature".to_owned(),
            }),
        }
    }
}

/// Passive outlier detection in a file: an [`OutlierDetection`] (see there for each rule).
/// The defaults are Envoy's, as there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OutlierConfig {
    /// Failed requests in a row that eject an endpoint (default 5; at least 1).
    #[serde(deserialize_with = "at_least_one")]
    pub consecutive_failures: u32,
    /// How often the rate rules are evaluated (default 10 s; not zero).
    #[serde(serialize_with = "humantime_serde::serialize")]
    #[serde(deserialize_with = "positive")]
    pub interval: Duration,
    /// Whether the success-rate rule runs (default `true`).
    pub success_rate: bool,
    /// Ejects an endpoint failing at least this percentage of its requests in an interval
    /// (1 to 100; default: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "some_percent")]
    pub failure_percentage: Option<u8>,
    /// The first ejection's length, doubled at each ejection in a row (default 30 s; not zero).
    #[serde(serialize_with = "humantime_serde::serialize")]
    #[serde(deserialize_with = "positive")]
    pub base_ejection_time: Duration,
    /// The longest ejection (default 300 s).
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// The largest share of the pool ejected at once, in percent (default 10; at most 100).
    #[serde(deserialize_with = "percent")]
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            success_rate: true,
            failure_percentage: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

impl OutlierConfig {
    /// The detector these settings describe; spawn it on a pool with
    /// [`OutlierDetection::spawn`]. Values out of range are clamped, as the builder does.
    pub fn detector(&self) -> OutlierDetection {
        let d = OutlierDetection::new()
            .consecutive_failures(self.consecutive_failures)
            .interval(self.interval)
            .success_rate_ejection(self.success_rate)
            .base_ejection_time(self.base_ejection_time)
            .max_ejection_time(self.max_ejection_time)
            .max_ejection_percent(self.max_ejection_percent);
        match self.failure_percentage {
            Some(p) => d.failure_percentage(p),
            None => d,
        }
    }
}

/// A [`RetryBudget`] in a file: retries allowed as a share of the requests of a sliding
/// window, plus a reserve per second. The defaults are [`RetryBudget::default`]'s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryBudgetConfig {
    /// The window (default 10 s; from 1 to 60 s).
    #[serde(serialize_with = "humantime_serde::serialize")]
    #[serde(deserialize_with = "budget_ttl")]
    pub ttl: Duration,
    /// Retries per second allowed whatever the traffic (default 10).
    pub min_per_sec: u32,
    /// Retries per request of the window (default 0.2: one for every five; 0 to 1000).
    #[serde(deserialize_with = "retry_percent")]
    pub retry_percent: f32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            retry_percent: 0.2,
        }
    }
}

impl RetryBudgetConfig {
    /// The budget these settings describe. Values out of range (possible only when the
    /// struct was filled in by code) are clamped into it rather than panicking.
    pub fn budget(&self) -> RetryBudget {
        let ttl = self
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let percent = if self.retry_percent.is_finite() {
            self.retry_percent.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        RetryBudget::new(ttl, self.min_per_sec, percent)
    }
}

/// A pool's limits in a file: requests in flight per endpoint, the queue of those waiting,
/// and the panic threshold (see [`PoolBuilder`]'s methods of the same names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolLimits {
    /// Requests in flight to one endpoint at most (default 0: no limit).
    pub max_requests_per_endpoint: u64,
    /// Requests waiting for an endpoint under its limit at most (default 1024).
    pub queue_size: u64,
    /// How long a request waits in the queue at most (default 5 s).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Below this percentage of healthy endpoints, all get traffic (default 0: off; at most
    /// 100).
    #[serde(deserialize_with = "percent")]
    pub panic_threshold: u8,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_requests_per_endpoint: 0,
            queue_size: 1024,
            queue_timeout: Duration::from_secs(5),
            panic_threshold: 0,
        }
    }
}

impl<St: Strategy> PoolBuilder<St> {
    /// Applies the limits of a configuration file (see [`PoolLimits`]).
    pub fn limits(self, limits: &PoolLimits) -> Self {
        self.max_requests_per_endpoint(limits.max_requests_per_endpoint)
            .queue_size(limits.queue_size)
            .queue_timeout(limits.queue_timeout)
            .panic_threshold(limits.panic_threshold)
    }
}

// Field checks, run while deserialising so that the format's error names the field.

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = humantime_serde::deserialize(d)?;
    if v == Duration::ZERO {
        return Err(de::Error::custom("must be longer than zero"));
    }
    Ok(v)
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(de::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    match u8::deserialize(d)? {
        p @ 0..=100 => Ok(p),
        p => Err(de::Error::custom(format_args!(
            "{p} is not a percentage (0 to 100)"
        ))),
    }
}

fn some_percent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    match percent(d)? {
        0 => Err(de::Error::custom(
            "must be from 1 to 100 (leave it out for off)",
        )),
        p => Ok(Some(p)),
    }
}

fn budget_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&v) {
        return Err(de::Error::custom(format_args!(
            "{} is not from 1 to 60 seconds",
            humantime_serde::re::humantime::format_duration(v)
        )));
    }
    Ok(v)
}

fn retry_percent<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = f32::deserialize(d)?;
    if !(0.0..=1000.0).contains(&v) {
        return Err(de::Error::custom(format_args!("{v} is not from 0 to 1000")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of reading `text` as a `T`, as text.
    fn error_of<T: serde::de::DeserializeOwned + fmt::Debug>(text: &str) -> String {
        toml::from_str::<T>(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_builders() {
        let c: CheckConfig = toml::from_str("").unwrap();
        assert_eq!(c, CheckConfig::default());
        let o: OutlierConfig = toml::from_str("").unwrap();
        assert_eq!(o, OutlierConfig::default());
        let b: RetryBudgetConfig = toml::from_str("").unwrap();
        assert_eq!(b, RetryBudgetConfig::default());
        let l: PoolLimits = toml::from_str("").unwrap();
        assert_eq!(l, PoolLimits::default());
    }

    #[test]
    fn durations_read_in_human_form_and_round_trip() {
        let c: CheckConfig =
            toml::from_str("kind = \"tcp\"\ninterval = \"250ms\"\ntimeout = \"1m 30s\"").unwrap();
        assert_eq!(c.kind, CheckKind::Tcp);
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.timeout, Duration::from_secs(90));
        let back: CheckConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_values_are_errors_naming_the_field() {
        let err = error_of::<OutlierConfig>;
        let e = err("max_ejection_percent = 150");
        assert!(
            e.contains("max_ejection_percent") && e.contains("not a percentage"),
            "{e}"
        );
        let e = err("interval = \"0s\"");
        assert!(
            e.contains("interval") && e.contains("longer than zero"),
            "{e}"
        );
        let e = err("interval = \"5 parsecs\"");
        assert!(e.contains("interval"), "{e}");
        let e = err("consecutive_failure = 3");
        assert!(e.contains("unknown field `consecutive_failure`"), "{e}");
        let e = error_of::<RetryBudgetConfig>("ttl = \"2m\"");
        assert!(
            e.contains("ttl") && e.contains("from 1 to 60 seconds"),
            "{e}"
        );
        let e = error_of::<CheckConfig>("kind = \"icmp\"");
        assert!(e.contains("kind") && e.contains("icmp"), "{e}");
        let e = error_of::<CheckConfig>("rise = 0");
        assert!(e.contains("rise") && e.contains("at least 1"), "{e}");
    }

    #[test]
    fn fields_of_another_kind_are_refused_when_building() {
        let c: CheckConfig = toml::from_str("kind = \"tcp\"\npath = \"/healthz\"").unwrap();
        let e = c.checker().err().expect("a path on a tcp check");
        assert_eq!(e.field(), "path");
        assert_eq!(e.to_string(), "path: only http checks take it");
        let c: CheckConfig = toml::from_str("expect_status = [300, 200]").unwrap();
        let e = c.checker().err().expect("a backwards range");
        assert_eq!(e.field(), "expect_status");
        let c: CheckConfig = toml::from_str("kind = \"grpc\"\nservice = \"a.B\"").unwrap();
        assert!(c.checker().is_ok());
    }

    #[test]
    fn endpoints_and_strategies_read_from_tables_and_names() {
        #[derive(Debug, Deserialize)]
        struct F {
            strategy: crate::strategy::AnyStrategy,
            endpoints: Vec<crate::Endpoint>,
        }
        let f: F = toml::from_str(
            "strategy = \"peak-ewma\"\nendpoints = [\"127.0.0.1:1\", \
             { addr = \"127.0.0.1:2\", id = \"b\", weight = 3, tier = 1 }, \"name-only\"]",
        )
        .unwrap();
        assert_eq!(f.strategy.name(), "peak_ewma");
        assert_eq!(f.endpoints[1].id().as_str(), "b");
        assert_eq!(f.endpoints[1].weight(), 3);
        assert_eq!(f.endpoints[1].tier(), crate::Tier::BACKUP);
        assert_eq!(f.endpoints[2].socket_addr(), None);
        let e = error_of::<F>("strategy = \"fastest\"\nendpoints = []");
        assert!(
            e.contains("strategy") && e.contains("expected one of"),
            "{e}"
        );
        let e = error_of::<F>(
            "strategy = \"p2c\"\nendpoints = [{ addr = \"127.0.0.1:2\", weight = 20000 }]",
        );
        assert!(e.contains("weight 20000 is too large"), "{e}");
        let e = error_of::<F>("strategy = \"p2c\"\nendpoints = [{ weight = 2 }]");
        assert!(e.contains("needs an addr or an id"), "{e}");
        let e = error_of::<F>("strategy = \"p2c\"\nendpoints = [{ adr = \"x\" }]");
        assert!(e.contains("unknown field `adr`"), "{e}");
    }
}
