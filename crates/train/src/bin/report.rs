//! `report`: compare finished runs side by side — a markdown table (params, best valid,
//! final test, tokens/s, peak memory, density, keys per token) and SVG plots (valid loss vs
//! step, vs wall time, quality vs density).
//!
//! ```text
//! cargo run --release --bin report -- runs/dense runs/sparse-strided --out docs/results --name shakespeare
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use mixlab_train::exit_with;
use mixlab_train::report::write_report;

/// Compare Mixlab runs: one table (markdown and CSV) and plots of their metrics.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  report runs/dense runs/fnet --out runs/report"
)]
struct Cli {
    /// Run directories.
    runs: Vec<PathBuf>,
    /// Folder for the table and plots.
    #[arg(long, default_value = "docs/results")]
    out: PathBuf,
    /// Base name of the files written.
    #[arg(long, default_value = "report")]
    name: String,
}

fn run(cli: &Cli) -> Result<()> {
    if cli.runs.is_empty() {
        bail!("name at least one run directory");
    }
    for file in write_report(&cli.runs, &cli.out, &cli.name)? {
        println!("{}", file.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_with(run(&Cli::parse()))
}
