//! Plots of a run's `metrics.jsonl` as SVG: loss (train and valid, in bpc or perplexity where
//! the run reports them, else nats), learning rate and throughput against the step. Written at
//! the end of every run, and on demand by `train --plot RUN_DIR`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde_json::Value;

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points in order.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub color: RGBColor,
}

/// Distinct line colours for charts with many series (cycled).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Read `metrics.jsonl` and write `loss.svg`, `lr.svg` and `throughput.svg` into `run_dir`.
/// Returns the files written.
pub fn write_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let metric = ["bpc", "ppl"]
        .into_iter()
        .find(|m| lines.iter().any(|l| l.get(*m).is_some()))
        .unwrap_or("loss");
    let series = |split: &str, key: &str, color: RGBColor| Series {
        label: format!("{split} {key}"),
        points: lines
            .iter()
            .filter(|l| l["split"] == split)
            .filter_map(|l| Some((l["step"].as_f64()?, l.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect(),
        color,
    };
    let charts = [
        (
            "loss.svg",
            metric,
            vec![series("train", metric, BLUE), series("valid", metric, RED)],
        ),
        ("lr.svg", "learning rate", vec![series("train", "lr", BLUE)]),
        (
            "throughput.svg",
            "tokens/s",
            vec![series("train", "tokens_per_s", BLUE)],
        ),
    ];
    let mut written = vec![];
    for (file, y_label, series) in charts {
        let series: Vec<Series> = series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let out = run_dir.join(file);
        chart(&out, "step", y_label, &series)
            .map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}

/// Draw `series` as lines into the SVG file `out`.
pub fn chart(
    out: &Path,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), Box<dyn std::error::Error>> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()?;
    for s in series {
        let color = s.color;
        if s.points.len() == 1 {
            // A lone point (one run in a scatter) would be an invisible line.
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, color.filled())))?
                .label(s.label.clone())
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_the_runs_series() {
        let dir = std::env::temp_dir().join(format!("mixlab-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = String::new();
        for step in 1..=20 {
            let loss = 3.0 / f64::from(step);
            text += &format!(
                "{{\"step\":{step},\"split\":\"train\",\"loss\":{loss},\"bpc\":{},\"lr\":0.001,\"tokens_per_s\":1000}}\n",
                loss / 2f64.ln()
            );
            if step % 5 == 0 {
                text += &format!(
                    "{{\"step\":{step},\"split\":\"valid\",\"loss\":{loss},\"bpc\":{}}}\n",
                    loss / 2f64.ln()
                );
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let files = write_plots(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(
            svg.contains("train bpc") && svg.contains("valid bpc") && svg.contains("<polyline")
        );
    }
}
