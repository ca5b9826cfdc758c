//! Tokenisation: byte, character and word level, and byte-level BPE (`bpe.rs`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::bpe::Bpe;

/// A tokenised corpus with its splits (what `catalogue::load` returns and `cache` stores).
#[derive(Debug, Clone)]
pub struct Splits {
    /// How the text was tokenised.
    pub tokenizer: Tokenizer,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub valid: Vec<u32>,
    /// Test tokens (`None` when the corpus has no test split, e.g. tiny-shakespeare).
    pub test: Option<Vec<u32>>,
}

/// Tokenisation level of a text corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// One token per byte; vocabulary 256; works for any file.
    Byte,
    /// One token per Unicode scalar value seen in the training split.
    Char,
    /// One token per whitespace-separated word, `<eos>` after every line (blank lines too).
    Word,
    /// Byte-level BPE (GPT-2's tokenisation): trained on the training split
    /// (`data.bpe_vocab_size`) or loaded from `data.tokenizer`; newlines are bytes like any.
    Bpe,
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
        /// Whether an extra id for unseen characters exists (only when the held-out splits
        /// have characters the training split lacks).
        unknown: bool,
    },
    /// Word level: the training split's words, most frequent first.
    Word(WordVocab),
    /// Byte-level BPE.
    Bpe(Bpe),
}

impl Tokenizer {
    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Char { chars, unknown } => chars.len() + usize::from(*unknown),
            Tokenizer::Word(v) => v.len(),
            Tokenizer::Bpe(b) => b.vocab_size(),
        }
    }

    /// A char-level tokenizer for `train`, with an unknown id only if `held_out` needs one.
    pub fn char_level(train: &str, held_out: &str) -> Self {
        let chars: Vec<char> = train.chars().collect::<BTreeSet<_>>().into_iter().collect();
        let unknown = held_out.chars().any(|c| chars.binary_search(&c).is_err());
        Tokenizer::Char { chars, unknown }
    }

    /// Token ids of `text` (bytes of its UTF-8 encoding at byte level; unknown words map to
    /// `<unk>` when the vocabulary has it, else are dropped — use [`WordVocab::encode_lines`]
    /// for a strict, located error).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Byte => text.bytes().map(u32::from).collect(),
            Tokenizer::Char { chars, .. } => text
                .chars()
                .map(|c| chars.binary_search(&c).unwrap_or(chars.len()) as u32)
                .collect(),
            Tokenizer::Word(v) => text
                .lines()
                .flat_map(|line| line.split_whitespace().chain([EOS]))
                .filter_map(|w| v.id(w).or(v.unk))
                .collect(),
            Tokenizer::Bpe(b) => b.encode(text),
        }
    }

    /// Text of `ids` (lossy for byte sequences that are not UTF-8 — bytes, BPE tokens that end
    /// inside a character; `�` for unknown ids; words joined by spaces with `<eos>` as a
    /// newline).
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
            Tokenizer::Word(v) => {
                let mut out = String::new();
                for &i in ids {
                    match v.word(i) {
                        Some(EOS) => out.push('\n'),
                        Some(w) => {
                            if !out.is_empty() && !out.ends_with('\n') {
                                out.push(' ');
                            }
                            out.push_str(w);
                        }
                        None => out.push('\u{FFFD}'),
                    }
                }
                out
            }
            Tokenizer::Bpe(b) => b.decode(ids),
        }
    }
}

/// The end-of-line token of word-level corpora.
pub const EOS: &str = "<eos>";
/// The unknown-word token, when a corpus defines it (PTB, WikiText).
pub const UNK: &str = "<unk>";

/// A word vocabulary: the training split's words, `<eos>` and `<unk>` among them, most
/// frequent first (ties in order of first appearance), so that an adaptive softmax's cutoffs
/// cut at frequency ranks (Transformer-XL's and adaptive-span's vocabularies are ordered so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WordList", into = "WordList")]
pub struct WordVocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
    unk: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct WordList {
    words: Vec<String>,
}

impl From<WordList> for WordVocab {
    fn from(list: WordList) -> Self {
        let index: HashMap<String, u32> = list
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        let unk = index.get(UNK).copied();
        WordVocab {
            words: list.words,
            index,
            unk,
        }
    }
}

impl From<WordVocab> for WordList {
    fn from(v: WordVocab) -> Self {
        WordList { words: v.words }
    }
}

impl WordVocab {
    /// The vocabulary of a training text: every word and `<eos>` (one per line), by count
    /// descending, ties in order of first appearance — the same ids on every run.
    pub fn from_train(text: &str) -> Self {
        // (word, count) in order of first appearance.
        let mut counts: Vec<(&str, u64)> = vec![];
        let mut index: HashMap<&str, usize> = HashMap::new();
        for line in text.lines() {
            for w in line.split_whitespace().chain([EOS]) {
                let at = *index.entry(w).or_insert_with(|| {
                    counts.push((w, 0));
                    counts.len() - 1
                });
                counts[at].1 += 1;
            }
        }
        // A stable sort keeps first appearance among equal counts.
        counts.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
        let words = counts.into_iter().map(|(w, _)| w.to_string()).collect();
        WordList { words }.into()
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Id of `word`.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// Word of `id`.
    pub fn word(&self, id: u32) -> Option<&str> {
        self.words.get(id as usize).map(String::as_str)
    }

    /// Ids of every line's words plus `<eos>`. A word outside the vocabulary maps to `<unk>`
    /// when the vocabulary has it, else is an error naming the word, split, file and line.
    pub fn encode_lines(
        &self,
        text: &str,
        split: &'static str,
        path: &Path,
    ) -> Result<Vec<u32>, DataError> {
        let mut ids = Vec::with_capacity(text.len() / 5);
        for (n, line) in text.lines().enumerate() {
            for w in line.split_whitespace().chain([EOS]) {
                match self.id(w).or(self.unk) {
                    Some(id) => ids.push(id),
                    None => {
                        return Err(DataError::UnknownWord {
                            word: w.to_string(),
                            split,
                            path: path.to_path_buf(),
                            line: n + 1,
                        });
                    }
                }
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_vocab_comes_from_train_and_round_trips() {
        let tok = Tokenizer::char_level("ééaab|", "cz");
        let Tokenizer::Char { chars, unknown } = &tok else {
            panic!("char level")
        };
        assert_eq!(chars, &vec!['a', 'b', '|', 'é']);
        assert!(unknown, "held-out characters need an unknown id");
        assert_eq!(tok.vocab_size(), 5);
        assert_eq!(tok.encode("cz"), vec![4, 4]);
        assert_eq!(tok.decode(&tok.encode("ééaab|")), "ééaab|");
        assert_eq!(Tokenizer::char_level("abcabc", "ab").vocab_size(), 3);
    }

    /// Most frequent first, ties in order of first appearance, the same on every build.
    #[test]
    fn word_vocab_is_ordered_by_frequency() {
        let text = "b a c\na b a\n\nc d e\n";
        let v = WordVocab::from_train(text);
        // <eos> 4, a 3, b 2, c 2 (b first), d 1, e 1 (d first).
        let words: Vec<&str> = (0..v.len() as u32).map(|i| v.word(i).unwrap()).collect();
        assert_eq!(words, [EOS, "a", "b", "c", "d", "e"]);
        assert_eq!(WordVocab::from_train(text), v);
    }

    #[test]
    fn word_vocab_appends_eos_to_every_line_including_blank_ones() {
        let v = WordVocab::from_train(" the cat \n \n the dog \n");
        assert_eq!(v.len(), 4, "<eos> the cat dog");
        let ids = v
            .encode_lines(" the cat \n \n the dog \n", "train", Path::new("x"))
            .unwrap();
        assert_eq!(ids.len(), 3 + 1 + 3);
        assert_eq!(ids[3], v.id(EOS).unwrap());
        let tok = Tokenizer::Word(v);
        assert_eq!(tok.decode(&ids), "the cat\n\nthe dog\n");
        let json = serde_json::to_string(&tok).unwrap();
        assert_eq!(serde_json::from_str::<Tokenizer>(&json).unwrap(), tok);
    }
}
