//! Benchmarks: measured in the same run as their baseline and printed as JSON lines.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use mixlab_data::Batch;
use mixlab_models::loss::cross_entropy_sum;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::Config;
use crate::device::{self, BackendChoice};
use crate::optim::{adamw, clip_global_norm, learning_rate, optimizer, read_scalars};
use crate::parallel::{Extras, accumulate_micro_batch, fork_replicas};
use crate::source::Source;
use crate::telemetry::{device_memory_mb, peak_rss_mb, rss_mb};
use crate::trainer::{TrainOptions, resolve_config};

/// The config `bench train` measures: `opts` resolved, the vocabulary from the corpus when
/// the config names one, else `model.vocab_size` or 256 (random tokens); and the corpus.
fn bench_config(opts: &TrainOptions) -> Result<(Config, Option<Source>)> {
    let mut config = resolve_config(opts)?;
    let source = Source::build(
        &config.data,
        config.model.seq_len,
        config.train.batch_size,
        config.train.seed,
    )
    .ok();
    let vocab = match (&source, config.model.vocab_size) {
        (_, Some(v)) => v,
        (Some(s), None) => s.model_vocab(config.train.objective),
        (None, None) => 256,
    };
    config.model.vocab_size = Some(vocab);
    Ok((config, source))
}

/// `bench train --dry-run`: validate the config and build its model on the selected device at
/// full size, nothing trained. One JSON line (`kind: "dry-run"`, `params`, `mixer`, `backend`).
/// What `scripts/gpu-check.sh --dry-run` runs for every row, so that a check waiting for a GPU
/// cannot rot.
pub fn build_only(opts: &TrainOptions) -> Result<Value> {
    let (config, _) = bench_config(opts)?;
    let selected = config.train.select_devices()?;
    let device = selected[0].device.clone().autodiff();
    let model = config.model.init(&device).context("invalid [model]")?;
    Ok(json!({
        "kind": "dry-run",
        "config": opts.config.as_ref().map(|p| p.display().to_string()),
        "backend": selected[0].backend,
        "mixer": config.model.kind(),
        "params": model.num_params(),
        "seq_len": config.model.seq_len,
        "batch_size": config.train.batch_size,
    }))
}

/// Time `steps` training steps (forward, backward, global clipping, AdamW) after `warmup`
/// untimed ones, on corpus batches when `[data]` can be loaded, else on uniform random tokens.
pub fn train_step(opts: &TrainOptions, steps: usize, warmup: usize) -> Result<Value> {
    let (config, source) = bench_config(opts)?;
    let seq = config.model.seq_len;
    let batch_size = config.train.batch_size;
    let objective = config.train.objective;
    let vocab = config
        .model
        .vocab_size
        .expect("bench_config sets the vocabulary");
    // Random tokens leave room for [MASK] at the top of the vocabulary.
    let data_vocab = vocab - usize::from(objective == crate::config::Objective::Masked);
    let all = config.train.select_devices()?;
    let selected = all[0].clone();
    let replicas: Vec<_> = all.iter().map(|s| s.device.clone().autodiff()).collect();
    let ad = replicas[0].clone();
    ad.seed(config.train.seed);
    let mut model = config.model.init(&ad).context("invalid [model]")?;
    let mut optim = optimizer(&config.optim, &model);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.train.seed);
    let mut batch_at = |i: u64| match &source {
        Some(s) => s.train_batch(batch_size, seq, i),
        None => Batch {
            batch: batch_size,
            seq,
            tokens: (0..batch_size * (seq + 1))
                .map(|_| rng.random_range(0..data_vocab as u32))
                .collect(),
            weights: None,
            masked_inputs: None,
        },
    };
    let mut times = vec![];
    let mut peak_device_mb = 0f64;
    let mut memory_series = vec![];
    // A model with a cache carries it from step to step, as training does.
    let mut cache = model.new_cache(batch_size, &ad);
    for i in 0..warmup + steps {
        let batch = batch_at(i as u64);
        let batch = match objective {
            crate::config::Objective::Causal => batch,
            crate::config::Objective::Masked => {
                let mask = data_vocab as u32;
                batch.masked(
                    mask,
                    mask,
                    config.train.mask_rate,
                    config.train.seed,
                    i as u64,
                )
            }
        };
        let started = Instant::now();
        let mut accumulator = GradientsAccumulator::new();
        let (loss, next) = accumulate_micro_batch(
            &fork_replicas(&model, &replicas),
            &batch,
            cache.as_ref(),
            &replicas,
            batch.weight_sum(),
            Extras::default(),
            &mut accumulator,
        )?;
        cache = next;
        let (grads, norm) = clip_global_norm(&model, accumulator.grads(), config.optim.grad_clip);
        // The trainer's one read per step (loss and norm together), timed as it runs.
        read_scalars(std::iter::once(loss).chain(norm).collect());
        let lr = learning_rate(&config.optim, i, warmup + steps);
        model = optim.step(lr, model, grads);
        for s in &all {
            s.device.sync().ok();
        }
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64());
        }
        let reserved = device_memory_mb(&selected.device).map(|(_, reserved)| reserved);
        peak_device_mb = peak_device_mb.max(reserved.unwrap_or(0.0));
        // Ten memory samples over the run (after step 1, then every tenth of it): growth
        // across a long run shows here (burn#5212 / #4792).
        let every = ((warmup + steps) / 10).max(1);
        if (i + 1) % every == 0 || i == 0 {
            memory_series.push(json!({
                "step": i + 1,
                "rss_mb": rss_mb(),
                "device_reserved_mb": reserved,
            }));
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (batch_size * seq) as f64;
    let flop = train_flop_per_token(&config.model, model.num_params())? * tokens;
    let ceiling = gemm_ceiling_gflops(&selected.device);
    Ok(json!({
        "kind": "train",
        "config": opts.config.as_ref().map(|p| p.display().to_string()),
        "backend": selected.backend,
        "device": all.iter().map(|s| s.description.as_str()).collect::<Vec<_>>().join(" + "),
        "devices": all.len(),
        "mixer": config.model.kind(),
        "batch_size": batch_size,
        "seq_len": seq,
        "steps": steps,
        "step_s_median": median,
        "tokens_per_s": tokens / median,
        "params": model.num_params(),
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_memory_mb": (peak_device_mb > 0.0).then_some(peak_device_mb),
        "memory_series": memory_series,
        "data": if source.is_some() { "corpus" } else { "random" },
        "model_gflop_per_step": flop / 1e9,
        "achieved_gflops": flop / 1e9 / median,
        "gemm_ceiling_gflops": ceiling,
        "fraction_of_ceiling": flop / 1e9 / median / ceiling,
    }))
}

/// Training FLOPs per token, nanoGPT-style: `6 · N` for the weights that multiply every token
/// (all parameters but the embedding tables; the tied head is counted once through the
/// embedding's matmul) plus `12 · d · k` per layer for the attention scores and weighted sums,
/// with `k` the keys a token attends to (`seq` for dense, the pattern's mean for sparse,
/// `seq + N` for persistent memory). FNet's transforms are not counted (they are not matmuls
/// of parameters; the DFT path's are `O(n d (n + d))` more).
pub fn train_flop_per_token(model: &mixlab_models::LmConfig, params: usize) -> Result<f64> {
    use mixlab_models::MixerConfig;
    let d = model.d_model as f64;
    let n = model.seq_len as f64;
    let vocab = model.vocab_size.unwrap_or(0) as f64;
    let positions = if model.position == mixlab_models::Position::Learned {
        n * d
    } else {
        0.0
    };
    // The embedding table is a gather, but the tied head reuses it as a [d, vocab] matmul.
    let mut flop = 6.0 * (params as f64 - positions);
    // Only keys per token are needed here, not the Assumption-1 verdicts.
    let sparse: Vec<(Vec<usize>, f64)> = crate::patterns::sparse_mixers(model)?
        .into_iter()
        .map(|(config, layers)| {
            let patterns = crate::patterns::layer_patterns(&config, &layers, model.seq_len);
            let keys = mixlab_models::pattern::check::connections(&patterns, model.seq_len).mean;
            (layers, keys)
        })
        .collect();
    for (layer, mixer) in model.layer_mixers()?.iter().enumerate() {
        let keys = match mixer {
            MixerConfig::Dense(_) => n,
            MixerConfig::Persistent(c) => n + c.n_persistent(model.d_model) as f64,
            MixerConfig::Sparse(_) => sparse
                .iter()
                .find(|(layers, _)| layers.contains(&layer))
                .map_or(n, |&(_, keys)| keys),
            MixerConfig::Fourier(_) => 0.0,
        };
        flop += 12.0 * d * keys;
    }
    if !model.tie_embeddings {
        flop -= 6.0 * vocab * d; // an untied table is only gathered; its head is counted once
    }
    Ok(flop)
}

/// Measured f32 GEMM rate of `device` in GFLOP/s: a 1024³ matmul, median of 5 after a warm-up.
pub fn gemm_ceiling_gflops(device: &burn::tensor::Device) -> f64 {
    use burn::tensor::{Distribution, Tensor};
    let a = Tensor::<2>::random([1024, 1024], Distribution::Default, device);
    let b = Tensor::<2>::random([1024, 1024], Distribution::Default, device);
    let mut times = vec![];
    for i in 0..6 {
        let started = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = c.slice([0..1, 0..1]).into_scalar::<f32>();
        if i > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    2.0 * 1024f64.powi(3) / times[times.len() / 2] / 1e9
}

/// The token-mixing layer alone, forward + backward, for each sequence length in `lengths`
/// (batch 1, `d_model` wide, 4 heads for attention): FNet by FFT, FNet by DFT matrices, and
/// dense attention, all measured in this run. Median of `repeats` after one warm-up; one JSON
/// line per length with the times and the dense/FFT and dense/DFT ratios.
pub fn mixing(
    backend: &str,
    d_model: usize,
    lengths: &[usize],
    repeats: usize,
) -> Result<Vec<Value>> {
    use burn::tensor::{Distribution, Tensor};
    use mixlab_models::mixer::{DenseAttentionConfig, MixerConfig};
    let selected = device::select(BackendChoice::parse(backend)?)?;
    let ad = selected.device.clone().autodiff();
    let mut lines = vec![];
    for &n in lengths {
        let ctx = one_layer(d_model, n);
        let dense = MixerConfig::Dense(DenseAttentionConfig {
            n_heads: 4,
            causal: false,
        })
        .init(&ctx, &ad);
        let time = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| -> f64 {
            let mut times = vec![];
            for r in 0..=repeats {
                let x = Tensor::<3>::random([1, n, d_model], Distribution::Normal(0.0, 1.0), &ad)
                    .require_grad();
                let started = Instant::now();
                let y = f(x.clone());
                let grads = y.sum().backward();
                let _ = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
                if r > 0 {
                    times.push(started.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let fft = (n.is_power_of_two() && d_model.is_power_of_two())
            .then(|| time(&|x| mixlab_models::mixer::fft_mix(x)));
        let dft = time(&|x| mixlab_models::mixer::dft_mix(x, false));
        let attention = time(&|x| dense.forward(x, None));
        lines.push(json!({
            "kind": "mixing",
            "backend": selected.backend,
            "n": n,
            "d_model": d_model,
            "fft_s": fft,
            "dft_s": dft,
            "dense_s": attention,
            "dense_over_fft": fft.map(|f| attention / f),
            "dense_over_dft": attention / dft,
        }));
    }
    Ok(lines)
}

/// The attention operation alone — no projections, no layout copies outside it — at each
/// length: `[batch, heads, n, d_head]` queries, keys and values, forward + backward (gradients
/// of all three), fused (the tiled operation: flex's kernel, CubeCL on wgpu/CUDA) against the
/// composed tensor ops in the same run (skipped where its `n × n` scores would pass
/// `composed_max_gb`). Each line: median times, the fused path's achieved TFLOP/s (attention's
/// `4 · b · h · n² · d` forward FLOPs, 2.5× that backward, halved when causal), the composed
/// path's time over the fused one, and the largest output difference between the two (a
/// correctness check at full size). A GPU session reads kernel efficiency off `fused_tflops`.
pub fn attention(
    backend: &str,
    lengths: &[usize],
    (batch, heads, d_head): (usize, usize, usize),
    causal: bool,
    repeats: usize,
    composed_max_gb: f64,
) -> Result<Vec<Value>> {
    use burn::tensor::{Distribution, Tensor};
    use mixlab_models::mixer::{DenseAttentionConfig, Mixer, MixerConfig};
    let selected = device::select(BackendChoice::parse(backend)?)?;
    let ad = selected.device.clone().autodiff();
    ad.seed(0);
    let mut lines = vec![];
    for &n in lengths {
        let mut ctx = one_layer(heads * d_head, n);
        ctx.fused_attention = true;
        let Mixer::Dense(layer) = MixerConfig::Dense(DenseAttentionConfig {
            n_heads: heads,
            causal,
        })
        .init(&ctx, &ad) else {
            unreachable!("a dense config builds a dense mixer")
        };
        let shape = [batch, heads, n, d_head];
        let draw = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &ad);
        let (q, k, v) = (draw(), draw(), draw());
        let fused_on = mixlab_models::mixer::attention_fused_on(&ad, d_head);
        // Forward + backward through one path; the first run warms up (kernel compilation).
        let time = |fused: bool| -> (f64, Tensor<4>) {
            let mut times = vec![];
            let mut first = None;
            for r in 0..=repeats {
                let [q, k, v] = [&q, &k, &v].map(|t| t.clone().detach().require_grad());
                let started = Instant::now();
                let y = layer.attend_with(q.clone(), k.clone(), v.clone(), fused);
                let grads = y.clone().sum().backward();
                let g = [&q, &k, &v]
                    .map(|t| t.grad(&grads).expect("a gradient").sum())
                    .into_iter()
                    .reduce(|a, b| a + b)
                    .expect("three");
                let _ = g.into_scalar::<f32>();
                if r > 0 {
                    times.push(started.elapsed().as_secs_f64());
                } else {
                    first = Some(y.detach());
                }
            }
            times.sort_by(f64::total_cmp);
            (times[times.len() / 2], first.expect("one run"))
        };
        let scores_gb = (batch * heads * n * n * 4) as f64 / 1e9;
        let (fused_s, fused_y) = time(fused_on);
        let composed = (fused_on && 3.0 * scores_gb <= composed_max_gb).then(|| time(false));
        let causal_share = if causal { 0.5 } else { 1.0 };
        let flops = 3.5 * 4.0 * (batch * heads * n * n * d_head) as f64 * causal_share;
        let max_abs_diff = composed.as_ref().map(|(_, y)| {
            (fused_y.clone() - y.clone())
                .abs()
                .max()
                .into_scalar::<f32>() as f64
        });
        lines.push(json!({
            "kind": "attention",
            "backend": selected.backend,
            "n": n,
            "batch": batch,
            "heads": heads,
            "d_head": d_head,
            "causal": causal,
            "fused": fused_on,
            "fused_s": fused_s,
            "fused_tflops": flops / fused_s / 1e12,
            "composed_s": composed.as_ref().map(|(t, _)| *t),
            "composed_over_fused": composed.as_ref().map(|(t, _)| t / fused_s),
            "max_abs_diff": max_abs_diff,
        }));
    }
    Ok(lines)
}

/// The context of a lone mixer layer measured at length `n` (no dropout, no positions).
fn one_layer(d_model: usize, n: usize) -> mixlab_models::mixer::MixerContext {
    mixlab_models::mixer::MixerContext {
        d_model,
        n_layers: 1,
        dropout: 0.0,
        max_seq_len: n,
        rope_theta: None,
        relative_positions: false,
        bias: true,
        layer: 0,
        fused_attention: true,
    }
}

/// Name of a mixer in benchmark lines: `dense`, or `sparse:<patterns>/b<block>`.
pub fn mixer_name(mixer: &mixlab_models::MixerConfig) -> String {
    match mixer {
        mixlab_models::MixerConfig::Sparse(c) => {
            format!("sparse:{}/b{}", c.pattern_names("|"), c.block)
        }
        other => other.kind().to_string(),
    }
}

/// One mixer layer alone (`d_model` wide, batch 1) at sequence length `n`: forward + backward
/// wall time (median of `repeats` after one warm-up) and this process's peak RSS. Run each
/// point in a fresh process (`bench scaling` does) so the peak belongs to that point alone.
pub fn scaling_point(
    backend: &str,
    mixer: &mixlab_models::MixerConfig,
    d_model: usize,
    n: usize,
    repeats: usize,
) -> Result<Value> {
    use burn::tensor::{Distribution, Tensor};
    let selected = device::select(BackendChoice::parse(backend)?)?;
    let ad = selected.device.clone().autodiff();
    ad.seed(0);
    let ctx = one_layer(d_model, n);
    mixer
        .validate(&ctx)
        .map_err(|e| anyhow::anyhow!("{}: {e}", mixer_name(mixer)))?;
    let layer = mixer.init(&ctx, &ad);
    let mut times = vec![];
    // Burn's pools report bytes in use now, not a peak: sample after the forward (every saved
    // activation and the output alive) and after the backward (the gradients alive), synced.
    let mut peak_device_mb: Option<f64> = None;
    let mut sample = |device: &burn::tensor::Device| {
        if let Some((in_use, _)) = device_memory_mb(device) {
            peak_device_mb = Some(peak_device_mb.map_or(in_use, |p: f64| p.max(in_use)));
        }
    };
    for r in 0..=repeats {
        let x = Tensor::<3>::random([1, n, d_model], Distribution::Normal(0.0, 1.0), &ad)
            .require_grad();
        let started = Instant::now();
        let y = layer.forward(x.clone(), None);
        let timed = r > 0;
        if !timed {
            ad.sync().ok();
            sample(&selected.device);
        }
        let grads = y.sum().backward();
        let _ = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        if timed {
            times.push(started.elapsed().as_secs_f64());
        } else {
            sample(&selected.device);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "kind": "scaling",
        "mixer": mixer_name(mixer),
        "backend": selected.backend,
        "n": n,
        "d_model": d_model,
        "fwd_bwd_s": times[times.len() / 2],
        "peak_rss_mb": peak_rss_mb(),
        "peak_device_memory_mb": peak_device_mb,
    }))
}

/// One cached all-attention layer (`heads` heads of `d_model / heads`, `memory` persistent
/// vectors, relative positions, no adaptive span so the whole span is paid for) at batch 1:
/// forward + backward of a block of `block` queries after a cache of `span` earlier inputs
/// (keys `[cache ; block]`, each query over its `span` previous positions), or with `span = 0`
/// the cacheless layer over the block alone (the baseline). `fused`: the tiled operation
/// (flex), else composed tensor ops. Median of `repeats` after one warm-up, tokens per second
/// (`block / time`) and this process's peak RSS: run each point in a fresh process (`bench
/// cache` does).
pub fn cache_point(
    backend: &str,
    (d_model, heads, memory): (usize, usize, usize),
    (block, span): (usize, usize),
    fused: bool,
    repeats: usize,
) -> Result<Value> {
    use burn::tensor::{Distribution, Tensor};
    use mixlab_models::mixer::{MixerConfig, PersistentAttentionConfig};
    use mixlab_models::{CacheView, Window};
    let selected = device::select(BackendChoice::parse(backend)?)?;
    let ad = selected.device.clone().autodiff();
    ad.seed(0);
    let mut ctx = one_layer(d_model, block.max(span));
    ctx.relative_positions = true;
    ctx.bias = false;
    ctx.fused_attention = fused;
    let mixer = MixerConfig::Persistent(PersistentAttentionConfig {
        n_heads: heads,
        n_persistent: Some(memory),
        ..PersistentAttentionConfig::default()
    });
    mixer
        .validate(&ctx)
        .map_err(|e| anyhow::anyhow!("persistent: {e}"))?;
    let layer = mixer.init(&ctx, &ad);
    let d_head = d_model / heads;
    let normal = Distribution::Normal(0.0, 1.0);
    let key_pe = Tensor::<2>::random([d_head, block.max(span)], normal, &ad).require_grad();
    let view = CacheView {
        window: Window {
            span,
            include_self: false,
        },
        valid: vec![span],
    };
    let mut times = vec![];
    for r in 0..=repeats {
        let x = Tensor::<3>::random([1, block, d_model], normal, &ad).require_grad();
        let started = Instant::now();
        let y = if span == 0 {
            layer.forward(x.clone(), Some(&key_pe))
        } else {
            // The cache is detached, as in training.
            let cache = Tensor::<3>::random([1, span, d_model], normal, &ad);
            layer.forward_cached(x.clone(), cache, Some(&key_pe), &view)
        };
        let grads = y.sum().backward();
        let _ = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        if r > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let time = times[times.len() / 2];
    Ok(json!({
        "kind": "cache",
        "backend": selected.backend,
        "path": if fused { "fused" } else { "composed" },
        "block": block,
        "span": span,
        "d_model": d_model,
        "heads": heads,
        "memory": memory,
        "fwd_bwd_s": time,
        "tokens_per_s": block as f64 / time,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// The output layer alone at `rows` hidden states of `d_model` over `vocab` words, forward +
/// backward of the summed negative log-likelihood of random targets drawn Zipf-like (rank
/// `r` with weight `1 / (r + 1)`, as word frequencies): `full` (one `[d_model, vocab]`
/// projection, log-softmax over every word) or `adaptive` (`cutoffs`, `div_val`). Median of
/// `repeats` after one warm-up and this process's peak RSS: run each in its own process
/// (`bench head` does).
pub fn head_point(
    backend: &str,
    (vocab, d_model, rows): (usize, usize, usize),
    adaptive: Option<(&[usize], usize)>,
    repeats: usize,
) -> Result<Value> {
    use burn::tensor::{Distribution, Int, Tensor, activation};
    use mixlab_models::adaptive::AdaptiveConfig;
    let selected = device::select(BackendChoice::parse(backend)?)?;
    let ad = selected.device.clone().autodiff();
    ad.seed(0);
    // Zipf-like targets from a fixed generator.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let harmonic: f64 = (1..=vocab).map(|r| 1.0 / r as f64).sum();
    let targets: Vec<i64> = (0..rows)
        .map(|_| {
            let mut u = rng.random::<f64>() * harmonic;
            let mut r = 0;
            while r + 1 < vocab && u > 1.0 / (r + 1) as f64 {
                u -= 1.0 / (r + 1) as f64;
                r += 1;
            }
            r as i64
        })
        .collect();
    let targets = Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(targets, [rows]), &ad);
    let head = adaptive.map(|(cutoffs, div_val)| {
        AdaptiveConfig {
            cutoffs: cutoffs.to_vec(),
            div_val,
            input: false,
        }
        .init_softmax(vocab, d_model, false, &ad)
    });
    let full =
        Tensor::<2>::random([vocab, d_model], Distribution::Normal(0.0, 0.02), &ad).require_grad();
    let mut times = vec![];
    for r in 0..=repeats {
        let h = Tensor::<2>::random([rows, d_model], Distribution::Normal(0.0, 1.0), &ad)
            .require_grad();
        let started = Instant::now();
        let loss = match &head {
            Some(head) => head.nll(None, h.clone(), targets.clone(), None),
            None => {
                let lp = activation::log_softmax(h.clone().matmul(full.clone().transpose()), 1);
                lp.gather(1, targets.clone().unsqueeze_dim(1)).sum().neg()
            }
        };
        let grads = loss.backward();
        let _ = h.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        if r > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "kind": "head",
        "backend": selected.backend,
        "head": if adaptive.is_some() { "adaptive" } else { "full" },
        "cutoffs": adaptive.map(|(c, _)| c.to_vec()),
        "div_val": adaptive.map(|(_, d)| d),
        "vocab": vocab,
        "d_model": d_model,
        "rows": rows,
        "fwd_bwd_s": times[times.len() / 2],
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// Tokenisation and cache throughput on a synthetic word-level corpus of `size_mb` MB shaped
/// like WikiText-103 (267,735 word types with Zipf-distributed frequencies, ~20-word lines, one
/// blank line in three): time to tokenise from text, to build the cache, and to load from it.
pub fn data_load(size_mb: usize, dir: &std::path::Path) -> Result<Value> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("synthetic.tokens");
    let target = size_mb * 1_000_000;
    if std::fs::metadata(&path).map_or(true, |m| (m.len() as usize) < target) {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let types = 267_735f64;
        let (mut written, mut line) = (0usize, 0usize);
        while written < target {
            let mut text = String::from(" ");
            if line % 3 != 2 {
                for _ in 0..20 {
                    // Zipf(1) by inverse transform: rank = types^u.
                    let rank = types.powf(rng.random::<f64>()) as u64;
                    text.push_str(&format!("w{rank} "));
                }
            }
            text.push('\n');
            out.write_all(text.as_bytes())?;
            written += text.len();
            line += 1;
        }
        out.flush()?;
    }
    let request = mixlab_data::LoadRequest {
        corpus: mixlab_data::Corpus::Text,
        path: &path,
        level: mixlab_data::Level::Word,
        bpe: mixlab_data::BpeSettings::default(),
        valid_fraction: 0.01,
        test_fraction: 0.01,
    };
    let started = Instant::now();
    let splits = mixlab_data::load(&request)?;
    let tokenize_s = started.elapsed().as_secs_f64();
    let tokens = splits.train.len() + splits.valid.len() + splits.test.as_ref().map_or(0, Vec::len);
    let vocab = splits.tokenizer.vocab_size();
    let peak_tokenize = peak_rss_mb();
    drop(splits);
    let cache = dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let started = Instant::now();
    mixlab_data::load_cached(&request, &cache, &mut |n| eprintln!("{n}"))?;
    let build_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let cached = mixlab_data::load_cached(&request, &cache, &mut |n| eprintln!("{n}"))?;
    let cache_load_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        cached.train.len() + cached.valid.len() + cached.test.as_ref().map_or(0, Vec::len)
            == tokens
    );
    Ok(json!({
        "kind": "data",
        "size_mb": std::fs::metadata(&path)?.len() as f64 / 1e6,
        "tokens": tokens,
        "vocab": vocab,
        "tokenize_s": tokenize_s,
        "cache_build_s": build_s,
        "cache_load_s": cache_load_s,
        "peak_rss_mb_tokenize": peak_tokenize,
    }))
}

/// The mixer families on a tiny model, for [`parity`]: (name, `[model]` TOML). Both Fourier
/// paths: burn-signal's FFTs (bidirectional) and the DFT matrices (causal).
const PARITY_MODELS: [(&str, usize, &str); 6] = [
    (
        "dense",
        32,
        "d_ff = 64\n[mixer]\nkind = \"dense\"\nn_heads = 4\n",
    ),
    (
        "fourier-fft",
        32,
        "d_ff = 64\n[mixer]\nkind = \"fourier\"\ncausal = false\nimplementation = \"fft\"\n",
    ),
    (
        // d_model 24 is not a power of two: on GPUs `auto` takes the sequence FFT with DFT
        // matrices along the hidden width (`FourierPath::SeqFft`), on flex the fused FFT.
        "fourier-seq-fft",
        24,
        "d_ff = 64\n[mixer]\nkind = \"fourier\"\ncausal = false\nimplementation = \"auto\"\n",
    ),
    (
        "fourier-causal-dft",
        32,
        "d_ff = 64\n[mixer]\nkind = \"fourier\"\ncausal = true\nimplementation = \"dft\"\n",
    ),
    (
        "sparse-strided",
        32,
        "d_ff = 64\n[mixer]\nkind = \"sparse\"\nn_heads = 4\nblock = 4\npattern = [{ kind = \"strided\", stride = 2 }]\n",
    ),
    (
        "persistent",
        32,
        "d_ff = 0\nposition = \"relative\"\n[mixer]\nkind = \"persistent\"\nn_heads = 4\nn_persistent = 8\n",
    ),
];

/// Backend parity: each mixer family's tiny LM (vocab 13, d 32 (24 for the sequence-FFT row), 2 layers, seq 16,
/// batch 2) with the same weights on flex and on `other`: the largest logit difference
/// relative to the largest logit, and the loss before and after one AdamW step on both.
/// `ok` when logits agree within 1e-4 relative, the loss before within 1e-4 and after within
/// 1e-3, and the step lowers the loss. One JSON line per mixer.
pub fn parity(other: &device::Selected) -> Result<Vec<Value>> {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let (b, n, vocab) = (2usize, 16usize, 13i64);
    let ids: Vec<i64> = (0..(b * n) as i64).map(|i| (i * 7 + 3) % vocab).collect();
    let targets: Vec<i64> = (0..(b * n) as i64).map(|i| (i * 5 + 1) % vocab).collect();
    let tok = |v: &Vec<i64>, d: &Device| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b, n]), d)
    };
    let to_vec = |t: Tensor<3>| -> Result<Vec<f32>> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let flex = Device::flex().autodiff();
    let gpu = other.device.clone().autodiff();
    let mut lines = vec![];
    for (name, d_model, mixer) in PARITY_MODELS {
        if name == "fourier-fft" && other.backend == "ndarray" {
            lines.push(
                json!({"kind": "parity", "mixer": name, "device": other.description,
                "skipped": "ndarray has no FFT ops", "ok": true}),
            );
            continue;
        }
        let text =
            format!("vocab_size = 13\nd_model = {d_model}\nn_layers = 2\nseq_len = 16\n{mixer}");
        let cfg: mixlab_models::LmConfig =
            toml::from_str(&text).with_context(|| format!("parity model {name}"))?;
        flex.seed(9);
        let model_f = cfg.init(&flex).context("parity model")?;
        let model_o = cfg
            .init(&gpu)
            .context("parity model")?
            .load_record(model_f.clone().into_record());
        let lf = to_vec(model_f.valid().forward(tok(&ids, &Device::flex())))?;
        let lo = to_vec(model_o.valid().forward(tok(&ids, &other.device)))?;
        let scale = lf.iter().fold(1f32, |m, x| m.max(x.abs()));
        let logit_rel = lf
            .iter()
            .zip(&lo)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        let step = |model: mixlab_models::Lm, d: &Device| {
            let mut optim = adamw(&Default::default(), &model);
            let loss = cross_entropy_sum(model.forward(tok(&ids, d)), tok(&targets, d), None)
                .div_scalar((b * n) as f64);
            let before = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let model = optim.step(1e-3, model, grads);
            let after = cross_entropy_sum(model.forward(tok(&ids, d)), tok(&targets, d), None)
                .div_scalar((b * n) as f64)
                .into_scalar::<f32>();
            (before, after)
        };
        let (bf, af) = step(model_f, &flex);
        let (bo, ao) = step(model_o, &gpu);
        let ok = logit_rel <= 1e-4
            && (bf - bo).abs() <= 1e-4 * bf.abs()
            && (af - ao).abs() <= 1e-3 * af.abs()
            && ao < bo;
        lines.push(json!({
            "kind": "parity",
            "mixer": name,
            "device": other.description,
            "max_logit_rel_diff": logit_rel,
            "loss_before": {"flex": bf, "other": bo},
            "loss_after_step": {"flex": af, "other": ao},
            "ok": ok,
        }));
    }
    Ok(lines)
}
