//! Comparison reports over several run directories: a markdown table (parameters, best valid
//! loss and bpc/ppl, final test, tokens/s, peak memory, attention density and keys per token)
//! and SVG plots (valid loss against step and against wall time; quality against density).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use mixlab_models::MixerConfig;
use serde_json::Value;

use crate::Config;
use crate::plot::{Axes, PALETTE, Series, chart};

/// What the report says about one run.
#[derive(Debug, Clone)]
pub struct RunRow {
    /// The run directory's name.
    pub name: String,
    /// Mixer kind, with the sparse patterns (`sparse: strided`).
    pub mixer: String,
    /// Parameter count (from `summary.json`).
    pub params: Option<u64>,
    /// Best validation loss (nats) and its step.
    pub best_valid: Option<(f64, u64)>,
    /// Final test loss (nats).
    pub final_test: Option<f64>,
    /// `bpc` or `ppl`, when the run reports one.
    pub metric: Option<&'static str>,
    /// Training tokens/s of the last session.
    pub tokens_per_s: Option<f64>,
    /// Peak resident memory of the last session (MB).
    pub peak_rss_mb: Option<f64>,
    /// Attended pairs / dense pairs, for attention mixers (1 for dense).
    pub density: Option<f64>,
    /// Mean keys per token, for attention mixers.
    pub keys_per_token: Option<f64>,
    /// Valid losses `(step, elapsed seconds, loss)`.
    pub valid: Vec<(f64, Option<f64>, f64)>,
}

/// Read one run directory (`config.toml`, `summary.json`, `metrics.jsonl`).
pub fn read_run(dir: &Path) -> Result<RunRow> {
    let config = Config::load(&dir.join("config.toml"), &[])
        .with_context(|| format!("{} is not a run directory", dir.display()))?;
    let metrics_path = dir.join("metrics.jsonl");
    let lines: Vec<Value> = std::fs::read_to_string(&metrics_path)
        .with_context(|| format!("cannot read {}", metrics_path.display()))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary: Option<Value> = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let summary = summary.unwrap_or(Value::Null);
    let metric = ["bpc", "ppl"]
        .into_iter()
        .find(|m| lines.iter().any(|l| l.get(*m).is_some()));
    // Wall time at a step: the `elapsed_s` of the last train line at or before it.
    let elapsed_at = |step: f64| {
        lines
            .iter()
            .rev()
            .filter(|l| l["split"] == "train" && l["step"].as_f64().is_some_and(|s| s <= step))
            .find_map(|l| l["elapsed_s"].as_f64())
    };
    let valid: Vec<(f64, Option<f64>, f64)> = lines
        .iter()
        .filter(|l| l["split"] == "valid")
        .filter_map(|l| {
            let step = l["step"].as_f64()?;
            Some((step, elapsed_at(step), l["loss"].as_f64()?))
        })
        .collect();
    let best_valid = valid
        .iter()
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map(|&(s, _, l)| (l, s as u64));
    let final_test = lines
        .iter()
        .rfind(|l| l["split"] == "test")
        .and_then(|l| l["loss"].as_f64());
    let model = &config.model;
    let mut mixer = model.kind().to_string();
    let (mut density, mut keys_per_token) = (None, None);
    let n = model.seq_len;
    let mixers = model.layer_mixers()?;
    if let Some((config, layers)) = crate::patterns::sparse_mixers(model)?.first() {
        // Density only: the Assumption-1 verdicts are not part of the table.
        let patterns = crate::patterns::layer_patterns(config, layers, n);
        let c = mixlab_models::pattern::check::connections(&patterns, n);
        mixer = format!("sparse: {}", config.pattern_names(" | "));
        density = Some(c.density);
        keys_per_token = Some(c.mean);
    } else if mixers
        .iter()
        .all(|m| matches!(m, MixerConfig::Dense(_) | MixerConfig::Persistent(_)))
    {
        let causal = model.is_causal();
        density = Some(1.0);
        keys_per_token = Some(if causal {
            (n + 1) as f64 / 2.0
        } else {
            n as f64
        });
    }
    Ok(RunRow {
        name: dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        mixer,
        params: summary["params"].as_u64(),
        best_valid,
        final_test,
        metric,
        tokens_per_s: summary["tokens_per_s"].as_f64(),
        peak_rss_mb: summary["peak_rss_mb"].as_f64(),
        density,
        keys_per_token,
        valid,
    })
}

fn in_unit(metric: Option<&str>, nats: f64) -> String {
    match metric {
        Some("bpc") => format!("{nats:.4} ({:.3} bpc)", nats / std::f64::consts::LN_2),
        Some("ppl") => format!("{nats:.4} ({:.1} ppl)", nats.exp()),
        _ => format!("{nats:.4}"),
    }
}

/// The markdown table of `rows`.
pub fn markdown(rows: &[RunRow]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    let mut out = String::from(
        "| run | mixer | params | best valid (nats) | at step | final test | tokens/s | peak MB | density | keys/token |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.mixer,
            opt(r.params.map(|p| p.to_string())),
            opt(r.best_valid.map(|(l, _)| in_unit(r.metric, l))),
            opt(r.best_valid.map(|(_, s)| s.to_string())),
            opt(r.final_test.map(|l| in_unit(r.metric, l))),
            opt(r.tokens_per_s.map(|t| format!("{t:.0}"))),
            opt(r.peak_rss_mb.map(|m| format!("{m:.0}"))),
            opt(r.density.map(|d| format!("{d:.3}"))),
            opt(r.keys_per_token.map(|k| format!("{k:.1}"))),
        );
    }
    out
}

/// Read `runs`, write `<name>.md` and the plots `<name>-valid-vs-step.svg`,
/// `<name>-valid-vs-time.svg` and (when some runs have a density) `<name>-quality-vs-density.svg`
/// into `out_dir`. Returns the files written.
pub fn write_report(runs: &[PathBuf], out_dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let rows = runs
        .iter()
        .map(|r| read_run(r))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut written = vec![];
    let table = out_dir.join(format!("{name}.md"));
    std::fs::write(&table, markdown(&rows))
        .with_context(|| format!("cannot write {}", table.display()))?;
    written.push(table);
    let curves = |time: bool| -> Vec<Series> {
        rows.iter()
            .enumerate()
            .map(|(i, r)| Series {
                label: r.name.clone(),
                points: r
                    .valid
                    .iter()
                    .filter_map(|&(s, t, l)| Some((if time { t? } else { s }, l)))
                    .collect(),
                color: PALETTE[i % PALETTE.len()],
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let best: Vec<Series> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let (loss, _) = r.best_valid?;
            Some(Series {
                label: r.name.clone(),
                points: vec![(r.density?, loss)],
                color: PALETTE[i % PALETTE.len()],
            })
        })
        .collect();
    for (file, what, x, series) in [
        (
            format!("{name}-valid-vs-step.svg"),
            "validation loss by step",
            "step",
            curves(false),
        ),
        (
            format!("{name}-valid-vs-time.svg"),
            "validation loss by time",
            "seconds",
            curves(true),
        ),
        (
            format!("{name}-quality-vs-density.svg"),
            "best validation loss by attention density",
            "attention density",
            best,
        ),
    ] {
        if series.is_empty() {
            continue;
        }
        let out = out_dir.join(file);
        let axes = Axes {
            title: format!("{name}: {what}"),
            x_label: x.into(),
            y_label: "valid loss, nats".into(),
            integer_x: x == "step",
            y_ticks: None,
        };
        chart(&out, &axes, &series).map_err(|e| anyhow!("cannot draw {}: {e}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}
