//! Mixlab's tokenizers as Hugging Face `tokenizer.json` files (built with the `tokenizers`
//! crate), so that `AutoTokenizer.from_pretrained` on an exported model gives Mixlab's ids:
//!
//! - byte level: GPT-2's byte-to-character map (a `ByteLevel` pre-tokenizer without its split
//!   pattern, so the whole text is one piece) and a BPE model of the 256 byte characters with no
//!   merges: id = byte value;
//! - char level: a BPE model of the alphabet with no merges over the whole text (no
//!   pre-tokenizer): id = the character's rank; unseen characters map to `[UNK]`, Mixlab's
//!   unknown id, when the vocabulary has one;
//! - word level: every newline replaced by ` <eos> ` (Mixlab ends each line with `<eos>`), then
//!   a whitespace split and a word-level model of the vocabulary, `<unk>` for unseen words;
//! - BPE: the run's own tokenizer.
//!
//! Under the masked objective the model has one more id, `[MASK]` (the last); it is added as a
//! special token, so it gets that id.

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::text::{EOS, Tokenizer, UNK};

/// The token of the masked objective's extra id.
pub const MASK: &str = "[MASK]";
/// The token of the char level's unknown id.
pub const CHAR_UNK: &str = "[UNK]";

/// GPT-2's map from bytes to printable characters (`bytes_to_unicode` in its `encoder.py`):
/// printable Latin-1 bytes map to themselves, the rest to `U+0100` onwards in byte order.
pub fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
        };
    }
    out
}

impl Tokenizer {
    /// This tokenizer as a Hugging Face tokenizer giving the same ids, with `[MASK]` as the
    /// id after the vocabulary when `mask` is set (the masked objective's extra id).
    pub fn to_hf(&self, mask: bool) -> Result<HfTokenizer, tokenizers::Error> {
        let mut hf = match self {
            Tokenizer::Byte => {
                let vocab: Vocab = byte_chars()
                    .iter()
                    .enumerate()
                    .map(|(b, c)| (c.to_string(), b as u32))
                    .collect();
                let model = BPE::builder().vocab_and_merges(vocab, vec![]).build()?;
                let mut hf = HfTokenizer::new(model);
                hf.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
                hf.with_decoder(Some(ByteLevel::new(false, false, false)));
                hf
            }
            Tokenizer::Char { chars, unknown } => {
                let mut vocab: Vocab = chars
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.to_string(), i as u32))
                    .collect();
                let mut builder = BPE::builder();
                if *unknown {
                    vocab.insert(CHAR_UNK.to_string(), chars.len() as u32);
                    builder = builder.unk_token(CHAR_UNK.to_string());
                }
                let model = builder.vocab_and_merges(vocab, vec![]).build()?;
                let mut hf = HfTokenizer::new(model);
                hf.with_decoder(Some(Fuse::new()));
                hf
            }
            Tokenizer::Word(words) => {
                let vocab: Vocab = (0..words.len() as u32)
                    .map(|i| (words.word(i).expect("in range").to_string(), i))
                    .collect();
                let model = WordLevel::builder()
                    .vocab(vocab)
                    .unk_token(UNK.to_string())
                    .build()?;
                let mut hf = HfTokenizer::new(model);
                hf.with_normalizer(Some(Replace::new("\n", format!(" {EOS} "))?))?;
                hf.with_pre_tokenizer(Some(WhitespaceSplit));
                hf
            }
            Tokenizer::Bpe(bpe) => bpe.hf().clone(),
        };
        if mask {
            let before = hf.get_vocab_size(true);
            hf.add_special_tokens([AddedToken::from(MASK, true)])?;
            debug_assert_eq!(hf.token_to_id(MASK), Some(before as u32));
        }
        Ok(hf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::WordVocab;

    fn hf_ids(hf: &HfTokenizer, text: &str) -> Vec<u32> {
        hf.encode(text, false).unwrap().get_ids().to_vec()
    }

    /// Written to JSON and read back (as `transformers` reads it), each level's Hugging Face
    /// tokenizer encodes text to Mixlab's ids, and `[MASK]` is the id after the vocabulary.
    #[test]
    fn hugging_face_tokenizers_give_mixlabs_ids() {
        let train = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";
        let text = "All:\nspeak we further, First\n\nBefore me speak any\n";
        let char_level = Tokenizer::char_level(train, "Zebra ü\n");
        let word_level = Tokenizer::Word(WordVocab::from_train(&format!("{train}{UNK} {UNK}\n")));
        let bpe = Tokenizer::Bpe(crate::Bpe::train(&train.repeat(20), 300).unwrap());
        let cases = [
            (
                "byte",
                Tokenizer::Byte,
                "naïve café\tdéjà vu\r\n\u{1F600} end".to_string(),
            ),
            ("char", char_level, format!("{text}Zebra ü")),
            ("word", word_level, format!("{text}unseen words here\n")),
            ("bpe", bpe, format!("{text}  tabs\tand ünïcode\n")),
        ];
        for (name, tokenizer, sample) in cases {
            for mask in [false, true] {
                let json = tokenizer.to_hf(mask).unwrap().to_string(false).unwrap();
                let hf: HfTokenizer = json.parse().unwrap();
                let want = tokenizer.encode(&sample);
                assert!(want.len() > 5, "{name}: {want:?}");
                assert_eq!(
                    hf_ids(&hf, &sample),
                    want,
                    "{name} (mask {mask}): {sample:?}"
                );
                let size = tokenizer.vocab_size();
                assert_eq!(hf.get_vocab_size(true), size + usize::from(mask), "{name}");
                if mask {
                    assert_eq!(hf.token_to_id(MASK), Some(size as u32), "{name}");
                    let with_mask = format!("{}{MASK}", &sample[..1]);
                    let ids = hf_ids(&hf, &with_mask);
                    assert_eq!(ids.last(), Some(&(size as u32)), "{name}: {ids:?}");
                }
            }
        }
    }

    #[test]
    fn byte_chars_are_gpt2s_map() {
        let chars = byte_chars();
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], 'Ġ'); // U+0120: GPT-2's space
        assert_eq!(chars[b'\n' as usize], 'Ċ'); // U+010A
        assert_eq!(chars[0], '\u{100}');
        let distinct: std::collections::BTreeSet<char> = chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
