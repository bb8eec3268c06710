use std::fmt;
use std::time::Duration;

use crate::endpoint::{EndpointId, LatencySummary};

/// What one simulated endpoint saw during a run.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointReport {
    /// The endpoint.
    pub id: EndpointId,
    /// The zone it runs in, if it has one.
    pub zone: Option<std::sync::Arc<str>>,
    /// Requests it got (retries included).
    pub requests: u64,
    /// Its share of all requests the endpoints got, from 0.0 to 1.0.
    pub share: f64,
    /// Requests it failed.
    pub errors: u64,
    /// Requests it refused with `429 Too Many Requests` over its rate limit (not errors of
    /// the endpoint; see [`SimEndpoint::rate_limit`](super::SimEndpoint::rate_limit)).
    pub throttled: u64,
    /// Latencies of the requests it served successfully, as it saw them (from their arrival,
    /// including any wait for a slot).
    pub latency: LatencySummary,
    /// Requests it got in each step of the run's [timeline](Report::timeline), by when they
    /// arrived (one entry per step): its share of the traffic over time.
    pub timeline: Vec<u64>,
}

/// Requests and errors of one step of a run's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimelineStep {
    /// When the step starts, since the start of the run.
    pub start: Duration,
    /// Requests sent during the step.
    pub requests: u64,
    /// Of those, the ones that failed (as the client saw them).
    pub errors: u64,
    /// Latencies of those that succeeded, as the client saw them: how the tail moves over
    /// time.
    pub latency: LatencySummary,
}

/// The outcome of one simulation run: per endpoint and as the client saw it.
///
/// Its `Display` is a table; the same scenario, seed and stack give the same table, byte for
/// byte.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// What ran: the strategy's name, or the label given.
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// Requests the client sent.
    pub requests: u64,
    /// Of those, the ones that failed (after any retries of the stack).
    pub errors: u64,
    /// Simulated time from the first arrival to the last response.
    pub elapsed: Duration,
    /// LatencySummary of the client's successful requests, from when each should have been sent
    /// to its response (retries and waits included).
    pub latency: LatencySummary,
    /// Each endpoint, in the scenario's order.
    pub endpoints: Vec<EndpointReport>,
    /// Requests and errors over time, by when they were sent, in steps of `timeline_step`.
    pub timeline: Vec<TimelineStep>,
    /// The length of each step of the timeline.
    pub timeline_step: Duration,
}

impl Report {
    /// The report of one endpoint.
    pub fn endpoint(&self, id: &str) -> Option<&EndpointReport> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// The share of the requests the endpoints of `zone` got, from 0.0 to 1.0.
    pub fn zone_share(&self, zone: &str) -> f64 {
        self.endpoints
            .iter()
            .filter(|e| e.zone.as_deref() == Some(zone))
            .map(|e| e.share)
            .sum()
    }

    /// The share of the requests that arrived at endpoints during `window` (from the start of
    /// the run, in whole [timeline](Report::timeline) steps: those that start in it) that
    /// went to the endpoints of `zone`; 0.0 when none arrived then.
    pub fn zone_share_during(&self, zone: &str, window: std::ops::Range<Duration>) -> f64 {
        let step = self.timeline_step.as_nanos().max(1);
        let in_window =
            |i: usize| window.contains(&Duration::from_nanos((i as u128 * step) as u64));
        let (mut in_zone, mut all) = (0, 0);
        for e in &self.endpoints {
            let n: u64 = e
                .timeline
                .iter()
                .enumerate()
                .filter(|&(i, _)| in_window(i))
                .map(|(_, n)| n)
                .sum();
            all += n;
            if e.zone.as_deref() == Some(zone) {
                in_zone += n;
            }
        }
        ratio(in_zone, all)
    }

    /// Each zone of the endpoints, in order of first appearance, with its share of the
    /// requests; empty when no endpoint has a zone.
    pub fn zone_shares(&self) -> Vec<(&str, f64)> {
        let mut zones: Vec<(&str, f64)> = Vec::new();
        for e in &self.endpoints {
            let Some(zone) = e.zone.as_deref() else {
                continue;
            };
            match zones.iter_mut().find(|(z, _)| *z == zone) {
                Some((_, share)) => *share += e.share,
                None => zones.push((zone, e.share)),
            }
        }
        zones
    }

    /// The share of the client's requests that failed, from 0.0 to 1.0.
    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.requests)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A duration in milliseconds, one decimal.
struct Ms(Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = format!("{:.1}ms", self.0.as_secs_f64() * 1e3);
        f.pad(&ms)
    }
}

/// A share as a percentage, one decimal.
struct Pct(f64);

impl fmt::Display for Pct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = format!("{:.1}%", self.0 * 100.0);
        f.pad(&pct)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} | {} | seed {}: {} requests in {:.1}s simulated, {} failed ({})",
            self.scenario,
            self.label,
            self.seed,
            self.requests,
            self.elapsed.as_secs_f64(),
            self.errors,
            Pct(self.error_rate()),
        )?;
        let width = self
            .endpoints
            .iter()
            .map(|e| e.id.as_str().len())
            .max()
            .unwrap_or(0)
            .max("endpoint".len());
        writeln!(
            f,
            "{:<width$} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "endpoint", "requests", "share", "errors", "p50", "p90", "p99", "p99.9"
        )?;
        let row = |f: &mut fmt::Formatter<'_>,
                   name: &str,
                   req,
                   share: &dyn fmt::Display,
                   err,
                   l: &LatencySummary| {
            writeln!(
                f,
                "{:<width$} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}",
                name,
                req,
                share,
                err,
                Ms(l.p50),
                Ms(l.p90),
                Ms(l.p99),
                Ms(l.p999)
            )
        };
        for e in &self.endpoints {
            row(
                f,
                e.id.as_str(),
                e.requests,
                &Pct(e.share),
                e.errors,
                &e.latency,
            )?;
        }
        row(f, "client", self.requests, &"-", self.errors, &self.latency)?;
        let zones = self.zone_shares();
        if !zones.is_empty() {
            write!(f, "share per zone:")?;
            for (zone, share) in zones {
                write!(f, " {zone} {}", Pct(share))?;
            }
            writeln!(f)?;
        }
        if self.endpoints.iter().any(|e| e.throttled > 0) {
            write!(f, "refused with 429 (not errors of the endpoint):")?;
            for e in self.endpoints.iter().filter(|e| e.throttled > 0) {
                write!(f, " {} {}", e.id, e.throttled)?;
            }
            writeln!(f)?;
        }
        if self.errors > 0 || self.endpoints.iter().any(|e| e.errors > 0) {
            let step = self.timeline_step.as_secs_f64();
            write!(f, "errors per {step:.1}s step:")?;
            for s in &self.timeline {
                write!(f, " {}", s.errors)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Several runs of one scenario side by side (different strategies or stacks), one row each.
///
/// Its `Display` is a table of the client's latency quantiles and errors, and of the share
/// of the requests that went to each highlighted endpoint (by default the scenario's
/// endpoints that something happens to, or whose latency differs from most others').
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    title: String,
    highlight: Vec<EndpointId>,
    reports: Vec<Report>,
}

impl Comparison {
    /// An empty comparison titled `title`, highlighting `endpoints`.
    pub fn new(title: impl Into<String>, endpoints: impl IntoIterator<Item = EndpointId>) -> Self {
        Comparison {
            title: title.into(),
            highlight: endpoints.into_iter().collect(),
            reports: Vec::new(),
        }
    }

    /// Adds a run.
    pub fn push(&mut self, report: Report) -> &mut Self {
        self.reports.push(report);
        self
    }

    /// The title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The highlighted endpoints, in order.
    pub fn highlighted(&self) -> &[EndpointId] {
        &self.highlight
    }

    /// The runs, in the order they were added.
    pub fn reports(&self) -> &[Report] {
        &self.reports
    }

    /// The run labelled `label`.
    pub fn report(&self, label: &str) -> Option<&Report> {
        self.reports.iter().find(|r| r.label == label)
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.title)?;
        let width = self
            .reports
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(0)
            .max("strategy".len());
        write!(
            f,
            "{:<width$} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "strategy", "p50", "p90", "p99", "p99.9", "errors"
        )?;
        let columns: Vec<String> = self.highlight.iter().map(|id| format!("to {id}")).collect();
        for c in &columns {
            write!(f, " {:>w$}", c, w = c.len().max(7))?;
        }
        writeln!(f)?;
        for r in &self.reports {
            write!(
                f,
                "{:<width$} {:>9} {:>9} {:>9} {:>9} {:>8}",
                r.label,
                Ms(r.latency.p50),
                Ms(r.latency.p90),
                Ms(r.latency.p99),
                Ms(r.latency.p999),
                r.errors
            )?;
            for (id, c) in self.highlight.iter().zip(&columns) {
                let share = r.endpoint(id.as_str()).map_or(0.0, |e| e.share);
                write!(f, " {:>w$}", Pct(share), w = c.len().max(7))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
