//! `export`: write a run's newest valid checkpoint as safetensors with Mixlab's names (the
//! default), or as a Hugging Face `transformers` checkpoint directory (`--format hf`:
//! `config.json`, `model.safetensors`, `tokenizer.json`), and list its tensors.
//!
//! ```text
//! cargo run --release --bin export -- --run runs/dense --out dense.safetensors
//! cargo run --release --bin export -- --run runs/dense --format hf --out hf/dense
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use mixlab_train::config::Objective;
use mixlab_train::{Config, checkpoint, exit_with, export, hf};

/// What `--format` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// One safetensors file, tensors under Mixlab's module names.
    Mixlab,
    /// A transformers checkpoint directory: GPT2LMHeadModel (dense) or FNetForMaskedLM (FNet).
    Hf,
}

/// Export a trained Mixlab model's weights.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  export --run runs/quickstart --out model.safetensors\n  \
                  export --run runs/dense --format hf --out hf/dense\n  \
                  (then in Python: AutoModelForCausalLM.from_pretrained(\"hf/dense\"))"
)]
struct Cli {
    /// The run directory.
    #[arg(long)]
    run: PathBuf,
    /// The safetensors file to write (`--format mixlab`) or the directory (`--format hf`).
    #[arg(long)]
    out: PathBuf,
    /// `mixlab` (safetensors with Mixlab's names) or `hf` (a transformers checkpoint).
    #[arg(long, value_enum, default_value = "mixlab")]
    format: Format,
}

fn run(cli: &Cli) -> Result<()> {
    let config = Config::load(&cli.run.join("config.toml"), &[])?;
    if cli.format == Format::Hf {
        // Refuse what transformers cannot express before any work.
        hf::class_of(&config.model)?;
    }
    let (ckpt, manifest) = checkpoint::newest(&cli.run, "export")?;
    // On flex, in the run's precision (the checkpoint's dtype).
    let mut selected = mixlab_train::device::select(mixlab_train::device::BackendChoice::Flex)?;
    mixlab_train::device::set_precision(&mut selected, config.train.precision)?;
    let device = selected.device.clone();
    let model = checkpoint::load_model(&ckpt, config.model.init(&device)?)?;
    match cli.format {
        Format::Mixlab => {
            export::to_safetensors(&model, &cli.out)?;
            eprintln!(
                "mixlab: wrote {} (step {})",
                cli.out.display(),
                manifest.step
            );
            for (name, dtype, shape) in export::tensor_names(&cli.out)? {
                println!("{name}\t{dtype}\t{shape:?}");
            }
        }
        Format::Hf => {
            let path = cli.run.join("tokenizer.json");
            let tokenizer: Option<mixlab_data::Tokenizer> = match std::fs::read_to_string(&path) {
                Ok(text) => Some(serde_json::from_str(&text).with_context(|| {
                    format!("cannot read the run's tokenizer {}", path.display())
                })?),
                Err(_) => None,
            };
            let mask = config.train.objective == Objective::Masked;
            let written = hf::write(&cli.out, &config.model, &model, tokenizer.as_ref(), mask)?;
            eprintln!(
                "mixlab: wrote {} as {} (step {}){}",
                cli.out.display(),
                written.class.architecture(),
                manifest.step,
                if written.tokenizer {
                    " with tokenizer.json"
                } else {
                    "; no tokenizer.json: the run has no text tokenizer (copy task)"
                }
            );
            for (name, dtype, shape) in written.tensors {
                println!("{name}\t{dtype}\t{shape:?}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_with(run(&Cli::parse()))
}
