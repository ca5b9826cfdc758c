//! The other tools: bench (train, scaling, attention, parity, dry-run), sample, pattern,
//! report, and every tool's --help.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::common::*;

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
    // Dense, FNet, sparse, all-attention, dense in f16 and in bf16, with the WGSL bench (the
    // SPIR-V one is checked by scripts/test-spirv.sh).
    assert_eq!(rows.len(), 6, "{stdout}");
    assert!(
        rows.iter().all(|r| r.starts_with("dry-run wgsl ")),
        "{stdout}"
    );
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

/// flex and wgpu compute the same models (dense, Fourier by FFT, by a sequence FFT with hidden
/// DFT matrices (d_model 24, wgpu's path at d 768) and by causal DFT,
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
    assert_eq!(lines.len(), 6);
    for line in &lines {
        eprintln!("{line}");
        assert_eq!(line["ok"], true, "{line}");
        let after = &line["loss_after_step"];
        assert!(after["other"].as_f64() < line["loss_before"]["other"].as_f64());
    }
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

/// `bench attention` on flex: a line per length with the fused operation's time and TFLOP/s,
/// the composed path's time beside it, and their outputs agreeing at the measured size.
#[test]
fn bench_attention_times_the_fused_operation_against_composed_ops() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_bench")).args([
        "attention",
        "--n",
        "48,96",
        "--heads",
        "3",
        "--d-head",
        "16",
        "--batch",
        "2",
        "--repeats",
        "1",
    ]));
    ok(&out);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, n) in lines.iter().zip([48, 96]) {
        assert_eq!(line["kind"], "attention");
        assert_eq!(line["n"], n);
        assert_eq!(line["fused"], true, "flex has the fused operation");
        assert!(line["fused_tflops"].as_f64().unwrap() > 0.0);
        assert!(line["composed_over_fused"].as_f64().unwrap() > 0.0);
        let diff = line["max_abs_diff"].as_f64().unwrap();
        assert!(diff < 1e-4, "fused and composed differ by {diff}");
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

/// `export --format hf` of a char-level dense run writes a GPT2LMHeadModel directory (config,
/// weights under transformers' names, tokenizer files); `eval --scores` writes the first K
/// windows' per-token log-probabilities, whose weighted mean is the `scored_loss` it prints;
/// a model transformers cannot express is refused naming the option, before any checkpoint
/// is read.
#[test]
fn hf_export_and_per_token_scores() {
    let dir = scratch("hf-export");
    let corpus = write_corpus(&dir);
    let config = write_named(
        &dir,
        "dense.toml",
        &format!(
            r#"
[model]
d_model = 32
n_layers = 2
d_ff = 64
seq_len = 16

[model.mixer]
kind = "dense"
n_heads = 4

[data]
corpus = "text"
path = "{}"
level = "char"
valid_fraction = 0.2
cache_dir = ""

[optim]
lr = 3e-3
warmup_steps = 2

[train]
backend = "flex"
steps = 4
batch_size = 4
eval_every = 0
eval_batches = 2
checkpoint_every = 4
log_every = 1
"#,
            corpus.display()
        ),
    );
    let run_dir = dir.join("run");
    ok(&run(train_bin().arg("--config").arg(&config).args([
        "--set",
        &format!("train.run_dir=\"{}\"", run_dir.display()),
    ])));
    let out_dir = dir.join("hf");
    let out = run(Command::new(env!("CARGO_BIN_EXE_export"))
        .arg("--run")
        .arg(&run_dir)
        .args(["--format", "hf", "--out"])
        .arg(&out_dir));
    ok(&out);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("transformer.wte.weight\tF32\t[")
            && listing.contains("transformer.h.1.mlp.c_proj.weight\tF32\t[64, 32]"),
        "{listing}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out_dir.join(file).is_file(), "{file}");
    }
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(json["n_positions"], 16);
    // The tokenizer gives the run's ids for the corpus's text.
    let text = std::fs::read_to_string(&corpus).unwrap();
    let mixlab: mixlab_data::Tokenizer =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let hf = tokenizers::Tokenizer::from_file(out_dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        hf.encode(text.as_str(), false).unwrap().get_ids(),
        &mixlab.encode(&text)[..]
    );

    let scores = dir.join("scores.jsonl");
    let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--run")
        .arg(&run_dir)
        .args(["--backend", "flex", "--score-windows", "3", "--scores"])
        .arg(&scores));
    ok(&out);
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let windows: Vec<Value> = std::fs::read_to_string(&scores)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(windows.len(), 3);
    assert_eq!(line["scored_windows"], 3);
    let (mut sum, mut weight) = (0.0, 0.0);
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(w["window"], i);
        assert_eq!(w["input"].as_array().unwrap().len(), 16);
        assert_eq!(w["target"].as_array().unwrap().len(), 16);
        let n = w["scored"].as_array().unwrap().len();
        assert!(n > 0 && n == w["logprob"].as_array().unwrap().len());
        for (lp, wt) in w["logprob"]
            .as_array()
            .unwrap()
            .iter()
            .zip(w["weight"].as_array().unwrap())
        {
            let (lp, wt) = (lp.as_f64().unwrap(), wt.as_f64().unwrap());
            assert!(lp <= 0.0);
            sum -= lp * wt;
            weight += wt;
        }
    }
    let scored = line["scored_loss"].as_f64().unwrap();
    assert!(
        (sum / weight - scored).abs() < 1e-9,
        "{} vs {scored}",
        sum / weight
    );
    // Windows cover valid tokens in order: the first window's targets are its inputs shifted.
    let w0 = &windows[0];
    assert_eq!(w0["input"][1], w0["target"][0]);

    // A RoPE model: refused by name, exit 1, before reading any checkpoint.
    let rope = dir.join("rope-run");
    std::fs::create_dir_all(&rope).unwrap();
    let toml = std::fs::read_to_string(run_dir.join("config.toml"))
        .unwrap()
        .replace("position = \"learned\"", "position = \"rope\"");
    assert!(toml.contains("\"rope\""), "{toml}");
    std::fs::write(rope.join("config.toml"), toml).unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_export"))
        .arg("--run")
        .arg(&rope)
        .args(["--format", "hf", "--out"])
        .arg(dir.join("hf-rope")));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.position") && err.contains("--format hf") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dir.join("hf-rope").exists());
}
