//! End-to-end tests of the `train` and `bench` binaries: a run's files, bit-exact resume,
//! Ctrl-C, every user error, and wgpu/flex parity. One test binary for the crate.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// This crate's directory, read at run time (cargo sets `CARGO_MANIFEST_DIR` for tests): the
/// compile-time value goes stale when a cached build is reused from another checkout path.
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn train_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mixlab-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small copy-task config, fast on flex.
const TINY: &str = r#"
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

fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_named(dir, "tiny.toml", text)
}

fn write_named(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the binary runs")
}

/// Run `train --config CONFIG --set train.run_dir=RUN_DIR [--set S]...`.
fn train_with(config: &Path, run_dir: &Path, sets: &[&str]) -> Output {
    let mut cmd = train_bin();
    cmd.arg("--config")
        .arg(config)
        .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    run(&mut cmd)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(lines: &[Value], split: &str) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter(|l| l["split"] == split)
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_run_writes_config_metrics_and_complete_checkpoints() {
    let dir = scratch("files");
    let config = write_config(&dir, TINY);
    let run_dir = dir.join("run");
    let out = train_with(&config, &run_dir, &[]);
    ok(&out);
    let lines = metrics(&run_dir);
    assert_eq!(losses(&lines, "train").len(), 8);
    assert_eq!(
        losses(&lines, "valid")
            .iter()
            .map(|l| l.0)
            .collect::<Vec<_>>(),
        vec![4, 8]
    );
    for l in &lines {
        assert!(l["loss"].as_f64().unwrap().is_finite());
    }
    let resolved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(
        resolved.contains("vocab_size = 9"),
        "vocab filled from the data:\n{resolved}"
    );
    let ckpts: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    for c in ["step-4", "step-8"] {
        let d = run_dir.join("checkpoints").join(c);
        for f in ["model.bpk", "optim.bpk", "scheduler.json", "manifest.json"] {
            assert!(d.join(f).is_file(), "{c}/{f}");
        }
    }
    for plot in ["loss.svg", "lr.svg", "throughput.svg"] {
        assert!(
            run_dir.join(plot).is_file(),
            "{plot} drawn at the end of the run"
        );
    }
    std::fs::remove_file(run_dir.join("loss.svg")).unwrap();
    ok(&run(train_bin().arg("--plot").arg(&run_dir)));
    assert!(run_dir.join("loss.svg").is_file(), "train --plot redraws");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("checkpoints/step-8/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["step"], 8);
    assert_eq!(manifest["next_batch"], 8);

    // Starting a fresh run over it is refused, pointing at --resume.
    let out = train_with(&config, &run_dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}

/// Dense, and all-attention on flex (its fused memory operation, with TINY's dropout 0.1 drawn
/// from Burn's generator): a resumed run repeats the uninterrupted losses bit for bit.
#[test]
fn resumed_run_repeats_the_uninterrupted_losses_bit_for_bit() {
    let persistent = [
        "--set",
        "model.mixer={kind=\"persistent\",n_heads=4,n_persistent=16}",
        "--set",
        "model.d_ff=0",
    ];
    for (name, extra) in [("dense", &[][..]), ("persistent", &persistent[..])] {
        resumed_run_repeats(name, extra);
    }
}

fn resumed_run_repeats(name: &str, extra: &[&str]) {
    let dir = scratch(&format!("resume-{name}"));
    let config = write_config(&dir, TINY);
    let train = |run_dir: &Path| {
        let dir = format!("train.run_dir=\"{}\"", run_dir.display());
        ok(&run(train_bin()
            .arg("--config")
            .arg(&config)
            .args(extra)
            .args(["--set", &dir])));
    };
    let full = dir.join("full");
    train(&full);
    // The same run, interrupted after step 4: only the step-4 checkpoint survives.
    let cut = dir.join("cut");
    train(&cut);
    std::fs::remove_dir_all(cut.join("checkpoints/step-8")).unwrap();

    let out = run(train_bin().arg("--resume").arg(&cut));
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed at step 4"));
    let (a, b) = (metrics(&full), metrics(&cut));
    let (ta, tb) = (losses(&a, "train"), losses(&b, "train"));
    assert_eq!(ta.len(), 8);
    for ((sa, la), (sb, lb)) in ta.iter().zip(&tb) {
        assert_eq!(sa, sb);
        assert_eq!(la.to_bits(), lb.to_bits(), "{name} step {sa}: {la} vs {lb}");
    }
    assert_eq!(tb.len(), 8, "metrics.jsonl reads as one run");
    // metrics.csv: a header, then the same rows (8 train + 2 valid), step, split and loss
    // identical to the uninterrupted run's (timings differ).
    let key = |r: &str| r.split(',').take(3).collect::<Vec<_>>().join(",");
    let csv_full: Vec<String> = std::fs::read_to_string(full.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(key)
        .collect();
    let csv_cut: Vec<String> = std::fs::read_to_string(cut.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(key)
        .collect();
    assert_eq!(csv_cut[0], "step,split,loss");
    assert_eq!(csv_cut.len(), 1 + 8 + 2);
    assert_eq!(csv_cut, csv_full);
    assert_eq!(losses(&a, "valid"), losses(&b, "valid"));
}

#[test]
fn sigint_checkpoints_at_a_step_boundary_and_exits_zero() {
    interrupt_checkpoints_and_resumes("-INT");
}

#[test]
fn sigterm_checkpoints_at_a_step_boundary_and_exits_zero() {
    interrupt_checkpoints_and_resumes("-TERM");
}

fn interrupt_checkpoints_and_resumes(signal: &str) {
    let dir = scratch(&format!("signal{signal}"));
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 100000"));
    let run_dir = dir.join("run");
    let child = train_bin()
        .arg("--config")
        .arg(&config)
        .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (a few metric lines), then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let n =
            std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |s| s.lines().count());
        if n >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("stopped at step"), "{stdout}");
    assert!(stdout.contains("resume with: train --resume"), "{stdout}");
    let steps: Vec<u64> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    let last = *steps.iter().max().expect("a checkpoint was written");
    assert!(last >= 3, "{steps:?}");
    // ... and the run continues from it.
    let out = run(train_bin()
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", &format!("train.steps={}", last + 2)]));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("resumed at step {last}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "resume changes train.steps: 100000 -> {}",
            last + 2
        )),
        "{stderr}"
    );
}

/// Each user mistake: exit code 1, a one-line cause naming the culprit, no panic.
/// Data parallel over two devices (flex + ndarray; a CPU stand-in for two GPUs) with a
/// micro-batch of 7 rows (split 4 + 3) and 2 micro-batches per step takes the same steps as
/// flex alone with the same batches: every training loss within 1e-5 relative and the final
/// weights within 1e-5 (relative L2). A multi-device run interrupted at step 4 and resumed
/// ends bit-identical to the uninterrupted one.
#[test]
fn data_parallel_over_two_devices_matches_one_device_and_resumes() {
    let dir = scratch("data-parallel");
    let config = write_config(&dir, &TINY.replace("dropout = 0.1", "dropout = 0.0"));
    let sets = ["train.batch_size=7", "train.grad_accum=2"];
    let one = dir.join("one");
    ok(&train_with(&config, &one, &sets));
    let two = dir.join("two");
    let devices = "train.devices=[\"flex\", \"ndarray\"]";
    let out = train_with(&config, &two, &[sets[0], sets[1], devices]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data parallel over 2 devices (flex (CPU), ndarray (CPU))"),
        "{stderr}"
    );
    let (a, b) = (
        losses(&metrics(&one), "train"),
        losses(&metrics(&two), "train"),
    );
    assert_eq!(a.len(), 8);
    assert_eq!(a.len(), b.len());
    for ((sa, la), (_, lb)) in a.iter().zip(&b) {
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs(),
            "step {sa}: one device {la}, two {lb}"
        );
    }
    let (wa, wb) = (checkpoint_weights(&one, 8), checkpoint_weights(&two, 8));
    let diff: f64 = wa
        .iter()
        .zip(&wb)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum();
    let norm: f64 = wa.iter().map(|x| f64::from(*x).powi(2)).sum();
    let rel = (diff / norm).sqrt();
    eprintln!("data parallel vs one device: final weights differ by {rel:e} (relative L2)");
    assert!(rel <= 1e-5, "weights after 8 steps differ by {rel:e}");

    let cut = dir.join("cut");
    ok(&train_with(&config, &cut, &[sets[0], sets[1], devices]));
    std::fs::remove_dir_all(cut.join("checkpoints/step-8")).unwrap();
    let out = run(train_bin().arg("--resume").arg(&cut));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed at step 4"), "{stderr}");
    assert!(stderr.contains("data parallel over 2 devices"), "{stderr}");
    let (wc, wt) = (checkpoint_weights(&cut, 8), checkpoint_weights(&two, 8));
    assert!(
        wc.iter().zip(&wt).all(|(x, y)| x.to_bits() == y.to_bits()),
        "resumed multi-device run differs from the uninterrupted one"
    );
}

#[test]
fn user_errors_are_clear_and_exit_1() {
    let dir = scratch("errors");
    let config = write_config(&dir, TINY);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--config".into(),
                dir.join("missing.toml").display().to_string(),
            ],
            "missing.toml",
        ),
        (
            vec![
                "--config".into(),
                write_named(&dir, "unknown-key.toml", "[model]\nd_model = 8\nnope = 1\n")
                    .display()
                    .to_string(),
            ],
            "line 3",
        ),
        (
            vec![
                "--config".into(),
                write_named(&dir, "bad-toml.toml", "[train\n")
                    .display()
                    .to_string(),
            ],
            "invalid TOML",
        ),
        (
            vec![
                "--config".into(),
                write_config(&dir, TINY).display().to_string(),
                "--backend".into(),
                "tpu".into(),
            ],
            "unknown backend `tpu`",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--set".into(),
                "model.mixer.n_heads=3".into(),
            ],
            "model.mixer.n_heads = 3",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--set".into(),
                "data.corpus=\"text\"".into(),
                "--set".into(),
                format!("data.path=\"{}\"", dir.join("no-such-corpus.txt").display()),
            ],
            "no-such-corpus.txt",
        ),
        (
            vec!["--resume".into(), dir.join("no-run").display().to_string()],
            "no-run",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--devices".into(),
                "flex,flex".into(),
            ],
            "lists the same device twice",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--devices".into(),
                "0,1".into(),
            ],
            "the CPU backends have one device each",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--devices".into(),
                "flex,tpu:1".into(),
            ],
            "train.devices entry `tpu:1`",
        ),
        (
            vec![
                "--config".into(),
                config.display().to_string(),
                "--backend".into(),
                "cuda".into(),
            ],
            "no CUDA backend",
        ),
    ];
    for (args, needle) in cases {
        let out = run(train_bin().args(&args).current_dir(&dir));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn resuming_with_another_architecture_is_refused() {
    let dir = scratch("arch");
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 4"));
    let run_dir = dir.join("run");
    ok(&run(train_bin().arg("--config").arg(&config).args([
        "--set",
        &format!("train.run_dir=\"{}\"", run_dir.display()),
    ])));
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", "model.d_model=64"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("different architecture") && stderr.contains("d_model"),
        "{stderr}"
    );
}

#[test]
fn bench_prints_a_json_line_per_backend() {
    let dir = scratch("bench");
    let config = write_config(&dir, TINY);
    let out = run(Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["train", "--config"])
        .arg(&config)
        .args([
            "--backend",
            "flex",
            "--backend",
            "ndarray",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]));
    ok(&out);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one line per backend, then the comparison");
    assert_eq!(lines[2]["kind"], "compare");
    assert_eq!(lines[2]["tokens_per_s_ratio"]["flex"], 1.0);
    assert!(lines[2]["tokens_per_s_ratio"]["ndarray"].as_f64().unwrap() > 0.0);
    for (line, backend) in lines.iter().zip(["flex", "ndarray"]) {
        assert_eq!(line["kind"], "train");
        assert_eq!(line["backend"], backend);
        assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["params"].as_u64().unwrap() > 1000);
        assert!(line["peak_rss_mb"].as_f64().unwrap() > 1.0);
        let series = line["memory_series"].as_array().unwrap();
        assert!(!series.is_empty() && series[0]["step"] == 1, "{series:?}");
        assert!(series.iter().all(|m| m["rss_mb"].as_f64().unwrap() > 1.0));
        // TINY: 6 x non-position params + 12 d n per layer (2 layers), 8 x 16 tokens a step.
        let params = line["params"].as_f64().unwrap();
        let per_token = 6.0 * (params - 16.0 * 32.0) + 2.0 * 12.0 * 32.0 * 16.0;
        let gflop = line["model_gflop_per_step"].as_f64().unwrap();
        assert!((gflop - per_token * 128.0 / 1e9).abs() < 1e-9, "{gflop}");
        assert!(line["gemm_ceiling_gflops"].as_f64().unwrap() > 0.1);
        assert!(line["achieved_gflops"].as_f64().unwrap() > 0.0);
    }
}

/// Every binary's `--help` opens with what that tool does (not the crate's description) and
/// ends with an example that uses the tool's own name.
#[test]
fn every_tool_introduces_itself_with_an_example() {
    let tools = [
        (
            "train",
            env!("CARGO_BIN_EXE_train"),
            "Train a Mixlab language model",
        ),
        (
            "eval",
            env!("CARGO_BIN_EXE_eval"),
            "Evaluate a trained Mixlab model",
        ),
        (
            "export",
            env!("CARGO_BIN_EXE_export"),
            "Export a trained Mixlab model",
        ),
        (
            "fetch",
            env!("CARGO_BIN_EXE_fetch"),
            "Download Mixlab's named corpora",
        ),
        (
            "pattern",
            env!("CARGO_BIN_EXE_pattern"),
            "Check and draw the sparse attention",
        ),
        (
            "report",
            env!("CARGO_BIN_EXE_report"),
            "Compare Mixlab runs",
        ),
        (
            "sample",
            env!("CARGO_BIN_EXE_sample"),
            "Generate text from a trained Mixlab model",
        ),
        ("bench", env!("CARGO_BIN_EXE_bench"), "Mixlab benchmarks"),
    ];
    for (name, exe, purpose) in tools {
        let out = run(Command::new(exe).arg("--help"));
        assert!(out.status.success(), "{name} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.starts_with(purpose), "{name} --help starts: {help}");
        assert!(
            !help.contains("command-line tools (train, bench)"),
            "{name}: crate description"
        );
        let example = help
            .split("Example:")
            .nth(1)
            .unwrap_or_else(|| panic!("{name}: no example"));
        assert!(
            example.contains(name),
            "{name}: the example does not run {name}: {example}"
        );
    }
}

/// `scripts/gpu-check.sh --dry-run` builds every row of the GPU check at the `base` size
/// (config validation and model construction through `bench train --dry-run`, on flex here):
/// a row the GPU check would fail on, such as `implementation = "fft"` at d_model 768, fails
/// here first. Each row prints its parameter count (GPT-2 small's shape: tens of millions).
#[test]
fn gpu_check_rows_all_build_at_full_size() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let dir = scratch("gpu-check-dry-run");
    let out = run(Command::new("bash")
        .arg(crate_dir().join("../../scripts/gpu-check.sh"))
        .arg("--dry-run")
        .env("MIXLAB_BIN", bench.parent().unwrap())
        .env("BACKEND", "flex")
        .env("OUT_DIR", &dir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("dry-run "))
        .collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in rows {
        let params: usize = row
            .split(" (")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no parameter count in {row:?}"));
        assert!(row.contains(": ok ("), "{row}");
        assert!(params > 50_000_000, "{row}: the base size, not a toy");
    }
}

/// flex and wgpu compute the same models (dense, Fourier by FFT and by causal DFT,
/// block-sparse, persistent memory): logits within 1e-4 relative, the same loss before and after one AdamW
/// step (`bench parity`, what `scripts/gpu-check.sh` runs on a GPU). Skips (with the reason)
/// when no wgpu adapter exists, unless `MIXLAB_REQUIRE_WGPU=1` (CI installs Mesa's llvmpipe
/// Vulkan driver and sets it).
#[test]
fn wgpu_matches_flex_for_every_mixer_family() {
    use burn::tensor::DeviceKind;

    let wgpu = match mixlab_train::device::wgpu(DeviceKind::DefaultDevice) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                std::env::var_os("MIXLAB_REQUIRE_WGPU").is_none(),
                "MIXLAB_REQUIRE_WGPU is set but wgpu has no adapter: {e}"
            );
            eprintln!("skipped: no wgpu adapter ({e})");
            return;
        }
    };
    eprintln!("wgpu parity on {}", wgpu.description);
    let lines = mixlab_train::bench::parity(&wgpu).unwrap();
    assert_eq!(lines.len(), 5);
    for line in &lines {
        eprintln!("{line}");
        assert_eq!(line["ok"], true, "{line}");
        let after = &line["loss_after_step"];
        assert!(after["other"].as_f64() < line["loss_before"]["other"].as_f64());
    }
}

#[test]
fn an_all_attention_model_with_adaptive_span_trains_end_to_end() {
    let dir = scratch("allattn");
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 6"));
    let run_dir = dir.join("run");
    let out = train_with(
        &config,
        &run_dir,
        &[
            "model.d_ff=0",
            "model.position=\"relative\"",
            "model.mixer.kind=\"persistent\"",
            "model.mixer.n_persistent=32",
            "model.mixer.adaptive_span=true",
            "model.mixer.span_ramp=4",
        ],
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("persistent"), "{stderr}");
    let lines = metrics(&run_dir);
    let train = losses(&lines, "train");
    assert_eq!(train.len(), 6);
    assert!(train.iter().all(|(_, l)| l.is_finite()));
    // Per-batch losses are noisy (dropout 0.1, six batches): compare the halves.
    let mean = |part: &[(u64, f64)]| part.iter().map(|(_, l)| l).sum::<f64>() / part.len() as f64;
    assert!(
        mean(&train[3..]) < mean(&train[..3]),
        "loss falls: {train:?}"
    );
}

#[test]
fn a_word_level_corpus_reports_perplexity_over_whole_splits() {
    let ptb = crate_dir().join("../../../shared/datasets/ptb");
    if !ptb.is_dir() {
        eprintln!("skipped: {} is absent", ptb.display());
        return;
    }
    let dir = scratch("ptb");
    let config = write_config(
        &dir,
        &TINY
            .replace("corpus = \"copy\"", "corpus = \"ptb\"")
            .replace("steps = 8", "steps = 2")
            .replace("eval_every = 4", "eval_every = 0"),
    );
    let run_dir = dir.join("run");
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .args([
            "--set",
            &format!("train.run_dir=\"{}\"", run_dir.display()),
            "--set",
            &format!("data.path=\"{}\"", ptb.display()),
            "--set",
            &format!("data.cache_dir=\"{}\"", dir.join("cache").display()),
        ])
        .current_dir(&dir));
    ok(&out);
    let lines = metrics(&run_dir);
    let valid = lines
        .iter()
        .find(|l| l["split"] == "valid")
        .expect("a valid line");
    let test = lines
        .iter()
        .find(|l| l["split"] == "test")
        .expect("a test line");
    // Every token of the split but the first is scored once, <eos> included.
    assert_eq!(valid["tokens"], 73_760 - 1);
    assert_eq!(test["tokens"], 82_430 - 1);
    let (loss, ppl) = (
        valid["loss"].as_f64().unwrap(),
        valid["ppl"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl);
    assert!(
        ppl < 10_000.0 * 1.5,
        "about uniform over 10k words after 2 steps: {ppl}"
    );
    assert!(dir.join("cache").is_dir(), "the corpus was cached");
    assert!(
        std::fs::read_to_string(run_dir.join("config.toml"))
            .unwrap()
            .contains("vocab_size = 10000")
    );
    // The eval tool reproduces the final whole-split numbers from the checkpoint.
    let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--run")
        .arg(&run_dir)
        .args(["--split", "test", "--backend", "flex"])
        .current_dir(&dir));
    ok(&out);
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["tokens"], 82_430 - 1);
    assert_eq!(line["step"], 2);
    let (a, b) = (
        line["loss"].as_f64().unwrap(),
        test["loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-9 * b,
        "eval {a} vs training's final test {b}"
    );
    assert!(line["ppl"].as_f64().unwrap() > 1.0);
}

#[test]
fn a_nan_stops_the_run_or_is_skipped_as_configured() {
    let dir = scratch("nan");
    let config = write_config(&dir, TINY);
    // stop (default): exit 1 naming the step; the step-4 checkpoint is the last one.
    let stop_dir = dir.join("stop");
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .args([
            "--set",
            &format!("train.run_dir=\"{}\"", stop_dir.display()),
        ])
        .env("MIXLAB_FAULT_NAN_STEP", "5"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not finite at step 6") && stderr.contains("on_nonfinite"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let ckpts: Vec<String> = std::fs::read_dir(stop_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts, vec!["step-4".to_string()]);
    // skip: the run finishes; the bad update is dropped and counted.
    let skip_dir = dir.join("skip");
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .args([
            "--set",
            &format!("train.run_dir=\"{}\"", skip_dir.display()),
            "--set",
            "train.on_nonfinite=\"skip\"",
        ])
        .env("MIXLAB_FAULT_NAN_STEP", "5"));
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("step 6 skipped"));
    let lines = metrics(&skip_dir);
    let last = lines.iter().rfind(|l| l["split"] == "train").unwrap();
    assert_eq!(last["step"], 8);
    assert_eq!(last["skipped_steps"], 1);
    assert!(
        last["loss"].as_f64().unwrap().is_finite(),
        "later steps are unharmed"
    );
}

#[test]
fn a_causal_fnet_trains_end_to_end() {
    let dir = scratch("fnet");
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 4"));
    let run_dir = dir.join("run");
    let out = train_with(
        &config,
        &run_dir,
        &["model.mixer={ kind = \"fourier\", causal = true }"],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("fourier"));
    let train = losses(&metrics(&run_dir), "train");
    assert_eq!(train.len(), 4);
    assert!(train.iter().all(|(_, l)| l.is_finite()));
}

#[test]
fn a_bidirectional_fnet_trains_with_the_masked_objective() {
    let dir = scratch("fnet-mlm");
    let shakespeare = crate_dir().join("../../../shared/datasets/tinyshakespeare/input.txt");
    let corpus = dir.join("corpus.txt");
    let text = std::fs::read_to_string(&shakespeare)
        .unwrap_or_else(|_| "to be or not to be, that is the question\n".repeat(200));
    std::fs::write(&corpus, &text[..text.len().min(50_000)]).unwrap();
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 4"));
    let run_dir = dir.join("run");
    let out = train_with(
        &config,
        &run_dir,
        &[
            "model.mixer={ kind = \"fourier\" }",
            "train.objective=\"masked\"",
            "data.corpus=\"text\"",
            "data.level=\"char\"",
            &format!("data.path=\"{}\"", corpus.display()),
            "data.cache_dir=\"\"",
        ],
    );
    ok(&out);
    let resolved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    let chars: std::collections::BTreeSet<char> =
        text[..text.len().min(50_000) * 9 / 10].chars().collect();
    assert!(
        resolved.contains(&format!("vocab_size = {}", chars.len() + 1)),
        "[MASK] is one more id:\n{resolved}"
    );
    let lines = metrics(&run_dir);
    let valid = lines.iter().rfind(|l| l["split"] == "valid").unwrap();
    assert!(valid["bpc"].as_f64().unwrap().is_finite());
    // About 15% of the scored windows' positions are evaluated.
    let tokens = valid["tokens"].as_f64().unwrap();
    assert!(tokens > 0.0);
    // Without the masked objective the bidirectional mixer is refused, with the reason.
    let out = train_with(
        &config,
        &dir.join("refused"),
        &["model.mixer={ kind = \"fourier\" }"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("train.objective = \"masked\""));
}

/// `configs/fnet.toml` (and the hybrid) run 20 steps with a reduced size.
#[test]
fn the_shipped_fnet_configs_run_twenty_steps_reduced() {
    let dir = scratch("fnet-config");
    let shakespeare = crate_dir().join("../../../shared/datasets/tinyshakespeare/input.txt");
    let corpus = dir.join("input.txt");
    let text = std::fs::read_to_string(&shakespeare)
        .unwrap_or_else(|_| "to be or not to be, that is the question\n".repeat(500));
    std::fs::write(&corpus, &text[..text.len().min(40_000)]).unwrap();
    for name in ["fnet", "fnet-hybrid"] {
        let config = crate_dir().join(format!("../../configs/{name}.toml"));
        let run_dir = dir.join(name);
        let path = format!("data.path=\"{}\"", corpus.display());
        let out = train_with(
            &config,
            &run_dir,
            &[
                "model.d_model=32",
                "model.d_ff=64",
                "model.seq_len=32",
                "train.steps=20",
                "train.batch_size=4",
                "train.eval_every=10",
                "train.eval_batches=2",
                "train.backend=\"flex\"",
                "data.cache_dir=\"\"",
                &path,
            ],
        );
        ok(&out);
        let train = losses(&metrics(&run_dir), "train");
        assert_eq!(train.len(), 2, "{name}: log_every 10 over 20 steps");
        assert!(train.iter().all(|(_, l)| l.is_finite()), "{name}");
    }
}

/// The model parameters stored in a checkpoint, as f32 values in module order.
fn checkpoint_weights(run_dir: &Path, step: usize) -> Vec<f32> {
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
fn wait_for_lines(run_dir: &Path, n: usize, child: &mut std::process::Child) -> bool {
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

/// kill -9 at several points (mid-step, mid-checkpoint), resume, finish: the losses after the
/// resume point and the final weights are bit-identical to an uninterrupted run.
#[test]
fn kill_9_anywhere_then_resume_is_bit_identical_on_flex() {
    kill_9_trials("flex");
}

#[test]
fn kill_9_anywhere_then_resume_is_bit_identical_on_ndarray() {
    kill_9_trials("ndarray");
}

fn kill_9_trials(backend: &str) {
    let dir = scratch(&format!("kill9-{backend}"));
    let text = TINY
        .replace("backend = \"flex\"", &format!("backend = \"{backend}\""))
        .replace("steps = 8", "steps = 12")
        .replace("checkpoint_every = 4", "checkpoint_every = 2")
        .replace("keep_checkpoints = 2", "keep_checkpoints = 3");
    let config = write_config(&dir, &text);
    let straight = dir.join("straight");
    ok(&train_with(&config, &straight, &[]));
    let reference = losses(&metrics(&straight), "train");
    let reference_weights = checkpoint_weights(&straight, 12);
    // (metrics lines to wait for, slow checkpoint writes?) — later kills land mid-write.
    let trials = [
        (3, false),
        (6, false),
        (9, false),
        (4, true),
        (8, true),
        (11, true),
    ];
    let (mut killed, mut mid_write) = (0, 0);
    for (trial, (after_lines, slow)) in trials.into_iter().enumerate() {
        let run_dir = dir.join(format!("trial{trial}"));
        let mut cmd = train_bin();
        cmd.arg("--config")
            .arg(&config)
            .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if slow {
            cmd.env("MIXLAB_FAULT_SLOW_CHECKPOINT_MS", "300");
        }
        let mut child = cmd.spawn().unwrap();
        if !wait_for_lines(&run_dir, after_lines, &mut child) {
            eprintln!("trial {trial}: the run finished before the kill");
            continue;
        }
        killed += 1;
        if slow {
            // Land inside the widened write window of the next checkpoint.
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let partial = std::fs::read_dir(run_dir.join("checkpoints")).is_ok_and(|mut d| {
            d.any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
        });
        mid_write += usize::from(partial);
        let out = run(train_bin().arg("--resume").arg(&run_dir));
        if !out.status.success() {
            // Killed before the first checkpoint completed: nothing to resume; start over.
            assert!(String::from_utf8_lossy(&out.stderr).contains("no complete checkpoint"));
            std::fs::remove_dir_all(&run_dir).unwrap();
            ok(&train_with(&config, &run_dir, &[]));
        }
        assert!(
            std::fs::read_dir(run_dir.join("checkpoints"))
                .unwrap()
                .all(|e| !e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")),
            "trial {trial}: a partial checkpoint was left behind"
        );
        let got = losses(&metrics(&run_dir), "train");
        assert_eq!(
            got.len(),
            reference.len(),
            "trial {trial}: one line per step"
        );
        for ((s, a), (_, b)) in reference.iter().zip(&got) {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "trial {trial}, step {s}: {a} vs {b}"
            );
        }
        assert!(
            checkpoint_weights(&run_dir, 12) == reference_weights,
            "trial {trial}: final weights differ"
        );
    }
    eprintln!(
        "{backend}: kill -9 trials: {killed} of {}, of which {mid_write} landed mid-checkpoint",
        trials.len()
    );
    assert!(killed >= 4, "too few runs were killed");
    assert!(mid_write >= 1, "no kill landed inside a checkpoint write");
}

#[test]
fn a_corrupt_newest_checkpoint_is_reported_and_skipped() {
    let dir = scratch("corrupt");
    let config = write_config(&dir, TINY);
    let run_dir = dir.join("run");
    ok(&train_with(&config, &run_dir, &[]));
    // Flip one byte of the newest checkpoint's weights.
    let model = run_dir.join("checkpoints/step-8/model.bpk");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&model, bytes).unwrap();
    let out = run(train_bin()
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", "train.steps=10"]));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipping checkpoint")
            && stderr.contains("step-8")
            && stderr.contains("model.bpk"),
        "{stderr}"
    );
    assert!(stderr.contains("resumed at step 4"), "{stderr}");
}

#[test]
fn sample_continues_a_prompt_reproducibly() {
    let dir = scratch("sample");
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        "the quick brown fox jumps over the lazy dog. ".repeat(100),
    )
    .unwrap();
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 30"));
    let run_dir = dir.join("run");
    let path = format!("data.path=\"{}\"", corpus.display());
    ok(&train_with(
        &config,
        &run_dir,
        &[
            "data.corpus=\"text\"",
            "data.level=\"char\"",
            "data.cache_dir=\"\"",
            &path,
            "optim.lr=1e-2",
        ],
    ));
    let sample = |seed: &str, extra: &[&str]| {
        let out = run(Command::new(env!("CARGO_BIN_EXE_sample"))
            .arg("--run")
            .arg(&run_dir)
            .args([
                "--prompt",
                "the ",
                "--tokens",
                "40",
                "--backend",
                "flex",
                "--seed",
                seed,
            ])
            .args(extra));
        ok(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let a = sample("1", &[]);
    assert!(a.starts_with("the "), "{a}");
    assert_eq!(a.trim_end_matches('\n').chars().count(), 4 + 40, "{a:?}");
    assert!(
        a.chars()
            .all(|c| "the quickbrownfxjmpsvlazydg. \n".contains(c)),
        "only the corpus's characters: {a:?}"
    );
    assert_eq!(a, sample("1", &[]), "same seed, same text");
    // Greedy decoding ignores the seed.
    assert_eq!(
        sample("1", &["--temperature", "0"]),
        sample("2", &["--temperature", "0"])
    );
    // A copy-task run has no tokenizer: a clear error.
    let copy_dir = dir.join("copy");
    ok(&train_with(&config, &copy_dir, &[]));
    let out = run(Command::new(env!("CARGO_BIN_EXE_sample"))
        .arg("--run")
        .arg(&copy_dir));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer.json"));
}

fn repo_config(name: &str) -> PathBuf {
    crate_dir().join(format!("../../configs/{name}.toml"))
}

/// `configs/copy-sparse.toml` (strided, blocks of 8) learns the copy task; `train` prints the
/// pattern's Assumption-1 report at start.
#[test]
fn a_sparse_model_learns_to_copy_and_reports_its_pattern() {
    let dir = scratch("sparse-copy");
    let run_dir = dir.join("run");
    let out = train_with(
        &repo_config("copy-sparse"),
        &run_dir,
        &[
            "model.seq_len=64", // the answer sits 32 tokens = 4 blocks back
            "train.steps=200",
            "train.eval_every=200",
            "train.checkpoint_every=200",
            "train.backend=\"flex\"",
        ],
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sparse attention [strided], block 8, layers [0, 1]")
            && stderr.contains("(3) every token reaches every later one within 2 layer(s)"),
        "{stderr}"
    );
    let valid = losses(&metrics(&run_dir), "valid");
    let (_, last) = *valid.last().unwrap();
    // Chance is ln 16 = 2.77 nats on the copied half.
    assert!(last < 0.05, "copied-half valid loss {last}");
}

/// A random pattern is drawn from the seed in the saved config: `eval` on the checkpoint
/// reproduces the run's final validation loss, and another seed gives another loss.
#[test]
fn a_random_sparse_pattern_is_restored_from_the_saved_config() {
    let dir = scratch("sparse-random");
    let config = write_config(&dir, &TINY.replace("steps = 8", "steps = 4"));
    let run_dir = dir.join("run");
    let mixer = |seed: u64| {
        format!(
            "model.mixer={{ kind = \"sparse\", n_heads = 4, block = 2, pattern = \
             [{{ kind = \"random\", per_row = 2, seed = {seed} }}] }}"
        )
    };
    let out = train_with(
        &config,
        &run_dir,
        &[&mixer(7), "train.eval_batches=8", "model.dropout=0.0"],
    );
    ok(&out);
    let valid = losses(&metrics(&run_dir), "valid");
    let (_, last) = *valid.last().unwrap();
    let eval = |sets: &[&str]| -> f64 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eval"));
        cmd.arg("--run").arg(&run_dir).args(["--backend", "flex"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = run(&mut cmd);
        ok(&out);
        let line: Value = serde_json::from_slice(&out.stdout).unwrap();
        line["loss"].as_f64().unwrap()
    };
    let again = eval(&[]);
    assert!(
        (again - last).abs() <= 1e-9 * last,
        "reloaded {again} vs {last}"
    );
    let other = eval(&[&mixer(8)]);
    assert!(
        (other - last).abs() > 1e-6,
        "seed 8 should draw another pattern"
    );
}

#[test]
fn the_pattern_command_checks_and_draws_every_sparse_layer() {
    let dir = scratch("pattern");
    let out = run(Command::new(env!("CARGO_BIN_EXE_pattern"))
        .arg("--config")
        .arg(repo_config("sparse-bigbird"))
        .args(["--n", "1024", "--png"])
        .arg(dir.join("png")));
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(1) every token attends to itself: yes")
            && stdout.contains("(2) Hamiltonian path in the union graph: yes"),
        "{stdout}"
    );
    for layer in 0..6 {
        let png = std::fs::read(dir.join(format!("png/layer-{layer}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    // JSON, with a pattern that cannot connect everything: blocks that see only themselves.
    let out = run(Command::new(env!("CARGO_BIN_EXE_pattern"))
        .arg("--config")
        .arg(repo_config("sparse-strided"))
        .args(["--n", "256", "--json"])
        .args(["--set", "model.mixer.pattern=[{kind=\"window\",width=1}]"]));
    ok(&out);
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["report"]["reach_layers"], Value::Null);
    assert_eq!(line["report"]["self_attention"], true);
    // A config without sparse layers is an error that says so.
    let out = run(Command::new(env!("CARGO_BIN_EXE_pattern"))
        .arg("--config")
        .arg(repo_config("dense")));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no layer uses kind = \"sparse\""));
}

#[test]
fn bench_scaling_measures_dense_and_sparse_in_fresh_processes() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["scaling", "--config"])
        .arg(repo_config("sparse-bigbird"))
        .args(["--n", "128,256", "--d-model", "32", "--repeats", "1"]));
    ok(&out);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let points: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "scaling").collect();
    assert_eq!(points.len(), 4, "{lines:?}");
    for p in &points {
        assert!(p["fwd_bwd_s"].as_f64().unwrap() > 0.0);
        assert!(p["peak_rss_mb"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(points[0]["mixer"], "dense");
    assert_eq!(points[2]["mixer"], "sparse:bigbird/b64");
    assert_eq!(points[3]["n_ratio"], 2.0);
    let summary = lines.last().unwrap();
    assert_eq!(summary["kind"], "scaling_summary");
    assert!(summary["mixers"]["sparse:bigbird/b64"]["dense_over_this"]["256"].is_number());
}

/// A named corpus missing from its folder is downloaded by `train`; offline (flag or
/// environment) it is an error naming the URL, the checksum and where the file goes.
#[test]
fn offline_a_missing_named_corpus_says_what_to_fetch_and_where() {
    let dir = scratch("offline");
    let config = write_config(&dir, TINY);
    let root = format!("data.root=\"{}\"", dir.join("datasets").display());
    for env in [false, true] {
        let mut cmd = train_bin();
        cmd.arg("--config")
            .arg(&config)
            .args(["--set", "data.corpus=\"enwik8\"", "--set", &root])
            .args([
                "--set",
                &format!("train.run_dir=\"{}\"", dir.join("run").display()),
            ]);
        if env {
            cmd.env("MIXLAB_OFFLINE", "1");
        } else {
            cmd.arg("--offline");
        }
        let out = run(&mut cmd);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("http://mattmahoney.net/dc/enwik8.zip")
                && stderr
                    .contains("547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc")
                && stderr.contains(&dir.join("datasets/enwik8/enwik8").display().to_string())
                && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
    // The fetch command reports the same, and lists every corpus's pinned source.
    let out = run(Command::new(env!("CARGO_BIN_EXE_fetch"))
        .args(["wikitext-103", "--offline", "--root"])
        .arg(dir.join("datasets")));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wikitext-103-v1.zip"));
    let out = run(Command::new(env!("CARGO_BIN_EXE_fetch")).arg("--list"));
    ok(&out);
    let list = String::from_utf8_lossy(&out.stdout);
    assert_eq!(list.matches("sha256").count(), 9, "{list}"); // all but text8
    let out = run(Command::new(env!("CARGO_BIN_EXE_fetch")).arg("enwik9"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown corpus `enwik9`"));
}

/// The disk fills up while a checkpoint is written: the run exits 1 saying so, the partial
/// files are gone, the earlier checkpoint verifies, and `--resume` finishes the run from it.
#[test]
fn a_full_disk_mid_checkpoint_keeps_the_previous_one_and_says_how_to_go_on() {
    let dir = scratch("disk-full");
    let config = write_config(&dir, TINY);
    let run_dir = dir.join("run");
    let mut cmd = train_bin();
    cmd.arg("--config")
        .arg(&config)
        .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())])
        .env("MIXLAB_FAULT_DISK_FULL_STEP", "8");
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("No space left on device")
            && stderr.contains("checkpoint of step 8 was not written")
            && stderr.contains("step-4")
            && stderr.contains("--resume")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    let ckpts: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts, ["step-4"], "no partial left behind");
    let out = run(train_bin().arg("--resume").arg(&run_dir));
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed at step 4"));
    assert!(run_dir.join("checkpoints/step-8/manifest.json").is_file());
}

/// More bad input, each a one-line error naming the key or file, exit 1, no panic, and
/// nothing written: wrong types, zero sizes, unknown `--set` keys, an empty corpus, a run
/// directory that cannot be created.
#[test]
fn more_bad_input_is_refused_clearly_without_writing_anything() {
    let dir = scratch("bad-input");
    let config = write_config(&dir, TINY);
    let empty = write_named(&dir, "empty.txt", "");
    let blocker = write_named(&dir, "blocker", "a file where the run directory should go");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["model.d_model=\"wide\"".into()], "d_model"),
        (vec!["model.n_layers=0".into()], "model.n_layers = 0"),
        (vec!["model.seq_len=-3".into()], "seq_len"),
        (vec!["model.nope=1".into()], "nope"),
        (vec!["train.steps=\"many\"".into()], "steps"),
        (
            vec![
                "data.corpus=\"text\"".into(),
                format!("data.path=\"{}\"", empty.display()),
                "data.cache_dir=\"\"".into(),
            ],
            "empty",
        ),
        (
            vec![format!(
                "model.mixer={{ kind = \"sparse\", block = 4, pattern = [{{ kind = \"window\", width = 0 }}] }}"
            )],
            "mixer.pattern[0].width",
        ),
    ];
    for (sets, needle) in cases {
        let run_dir = dir.join("run");
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend([
            "--set".into(),
            format!("train.run_dir=\"{}\"", run_dir.display()),
        ]);
        for s in &sets {
            args.extend(["--set".into(), s.clone()]);
        }
        let out = run(train_bin().args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sets:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{sets:?}: expected `{needle}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{sets:?}: {stderr}");
        assert!(!run_dir.exists(), "{sets:?}: the run directory was created");
    }
    // A run directory that cannot be created (a file is in the way).
    let out = run(train_bin().arg("--config").arg(&config).args([
        "--set",
        &format!("train.run_dir=\"{}\"", blocker.join("run").display()),
    ]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot create run directory") && stderr.contains("blocker"),
        "{stderr}"
    );
}

/// Every run ends with a one-screen summary and `summary.json` (best valid with its step,
/// final test when the corpus has one, throughput, peak memory).
#[test]
fn a_finished_run_prints_and_writes_its_summary() {
    let dir = scratch("summary");
    let config = write_config(&dir, TINY);
    let run_dir = dir.join("run");
    let out = train_with(&config, &run_dir, &[]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run summary")
            && stderr.contains("best valid")
            && stderr.contains("tokens/s"),
        "{stderr}"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let valid = losses(&metrics(&run_dir), "valid");
    let best = valid.iter().map(|(_, l)| *l).fold(f64::INFINITY, f64::min);
    assert_eq!(summary["best_valid"]["loss"].as_f64().unwrap(), best);
    assert_eq!(summary["step"], 8);
    assert!(summary["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(summary["peak_rss_mb"].as_f64().unwrap() > 0.0);
}

/// `train.precision`: f16 and bf16 train on flex (loss in f32), checkpoints are half the
/// size, `eval` reloads them exactly; f16 with an underflowing eps and f16 on ndarray are
/// refused with the fix.
#[test]
fn half_precision_trains_on_flex_and_is_refused_where_it_cannot_work() {
    let dir = scratch("precision");
    let config = write_config(&dir, TINY);
    let size = |run: &Path| {
        std::fs::metadata(run.join("checkpoints/step-8/model.bpk"))
            .unwrap()
            .len()
    };
    let f32_run = dir.join("f32");
    ok(&train_with(&config, &f32_run, &[]));
    for precision in ["f16", "bf16"] {
        let run_dir = dir.join(precision);
        let out = train_with(
            &config,
            &run_dir,
            &[
                &format!("train.precision=\"{precision}\""),
                "optim.eps=1e-4",
            ],
        );
        ok(&out);
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("· {precision}")));
        let valid = losses(&metrics(&run_dir), "valid");
        let (_, last) = *valid.last().unwrap();
        assert!(last.is_finite() && last < 2.5, "{precision}: {last}");
        let (half, full) = (size(&run_dir), size(&f32_run));
        assert!(
            half * 10 < full * 6,
            "{precision}: {half} vs f32 {full} bytes"
        );
        let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
            .arg("--run")
            .arg(&run_dir)
            .args(["--backend", "flex"]));
        ok(&out);
        let line: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            line["loss"].as_f64().unwrap(),
            last,
            "{precision}: eval reloads"
        );
    }
    // All-attention in bf16 on flex goes through the fused memory operation (with dropout:
    // TINY has 0.1), its f32 shift shared with the bf16 context part.
    let run_dir = dir.join("bf16-persistent");
    ok(&train_with(
        &config,
        &run_dir,
        &[
            "train.precision=\"bf16\"",
            "optim.eps=1e-4",
            "model.mixer={kind=\"persistent\",n_heads=4,n_persistent=64}",
            "model.d_ff=0",
        ],
    ));
    let (_, last) = *losses(&metrics(&run_dir), "valid").last().unwrap();
    assert!(last.is_finite() && last < 2.5, "bf16 all-attention: {last}");
    let refused = [
        (vec!["train.precision=\"f16\""], "optim.eps = 1e-8"),
        (
            vec![
                "train.precision=\"f16\"",
                "optim.eps=1e-4",
                "train.backend=\"ndarray\"",
            ],
            "ndarray has no half precision",
        ),
    ];
    for (sets, needle) in refused {
        let out = train_with(&config, &dir.join("refused"), &sets);
        assert_eq!(out.status.code(), Some(1), "{sets:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// `report` over two runs: a markdown row per run (params, best valid at its step, density)
/// and the loss plots.
#[test]
fn report_compares_runs_in_a_table_and_plots() {
    let dir = scratch("report");
    let config = write_config(&dir, TINY);
    let (dense, sparse) = (dir.join("dense"), dir.join("sparse"));
    ok(&train_with(&config, &dense, &[]));
    ok(&train_with(
        &config,
        &sparse,
        &[
            "model.mixer={ kind = \"sparse\", n_heads = 4, block = 2, pattern = [{ kind = \"window\", width = 2 }] }",
        ],
    ));
    let out = run(Command::new(env!("CARGO_BIN_EXE_report"))
        .arg(&dense)
        .arg(&sparse)
        .arg("--out")
        .arg(dir.join("docs"))
        .args(["--name", "cmp"]));
    ok(&out);
    let table = std::fs::read_to_string(dir.join("docs/cmp.md")).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with("| dense | dense |") && rows[0].contains("| 1.000 |"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("| sparse | sparse: window |"),
        "{table}"
    );
    let best = losses(&metrics(&dense), "valid")
        .into_iter()
        .map(|(_, l)| l)
        .fold(f64::INFINITY, f64::min);
    assert!(rows[0].contains(&format!("{best:.4}")), "{table}");
    for svg in [
        "cmp-valid-vs-step.svg",
        "cmp-valid-vs-time.svg",
        "cmp-quality-vs-density.svg",
    ] {
        let text = std::fs::read_to_string(dir.join("docs").join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("sparse"), "{svg}");
    }
    let out = run(Command::new(env!("CARGO_BIN_EXE_report")).arg(dir.join("nope")));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a run directory"));
}

/// `model.attention_impl` chooses the path: a tiny char model (vocab 65, d 128, 4 layers,
/// 4 heads, d_ff 512, seq 64, batch 12) trained 300 steps on tiny-shakespeare with the fused
/// flex attention operation and with the composed tensor ops ends with validation losses
/// within 1e-3 nats of each other.
#[test]
fn fused_and_composed_attention_train_to_the_same_validation_loss() {
    let corpus = crate_dir().join("../../../shared/datasets/tinyshakespeare/input.txt");
    if !corpus.is_file() {
        eprintln!("skipped: {} is absent", corpus.display());
        return;
    }
    let dir = scratch("attention-impl");
    let config = write_config(
        &dir,
        r#"
[model]
d_model = 128
n_layers = 4
d_ff = 512
seq_len = 64

[model.mixer]
kind = "dense"
n_heads = 4

[data]
corpus = "tinyshakespeare"

[optim]
lr = 2e-3
warmup_steps = 20

[train]
backend = "flex"
steps = 300
batch_size = 12
eval_every = 0
checkpoint_every = 0
log_every = 50
"#,
    );
    let valid = |implementation: &str| {
        let run_dir = dir.join(implementation);
        let out = train_with(
            &config,
            &run_dir,
            &[
                &format!("model.attention_impl=\"{implementation}\""),
                &format!("data.path=\"{}\"", corpus.display()),
                &format!("data.cache_dir=\"{}\"", dir.join("cache").display()),
            ],
        );
        ok(&out);
        let valid = losses(&metrics(&run_dir), "valid");
        valid.last().expect("a validation loss").1
    };
    let (fused, composed) = (valid("fused"), valid("composed"));
    assert!(fused < 3.0, "the model learned something: {fused}");
    assert!(
        (fused - composed).abs() < 1e-3,
        "valid loss fused {fused} vs composed {composed}"
    );
}
