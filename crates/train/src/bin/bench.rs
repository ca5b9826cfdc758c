//! `bench`: performance measurements, one JSON line per measurement on stdout.
//!
//! ```text
//! cargo run --release --bin bench -- train --config configs/bench-small.toml --backend flex --steps 20
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mixlab_train::{TrainOptions, print_json};

/// Mixlab benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
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
        /// Backend(s): auto, flex, ndarray or wgpu; repeat to compare in one run.
        #[arg(long)]
        backend: Vec<String>,
        /// Override any config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
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
    let (config, backend, set, steps, warmup) = match Cli::parse().command {
        Command::Train {
            config,
            backend,
            set,
            steps,
            warmup,
        } => (config, backend, set, steps, warmup),
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
        overrides: set,
    };
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
