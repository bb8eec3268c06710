//! Observability: `Pool::stats` reflects traffic sent through real local servers (counts,
//! errors against a dead endpoint, in flight during slow requests, latency quantiles, health
//! after `set_down`, slow start's effective weight); the balancer's tracing span carries the
//! strategy, attempt and endpoint, and costs no allocation when its level is off; the metrics
//! exporter writes the documented names and labels.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ask, balancer, dead_addr, endpoints, start_servers, wait_until, within, HANG};
use lbkit::endpoint::Health;
use lbkit::health::SlowStart;
use lbkit::metrics::MetricsExporter;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, Endpoint, PickHints};
use tower::{service_fn, Service, ServiceExt};

/// Bound on a whole test; only catches a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// The histogram's resolution: a quantile is within 12.5 % of a recorded value.
fn with_resolution(d: Duration) -> Duration {
    d + d / 8
}

#[tokio::test]
async fn stats_count_requests_and_latencies() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let balancer = balancer(endpoints(&servers), RoundRobin::new());
        let before = balancer.pool().stats();
        assert_eq!(before.requests(), 0);
        assert!(before.endpoints.iter().all(|e| e.latency.count == 0));

        let started = Instant::now();
        for _ in 0..30 {
            ask(&balancer).await.expect("an answer");
        }
        // No request took longer than all of them.
        let all = started.elapsed();
        let stats = balancer.pool().stats();
        assert_eq!(stats.strategy, "round_robin");
        assert_eq!(
            (stats.requests(), stats.errors(), stats.in_flight),
            (30, 0, 0)
        );
        assert_eq!(stats.eligible(), 3);
        assert!(!stats.panic);
        let ids: Vec<&str> = stats.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["s0", "s1", "s2"]);
        for (ep, server) in stats.endpoints.iter().zip(&servers) {
            assert_eq!(ep.requests, 10, "{ep:?}");
            assert_eq!(ep.requests, server.hits());
            assert_eq!(
                (ep.errors, ep.in_flight, ep.consecutive_failures),
                (0, 0, 0)
            );
            assert_eq!(ep.latency.count, 10);
            assert_eq!(ep.histogram.count(), 10);
            assert!(ep.latency.p50 > Duration::ZERO && ep.latency.p50 <= ep.latency.p99);
            assert!(
                ep.latency.p99 <= with_resolution(all),
                "{ep:?}, all in {all:?}"
            );
            assert_eq!(ep.addr, Some(server.addr()));
            assert_eq!((ep.health, ep.health_changed), (Health::Healthy, None));
            assert_eq!((ep.weight, ep.effective_weight), (1, 1.0));
            assert!(ep.eligible && !ep.warming_up);
        }
        // The histogram's difference between two snapshots is the traffic in between.
        ask(&balancer).await.unwrap();
        let later = balancer.pool().stats();
        let moved: u64 = later
            .endpoints
            .iter()
            .zip(&stats.endpoints)
            .map(|(now, then)| now.histogram.since(&then.histogram).count())
            .sum();
        assert_eq!(moved, 1);
    })
    .await;
}

#[tokio::test]
async fn stats_count_errors_of_a_dead_endpoint() {
    within(LIMIT, async {
        let servers = start_servers(2).await;
        let mut eps = endpoints(&servers);
        eps.push(Endpoint::new("dead").with_addr(dead_addr().await));
        let balancer = balancer(eps, RoundRobin::new());
        let mut failed = 0;
        for _ in 0..30 {
            if ask(&balancer).await.is_err() {
                failed += 1;
            }
        }
        let stats = balancer.pool().stats();
        let dead = stats.endpoint("dead").unwrap();
        assert_eq!(failed, 10);
        assert_eq!((dead.requests, dead.errors), (10, 10));
        assert_eq!(dead.consecutive_failures, 10);
        // Failed requests have a latency too (the refused connection's).
        assert_eq!(dead.latency.count, 10);
        assert_eq!(stats.errors(), 10);
        for id in ["s0", "s1"] {
            let ep = stats.endpoint(id).unwrap();
            assert_eq!(
                (ep.requests, ep.errors, ep.consecutive_failures),
                (10, 0, 0)
            );
        }
    })
    .await;
}

#[tokio::test]
async fn stats_show_requests_in_flight_and_their_latency() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        // The servers hold their answers until released: the requests stay in flight for as
        // long as the test looks at them, on any machine.
        for s in &servers {
            s.hold(1);
        }
        let balancer = balancer(endpoints(&servers), RoundRobin::new());
        let sent = Instant::now();
        let requests: Vec<_> = (0..6)
            .map(|_| {
                let b = balancer.clone();
                tokio::spawn(async move { ask(&b).await })
            })
            .collect();
        let pool = balancer.pool().clone();
        wait_until(HANG, "six requests in flight", || {
            pool.stats().in_flight == 6
        })
        .await;
        let stats = pool.stats();
        for ep in &stats.endpoints {
            assert_eq!(ep.in_flight, 2, "{ep:?}");
            assert_eq!(ep.latency.count, 0, "nothing has finished yet");
        }
        // Answered no sooner than 300 ms after they were sent.
        let delay = Duration::from_millis(300);
        tokio::time::sleep_until((sent + delay).into()).await;
        for s in &servers {
            s.release();
        }
        for r in requests {
            r.await.unwrap().expect("an answer");
        }
        let all = sent.elapsed();
        let stats = pool.stats();
        assert_eq!(stats.in_flight, 0);
        for ep in &stats.endpoints {
            assert_eq!((ep.in_flight, ep.latency.count), (0, 2));
            // Within the histogram's resolution (12.5 %) of the time they were held.
            assert!(ep.latency.p50 >= delay - delay / 8, "{ep:?}");
            assert!(
                ep.latency.p99 <= with_resolution(all),
                "{ep:?}, all in {all:?}"
            );
            assert!(ep.latency_ewma >= delay, "{ep:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn stats_follow_health_marks_and_slow_start() {
    within(LIMIT, async {
        let servers = start_servers(3).await;
        let balancer = balancer(endpoints(&servers), RoundRobin::new());
        let pool = balancer.pool();
        let marked = Instant::now();
        assert!(pool.set_down(&"s1".into(), true));
        let stats = pool.stats();
        let since_marked = marked.elapsed();
        let s1 = stats.endpoint("s1").unwrap();
        assert_eq!(s1.health, Health::Down);
        assert!(!s1.eligible);
        assert_eq!(s1.effective_weight, 0.0);
        // Changed after `marked`: no longer ago than that when the stats were read.
        let changed = s1.health_changed.expect("changed");
        assert!(changed <= since_marked, "{changed:?}");
        assert_eq!(stats.eligible(), 2);
        for _ in 0..10 {
            assert_ne!(ask(&balancer).await.unwrap(), "s1");
        }
        assert_eq!(pool.stats().endpoint("s1").unwrap().requests, 0);

        // The change time moves with the next change (and not before: the first one is older).
        let unmarked = Instant::now();
        assert!(pool.set_down(&"s1".into(), false));
        let s1 = pool.stats().endpoint("s1").unwrap().clone();
        let since_unmarked = unmarked.elapsed();
        assert_eq!(s1.health, Health::Healthy);
        assert!(s1.eligible);
        let changed = s1.health_changed.unwrap();
        assert!(changed <= since_unmarked, "{changed:?}");

        // Slow start: a newcomer's effective weight starts at a tenth of its weight; the
        // others keep theirs (in the unit of the configured weight, not the ramp's scale). The
        // ramp is an hour long: still at its start when read, however slow the machine.
        let _ramp = SlowStart::new(Duration::from_secs(3600)).spawn(pool);
        let extra = common::start_server("s3").await;
        pool.insert(extra.endpoint().with_weight(2));
        let stats = pool.stats();
        let s3 = stats.endpoint("s3").unwrap();
        assert!(s3.warming_up && s3.eligible);
        assert_eq!(s3.weight, 2);
        assert!(
            s3.effective_weight > 0.0 && s3.effective_weight < 0.5,
            "{s3:?}"
        );
        assert_eq!(stats.endpoint("s0").unwrap().effective_weight, 1.0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Tracing.
//
// One global subscriber for the whole test binary: tracing caches each call site's interest
// globally, and scoped subscribers on parallel test threads race on that cache. The
// subscriber enables spans up to DEBUG on a thread that captures, and only up to INFO on any
// other thread (so there the balancer's DEBUG span is off, decided per call).

thread_local! {
    static CAPTURE: Cell<bool> = const { Cell::new(false) };
}

/// Fields of the spans named `lbkit.balance`, as recorded.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct FieldText<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for Spans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // Decide per call (see `enabled`).
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        CAPTURE.try_with(Cell::get).unwrap_or(false) || *meta.level() <= tracing::Level::INFO
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "lbkit.balance" {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut FieldText(&mut fields));
        let mut spans = self.0.lock().unwrap();
        ctx.span(id).unwrap().extensions_mut().insert(spans.len());
        spans.push(fields);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let span = ctx.span(id).unwrap();
        let Some(&i) = span.extensions().get::<usize>() else {
            return;
        };
        values.record(&mut FieldText(&mut self.0.lock().unwrap()[i]));
    }
}

/// Installs the binary's subscriber (once) and returns the spans it captures.
fn subscriber() -> Spans {
    use tracing_subscriber::layer::SubscriberExt;

    static SPANS: std::sync::OnceLock<Spans> = std::sync::OnceLock::new();
    let spans = SPANS
        .get_or_init(|| {
            let spans = Spans::default();
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(spans.clone()),
            )
            .expect("no other global subscriber in this binary");
            spans
        })
        .clone();
    // A call site registered by another thread just before the subscriber was installed
    // may hold a stale interest: recompute them all.
    tracing::callsite::rebuild_interest_cache();
    spans
}

fn named_balancer(
    names: &[&'static str],
) -> Balancer<
    impl Service<
            http::Request<()>,
            Response = &'static str,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
    RoundRobin,
    lbkit::balance::CompleteOnResponse,
> {
    Balancer::new(names.iter().copied(), RoundRobin::new(), |ep: &Endpoint| {
        let name: &'static str = Box::leak(ep.id().to_string().into_boxed_str());
        service_fn(
            move |_req: http::Request<()>| async move { Ok::<_, std::convert::Infallible>(name) },
        )
    })
    .with_completion(lbkit::balance::CompleteOnResponse)
}

#[test]
fn each_call_has_a_span_with_strategy_attempt_and_endpoint() {
    let spans = subscriber();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    CAPTURE.with(|c| c.set(true));
    rt.block_on(async {
        let balancer = named_balancer(&["a", "b"]);
        let first = balancer
            .clone()
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        // A retry: the request avoids the endpoint it was first sent to.
        let mut req = http::Request::new(());
        PickHints::of_mut(&mut req).avoid(first.into());
        let second = balancer.clone().oneshot(req).await.unwrap();
        assert_ne!(first, second);
    });
    CAPTURE.with(|c| c.set(false));
    let spans = spans.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(spans[0]["strategy"], "round_robin");
    assert_eq!(spans[0]["attempt"], "1");
    assert_eq!(spans[1]["attempt"], "2");
    let served: Vec<&str> = spans.iter().map(|s| s["endpoint"].as_str()).collect();
    let mut sorted = served.clone();
    sorted.sort();
    assert_eq!(sorted, ["a", "b"], "{spans:?}");
}

// A counting allocator, as in tests/alloc_free.rs: counts this thread's allocations while
// asked to.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn record_alloc() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting touches only const-initialised
// thread-local `Cell`s.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_alloc();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_alloc();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_alloc();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_span_below_the_subscribers_level_costs_no_allocation() {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    // A subscriber is installed, but at INFO on this thread: the balancer's DEBUG span is off.
    let _spans = subscriber();
    let mut balancer = named_balancer(&["a", "b", "c"]);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    let mut call = || {
        let fut = pin!(balancer.call(http::Request::new(())));
        match fut.poll(&mut cx) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!("ready at once"),
        }
    };
    // Warm up: thread-local state and the call site's registration.
    call();
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    for _ in 0..1_000 {
        std::hint::black_box(call());
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCS.with(Cell::get), 0);
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[tokio::test]
async fn metrics_export_the_documented_names_and_labels() {
    within(LIMIT, async {
        let servers = start_servers(2).await;
        let mut eps = endpoints(&servers);
        eps.push(Endpoint::new("dead").with_addr(dead_addr().await));
        let balancer = balancer(eps, RoundRobin::new());
        for _ in 0..9 {
            let _ = ask(&balancer).await;
        }
        balancer.pool().set_down(&"dead".into(), true);

        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut exporter = None;
        metrics::with_local_recorder(&recorder, || {
            let mut e = MetricsExporter::new("web");
            e.export(balancer.pool());
            exporter = Some(e);
        });
        let text = handle.render();
        for line in [
            r#"lbkit_requests_total{pool="web",endpoint="s0"} 3"#,
            r#"lbkit_requests_total{pool="web",endpoint="dead"} 3"#,
            r#"lbkit_errors_total{pool="web",endpoint="dead"} 3"#,
            r#"lbkit_errors_total{pool="web",endpoint="s1"} 0"#,
            r#"lbkit_in_flight{pool="web",endpoint="s1"} 0"#,
            r#"lbkit_endpoint_healthy{pool="web",endpoint="dead"} 0"#,
            r#"lbkit_endpoint_healthy{pool="web",endpoint="s0"} 1"#,
            r#"lbkit_endpoint_eligible{pool="web",endpoint="dead"} 0"#,
            r#"lbkit_consecutive_failures{pool="web",endpoint="dead"} 3"#,
            r#"lbkit_weight{pool="web",endpoint="s0"} 1"#,
            r#"lbkit_effective_weight{pool="web",endpoint="dead"} 0"#,
            r#"lbkit_latency_seconds_count{pool="web",endpoint="s0"} 3"#,
            r#"lbkit_pool_endpoints{pool="web"} 3"#,
            r#"lbkit_pool_eligible_endpoints{pool="web"} 2"#,
            r#"lbkit_pool_in_flight{pool="web"} 0"#,
            r#"lbkit_pool_panic{pool="web"} 0"#,
            r#"lbkit_pool_info{pool="web",strategy="round_robin"} 1"#,
            "# HELP lbkit_requests_total Requests sent to the endpoint.",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
        assert!(text.contains("lbkit_latency_ewma_seconds{"), "{text}");

        // A second export adds only what happened since; a removed endpoint's gauges drop.
        for _ in 0..4 {
            ask(&balancer).await.unwrap();
        }
        balancer.pool().remove(&"s1".into());
        let mut exporter = exporter.unwrap();
        metrics::with_local_recorder(&recorder, || exporter.export(balancer.pool()));
        let text = handle.render();
        for line in [
            r#"lbkit_requests_total{pool="web",endpoint="s0"} 5"#,
            r#"lbkit_latency_seconds_count{pool="web",endpoint="s0"} 5"#,
            r#"lbkit_endpoint_eligible{pool="web",endpoint="s1"} 0"#,
            r#"lbkit_pool_endpoints{pool="web"} 2"#,
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    })
    .await;
}

/// On tokio's paused clock: the export ticks are counted, not timed.
#[tokio::test(start_paused = true)]
async fn the_export_task_ends_with_its_pool() {
    within(LIMIT, async {
        let balancer = named_balancer(&["a"]);
        let task = MetricsExporter::new("gone").spawn(balancer.pool(), Duration::from_millis(10));
        // Three ticks and exports later, it still runs.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!task.is_finished());
        drop(balancer);
        tokio::time::timeout(HANG, task)
            .await
            .expect("the task ends once the pool is gone");
    })
    .await;
}
