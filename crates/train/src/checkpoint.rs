//! Checkpoints: `<run>/checkpoints/step-<N>/` holding the model (`model.bpk`), the optimizer
//! state (`optim.bpk`), the schedule state (`scheduler.json`), for a model with a cache the
//! cache of every stream (`cache.bin`, [`crate::stream_cache`]) and a `manifest.json`.
//!
//! Crash safety: a checkpoint is written into `step-<N>.partial/`, the manifest last, each file
//! fsynced, then the directory is renamed to `step-<N>/` and the parent fsynced. Only a
//! directory named `step-<N>` with a manifest counts as a checkpoint, so a run killed mid-write
//! leaves at worst a `.partial` directory that the next run removes; the previous checkpoint is
//! untouched. The newest `keep_checkpoints` are kept, plus the best by validation loss. The
//! manifest carries the SHA-256 of every other file; `--resume` takes the newest
//! checkpoint that verifies and reports (and skips) damaged newer ones.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use mixlab_models::Lm;
use serde::{Deserialize, Serialize};

/// Version of the checkpoint layout; bumped when it changes incompatibly.
pub const FORMAT: u32 = 1;

/// What a checkpoint is, written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// Optimiser steps completed.
    pub step: usize,
    /// Index of the next training batch the sampler will draw.
    pub next_batch: u64,
    /// `train.seed` of the run.
    pub seed: u64,
    /// SHA-256 of the resolved config.
    pub config_hash: String,
    /// SHA-256 of the `[model]` section: a checkpoint loads only into the same architecture.
    pub architecture_hash: String,
    /// The `[model]` section, as TOML, to say what differs when the hashes do not match.
    pub model_toml: String,
    /// Concrete backend it was written from.
    pub backend: String,
    /// Last validation loss (nats/token), if any evaluation ran.
    pub valid_loss: Option<f64>,
    /// MPI ranks of the run that wrote it (1 without MPI; a resume may use another number).
    #[serde(default = "one")]
    pub world_size: usize,
    /// SHA-256 of every other file of the checkpoint, checked before a resume trusts it.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
    /// The shape of `cache.bin`, for a model with a cache (`[model.cache]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::stream_cache::CacheMeta>,
}

fn one() -> usize {
    1
}

/// The checkpoint files a manifest vouches for (and `cache.bin` when it describes a cache).
const FILES: [&str; 3] = ["model.bpk", "optim.bpk", "scheduler.json"];

/// The files of the checkpoint `manifest` describes.
fn files(manifest: &Manifest) -> Vec<&'static str> {
    let mut out = FILES.to_vec();
    if manifest.cache.is_some() {
        out.push(crate::stream_cache::FILE);
    }
    out
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Check every file of the checkpoint in `dir` against its manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    for name in files(&manifest) {
        let expected = manifest
            .files
            .get(name)
            .with_context(|| format!("the manifest lists no checksum for {name}"))?;
        let actual = sha256_file(&dir.join(name))?;
        if &actual != expected {
            bail!("{name} does not match its checksum in the manifest");
        }
    }
    Ok(manifest)
}

/// The newest checkpoint of `run_dir` that verifies; each newer one that does not is reported
/// through `skipped` (and left on disk for inspection).
pub fn latest_valid(
    run_dir: &Path,
    skipped: &mut dyn FnMut(&Path, &anyhow::Error),
) -> Result<Option<(PathBuf, Manifest)>> {
    for (_, dir) in list(run_dir)?.into_iter().rev() {
        match verify(&dir) {
            Ok(manifest) => return Ok(Some((dir, manifest))),
            Err(e) => skipped(&dir, &e),
        }
    }
    Ok(None)
}

/// The learning-rate schedule's state. The schedule is a pure function of the step, so the
/// state is the step and the settings it was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Total steps of the schedule.
    pub total_steps: usize,
    /// The `[optim]` settings that shape the schedule.
    pub optim: crate::config::OptimConfig,
}

/// The checkpoints directory of a run.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Write a checkpoint for `manifest.step`, then keep only the newest `keep`.
///
/// On failure (disk full, unwritable folder) the partial directory is removed, the earlier
/// checkpoints are untouched, and the error says which ones remain.
pub fn save(
    run_dir: &Path,
    model: &Lm,
    optim: &ModuleOptimizer,
    scheduler: &SchedulerState,
    cache: Option<&crate::stream_cache::HostCache>,
    manifest: &Manifest,
    keep: usize,
) -> Result<PathBuf> {
    let root = dir(run_dir);
    let partial = root.join(format!("step-{}.partial", manifest.step));
    let write = || -> Result<PathBuf> {
        fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
        let done = root.join(format!("step-{}", manifest.step));
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        fs::create_dir_all(&partial)?;

        model
            .clone()
            .save_file(partial.join("model.bpk"))
            .with_context(|| format!("cannot write the model to {}", partial.display()))?;
        if std::env::var("MIXLAB_FAULT_DISK_FULL_STEP")
            .is_ok_and(|v| v == manifest.step.to_string())
        {
            // Fault injection for the tests: the disk fills up mid-checkpoint (ENOSPC).
            return Err(
                anyhow::Error::from(std::io::Error::from_raw_os_error(28)).context(format!(
                    "cannot write the optimizer to {}",
                    partial.display()
                )),
            );
        }
        optim
            .save(partial.join("optim.bpk"))
            .with_context(|| format!("cannot write the optimizer to {}", partial.display()))?;
        write_synced(
            &partial.join("scheduler.json"),
            serde_json::to_string_pretty(scheduler)?.as_bytes(),
        )?;
        let mut manifest = manifest.clone();
        if let Some(cache) = cache {
            write_synced(&partial.join(crate::stream_cache::FILE), &cache.to_bytes())?;
            manifest.cache = Some(cache.meta.clone());
        }
        if let Some(ms) = std::env::var("MIXLAB_FAULT_SLOW_CHECKPOINT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Fault injection for the crash tests: widen the window in which a kill lands
            // mid-write (model and optimizer written, manifest not yet).
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        for f in files(&manifest) {
            File::open(partial.join(f))?.sync_all()?;
            manifest
                .files
                .insert(f.to_string(), sha256_file(&partial.join(f))?);
        }
        write_synced(
            &partial.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        sync_dir(&partial)?;
        if done.exists() {
            // Re-saving the same step (e.g. Ctrl-C right after a periodic checkpoint).
            fs::remove_dir_all(&done)?;
        }
        fs::rename(&partial, &done).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), done.display())
        })?;
        sync_dir(&root)?;
        prune(&root, keep)?;
        Ok(done)
    };
    write().map_err(|e| {
        let _ = fs::remove_dir_all(&partial);
        let kept: Vec<String> = list(run_dir)
            .unwrap_or_default()
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect();
        let kept = if kept.is_empty() {
            "no earlier checkpoint exists".to_string()
        } else {
            format!("the earlier checkpoints are intact ({})", kept.join(", "))
        };
        e.context(format!(
            "the checkpoint of step {} was not written and its partial files were removed; \
             {kept}. Free disk space or fix the run directory, then continue with \
             `train --resume {}`",
            manifest.step,
            run_dir.display()
        ))
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Complete checkpoints of a run, oldest first, as `(step, dir)`.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = dir(run_dir);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for entry in fs::read_dir(&root).with_context(|| format!("cannot list {}", root.display()))? {
        let path = entry?.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if path.join("manifest.json").is_file() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Remove `.partial` leftovers of an interrupted write.
pub fn clean_partial(run_dir: &Path) -> Result<()> {
    let root = dir(run_dir);
    if !root.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(&root)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "partial") {
            fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// Keep the newest `keep` checkpoints plus the one with the best (lowest) validation loss.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let run_dir = root.parent().expect("checkpoints dir has a parent");
    let all = list(run_dir)?;
    let best = all
        .iter()
        .filter_map(|(_, p)| Some((read_manifest(p).ok()?.valid_loss?, p)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, p)| p.clone());
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        if Some(path) != best.as_ref() {
            fs::remove_dir_all(path)?;
        }
    }
    Ok(())
}

/// The newest checkpoint of `run_dir` that verifies, reporting skipped ones on stderr; an
/// error naming `purpose` ("evaluate", "sample from", ...) when there is none.
pub fn newest(run_dir: &Path, purpose: &str) -> Result<(PathBuf, Manifest)> {
    latest_valid(run_dir, &mut |dir, why| {
        eprintln!("mixlab: skipping checkpoint {} ({why:#})", dir.display())
    })?
    .with_context(|| {
        format!(
            "{} has no complete checkpoint to {purpose}",
            run_dir.display()
        )
    })
}

/// Read the manifest of the checkpoint in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Mixlab checkpoint manifest", path.display()))?;
    if m.format != FORMAT {
        bail!(
            "{} has checkpoint format {} but this build reads format {FORMAT}",
            path.display(),
            m.format
        );
    }
    Ok(m)
}

/// Load the model weights (and parameter ids) of the checkpoint in `dir` into a freshly built
/// model of the same architecture.
pub fn load_model(dir: &Path, model: Lm) -> Result<Lm> {
    let path = dir.join("model.bpk");
    model.try_load_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot load {}: {e:?}; it was written by a different architecture or is damaged",
            path.display()
        )
    })
}

/// Load the optimizer state of the checkpoint in `dir`. Build `optim` from the *loaded* model:
/// the state and the weight-decay groups are keyed by parameter ids, which the model record
/// restores.
pub fn load_optim(dir: &Path, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let path = dir.join("optim.bpk");
    optim
        .load(&path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e:?}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(run_dir: &Path, step: usize, valid_loss: Option<f64>) {
        let dir = dir(run_dir).join(format!("step-{step}"));
        fs::create_dir_all(&dir).unwrap();
        let m = Manifest {
            format: FORMAT,
            step,
            next_batch: step as u64,
            seed: 0,
            config_hash: String::new(),
            architecture_hash: String::new(),
            model_toml: String::new(),
            backend: "flex".into(),
            valid_loss,
            world_size: 1,
            files: Default::default(),
            cache: None,
        };
        fs::write(
            dir.join("manifest.json"),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_best() {
        let run_dir = std::env::temp_dir().join(format!("mixlab-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&run_dir);
        for (step, loss) in [
            (1, Some(3.0)),
            (2, Some(1.5)),
            (3, Some(2.0)),
            (4, Some(2.5)),
            (5, None),
        ] {
            fake(&run_dir, step, loss);
        }
        prune(&dir(&run_dir), 2).unwrap();
        let kept: Vec<usize> = list(&run_dir)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(kept, vec![2, 4, 5], "newest two plus the best (step 2)");
    }
}
