//! Metrics export through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`).
//!
//! A [`MetricsExporter`] reads [`Pool::stats`] and records it as counters, gauges and
//! histograms with the names and labels below; the recorder you install (Prometheus,
//! StatsD, OpenTelemetry, ... through their `metrics` exporters) decides where they go.
//! [`MetricsExporter::spawn`] does this every interval in a background task that ends by
//! itself when the pool is dropped; [`MetricsExporter::export`] does it once (for example just
//! before a scrape). Nothing is added to the request path: the exporter reads the same atomic
//! counters and latency histograms the balancer keeps anyway.
//!
//! Install the recorder before exporting: what is recorded while none is installed is lost.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `lbkit_requests_total` | counter | `pool`, `endpoint` | requests sent to the endpoint |
//! | `lbkit_errors_total` | counter | `pool`, `endpoint` | requests to it that failed (errors, and failure statuses of HTTP balancers) |
//! | `lbkit_in_flight` | gauge | `pool`, `endpoint` | requests in flight to it |
//! | `lbkit_latency_seconds` | histogram | `pool`, `endpoint` | latency of its finished requests |
//! | `lbkit_latency_ewma_seconds` | gauge | `pool`, `endpoint` | its peak-EWMA latency estimate |
//! | `lbkit_endpoint_healthy` | gauge | `pool`, `endpoint` | 1 if healthy, 0 if down or ejected |
//! | `lbkit_endpoint_eligible` | gauge | `pool`, `endpoint` | 1 if it may get requests now |
//! | `lbkit_consecutive_failures` | gauge | `pool`, `endpoint` | failed requests in a row |
//! | `lbkit_weight` | gauge | `pool`, `endpoint` | its configured weight |
//! | `lbkit_effective_weight` | gauge | `pool`, `endpoint` | the weight in force (less during slow start, 0 when not eligible) |
//! | `lbkit_pool_in_flight` | gauge | `pool` | requests in flight over the pool |
//! | `lbkit_pool_endpoints` | gauge | `pool` | endpoints in the pool |
//! | `lbkit_pool_eligible_endpoints` | gauge | `pool` | endpoints that may get requests now |
//! | `lbkit_pool_panic` | gauge | `pool` | 1 while the pool is in panic (too few healthy endpoints) |
//! | `lbkit_pool_info` | gauge | `pool`, `strategy` | always 1; names the pool's strategy |
//!
//! `pool` is the name given to [`MetricsExporter::new`]; `endpoint` is the endpoint's id.
//! Latencies are fed to the histogram from each endpoint's latency histogram: the
//! requests that ended since the last export, each at the middle of its bucket (within
//! 12.5 % of its latency). Counters only go up: an endpoint removed and added again goes on
//! from where its series was. When an endpoint leaves the pool its gauges drop to 0 and it
//! is no longer exported (a Prometheus exporter's idle timeout can then drop its series).
//!
//! With `metrics-exporter-prometheus`, give `lbkit_latency_seconds` buckets
//! (`PrometheusBuilder::set_buckets_for_metric`) to export a Prometheus histogram, which can be
//! aggregated across instances; `examples/metrics.rs` serves one.
//!
//! ```
//! use std::time::Duration;
//! use lbkit::{Balancer, metrics::MetricsExporter, strategy::PowerOfTwoChoices};
//! use tower::service_fn;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // First install a recorder, e.g. metrics_exporter_prometheus::PrometheusBuilder.
//! let balancer = Balancer::new(["a:80", "b:80"], PowerOfTwoChoices::new(), |_| {
//!     service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     })
//! });
//! let task = MetricsExporter::new("api").spawn(balancer.pool(), Duration::from_secs(5));
//! drop(balancer); // the task ends with the pool
//! task.await;
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Label, Unit,
};

use crate::endpoint::HistogramSnapshot;
use crate::endpoint::{EndpointId, EndpointState, Health};
use crate::pool::{Pool, PoolTask};
use crate::strategy::Strategy;

/// The exported metrics' names, as in the [module docs](self).
mod names {
    /// Requests sent to an endpoint (counter).
    pub(crate) const REQUESTS: &str = "lbkit_requests_total";
    /// Failed requests of an endpoint (counter).
    pub(crate) const ERRORS: &str = "lbkit_errors_total";
    /// Requests in flight to an endpoint (gauge).
    pub(crate) const IN_FLIGHT: &str = "lbkit_in_flight";
    /// Latency of an endpoint's finished requests (histogram, seconds).
    pub(crate) const LATENCY: &str = "lbkit_latency_seconds";
    /// An endpoint's peak-EWMA latency estimate (gauge, seconds).
    pub(crate) const LATENCY_EWMA: &str = "lbkit_latency_ewma_seconds";
    /// 1 if an endpoint is healthy, else 0 (gauge).
    pub(crate) const HEALTHY: &str = "lbkit_endpoint_healthy";
    /// 1 if an endpoint may get requests now, else 0 (gauge).
    pub(crate) const ELIGIBLE: &str = "lbkit_endpoint_eligible";
    /// An endpoint's failed requests in a row (gauge).
    pub(crate) const CONSECUTIVE_FAILURES: &str = "lbkit_consecutive_failures";
    /// An endpoint's configured weight (gauge).
    pub(crate) const WEIGHT: &str = "lbkit_weight";
    /// An endpoint's weight in force (gauge).
    pub(crate) const EFFECTIVE_WEIGHT: &str = "lbkit_effective_weight";
    /// Requests in flight over a pool (gauge).
    pub(crate) const POOL_IN_FLIGHT: &str = "lbkit_pool_in_flight";
    /// Endpoints in a pool (gauge).
    pub(crate) const POOL_ENDPOINTS: &str = "lbkit_pool_endpoints";
    /// Endpoints of a pool that may get requests now (gauge).
    pub(crate) const POOL_ELIGIBLE: &str = "lbkit_pool_eligible_endpoints";
    /// 1 while a pool is in panic (gauge).
    pub(crate) const POOL_PANIC: &str = "lbkit_pool_panic";
    /// Always 1, labelled with the pool's strategy (gauge).
    pub(crate) const POOL_INFO: &str = "lbkit_pool_info";
}

/// What was exported of one endpoint last time.
struct Exported {
    /// The endpoint state the numbers came from (a new state starts from zero).
    state: Weak<EndpointState>,
    requests: u64,
    errors: u64,
    histogram: HistogramSnapshot,
    labels: Vec<Label>,
}

/// Records a pool's statistics through the `metrics` facade. See the [module docs](self) for
/// the names and labels.
pub struct MetricsExporter {
    pool: String,
    exported: HashMap<EndpointId, Exported>,
}

impl fmt::Debug for MetricsExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsExporter")
            .field("pool", &self.pool)
            .field("endpoints", &self.exported.len())
            .finish()
    }
}

impl MetricsExporter {
    /// An exporter whose metrics carry the label `pool = name`, and describes the metrics
    /// (units and help texts) to the installed recorder.
    pub fn new(name: impl Into<String>) -> Self {
        describe();
        MetricsExporter {
            pool: name.into(),
            exported: HashMap::new(),
        }
    }

    /// Records the pool's statistics now: counters by what was added since the last export,
    /// gauges at their current values, latencies of the requests that ended since then.
    pub fn export<S: Clone, St: Strategy>(&mut self, pool: &Pool<S, St>) {
        let stats = pool.stats();
        let states: HashMap<EndpointId, Arc<EndpointState>> = pool
            .endpoints()
            .into_iter()
            .map(|(e, s)| (e.id().clone(), s))
            .collect();
        let pool_labels = [Label::new("pool", self.pool.clone())];
        gauge!(names::POOL_IN_FLIGHT, pool_labels.iter()).set(stats.in_flight as f64);
        gauge!(names::POOL_ENDPOINTS, pool_labels.iter()).set(stats.endpoints.len() as f64);
        gauge!(names::POOL_ELIGIBLE, pool_labels.iter()).set(stats.eligible() as f64);
        gauge!(names::POOL_PANIC, pool_labels.iter()).set(f64::from(u8::from(stats.panic)));
        let info = [
            Label::new("pool", self.pool.clone()),
            Label::new("strategy", stats.strategy),
        ];
        gauge!(names::POOL_INFO, info.iter()).set(1.0);

        let mut gone: Vec<EndpointId> = self.exported.keys().cloned().collect();
        for ep in &stats.endpoints {
            gone.retain(|id| id != &ep.id);
            let state = states.get(&ep.id).map(Arc::downgrade);
            let pool_name = &self.pool;
            let last = self
                .exported
                .entry(ep.id.clone())
                .or_insert_with(|| Exported {
                    state: Weak::new(),
                    requests: 0,
                    errors: 0,
                    histogram: HistogramSnapshot::default(),
                    labels: vec![
                        Label::new("pool", pool_name.clone()),
                        Label::new("endpoint", ep.id.to_string()),
                    ],
                });
            if let Some(state) = state {
                if !last.state.ptr_eq(&state) {
                    // A new endpoint, or one removed and added again: its counts start at 0.
                    last.state = state;
                    last.requests = 0;
                    last.errors = 0;
                    last.histogram = HistogramSnapshot::default();
                }
            }
            let labels = &last.labels;
            counter!(names::REQUESTS, labels.iter())
                .increment(ep.requests.saturating_sub(last.requests));
            counter!(names::ERRORS, labels.iter()).increment(ep.errors.saturating_sub(last.errors));
            let latency = histogram!(names::LATENCY, labels.iter());
            for (lo, hi, n) in ep.histogram.since(&last.histogram).buckets() {
                let mid = (lo.as_secs_f64() + hi.as_secs_f64()) / 2.0;
                latency.record_many(mid, usize::try_from(n).unwrap_or(usize::MAX));
            }
            gauge!(names::IN_FLIGHT, labels.iter()).set(ep.in_flight as f64);
            gauge!(names::LATENCY_EWMA, labels.iter()).set(ep.latency_ewma.as_secs_f64());
            let healthy = ep.health == Health::Healthy;
            gauge!(names::HEALTHY, labels.iter()).set(f64::from(u8::from(healthy)));
            gauge!(names::ELIGIBLE, labels.iter()).set(f64::from(u8::from(ep.eligible)));
            gauge!(names::CONSECUTIVE_FAILURES, labels.iter())
                .set(f64::from(ep.consecutive_failures));
            gauge!(names::WEIGHT, labels.iter()).set(f64::from(ep.weight));
            gauge!(names::EFFECTIVE_WEIGHT, labels.iter()).set(ep.effective_weight);
            last.requests = ep.requests;
            last.errors = ep.errors;
            last.histogram = ep.histogram.clone();
        }
        for id in gone {
            if let Some(last) = self.exported.remove(&id) {
                for name in [
                    names::IN_FLIGHT,
                    names::HEALTHY,
                    names::ELIGIBLE,
                    names::CONSECUTIVE_FAILURES,
                    names::EFFECTIVE_WEIGHT,
                ] {
                    gauge!(name, last.labels.iter()).set(0.0);
                }
            }
        }
    }

    /// Exports the pool's statistics every `interval` (at least 10 ms) in a background task,
    /// starting now. The task holds no strong reference to the pool: it ends by itself once
    /// every [`Pool`] and balancer over it is dropped. Must be called within a tokio runtime.
    pub fn spawn<S, St>(mut self, pool: &Pool<S, St>, interval: Duration) -> PoolTask
    where
        S: Clone + Send + Sync + 'static,
        St: Strategy,
    {
        let weak = pool.downgrade();
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let join = tokio::spawn(async move {
            loop {
                ticks.tick().await;
                let Some(pool) = weak.upgrade() else {
                    return;
                };
                self.export(&pool);
            }
        });
        PoolTask::new(join)
    }
}

/// Units and help texts, for recorders that show them (Prometheus' `# HELP`).
fn describe() {
    describe_counter!(names::REQUESTS, "Requests sent to the endpoint.");
    describe_counter!(names::ERRORS, "Requests to the endpoint that failed.");
    describe_gauge!(names::IN_FLIGHT, "Requests in flight to the endpoint.");
    describe_histogram!(
        names::LATENCY,
        Unit::Seconds,
        "Latency of the endpoint's finished requests."
    );
    describe_gauge!(
        names::LATENCY_EWMA,
        Unit::Seconds,
        "Peak-EWMA latency estimate of the endpoint."
    );
    describe_gauge!(
        names::HEALTHY,
        "1 if the endpoint is healthy, 0 if marked down or ejected."
    );
    describe_gauge!(names::ELIGIBLE, "1 if the endpoint may get requests now.");
    describe_gauge!(
        names::CONSECUTIVE_FAILURES,
        "Failed requests of the endpoint in a row."
    );
    describe_gauge!(names::WEIGHT, "Configured weight of the endpoint.");
    describe_gauge!(
        names::EFFECTIVE_WEIGHT,
        "Weight of the endpoint in force (reduced during slow start, 0 when not eligible)."
    );
    describe_gauge!(names::POOL_IN_FLIGHT, "Requests in flight over the pool.");
    describe_gauge!(names::POOL_ENDPOINTS, "Endpoints in the pool.");
    describe_gauge!(
        names::POOL_ELIGIBLE,
        "Endpoints of the pool that may get requests now."
    );
    describe_gauge!(
        names::POOL_PANIC,
        "1 while the pool is in panic (too few healthy endpoints, all get traffic)."
    );
    describe_gauge!(
        names::POOL_INFO,
        "Always 1; labelled with the pool's strategy."
    );
}
