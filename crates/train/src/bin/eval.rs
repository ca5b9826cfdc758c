//! `eval`: evaluate a run's newest valid checkpoint on its whole valid or test split with the
//! run's protocol, every token scored once: windows of `seq_len` every `data.eval_stride`
//! tokens, or for a model with a cache `data.eval_streams` contiguous streams with the cache
//! carried from block to block. Prints one JSON line: loss (nats/token), bpc or ppl, tokens
//! scored, tokens/s, and the protocol.
//!
//! `--scores FILE` also writes the first `--score-windows` windows' per-token log-probabilities
//! (JSONL, one window per line) for checking another implementation token by token.
//!
//! ```text
//! cargo run --release --bin eval -- --run runs/dense --split test
//! cargo run --release --bin eval -- --run runs/fnet --scores scores.jsonl --score-windows 16
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use mixlab_train::checkpoint;
use mixlab_train::device::{self, BackendChoice};
use mixlab_train::source::{Protocol, Source};
use mixlab_train::trainer::{evaluate, for_evaluation, score_windows};
use mixlab_train::{Config, print_json};
use serde_json::json;

/// Evaluate a trained Mixlab model on a split of its corpus (loss, bpc or perplexity).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  eval --run runs/quickstart --split test"
)]
struct Cli {
    /// The run directory.
    #[arg(long)]
    run: PathBuf,
    /// `valid` or `test`.
    #[arg(long, default_value = "valid")]
    split: String,
    /// Backend: auto, flex, ndarray or wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Also write the first `--score-windows` windows' per-token scores to this JSONL file:
    /// per window its input ids, targets, scored (e.g. masked) positions and their weights and
    /// log-probabilities, to check another implementation token by token.
    #[arg(long, value_name = "FILE")]
    scores: Option<PathBuf>,
    /// How many windows `--scores` writes.
    #[arg(long, default_value_t = 8, value_name = "K")]
    score_windows: usize,
    /// Override any config key, e.g. --set data.eval_stride=64 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn run(cli: &Cli) -> Result<serde_json::Value> {
    let config = Config::load(&cli.run.join("config.toml"), &cli.set)?;
    let (t, seq) = (&config.train, config.model.seq_len);
    let source = Source::build(&config.data, seq, t.batch_size, t.seed)?;
    source.check_run_tokenizer(&cli.run)?;
    let protocol = Protocol::of(&config);
    let batches = match cli.split.as_str() {
        "valid" => source.valid_batches(&protocol, None),
        "test" => source
            .test_batches(&protocol)
            .context("this corpus has no test split")?,
        other => bail!("--split {other}: use valid or test"),
    };
    let batches = for_evaluation(&source, &config, batches);
    let (ckpt, manifest) = checkpoint::newest(&cli.run, "evaluate")?;
    let mut selected = device::select(BackendChoice::parse(&cli.backend)?)?;
    device::set_precision(&mut selected, config.train.precision)?;
    let model = checkpoint::load_model(&ckpt, config.model.init(&selected.device)?)?;
    let started = Instant::now();
    let (loss, tokens) = evaluate(&model, &batches, &selected.device);
    let seconds = started.elapsed().as_secs_f64();
    let scored = match &cli.scores {
        Some(path) => {
            let windows = score_windows(&model, &batches, &selected.device, cli.score_windows);
            let mut text = String::new();
            for w in &windows {
                text.push_str(&serde_json::to_string(w)?);
                text.push('\n');
            }
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(windows)
        }
        None => None,
    };
    let mut line = json!({
        "kind": "eval",
        "run": cli.run.display().to_string(),
        "step": manifest.step,
        "split": cli.split,
        "loss": loss,
        "tokens": tokens,
        "tokens_per_s": batches.iter().map(|b| (b.batch * b.seq) as f64).sum::<f64>() / seconds,
        "backend": selected.backend,
        "protocol": protocol.describe(),
    });
    if let Some((name, value)) = source.unit(&config.data).metric(loss) {
        line[name] = json!(value);
    }
    if let (Some(path), Some(windows)) = (&cli.scores, scored) {
        let (sum, weight) = windows.iter().fold((0.0, 0.0), |(s, w), x| {
            let ws = x.weight.iter().map(|&v| f64::from(v));
            (
                s - x
                    .logprob
                    .iter()
                    .zip(ws.clone())
                    .map(|(l, w)| l * w)
                    .sum::<f64>(),
                w + ws.sum::<f64>(),
            )
        });
        line["scores"] = json!(path.display().to_string());
        line["scored_windows"] = json!(windows.len());
        // The mean loss over the scored windows alone (what a check of those windows should
        // reproduce).
        line["scored_loss"] = json!(sum / weight.max(1.0));
    }
    Ok(line)
}

fn main() -> ExitCode {
    mixlab_train::malloc::keep_freed_memory();
    print_json(run(&Cli::parse()).map(|line| vec![line]))
}
