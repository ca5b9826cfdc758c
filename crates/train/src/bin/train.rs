//! `train`: train a model from a TOML config, or resume a run.
//!
//! ```text
//! cargo run --release --bin train -- --config configs/quickstart.toml
//! cargo run --release --bin train -- --config configs/dense.toml --backend flex --set data.path=FILE
//! cargo run --release --bin train -- --resume runs/dense
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use mixlab_train::world::World;
use mixlab_train::{TrainOptions, train};

/// Train a Mixlab language model from a TOML config (resume, checkpoints, metrics, plots).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  cargo run --release --bin train -- --config configs/fnet.toml\n  train --config configs/quickstart.toml --backend flex --set train.steps=200\n  train --resume runs/quickstart"
)]
struct Cli {
    /// TOML config file (sections [model], [data], [optim], [train]).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backend: auto, flex, ndarray, wgpu or cuda (overrides train.backend).
    #[arg(long)]
    backend: Option<String>,
    /// Data-parallel devices, comma-separated: GPU indices of the backend (`0,1`) or named
    /// devices (`wgpu:0,wgpu:1`, `flex,ndarray`); overrides train.devices.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Override any config key, e.g. --set train.steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Never download: a missing corpus is an error saying what to fetch and where to put it
    /// (also MIXLAB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Only (re)draw the SVG plots of this run directory's metrics, then exit.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "resume"])]
    plot: Option<PathBuf>,
}

fn main() -> ExitCode {
    mixlab_train::malloc::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(warning) = mixlab_models::unoptimised_build_warning(mixlab_models::BUILD_OPT_LEVEL)
    {
        eprintln!("{warning}");
    }
    mixlab_train::source::set_offline(cli.offline);
    // One process, or a rank of an MPI job (`mpirun -np R train ...`, feature `mpi`).
    let world = match World::from_environment() {
        Ok(world) => world,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Some(run_dir) = &cli.plot {
        return match mixlab_train::plot::write_plots(run_dir) {
            Ok(files) => {
                files.iter().for_each(|f| println!("{}", f.display()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // First Ctrl-C (SIGINT) or SIGTERM: finish the step, write a checkpoint, exit 0.
    // A second one leaves at once.
    let handler = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a new checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after this step and writing a checkpoint");
    });
    if let Err(e) = handler {
        eprintln!("warning: cannot install the Ctrl-C handler ({e}); Ctrl-C will not checkpoint");
    }
    let opts = TrainOptions {
        config: cli.config,
        resume: cli.resume,
        backend: cli.backend,
        devices: cli.devices,
        overrides: cli.set,
    };
    match train(&opts, stop, &world) {
        Ok(_) if !world.is_root() => ExitCode::SUCCESS,
        Ok(s) => {
            let fmt = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
            println!(
                "{} at step {} | train loss {} | valid loss {} | run dir {}",
                if s.interrupted { "stopped" } else { "done" },
                s.step,
                fmt(s.train_loss),
                fmt(s.valid_loss),
                s.run_dir.display()
            );
            if s.interrupted {
                println!("resume with: train --resume {}", s.run_dir.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) if world.is_distributed() => {
            // The other ranks may be waiting for this one in a collective: end them all.
            eprintln!("error ({}): {e:#}", world.describe());
            world.abort(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
