//! Every mixer family trains end to end: all-attention, FNet (causal and masked), sparse
//! (copy task, random patterns), fused vs composed attention.

use std::process::Command;

use serde_json::Value;

use crate::common::*;

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
    // The learned spans (tokens, per head, per layer) are in the summary, within the window.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())
            .unwrap();
    let spans = summary["learned_spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{summary}");
    for layer in spans {
        let heads = layer.as_array().unwrap();
        assert_eq!(heads.len(), 4);
        assert!(
            heads
                .iter()
                .all(|h| (0.0..=16.0).contains(&h.as_f64().unwrap()))
        );
    }
    assert!(stderr.contains("spans "), "{stderr}");
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
