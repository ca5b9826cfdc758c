//! `metrics.jsonl`: one JSON object per line, appended as the run goes. Every line has `step`
//! (optimiser steps completed), `split` (`train` / `valid`) and `loss` (mean nats per token),
//! plus `bpc` or `ppl` where they apply.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

/// Appends metric lines to a run's `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Open `<run_dir>/metrics.jsonl`. When resuming from step `keep_through`, lines of later
    /// steps (written after that checkpoint by the interrupted run) are dropped first, so the
    /// file reads as one uninterrupted run.
    pub fn open(run_dir: &Path, keep_through: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        match keep_through {
            Some(step) if path.exists() => truncate_after(&path, step)?,
            None if path.exists() => std::fs::remove_file(&path)?,
            _ => {}
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { path, file })
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
        writeln!(self.file, "{}", Value::Object(line))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let reader = BufReader::new(File::open(path)?);
    let mut kept = String::new();
    for line in reader.lines() {
        let line = line?;
        let line_step = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(Value::as_u64));
        if line_step.is_some_and(|s| s as usize <= step) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept)?;
    Ok(())
}
