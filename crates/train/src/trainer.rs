//! The training loop, top to bottom: config -> data -> device -> model -> (resume) -> steps
//! (forward, backward, clip, AdamW) with evaluation, metrics and checkpoints -> summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use mixlab_models::{Lm, loss::cross_entropy_sum};
use serde_json::json;

use crate::checkpoint::{self, Manifest, SchedulerState};
use crate::config::{Config, NonFinite};
use crate::metrics::MetricsLog;
use crate::optim::{adamw, clip_global_norm, learning_rate, read_scalars};
use crate::parallel::{Extras, accumulate_micro_batch, fork_replicas};
use crate::source::{Source, to_tensors};

/// What the `train` command was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--resume RUN_DIR`.
    pub resume: Option<PathBuf>,
    /// `--backend NAME` (overrides `train.backend`).
    pub backend: Option<String>,
    /// `--devices A,B,...` (overrides `train.devices`).
    pub devices: Option<Vec<String>>,
    /// `--set key=value`, in order.
    pub overrides: Vec<String>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimiser steps completed.
    pub step: usize,
    /// Whether it stopped early on Ctrl-C (after writing a checkpoint).
    pub interrupted: bool,
    /// Last training loss (nats/token).
    pub train_loss: Option<f64>,
    /// Last validation loss (nats/token).
    pub valid_loss: Option<f64>,
}

/// Resolve the config for `opts`: the file (or the run's saved config when resuming without
/// one), the `--set` overrides, the backend flag, the default run directory and the vocabulary.
pub fn resolve_config(opts: &TrainOptions) -> Result<Config> {
    let (path, default_name) = match (&opts.config, &opts.resume) {
        (Some(path), _) => (path.clone(), stem(path)),
        (None, Some(run_dir)) => (run_dir.join("config.toml"), None),
        (None, None) => bail!("nothing to train: pass --config FILE (or --resume RUN_DIR)"),
    };
    let mut config = Config::load(&path, &opts.overrides)?;
    if let Some(backend) = &opts.backend {
        config.train.backend = backend.clone();
    }
    if let Some(devices) = &opts.devices {
        config.train.devices = devices.clone();
    }
    if let Some(run_dir) = &opts.resume {
        config.train.run_dir = Some(run_dir.clone());
    } else if config.train.run_dir.is_none() {
        let name = default_name.unwrap_or_else(|| "run".into());
        config.train.run_dir = Some(Path::new("runs").join(name));
    }
    config.validate()?;
    Ok(config)
}

fn stem(path: &Path) -> Option<String> {
    path.file_stem().map(|s| s.to_string_lossy().into_owned())
}

/// Train as `opts` says; `stop` set (by Ctrl-C) ends the run at the next step boundary with a
/// checkpoint.
pub fn train(opts: &TrainOptions, stop: Arc<AtomicBool>) -> Result<Summary> {
    let mut config = resolve_config(opts)?;
    let run_dir = config.train.run_dir.clone().expect("resolved");
    let seq = config.model.seq_len;
    let t = config.train.clone();

    // Data first: it fixes the vocabulary.
    let source = Source::build(&config.data, seq, t.batch_size, t.seed)?;
    let unit = source.unit(&config.data);
    let needed = source.model_vocab(t.objective);
    match config.model.vocab_size {
        None => config.model.vocab_size = Some(needed),
        Some(v) if v < needed => bail!(
            "model.vocab_size = {v} but the data needs {needed} token ids (objective {:?}); \
             remove the key to take it from the data",
            t.objective
        ),
        Some(_) => {}
    }
    config.model.validate().context("invalid [model]")?;

    // Where we resume from, checked before anything is written.
    let resume_from = match &opts.resume {
        Some(dir) => {
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
            if manifest.architecture_hash != config.architecture_hash() {
                bail!(
                    "checkpoint {} was written by a different architecture:\n{}\nhint: resume \
                     without --config to use the run's own config.toml, or start a new run \
                     with --set train.run_dir=runs/NEW",
                    ckpt.display(),
                    diff_models(&manifest.model_toml, &config)
                );
            }
            Some((ckpt, manifest))
        }
        None => {
            if let Some((step, _)) = checkpoint::list(&run_dir)?.pop() {
                bail!(
                    "{} already holds a run (checkpoint at step {step}); continue it with \
                     --resume {}, or start a new one with --set train.run_dir=runs/NEW",
                    run_dir.display(),
                    run_dir.display()
                );
            }
            None
        }
    };

    let all = config.train.select_devices()?;
    let selected = all[0].clone();
    let device = selected.device.clone();
    // Data-parallel devices with autodiff; the first, `ad`, holds the model.
    let replicas: Vec<Device> = all.iter().map(|s| s.device.clone().autodiff()).collect();
    let ad = replicas[0].clone();

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    checkpoint::clean_partial(&run_dir)?;
    if resume_from.is_some() {
        report_changes(&run_dir.join("config.toml"), &config);
    }
    std::fs::write(run_dir.join("config.toml"), config.to_toml())?;
    if let Some(tok) = source.tokenizer() {
        std::fs::write(run_dir.join("tokenizer.json"), serde_json::to_string(tok)?)?;
    }

    ad.seed(t.seed);
    let mut model: Lm = config.model.init(&ad).context("invalid [model]")?;
    if let Some((ckpt, _)) = &resume_from {
        model = checkpoint::load_model(ckpt, model)?;
    }
    // Built after loading: weight-decay groups are keyed by the (restored) parameter ids.
    let mut optim = adamw(&config.optim, &model);
    let (mut start, mut valid_loss) = (0, None);
    if let Some((ckpt, manifest)) = &resume_from {
        optim = checkpoint::load_optim(ckpt, optim)?;
        start = manifest.step;
        valid_loss = manifest.valid_loss;
    }
    let mut metrics = MetricsLog::open(&run_dir, resume_from.as_ref().map(|(_, m)| m.step))?;

    eprintln!(
        "mixlab: {} | {} parameters | {} | vocab {} ({} occur in train) | run dir {}",
        selected.description,
        model.num_params(),
        config.model.kind(),
        config.model.vocab_size.unwrap_or(0),
        source.occurring(),
        run_dir.display()
    );
    if all.len() > 1 {
        eprintln!(
            "mixlab: data parallel over {} devices ({}); each micro-batch of {} rows is split \
             across them, the optimizer steps on the first",
            all.len(),
            all.iter()
                .map(|s| s.description.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            t.batch_size
        );
        let mut backends: Vec<&str> = all.iter().map(|s| s.backend).collect();
        backends.sort_unstable();
        backends.dedup();
        if backends.len() < all.len() && config.model.dropout > 0.0 {
            eprintln!(
                "mixlab: warning: model.dropout = {} with several {} devices: Burn keeps one \
                 random generator per backend, so dropout masks depend on thread order and \
                 this run is not bit-reproducible (set model.dropout = 0 for that)",
                config.model.dropout, backends[0]
            );
        }
    }
    if start > 0 {
        eprintln!("mixlab: resumed at step {start}");
    }
    for sparse in crate::patterns::sparse_layers(&config.model, seq)? {
        eprintln!("mixlab: {}", sparse.describe());
    }

    let for_eval = |batches| for_evaluation(&source, &config, batches);
    let valid_batches = for_eval(source.valid_batches(
        t.batch_size,
        seq,
        (t.eval_batches > 0).then_some(t.eval_batches),
    ));
    let progress = progress_bar(t.steps as u64, start as u64);
    let tokens_per_step = (t.batch_size * t.grad_accum * seq) as f64;
    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    let mut train_loss = None;
    let mut step = start;
    let mut skipped = 0usize;
    // Fault injection for the tests: make the loss of this (0-based) step NaN.
    let poison_step = std::env::var("MIXLAB_FAULT_NAN_STEP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut interrupted = false;

    while step < t.steps && !interrupted {
        // Per-step randomness (dropout) comes from (seed, step), so a resumed run repeats it.
        for (i, replica) in replicas.iter().enumerate() {
            replica.seed(mix(t.seed, step as u64) ^ i as u64);
        }
        let lr = learning_rate(&config.optim, step, t.steps);
        let batches: Vec<_> = (0..t.grad_accum)
            .map(|m| {
                let index = (step * t.grad_accum + m) as u64;
                let batch = source.train_batch(t.batch_size, seq, index);
                source.for_objective(batch, t.objective, t.mask_rate, t.seed, index)
            })
            .collect();
        let weight: f64 = batches.iter().map(|b| b.weight_sum()).sum();
        let mut loss_sum: Option<Tensor<1>> = None;
        let models = fork_replicas(&model, &replicas);
        let mut accumulator = GradientsAccumulator::<Lm>::new();
        for batch in &batches {
            let extras = Extras {
                // The penalty once per optimiser step in total, spread over the micro-batches.
                penalty_divisor: Some(t.grad_accum as f64),
                poison: poison_step == Some(step),
            };
            let loss = accumulate_micro_batch(
                &models,
                batch,
                &replicas,
                weight,
                extras,
                &mut accumulator,
            )?;
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
        }
        let (grads, grad_norm) =
            clip_global_norm(&model, accumulator.grads(), config.optim.grad_clip);
        // The step's one device-to-host read: loss and gradient norm together, after the
        // backward and the clipping are queued.
        let mut read = vec![loss_sum.expect("grad_accum >= 1")];
        read.extend(grad_norm);
        let values = read_scalars(read);
        let (loss_sum, grad_norm) = (values[0], values.get(1).copied().unwrap_or(0.0));
        step += 1;
        train_loss = Some(loss_sum);
        if loss_sum.is_finite() && grad_norm.is_finite() {
            model = optim.step(lr, model, grads);
        } else {
            match t.on_nonfinite {
                NonFinite::Stop => bail!(
                    "the loss ({loss_sum}) or gradient norm ({grad_norm}) is not finite at step \
                     {step}; nothing was written for it and the last checkpoint is kept. Lower \
                     optim.lr, raise optim.warmup_steps, or set train.on_nonfinite = \"skip\""
                ),
                NonFinite::Skip => {
                    skipped += 1;
                    say(
                        &progress,
                        format!(
                            "warning: step {step} skipped (loss {loss_sum}, gradient norm \
                         {grad_norm}); {skipped} skipped so far"
                        ),
                    );
                }
            }
        }

        window.1 += 1;
        let tokens_per_s = tokens_per_step * window.1 as f64 / window.0.elapsed().as_secs_f64();
        progress.set_position(step as u64);
        progress.set_message(format!(
            "loss {loss_sum:.4} | lr {lr:.2e} | {tokens_per_s:.0} tok/s"
        ));
        if step % t.log_every == 0 || step == t.steps {
            let mut extra = vec![
                ("lr", json!(lr)),
                ("grad_norm", json!(grad_norm)),
                ("tokens_per_s", json!(tokens_per_s)),
                ("elapsed_s", json!(started.elapsed().as_secs_f64())),
                ("skipped_steps", json!(skipped)),
                ("rss_mb", json!(crate::telemetry::rss_mb())),
            ];
            if let Some((in_use, reserved)) = crate::telemetry::device_memory_mb(&device) {
                extra.push(("device_mem_in_use_mb", json!(in_use)));
                extra.push(("device_mem_reserved_mb", json!(reserved)));
            }
            if let Some((name, value)) = unit.metric(loss_sum) {
                extra.push((name, json!(value)));
            }
            metrics.write(step, "train", loss_sum, &extra)?;
            window = (Instant::now(), 0);
        }
        let last = step == t.steps;
        if (t.eval_every > 0 && step % t.eval_every == 0) || last {
            // The final evaluation covers the whole valid split, then the test split.
            let full;
            let batches = if last && t.eval_batches > 0 {
                full = for_eval(source.valid_batches(t.batch_size, seq, None));
                &full
            } else {
                &valid_batches
            };
            let mut splits = vec![("valid", evaluate(&model, batches, &device))];
            if last && let Some(test) = source.test_batches(t.batch_size, seq) {
                splits.push(("test", evaluate(&model, &for_eval(test), &device)));
            }
            for (split, (loss, tokens)) in splits {
                if split == "valid" {
                    valid_loss = Some(loss);
                }
                let mut extra = vec![("tokens", json!(tokens))];
                let shown = match unit.metric(loss) {
                    Some((name, value)) => {
                        extra.push((name, json!(value)));
                        format!("{name} {value:.4}")
                    }
                    None => String::new(),
                };
                metrics.write(step, split, loss, &extra)?;
                say(
                    &progress,
                    format!("step {step}: {split} loss {loss:.4} {shown} ({tokens} tokens)"),
                );
            }
        }
        // A signal (Ctrl-C, SIGTERM) ends the run here, at a step boundary, with a checkpoint.
        interrupted = stop.load(Ordering::SeqCst) && step < t.steps;
        let periodic = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
        if periodic || step == t.steps || interrupted {
            save(
                &config,
                &run_dir,
                &model,
                &optim,
                step,
                valid_loss,
                selected.backend,
            )?;
        }
    }
    if interrupted {
        say(
            &progress,
            format!("interrupted: checkpoint written at step {step}"),
        );
    }
    progress.finish_and_clear();
    match crate::plot::write_plots(&run_dir) {
        Ok(files) if !files.is_empty() => eprintln!(
            "mixlab: plots: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("mixlab: warning: no plots ({e:#})"),
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = json!({
        "kind": "summary",
        "model": config.model.kind(),
        "params": model.num_params(),
        "backend": selected.backend,
        "step": step,
        "steps_this_session": step - start,
        "seconds_this_session": seconds,
        "tokens_per_s": tokens_per_step * (step - start) as f64 / seconds.max(1e-9),
        "peak_rss_mb": crate::telemetry::peak_rss_mb(),
        "skipped_steps": skipped,
        "interrupted": interrupted,
    });
    match run_summary(&run_dir, report, unit) {
        Ok(text) => eprintln!("{text}"),
        Err(e) => eprintln!("mixlab: warning: no run summary ({e:#})"),
    }
    Ok(Summary {
        run_dir,
        step,
        interrupted,
        train_loss,
        valid_loss,
    })
}

/// Complete `report` with the best validation and the final test loss from the run's whole
/// `metrics.jsonl` (every session), write it to `summary.json`, and return the one-screen text.
fn run_summary(
    run_dir: &Path,
    mut report: serde_json::Value,
    unit: crate::source::Unit,
) -> Result<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let loss = |l: &serde_json::Value| l["loss"].as_f64();
    let best = lines
        .iter()
        .filter(|l| l["split"] == "valid")
        .filter_map(|l| Some((loss(l)?, l["step"].as_u64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let test = lines
        .iter()
        .rfind(|l| l["split"] == "test")
        .and_then(|l| Some((loss(l)?, l["step"].as_u64()?)));
    let shown = |nats: f64| match unit.metric(nats) {
        Some((name, value)) => format!("{nats:.4} nats ({name} {value:.4})"),
        None => format!("{nats:.4} nats"),
    };
    report["best_valid"] = json!(best.map(|(l, s)| json!({"loss": l, "step": s})));
    report["final_test"] = json!(test.map(|(l, s)| json!({"loss": l, "step": s})));
    std::fs::write(run_dir.join("summary.json"), format!("{report}\n"))?;
    let r = &report;
    let mut out = String::from("── run summary ──────────────────────────────────────────\n");
    out += &format!(
        "  model       {} · {} parameters · {}\n",
        r["model"].as_str().unwrap_or("?"),
        r["params"],
        r["backend"].as_str().unwrap_or("?")
    );
    out += &format!(
        "  steps       {} ({} this session, {:.1} s{})\n",
        r["step"],
        r["steps_this_session"],
        r["seconds_this_session"].as_f64().unwrap_or(0.0),
        if r["interrupted"] == true {
            ", interrupted"
        } else {
            ""
        }
    );
    out += &format!(
        "  throughput  {:.0} tokens/s\n",
        r["tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    match best {
        Some((l, s)) => out += &format!("  best valid  {} at step {s}\n", shown(l)),
        None => out += "  best valid  - (no evaluation yet)\n",
    }
    if let Some((l, s)) = test {
        out += &format!("  final test  {} at step {s}\n", shown(l));
    }
    if let Some(mb) = r["peak_rss_mb"].as_f64() {
        out += &format!("  peak memory {mb:.0} MB (resident)\n");
    }
    if r["skipped_steps"].as_u64().unwrap_or(0) > 0 {
        out += &format!("  skipped     {} non-finite steps\n", r["skipped_steps"]);
    }
    out += &format!("  run dir     {} (summary.json)", run_dir.display());
    Ok(out)
}

/// Shape evaluation batches for the run's objective. They are fixed for the run: the masked
/// objective's masks come from a seed of their own, so every evaluation (and the `eval` tool)
/// scores the same positions.
pub fn for_evaluation(
    source: &Source,
    config: &Config,
    batches: Vec<mixlab_data::Batch>,
) -> Vec<mixlab_data::Batch> {
    let t = &config.train;
    let eval_seed = t.seed ^ 0x0E7A_1000;
    batches
        .into_iter()
        .enumerate()
        .map(|(i, b)| source.for_objective(b, t.objective, t.mask_rate, eval_seed, i as u64))
        .collect()
}

/// Mean loss (nats per scored token) of `model` over `batches` and the number of tokens
/// scored, without autodiff and with dropout off.
pub fn evaluate(model: &Lm, batches: &[mixlab_data::Batch], device: &Device) -> (f64, u64) {
    let model = model.valid();
    let (mut sum, mut weight) = (0.0, 0.0);
    for batch in batches {
        let (inputs, targets, weights) = to_tensors(batch, device);
        let loss = cross_entropy_sum(model.forward(inputs), targets, weights);
        sum += f64::from(loss.into_scalar::<f32>());
        weight += batch.weight_sum();
    }
    (sum / weight.max(1.0), weight as u64)
}

fn save(
    config: &Config,
    run_dir: &Path,
    model: &Lm,
    optim: &burn::optim::ModuleOptimizer,
    step: usize,
    valid_loss: Option<f64>,
    backend: &str,
) -> Result<()> {
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
        files: Default::default(),
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
        &manifest,
        config.train.keep_checkpoints,
    )?;
    Ok(())
}

/// Say which settings a resume changes (the architecture cannot change: that is refused
/// earlier), e.g. `train.steps: 1000 -> 2000`.
fn report_changes(saved: &Path, now: &Config) {
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

/// A step's seed from the run seed (SplitMix64 finaliser of `seed + step`).
fn mix(seed: u64, step: u64) -> u64 {
    let mut z = seed.wrapping_add(step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A line for the user: above the progress bar when it is drawn, else on stderr (indicatif
/// hides the bar, and drops its `println`, when stderr is not a terminal).
fn say(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

fn progress_bar(len: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    bar.set_position(pos);
    bar
}
