//! What the scenarios produce: markdown sections, target checks, chart data;
//! and the writers for docs/BENCHMARKS.md and the PNG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

/// A target from the issue, checked against a measured figure.
#[derive(Debug, Clone)]
pub struct Target {
    /// What is compared.
    pub what: String,
    /// The measured value, formatted.
    pub measured: String,
    /// The goal, formatted.
    pub goal: String,
    /// Whether it was met.
    pub met: bool,
}

/// Everything measured in one run.
#[derive(Debug, Default)]
pub struct Results {
    /// (title, markdown) per scenario, in order.
    pub sections: Vec<(String, String)>,
    /// Target checks.
    pub targets: Vec<Target>,
    /// (system, keep-alive req/s, close req/s) medians, for the chart.
    pub throughput: Vec<(String, f64, f64)>,
    /// (supervisor, idle RSS KiB), for the chart.
    pub memory: Vec<(String, f64)>,
    /// Command lines used, for the report.
    pub commands: Vec<(String, String)>,
}

impl Results {
    /// Records a target check.
    pub fn target(
        &mut self,
        what: impl Into<String>,
        measured: String,
        goal: impl Into<String>,
        met: bool,
    ) {
        self.targets.push(Target {
            what: what.into(),
            measured,
            goal: goal.into(),
            met,
        });
    }

    /// Records a command line (once per label).
    pub fn command(&mut self, label: &str, line: String) {
        if !self.commands.iter().any(|(l, _)| l == label) {
            self.commands.push((label.to_string(), line));
        }
    }
}

/// Median, min and max of a sample.
pub fn stats(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// `12.3k (11.9k–12.8k)`.
pub fn fmt_rps(values: &[f64]) -> String {
    let (m, lo, hi) = stats(values);
    if values.len() > 1 {
        format!("{} ({}–{})", k(m), k(lo), k(hi))
    } else {
        k(m)
    }
}

/// Thousands with one decimal.
pub fn k(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{:.1}k", v / 1000.0)
    }
}

/// Microseconds as µs or ms.
pub fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Median (min–max) of durations in µs.
pub fn fmt_us_stats(values: &[f64]) -> String {
    let (m, lo, hi) = stats(values);
    if values.len() > 1 {
        format!("{} ({}–{})", fmt_us(m), fmt_us(lo), fmt_us(hi))
    } else {
        fmt_us(m)
    }
}

/// KiB as MiB.
pub fn mib(kib: f64) -> String {
    if kib.is_nan() {
        "–".into()
    } else {
        format!("{:.1} MiB", kib / 1024.0)
    }
}

/// Writes the markdown report.
pub fn write_markdown(path: &Path, header: &str, results: &Results) -> Result<()> {
    let mut md = String::new();
    md.push_str(header);
    md.push_str("\n## Targets\n\n| target | measured | goal | |\n|---|---|---|---|\n");
    for t in &results.targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.what,
            t.measured,
            t.goal,
            if t.met { "met" } else { "**MISSED**" }
        );
    }
    for (title, body) in &results.sections {
        let _ = write!(md, "\n## {title}\n\n{body}\n");
    }
    md.push_str("\n## Commands\n\n");
    for (label, line) in &results.commands {
        let _ = writeln!(md, "- {label}: `{line}`");
    }
    std::fs::write(path, md)?;
    Ok(())
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

type Area<'a> =
    plotters::drawing::DrawingArea<plotters::backend::BitMapBackend<'a>, plotters::coord::Shift>;

/// One horizontal bar chart: a bar per (label, value).
fn bar_panel(
    area: &Area<'_>,
    caption: &str,
    rows: &[(String, f64)],
    color: plotters::style::RGBColor,
    format: &dyn Fn(f64) -> String,
) -> Result<()> {
    use plotters::prelude::*;
    let n = rows.len().max(1);
    let max = rows
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(1e-9f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max * 1.12, (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format(*v))
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(
        rows.iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_finite())
            .map(|(i, (_, v))| {
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*v, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.75).filled(),
                );
                bar.set_margin(4, 4, 0, 0);
                bar
            }),
    )?;
    Ok(())
}

/// Draws throughput (keep-alive, close) per system and supervisor memory.
pub fn write_chart(path: &Path, title: &str, results: &Results) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("cannot load the chart font"))?;
    let t = results.throughput.len().max(1) as u32;
    let m = results.memory.len().max(1) as u32;
    let panel = |rows: u32| 70 + 26 * rows;
    let height = 40 + 2 * panel(t) + panel(m);
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (ka_area, rest) = root.split_vertically(panel(t));
    let (close_area, mem_area) = rest.split_vertically(panel(t));
    let kilo = |v: f64| format!("{:.0}k", v / 1000.0);
    let ka: Vec<(String, f64)> = results
        .throughput
        .iter()
        .map(|(l, v, _)| (l.clone(), *v))
        .collect();
    let close: Vec<(String, f64)> = results
        .throughput
        .iter()
        .map(|(l, _, v)| (l.clone(), *v))
        .collect();
    bar_panel(&ka_area, "keep-alive, req/s (median)", &ka, BLUE, &kilo)?;
    bar_panel(
        &close_area,
        "Connection: close, req/s (median)",
        &close,
        RED,
        &kilo,
    )?;
    let mem: Vec<(String, f64)> = results
        .memory
        .iter()
        .map(|(l, v)| (l.clone(), v / 1024.0))
        .collect();
    bar_panel(&mem_area, "supervisor RSS, idle, MiB", &mem, GREEN, &|v| {
        format!("{v:.0}")
    })?;
    root.present()?;
    Ok(())
}
