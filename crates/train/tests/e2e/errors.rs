//! User mistakes: clear messages naming the file, key or line and the fix, exit 1, nothing
//! written.

use std::process::Command;

use crate::common::*;

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

/// A build without the `mpi` feature started as one of several MPI ranks refuses to start
/// (each rank would train alone into the same run directory) and says how to rebuild.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let dir = scratch("no-mpi");
    let config = write_config(&dir, TINY);
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1 of 2"), "{stderr}");
    assert!(stderr.contains("--features mixlab-train/mpi"), "{stderr}");
    assert!(
        !dir.join("runs").exists() && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A cache where it cannot follow its streams is refused naming the keys, and a checkpoint
/// resumes only into a config with the same cache: one-line errors, exit 1, nothing written.
#[test]
fn a_cache_is_refused_where_it_cannot_follow_its_streams() {
    let dir = scratch("cache-errors");
    let config = write_cached_config(&dir, |t| t);
    for (set, needles) in [
        (
            "data.sampler=\"random\"",
            &["model.cache", "data.sampler"][..],
        ),
        ("model.position=\"learned\"", &["position", "cache"][..]),
        ("model.cache.span=0", &["cache.span"][..]),
    ] {
        let run_dir = dir.join("refused");
        let out = train_with(&config, &run_dir, &[set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{set}: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{set}: `{needle}` in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{set}: {stderr}");
        assert!(!run_dir.exists(), "{set}: the run directory was created");
    }
    // A run without a cache, resumed into the cached config.
    let text = std::fs::read_to_string(&config).unwrap();
    let plain = write_named(
        &dir,
        "plain.toml",
        &text.replace("[model.cache]\nspan = 20\n", ""),
    );
    let run_dir = dir.join("plain");
    ok(&train_with(&plain, &run_dir, &["train.steps=4"]));
    let out = run(train_bin()
        .arg("--config")
        .arg(&config)
        .arg("--resume")
        .arg(&run_dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds no cache") && stderr.contains("model.cache"),
        "{stderr}"
    );
    // A cached run resumed with another number of streams.
    let run_dir = dir.join("cached");
    ok(&train_with(&config, &run_dir, &["train.steps=4"]));
    let out = run(train_bin()
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", "train.batch_size=2"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("4 streams") && stderr.contains("train.batch_size"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
