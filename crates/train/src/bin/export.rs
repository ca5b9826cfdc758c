//! `export`: write a run's newest valid checkpoint as safetensors and list its tensors.
//!
//! ```text
//! cargo run --release --bin export -- --run runs/dense --out dense.safetensors
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use mixlab_train::{Config, checkpoint, exit_with, export};

/// Export a trained Mixlab model's weights as safetensors (GPT-2 names for dense models).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  export --run runs/quickstart --out model.safetensors"
)]
struct Cli {
    /// The run directory.
    #[arg(long)]
    run: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
}

fn run(cli: &Cli) -> Result<()> {
    let config = Config::load(&cli.run.join("config.toml"), &[])?;
    let (ckpt, manifest) = checkpoint::newest(&cli.run, "export")?;
    // On flex, in the run's precision (the checkpoint's dtype).
    let mut selected = mixlab_train::device::select(mixlab_train::device::BackendChoice::Flex)?;
    mixlab_train::device::set_precision(&mut selected, config.train.precision)?;
    let device = selected.device.clone();
    let model = checkpoint::load_model(&ckpt, config.model.init(&device)?)?;
    export::to_safetensors(&model, &cli.out)?;
    eprintln!(
        "mixlab: wrote {} (step {})",
        cli.out.display(),
        manifest.step
    );
    for (name, dtype, shape) in export::tensor_names(&cli.out)? {
        println!("{name}\t{dtype}\t{shape:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_with(run(&Cli::parse()))
}
