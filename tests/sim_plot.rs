//! The simulator's plots (feature `sim-plot`), as `examples/simulate -- --svg DIR` writes them
//! (its own `comparisons` and `write_svgs`, compiled into this test): one latency and one
//! traffic-share SVG per scenario, each a well-formed SVG document with a plotted line or band
//! per run and a legend naming every run.

#[path = "../examples/simulate.rs"]
#[allow(dead_code)]
mod simulate;

use std::collections::HashSet;

/// A fresh directory of this test's own under the system's temporary one.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_simulator_writes_well_formed_svg_plots() {
    // Few requests keep the test short; the outage (10 s to 20 s) needs more than a few
    // seconds of traffic to show, so 12 s at 1 000 requests a second.
    let tables = simulate::comparisons(7, 12_000);
    let dir = TempDir(std::env::temp_dir().join(format!("lbkit-sim-plot-{}", std::process::id())));
    let written = simulate::write_svgs(&dir.0.join("plots"), &tables).expect("write the plots");
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "latency-slow.svg",
            "share-slow.svg",
            "latency-outage.svg",
            "share-outage.svg",
            "latency-fast-failures.svg",
            "share-fast-failures.svg",
            "latency-rate-limit.svg",
            "share-rate-limit.svg",
        ]
    );
    for ((path, name), (_, table)) in written
        .iter()
        .zip(&names)
        .zip(tables.iter().flat_map(|t| [t, t]))
    {
        let text = std::fs::read_to_string(path).expect("read the plot");
        let doc = roxmltree::Document::parse(&text)
            .unwrap_or_else(|e| panic!("{name} is not well-formed XML: {e}"));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg", "{name}");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg"),
            "{name}"
        );
        let width: f64 = root.attribute("width").expect("a width").parse().unwrap();
        assert!(width >= 800.0, "{name}: {width}");
        let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
        let runs = table.reports().len();
        assert!(runs >= 9, "{name}: {runs} runs");
        if name.starts_with("latency") {
            // p50 and p99 (and failures, when there are any) per run, and the axes.
            assert!(
                count("polyline") >= 2 * runs,
                "{name}: {}",
                count("polyline")
            );
        } else {
            // One band per endpoint per run.
            let bands: usize = table.reports().iter().map(|r| r.endpoints.len()).sum();
            assert!(
                count("polygon") >= bands,
                "{name}: {} of {bands}",
                count("polygon")
            );
        }
        // Every run is named (chart captions and the legend).
        let texts: HashSet<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_owned())
            .collect();
        for r in table.reports() {
            assert!(
                texts.contains(&r.label),
                "{name}: no {:?} in {texts:?}",
                r.label
            );
        }
        assert!(
            texts.contains(table.title()) || name.starts_with("share"),
            "{name}"
        );
        // Plotted points are numbers, not NaN or infinities.
        assert!(!text.contains("NaN") && !text.contains("inf"), "{name}");
    }
    // The outage plot shows failures: a third panel.
    let outage = std::fs::read_to_string(&written[2]).unwrap();
    assert!(outage.contains("failed requests per 1s step"));
    let slow = std::fs::read_to_string(&written[0]).unwrap();
    assert!(
        !slow.contains("failed requests"),
        "no failure panel without failures"
    );
}
