//! Resume: bit-exact after a clean stop, Ctrl-C / SIGTERM, kill -9 anywhere, a corrupt or
//! half-written checkpoint, another architecture.

use std::path::Path;
use std::process::Command;

use crate::common::*;

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
        let dir = scratch(&format!("resume-{name}"));
        let config = write_config(&dir, TINY);
        resumed_run_repeats(name, &dir, &config, extra);
    }
}

/// A model with a cache (dense; all-attention with relative positions, persistent memory and
/// adaptive span), trained on 4 streams in 2 micro-batches a step: resumed at step 4 it
/// repeats the uninterrupted losses bit for bit (the cache travels in the checkpoint, the
/// streams restart at the same batch), and its evaluations are the cached protocol's.
#[test]
fn a_cached_run_resumes_bit_for_bit_with_its_cache() {
    let persistent = [
        "--set",
        "model.mixer={kind=\"persistent\",n_heads=4,n_persistent=4,adaptive_span=true,span_ramp=4}",
        "--set",
        "model.d_ff=0",
        "--set",
        "model.position=\"relative\"",
        "--set",
        "model.norm=\"post\"",
    ];
    for (name, extra) in [("dense", &[][..]), ("persistent", &persistent[..])] {
        let dir = scratch(&format!("resume-cached-{name}"));
        let config = write_cached_config(&dir, |t| t);
        resumed_run_repeats(&format!("cached {name}"), &dir, &config, extra);
        let full = dir.join("full");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(full.join("checkpoints/step-8/manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["cache"]["rows"], 4, "{manifest}");
        assert_eq!(manifest["cache"]["span"], 20);
        assert!(manifest["files"]["cache.bin"].is_string(), "{manifest}");
        let bytes = std::fs::metadata(full.join("checkpoints/step-8/cache.bin"))
            .unwrap()
            .len();
        assert_eq!(
            bytes,
            2 * 4 * 20 * 32 * 4,
            "layers x rows x span x d_model f32"
        );
        let valid: Vec<_> = metrics(&full)
            .into_iter()
            .filter(|l| l["split"] == "valid")
            .collect();
        assert_eq!(valid[0]["protocol"], "streams 3x8 cached");
        // The last evaluation takes the whole split: 128 bytes, 127 targets.
        assert_eq!(valid.last().unwrap()["tokens"], 127);
    }
}

/// WikiText-103's models in small: a word-level run with a tied adaptive input and softmax
/// (two tails) and a cache. Resumed at step 4 it repeats the uninterrupted losses bit for
/// bit; `eval` reproduces its final whole-split validation loss from the checkpoint; `sample`
/// continues a prompt with the corpus's words; `export` writes the clusters under their
/// module names, with no `[vocab, d_model]` token embedding.
#[test]
fn an_adaptive_softmax_run_resumes_bit_for_bit_evaluates_samples_and_exports() {
    let dir = scratch("adaptive");
    let config = write_cached_config(&dir, |t| {
        t.replace("level = \"byte\"", "level = \"word\"").replace(
            "[model.cache]",
            "[model.adaptive]\ncutoffs = [4, 8]\ndiv_val = 2\n\n[model.cache]",
        )
    });
    // Lines of Zipf-distributed words after one line holding all of them (so every split's
    // words are in the training split's vocabulary).
    const WORDS: [&str; 12] = [
        "the", "cache", "reaches", "back", "past", "its", "block", "and", "a", "stream", "goes",
        "on",
    ];
    let mut text = WORDS.join(" ") + "\n";
    let harmonic: f64 = (1..=WORDS.len()).map(|r| 1.0 / r as f64).sum();
    let mut state = 7u64;
    for line in 0..60 {
        for _ in 0..6 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut u = (state >> 11) as f64 / (1u64 << 53) as f64 * harmonic;
            let mut r = 0;
            while r + 1 < WORDS.len() && u > 1.0 / (r + 1) as f64 {
                u -= 1.0 / (r + 1) as f64;
                r += 1;
            }
            text.push_str(WORDS[r]);
            text.push(' ');
        }
        text.push_str(if line % 2 == 0 { "on\n" } else { "the\n" });
    }
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    resumed_run_repeats("adaptive", &dir, &config, &[]);
    let full = dir.join("full");
    // The vocabulary is ordered by frequency, so the head cluster holds the common words.
    let tokenizer = std::fs::read_to_string(full.join("tokenizer.json")).unwrap();
    assert!(
        tokenizer.find("\"the\"").unwrap() < tokenizer.find("\"goes\"").unwrap(),
        "{tokenizer}"
    );
    let resolved = std::fs::read_to_string(full.join("config.toml")).unwrap();
    assert!(resolved.contains("[model.adaptive]"), "{resolved}");
    let last_valid = losses(&metrics(&full), "valid").last().unwrap().1;
    let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--run")
        .arg(&full)
        .args(["--split", "valid", "--backend", "flex"]));
    ok(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let loss = line["loss"].as_f64().unwrap();
    assert!(
        (loss - last_valid).abs() < 1e-9 * last_valid,
        "eval {loss} vs training's final valid {last_valid}"
    );

    let text = sample_from(&full, 12, &[]);
    assert!(text.starts_with("the cache"), "{text}");
    let text = text.trim_end_matches('\n');
    let words: Vec<&str> = text.split_whitespace().collect();
    // Each sampled token is a word or an <eos> (a newline).
    assert_eq!(words.len() + text.matches('\n').count(), 2 + 12, "{text:?}");
    let corpus = std::fs::read_to_string(dir.join("corpus.txt")).unwrap();
    for w in &words {
        assert!(
            corpus.split_whitespace().any(|c| c == *w) || *w == "<unk>" || *w == "<eos>",
            "{w:?} is not a corpus word: {text:?}"
        );
    }

    let st = dir.join("adaptive.safetensors");
    let out = run(Command::new(env!("CARGO_BIN_EXE_export"))
        .arg("--run")
        .arg(&full)
        .arg("--out")
        .arg(&st));
    ok(&out);
    let listing = String::from_utf8(out.stdout).unwrap();
    for name in [
        "adaptive_input.head",
        "adaptive_input.tails.0.proj",
        "adaptive_input.tails.1.weight",
        "adaptive_softmax.cluster_weight",
        "adaptive_softmax.head_bias",
        "adaptive_softmax.tail_bias.1",
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with(&format!("{name}\t"))),
            "{name} missing:\n{listing}"
        );
    }
    assert!(!listing.contains("token_embedding"), "{listing}");
    assert!(
        !listing.contains("adaptive_softmax.words"),
        "tied: {listing}"
    );
}

/// A byte-level BPE run (`data.level = "bpe"`, trained on the training split in every
/// process: the corpus cache is off) resumes bit for bit — the BPE trained again on resume is
/// the same tokenizer — reports perplexity per token, and `sample` continues a prompt with
/// text made of the corpus's characters.
#[test]
fn a_bpe_run_resumes_bit_for_bit_and_samples_text() {
    let dir = scratch("bpe");
    let config = write_cached_config(&dir, |t| {
        t.replace("level = \"byte\"", "level = \"bpe\"\nbpe_vocab_size = 300")
    });
    resumed_run_repeats("bpe", &dir, &config, &[]);
    let full = dir.join("full");
    let tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer["level"], "bpe");
    assert_eq!(tokenizer["tokenizer"]["model"]["type"], "BPE");
    let valid = metrics(&full)
        .into_iter()
        .rfind(|l| l["split"] == "valid")
        .unwrap();
    let (loss, ppl) = (
        valid["loss"].as_f64().unwrap(),
        valid["ppl"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl, "{valid}");
    let text = sample_from(&full, 20, &["--temperature", "0"]);
    assert!(text.starts_with("the cache"), "{text}");
    assert!(text.len() > "the cache".len() + 5, "{text:?}");
    let corpus = std::fs::read_to_string(dir.join("corpus.txt")).unwrap();
    assert!(
        text.trim_end_matches('\n')
            .chars()
            .all(|c| corpus.contains(c)),
        "{text:?}"
    );
}

/// `sample --run RUN_DIR --prompt "the cache" --tokens N --backend flex [EXTRA]`'s output.
fn sample_from(run_dir: &Path, tokens: usize, extra: &[&str]) -> String {
    let out = run(Command::new(env!("CARGO_BIN_EXE_sample"))
        .arg("--run")
        .arg(run_dir)
        .args(["--prompt", "the cache", "--backend", "flex"])
        .args(["--tokens", &tokens.to_string()])
        .args(extra));
    ok(&out);
    String::from_utf8(out.stdout).unwrap()
}

fn resumed_run_repeats(name: &str, dir: &Path, config: &Path, extra: &[&str]) {
    let train = |run_dir: &Path| {
        let dir = format!("train.run_dir=\"{}\"", run_dir.display());
        ok(&run(train_bin()
            .arg("--config")
            .arg(config)
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
    let steps = checkpoint_steps(&run_dir);
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

/// kill -9 at several points (mid-step, mid-checkpoint), resume, finish: the losses after the
/// resume point and the final weights are bit-identical to an uninterrupted run.
#[test]
fn kill_9_anywhere_then_resume_is_bit_identical_on_flex() {
    kill_9_trials("flex", false);
}

#[test]
fn kill_9_anywhere_then_resume_is_bit_identical_on_ndarray() {
    kill_9_trials("ndarray", false);
}

/// The same with a cache: the cache of every stream is part of each checkpoint.
#[test]
fn kill_9_anywhere_then_resume_is_bit_identical_with_a_cache() {
    kill_9_trials("flex", true);
}

fn kill_9_trials(backend: &str, cached: bool) {
    let dir = scratch(&format!("kill9-{backend}-{cached}"));
    let edit = |text: String| {
        text.replace("backend = \"flex\"", &format!("backend = \"{backend}\""))
            .replace("steps = 8", "steps = 12")
            .replace("checkpoint_every = 4", "checkpoint_every = 2")
            .replace("keep_checkpoints = 2", "keep_checkpoints = 3")
    };
    let config = if cached {
        write_cached_config(&dir, edit)
    } else {
        write_config(&dir, &edit(TINY.to_string()))
    };
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

/// A word-level run whose saved vocabulary is not the one its corpus gives now (as a run made
/// when word ids followed first appearance: two words' ids swapped in its `tokenizer.json`) is
/// refused on resume and by `eval`, naming the file, instead of reading its ids as other words.
#[test]
fn a_run_whose_vocabulary_differs_from_its_corpus_is_refused() {
    let dir = scratch("vocab-order");
    let config = write_cached_config(&dir, |t| {
        t.replace("level = \"byte\"", "level = \"word\"")
            .replace("dropout = 0.1", "dropout = 0.0")
    });
    // Every split's words appear in the training split (the corpus has no <unk>).
    let line = "the cache reaches back past its block and a stream goes on\n";
    std::fs::write(dir.join("corpus.txt"), line.repeat(40)).unwrap();
    let run_dir = dir.join("run");
    let sets = [
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    ];
    ok(&train_with(&config, &run_dir, &sets));
    let path = run_dir.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    fn words(v: &mut serde_json::Value) -> Option<&mut Vec<serde_json::Value>> {
        match v {
            serde_json::Value::Object(map) => {
                if map.contains_key("words") {
                    return map.get_mut("words")?.as_array_mut();
                }
                map.values_mut().find_map(words)
            }
            _ => None,
        }
    }
    let list = words(&mut json).expect("a word vocabulary");
    assert!(list.len() > 2, "{list:?}");
    list.swap(0, 1);
    std::fs::write(&path, json.to_string()).unwrap();

    let out = run(train_bin()
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", "train.steps=4"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resumed: {stderr}");
    assert!(
        stderr.contains("tokenizer.json") && stderr.contains("ordered by frequency"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = run(Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--run")
        .arg(&run_dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("tokenizer.json"),
        "{stderr}"
    );
}
