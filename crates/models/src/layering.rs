//! The crate's layering rule, checked on its source: **modules → ops, never back**, and imports
//! run down the module tree.
//!
//! Every `crate::…` and `super::…` path in non-test code (groups `{a, b}` expanded) is resolved
//! against the crate's module files to the deepest module it reaches, and read as an edge from
//! the file that names it to that module's file. Two kinds of edge are errors:
//! - **ops → module**: a file under `ops/` naming anything outside `ops/` (the fused operations
//!   take plain tensors and lists; a module calls them, never the other way);
//! - **upward**: a file naming an item of one of its ancestors' files (`lib.rs`, or the
//!   `mod.rs` of a folder that holds it) — a lower file leaning on the one that declares it.
//!   Shared types live in files of their own (`error.rs`, `mixer/context.rs`,
//!   `ops/attention/layout.rs`) so that such edges are not needed. The few that remain are
//!   listed in [`ALLOWED_UPWARD`], each with its reason.
//!
//! Test code (`#[cfg(test)]` modules, inline or in files of their own) is outside the rule: a test
//! may build a module to drive an operation. `MIXLAB_LAYERING_SRC=<dir>` checks another tree
//! (an older commit's `crates/models/src`) and prints its edges instead of asserting.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Upward edges kept on purpose: (file, the ancestor file it names, why).
const ALLOWED_UPWARD: &[(&str, &str, &str)] = &[(
    "mixer/persistent/span.rs",
    "mixer/persistent/mod.rs",
    "span.rs holds the adaptive-span methods of PersistentAttention, the type its parent \
     declares (one type, its impl split across the folder's files)",
)];

/// A module of the crate: its path (`["mixer", "dense"]`) and its file relative to `src/`.
struct ModuleFile {
    path: Vec<String>,
    file: String,
}

/// One `crate::`/`super::` path named by a file, resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    /// The path names an item of `to` (not only the module itself).
    item: bool,
}

fn module_files(src: &Path) -> Vec<ModuleFile> {
    fn walk(dir: &Path, src: &Path, out: &mut Vec<ModuleFile>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).expect("under src");
                let file = rel.to_string_lossy().replace('\\', "/");
                let mut parts: Vec<String> = file
                    .trim_end_matches(".rs")
                    .split('/')
                    .map(str::to_string)
                    .collect();
                if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                    parts.pop();
                }
                out.push(ModuleFile { path: parts, file });
            }
        }
    }
    let mut out = vec![];
    walk(src, src, &mut out);
    out
}

/// The files of the modules that `#[cfg(test)] mod name;` declares (test code as a whole).
fn test_files(src: &Path, modules: &[ModuleFile]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in modules {
        let text = std::fs::read_to_string(src.join(&m.file)).expect("source file");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let declared = pair[1]
                .rsplit_once("mod ")
                .and_then(|(_, name)| name.strip_suffix(';'));
            if let (true, Some(name)) = (pair[0] == "#[cfg(test)]", declared) {
                let mut path = m.path.clone();
                path.push(name.to_string());
                if let Some(child) = modules.iter().find(|c| c.path == path) {
                    out.insert(child.file.clone());
                }
            }
        }
    }
    out
}

/// The non-test text of a file, comments removed: everything before the first
/// `#[cfg(test)]` inline module (clippy keeps items out of the space after it), without
/// `#[cfg(test)] mod x;` declarations.
fn code_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line == "#[cfg(test)]" {
            let next = lines.get(i + 1).map_or("", |l| l.trim());
            let is_mod = next.starts_with("mod ") || next.contains(" mod ");
            if is_mod && next.ends_with('{') {
                break;
            }
            if is_mod {
                i += 2;
                continue;
            }
        }
        let code = match lines[i].find("//") {
            Some(at) => &lines[i][..at],
            None => lines[i],
        };
        out.push_str(code);
        out.push('\n');
        i += 1;
    }
    out
}

/// Every `crate::…`/`super::…` path in `code`, as segment lists (groups expanded).
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = vec![];
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(root) {
            let start = from + at;
            from = start + root.len();
            let before = start.checked_sub(1).map(|i| bytes[i]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                continue; // inside a longer path (`super::super::…` is read from its first)
            }
            let head = root.trim_end_matches(':').to_string();
            out.extend(expand(&code[from..], vec![head]));
        }
    }
    out
}

/// The paths that continue `prefix` at `rest` (just after a `::`).
fn expand(rest: &str, prefix: Vec<String>) -> Vec<Vec<String>> {
    let rest = rest.trim_start();
    if let Some(inner) = rest.strip_prefix('{') {
        // A group: split at top-level commas up to its closing brace.
        let (mut depth, mut part, mut parts) = (0usize, String::new(), vec![]);
        for c in inner.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut part));
                    continue;
                }
                _ => {}
            }
            part.push(c);
        }
        parts.push(part);
        return parts
            .iter()
            .filter(|p| !p.trim().is_empty())
            .flat_map(|p| {
                let p = p.trim();
                if p == "self" {
                    vec![prefix.clone()]
                } else {
                    expand(p, prefix.clone())
                }
            })
            .collect();
    }
    if rest.starts_with('*') {
        let mut path = prefix;
        path.push("*".into());
        return vec![path];
    }
    let ident: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if ident.is_empty() {
        return vec![prefix];
    }
    let mut path = prefix;
    path.push(ident.clone());
    match rest[ident.len()..].strip_prefix("::") {
        Some(more) => expand(more, path),
        None => vec![path],
    }
}

/// The edge a path of the module at `from` makes, or `None` when it leaves the crate's files.
fn resolve(path: &[String], from: &ModuleFile, modules: &[ModuleFile]) -> Option<Edge> {
    let mut module: Vec<String> = vec![];
    let mut segments = path.iter().peekable();
    match segments.next().map(String::as_str) {
        Some("crate") => {}
        Some("super") => {
            module = from.path.clone();
            module.pop()?;
            while segments.peek().is_some_and(|s| *s == "super") {
                segments.next();
                module.pop()?;
            }
        }
        _ => return None,
    }
    let known = |m: &[String]| modules.iter().any(|f| f.path == m);
    while let Some(next) = segments.peek() {
        let mut deeper = module.clone();
        deeper.push((*next).clone());
        if !known(&deeper) {
            break;
        }
        module = deeper;
        segments.next();
    }
    let item = segments.next().is_some();
    let to = modules.iter().find(|f| f.path == module)?;
    Some(Edge {
        from: from.file.clone(),
        to: to.file.clone(),
        item,
    })
}

/// Every edge of the non-test code under `src` (`tests`: the test-only files).
fn edges(src: &Path, modules: &[ModuleFile], tests: &BTreeSet<String>) -> Vec<Edge> {
    let mut edges = BTreeSet::new();
    for m in modules {
        if tests.contains(&m.file) {
            continue;
        }
        let text = std::fs::read_to_string(src.join(&m.file)).expect("source file");
        for path in paths_in(&code_of(&text)) {
            if let Some(edge) = resolve(&path, m, modules)
                && edge.to != edge.from
            {
                edges.insert(edge);
            }
        }
    }
    edges.into_iter().collect()
}

/// The module path of a file (`mixer/dense.rs` → `["mixer", "dense"]`).
fn module_of(file: &str, modules: &[ModuleFile]) -> Vec<String> {
    modules
        .iter()
        .find(|m| m.file == file)
        .map(|m| m.path.clone())
        .expect("a module file")
}

/// The edges that break the rule: (ops → module, upward).
fn violations(modules: &[ModuleFile], edges: &[Edge]) -> (Vec<Edge>, Vec<Edge>) {
    let in_ops = |file: &str| module_of(file, modules).first().is_some_and(|s| s == "ops");
    let ops_up = edges
        .iter()
        .filter(|e| in_ops(&e.from) && !in_ops(&e.to))
        .cloned()
        .collect();
    let upward = edges
        .iter()
        .filter(|e| {
            let (from, to) = (module_of(&e.from, modules), module_of(&e.to, modules));
            e.item && to.len() < from.len() && from.starts_with(&to)
        })
        .cloned()
        .collect();
    (ops_up, upward)
}

fn show(edges: &[Edge]) -> String {
    edges
        .iter()
        .map(|e| format!("  {} -> {}", e.from, e.to))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn modules_call_ops_and_imports_run_down_the_tree() {
    let (src, report_only) = match std::env::var("MIXLAB_LAYERING_SRC") {
        Ok(dir) => (PathBuf::from(dir), true),
        Err(_) => (Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), false),
    };
    let modules = module_files(&src);
    let tests = test_files(&src, &modules);
    let edges = edges(&src, &modules, &tests);
    let (ops_up, upward) = violations(&modules, &edges);
    let files: BTreeSet<(&str, &str)> = edges
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str()))
        .collect();
    println!(
        "{}: {} file-to-file edges, {} ops -> module, {} upward\nops -> module:\n{}\nupward:\n{}",
        src.display(),
        files.len(),
        ops_up.len(),
        upward.len(),
        show(&ops_up),
        show(&upward)
    );
    if report_only {
        return;
    }
    assert!(
        edges.len() > 40 && edges.iter().any(|e| e.to == "ops/attention/layout.rs"),
        "the checker found too few edges to be reading the crate:\n{}",
        show(&edges)
    );
    assert!(
        ["layering.rs", "test_util.rs", "lm/tests.rs"]
            .iter()
            .all(|f| tests.contains(*f)),
        "test-only files not recognised: {tests:?}"
    );
    assert!(
        ops_up.is_empty(),
        "files under ops/ name modules (layering rule: modules -> ops, never back):\n{}",
        show(&ops_up)
    );
    let allowed: BTreeSet<(&str, &str)> = ALLOWED_UPWARD.iter().map(|&(f, t, _)| (f, t)).collect();
    let found: BTreeSet<(&str, &str)> = upward
        .iter()
        .map(|e| (e.from.as_str(), e.to.as_str()))
        .collect();
    assert_eq!(
        found, allowed,
        "upward imports (a file naming an item of lib.rs or of an enclosing mod.rs) differ from \
         ALLOWED_UPWARD: move the item to a file of its own, or list the edge with its reason"
    );
}

/// The checker itself: groups, `self`, globs, chains of `super`, test code and comments.
#[test]
fn the_checker_reads_paths_as_rust_does() {
    let paths = paths_in(&code_of(
        "use crate::a::{b::{C, D}, self, e::*};\nlet x = super::super::f::G; // crate::hidden\n",
    ));
    let text: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        text,
        [
            "crate::a::b::C",
            "crate::a::b::D",
            "crate::a",
            "crate::a::e::*",
            "super::super::f::G"
        ]
    );
    let code = code_of(
        "use crate::a;\n#[cfg(test)]\nmod tests;\nuse crate::b;\n#[cfg(test)]\nmod t {\n use crate::c;\n}\n",
    );
    assert_eq!(paths_in(&code).len(), 2, "{code}");
    let modules: Vec<ModuleFile> = [("", "lib.rs"), ("m", "m/mod.rs"), ("m/x", "m/x.rs")]
        .iter()
        .map(|(p, f)| ModuleFile {
            path: p
                .split('/')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            file: f.to_string(),
        })
        .collect();
    let x = &modules[2];
    let to = |p: &str| {
        let path: Vec<String> = p.split("::").map(String::from).collect();
        resolve(&path, x, &modules).map(|e| (e.to, e.item))
    };
    assert_eq!(to("super::Item"), Some(("m/mod.rs".into(), true)));
    assert_eq!(to("crate::m::x::Y"), Some(("m/x.rs".into(), true)));
    assert_eq!(to("crate::m::x"), Some(("m/x.rs".into(), false)));
    assert_eq!(to("super::super::Z"), Some(("lib.rs".into(), true)));
}
