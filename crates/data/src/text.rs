//! Plain text corpora: byte- or character-level tokenisation and a contiguous train/valid split.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// Tokenisation level of a text corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// One token per byte; vocabulary 256; works for any file.
    Byte,
    /// One token per Unicode scalar value seen in the training split.
    Char,
}

/// Maps text to token ids and back. Saved with a run so a resumed or evaluated model reads
/// text exactly as it was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "lowercase")]
pub enum Tokenizer {
    /// Token id = byte value.
    Byte,
    /// Token id = index in `chars` (sorted); characters not in `chars` map to `chars.len()`
    /// when `unknown` is set.
    Char {
        /// The alphabet, sorted.
        chars: Vec<char>,
        /// Whether an extra id for unseen characters exists (only when the validation split
        /// has characters the training split lacks).
        unknown: bool,
    },
}

impl Tokenizer {
    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Char { chars, unknown } => chars.len() + usize::from(*unknown),
        }
    }

    /// A char-level tokenizer for `train`, with an unknown id only if `valid` needs one.
    pub fn char_level(train: &str, valid: &str) -> Self {
        let chars: Vec<char> = train.chars().collect::<BTreeSet<_>>().into_iter().collect();
        let unknown = valid.chars().any(|c| chars.binary_search(&c).is_err());
        Tokenizer::Char { chars, unknown }
    }

    /// Token ids of `text` (bytes of its UTF-8 encoding at byte level).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Byte => text.bytes().map(u32::from).collect(),
            Tokenizer::Char { chars, .. } => text
                .chars()
                .map(|c| chars.binary_search(&c).unwrap_or(chars.len()) as u32)
                .collect(),
        }
    }

    /// Text of `ids` (lossy for byte sequences that are not UTF-8; `�` for unknown ids).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Char { chars, .. } => ids
                .iter()
                .map(|&i| chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
                .collect(),
        }
    }
}

/// A tokenised text, split contiguously: the first `1 - valid_fraction` for training, the rest
/// for validation (nanoGPT's split).
#[derive(Debug, Clone)]
pub struct TextCorpus {
    /// How the text was tokenised.
    pub tokenizer: Tokenizer,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub valid: Vec<u32>,
}

impl TextCorpus {
    /// Read and split the file at `path`.
    pub fn load(path: &Path, level: Level, valid_fraction: f64) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        match level {
            Level::Byte => Ok(Self::from_bytes(&bytes, valid_fraction)),
            Level::Char => {
                let text = std::str::from_utf8(&bytes).map_err(|e| DataError::NotUtf8 {
                    path: path.to_path_buf(),
                    offset: e.valid_up_to(),
                })?;
                Ok(Self::from_text_chars(text, valid_fraction))
            }
        }
    }

    /// Byte-level corpus of `bytes`.
    pub fn from_bytes(bytes: &[u8], valid_fraction: f64) -> Self {
        let cut = split_point(bytes.len(), valid_fraction);
        TextCorpus {
            tokenizer: Tokenizer::Byte,
            train: bytes[..cut].iter().map(|&b| u32::from(b)).collect(),
            valid: bytes[cut..].iter().map(|&b| u32::from(b)).collect(),
        }
    }

    /// Character-level corpus of `text`; the split is by characters.
    pub fn from_text_chars(text: &str, valid_fraction: f64) -> Self {
        let n_chars = text.chars().count();
        let cut_chars = split_point(n_chars, valid_fraction);
        let cut = text
            .char_indices()
            .nth(cut_chars)
            .map_or(text.len(), |(i, _)| i);
        let (train, valid) = text.split_at(cut);
        let tokenizer = Tokenizer::char_level(train, valid);
        TextCorpus {
            train: tokenizer.encode(train),
            valid: tokenizer.encode(valid),
            tokenizer,
        }
    }
}

/// Index where the validation part starts.
fn split_point(len: usize, valid_fraction: f64) -> usize {
    let valid = (len as f64 * valid_fraction).round() as usize;
    len - valid.min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_split_is_contiguous_and_complete() {
        let text = b"abcdefghij";
        let c = TextCorpus::from_bytes(text, 0.2);
        assert_eq!(
            c.train,
            b"abcdefgh".iter().map(|&b| b as u32).collect::<Vec<_>>()
        );
        assert_eq!(c.valid, vec![b'i' as u32, b'j' as u32]);
        assert_eq!(c.tokenizer.vocab_size(), 256);
    }

    #[test]
    fn char_vocab_comes_from_train_split_and_round_trips() {
        let c = TextCorpus::from_text_chars("ééaab|cz", 0.25);
        // train = "ééaab|", valid = "cz": both unseen, so an unknown id exists.
        let Tokenizer::Char { chars, unknown } = &c.tokenizer else {
            panic!("char level")
        };
        assert_eq!(chars, &vec!['a', 'b', '|', 'é']);
        assert!(unknown);
        assert_eq!(c.tokenizer.vocab_size(), 5);
        assert_eq!(c.valid, vec![4, 4]);
        assert_eq!(c.tokenizer.decode(&c.train), "ééaab|");
    }

    #[test]
    fn char_vocab_has_no_unknown_when_valid_is_covered() {
        let c = TextCorpus::from_text_chars("abcabcab", 0.25);
        assert_eq!(c.tokenizer.vocab_size(), 3);
        assert_eq!(c.tokenizer.decode(&c.valid), "ab");
    }

    #[test]
    fn not_utf8_is_an_error_naming_the_offset() {
        let dir = std::env::temp_dir().join(format!("mixlab-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.txt");
        std::fs::write(&path, [b'a', b'b', 0xff, b'c']).unwrap();
        let err = TextCorpus::load(&path, Level::Char, 0.1).unwrap_err();
        assert!(err.to_string().contains("offset 2"), "{err}");
        assert!(TextCorpus::load(&path, Level::Byte, 0.1).is_ok());
    }
}
