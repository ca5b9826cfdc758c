//! A run and its files: config, metrics, checkpoints, summary; non-finite steps, half
//! precision, data parallel, a word-level corpus.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::*;

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
    data_parallel_matches_one_device(&dir, &config, ["train.batch_size=7", "train.grad_accum=2"]);
    // A model with a cache: each device continues the cache of its rows (3 and 2 of 5).
    let dir = scratch("data-parallel-cached");
    let config = write_cached_config(&dir, |t| t.replace("dropout = 0.1", "dropout = 0.0"));
    data_parallel_matches_one_device(&dir, &config, ["train.batch_size=5", "train.grad_accum=2"]);
}

fn data_parallel_matches_one_device(dir: &Path, config: &Path, sets: [&str; 2]) {
    let one = dir.join("one");
    ok(&train_with(config, &one, &sets));
    let two = dir.join("two");
    let devices = "train.devices=[\"flex\", \"ndarray\"]";
    let out = train_with(config, &two, &[sets[0], sets[1], devices]);
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
    ok(&train_with(config, &cut, &[sets[0], sets[1], devices]));
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

/// `train.precision = "f16"` on wgpu (lavapipe in CI has shader-f16): dense and all-attention
/// train in half precision (the loss falls and stays finite, the run says `· f16`), and their
/// f16 checkpoint evaluates on flex to the loss the run logged, within f16's rounding. bf16,
/// which wgpu cannot compute in, is refused naming the key. Skips without a wgpu adapter
/// (fails under `MIXLAB_REQUIRE_WGPU`), or (printed) when the adapter lacks shader-f16.
#[test]
fn half_precision_trains_on_wgpu_where_the_adapter_has_it() {
    let dir = scratch("precision-wgpu");
    let config = write_config(&dir, TINY);
    let wgpu = ["train.backend=\"wgpu\"", "optim.eps=1e-4"];
    let probe = train_with(
        &config,
        &dir.join("probe"),
        &[&wgpu[..], &["train.steps=1"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&probe.stderr);
    if !probe.status.success() {
        assert!(
            std::env::var_os("MIXLAB_REQUIRE_WGPU").is_none(),
            "MIXLAB_REQUIRE_WGPU is set but wgpu does not train: {stderr}"
        );
        eprintln!("skipped: wgpu does not train here ({stderr})");
        return;
    }
    let mixers: [&[&str]; 2] = [
        &[],
        &[
            "model.mixer={kind=\"persistent\",n_heads=4,n_persistent=16}",
            "model.d_ff=0",
        ],
    ];
    for mixer in mixers {
        let run_dir = dir.join(format!("f16-{}", mixer.len()));
        let sets = [&wgpu[..], &["train.precision=\"f16\""], mixer].concat();
        let out = train_with(&config, &run_dir, &sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not support f16") {
            eprintln!("skipped: this adapter has no shader-f16 ({stderr})");
            return;
        }
        ok(&out);
        assert!(stderr.contains("· f16"), "{stderr}");
        let train = losses(&metrics(&run_dir), "train");
        let (first, last) = (train[0].1, train.last().unwrap().1);
        assert!(
            last.is_finite() && last < first,
            "f16 on wgpu {mixer:?}: {first} -> {last}"
        );
        let (_, valid) = *losses(&metrics(&run_dir), "valid").last().unwrap();
        let reloaded = eval_loss(&run_dir, "flex");
        assert!(
            (reloaded - valid).abs() < 2e-2 * valid.abs().max(1.0),
            "f16 on wgpu {mixer:?}: eval on flex {reloaded} vs the run's {valid}"
        );
    }
    let out = train_with(
        &config,
        &dir.join("bf16"),
        &[&wgpu[..], &["train.precision=\"bf16\""]].concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("train.precision = \"bf16\"") && !stderr.contains("panicked"),
        "{stderr}"
    );
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
        assert_eq!(
            eval_loss(&run_dir, "flex"),
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

/// WikiText-103's vocabulary without WikiText-103: a generated corpus of 267,735 word types
/// (each once in its first line, then Zipf-distributed lines, as `bench data` draws them)
/// trains with the papers' adaptive input and softmax (cutoffs 20k / 40k / 200k, div_val 4,
/// tied) and is evaluated over its whole held-out splits — which a full softmax over these
/// words could not do in a test's time.
#[test]
fn a_wikitext_103_sized_vocabulary_trains_with_the_papers_adaptive_softmax() {
    use rand::{Rng, SeedableRng};
    let dir = scratch("wt103-vocab");
    let types = 267_735usize;
    let mut text = (0..types)
        .map(|r| format!("w{r}"))
        .collect::<Vec<_>>()
        .join(" ");
    text.push('\n');
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..20_000 {
        for _ in 0..20 {
            let rank = (types as f64).powf(rng.random::<f64>()) as usize;
            text.push_str(&format!("w{rank} "));
        }
        text.push('\n');
    }
    let corpus = write_named(&dir, "zipf.txt", &text);
    let config = write_named(
        &dir,
        "wt103-small.toml",
        &format!(
            r#"
[model]
d_model = 64
n_layers = 1
d_ff = 128
seq_len = 32
position = "learned"
tie_embeddings = true

[model.adaptive]
cutoffs = [20000, 40000, 200000]
div_val = 4

[model.mixer]
kind = "dense"
n_heads = 4

[data]
corpus = "text"
path = "{}"
level = "word"
valid_fraction = 0.02
test_fraction = 0.02
cache_dir = ""

[train]
backend = "flex"
steps = 3
batch_size = 8
eval_every = 0
checkpoint_every = 3
log_every = 1
"#,
            corpus.display()
        ),
    );
    let run_dir = dir.join("run");
    ok(&train_with(&config, &run_dir, &[]));
    let resolved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(
        resolved.contains(&format!("vocab_size = {}", types + 1)),
        "every type and <eos>:\n{resolved}"
    );
    let lines = metrics(&run_dir);
    let test = lines.iter().find(|l| l["split"] == "test").unwrap();
    let ppl = test["ppl"].as_f64().unwrap();
    assert!(
        ppl.is_finite() && ppl > 1.0 && ppl < 2.0 * types as f64,
        "{test}"
    );
    // The model is the adaptive one: no [267,736, 64] table anywhere (widths 64/16/4/1).
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let params = summary["params"].as_u64().unwrap() as usize;
    assert!(params < types * 64 / 4, "{params} parameters");
}
