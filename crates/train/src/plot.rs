//! Plots of a run's `metrics.jsonl` as SVG: loss (train and valid, in bpc or perplexity where
//! the run reports them, else nats), learning rate, throughput and (adaptive span) the learned
//! spans per layer against the step. Written at
//! the end of every run, and on demand by `train --plot RUN_DIR`.

use std::f64::consts::LN_2;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::{BoldPoints, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
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

/// How a chart is labelled.
pub struct Axes {
    /// Title above the plot (the run and its mixer, or the report's name).
    pub title: String,
    /// x-axis description.
    pub x_label: String,
    /// y-axis description.
    pub y_label: String,
    /// x is a step count: only integer ticks are labelled, without a fraction.
    pub integer_x: bool,
    /// Tick label of a y value (e.g. nats with bpc beside them); `None`: the plain number.
    pub y_ticks: Option<fn(f64) -> String>,
}

/// Read `metrics.jsonl` and write `loss.svg`, `lr.svg`, `throughput.svg` and, for runs with an
/// adaptive span, `spans.svg` into `run_dir`.
/// The loss chart is in nats with bpc or perplexity beside each tick where the run reports
/// them, on a log scale when the loss spans a decade or more (the copy task falls to ~0);
/// every chart's title names the run and its mixer. Returns the files written.
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
        .find(|m| lines.iter().any(|l| l.get(*m).is_some()));
    let series = |split: &str, key: &str, color: RGBColor| Series {
        label: format!(
            "{split} {}",
            if key == "tokens_per_s" {
                "tokens/s"
            } else {
                key
            }
        ),
        points: lines
            .iter()
            .filter(|l| l["split"] == split)
            .filter_map(|l| Some((l["step"].as_f64()?, l.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect(),
        color,
    };
    let run = run_title(run_dir);
    let loss_ticks: Option<fn(f64) -> String> = match metric {
        Some("bpc") => Some(|nats| format!("{} ({} bpc)", tick(nats), tick(nats / LN_2))),
        Some("ppl") => Some(|nats| format!("{} (ppl {})", tick(nats), tick(nats.exp()))),
        _ => None,
    };
    let loss_label = match metric {
        Some(m) => format!("loss, nats ({m} in brackets)"),
        None => "loss, nats".to_string(),
    };
    let charts = [
        (
            "loss.svg",
            "loss",
            loss_label,
            loss_ticks,
            vec![series("train", "loss", BLUE), series("valid", "loss", RED)],
        ),
        (
            "lr.svg",
            "learning rate",
            "learning rate".to_string(),
            None,
            vec![series("train", "lr", BLUE)],
        ),
        (
            "throughput.svg",
            "throughput",
            "tokens/s".to_string(),
            None,
            vec![series("train", "tokens_per_s", BLUE)],
        ),
    ];
    // Adaptive spans (valid lines of all-attention runs): each layer's largest span over its
    // heads, the cache positions it reads (`Mixer::trim_cache`), and its mean over heads.
    let layers = lines
        .iter()
        .filter_map(|l| l["learned_spans"].as_array().map(Vec::len))
        .max()
        .unwrap_or(0);
    let span_series = |layer: usize, reduce: fn(&[f64]) -> f64, label: &str, color| Series {
        label: format!("layer {layer} {label}"),
        points: lines
            .iter()
            .filter(|l| l["split"] == "valid")
            .filter_map(|l| {
                let heads: Vec<f64> = l["learned_spans"]
                    .get(layer)?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                (!heads.is_empty()).then(|| Some((l["step"].as_f64()?, reduce(&heads))))?
            })
            .collect(),
        color,
    };
    let mut spans = vec![];
    for layer in 0..layers {
        let color = PALETTE[layer % PALETTE.len()];
        spans.push(span_series(
            layer,
            |h| h.iter().cloned().fold(0.0, f64::max),
            "max",
            color,
        ));
        let mean = |h: &[f64]| h.iter().sum::<f64>() / h.len() as f64;
        // The same hue, halfway to white.
        let light = |c: u8| c + (255 - c) / 2;
        let pale = RGBColor(light(color.0), light(color.1), light(color.2));
        spans.push(span_series(layer, mean, "mean", pale));
    }
    let mut charts: Vec<_> = charts.into_iter().collect();
    charts.push((
        "spans.svg",
        "learned attention spans",
        "span, tokens".to_string(),
        None,
        spans,
    ));
    let mut written = vec![];
    for (file, what, y_label, y_ticks, series) in charts {
        let series: Vec<Series> = series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let out = run_dir.join(file);
        let axes = Axes {
            title: format!("{run}: {what}"),
            x_label: "step".into(),
            y_label,
            integer_x: true,
            y_ticks,
        };
        chart(&out, &axes, &series).map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}

/// A tick value as the number it is: four significant digits, trailing zeros dropped, in
/// scientific notation below 0.001 or from 1e6 (`0.25`, `2.308`, `1e-4`, `2.5e-5`, `1e6`), so
/// a log axis's decades read `1e-4`, not `9.999999999e-5`.
pub fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let sci = format!("{v:.3e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-3..6).contains(&exponent) {
        let decimals = (3 - exponent).max(0) as usize;
        trim(&format!("{v:.decimals$}"))
    } else {
        format!("{}e{exponent}", trim(mantissa))
    }
}

/// "`<run directory name>` (`<mixer>`)": the mixer kind from the run's `config.toml`
/// (`hybrid` when layers choose their own), or the name alone without a readable config.
fn run_title(run_dir: &Path) -> String {
    let name = run_dir.file_name().map_or_else(
        || run_dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mixer = std::fs::read_to_string(run_dir.join("config.toml"))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|config| {
            let model = config.get("model")?.as_table()?;
            if model.get("layers").is_some() {
                return Some("hybrid".to_string());
            }
            let kind = model.get("mixer")?.as_table()?.get("kind")?.as_str()?;
            Some(kind.to_string())
        });
    match mixer {
        Some(mixer) => format!("{name} ({mixer})"),
        None => name,
    }
}

/// Draw `series` as lines into the SVG file `out`, labelled by `axes`. The y axis is
/// logarithmic when every value is positive and they span a factor of ten or more.
pub fn chart(out: &Path, axes: &Axes, series: &[Series]) -> Result<(), Box<dyn std::error::Error>> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    // Lone points (a scatter) keep a margin from the frame, so no marker is cut in half; a
    // single x value is centred.
    if x1 <= x0 {
        let pad = 0.05 * x0.abs().max(1.0);
        (x0, x1) = (x0 - pad, x1 + pad);
    } else if series.iter().any(|s| s.points.len() == 1) {
        let pad = 0.05 * (x1 - x0);
        (x0, x1) = (x0 - pad, x1 + pad);
    }
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let log = y0 > 0.0 && y1 >= 10.0 * y0;
    let y_range = if log {
        y0 * 0.9..y1 * 1.1
    } else {
        // A constant series (a fixed learning rate) gets 5% of its value on each side, so
        // its ticks are distinct numbers.
        let size = y0.abs().max(y1.abs());
        let pad = if y1 - y0 > 1e-9 * size {
            (y1 - y0) * 0.05
        } else if size > 0.0 {
            size * 0.05
        } else {
            1.0
        };
        (y0 - pad)..(y1 + pad)
    };
    // The tick labels plotters will draw (the same coordinate, the same count), so the label
    // area is as wide as the widest of them plus the axis title: the title never overlaps.
    let ticks: Vec<f64> = if log {
        LogCoord::from(y_range.clone().log_scale()).key_points(BoldPoints(Y_TICKS))
    } else {
        RangedCoordf64::from(y_range.clone()).key_points(BoldPoints(Y_TICKS))
    };
    let widest = ticks
        .iter()
        .map(|&y| text_width(&y_tick_label(axes, y), LABEL_PX))
        .fold(0.0, f64::max);
    let y_area = (widest + TICK_GAP_PX + 2.0 * DESC_PX).ceil() as u32;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&axes.title, ("sans-serif", CAPTION_PX))
        .margin(16)
        .x_label_area_size((LABEL_PX + TICK_GAP_PX + 2.0 * DESC_PX).ceil() as u32)
        .y_label_area_size(y_area);
    if log {
        let chart = builder.build_cartesian_2d(x0..x1, y_range.log_scale())?;
        draw(chart, axes, series)?;
    } else {
        let chart = builder.build_cartesian_2d(x0..x1, y_range)?;
        draw(chart, axes, series)?;
    }
    root.present()?;
    Ok(())
}

/// Font sizes (pixels) of tick labels, axis titles and the chart's caption, and the y-axis
/// tick count.
const LABEL_PX: f64 = 12.0;
const DESC_PX: f64 = 13.0;
const CAPTION_PX: f64 = 18.0;
const TICK_GAP_PX: f64 = 14.0;
const Y_TICKS: usize = 10;

/// An upper bound of `text`'s width in a sans-serif font of `px` pixels (0.62 em a character:
/// wider than any digit, letter or bracket of the labels in common sans-serif fonts but `m`
/// and `w`, which tick labels do not repeat).
pub fn text_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * 0.62 * px
}

/// The y tick label of `y`: the chart's own formatter, or the plain number.
fn y_tick_label(axes: &Axes, y: f64) -> String {
    match axes.y_ticks {
        Some(f) => f(y),
        None => tick(y),
    }
}

/// Mesh, lines and legend of [`chart`], whatever the y coordinate (linear or log).
fn draw<'a, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    axes: &Axes,
    series: &[Series],
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let x_ticks = |x: &f64| {
        if (x - x.round()).abs() < 1e-9 {
            format!("{}", x.round() as i64)
        } else {
            String::new()
        }
    };
    let plain_x = |x: &f64| tick(*x);
    let y_ticks = |y: &f64| y_tick_label(axes, *y);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(&axes.x_label)
        .y_desc(&axes.y_label)
        .y_labels(Y_TICKS)
        .label_style(("sans-serif", LABEL_PX))
        .axis_desc_style(("sans-serif", DESC_PX))
        .y_label_formatter(&y_ticks);
    if axes.integer_x {
        mesh.x_label_formatter(&x_ticks);
    } else {
        mesh.x_label_formatter(&plain_x);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for s in series {
        let color = s.color;
        if s.points.len() == 1 {
            // A lone point (one run in a scatter) would be an invisible line.
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", LABEL_PX))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `metrics.jsonl` of `steps` steps whose loss falls as `start / step^power`.
    fn metrics(dir: &Path, steps: u32, start: f64, power: f64) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let mut text = String::new();
        for step in 1..=steps {
            let loss = start / f64::from(step).powf(power);
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
    }

    /// Tick and legend texts of an SVG file (the contents of its `<text>` elements).
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once(">")?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn plots_are_titled_in_nats_with_bpc_and_integer_steps() {
        let dir = std::env::temp_dir().join(format!("mixlab-plot-{}", std::process::id()));
        metrics(&dir, 12, 3.0, 0.2);
        std::fs::write(
            dir.join("config.toml"),
            "[model.mixer]\nkind = \"fourier\"\n",
        )
        .unwrap();
        let files = write_plots(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("<polyline"));
        let texts = texts(&svg);
        let name = dir.file_name().unwrap().to_string_lossy();
        assert!(
            texts.contains(&format!("{name} (fourier): loss")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "train loss") && texts.iter().any(|t| t == "valid loss"));
        assert!(
            texts.iter().any(|t| t.starts_with("loss, nats")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.ends_with(" bpc)")),
            "bpc beside the nats: {texts:?}"
        );
        // Step ticks: integers only (1..=12 would otherwise be labelled 1.0, 1.5, ...).
        let steps: Vec<&String> = texts.iter().filter(|t| t.parse::<f64>().is_ok()).collect();
        assert!(!steps.is_empty(), "{texts:?}");
        assert!(steps.iter().all(|t| t.parse::<i64>().is_ok()), "{steps:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_loss_spanning_decades_is_drawn_on_a_log_scale() {
        let dir = std::env::temp_dir().join(format!("mixlab-plot-log-{}", std::process::id()));
        let y_ticks = |start: f64, power: f64| {
            metrics(&dir, 40, start, power);
            write_plots(&dir).unwrap();
            let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
            texts(&svg)
                .iter()
                .filter_map(|t| {
                    t.strip_suffix(" bpc)")?
                        .split(' ')
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
                .collect::<Vec<f64>>()
        };
        // 3 nats falling to 3/40³ ≈ 5e-5: log scale, ticks spread over several decades.
        let log = y_ticks(3.0, 3.0);
        let (lo, hi) = log
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), &t| (a.min(t), b.max(t)));
        assert!(lo > 0.0 && hi / lo >= 100.0, "log-scale ticks {log:?}");
        // 3 → 2.3 nats: linear, evenly spaced ticks.
        let linear = y_ticks(3.0, 0.07);
        let steps: Vec<f64> = linear.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
        assert!(
            steps.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-2),
            "linear ticks {linear:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ticks_are_printed_as_the_numbers_they_are() {
        for (v, want) in [
            (9.999999999e-5, "1e-4"),
            (9.9999999999e-6, "1e-5"),
            (2.5e-5, "2.5e-5"),
            (0.001, "0.001"),
            (0.0123456, "0.01235"),
            (0.25, "0.25"),
            (2.30759, "2.308"),
            (3.0, "3"),
            (-0.5, "-0.5"),
            (1200.0, "1200"),
            (2e6, "2e6"),
            (0.0, "0"),
        ] {
            assert_eq!(tick(v), want, "{v}");
        }
    }

    /// `<text>` elements as (x, y, font size, anchor, rotated, text).
    fn text_boxes(svg: &str) -> Vec<(f64, f64, f64, String, bool, String)> {
        let attr = |tag: &str, name: &str| -> Option<String> {
            let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            Some(tag[at..].split('"').next()?.to_string())
        };
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let (tag, rest) = t.split_once('>')?;
                let text = rest.split_once("</text>")?.0.trim().to_string();
                Some((
                    attr(tag, "x")?.parse().ok()?,
                    attr(tag, "y")?.parse().ok()?,
                    attr(tag, "font-size")?.parse().ok()?,
                    attr(tag, "text-anchor")?,
                    tag.contains("rotate("),
                    text,
                ))
            })
            .collect()
    }

    /// The axis titles of every loss chart kind (nats only on a log scale, as the copy task
    /// draws it; nats with bpc; nats with perplexity) clear their tick labels, and no tick
    /// label is a float's rounding residue.
    #[test]
    fn axis_titles_never_overlap_tick_labels() {
        let dir = std::env::temp_dir().join(format!("mixlab-plot-boxes-{}", std::process::id()));
        for metric in ["none", "bpc", "ppl"] {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut text = String::new();
            for step in 1..=600u32 {
                let loss = 2.8 / f64::from(step).powf(1.6);
                let extra = match metric {
                    "bpc" => format!(",\"bpc\":{}", loss / LN_2),
                    "ppl" => format!(",\"ppl\":{}", loss.exp()),
                    _ => String::new(),
                };
                text += &format!(
                    "{{\"step\":{step},\"split\":\"train\",\"loss\":{loss}{extra},\"lr\":0.001,\"tokens_per_s\":123456.7}}\n"
                );
            }
            std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
            for file in write_plots(&dir).unwrap() {
                let svg = std::fs::read_to_string(&file).unwrap();
                let boxes = text_boxes(&svg);
                let name = file.display();
                // The y-axis title: rotated, its glyphs spanning [x, x + size] across.
                let (dx, _, dsize, _, _, _) = boxes
                    .iter()
                    .find(|b| b.4)
                    .unwrap_or_else(|| panic!("{name}: no y-axis title"))
                    .clone();
                let y_ticks: Vec<_> = boxes.iter().filter(|b| b.3 == "end").collect();
                assert!(y_ticks.len() >= 3, "{name}: {boxes:?}");
                for (x, _, size, _, _, label) in &y_ticks {
                    let left = x - text_width(label, *size);
                    assert!(
                        dx + 1.25 * dsize < left,
                        "{name}: the y title (x {dx}, {dsize} px) overlaps tick {label:?} \
                         (from x {left})"
                    );
                    // At most four significant digits: no float rounding residue such as
                    // `9.999999999e-5`.
                    let short = label
                        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                        .all(|n| n.split_once('.').is_none_or(|(_, f)| f.len() <= 6));
                    assert!(short, "{name}: tick {label:?}");
                }
                let distinct: std::collections::BTreeSet<&String> =
                    y_ticks.iter().map(|b| &b.5).collect();
                assert_eq!(distinct.len(), y_ticks.len(), "{name}: {y_ticks:?}");
                // The x-axis title sits below the step ticks.
                let (_, desc_y, desc_size, _, _, _) = boxes
                    .iter()
                    .find(|b| b.5 == "step")
                    .unwrap_or_else(|| panic!("{name}: no x-axis title"))
                    .clone();
                for (_, y, size, anchor, rotated, label) in &boxes {
                    if anchor == "middle" && !rotated && label.parse::<f64>().is_ok() {
                        assert!(
                            y + size < desc_y - 1.3 * desc_size,
                            "{name}: the x title overlaps tick {label:?}"
                        );
                    }
                }
            }
        }
        // A log loss axis labels its decades as such.
        let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
        let labels = texts(&svg);
        assert!(
            labels.iter().any(|l| l.starts_with("1e-")),
            "decade ticks: {labels:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
