//! `bench`: performance measurements, one JSON line per measurement on stdout.
//!
//! ```text
//! cargo run --release --bin bench -- train --config configs/bench-small.toml --backend flex --steps 20
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mixlab_train::TrainOptions;

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
}

fn main() -> ExitCode {
    let Command::Train {
        config,
        backend,
        set,
        steps,
        warmup,
    } = Cli::parse().command;
    let backends: Vec<Option<String>> = if backend.is_empty() {
        vec![None]
    } else {
        backend.into_iter().map(Some).collect()
    };
    for backend in backends {
        let opts = TrainOptions {
            config: Some(config.clone()),
            resume: None,
            backend,
            overrides: set.clone(),
        };
        match mixlab_train::bench::train_step(&opts, steps.max(1), warmup) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
