//! Mixlab's data: corpora, tokenisation, splits and seeded batch samplers.
//!
//! Everything here is plain Rust (`Vec<u32>` token ids, no tensors): the `train` crate turns a
//! [`Batch`] into tensors on whatever device it trains on. Sampling is stateless, a pure
//! function of `(seed, batch index)`, so the sampler's whole state is one counter that a
//! checkpoint stores and a resumed run continues from.
#![warn(missing_docs)]

pub mod batch;
pub mod bpe;
pub mod cache;
pub mod catalogue;
pub mod copy;
pub mod fetch;
#[cfg(test)]
mod fuzz;
pub mod hf;
pub mod text;

pub use batch::{
    Batch, Sampler, eval_windows, shard_rows, stream_batch, stream_eval_batches, stream_restarts,
    stream_windows,
};
pub use bpe::{Bpe, BpeSettings};
pub use catalogue::{Corpus, LoadRequest, corpus_dir, load, load_cached, sources};
pub use copy::CopyTask;
pub use fetch::{Download, FetchEvent, downloads, fetch};
pub use text::{Level, Splits, Tokenizer, WordVocab};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[data]` section: which corpus, and how to cut it into tokens, splits and batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A named corpus (`enwik8`, `text8`, `wikitext-2`, `wikitext-103`, `wikitext-2-raw`,
    /// `wikitext-103-raw`, `ptb`, `ptb-char`, `tinyshakespeare`), `text` (any local file or
    /// directory) or `copy` (synthetic).
    pub corpus: Corpus,
    /// For `text`: the file or directory. For a named corpus: its folder (default
    /// `<root>/<corpus>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Where named corpora land: `<root>/<corpus>/`.
    pub root: PathBuf,
    /// Tokenisation of `text` and the raw WikiText corpora: `byte`, `char` or `word`; `bpe`
    /// (byte-level BPE) for any text corpus, named ones included.
    pub level: Level,
    /// `level = "bpe"`: the vocabulary size a BPE trained on the training split reaches (the
    /// 256 bytes plus merges).
    pub bpe_vocab_size: usize,
    /// `level = "bpe"`: a Hugging Face `tokenizer.json` to use instead of training one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// `text` only: fraction held out for validation.
    pub valid_fraction: f64,
    /// `text` only: fraction held out for test, at the very end.
    pub test_fraction: f64,
    /// Training batches: `random` windows, or `stream` (the token stream cut into `batch`
    /// parallel streams read in order, Transformer-XL style).
    pub sampler: Sampler,
    /// Evaluation stride: each scored token has at least `seq_len - eval_stride` tokens of
    /// context; default (and at most) `seq_len`, i.e. non-overlapping windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_stride: Option<usize>,
    /// With a cache (`[model.cache]`): evaluation reads a split as this many contiguous
    /// streams, the cache carried from block to block (Sukhbaatar et al.'s batch 8).
    pub eval_streams: usize,
    /// Alphabet size of the copy task (the separator is one more symbol).
    pub n_symbols: usize,
    /// Where tokenised corpora are cached (memory-mapped on later runs).
    pub cache_dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            corpus: Corpus::Text,
            path: None,
            root: PathBuf::from("datasets"),
            level: Level::Byte,
            bpe_vocab_size: 4096,
            tokenizer: None,
            valid_fraction: 0.1,
            test_fraction: 0.0,
            sampler: Sampler::Random,
            eval_stride: None,
            eval_streams: 8,
            n_symbols: 16,
            cache_dir: PathBuf::from("datasets/.cache"),
        }
    }
}

/// Everything that can go wrong reading or cutting data, with the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A corpus file is missing and downloads are off.
    #[error(
        "downloads are off (--offline or MIXLAB_OFFLINE) and a corpus file is missing: {what} \
         (or run without --offline to fetch it)"
    )]
    Offline {
        /// What to download, its checksum, and where to put it.
        what: String,
    },
    /// No URL of a download worked.
    #[error("cannot download ({tried}); to do it by hand: {by_hand}")]
    Download {
        /// Each URL tried, with why it failed.
        tried: String,
        /// What to download, its checksum, and where to put it.
        by_hand: String,
    },
    /// A transfer stopped part-way; what arrived is kept for the next run to resume.
    #[error(
        "download of {url} interrupted after {received} bytes ({reason}); the partial file \
         {path} is kept: run again to resume"
    )]
    Interrupted {
        /// The URL.
        url: String,
        /// The `.part` file.
        path: PathBuf,
        /// Bytes on disk.
        received: u64,
        /// What happened.
        reason: String,
    },
    /// A finished download does not match its pinned size or checksum.
    #[error(
        "{url}: downloaded file has {problem}; the file {path} was deleted (a corrupt or \
         changed download): run again to retry, or check the source"
    )]
    Checksum {
        /// The URL.
        url: String,
        /// The deleted file.
        path: PathBuf,
        /// Size or sha256 found vs expected.
        problem: String,
    },
    /// An archive cannot be read.
    #[error("cannot extract {path}: {reason}; delete it and run again to download it afresh")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Char-level tokenisation needs UTF-8 text.
    #[error("{path} is not UTF-8 (first bad byte at offset {offset}); use data.level = \"byte\"")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// A split has fewer tokens than one training window needs.
    #[error(
        "the {split} split of {what} has {tokens} tokens, fewer than one window of {needed} \
         (seq_len + 1); use a longer text, a smaller model.seq_len or another data.valid_fraction"
    )]
    TooShort {
        /// `train` or `valid`.
        split: &'static str,
        /// What was split.
        what: String,
        /// Tokens in the split.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
    },
    /// The file is empty.
    #[error("{path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A corpus file is not where it should be.
    #[error(
        "corpus {corpus}: {path} not found; place the corpus files in that folder (see \
         datasets/README.md for sources and checksums) or point data.path at its folder"
    )]
    Missing {
        /// The corpus.
        corpus: &'static str,
        /// The expected file.
        path: PathBuf,
    },
    /// A held-out split has a word the training vocabulary lacks, and the corpus has no `<unk>`.
    #[error(
        "{split} split, {path} line {line}: the word `{word}` is not in the training \
         vocabulary and the corpus has no <unk> token"
    )]
    UnknownWord {
        /// The word.
        word: String,
        /// `valid` or `test`.
        split: &'static str,
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// A config field has a value the data cannot use.
    #[error("data.{field}: {message}")]
    Invalid {
        /// The field inside `[data]`.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// This crate's directory, read when the tests run (cargo sets `CARGO_MANIFEST_DIR` for them):
/// the compile-time value goes stale when a cached build is reused from another checkout path.
#[cfg(test)]
pub(crate) fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
