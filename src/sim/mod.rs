//! A deterministic simulator: compare strategies on simulated fleets, with evidence.
//!
//! A [`Scenario`] is a fleet of [`SimEndpoint`]s (each with a [`Latency`] distribution, an
//! optional concurrency limit, and slowdowns, errors or outages in windows of time), a
//! [`Workload`] (open-loop Poisson arrivals at a rate, or a closed loop of workers, and a
//! request count) and a seed. [`Scenario::run`] drives the workload through a
//! [`Balancer`](crate::Balancer) with any strategy; [`Scenario::run_with`] through any stack
//! built on it (failover, outlier detection, ...), and [`Scenario::run_service`] through any
//! tower service over the simulated endpoints (such as `tower::balance::p2c`). Each run
//! returns a [`Report`]: every endpoint's share of the requests, errors and p50/p90/p99/p99.9
//! latency, and the same as the client saw them, and how requests, errors, latency and each
//! endpoint's share moved over the run (its timeline); [`Comparison`] puts runs side by side,
//! and `plot` (feature `sim-plot`) draws them as SVG.
//!
//! Runs use tokio's paused clock (feature `sim` turns on tokio's `test-util`): simulated time
//! jumps from one timer to the next, so minutes of traffic take milliseconds, and a run
//! depends on its seed alone. **The same scenario and seed give the same report, byte for
//! byte**: arrivals, latencies and errors come from seeded generators, lbkit's own random
//! choices are reseeded for the run, and lbkit's latency measurements (peak EWMA, the
//! statistics' histograms) read the simulated clock while on the simulation's thread.
//!
//! ```
//! use std::time::Duration;
//! use lbkit::sim::{Latency, Scenario, SimEndpoint, Workload};
//! use lbkit::strategy::{PeakEwma, RoundRobin};
//!
//! let fast = Latency::log_normal(Duration::from_millis(20), 0.3);
//! let scenario = Scenario::new("one slow endpoint")
//!     .seed(7)
//!     .endpoints((0..4).map(|i| SimEndpoint::new(format!("e{i}"), fast)))
//!     .endpoint(SimEndpoint::new("slow", fast.times(10.0)))
//!     .workload(Workload::open(200.0).requests(4_000));
//!
//! let rr = scenario.run(RoundRobin::new());
//! let ewma = scenario.run(PeakEwma::new());
//! println!("{rr}\n{ewma}");
//! assert!(ewma.latency.p99 < rr.latency.p99);
//! assert!(ewma.endpoint("slow").unwrap().share < 0.05);
//! // Same seed, same report.
//! assert_eq!(scenario.run(PeakEwma::new()).to_string(), ewma.to_string());
//! ```

mod endpoint;
mod latency;
#[cfg(feature = "sim-plot")]
#[cfg_attr(docsrs, doc(cfg(feature = "sim-plot")))]
pub mod plot;
mod report;
mod scenario;
mod workload;

pub use endpoint::{SimEndpoint, SimError, SimService};
pub use latency::Latency;
pub use report::{Comparison, EndpointReport, Report, TimelineStep};
pub use scenario::{Scenario, SimCompletion};
pub use workload::Workload;
