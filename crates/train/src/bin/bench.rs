//! `bench`: performance measurements, one JSON line per measurement on stdout.
//!
//! ```text
//! cargo run --release --bin bench -- train --config configs/bench-small.toml --backend flex --steps 20
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mixlab_train::{TrainOptions, print_json};

/// Mixlab benchmarks: training throughput, mixer scaling, backend parity, data loading.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  bench train --config configs/bench-small.toml --backend flex --steps 10\n  bench scaling --config configs/sparse-window.toml --n 1024,2048,4096\n  bench cache --block 256,512 --span 256,1024,4096"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Training throughput: forward, backward and optimizer step.
    Train {
        /// TOML config of the model and batch to measure.
        #[arg(long)]
        config: PathBuf,
        /// Backend(s): auto, flex, ndarray, wgpu or cuda; repeat to compare in one run.
        #[arg(long)]
        backend: Vec<String>,
        /// Data-parallel devices, comma-separated (as `train --devices`).
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Override any config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Validate the config and build its model at full size on the device, train nothing
        /// (one `"kind": "dry-run"` line); what `scripts/gpu-check.sh --dry-run` runs.
        #[arg(long)]
        dry_run: bool,
    },
    /// Backend parity: each mixer family's tiny model with the same weights on flex and on
    /// BACKEND (logits, loss before and after one AdamW step); exit 1 when any disagrees.
    Parity {
        /// The backend to check against flex.
        #[arg(long, default_value = "wgpu")]
        backend: String,
    },
    /// The attention operation alone (forward + backward of q, k, v): the fused tiled
    /// operation against composed tensor ops, with the fused path's TFLOP/s and the largest
    /// output difference between the two.
    Attention {
        /// Backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096")]
        n: Vec<usize>,
        /// Batch rows.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Heads.
        #[arg(long, default_value_t = 12)]
        heads: usize,
        /// Head width.
        #[arg(long, default_value_t = 64)]
        d_head: usize,
        /// Bidirectional instead of causal.
        #[arg(long)]
        bidirectional: bool,
        /// Timed repeats per measurement (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Skip the composed path where its score tensors (about three `[batch, heads, n, n]`
        /// f32) would pass this many GB.
        #[arg(long, default_value_t = 4.0)]
        composed_max_gb: f64,
    },
    /// The mixing layer alone (forward + backward): FNet FFT vs FNet DFT vs dense attention.
    Mixing {
        /// Backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Model width.
        #[arg(long, default_value_t = 256)]
        d_model: usize,
        /// Sequence lengths.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "128,256,512,1024,2048,4096"
        )]
        lengths: Vec<usize>,
        /// Timed repeats per measurement (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// One mixer layer (batch 1, forward + backward) over growing lengths: dense attention as
    /// the baseline and the sparse or persistent mixer of each config, each point in a fresh
    /// process; on GPU backends with the peak device memory of each point.
    Scaling {
        /// Configs whose first sparse or persistent mixer to measure; repeat for several.
        #[arg(long)]
        config: Vec<PathBuf>,
        /// Sequence lengths.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "512,1024,2048,4096,8192,16384"
        )]
        n: Vec<usize>,
        /// Backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Model width.
        #[arg(long, default_value_t = 256)]
        d_model: usize,
        /// Timed repeats per point (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Skip dense points whose score tensors would need more than this many GB
        /// (default: 80% of the memory available now). ndarray only (composed attention): on
        /// flex, wgpu and CUDA dense memory is linear in n.
        #[arg(long)]
        max_dense_gb: Option<f64>,
        /// Internal: measure only this mixer (JSON) at the one length given.
        #[arg(long, hide = true)]
        one: Option<String>,
    },
    /// One cached all-attention layer (forward + backward, batch 1) at each block length and
    /// cache span, fused (flex) and composed, beside the cacheless layer over the same block:
    /// tokens/s and peak RSS, each point in a fresh process.
    Cache {
        /// Backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Model width.
        #[arg(long, default_value_t = 512)]
        d_model: usize,
        /// Heads.
        #[arg(long, default_value_t = 8)]
        heads: usize,
        /// Persistent vectors per head.
        #[arg(long, default_value_t = 1024)]
        memory: usize,
        /// Block lengths (queries per step).
        #[arg(long, value_delimiter = ',', default_value = "256,512")]
        block: Vec<usize>,
        /// Cache spans.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "256,512,1024,2048,4096,8192"
        )]
        span: Vec<usize>,
        /// Timed repeats per point (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Skip composed points whose `[block, span + block]` score tensors (about six live,
        /// f32, per head) would pass this many GB.
        #[arg(long, default_value_t = 6.0)]
        composed_max_gb: f64,
        /// Internal: measure only this point, `block:span:fused|composed`.
        #[arg(long, hide = true)]
        one: Option<String>,
    },
    /// The output layer alone (forward + backward, Zipf-like targets): the full softmax and
    /// the adaptive softmax, each in a fresh process (time, peak RSS, and their ratios).
    Head {
        /// Backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Vocabulary size (WikiText-103: 267,735).
        #[arg(long, default_value_t = 267_735)]
        vocab: usize,
        /// Hidden width.
        #[arg(long, default_value_t = 512)]
        d_model: usize,
        /// Hidden states (batch × sequence).
        #[arg(long, default_value_t = 4096)]
        rows: usize,
        /// Adaptive softmax cutoffs (Transformer-XL's on WikiText-103).
        #[arg(long, value_delimiter = ',', default_value = "20000,40000,200000")]
        cutoffs: Vec<usize>,
        /// Adaptive softmax width divisor per tail.
        #[arg(long, default_value_t = 4)]
        div_val: usize,
        /// Timed repeats per head (median reported).
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Internal: measure only `full` or `adaptive`.
        #[arg(long, hide = true)]
        one: Option<String>,
    },
    /// Corpus tokenisation and token-cache load times on a synthetic WikiText-103-shaped corpus.
    Data {
        /// Size of the generated corpus in MB (WikiText-103 train is about 540).
        #[arg(long, default_value_t = 540)]
        size_mb: usize,
        /// Folder for the generated corpus and its cache.
        #[arg(long, default_value = "target/bench-data")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    mixlab_train::malloc::keep_freed_memory();
    if let Some(warning) = mixlab_models::unoptimised_build_warning(mixlab_models::BUILD_OPT_LEVEL)
    {
        eprintln!("{warning}");
    }
    let (config, backend, devices, set, steps, warmup, dry_run) = match Cli::parse().command {
        Command::Train {
            config,
            backend,
            devices,
            set,
            steps,
            warmup,
            dry_run,
        } => (config, backend, devices, set, steps, warmup, dry_run),
        Command::Attention {
            backend,
            n,
            batch,
            heads,
            d_head,
            bidirectional,
            repeats,
            composed_max_gb,
        } => {
            return print_json(mixlab_train::bench::attention(
                &backend,
                &n,
                (batch, heads, d_head),
                !bidirectional,
                repeats.max(1),
                composed_max_gb,
            ));
        }
        Command::Mixing {
            backend,
            d_model,
            lengths,
            repeats,
        } => {
            return print_json(mixlab_train::bench::mixing(
                &backend,
                d_model,
                &lengths,
                repeats.max(1),
            ));
        }
        Command::Head {
            backend,
            vocab,
            d_model,
            rows,
            cutoffs,
            div_val,
            repeats,
            one,
        } => {
            let shape = (vocab, d_model, rows);
            let repeats = repeats.max(1);
            if let Some(which) = one {
                let adaptive = (which == "adaptive").then_some((cutoffs.as_slice(), div_val));
                return print_json(
                    mixlab_train::bench::head_point(&backend, shape, adaptive, repeats)
                        .map(|l| vec![l]),
                );
            }
            return match head_bench(&backend, shape, (&cutoffs, div_val), repeats) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Cache {
            backend,
            d_model,
            heads,
            memory,
            block,
            span,
            repeats,
            composed_max_gb,
            one,
        } => {
            let repeats = repeats.max(1);
            let shape = (d_model, heads, memory);
            if let Some(point) = one {
                let parsed = parse_cache_point(&point).and_then(|(block, span, fused)| {
                    mixlab_train::bench::cache_point(&backend, shape, (block, span), fused, repeats)
                });
                return print_json(parsed.map(|l| vec![l]));
            }
            return match cache_bench(&backend, shape, (&block, &span), repeats, composed_max_gb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Scaling {
            config,
            n,
            backend,
            d_model,
            repeats,
            max_dense_gb,
            one,
        } => {
            let repeats = repeats.max(1);
            if let Some(mixer) = one {
                let point = serde_json::from_str(&mixer)
                    .map_err(anyhow::Error::from)
                    .and_then(|m| {
                        mixlab_train::bench::scaling_point(&backend, &m, d_model, n[0], repeats)
                    });
                return print_json(point.map(|l| vec![l]));
            }
            return match scaling(&config, &n, &backend, d_model, repeats, max_dense_gb) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Parity { backend } => return parity(&backend),
        Command::Data { size_mb, dir } => {
            return print_json(mixlab_train::bench::data_load(size_mb, &dir).map(|l| vec![l]));
        }
    };
    if backend.len() > 1 {
        return compare(&backend);
    }
    let opts = TrainOptions {
        config: Some(config),
        resume: None,
        backend: backend.into_iter().next(),
        devices,
        overrides: set,
    };
    if dry_run {
        return print_json(mixlab_train::bench::build_only(&opts).map(|l| vec![l]));
    }
    print_json(mixlab_train::bench::train_step(&opts, steps.max(1), warmup).map(|l| vec![l]))
}

/// Several backends: measure each in its own process (so `peak_rss_mb` is that backend's
/// alone), print their lines, then one `compare` line with throughput ratios against the first.
fn compare(backends: &[String]) -> ExitCode {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut lines = vec![];
    for backend in backends {
        // The same arguments with only this backend.
        let mut single = vec![];
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--backend" {
                it.next();
            } else if !a.starts_with("--backend=") {
                single.push(a.clone());
            }
        }
        single.extend(["--backend".to_string(), backend.clone()]);
        let out = match std::process::Command::new(&exe).args(&single).output() {
            Ok(out) => out,
            Err(e) => {
                eprintln!("error: cannot run {}: {e}", exe.display());
                return ExitCode::from(1);
            }
        };
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return ExitCode::from(1);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("{line}");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                lines.push(v);
            }
        }
    }
    let base = &lines[0];
    let ratios: serde_json::Map<String, serde_json::Value> = lines
        .iter()
        .map(|l| {
            let r = l["tokens_per_s"].as_f64().unwrap_or(0.0)
                / base["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            (
                l["backend"].as_str().unwrap_or("?").to_string(),
                serde_json::json!(r),
            )
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"kind": "compare", "baseline": base["backend"], "tokens_per_s_ratio": ratios})
    );
    ExitCode::SUCCESS
}

/// The first sparse or persistent mixer of each config (what `bench scaling` measures).
fn measured_mixers(configs: &[PathBuf]) -> anyhow::Result<Vec<mixlab_models::MixerConfig>> {
    use mixlab_models::MixerConfig;
    let mut mixers = vec![];
    for path in configs {
        let config = mixlab_train::Config::load(path, &[])?;
        let layers = config.model.layer_mixers()?;
        let measured = layers
            .iter()
            .find(|m| matches!(m, MixerConfig::Sparse(_) | MixerConfig::Persistent(_)))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no layer uses kind = \"sparse\" or \"persistent\"",
                    path.display()
                )
            })?;
        mixers.push(measured.clone());
    }
    Ok(mixers)
}

/// Per mixer: the least-squares exponent of time in n over the points from 2048 up, and
/// dense's time over the mixer's at every n both measured.
fn scaling_summary(
    mixers: &[mixlab_models::MixerConfig],
    results: &[(String, usize, f64)],
) -> serde_json::Map<String, serde_json::Value> {
    use mixlab_train::bench::mixer_name;
    use serde_json::{Value, json};
    let mut summary = serde_json::Map::new();
    for mixer in mixers {
        let name = mixer_name(mixer);
        let points: Vec<(f64, f64)> = results
            .iter()
            .filter(|(m, n, _)| *m == name && *n >= 2048)
            .map(|(_, n, t)| ((*n as f64).ln(), t.ln()))
            .collect();
        let exponent = (points.len() >= 2).then(|| {
            let k = points.len() as f64;
            let (mx, my) = (
                points.iter().map(|p| p.0).sum::<f64>() / k,
                points.iter().map(|p| p.1).sum::<f64>() / k,
            );
            points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
                / points.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>()
        });
        let dense_over: serde_json::Map<String, Value> = results
            .iter()
            .filter(|(m, _, _)| *m == name)
            .filter_map(|(_, n, t)| {
                let dense = results.iter().find(|(m, dn, _)| m == "dense" && dn == n)?;
                Some((n.to_string(), json!(dense.2 / t)))
            })
            .collect();
        summary.insert(
            name,
            json!({"time_exponent_from_2048": exponent, "dense_over_this": dense_over}),
        );
    }
    summary
}

/// Runs this binary with `args` (a `--one` measurement) in a fresh process, so its peak RSS
/// is that measurement's alone, its stderr shown: its first JSON line, or why there is none.
fn measure_in_child(args: &[&str]) -> anyhow::Result<Result<serde_json::Value, String>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let parsed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    Ok(parsed
        .filter(|_| out.status.success())
        .ok_or_else(|| format!("measurement process failed: {}", out.status)))
}

/// `bench head`: the full and the adaptive softmax, each in its own process; the adaptive
/// line carries its speed-up and memory ratio against the full one.
fn head_bench(
    backend: &str,
    (vocab, d_model, rows): (usize, usize, usize),
    (cutoffs, div_val): (&[usize], usize),
    repeats: usize,
) -> anyhow::Result<()> {
    use serde_json::{Value, json};
    let cutoffs: Vec<String> = cutoffs.iter().map(usize::to_string).collect();
    let cutoffs = cutoffs.join(",");
    let mut full: Option<Value> = None;
    for which in ["full", "adaptive"] {
        let (vocab, d_model, rows) = (vocab.to_string(), d_model.to_string(), rows.to_string());
        let (div_val, repeats) = (div_val.to_string(), repeats.to_string());
        let args = [
            "head",
            "--one",
            which,
            "--backend",
            backend,
            "--vocab",
            &vocab,
            "--d-model",
            &d_model,
            "--rows",
            &rows,
            "--cutoffs",
            &cutoffs,
            "--div-val",
            &div_val,
            "--repeats",
            &repeats,
        ];
        let mut line = match measure_in_child(&args)? {
            Ok(line) => line,
            Err(error) => {
                println!("{}", json!({"kind": "head", "head": which, "error": error}));
                continue;
            }
        };
        if let Some(f) = &full {
            let ratio = |key: &str| Some(f[key].as_f64()? / line[key].as_f64()?);
            let (time, rss) = (ratio("fwd_bwd_s"), ratio("peak_rss_mb"));
            line["full_over_adaptive_time"] = json!(time);
            line["full_over_adaptive_rss"] = json!(rss);
        }
        println!("{line}");
        if which == "full" {
            full = Some(line);
        }
    }
    Ok(())
}

/// `block:span:fused|composed`, as `bench cache --one` takes it.
fn parse_cache_point(point: &str) -> anyhow::Result<(usize, usize, bool)> {
    let parts: Vec<&str> = point.split(':').collect();
    match parts[..] {
        [block, span, path @ ("fused" | "composed")] => {
            Ok((block.parse()?, span.parse()?, path == "fused"))
        }
        _ => anyhow::bail!("--one {point}: expected block:span:fused|composed"),
    }
}

/// `bench cache`: per block length, the cacheless layer and then each span, fused and
/// composed, every point in its own process (so `peak_rss_mb` is that point's); each line with
/// its time over the cacheless layer's on the same path and its time ratio to the previous span.
fn cache_bench(
    backend: &str,
    (d_model, heads, memory): (usize, usize, usize),
    (blocks, spans): (&[usize], &[usize]),
    repeats: usize,
    composed_max_gb: f64,
) -> anyhow::Result<()> {
    use serde_json::json;
    for &block in blocks {
        for path in ["fused", "composed"] {
            let mut baseline: Option<f64> = None;
            let mut previous: Option<(usize, f64)> = None;
            for span in std::iter::once(0).chain(spans.iter().copied()) {
                let need = 24.0 * (heads * block * (span + block + memory)) as f64 / 1e9;
                if path == "composed" && need > composed_max_gb {
                    println!(
                        "{}",
                        json!({"kind": "cache", "path": path, "block": block, "span": span,
                               "skipped": format!("composed needs ~{need:.1} GB of scores (--composed-max-gb {composed_max_gb})")})
                    );
                    continue;
                }
                let point = format!("{block}:{span}:{path}");
                let (repeats, d_model) = (repeats.to_string(), d_model.to_string());
                let (heads, memory) = (heads.to_string(), memory.to_string());
                let args = [
                    "cache",
                    "--one",
                    &point,
                    "--backend",
                    backend,
                    "--repeats",
                    &repeats,
                    "--d-model",
                    &d_model,
                    "--heads",
                    &heads,
                    "--memory",
                    &memory,
                ];
                let mut line = match measure_in_child(&args)? {
                    Ok(line) => line,
                    Err(error) => {
                        println!(
                            "{}",
                            json!({"kind": "cache", "path": path, "block": block, "span": span,
                                   "error": error})
                        );
                        continue;
                    }
                };
                let time = line["fwd_bwd_s"].as_f64().unwrap_or(f64::NAN);
                if span == 0 {
                    baseline = Some(time);
                } else {
                    line["time_over_cacheless"] = json!(baseline.map(|b| time / b));
                    if let Some((prev_span, prev_time)) = previous {
                        line["span_ratio"] = json!(span as f64 / prev_span as f64);
                        line["time_ratio"] = json!(time / prev_time);
                    }
                    previous = Some((span, time));
                }
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `bench scaling`: every (mixer, n) point in its own process; lines as they finish, each with
/// its time and memory ratio to the previous length, then a summary with the fitted exponent
/// of time in n (from 2048 up) and dense/sparse time ratios.
fn scaling(
    configs: &[PathBuf],
    lengths: &[usize],
    backend: &str,
    d_model: usize,
    repeats: usize,
    max_dense_gb: Option<f64>,
) -> anyhow::Result<()> {
    use mixlab_models::MixerConfig;
    use mixlab_models::mixer::DenseAttentionConfig;
    use mixlab_train::bench::mixer_name;
    use mixlab_train::telemetry::available_gb;
    use serde_json::{Value, json};
    let mut mixers = measured_mixers(configs)?;
    let (n_heads, causal) = match mixers.first() {
        Some(MixerConfig::Sparse(c)) => (c.n_heads, c.causal),
        Some(MixerConfig::Persistent(c)) => (c.n_heads, c.causal),
        _ => (4, true),
    };
    mixers.insert(
        0,
        MixerConfig::Dense(DenseAttentionConfig { n_heads, causal }),
    );
    let limit_gb = max_dense_gb.or_else(|| available_gb().map(|a| 0.8 * a));

    let mut results: Vec<(String, usize, f64)> = vec![];
    for mixer in &mixers {
        let name = mixer_name(mixer);
        let mut previous: Option<Value> = None;
        for &n in lengths {
            // On flex and the Cube backends (wgpu, CUDA) dense attention is the tiled operation
            // (memory linear in n); on ndarray it is composed: scores, masked scores, weights
            // and their gradients, ~6 live n x n per head.
            if let (MixerConfig::Dense(_), Some(limit), true) =
                (mixer, limit_gb, backend == "ndarray")
            {
                let need = 24.0 * n_heads as f64 * (n as f64).powi(2) / 1e9;
                if need > limit {
                    println!(
                        "{}",
                        json!({"kind": "scaling", "mixer": name, "n": n,
                               "skipped": format!("dense needs ~{need:.1} GB, limit {limit:.1} GB (--max-dense-gb)")})
                    );
                    continue;
                }
            }
            let mixer_json = serde_json::to_string(mixer)?;
            let (n_text, d_text) = (n.to_string(), d_model.to_string());
            let repeats_text = repeats.to_string();
            let args = [
                "scaling",
                "--one",
                &mixer_json,
                "--n",
                &n_text,
                "--backend",
                backend,
                "--d-model",
                &d_text,
                "--repeats",
                &repeats_text,
            ];
            let mut line = match measure_in_child(&args)? {
                Ok(line) => line,
                Err(error) => {
                    println!(
                        "{}",
                        json!({"kind": "scaling", "mixer": name, "n": n, "error": error})
                    );
                    continue;
                }
            };
            if let Some(prev) = &previous {
                let ratio = |key: &str| Some(line[key].as_f64()? / prev[key].as_f64()?);
                let (time, rss, device_memory) = (
                    ratio("fwd_bwd_s"),
                    ratio("peak_rss_mb"),
                    ratio("peak_device_memory_mb"),
                );
                line["n_ratio"] = json!(n as f64 / prev["n"].as_f64().unwrap_or(f64::NAN));
                line["time_ratio"] = json!(time);
                line["rss_ratio"] = json!(rss);
                line["device_memory_ratio"] = json!(device_memory);
            }
            println!("{line}");
            results.push((
                name.clone(),
                n,
                line["fwd_bwd_s"].as_f64().unwrap_or(f64::NAN),
            ));
            previous = Some(line);
        }
    }
    let summary = scaling_summary(&mixers, &results);
    println!(
        "{}",
        json!({"kind": "scaling_summary", "backend": backend, "d_model": d_model, "mixers": summary})
    );
    Ok(())
}

fn parity(backend: &str) -> ExitCode {
    let run = || -> anyhow::Result<Vec<serde_json::Value>> {
        let choice = mixlab_train::device::BackendChoice::parse(backend)?;
        let other = mixlab_train::device::select(choice)?;
        eprintln!("parity: flex vs {}", other.description);
        mixlab_train::bench::parity(&other)
    };
    match run() {
        Ok(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            let bad: Vec<&str> = lines
                .iter()
                .filter(|l| l["ok"] != true)
                .filter_map(|l| l["mixer"].as_str())
                .collect();
            if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "error: {backend} disagrees with flex on: {}",
                    bad.join(", ")
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
