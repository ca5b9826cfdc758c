//! `sample`: generate text from a trained run's newest valid checkpoint.
//!
//! ```text
//! cargo run --release --bin sample -- --run runs/dense --prompt "ROMEO:" --tokens 200 --temperature 0.8 --top-k 40
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mixlab_train::sample::{SampleOptions, sample};

/// Generate text from a trained Mixlab model.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  sample --run runs/dense-shakespeare --prompt \"ROMEO:\" --tokens 200"
)]
struct Cli {
    /// The run directory (holds config.toml, tokenizer.json and checkpoints/).
    #[arg(long)]
    run: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend: auto, flex, ndarray or wgpu.
    #[arg(long, default_value = "auto")]
    backend: String,
}

fn main() -> ExitCode {
    mixlab_train::malloc::keep_freed_memory();
    let cli = Cli::parse();
    if !(cli.top_p > 0.0 && cli.top_p <= 1.0) || cli.temperature < 0.0 {
        eprintln!("error: --top-p must be in (0, 1] and --temperature >= 0");
        return ExitCode::from(1);
    }
    let opts = SampleOptions {
        prompt: cli.prompt,
        tokens: cli.tokens,
        temperature: cli.temperature,
        top_k: cli.top_k,
        top_p: cli.top_p,
        seed: cli.seed,
        backend: cli.backend,
    };
    match sample(&cli.run, &opts, &mut std::io::stdout()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
