//! The training loop, top to bottom: config -> data -> device -> model -> (resume) -> steps
//! (forward, backward, clip, AdamW) with evaluation, metrics and checkpoints -> summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use mixlab_data::{Batch, shard_rows};
use mixlab_models::{Lm, LmCache};
use serde_json::json;

use crate::checkpoint;
use crate::config::{Config, NonFinite};
use crate::device::Selected;
use crate::distributed::{all_reduce_step, broadcast_parameters, check_replicas};
use crate::metrics::MetricsLog;
use crate::optim::{clip_global_norm, learning_rate, optimizer, read_scalars};
use crate::parallel::{Extras, accumulate_micro_batch, fork_replicas};
use crate::resume::{Progress, report_changes, resume_point, write_checkpoint};
use crate::source::{Protocol, Source, Unit, to_tensors};
use crate::stream_cache::HostCache;
use crate::summary::run_summary;
use crate::world::World;

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

/// Train as `opts` says, as this process's part of `world` (one process, or a rank of an MPI
/// job); `stop` set (by Ctrl-C or SIGTERM, on any rank) ends the run at the next step boundary
/// with a checkpoint. The loop: one optimiser step, its log line, evaluation and checkpoint
/// when due.
pub fn train(opts: &TrainOptions, stop: Arc<AtomicBool>, world: &World) -> Result<Summary> {
    let mut run = Trainer::start(opts, world)?;
    let steps = run.config.train.steps;
    let mut interrupted = false;
    while run.step < steps && !interrupted {
        let outcome = run.train_step(&stop)?;
        run.log(&outcome)?;
        let last = run.step == steps;
        let every = run.config.train.eval_every;
        if (every > 0 && run.step % every == 0) || last {
            run.evaluate(last)?;
        }
        // A signal (Ctrl-C, SIGTERM) ends the run here, at a step boundary, with a checkpoint.
        // Several ranks decide together: the flag travels in the step's all-reduce.
        let asked = if world.is_distributed() {
            outcome.stop
        } else {
            stop.load(Ordering::SeqCst)
        };
        interrupted = asked && !last;
        let every = run.config.train.checkpoint_every;
        if (every > 0 && run.step % every == 0) || last || interrupted {
            run.checkpoint()?;
        }
    }
    run.finish(interrupted)
}

/// A run in progress: what the loop's phases share.
struct Trainer<'w> {
    /// The processes of the run; rank 0 alone writes files and prints.
    world: &'w World,
    config: Config,
    run_dir: PathBuf,
    source: Source,
    unit: Unit,
    /// The main device (it holds the model) and the data-parallel replicas, with autodiff.
    selected: Selected,
    replicas: Vec<Device>,
    /// The model; `None` only while AdamW holds it (it takes the model by value, and with no
    /// other reference to the parameters it may update them in place).
    model: Option<Lm>,
    optim: ModuleOptimizer,
    /// Rank 0's metrics file (`None` on the other ranks).
    metrics: Option<MetricsLog>,
    /// How validation and test splits are scored.
    protocol: Protocol,
    /// The validation batches of every evaluation but the last (which takes the whole split).
    valid_batches: Vec<Batch>,
    /// A model with a cache: the cache of this rank's streams (`cache_rows` of the global
    /// batch), on the main device, carried from micro-batch to micro-batch.
    cache: Option<LmCache>,
    cache_rows: std::ops::Range<usize>,
    progress: ProgressBar,
    /// The step this session started at, and the steps done so far.
    start: usize,
    step: usize,
    train_loss: Option<f64>,
    valid_loss: Option<f64>,
    skipped: usize,
    /// Fault injection for the tests (`MIXLAB_FAULT_NAN_STEP`): this 0-based step's loss is NaN.
    poison_step: Option<usize>,
    started: Instant,
    /// Start and step count of the current throughput window (reset at every log line).
    window: (Instant, usize),
    /// Bytes and seconds of the last step's all-reduce (several ranks only).
    all_reduce: Option<(usize, f64)>,
}

/// What one optimiser step gives the log.
struct StepOutcome {
    lr: f64,
    loss: f64,
    grad_norm: f64,
    /// Whether any rank was asked to stop (several ranks only; alone, `train` reads the flag).
    stop: bool,
}

impl<'w> Trainer<'w> {
    /// Tokens one optimiser step trains on (every micro-batch, every row).
    fn tokens_per_step(&self) -> f64 {
        let t = &self.config.train;
        (t.batch_size * t.grad_accum * self.config.model.seq_len) as f64
    }

    /// A fresh cache (a stream's start) for this rank's rows, on the main device.
    fn fresh_cache(&self) -> Option<LmCache> {
        self.model()
            .new_cache(self.cache_rows.len(), &self.replicas[0])
    }

    /// The model (between optimiser steps it is always there).
    fn model(&self) -> &Lm {
        self.model.as_ref().expect("the model between steps")
    }

    /// Set up a run: config, data (it fixes the vocabulary), the resume point (checked before
    /// anything is written), devices, the run directory, model and optimiser (restored when
    /// resuming), metrics, and the opening lines.
    fn start(opts: &TrainOptions, world: &'w World) -> Result<Self> {
        let mut config = resolve_config(opts)?;
        let run_dir = config.train.run_dir.clone().expect("resolved");
        let t = config.train.clone();
        // Rank 0 downloads and tokenises (cache, `.part` files) while the others wait; then
        // they read what it wrote.
        let source = root_first(world, || {
            Source::build(&config.data, config.model.seq_len, t.batch_size, t.seed)
        })?;
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
        let resume_from = resume_point(opts.resume.as_deref(), &config, &run_dir)?;
        if resume_from.is_some() {
            source.check_run_tokenizer(&run_dir)?;
        }
        same_start_everywhere(world, resume_from.as_ref().map(|(_, m)| m.step))?;

        let all = config.train.select_devices()?;
        let shards = world.size() * all.len();
        if t.batch_size < shards {
            bail!(
                "train.batch_size = {} is smaller than the {shards} shards of a micro-batch \
                 ({} rank(s) x {} device(s)): each needs at least one row; raise \
                 train.batch_size (it is the global micro-batch) or use fewer ranks or devices",
                t.batch_size,
                world.size(),
                all.len()
            );
        }
        // Data-parallel devices with autodiff; the first holds the model.
        let replicas: Vec<Device> = all.iter().map(|s| s.device.clone().autodiff()).collect();
        if world.is_root() {
            open_run_dir(&run_dir, &config, &source, resume_from.is_some())?;
        }
        world.barrier();

        replicas[0].seed(t.seed);
        let mut model: Lm = config.model.init(&replicas[0]).context("invalid [model]")?;
        draw_parameters_now(&model);
        if let Some((ckpt, _)) = &resume_from {
            model = checkpoint::load_model(ckpt, model)?;
        }
        let model = broadcast_parameters(world, model);
        // Built after loading: weight-decay groups are keyed by the (restored) parameter ids.
        let mut optim = optimizer(&config.optim, &model);
        let (mut start, mut valid_loss) = (0, None);
        if let Some((ckpt, manifest)) = &resume_from {
            optim = checkpoint::load_optim(ckpt, optim)?;
            start = manifest.step;
            valid_loss = manifest.valid_loss;
        }
        // This rank's rows of every global batch ([`Trainer::step_batches`]) and their cache.
        let cache_rows = shard_rows(t.batch_size, world.size()).swap_remove(world.rank());
        let cache = match (&resume_from, model.window()) {
            (_, None) => None,
            (Some((ckpt, manifest)), Some(_)) => {
                let meta = manifest
                    .cache
                    .as_ref()
                    .expect("resume_point checks the cache");
                let host = HostCache::read(ckpt, meta)?;
                Some(host.to_cache(&model, cache_rows.clone(), &replicas[0]))
            }
            (None, Some(_)) => model.new_cache(cache_rows.len(), &replicas[0]),
        };
        let metrics = if world.is_root() {
            let keep = resume_from.as_ref().map(|(_, m)| m.step);
            let metrics = MetricsLog::open(&run_dir, keep)?;
            announce(&config, &all, &model, &source, &run_dir, start)?;
            announce_world(world, &config, resume_from.as_ref().map(|(_, m)| m));
            Some(metrics)
        } else {
            None
        };

        let protocol = Protocol::of(&config);
        let valid_batches = for_evaluation(
            &source,
            &config,
            source.valid_batches(&protocol, (t.eval_batches > 0).then_some(t.eval_batches)),
        );
        Ok(Self {
            unit: source.unit(&config.data),
            selected: all[0].clone(),
            progress: if world.is_root() {
                progress_bar(t.steps as u64, start as u64)
            } else {
                ProgressBar::hidden()
            },
            world,
            config,
            run_dir,
            source,
            replicas,
            model: Some(model),
            optim,
            metrics,
            protocol,
            valid_batches,
            cache,
            cache_rows,
            start,
            step: start,
            train_loss: None,
            valid_loss,
            skipped: 0,
            poison_step: std::env::var("MIXLAB_FAULT_NAN_STEP")
                .ok()
                .and_then(|v| v.parse::<usize>().ok()),
            started: Instant::now(),
            window: (Instant::now(), 0),
            all_reduce: None,
        })
    }

    /// One optimiser step: the step's micro-batches forward and backward (this rank's share,
    /// split across its devices), the sum over ranks, global-norm clipping, one read of loss
    /// and gradient norm, then AdamW — or, for a non-finite loss or norm, stop or skip as
    /// `train.on_nonfinite` says.
    fn train_step(&mut self, stop: &AtomicBool) -> Result<StepOutcome> {
        let t = &self.config.train;
        let world = self.world;
        // Per-step randomness (dropout) comes from (seed, step), so a resumed run repeats it;
        // every device of every rank has a stream of its own.
        let first = world.rank() * self.replicas.len();
        for (i, replica) in self.replicas.iter().enumerate() {
            let seed = mix(t.seed, self.step as u64) ^ (first + i) as u64;
            replica.seed(seed);
            mixlab_models::seed_dropout(replica, seed);
        }
        let lr = learning_rate(&self.config.optim, self.step, t.steps);
        let (batches, weight) = self.step_batches();
        let mut loss_sum: Option<Tensor<1>> = None;
        let models = fork_replicas(self.model(), &self.replicas);
        let mut accumulator = GradientsAccumulator::<Lm>::new();
        let seq = self.config.model.seq_len;
        for (m, batch) in batches.iter().enumerate() {
            // Where the streams start over, so does the cache (the window before is not the
            // text before).
            let index = (self.step * t.grad_accum + m) as u64;
            if self.cache.is_some() && self.source.stream_restarts(t.batch_size, seq, index) {
                self.cache = self.fresh_cache();
            }
            let extras = Extras {
                // The penalty once per optimiser step in total, spread over the micro-batches
                // (on rank 0: the ranks' gradients are summed).
                penalty_divisor: world.is_root().then_some(t.grad_accum as f64),
                poison: self.poison_step == Some(self.step),
            };
            let (loss, next) = accumulate_micro_batch(
                &models,
                batch,
                self.cache.as_ref(),
                &self.replicas,
                weight,
                extras,
                &mut accumulator,
            )?;
            self.cache = next;
            loss_sum = Some(match loss_sum {
                Some(sum) => sum + loss,
                None => loss,
            });
        }
        drop(models); // the replicas' references to the parameters, before AdamW updates them
        let loss_sum = loss_sum.expect("grad_accum >= 1");
        // Several ranks: one all-reduce of gradients, loss and stop flag (the loss is then known).
        let (grads, reduced_loss, stop) = if world.is_distributed() {
            let asked = stop.load(Ordering::SeqCst);
            let device = &self.selected.device;
            let r = all_reduce_step(
                world,
                self.model(),
                accumulator.grads(),
                loss_sum.clone(),
                asked,
                device,
            );
            self.all_reduce = Some((r.bytes, r.seconds));
            (r.grads, Some(r.loss), r.stop)
        } else {
            (accumulator.grads(), None, false)
        };
        let (grads, grad_norm) = clip_global_norm(self.model(), grads, self.config.optim.grad_clip);
        // The step's one device-to-host read: loss and gradient norm together, after the
        // backward and the clipping are queued.
        let mut read = if reduced_loss.is_none() {
            vec![loss_sum]
        } else {
            vec![]
        };
        read.extend(grad_norm);
        let mut values = read_scalars(read).into_iter();
        let loss = reduced_loss.unwrap_or_else(|| values.next().expect("the loss"));
        let grad_norm = values.next().unwrap_or(0.0);
        self.step += 1;
        self.train_loss = Some(loss);
        if loss.is_finite() && grad_norm.is_finite() {
            let model = self.model.take().expect("the model");
            self.model = Some(self.optim.step(lr, model, grads));
            return Ok(StepOutcome {
                lr,
                loss,
                grad_norm,
                stop,
            });
        }
        let step = self.step;
        match t.on_nonfinite {
            NonFinite::Stop => bail!(
                "the loss ({loss}) or gradient norm ({grad_norm}) is not finite at step \
                 {step}; nothing was written for it and the last checkpoint is kept. Lower \
                 optim.lr, raise optim.warmup_steps, or set train.on_nonfinite = \"skip\""
            ),
            NonFinite::Skip => {
                self.skipped += 1;
                // The cache may hold the non-finite values: its streams go on from a fresh one.
                if self.cache.is_some() {
                    self.cache = self.fresh_cache();
                }
                say_root(
                    world,
                    &self.progress,
                    format!(
                        "warning: step {step} skipped (loss {loss}, gradient norm \
                     {grad_norm}); {} skipped so far",
                        self.skipped
                    ),
                );
            }
        }
        Ok(StepOutcome {
            lr,
            loss,
            grad_norm,
            stop,
        })
    }

    /// This step's micro-batches (this rank's rows of each global micro-batch) and the loss
    /// weight of the whole global step, which every shard's loss is divided by.
    fn step_batches(&self) -> (Vec<Batch>, f64) {
        let t = &self.config.train;
        let seq = self.config.model.seq_len;
        let batches: Vec<Batch> = (0..t.grad_accum)
            .map(|m| {
                let index = (self.step * t.grad_accum + m) as u64;
                let batch = self.source.train_batch(t.batch_size, seq, index);
                self.source
                    .for_objective(batch, t.objective, t.mask_rate, t.seed, index)
            })
            .collect();
        let weight: f64 = batches.iter().map(|b| b.weight_sum()).sum();
        let world = self.world;
        if !world.is_distributed() {
            return (batches, weight);
        }
        let mine = batches
            .into_iter()
            .map(|b| b.split(world.size()).swap_remove(world.rank()))
            .collect();
        (mine, weight)
    }

    /// The progress bar, and a `train` line of `metrics.jsonl` every `log_every` steps.
    fn log(&mut self, o: &StepOutcome) -> Result<()> {
        self.window.1 += 1;
        let tokens_per_s =
            self.tokens_per_step() * self.window.1 as f64 / self.window.0.elapsed().as_secs_f64();
        let t = &self.config.train;
        self.progress.set_position(self.step as u64);
        self.progress.set_message(format!(
            "loss {:.4} | lr {:.2e} | {tokens_per_s:.0} tok/s",
            o.loss, o.lr
        ));
        if !self.step.is_multiple_of(t.log_every) && self.step != t.steps {
            return Ok(());
        }
        check_replicas(self.world, self.model(), self.step)?;
        let Some(metrics) = self.metrics.as_mut() else {
            return Ok(());
        };
        let mut extra = vec![
            ("lr", json!(o.lr)),
            ("grad_norm", json!(o.grad_norm)),
            ("tokens_per_s", json!(tokens_per_s)),
            ("elapsed_s", json!(self.started.elapsed().as_secs_f64())),
            ("skipped_steps", json!(self.skipped)),
            ("rss_mb", json!(crate::telemetry::rss_mb())),
        ];
        if let Some((in_use, reserved)) = crate::telemetry::device_memory_mb(&self.selected.device)
        {
            extra.push(("device_mem_in_use_mb", json!(in_use)));
            extra.push(("device_mem_reserved_mb", json!(reserved)));
        }
        if let Some((name, value)) = self.unit.metric(o.loss) {
            extra.push((name, json!(value)));
        }
        if let Some((bytes, seconds)) = self.all_reduce {
            extra.push(("world_size", json!(self.world.size())));
            extra.push(("all_reduce_mb", json!(bytes as f64 / 1e6)));
            extra.push(("all_reduce_ms", json!(seconds * 1e3)));
        }
        metrics.write(self.step, "train", o.loss, &extra)?;
        self.window = (Instant::now(), 0);
        Ok(())
    }

    /// Validation loss (the whole split and then the test split at the `last` step), logged.
    /// Rank 0 only: the others go on to the next step and wait for it in its all-reduce.
    fn evaluate(&mut self, last: bool) -> Result<()> {
        if !self.world.is_root() {
            return Ok(());
        }
        let t = &self.config.train;
        let device = &self.selected.device;
        let for_eval = |batches| for_evaluation(&self.source, &self.config, batches);
        let full;
        let batches = if last && t.eval_batches > 0 {
            full = for_eval(self.source.valid_batches(&self.protocol, None));
            &full
        } else {
            &self.valid_batches
        };
        let mut splits = vec![("valid", evaluate(self.model(), batches, device))];
        if last && let Some(test) = self.source.test_batches(&self.protocol) {
            splits.push(("test", evaluate(self.model(), &for_eval(test), device)));
        }
        let protocol = self.protocol.describe();
        // Adaptive spans as learned so far (tokens, per layer and head): plotted as spans.svg.
        let spans = self.model().learned_spans();
        let spans = spans.iter().any(|l| !l.is_empty()).then(|| json!(spans));
        for (split, (loss, tokens)) in splits {
            let mut extra = vec![("tokens", json!(tokens)), ("protocol", json!(protocol))];
            if split == "valid" {
                self.valid_loss = Some(loss);
                extra.extend(spans.clone().map(|s| ("learned_spans", s)));
            }
            let shown = match self.unit.metric(loss) {
                Some((name, value)) => {
                    extra.push((name, json!(value)));
                    format!("{name} {value:.4}")
                }
                None => String::new(),
            };
            if let Some(metrics) = self.metrics.as_mut() {
                metrics.write(self.step, split, loss, &extra)?;
            }
            say(
                &self.progress,
                format!(
                    "step {}: {split} loss {loss:.4} {shown} ({tokens} tokens, {protocol})",
                    self.step
                ),
            );
        }
        Ok(())
    }

    /// A checkpoint of the current step, written by rank 0 while the others wait (a cache is
    /// first gathered from every rank).
    fn checkpoint(&self) -> Result<()> {
        let cache = self.cache.as_ref().map(|c| {
            HostCache::gather(
                self.world,
                c,
                self.cache_rows.clone(),
                self.config.train.batch_size,
            )
        });
        if self.world.is_root() {
            write_checkpoint(
                &self.config,
                &self.run_dir,
                self.model(),
                &self.optim,
                Progress {
                    step: self.step,
                    valid_loss: self.valid_loss,
                    backend: self.selected.backend,
                    world_size: self.world.size(),
                    cache: cache.as_ref(),
                },
            )?;
        }
        self.world.barrier();
        Ok(())
    }

    /// Close the progress bar, draw the plots, write and print the run summary.
    fn finish(self, interrupted: bool) -> Result<Summary> {
        if !self.world.is_root() {
            return Ok(Summary {
                run_dir: self.run_dir,
                step: self.step,
                interrupted,
                train_loss: self.train_loss,
                valid_loss: self.valid_loss,
            });
        }
        if interrupted {
            say(
                &self.progress,
                format!("interrupted: checkpoint written at step {}", self.step),
            );
        }
        self.progress.finish_and_clear();
        match crate::plot::write_plots(&self.run_dir) {
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
        let tokens_per_step = self.tokens_per_step();
        let seconds = self.started.elapsed().as_secs_f64();
        let report = json!({
            "kind": "summary",
            "model": self.config.model.kind(),
            "params": self.model().num_params(),
            "backend": self.selected.backend,
            "step": self.step,
            "steps_this_session": self.step - self.start,
            "seconds_this_session": seconds,
            "tokens_per_s": tokens_per_step * (self.step - self.start) as f64 / seconds.max(1e-9),
            "peak_rss_mb": crate::telemetry::peak_rss_mb(),
            "skipped_steps": self.skipped,
            "interrupted": interrupted,
            "learned_spans": self.model().learned_spans(),
        });
        match run_summary(&self.run_dir, report, self.unit) {
            Ok(text) => eprintln!("{text}"),
            Err(e) => eprintln!("mixlab: warning: no run summary ({e:#})"),
        }
        Ok(Summary {
            run_dir: self.run_dir,
            step: self.step,
            interrupted,
            train_loss: self.train_loss,
            valid_loss: self.valid_loss,
        })
    }
}

/// Create the run directory (clearing a crashed checkpoint's partial files), then write its
/// `config.toml` (saying what a resume changes) and the tokenizer.
fn open_run_dir(run_dir: &Path, config: &Config, source: &Source, resuming: bool) -> Result<()> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    checkpoint::clean_partial(run_dir)?;
    if resuming {
        report_changes(&run_dir.join("config.toml"), config);
    }
    std::fs::write(run_dir.join("config.toml"), config.to_toml())?;
    if let Some(tok) = source.tokenizer() {
        std::fs::write(run_dir.join("tokenizer.json"), serde_json::to_string(tok)?)?;
    }
    Ok(())
}

/// The run's opening lines: device, size, mixer, vocabulary, run directory; data-parallel
/// notes; the resume step; each sparse layer's pattern.
fn announce(
    config: &Config,
    all: &[Selected],
    model: &Lm,
    source: &Source,
    run_dir: &Path,
    start: usize,
) -> Result<()> {
    eprintln!(
        "mixlab: {} | {} parameters | {} | vocab {} ({} occur in train) | run dir {}",
        all[0].description,
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
            config.train.batch_size
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
    for sparse in crate::patterns::sparse_layers(&config.model, config.model.seq_len)? {
        eprintln!("mixlab: {}", sparse.describe());
    }
    Ok(())
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
/// scored, without autodiff and with dropout off. A model with a cache reads the batches as
/// consecutive blocks of the same streams ([`Protocol::Streams`]) and carries its cache from
/// one to the next, starting from a fresh one.
pub fn evaluate(model: &Lm, batches: &[mixlab_data::Batch], device: &Device) -> (f64, u64) {
    let model = model.valid();
    let (mut sum, mut weight) = (0.0, 0.0);
    let mut cache = batches
        .first()
        .and_then(|b| model.new_cache(b.batch, device));
    for batch in batches {
        let (inputs, targets, weights) = to_tensors(batch, device);
        let (h, next) = model.hidden(inputs, cache.as_ref());
        cache = next;
        let loss = model.nll_sum(h, targets, weights);
        sum += f64::from(loss.into_scalar::<f32>());
        weight += batch.weight_sum();
    }
    (sum / weight.max(1.0), weight as u64)
}

/// One evaluation window's per-token scores ([`score_windows`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowScores {
    /// The window's index in the split (batch-major: row `r` of batch `b` is `b · batch + r`).
    pub window: usize,
    /// The ids the model reads (under the masked objective: with `[MASK]` and random ids at
    /// the chosen positions).
    pub input: Vec<u32>,
    /// The id each position is scored against (causal: the next token; masked: the original).
    pub target: Vec<u32>,
    /// The positions that are scored (weight > 0): the masked positions, or under a strided
    /// evaluation the window's new tokens.
    pub scored: Vec<usize>,
    /// The weight of each scored position (1 except at a split's edge).
    pub weight: Vec<f32>,
    /// `log p(target | input)` in nats at each scored position.
    pub logprob: Vec<f64>,
}

/// Per-token scores of the first `k` windows of `batches` under the run's protocol (the
/// same windows, masks and cache [`evaluate`] uses): for checking another implementation of the
/// model token by token. `Σ weight · logprob / Σ weight` over all windows is minus
/// [`evaluate`]'s loss when `k` covers the split.
pub fn score_windows(
    model: &Lm,
    batches: &[mixlab_data::Batch],
    device: &Device,
    k: usize,
) -> Vec<WindowScores> {
    let model = model.valid();
    let mut out = vec![];
    let mut cache = batches
        .first()
        .and_then(|b| model.new_cache(b.batch, device));
    for batch in batches {
        if out.len() >= k {
            break;
        }
        let (inputs, targets, _) = to_tensors(batch, device);
        let (h, next) = model.hidden(inputs, cache.as_ref());
        cache = next;
        let log_probs = burn::tensor::activation::log_softmax(model.logits(h), 2);
        let picked: Vec<f32> = log_probs
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32");
        let (input, target) = batch.inputs_targets();
        let ids = |v: &[i64]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        for r in 0..batch.batch {
            if out.len() >= k {
                break;
            }
            let row = r * batch.seq..(r + 1) * batch.seq;
            let weights: Vec<f32> = match &batch.weights {
                Some(w) => w[row.clone()].to_vec(),
                None => vec![1.0; batch.seq],
            };
            let scored: Vec<usize> = (0..batch.seq).filter(|&p| weights[p] > 0.0).collect();
            out.push(WindowScores {
                window: out.len(),
                input: ids(&input[row.clone()]),
                target: ids(&target[row.clone()]),
                weight: scored.iter().map(|&p| weights[p]).collect(),
                logprob: scored
                    .iter()
                    .map(|&p| f64::from(picked[row.start + p]))
                    .collect(),
                scored,
            });
        }
    }
    out
}

/// Burn initialises a parameter lazily, from the device's generator at its first use: draw
/// every one now, right after seeding, so the initial weights depend on `train.seed` alone —
/// not on which step or rank first touches them — and are the same in one process and in
/// every rank of an MPI run.
fn draw_parameters_now(model: &Lm) {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    model.visit(&mut Touch);
}

/// `f` on rank 0 first, then (after a barrier) on the other ranks: files rank 0 creates
/// (downloads, caches) are there, complete, when the others look.
fn root_first<T>(world: &World, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if world.is_root() {
        let out = f()?;
        world.barrier();
        Ok(out)
    } else {
        world.barrier();
        f()
    }
}

/// Every rank must start from the same step (they read one run directory, which must be on a
/// filesystem every node sees): otherwise their loops would pair different collectives.
fn same_start_everywhere(world: &World, resumed_step: Option<usize>) -> Result<()> {
    if !world.is_distributed() {
        return Ok(());
    }
    let mine = resumed_step.map_or(u64::MAX, |s| s as u64);
    let all = world.all_gather(mine);
    if all.iter().any(|&s| s != all[0]) {
        let show = |s: u64| {
            if s == u64::MAX {
                "a fresh start".to_string()
            } else {
                format!("step {s}")
            }
        };
        let seen: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(r, &s)| format!("rank {r}: {}", show(s)))
            .collect();
        bail!(
            "the ranks would start from different points ({}): the run directory must be on a \
             filesystem every node sees, holding the same checkpoints",
            seen.join(", ")
        );
    }
    Ok(())
}

/// Rank 0's note on the MPI world: ranks, rows per rank, and a world size that differs from
/// the checkpoint's.
fn announce_world(world: &World, config: &Config, resumed: Option<&checkpoint::Manifest>) {
    if world.is_distributed() {
        eprintln!(
            "mixlab: MPI data parallel over {} ranks; each global micro-batch of {} rows is \
             split across them, gradients summed in one all-reduce per optimizer step",
            world.size(),
            config.train.batch_size
        );
    }
    if let Some(m) = resumed
        && m.world_size != world.size()
    {
        eprintln!(
            "mixlab: the checkpoint was written by {} rank(s), this run has {}: the same \
             global batches, so (with dropout 0) the same updates up to the order of the sums",
            m.world_size,
            world.size()
        );
    }
}

/// A line on rank 0 only ([`say`]).
fn say_root(world: &World, progress: &ProgressBar, line: String) {
    if world.is_root() {
        say(progress, line);
    }
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
