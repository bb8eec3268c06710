//! SVG plots of simulation runs (feature `sim-plot`), drawn with
//! [plotters](https://docs.rs/plotters)' SVG backend: what the tables of a [`Comparison`] say,
//! over time.
//!
//! - [`latency_svg`]: the client's p50 and p99 latency in each step of the timeline, one line
//!   per run (strategy or stack), and its failed requests per step when there are any;
//! - [`traffic_share_svg`]: one small chart per run, the share of the requests each endpoint
//!   got in each step, stacked: the highlighted endpoints of the comparison (those something
//!   happens to) in colour at the bottom, the others in grey above.
//!
//! Both read the per-step series of each [`Report`] ([`Report::timeline`] and
//! [`EndpointReport::timeline`](super::EndpointReport::timeline)), so their resolution is the
//! scenario's [timeline step](super::Scenario::timeline_step). The same comparison gives the
//! same file, byte for byte.
//!
//! ```
//! use std::time::Duration;
//! use lbkit::sim::{plot, Latency, Scenario, SimEndpoint, Workload};
//! use lbkit::strategy::{PeakEwma, RoundRobin};
//!
//! let fast = Latency::log_normal(Duration::from_millis(20), 0.3);
//! let scenario = Scenario::new("one slow endpoint")
//!     .endpoints((0..4).map(|i| SimEndpoint::new(format!("e{i}"), fast)))
//!     .endpoint(SimEndpoint::new("slow", fast.times(10.0)))
//!     .workload(Workload::open(200.0).requests(2_000));
//! let mut comparison = scenario.comparison();
//! comparison.push(scenario.run(RoundRobin::new()));
//! comparison.push(scenario.run(PeakEwma::new()));
//!
//! let svg = plot::latency_svg(&comparison).unwrap();
//! assert!(svg.starts_with("<svg"));
//! let dir = std::env::temp_dir();
//! std::fs::write(dir.join("lbkit-latency.svg"), svg).unwrap();
//! std::fs::write(dir.join("lbkit-share.svg"), plot::traffic_share_svg(&comparison).unwrap()).unwrap();
//! ```

use std::fmt;
use std::io;
use std::time::Duration;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{Comparison, Report};
use crate::endpoint::LatencySummary;

/// A plot that could not be drawn (plotters failed; with its in-memory SVG backend this does
/// not happen in practice), as an I/O error of kind `Other` whose message says so.
fn err(e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("cannot draw the plot: {e}"))
}

/// A qualitative palette (Tableau 10, then two more): one colour per run.
const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

/// Colours of highlighted endpoints in the share plot: red first (the endpoint in trouble),
/// then the palette's blue, orange and green.
const HIGHLIGHT: [RGBColor; 4] = [PALETTE[3], PALETTE[0], PALETTE[1], PALETTE[2]];

const FONT: &str = "sans-serif";
const LEGEND_WIDTH: u32 = 230;

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Reads one quantile of a set of latencies.
type Quantile = fn(&LatencySummary) -> Duration;

/// The end of the last step of any run, in seconds.
fn x_end(reports: &[Report]) -> f64 {
    reports
        .iter()
        .filter_map(|r| r.timeline.last().map(|t| secs(t.start + r.timeline_step)))
        .fold(1.0, f64::max)
}

/// The middle of each step, in seconds.
fn mid(r: &Report, start: Duration) -> f64 {
    secs(start) + secs(r.timeline_step) / 2.0
}

/// The client's latency over time, one line per run: a panel for p50 and one for p99 (log
/// scale), and one for failed requests per step when any run had some. The SVG document as
/// text.
pub fn latency_svg(comparison: &Comparison) -> io::Result<String> {
    let reports = comparison.reports();
    let with_errors = reports.iter().any(|r| r.errors > 0);
    let panels = if with_errors { 3 } else { 2 };
    let (width, height) = (1100u32, 260 * panels as u32 + 50);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (title, body) = root.split_vertically(40);
        title.titled(comparison.title(), (FONT, 18)).map_err(err)?;
        let (plots, legend) = body.split_horizontally(width - LEGEND_WIDTH);
        let areas = plots.split_evenly((panels, 1));
        let x_end = x_end(reports);
        // One y range for both latency panels, so that they compare at a glance.
        let points = |r: &Report, q: Quantile| -> Vec<(f64, f64)> {
            r.timeline
                .iter()
                .filter(|t| t.latency.count > 0)
                .map(|t| (mid(r, t.start), ms(q(&t.latency)).max(0.1)))
                .collect()
        };
        let all: Vec<f64> = reports
            .iter()
            .flat_map(|r| points(r, |l| l.p50).into_iter().chain(points(r, |l| l.p99)))
            .map(|(_, y)| y)
            .collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(0.0, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo * 0.8, hi * 1.25)
        } else {
            (1.0, 1000.0)
        };
        let quantiles: [(&str, Quantile); 2] =
            [("p50 latency", |l| l.p50), ("p99 latency", |l| l.p99)];
        for (area, (name, q)) in areas.iter().zip(quantiles) {
            let mut chart = ChartBuilder::on(area)
                .caption(name, (FONT, 15))
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d(
                    0f64..x_end,
                    (lo..hi).log_scale().with_key_points(ticks(lo, hi)),
                )
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_desc("ms (log scale)")
                .y_label_formatter(&|v| format_ms(*v))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(err)?;
            for (i, r) in reports.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(points(r, q), color(i).stroke_width(2)))
                    .map_err(err)?;
            }
        }
        if with_errors {
            let steps = |r: &Report| -> Vec<(f64, f64)> {
                r.timeline
                    .iter()
                    .map(|t| (mid(r, t.start), t.errors as f64))
                    .collect()
            };
            let top = reports
                .iter()
                .flat_map(|r| r.timeline.iter().map(|t| t.errors))
                .max()
                .unwrap_or(0)
                .max(1) as f64;
            let step = reports.first().map_or(1.0, |r| secs(r.timeline_step));
            let mut chart = ChartBuilder::on(&areas[2])
                .caption(format!("failed requests per {step}s step"), (FONT, 15))
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..x_end, 0f64..top * 1.1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_desc("requests")
                .y_label_formatter(&|v| format!("{v:.0}"))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(err)?;
            for (i, r) in reports.iter().enumerate() {
                chart
                    .draw_series(LineSeries::new(steps(r), color(i).stroke_width(2)))
                    .map_err(err)?;
            }
        }
        let labels: Vec<(String, RGBColor)> = reports
            .iter()
            .enumerate()
            .map(|(i, r)| (r.label.clone(), color(i)))
            .collect();
        draw_legend(&legend, "runs", &labels)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The share of the traffic each endpoint got over time, one small stacked chart per run
/// (three per row): the comparison's highlighted endpoints in colour at the bottom, the
/// others in alternating greys above. The SVG document as text.
pub fn traffic_share_svg(comparison: &Comparison) -> io::Result<String> {
    let reports = comparison.reports();
    let columns = 3usize;
    let rows = reports.len().div_ceil(columns).max(1);
    let (width, height) = (1100u32, 230 * rows as u32 + 50);
    let highlight = comparison.highlighted();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (title, body) = root.split_vertically(40);
        title
            .titled(
                &format!("{}: share of requests per endpoint", comparison.title()),
                (FONT, 18),
            )
            .map_err(err)?;
        let (plots, legend) = body.split_horizontally(width - LEGEND_WIDTH);
        let areas = plots.split_evenly((rows, columns));
        let x_end = x_end(reports);
        for (area, r) in areas.iter().zip(reports) {
            // Endpoints bottom to top: highlighted first, in the comparison's order.
            let mut order: Vec<usize> = highlight
                .iter()
                .filter_map(|id| r.endpoints.iter().position(|e| e.id == *id))
                .collect();
            let rest: Vec<usize> = (0..r.endpoints.len())
                .filter(|i| !order.contains(i))
                .collect();
            order.extend(rest);
            let totals: Vec<u64> = (0..r.timeline.len())
                .map(|s| r.endpoints.iter().map(|e| at(&e.timeline, s)).sum())
                .collect();
            let mut chart = ChartBuilder::on(area)
                .caption(&r.label, (FONT, 14))
                .margin(6)
                .x_label_area_size(24)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..x_end, 0f64..100f64)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(6)
                .x_label_formatter(&|v| format!("{v:.0}s"))
                .y_labels(5)
                .y_label_formatter(&|v| format!("{v:.0}%"))
                .draw()
                .map_err(err)?;
            // Each band from the cumulative share below it to the one above, as a polygon.
            let mut below = vec![0.0; r.timeline.len()];
            let mut grey = 0;
            for &i in &order {
                let e = &r.endpoints[i];
                let above: Vec<f64> = below
                    .iter()
                    .enumerate()
                    .map(|(s, b)| b + share(at(&e.timeline, s), totals[s]))
                    .collect();
                let fill = match highlight.iter().position(|id| *id == e.id) {
                    Some(h) => HIGHLIGHT[h % HIGHLIGHT.len()],
                    None => {
                        grey += 1;
                        if grey % 2 == 0 {
                            RGBColor(200, 200, 200)
                        } else {
                            RGBColor(225, 225, 225)
                        }
                    }
                };
                let xs: Vec<f64> = r.timeline.iter().map(|t| mid(r, t.start)).collect();
                let mut band: Vec<(f64, f64)> =
                    xs.iter().copied().zip(above.iter().copied()).collect();
                band.extend(xs.iter().copied().zip(below.iter().copied()).rev());
                chart
                    .draw_series(std::iter::once(Polygon::new(band, fill.filled())))
                    .map_err(err)?;
                below = above;
            }
        }
        let mut labels: Vec<(String, RGBColor)> = highlight
            .iter()
            .enumerate()
            .map(|(h, id)| (id.to_string(), HIGHLIGHT[h % HIGHLIGHT.len()]))
            .collect();
        labels.push(("other endpoints".to_owned(), RGBColor(210, 210, 210)));
        draw_legend(&legend, "endpoints", &labels)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The count of step `s`, 0 past the end.
fn at(counts: &[u64], s: usize) -> u64 {
    counts.get(s).copied().unwrap_or(0)
}

/// `part` of `total` in percent; 0 of nothing.
fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

/// Ticks for a log axis from `lo` to `hi`: 1, 2 and 5 times each power of ten between, or
/// more multiples when the range is too narrow for four of those.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let within = |multiples: &[f64]| {
        let mut out = Vec::new();
        let mut decade = 10f64.powf(lo.log10().floor());
        while decade <= hi && out.len() < 64 {
            for m in multiples {
                let v = decade * m;
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
            decade *= 10.0;
        }
        out
    };
    let coarse = within(&[1.0, 2.0, 5.0]);
    if coarse.len() >= 4 {
        coarse
    } else {
        within(&[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    }
}

/// A millisecond value for a log axis: `20`, `1.5`, `1000`.
fn format_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A legend: a title and one colour swatch and label per line.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    labels: &[(String, RGBColor)],
) -> io::Result<()> {
    let font = (FONT, 13).into_font();
    area.draw(&Text::new(
        title.to_owned(),
        (10, 20),
        (FONT, 14).into_font().style(FontStyle::Bold),
    ))
    .map_err(err)?;
    for (i, (label, c)) in labels.iter().enumerate() {
        let y = 44 + 20 * i as i32;
        area.draw(&Rectangle::new([(10, y - 5), (34, y + 5)], c.filled()))
            .map_err(err)?;
        area.draw(&Text::new(label.clone(), (42, y - 7), font.clone()))
            .map_err(err)?;
    }
    Ok(())
}
