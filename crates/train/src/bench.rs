//! Benchmarks: measured in the same run as their baseline and printed as JSON lines.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::GradientsParams;
use mixlab_data::Batch;
use mixlab_models::loss::cross_entropy_sum;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::device::{self, BackendChoice};
use crate::optim::{adamw, clip_global_norm, learning_rate};
use crate::source::{Source, to_tensors};
use crate::trainer::{TrainOptions, resolve_config};

/// Time `steps` training steps (forward, backward, global clipping, AdamW) after `warmup`
/// untimed ones, on corpus batches when `[data]` can be loaded, else on uniform random tokens.
pub fn train_step(opts: &TrainOptions, steps: usize, warmup: usize) -> Result<Value> {
    let mut config = resolve_config(opts)?;
    let seq = config.model.seq_len;
    let batch_size = config.train.batch_size;
    let source = Source::build(&config.data, seq, batch_size, config.train.seed).ok();
    let vocab = match (&source, config.model.vocab_size) {
        (_, Some(v)) => v,
        (Some(s), None) => s.vocab_size(),
        (None, None) => 256,
    };
    config.model.vocab_size = Some(vocab);
    let selected = device::select(BackendChoice::parse(&config.train.backend)?)?;
    let ad = selected.device.clone().autodiff();
    ad.seed(config.train.seed);
    let mut model = config.model.init(&ad).context("invalid [model]")?;
    let mut optim = adamw(&config.optim, &model);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.train.seed);
    let mut batch_at = |i: u64| match &source {
        Some(s) => s.train_batch(batch_size, seq, i),
        None => Batch {
            batch: batch_size,
            seq,
            tokens: (0..batch_size * (seq + 1))
                .map(|_| rng.random_range(0..vocab as u32))
                .collect(),
            weights: None,
        },
    };
    let mut times = vec![];
    for i in 0..warmup + steps {
        let batch = batch_at(i as u64);
        let started = Instant::now();
        let (inputs, targets, weights) = to_tensors(&batch, &ad);
        let loss = cross_entropy_sum(model.forward(inputs), targets, weights)
            .div_scalar(batch.weight_sum());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (grads, _) = clip_global_norm(&model, grads, config.optim.grad_clip);
        let lr = learning_rate(&config.optim, i, warmup + steps);
        model = optim.step(lr, model, grads);
        selected.device.sync().ok();
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (batch_size * seq) as f64;
    Ok(json!({
        "kind": "train",
        "config": opts.config.as_ref().map(|p| p.display().to_string()),
        "backend": selected.backend,
        "device": selected.description,
        "mixer": config.model.mixer.kind(),
        "batch_size": batch_size,
        "seq_len": seq,
        "steps": steps,
        "step_s_median": median,
        "tokens_per_s": tokens / median,
        "params": model.num_params(),
        "peak_rss_mb": peak_rss_mb(),
        "data": if source.is_some() { "corpus" } else { "random" },
    }))
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), or null elsewhere.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
