//! The repository's own promises: the README's two commands share one build.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use crate::common::crate_dir;

/// The README's quickstart commands, verbatim.
const RUN: &str = "cargo run --release --bin train -- --config configs/quickstart.toml";
const TEST: &str = "cargo test --release --workspace --features mixlab-train/mpi";

/// Each package of `cargo tree` for `args` and the feature sets it is built with (one per
/// distinct unit: a build-time and a run-time copy can differ).
fn resolved(args: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(crate_dir().join("../.."))
        .args([
            "tree", "--locked", "--prefix", "none", "--format", "{p}|{f}",
        ])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut packages: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim().trim_end_matches(" (*)");
        let Some((package, features)) = line.split_once('|') else {
            continue;
        };
        // "name vX.Y.Z (path)" → "name vX.Y.Z"
        let package = package.split(" (").next().unwrap_or(package).to_string();
        packages
            .entry(package)
            .or_default()
            .insert(features.to_string());
    }
    packages
}

/// The first command builds `train` without dev-dependencies or `mpi`; the second builds the
/// whole workspace with both. Cargo compiles a crate twice when the two resolve it with
/// different features (and then everything above it: with clang-sys alone, all of Burn), so
/// every package the first builds must have the same feature sets in the second. `cargo tree`
/// resolves features exactly as the build does (resolver 3: host and target units apart).
#[test]
fn the_run_and_test_commands_share_one_build() {
    let readme = std::fs::read_to_string(crate_dir().join("../../README.md")).unwrap();
    for command in [RUN, TEST] {
        assert!(
            readme.contains(command),
            "README's quickstart runs `{command}`"
        );
    }
    let run = resolved(&["-p", "mixlab-train", "-e", "normal,build"]);
    let test = resolved(&[
        "--workspace",
        "--features",
        "mixlab-train/mpi",
        "-e",
        "normal,build,dev",
    ]);
    assert!(run.len() > 100, "{} packages", run.len());
    let differ: Vec<String> = run
        .iter()
        .filter(|(package, _)| !package.starts_with("mixlab-train "))
        .filter(|(package, features)| test.get(*package) != Some(*features))
        .map(|(package, features)| {
            format!("{package}: run {features:?}, test {:?}", test.get(package))
        })
        .collect();
    assert!(
        differ.is_empty(),
        "the test command would rebuild these (and all that depends on them); align their \
         features in crates/train/Cargo.toml:\n{}",
        differ.join("\n")
    );
}

/// The repository root.
fn root() -> std::path::PathBuf {
    crate_dir().join("../..")
}

/// Every file under `dir` (relative to the root, `/`-separated), skipping `target`, `.git`,
/// `runs` and `datasets`.
fn files(dir: &std::path::Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "runs" | "datasets") {
                files(&path, out);
            }
        } else {
            let rel = path.strip_prefix(root()).unwrap_or(&path);
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// The prose people read: README, ARCHITECTURE, docs/*.md, and the comments of configs/*.toml
/// (as `(file, line number, text)`).
fn prose() -> Vec<(String, usize, String)> {
    let mut docs = vec!["README.md".to_string(), "ARCHITECTURE.md".to_string()];
    let mut listed = vec![];
    files(&root().join("docs"), &mut listed);
    docs.extend(listed.into_iter().filter(|f| f.ends_with(".md")));
    let mut configs = vec![];
    files(&root().join("configs"), &mut configs);
    let mut lines = vec![];
    for file in docs.iter().chain(&configs) {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let line = if file.ends_with(".toml") {
                match line.find('#') {
                    Some(at) => &line[at..],
                    None => continue,
                }
            } else {
                line
            };
            lines.push((file.clone(), i + 1, line.to_string()));
        }
    }
    lines
}

/// Path-like words of `line`: runs of letters, digits and `_ . / -`, without trailing
/// punctuation, with the character that follows each.
fn words(line: &str) -> Vec<(String, Option<char>)> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let chars: Vec<char> = line.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        if !is_word(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_word(chars[i]) {
            i += 1;
        }
        let mut word: String = chars[start..i].iter().collect();
        while word.ends_with(['.', '-', ',']) {
            word.pop();
        }
        out.push((word, chars.get(i).copied()));
    }
    out
}

/// A doc names `crates/...`, `configs/...` and `scripts/...` paths and bare source files
/// (`mixer/dense.rs`, `gelu.rs`): each must exist (a bare one as the end of some path).
#[test]
fn docs_and_config_comments_name_only_paths_that_exist() {
    let mut all = vec![];
    files(&root(), &mut all);
    let mut missing = vec![];
    for (file, line, text) in prose() {
        for (word, _) in words(&text) {
            let word = word.trim_start_matches("./").to_string();
            let rooted = ["crates/", "configs/", "scripts/"]
                .iter()
                .any(|p| word.starts_with(p));
            let exists = if rooted {
                root().join(&word).exists()
            } else if word.ends_with(".rs") && !word.contains("..") {
                all.iter()
                    .any(|f| *f == word || f.ends_with(&format!("/{word}")))
            } else {
                continue;
            };
            if !exists {
                missing.push(format!("{file}:{line}: {word}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs name paths that do not exist (fix the doc or the path):\n{}",
        missing.join("\n")
    );
}

/// Whether some shipped config accepts `key` (as `--set key=0`): an unknown key is the
/// error "unknown field"; a wrong type or value is another error, so the key exists. Only
/// configs that already have the key's table count (`model.mixer.n_persistent` in one whose
/// mixer is `persistent`): a table the override creates fails for its missing fields first.
fn known_key(key: &str, bases: &[(String, toml::Table)]) -> bool {
    let parents: Vec<&str> = key.split('.').collect();
    let parents = &parents[..parents.len() - 1];
    bases.iter().any(|(base, table)| {
        if parents.len() > 1 {
            let mut at = Some(table);
            for p in parents {
                at = at.and_then(|t| t.get(*p)).and_then(|v| v.as_table());
            }
            if at.is_none() {
                return false;
            }
        }
        match mixlab_train::Config::parse(base, "base", &[format!("{key}=0")]) {
            Ok(_) => true,
            Err(e) => {
                let e = format!("{e:#}");
                !e.contains("unknown field")
            }
        }
    })
}

/// Config keys a doc names — dotted (`model.mixer.kind`, `train.steps`) anywhere, and the
/// `key` column of docs/CONFIG.md's tables under their `[section]` headings — must be keys
/// the config structs have.
#[test]
fn docs_name_only_config_keys_that_exist() {
    let mut configs = vec![];
    files(&root().join("configs"), &mut configs);
    // Each shipped config (and the empty one: every default), parsed once.
    let bases: Vec<(String, toml::Table)> = std::iter::once(String::new())
        .chain(
            configs
                .iter()
                .map(|f| std::fs::read_to_string(root().join(f)).unwrap()),
        )
        .map(|text| {
            let table = text.parse().unwrap();
            (text, table)
        })
        .collect();
    let extensions = [
        "rs",
        "bpk",
        "safetensors",
        "json",
        "jsonl",
        "toml",
        "py",
        "sh",
        "md",
        "svg",
        "csv",
        "txt",
        "png",
        "bin",
    ];
    let mut keys: Vec<(String, usize, String)> = vec![];
    for (file, line, text) in prose() {
        for (word, next) in words(&text) {
            let Some((section, rest)) = word.split_once('.') else {
                continue;
            };
            let last = word.rsplit('.').next().unwrap_or("");
            if !["model", "data", "optim", "train"].contains(&section)
                || word.contains('/')
                || next == Some('(')
                || rest.is_empty()
                || extensions.contains(&last)
                || !word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || "_.0123456789".contains(c))
            {
                continue;
            }
            keys.push((file.clone(), line, word));
        }
    }
    // docs/CONFIG.md's tables: `| `key` | default | meaning |` rows under `## `[section]``.
    let reference = std::fs::read_to_string(root().join("docs/CONFIG.md")).unwrap();
    let (mut section, mut in_keys) = (None::<String>, false);
    let mut table_rows = 0;
    for (i, line) in reference.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## `[") {
            section = heading.split_once("]`").map(|(s, _)| s.to_string());
            in_keys = false;
        } else if line.starts_with("| key |") {
            in_keys = true;
        } else if !line.starts_with('|') {
            in_keys = false;
        } else if let (true, Some(section)) = (in_keys, &section) {
            let cell = line.split('|').nth(1).unwrap_or("");
            for name in cell.split(',') {
                let name = name.trim().trim_matches('`');
                if !name.is_empty() && !name.starts_with('-') {
                    table_rows += 1;
                    keys.push(("docs/CONFIG.md".into(), i + 1, format!("{section}.{name}")));
                }
            }
        }
    }
    assert!(
        table_rows > 60,
        "{table_rows} keys read from docs/CONFIG.md's tables"
    );
    let unknown: Vec<String> = keys
        .iter()
        .filter(|(_, _, key)| !known_key(key, &bases))
        .map(|(file, line, key)| format!("{file}:{line}: {key}"))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs name config keys the config structs do not have:\n{}",
        unknown.join("\n")
    );
}

/// Every shipped config builds its model at full size (`bench train --dry-run` on flex, the
/// dry run of the GPU check), offline: a config whose corpus is not here gets a vocabulary of
/// 256, or, with an adaptive softmax, one past its last cutoff.
#[test]
fn every_shipped_config_builds_its_model() {
    let bench = env!("CARGO_BIN_EXE_bench");
    let mut configs = vec![];
    files(&root().join("configs"), &mut configs);
    configs.sort();
    assert!(configs.len() >= 20, "{configs:?}");
    for config in configs {
        let text = std::fs::read_to_string(root().join(&config)).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let last_cutoff = table
            .get("model")
            .and_then(|m| m.get("adaptive"))
            .and_then(|a| a.get("cutoffs"))
            .and_then(|c| c.as_array())
            .and_then(|c| c.last())
            .and_then(|c| c.as_integer());
        let mut cmd = Command::new(bench);
        cmd.current_dir(root())
            .args([
                "train",
                "--dry-run",
                "--backend",
                "flex",
                "--config",
                &config,
            ])
            .env("MIXLAB_OFFLINE", "1");
        if let Some(cutoff) = last_cutoff {
            cmd.args(["--set", &format!("model.vocab_size={}", cutoff * 2)]);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{config}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{config}: {e}: {stdout}"));
        assert_eq!(line["kind"], "dry-run", "{config}: {line}");
        assert!(
            line["params"].as_u64().unwrap_or(0) > 1000,
            "{config}: {line}"
        );
    }
}
