//! Mixlab's data: corpora, tokenisation, splits and seeded batch samplers.
//!
//! Everything here is plain Rust (`Vec<u32>` token ids, no tensors): the `train` crate turns a
//! [`Batch`] into tensors on whatever device it trains on. Sampling is stateless, a pure
//! function of `(seed, batch index)`, so the sampler's whole state is one counter that a
//! checkpoint stores and a resumed run continues from.
#![warn(missing_docs)]

pub mod batch;
pub mod copy;
pub mod text;

pub use batch::{Batch, WindowSampler, eval_windows};
pub use copy::CopyTask;
pub use text::{Level, TextCorpus, Tokenizer};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[data]` section: which corpus, and how to cut it into tokens and splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `copy` (synthetic copy task, no file) or `text` (any local text file).
    pub corpus: Corpus,
    /// The text file, for `corpus = "text"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Tokenisation of text: `byte` (vocab 256) or `char` (the training split's characters).
    pub level: Level,
    /// Fraction of the text, taken from its end, held out for validation.
    pub valid_fraction: f64,
    /// Alphabet size of the copy task (the separator is one more symbol).
    pub n_symbols: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            corpus: Corpus::Text,
            path: None,
            level: Level::Byte,
            valid_fraction: 0.1,
            n_symbols: 16,
        }
    }
}

/// The corpora this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Corpus {
    /// Sequences `x SEP x` of random symbols; loss counts only on the copied half.
    Copy,
    /// A local UTF-8 (char level) or arbitrary (byte level) text file.
    Text,
}

/// Everything that can go wrong reading or cutting data, with the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
    /// A config field has a value the data cannot use.
    #[error("data.{field}: {message}")]
    Invalid {
        /// The field inside `[data]`.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}
