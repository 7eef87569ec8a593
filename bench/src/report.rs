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

/// Draws throughput (keep-alive and close, per system) and supervisor memory.
pub fn write_chart(path: &Path, title: &str, results: &Results) -> Result<()> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("cannot load the chart font"))?;
    let rows = results.throughput.len().max(1);
    let mem_rows = results.memory.len().max(1);
    let height = 120 + 44 * rows as u32 + 40 * mem_rows as u32 + 120;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let split = (44 * rows as u32 + 90) as i32;
    let (top, bottom) = root.split_vertically(split);

    let max_rps = results
        .throughput
        .iter()
        .flat_map(|(_, a, b)| [*a, *b])
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let labels: Vec<String> = results
        .throughput
        .iter()
        .map(|(l, _, _)| l.clone())
        .collect();
    let mut chart = ChartBuilder::on(&top)
        .caption("throughput, req/s (median)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max_rps * 1.15, (0..rows).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, (_, ka, close)) in results.throughput.iter().enumerate() {
        // Keep-alive in the upper half of the row, close in the lower half.
        let bars = [
            (
                *ka,
                BLUE.mix(0.7),
                SegmentValue::Exact(i),
                SegmentValue::CenterOf(i),
            ),
            (
                *close,
                RED.mix(0.7),
                SegmentValue::CenterOf(i),
                SegmentValue::Exact(i + 1),
            ),
        ];
        for (v, color, from, to) in bars {
            if v.is_finite() {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, from), (v, to)],
                    color.filled(),
                )))?;
            }
        }
    }
    // Legend, drawn by hand for a stable look.
    top.draw(&Rectangle::new(
        [(900, 40), (915, 52)],
        BLUE.mix(0.7).filled(),
    ))?;
    top.draw(&Text::new("keep-alive", (920, 38), ("sans-serif", 13)))?;
    top.draw(&Rectangle::new(
        [(900, 58), (915, 70)],
        RED.mix(0.7).filled(),
    ))?;
    top.draw(&Text::new(
        "Connection: close",
        (920, 56),
        ("sans-serif", 13),
    ))?;

    let mem_labels: Vec<String> = results.memory.iter().map(|(l, _)| l.clone()).collect();
    let max_mem = results
        .memory
        .iter()
        .map(|(_, v)| *v / 1024.0)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("supervisor RSS, idle, MiB", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max_mem * 1.15, (0..mem_rows).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(mem_rows)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => mem_labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(
        results
            .memory
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_finite())
            .map(|(i, (_, v))| {
                Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*v / 1024.0, SegmentValue::CenterOf(i)),
                    ],
                    GREEN.mix(0.7).filled(),
                )
            }),
    )?;
    root.present()?;
    Ok(())
}
