//! Where a run continues from, and the checkpoint a later resume reads: the newest complete
//! checkpoint of `--resume RUN_DIR` (its architecture checked against the config), a refusal to
//! overwrite a run that already has checkpoints, the settings a resume changes, and the
//! checkpoint writer.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use mixlab_models::Lm;

use crate::checkpoint::{self, Manifest, SchedulerState};
use crate::config::Config;

/// The checkpoint to resume from (`resume` = `--resume RUN_DIR`), checked before anything is
/// written: the newest complete one, written by the same architecture. Without `--resume`,
/// `run_dir` must not hold a run already.
pub fn resume_point(
    resume: Option<&Path>,
    config: &Config,
    run_dir: &Path,
) -> Result<Option<(PathBuf, Manifest)>> {
    let Some(dir) = resume else {
        if let Some((step, _)) = checkpoint::list(run_dir)?.pop() {
            bail!(
                "{} already holds a run (checkpoint at step {step}); continue it with \
                 --resume {}, or start a new one with --set train.run_dir=runs/NEW",
                run_dir.display(),
                run_dir.display()
            );
        }
        return Ok(None);
    };
    let newest = checkpoint::latest_valid(dir, &mut |ckpt, why| {
        eprintln!(
            "mixlab: skipping checkpoint {} ({why:#}); trying an older one",
            ckpt.display()
        )
    })?;
    let Some((ckpt, manifest)) = newest else {
        bail!(
            "{} has no complete checkpoint to resume from (looked for \
             checkpoints/step-N/manifest.json whose files match their checksums)",
            dir.display()
        );
    };
    check_cache(&ckpt, &manifest, config)?;
    if manifest.architecture_hash != config.architecture_hash() {
        bail!(
            "checkpoint {} was written by a different architecture:\n{}\nhint: resume \
             without --config to use the run's own config.toml, or start a new run \
             with --set train.run_dir=runs/NEW",
            ckpt.display(),
            diff_models(&manifest.model_toml, config)
        );
    }
    Ok(Some((ckpt, manifest)))
}

/// A model with a cache resumes only from a checkpoint that holds one, of one row per stream
/// of the configured batch (and a model without one from a checkpoint without).
fn check_cache(ckpt: &Path, manifest: &Manifest, config: &Config) -> Result<()> {
    let span = config.model.cache.as_ref().map(|c| c.span);
    match (&manifest.cache, span) {
        (None, Some(_)) => bail!(
            "checkpoint {} holds no cache (its run had no [model.cache]) but the config has              model.cache: a cached run resumes only from a cached run's checkpoint; remove              [model.cache] or start a new run with --set train.run_dir=runs/NEW",
            ckpt.display()
        ),
        (Some(_), None) => bail!(
            "checkpoint {} holds a cache (its run had [model.cache]) but the config has no              model.cache: resume without --config to use the run's own config.toml",
            ckpt.display()
        ),
        (Some(meta), Some(_)) if meta.rows != config.train.batch_size => bail!(
            "checkpoint {} holds the cache of {} streams but train.batch_size = {}: a cached              run keeps one stream per row, so resume with --set train.batch_size={}",
            ckpt.display(),
            meta.rows,
            config.train.batch_size,
            meta.rows
        ),
        _ => Ok(()),
    }
}

/// Where a run stands when its checkpoint is written (what the manifest records beside the
/// config).
pub struct Progress<'a> {
    /// Optimiser steps completed.
    pub step: usize,
    /// Last validation loss, if any evaluation ran.
    pub valid_loss: Option<f64>,
    /// Concrete backend of the main device.
    pub backend: &'a str,
    /// MPI ranks of the run (1 without MPI).
    pub world_size: usize,
    /// Every stream's cache, for a model with one.
    pub cache: Option<&'a crate::stream_cache::HostCache>,
}

/// Write the checkpoint of `progress.step` (model, optimiser, schedule, manifest last).
pub fn write_checkpoint(
    config: &Config,
    run_dir: &Path,
    model: &Lm,
    optim: &burn::optim::ModuleOptimizer,
    progress: Progress,
) -> Result<()> {
    let Progress {
        step,
        valid_loss,
        backend,
        world_size,
        cache,
    } = progress;
    let manifest = Manifest {
        format: checkpoint::FORMAT,
        step,
        next_batch: (step * config.train.grad_accum) as u64,
        seed: config.train.seed,
        config_hash: config.hash(),
        architecture_hash: config.architecture_hash(),
        model_toml: toml::to_string(&config.model)?,
        backend: backend.into(),
        valid_loss,
        world_size,
        files: Default::default(),
        cache: None,
    };
    let scheduler = SchedulerState {
        step,
        total_steps: config.train.steps,
        optim: config.optim.clone(),
    };
    checkpoint::save(
        run_dir,
        model,
        optim,
        &scheduler,
        cache,
        &manifest,
        config.train.keep_checkpoints,
    )?;
    Ok(())
}

/// Say which settings a resume changes (the architecture cannot change: that is refused
/// earlier), e.g. `train.steps: 1000 -> 2000`.
pub fn report_changes(saved: &Path, now: &Config) {
    let Ok(text) = std::fs::read_to_string(saved) else {
        return;
    };
    let Ok(before) = Config::parse(&text, &saved.display().to_string(), &[]) else {
        return;
    };
    let flatten = |c: &Config| -> Vec<(String, String)> {
        let mut out = vec![];
        let value = toml::Value::try_from(c).expect("a config serialises");
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                other => out.push((prefix.to_string(), other.to_string())),
            }
        }
        walk("", &value, &mut out);
        out
    };
    let (old, new) = (flatten(&before), flatten(now));
    for (key, value) in &new {
        let previous = old.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if previous != Some(value.as_str()) {
            eprintln!(
                "mixlab: resume changes {key}: {} -> {value}",
                previous.unwrap_or("(unset)")
            );
        }
    }
}

/// Lines of the `[model]` sections that differ: `key: checkpoint -> now`.
fn diff_models(saved_toml: &str, now: &Config) -> String {
    let now_toml = toml::to_string(&now.model).unwrap_or_default();
    let saved: Vec<&str> = saved_toml.lines().collect();
    let current: Vec<&str> = now_toml.lines().collect();
    let mut out: Vec<String> = saved
        .iter()
        .filter(|l| !current.contains(l))
        .map(|l| format!("  checkpoint: {l}"))
        .collect();
    out.extend(
        current
            .iter()
            .filter(|l| !saved.contains(l))
            .map(|l| format!("  config now: {l}")),
    );
    out.join("\n")
}
