//! Byte-level BPE (`data.level = "bpe"`), GPT-2's tokenisation, through Hugging Face's
//! `tokenizers` crate: trained on the training split with a vocabulary size from the config,
//! or loaded from a `tokenizer.json`. Text is tokenised in chunks cut where GPT-2's split
//! pattern cuts anyway (before the last whitespace character of a run), so the ids are those
//! of the whole text in one call, in parallel and in bounded memory.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{TokenizerBuilder, TokenizerImpl};

use crate::DataError;

/// Bytes a byte-level BPE starts from: its vocabulary is at least this large.
pub const BYTE_ALPHABET: usize = 256;

/// Text handed to the tokenizer per call (cut at the next safe boundary past it).
const CHUNK: usize = 1 << 16;

/// How a BPE level gets its tokenizer (`[data]` `bpe_vocab_size` and `tokenizer`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BpeSettings {
    /// Train on the training split to this many tokens (bytes + merges).
    pub vocab_size: usize,
    /// Or load this `tokenizer.json` (any Hugging Face tokenizer; `vocab_size` is ignored).
    pub tokenizer: Option<PathBuf>,
}

impl BpeSettings {
    /// What the cache key records: the vocabulary size, or the loaded file.
    pub fn describe(&self) -> String {
        match &self.tokenizer {
            Some(path) => format!("bpe from {}", path.display()),
            None => format!("bpe {}", self.vocab_size),
        }
    }
}

/// A byte-level BPE tokenizer as Hugging Face's `tokenizer.json` holds it (saved with a run
/// inside Mixlab's own `tokenizer.json`), parsed once per process on first use.
#[derive(Clone, Serialize, Deserialize)]
pub struct Bpe {
    /// The Hugging Face tokenizer's JSON.
    pub tokenizer: serde_json::Value,
    #[serde(skip)]
    parsed: OnceLock<Arc<tokenizers::Tokenizer>>,
}

impl PartialEq for Bpe {
    fn eq(&self, other: &Self) -> bool {
        self.tokenizer == other.tokenizer
    }
}

impl Eq for Bpe {}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe({} tokens)", self.vocab_size())
    }
}

impl Bpe {
    /// Train a byte-level BPE of `vocab_size` tokens (the 256 bytes and the most frequent
    /// merges; fewer when the text runs out of pairs) on `text`. The same text and size give
    /// the same tokenizer on every run.
    pub fn train(text: &str, vocab_size: usize) -> Result<Self, DataError> {
        if vocab_size < BYTE_ALPHABET {
            return Err(DataError::Invalid {
                field: "bpe_vocab_size",
                message: format!(
                    "{vocab_size} is smaller than the byte alphabet a byte-level BPE starts \
                     from: use at least {BYTE_ALPHABET} (GPT-2: 50257)"
                ),
            });
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        // GPT-2's: no prefix space, offsets trimmed, its split pattern.
        let byte_level = || ByteLevel::new(false, true, true);
        let mut tokenizer: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level().into()))
            .with_post_processor(Some(byte_level().into()))
            .with_decoder(Some(byte_level().into()))
            .build()
            .map_err(|e| invalid(format!("cannot build a BPE tokenizer: {e}")))?;
        tokenizer
            .train(&mut trainer, chunks(text).into_iter())
            .map_err(|e| invalid(format!("BPE training failed: {e}")))?;
        let json = tokenizer
            .to_string(false)
            .map_err(|e| invalid(format!("cannot serialise the BPE tokenizer: {e}")))?;
        Self::from_json(&json, "the trained BPE")
    }

    /// Load a Hugging Face `tokenizer.json`; errors name the file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    fn from_json(json: &str, what: &str) -> Result<Self, DataError> {
        let parsed = tokenizers::Tokenizer::from_str(json).map_err(|e| DataError::Invalid {
            field: "tokenizer",
            message: format!("{what} is not a Hugging Face tokenizer.json: {e}"),
        })?;
        let tokenizer = serde_json::from_str(json).map_err(|e| DataError::Invalid {
            field: "tokenizer",
            message: format!("{what}: {e}"),
        })?;
        let bpe = Bpe {
            tokenizer,
            parsed: OnceLock::new(),
        };
        let _ = bpe.parsed.set(Arc::new(parsed));
        Ok(bpe)
    }

    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        self.parsed.get_or_init(|| {
            Arc::new(
                tokenizers::Tokenizer::from_str(&self.tokenizer.to_string())
                    .expect("a BPE tokenizer that was valid when it was saved"),
            )
        })
    }

    /// Number of token ids (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.hf().get_vocab_size(true)
    }

    /// Token ids of `text`, chunk by chunk in parallel: the ids of the whole text in one call.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let tokenizer = self.hf();
        let pieces = chunks(text);
        let encodings = tokenizer
            .encode_batch(pieces, false)
            .expect("byte-level BPE encodes any text");
        encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().copied())
            .collect()
    }

    /// Text of `ids` (lossy where they end inside a UTF-8 character).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.hf().decode(ids, false).unwrap_or_default()
    }
}

fn invalid(message: String) -> DataError {
    DataError::Invalid {
        field: "level",
        message,
    }
}

/// `text` cut into pieces of about [`CHUNK`] bytes, each cut before the last whitespace
/// character of a run that a non-whitespace character follows. GPT-2's pattern ends a
/// pre-token there (the run's other characters are one pre-token, `\s+(?!\S)`; the last goes
/// with what follows, or stands alone if it is not a space), nothing in the pattern looks back,
/// and a piece's trailing whitespace is then exactly that one pre-token: so the pieces
/// tokenise to the ids of the whole.
pub fn chunks(text: &str) -> Vec<&str> {
    let safe = |at: usize| {
        let mut rest = text[at..].chars();
        rest.next().is_some_and(char::is_whitespace)
            && rest.next().is_some_and(|c| !c.is_whitespace())
    };
    let mut out = vec![];
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + CHUNK).min(text.len());
        while end < text.len() && !(text.is_char_boundary(end) && safe(end)) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few hundred lines of English-like text with blank lines, runs of spaces and
    /// non-ASCII characters.
    fn sample_text() -> String {
        let words = [
            "the", "model", "reads", "a", "stream", "of", "tokens", "and", "predicts", "next",
            "café", "naïve", "—", "42", "isn't", "",
        ];
        let mut state = 99u64;
        let mut text = String::new();
        for line in 0..400 {
            for _ in 0..(line % 11) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(words[(state >> 33) as usize % words.len()]);
                text.push_str(if (state >> 20).is_multiple_of(5) {
                    "  "
                } else {
                    " "
                });
            }
            text.push('\n');
            if line % 7 == 0 {
                text.push_str("\n \n");
            }
        }
        text
    }

    /// Chunks cover the text exactly, each ends at a safe boundary, and tokenising them gives
    /// the ids of the whole text in one call.
    #[test]
    fn chunked_encoding_equals_encoding_the_whole_text() {
        let text = sample_text().repeat(40); // > 2 chunks
        let pieces = chunks(&text);
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        assert_eq!(pieces.concat(), text);
        let bpe = Bpe::train(&sample_text(), 400).unwrap();
        let whole = bpe.hf().encode(text.as_str(), false).unwrap();
        let got = bpe.encode(&text);
        assert_eq!(got, whole.get_ids());
    }

    /// The same on a real text whose lines start with a space (WikiText-2's valid split,
    /// 1.1 MB: 17 pieces) with a BPE trained on it.
    #[test]
    fn chunked_encoding_of_wikitext_equals_encoding_it_whole() {
        let path = crate::crate_dir().join("../../../shared/datasets/wikitext-2/wiki.valid.tokens");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipped: {} is absent", path.display());
            return;
        };
        assert!(chunks(&text).len() > 10);
        let bpe = Bpe::train(&text, 2000).unwrap();
        let whole = bpe.hf().encode(text.as_str(), false).unwrap();
        assert_eq!(bpe.encode(&text), whole.get_ids());
        assert_eq!(bpe.decode(whole.get_ids()), text);
    }

    /// Training gives the requested size, the same tokenizer twice, and a lossless round trip
    /// (byte level: any text, also characters never seen in training).
    #[test]
    fn a_trained_bpe_is_deterministic_and_round_trips_any_text() {
        let text = sample_text();
        let a = Bpe::train(&text, 300).unwrap();
        let b = Bpe::train(&text, 300).unwrap();
        assert_eq!(a, b, "same text, same tokenizer");
        assert_eq!(a.vocab_size(), 300);
        let ids = a.encode(&text);
        assert!(ids.len() < text.len() / 2, "merges compress: {}", ids.len());
        assert!(ids.iter().all(|&i| (i as usize) < a.vocab_size()));
        assert_eq!(a.decode(&ids), text);
        let unseen = "Ωμέγα 日本語 \t tabs\r\n";
        assert_eq!(a.decode(&a.encode(unseen)), unseen);
        // Serialised with a run and read back: the same tokenizer, the same ids.
        let json = serde_json::to_string(&a).unwrap();
        let back: Bpe = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.encode(&text), ids);
    }

    /// A size below the byte alphabet is refused naming the key; a tokenizer.json loads
    /// (a saved one gives the same ids) and a broken one is refused naming the file.
    #[test]
    fn bad_sizes_and_files_name_the_key() {
        let err = Bpe::train("abc", 255).unwrap_err().to_string();
        assert!(
            err.contains("data.bpe_vocab_size") && err.contains("256"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("mixlab-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bpe = Bpe::train(&sample_text(), 300).unwrap();
        let path = dir.join("tokenizer.json");
        bpe.hf().save(&path, false).unwrap();
        let loaded = Bpe::load(&path).unwrap();
        assert_eq!(
            loaded.encode("the model reads"),
            bpe.encode("the model reads")
        );
        std::fs::write(&path, "{\"not\": 1}").unwrap();
        let err = Bpe::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("data.tokenizer") && err.contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
