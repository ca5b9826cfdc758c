//! Helpers shared by the end-to-end tests: binaries, scratch folders, the tiny config, running
//! `train` and reading a run's metrics and checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// This crate's directory, read at run time (cargo sets `CARGO_MANIFEST_DIR` for tests): the
/// compile-time value goes stale when a cached build is reused from another checkout path.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn train_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mixlab-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small copy-task config, fast on flex.
pub const TINY: &str = r#"
[model]
d_model = 32
n_layers = 2
d_ff = 64
seq_len = 16
dropout = 0.1

[model.mixer]
kind = "dense"
n_heads = 4

[data]
corpus = "copy"
n_symbols = 8

[optim]
lr = 3e-3
warmup_steps = 3

[train]
backend = "flex"
steps = 8
batch_size = 8
eval_every = 4
eval_batches = 2
checkpoint_every = 4
keep_checkpoints = 2
log_every = 1
"#;

/// A byte-level run of a model with a cache over [`write_corpus`]'s text (`{path}` stands for
/// it): dense attention without positions, a span of 20 over blocks of 8 (it reaches two and a
/// half blocks back), 4 streams, 2 micro-batches a step. The training split's streams hold 15
/// blocks, so the 16 micro-batches of 8 steps start the streams over once (batch 15).
pub const CACHED: &str = r#"
[model]
d_model = 32
n_layers = 2
d_ff = 64
seq_len = 8
dropout = 0.1
position = "none"

[model.mixer]
kind = "dense"
n_heads = 4

[model.cache]
span = 20

[data]
corpus = "text"
path = "{path}"
level = "byte"
valid_fraction = 0.2
sampler = "stream"
eval_streams = 3
cache_dir = ""

[optim]
lr = 3e-3
warmup_steps = 3

[train]
backend = "flex"
steps = 8
batch_size = 4
grad_accum = 2
eval_every = 4
eval_batches = 2
checkpoint_every = 4
keep_checkpoints = 2
log_every = 1
"#;

/// 640 bytes of text in `dir`: sentences of a small vocabulary drawn by a fixed generator.
pub fn write_corpus(dir: &Path) -> PathBuf {
    const WORDS: [&str; 12] = [
        "the", "cache", "reaches", "back", "past", "its", "block", "and", "a", "stream", "goes",
        "on",
    ];
    let mut state = 12345u64;
    let mut text = String::new();
    while text.len() < 640 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        text.push(if (state >> 20).is_multiple_of(7) {
            '.'
        } else {
            ' '
        });
    }
    text.truncate(640);
    write_named(dir, "corpus.txt", &text)
}

/// [`CACHED`] over a fresh [`write_corpus`] in `dir`, with `edit` applied to its text.
pub fn write_cached_config(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let corpus = write_corpus(dir);
    let text = CACHED.replace("{path}", &corpus.display().to_string());
    write_named(dir, "cached.toml", &edit(text))
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_named(dir, "tiny.toml", text)
}

pub fn write_named(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

/// Run `train --config CONFIG --set train.run_dir=RUN_DIR [--set S]...`.
pub fn train_with(config: &Path, run_dir: &Path, sets: &[&str]) -> Output {
    let mut cmd = train_bin();
    cmd.arg("--config")
        .arg(config)
        .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn losses(lines: &[Value], split: &str) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter(|l| l["split"] == split)
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect()
}

/// The model parameters stored in a checkpoint, as f32 values in module order.
pub fn checkpoint_weights(run_dir: &Path, step: usize) -> Vec<f32> {
    use burn::module::Module;
    let config: mixlab_train::Config =
        toml::from_str(&std::fs::read_to_string(run_dir.join("config.toml")).unwrap()).unwrap();
    let model = config
        .model
        .init(&burn::tensor::Device::flex())
        .unwrap()
        .try_load_file(run_dir.join(format!("checkpoints/step-{step}/model.bpk")))
        .unwrap();
    mixlab_train::export::parameter_values(&model)
}

/// Wait until `metrics.jsonl` has `n` lines; false if the run finished first.
pub fn wait_for_lines(run_dir: &Path, n: usize, child: &mut std::process::Child) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let lines =
            std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |s| s.lines().count());
        if lines >= n {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "training did not progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

pub fn repo_config(name: &str) -> PathBuf {
    crate_dir().join(format!("../../configs/{name}.toml"))
}

/// The steps of a run's checkpoint directories (`checkpoints/step-N`), ascending.
pub fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step-")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// The validation loss `eval` gives a run's newest checkpoint on `backend`.
pub fn eval_loss(run_dir: &Path, backend: &str) -> f64 {
    let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--run")
        .arg(run_dir)
        .args(["--backend", backend]));
    ok(&out);
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    line["loss"].as_f64().unwrap()
}
