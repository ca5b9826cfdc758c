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
