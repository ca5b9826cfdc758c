//! `pattern`: Yun et al.'s Assumption-1 report for the sparse attention layers of a config
//! (self-loops, Hamiltonian path, layers to full reach, keys per token, density, padding), and
//! a PNG of each layer's block pattern.
//!
//! ```text
//! cargo run --release --bin pattern -- --config configs/sparse-bigbird.toml --n 1024 --png runs/patterns
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use mixlab_train::Config;
use mixlab_train::exit_with;
use mixlab_train::patterns::{sparse_layers, write_png};

/// Check and draw the sparse attention patterns of a Mixlab config.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  pattern --config configs/sparse-bigbird.toml --png runs/patterns"
)]
struct Cli {
    /// The TOML config.
    #[arg(long)]
    config: PathBuf,
    /// Number of tokens to check (default: model.seq_len).
    #[arg(long)]
    n: Option<usize>,
    /// Write `layer-<l>.png` for every sparse layer into this folder.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Print one JSON line per sparse mixer instead of text.
    #[arg(long)]
    json: bool,
    /// Override any config key, e.g. --set 'model.mixer.pattern=[{kind="window",width=3}]'.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn run(cli: &Cli) -> Result<()> {
    let mut config = Config::load(&cli.config, &cli.set)?;
    // The vocabulary does not matter to the pattern; fill it in so the model validates.
    config.model.vocab_size.get_or_insert(256);
    config
        .model
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cli.config.display()))?;
    let n = cli.n.unwrap_or(config.model.seq_len);
    if n == 0 {
        bail!("--n 0: give at least one token");
    }
    let found = sparse_layers(&config.model, n)?;
    if found.is_empty() {
        bail!(
            "{}: no layer uses kind = \"sparse\" (the model is {})",
            cli.config.display(),
            config.model.kind()
        );
    }
    if let Some(dir) = &cli.png {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    for sparse in &found {
        if cli.json {
            println!("{}", sparse.to_json());
        } else {
            println!("{}", sparse.describe());
        }
        if let Some(dir) = &cli.png {
            for (layer, pattern) in sparse.layers.iter().zip(&sparse.patterns) {
                let path = dir.join(format!("layer-{layer}.png"));
                write_png(&path, pattern)?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_with(run(&Cli::parse()))
}
