//! `metrics.jsonl`: one JSON object per line, appended as the run goes. Every line has `step`
//! (optimiser steps completed), `split` (`train` / `valid` / `test`) and `loss` (mean nats per
//! token), plus `bpc` or `ppl` where they apply. `metrics.csv` carries the same rows with the
//! fixed columns [`CSV_COLUMNS`] (empty where a row has no value), for spreadsheets and plots.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

/// The columns of `metrics.csv`, in order.
pub const CSV_COLUMNS: [&str; 11] = [
    "step",
    "split",
    "loss",
    "bpc",
    "ppl",
    "tokens",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "skipped_steps",
];

/// Appends metric lines to a run's `metrics.jsonl` and rows to its `metrics.csv`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    csv: File,
}

impl MetricsLog {
    /// Open `<run_dir>/metrics.jsonl`. When resuming from step `keep_through`, lines of later
    /// steps (written after that checkpoint by the interrupted run) are dropped first, so the
    /// file reads as one uninterrupted run.
    pub fn open(run_dir: &Path, keep_through: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let csv_path = run_dir.join("metrics.csv");
        for p in [&path, &csv_path] {
            match keep_through {
                Some(step) if p.exists() => truncate_after(p, step)?,
                None if p.exists() => std::fs::remove_file(p)?,
                _ => {}
            }
        }
        let append = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))
        };
        let file = append(&path)?;
        let mut csv = append(&csv_path)?;
        if csv.metadata()?.len() == 0 {
            writeln!(csv, "{}", CSV_COLUMNS.join(","))?;
        }
        Ok(Self { path, file, csv })
    }

    /// Append one line: `step`, `split`, `loss`, then `extra` fields.
    pub fn write(
        &mut self,
        step: usize,
        split: &str,
        loss: f64,
        extra: &[(&str, Value)],
    ) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), json!(step));
        line.insert("split".into(), json!(split));
        line.insert("loss".into(), json!(loss));
        for (k, v) in extra {
            line.insert((*k).into(), v.clone());
        }
        let row: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| match line.get(*c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
            .collect();
        writeln!(self.file, "{}", Value::Object(line))
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        writeln!(self.csv, "{}", row.join(","))
            .with_context(|| format!("cannot write {}", self.path.with_extension("csv").display()))
    }
}

/// Keep the lines of steps <= `step` (JSON lines by their `step`, CSV rows by their first
/// column; a CSV header is kept).
fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let reader = BufReader::new(File::open(path)?);
    let mut kept = String::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        let line_step = if line.starts_with('{') {
            serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
        } else if n == 0 {
            Some(0) // the CSV header
        } else {
            line.split(',').next().and_then(|s| s.parse::<u64>().ok())
        };
        if line_step.is_some_and(|s| s as usize <= step) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept)?;
    Ok(())
}
