//! What `recache bench` prints: a table, `--json`, and `--report FILE.html` (one self-contained
//! page: the table, inline SVG charts drawn with `plotters`, and the data as JSON).

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Line colours (a colour-blind-friendly set), by series index.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Percentiles each latency curve is drawn through.
const CURVE: [f64; 12] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
];

/// One measured pass: `count` calls of one kind at one concurrency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// `floor` (the bare calls), `hit` (through the runner) or `miss` (local run + write-behind).
    pub kind: &'static str,
    /// `fetch`, `validate`, `defer`, or `write-behind` for misses.
    pub behavior: String,
    /// Calls in flight.
    pub concurrency: usize,
    /// Calls that succeeded (and, for hits, really hit).
    pub count: u64,
    /// Calls that failed (or, for hits, did not hit).
    pub errors: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Successful calls per second of wall time.
    pub ops_per_s: f64,
    /// This hit's median over its floor's median (same behavior, same concurrency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_over_floor: Option<f64>,
    /// Misses: seconds the write-behind queue took to drain after the last miss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_s: Option<f64>,
    /// Misses: results the write-behind wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<u64>,
    /// (percentile, µs) along the latency distribution.
    pub percentiles: Vec<(f64, f64)>,
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

impl Measurement {
    /// Summarizes a histogram of microseconds.
    pub fn new(
        kind: &'static str,
        behavior: &str,
        concurrency: usize,
        h: Histogram<u64>,
        wall: Duration,
        errors: u64,
    ) -> Measurement {
        let q = |p: f64| h.value_at_quantile(p / 100.0) as f64;
        let count = h.len();
        Measurement {
            kind,
            behavior: behavior.to_owned(),
            concurrency,
            count,
            errors,
            p50_us: q(50.0),
            p90_us: q(90.0),
            p99_us: q(99.0),
            max_us: h.max() as f64,
            mean_us: round1(h.mean()),
            ops_per_s: round1(count as f64 / wall.as_secs_f64().max(1e-9)),
            p50_over_floor: None,
            flush_s: None,
            written: None,
            percentiles: CURVE.iter().map(|p| (*p, q(*p))).collect(),
        }
    }

    fn label(&self) -> String {
        format!("{} {}", self.kind, self.behavior)
    }
}

/// Everything one `recache bench` run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub target: String,
    pub namespace: String,
    pub actions: usize,
    pub outputs: String,
    /// How floors were taken.
    pub floor: &'static str,
    pub populated_blobs: u64,
    pub populated_bytes: u64,
    pub populate_s: f64,
    pub rows: Vec<Measurement>,
}

impl Report {
    pub fn new(
        target: String,
        namespace: String,
        actions: usize,
        outputs: String,
        floor: &'static str,
    ) -> Report {
        Report {
            target,
            namespace,
            actions,
            outputs,
            floor,
            populated_blobs: 0,
            populated_bytes: 0,
            populate_s: 0.0,
            rows: Vec::new(),
        }
    }

    /// Adds a row; a hit gets its ratio to the floor of the same behavior and concurrency.
    pub fn push(&mut self, mut m: Measurement) {
        if m.kind == "hit"
            && let Some(floor) = self.rows.iter().find(|f| {
                f.kind == "floor" && f.behavior == m.behavior && f.concurrency == m.concurrency
            })
            && floor.p50_us > 0.0
        {
            m.p50_over_floor = Some((m.p50_us / floor.p50_us * 100.0).round() / 100.0);
        }
        self.rows.push(m);
    }

    /// The JSON record (`--json`, and embedded in the HTML report).
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table printed on a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{:<22} {:>5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
            "", "conc", "calls", "p50", "p90", "p99", "max", "ops/s", "p50/floor"
        );
        let mut last_c = 0;
        for r in &self.rows {
            if r.concurrency != last_c && last_c != 0 {
                out.push('\n');
            }
            last_c = r.concurrency;
            let ratio = r
                .p50_over_floor
                .map_or(String::new(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "{:<22} {:>5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>10.0} {:>8}{}",
                r.label(),
                r.concurrency,
                r.count,
                us(r.p50_us),
                us(r.p90_us),
                us(r.p99_us),
                us(r.max_us),
                r.ops_per_s,
                ratio,
                match (r.errors, r.flush_s) {
                    (0, Some(f)) => format!("  (write-behind drained in {f:.2} s)"),
                    (0, None) => String::new(),
                    (n, _) => format!("  ({n} failed)"),
                }
            );
        }
        let _ = writeln!(
            out,
            "\nfloors: {}; hits through remote_cache::RemoteCacheRunner on a fresh local store per pass",
            self.floor
        );
        out
    }

    /// One self-contained HTML page: summary, table, charts (inline SVG), data (JSON).
    pub fn html(&self) -> String {
        let mut behaviors: Vec<&str> = Vec::new();
        for r in self.rows.iter().filter(|r| r.kind == "hit") {
            if !behaviors.contains(&r.behavior.as_str()) {
                behaviors.push(&r.behavior);
            }
        }
        let mut charts = String::new();
        for b in &behaviors {
            let _ = writeln!(
                charts,
                "<figure data-chart=\"latency-{b}\">{}<figcaption>Latency distribution of a \
                 {b} hit (solid) against its floor (thin), per concurrency</figcaption></figure>",
                self.latency_svg(b)
            );
        }
        let _ = writeln!(
            charts,
            "<figure data-chart=\"throughput\">{}<figcaption>Throughput against concurrency\
             </figcaption></figure>",
            self.throughput_svg()
        );
        let mut table = String::from(
            "<table><tr><th></th><th>conc</th><th>calls</th><th>p50 µs</th><th>p90 µs</th>\
             <th>p99 µs</th><th>max µs</th><th>ops/s</th><th>p50/floor</th><th>failed</th></tr>",
        );
        for r in &self.rows {
            let _ = write!(
                table,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{:.0}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.label()),
                r.concurrency,
                r.count,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.max_us,
                r.ops_per_s,
                r.p50_over_floor
                    .map_or(String::new(), |x| format!("{x:.2}")),
                r.errors
            );
        }
        table.push_str("</table>");
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>recache bench: {target}</title>\
             <style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{padding:2px 8px;text-align:right;\
             border-bottom:1px solid #ddd}}td:first-child{{text-align:left}}\
             figure{{display:inline-block;margin:1em}}</style></head><body>\
             <h1>recache bench</h1><p>Cache: <b>{target}</b>. {actions} actions × {outputs}; \
             {blobs} blobs, {mib:.1} MiB populated in {pop:.1} s under namespace <code>{ns}</code>. \
             Floors: {floor}.</p>{table}{charts}\
             <script type=\"application/json\" id=\"recache-bench-data\">{json}</script>\
             </body></html>\n",
            target = escape(&self.target),
            actions = self.actions,
            outputs = escape(&self.outputs),
            blobs = self.populated_blobs,
            mib = self.populated_bytes as f64 / 1048576.0,
            pop = self.populate_s,
            ns = escape(&self.namespace),
            floor = escape(self.floor),
            json = self.json().replace("</", "<\\/"),
        )
    }

    /// Latency (µs, log scale) along the percentiles (x in "nines": 90 % → 1, 99 % → 2, …).
    fn latency_svg(&self, behavior: &str) -> String {
        let nines = |p: f64| -(1.0 - (p / 100.0).min(0.9999)).log10();
        let series: Vec<&Measurement> = self
            .rows
            .iter()
            .filter(|r| r.behavior == behavior && (r.kind == "hit" || r.kind == "floor"))
            .collect();
        let values = || {
            series
                .iter()
                .flat_map(|r| r.percentiles.iter().map(|(_, v)| *v))
        };
        let top = values().fold(1.0f64, f64::max);
        let bottom = values().fold(top, f64::min).max(1.0);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 380)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let chart = ChartBuilder::on(&root)
                .caption(format!("{behavior} hit vs floor"), ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..4.0f64, (bottom * 0.7..top * 1.4).log_scale());
            let Ok(mut chart) = chart else {
                return String::new();
            };
            let _ = chart
                .configure_mesh()
                .light_line_style(RGBColor(242, 242, 242))
                .x_desc("percentile")
                .y_desc("µs")
                .y_label_formatter(&|v| format!("{v:.0}"))
                .x_labels(5)
                .x_label_formatter(&|x| match x.round() as i32 {
                    0 => "0".into(),
                    1 => "90".into(),
                    2 => "99".into(),
                    3 => "99.9".into(),
                    _ => "99.99".into(),
                })
                .draw();
            let levels: Vec<usize> = {
                let mut v: Vec<usize> = series.iter().map(|r| r.concurrency).collect();
                v.dedup();
                v
            };
            for r in &series {
                let color = color(levels.iter().position(|c| *c == r.concurrency).unwrap_or(0));
                let width = if r.kind == "hit" { 2 } else { 1 };
                let points: Vec<(f64, f64)> = r
                    .percentiles
                    .iter()
                    .map(|(p, v)| (nines(*p), v.max(1.0)))
                    .collect();
                let style = color.stroke_width(width);
                if let Ok(s) = chart.draw_series(LineSeries::new(points, style)) {
                    s.label(format!("{} c{}", r.kind, r.concurrency))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
            }
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw();
            let _ = root.present();
        }
        svg
    }

    /// Operations per second against concurrency (log 2), one line per kind and behavior.
    fn throughput_svg(&self) -> String {
        let mut labels: Vec<String> = Vec::new();
        for r in &self.rows {
            if !labels.contains(&r.label()) {
                labels.push(r.label());
            }
        }
        let max_c = self.rows.iter().map(|r| r.concurrency).max().unwrap_or(1) as f64;
        let top = self.rows.iter().map(|r| r.ops_per_s).fold(1.0f64, f64::max);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (640, 380)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let chart = ChartBuilder::on(&root)
                .caption("throughput", ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(70)
                .build_cartesian_2d((1.0..max_c.max(2.0)).log_scale(), 0.0..top * 1.15);
            let Ok(mut chart) = chart else {
                return String::new();
            };
            let _ = chart
                .configure_mesh()
                .light_line_style(RGBColor(242, 242, 242))
                .x_desc("calls in flight")
                .y_desc("calls / s")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw();
            for (i, label) in labels.iter().enumerate() {
                let points: Vec<(f64, f64)> = self
                    .rows
                    .iter()
                    .filter(|r| &r.label() == label)
                    .map(|r| (r.concurrency as f64, r.ops_per_s))
                    .collect();
                let color = color(i);
                let width = if label.starts_with("floor") { 1 } else { 2 };
                let style = color.stroke_width(width);
                if let Ok(s) = chart.draw_series(LineSeries::new(points.clone(), style)) {
                    s.label(label.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
                let _ = chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                );
            }
            let _ = chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw();
            let _ = root.present();
        }
        svg
    }
}

/// Microseconds for the table: µs below 10 ms, ms above.
fn us(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.0} µs")
    } else {
        format!("{:.1} ms", v / 1000.0)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
