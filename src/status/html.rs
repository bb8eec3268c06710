//! The status page's HTML: one table per pool, no script, no external asset.

use std::fmt::Write;
use std::time::Duration;

use super::{ms, State, StatusPage};
use crate::stats::{EndpointStats, PoolStats};

/// Colours and layout, inline: the page must work with no other request.
const STYLE: &str = "
body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:16px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 4px}
.meta{color:#5b6475;margin:0 0 8px}.meta b{color:#1d2330}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:4px 7px;border-bottom:1px solid #e3e6eb;text-align:right;white-space:nowrap}
th{background:#2d3748;color:#fff;font-weight:600;position:sticky;top:0}
td.id,th.id,td.chk{text-align:left}td.chk{max-width:14em;overflow:hidden;text-overflow:ellipsis}
tr.up td.st{background:#38a169;color:#fff}tr.up{background:#f0fff4}
tr.warming td.st{background:#9ac53b;color:#fff}tr.warming{background:#f7fde9}
tr.drain td.st{background:#3182ce;color:#fff}tr.drain{background:#ebf4ff}
tr.down td.st{background:#e53e3e;color:#fff}tr.down{background:#fff0f0}
tr.ejected td.st{background:#dd6b20;color:#fff}tr.ejected{background:#fffaf0}
td.st{font-weight:600;text-align:center;text-transform:uppercase;font-size:12px}
.bad{color:#c53030;font-weight:600}.dim{color:#8a93a3}
.panic{background:#e53e3e;color:#fff;padding:1px 6px;border-radius:3px;font-weight:600}
form{display:inline;margin:0 2px}input[type=number]{width:3.5em;font:inherit;font-size:12px}
button{font:inherit;font-size:12px;padding:1px 6px;cursor:pointer}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:3px;color:#fff;font-size:12px;text-transform:uppercase}
";

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as people read it on a dashboard: `850ms`, `12.4s`, `3m 05s`, `2h 10m`,
/// `4d 03h`.
pub(super) fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600)
    }
}

/// A latency in milliseconds, with the precision it deserves.
fn latency(d: Duration, count: u64) -> String {
    if count == 0 {
        return "-".to_owned();
    }
    let v = ms(d);
    if v < 10.0 {
        format!("{v:.2}ms")
    } else if v < 1000.0 {
        format!("{v:.1}ms")
    } else {
        format!("{:.2}s", v / 1e3)
    }
}

/// The whole page.
pub(super) fn render(page: &StatusPage, pools: &[(&str, PoolStats)]) -> String {
    let inner = &page.inner;
    let title = escape(&inner.title);
    let mut out = String::with_capacity(4096);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    if let Some(every) = inner.refresh {
        let _ = writeln!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{}\">",
            every.as_secs().max(1)
        );
    }
    let _ = write!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width\">\n<title>{title}</title>\n\
         <style>{STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n<p class=\"meta\">"
    );
    let endpoints: usize = pools.iter().map(|(_, p)| p.endpoints.len()).sum();
    let _ = write!(
        out,
        "<b>{}</b> pool{}, <b>{endpoints}</b> endpoint{}",
        pools.len(),
        plural(pools.len()),
        plural(endpoints)
    );
    match inner.refresh {
        Some(every) => {
            let _ = write!(out, " &middot; reloads every {}s", every.as_secs().max(1));
        }
        None => out.push_str(" &middot; reload to update"),
    }
    let json = escape(&format!("{}.json", inner.path));
    let _ = write!(out, " &middot; <a href=\"{json}\">JSON</a>");
    if inner.admin {
        out.push_str(" &middot; admin actions on");
    }
    out.push_str("</p>\n<p class=\"meta legend\"><span style=\"background:#38a169\">up</span>\
        <span style=\"background:#9ac53b\">warming</span><span style=\"background:#3182ce\">drain</span>\
        <span style=\"background:#dd6b20\">ejected</span><span style=\"background:#e53e3e\">down</span></p>\n");
    for (name, stats) in pools {
        pool(&mut out, page, name, stats);
    }
    out.push_str("</body></html>\n");
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn pool(out: &mut String, page: &StatusPage, name: &str, p: &PoolStats) {
    let name_html = escape(name);
    let _ = write!(
        out,
        "<section><h2>pool {name_html}</h2>\n<p class=\"meta\">strategy <b>{}</b> &middot; \
         <b>{}</b> of {} endpoints eligible &middot; <b>{}</b> in flight &middot; \
         <b>{}</b> requests &middot; <b>{}</b> errors &middot; snapshot v{}",
        escape(p.strategy),
        p.eligible(),
        p.endpoints.len(),
        p.in_flight,
        p.requests(),
        p.errors(),
        p.version
    );
    if let Some(tier) = p.tier.filter(|t| t.0 > 0) {
        let _ = write!(out, " &middot; <b>serving from backup tier {}</b>", tier.0);
    }
    if p.panic {
        out.push_str(" &middot; <span class=\"panic\">PANIC: all endpoints get traffic</span>");
    }
    out.push_str(
        "</p>\n<table>\n<thead><tr><th class=\"id\">endpoint</th><th>state</th>\
        <th>for</th><th>weight</th><th>in flight</th><th>requests</th><th>errors</th>\
        <th>p50</th><th>p90</th><th>p99</th><th>EWMA</th><th class=\"id\">last check</th>",
    );
    if page.inner.admin {
        out.push_str("<th class=\"id\">admin</th>");
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for e in &p.endpoints {
        row(out, page, name, e);
    }
    out.push_str("</tbody></table></section>\n");
}

fn row(out: &mut String, page: &StatusPage, pool: &str, e: &EndpointStats) {
    let state = State::of(e);
    let id = escape(e.id.as_str());
    let _ = write!(
        out,
        "<tr class=\"{}\"><td class=\"id\">{id}",
        state.as_str()
    );
    if let Some(addr) = e.addr.filter(|a| a.to_string() != e.id.as_str()) {
        let _ = write!(
            out,
            " <span class=\"dim\">{}</span>",
            escape(&addr.to_string())
        );
    }
    if e.tier.0 > 0 {
        let _ = write!(out, " <span class=\"dim\">(backup {})</span>", e.tier.0);
    }
    let _ = write!(out, "</td><td class=\"st\">{}</td>", state.as_str());
    match e.health_changed {
        Some(d) => {
            let _ = write!(out, "<td>{}</td>", human(d));
        }
        None => out.push_str("<td class=\"dim\" title=\"no change since it joined\">-</td>"),
    }
    // Configured weight; the weight in force beside it when it differs (slow start).
    let _ = write!(out, "<td>{}", e.weight);
    if e.eligible && (e.effective_weight - f64::from(e.weight)).abs() > 1e-9 {
        let _ = write!(
            out,
            " <span class=\"dim\">({:.1})</span>",
            e.effective_weight
        );
    }
    let _ = write!(out, "</td><td>{}</td><td>{}</td>", e.in_flight, e.requests);
    if e.errors > 0 {
        let share = e.errors as f64 * 100.0 / e.requests.max(1) as f64;
        let _ = write!(
            out,
            "<td class=\"bad\">{} <span class=\"dim\">({share:.1}%)</span></td>",
            e.errors
        );
    } else {
        out.push_str("<td>0</td>");
    }
    let l = &e.latency;
    let _ = write!(
        out,
        "<td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        latency(l.p50, l.count),
        latency(l.p90, l.count),
        latency(l.p99, l.count),
        latency(e.latency_ewma, 1)
    );
    match &e.last_check {
        None => out.push_str("<td class=\"chk dim\">-</td>"),
        Some(c) => {
            let ago = human(c.at.elapsed());
            match &c.error {
                None => {
                    let _ = write!(
                        out,
                        "<td class=\"chk\">OK in {}, {ago} ago</td>",
                        human(c.took)
                    );
                }
                Some(err) => {
                    let err = escape(err);
                    let _ = write!(
                        out,
                        "<td class=\"chk\" title=\"{err}\"><span class=\"bad\">FAIL</span> {err}, {ago} ago</td>"
                    );
                }
            }
        }
    }
    if page.inner.admin {
        out.push_str("<td class=\"id\">");
        let fields = format!(
            "<input type=\"hidden\" name=\"pool\" value=\"{}\">\
             <input type=\"hidden\" name=\"endpoint\" value=\"{id}\">",
            escape(pool)
        );
        let base = escape(&page.inner.path);
        let (action, label) = if e.weight == 0 {
            ("undrain", "undrain")
        } else {
            ("drain", "drain")
        };
        let _ = write!(
            out,
            "<form method=\"post\" action=\"{base}/{action}\">{fields}<button>{label}</button></form>\
             <form method=\"post\" action=\"{base}/weight\">{fields}\
             <input type=\"number\" name=\"weight\" min=\"0\" max=\"{}\" value=\"{}\" \
             title=\"weight\" required><button title=\"set the weight\">set</button></form>",
            crate::Endpoint::MAX_WEIGHT,
            e.weight
        );
        out.push_str("</td>");
    }
    out.push_str("</tr>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape("<b class=\"x\">Tom & 'Jerry'</b>"),
            "&lt;b class=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/b&gt;"
        );
        assert_eq!(escape("10.0.0.1:80"), "10.0.0.1:80");
    }

    #[test]
    fn durations_read_as_on_a_dashboard() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(12_400)), "12.4s");
        assert_eq!(human(Duration::from_secs(185)), "3m 05s");
        assert_eq!(human(Duration::from_secs(7_800)), "2h 10m");
        assert_eq!(human(Duration::from_secs(4 * 86_400 + 3 * 3600)), "4d 03h");
    }
}
