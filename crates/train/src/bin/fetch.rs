//! `fetch`: download named corpora into `datasets/<name>/` (pinned sha256, resume, mirrors),
//! or list what each corpus downloads. `train` does the same on its own when a named corpus is
//! missing from its default folder.
//!
//! ```text
//! cargo run --release --bin fetch -- enwik8 wikitext-103
//! cargo run --release --bin fetch -- --list
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use mixlab_data::{Corpus, corpus_dir, downloads};
use mixlab_train::exit_with;
use mixlab_train::source::{fetch_corpus, set_offline};

/// Download Mixlab's named corpora into datasets/ (checksummed, resumable).
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example:\n  fetch --list\n  fetch wikitext-2 ptb"
)]
struct Cli {
    /// Corpora to fetch: enwik8, text8, wikitext-2, wikitext-103, wikitext-2-raw,
    /// wikitext-103-raw, ptb, tinyshakespeare.
    names: Vec<String>,
    /// Folder the corpora land in (`<root>/<name>/`), as `data.root`.
    #[arg(long, default_value = "datasets")]
    root: PathBuf,
    /// Only check: report what is missing and how to get it by hand.
    #[arg(long)]
    offline: bool,
    /// List every corpus's URLs, pinned checksums and files, then exit.
    #[arg(long)]
    list: bool,
}

fn parse(name: &str) -> Result<Corpus> {
    let corpus: Corpus =
        serde_json::from_value(serde_json::Value::String(name.into())).map_err(|_| {
            anyhow::anyhow!(
                "unknown corpus `{name}`: use enwik8, text8, wikitext-2, wikitext-103, \
                 wikitext-2-raw, wikitext-103-raw, ptb, ptb-char or tinyshakespeare"
            )
        })?;
    Ok(corpus)
}

fn run(cli: &Cli) -> Result<()> {
    if cli.list {
        for name in [
            "enwik8",
            "text8",
            "wikitext-2",
            "wikitext-103",
            "wikitext-2-raw",
            "wikitext-103-raw",
            "ptb",
            "ptb-char",
            "tinyshakespeare",
        ] {
            let corpus = parse(name)?;
            let dir = corpus_dir(&cli.root, corpus);
            let list = downloads(corpus);
            if list.is_empty() {
                println!(
                    "{name}: no pinned download; place its files in {}",
                    dir.display()
                );
            }
            for d in list {
                println!("{name}: {}", d.by_hand(&dir));
                for mirror in &d.mirrors {
                    println!("{name}:   mirror {mirror}");
                }
            }
        }
        return Ok(());
    }
    if cli.names.is_empty() {
        bail!("name at least one corpus (or --list)");
    }
    set_offline(cli.offline);
    for name in &cli.names {
        let corpus = parse(name)?;
        let dir = corpus_dir(&cli.root, corpus);
        if downloads(corpus).is_empty() {
            bail!(
                "{name} has no pinned download (no checksummed source is known); place its \
                 files in {} by hand (see datasets/README.md)",
                dir.display()
            );
        }
        fetch_corpus(corpus, &dir)?;
        println!("{name}: ready in {}", dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    exit_with(run(&Cli::parse()))
}
