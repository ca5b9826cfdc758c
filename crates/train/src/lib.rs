//! Mixlab's training side: the TOML config, backend selection, the training loop, checkpoints,
//! metrics and benchmarks. The `train` and `bench` binaries are thin wiring over this library.
#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod distributed;
pub mod export;
pub mod hf;
pub mod malloc;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod patterns;
pub mod plot;
pub mod report;
pub mod resume;
pub mod sample;
pub mod source;
pub mod stream_cache;
pub mod summary;
pub mod telemetry;
pub mod trainer;
pub mod world;

pub use config::Config;
pub use trainer::{Summary, TrainOptions, train};

/// Exit for a command-line tool: the error (with its causes) on stderr and exit code 1, or 0.
pub fn exit_with(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Exit for a measurement binary: print the JSON line(s) on stdout, or the error (with its
/// causes) on stderr and exit code 1.
pub fn print_json(result: anyhow::Result<Vec<serde_json::Value>>) -> std::process::ExitCode {
    match result {
        Ok(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// This crate's directory, read when the tests run (cargo sets `CARGO_MANIFEST_DIR` for them):
/// the compile-time value goes stale when a cached build is reused from another checkout path.
#[cfg(test)]
pub(crate) fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
