//! The corpus catalogue: every named corpus, where its files land, how it is tokenised and
//! split (the literature's protocols), and the loader that applies them.
//!
//! | corpus | level | split |
//! |---|---|---|
//! | `enwik8` | byte | first 90% / next 5% / last 5% (90M / 5M / 5M of the 100M file) |
//! | `text8` | char | 90% / 5% / 5% |
//! | `wikitext-2`, `wikitext-103` | word | the given `wiki.{train,valid,test}.tokens`, `<eos>` after every line, blank lines included |
//! | `wikitext-2-raw`, `wikitext-103-raw` | byte or char | the given `wiki.*.raw` |
//! | `ptb` | word | `ptb.{train,valid,test}.txt`, `<eos>` after every line |
//! | `ptb-char` | symbol | `ptb.char.{train,valid,test}.txt`, space-separated symbols, `<eos>` after every line |
//! | `tinyshakespeare` | char | first 90% / last 10% (nanoGPT), no test split |
//! | `text` | byte, char or word | any file (or the files of a directory, sorted), by `valid_fraction` / `test_fraction` |

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::bpe::{Bpe, BpeSettings};
use crate::text::{Level, Splits, Tokenizer, WordVocab};

/// The corpora `[data] corpus = ...` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Corpus {
    /// Synthetic copy task (no file).
    Copy,
    /// Any local text file or directory.
    Text,
    /// Hutter's enwik8 (first 10⁸ bytes of an English Wikipedia dump), byte level.
    Enwik8,
    /// Mahoney's text8 (enwik9 cleaned to a–z and space), character level.
    Text8,
    /// WikiText-2, word level (`wiki.*.tokens`).
    #[serde(rename = "wikitext-2")]
    Wikitext2,
    /// WikiText-103, word level (`wiki.*.tokens`).
    #[serde(rename = "wikitext-103")]
    Wikitext103,
    /// WikiText-2 raw text (`wiki.*.raw`), byte or char level.
    #[serde(rename = "wikitext-2-raw")]
    Wikitext2Raw,
    /// WikiText-103 raw text (`wiki.*.raw`), byte or char level.
    #[serde(rename = "wikitext-103-raw")]
    Wikitext103Raw,
    /// Mikolov's Penn Treebank, word level.
    Ptb,
    /// Mikolov's Penn Treebank, character level.
    #[serde(rename = "ptb-char")]
    PtbChar,
    /// Karpathy's tiny-shakespeare, character level.
    Tinyshakespeare,
}

/// How a corpus is cut into splits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// One file, cut by percentages (train, valid; test gets the rest).
    OneFile {
        file: &'static [&'static str],
        train_pct: usize,
        valid_pct: usize,
    },
    /// One file per split; each entry lists accepted file names, first is canonical.
    Files {
        train: &'static [&'static str],
        valid: &'static [&'static str],
        test: &'static [&'static str],
    },
}

/// Where and how a named corpus lives.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spec {
    dir: &'static str,
    layout: Layout,
    /// Fixed level, or `None` when `data.level` chooses (raw corpora).
    level: Option<Level>,
}

impl Corpus {
    /// The name used in configs and as the folder under `datasets/`.
    pub fn name(self) -> &'static str {
        match self {
            Corpus::Copy => "copy",
            Corpus::Text => "text",
            Corpus::Enwik8 => "enwik8",
            Corpus::Text8 => "text8",
            Corpus::Wikitext2 => "wikitext-2",
            Corpus::Wikitext103 => "wikitext-103",
            Corpus::Wikitext2Raw => "wikitext-2-raw",
            Corpus::Wikitext103Raw => "wikitext-103-raw",
            Corpus::Ptb => "ptb",
            Corpus::PtbChar => "ptb-char",
            Corpus::Tinyshakespeare => "tinyshakespeare",
        }
    }

    fn spec(self) -> Option<Spec> {
        const TOKENS: Layout = Layout::Files {
            train: &["wiki.train.tokens"],
            valid: &["wiki.valid.tokens"],
            test: &["wiki.test.tokens"],
        };
        const RAW: Layout = Layout::Files {
            train: &["wiki.train.raw"],
            valid: &["wiki.valid.raw"],
            test: &["wiki.test.raw"],
        };
        let (layout, level) = match self {
            Corpus::Copy | Corpus::Text => return None,
            Corpus::Enwik8 => (
                Layout::OneFile {
                    file: &["enwik8"],
                    train_pct: 90,
                    valid_pct: 5,
                },
                Some(Level::Byte),
            ),
            Corpus::Text8 => (
                Layout::OneFile {
                    file: &["text8"],
                    train_pct: 90,
                    valid_pct: 5,
                },
                Some(Level::Char),
            ),
            Corpus::Tinyshakespeare => (
                Layout::OneFile {
                    file: &["input.txt"],
                    train_pct: 90,
                    valid_pct: 10,
                },
                Some(Level::Char),
            ),
            Corpus::Wikitext2 | Corpus::Wikitext103 => (TOKENS, Some(Level::Word)),
            Corpus::Wikitext2Raw | Corpus::Wikitext103Raw => (RAW, None),
            Corpus::Ptb => (
                Layout::Files {
                    train: &["ptb.train.txt"],
                    valid: &["ptb.valid.txt"],
                    test: &["ptb.test.txt"],
                },
                Some(Level::Word),
            ),
            Corpus::PtbChar => (
                Layout::Files {
                    train: &["ptb.char.train.txt", "train.txt"],
                    valid: &["ptb.char.valid.txt", "valid.txt"],
                    test: &["ptb.char.test.txt", "test.txt"],
                },
                Some(Level::Word),
            ),
        };
        Some(Spec {
            dir: self.name(),
            layout,
            level,
        })
    }

    /// The tokenisation level this corpus uses, given the configured one: the corpus's own
    /// (word for WikiText and PTB, char for tiny-shakespeare and text8, …) unless `bpe` is
    /// configured, which any text takes.
    pub fn level(self, configured: Level) -> Level {
        if configured == Level::Bpe {
            return Level::Bpe;
        }
        self.spec().and_then(|s| s.level).unwrap_or(configured)
    }

    /// Whether losses on this corpus are reported as perplexity (per word at word level, per
    /// token with BPE) rather than bpc.
    pub fn reports_perplexity(self, configured: Level) -> bool {
        // ptb-char is tokenised by the word tokenizer (its symbols are space-separated), but
        // its tokens are characters: report bits per character.
        match self.level(configured) {
            Level::Word => self != Corpus::PtbChar,
            Level::Bpe => true,
            Level::Byte | Level::Char => false,
        }
    }
}

/// What [`load`] needs to know.
#[derive(Debug, Clone)]
pub struct LoadRequest<'a> {
    /// Which corpus.
    pub corpus: Corpus,
    /// Folder of a named corpus, or the file / directory for `text`.
    pub path: &'a Path,
    /// Level for `text` and the raw corpora (`bpe`: any text corpus).
    pub level: Level,
    /// How a `bpe` level gets its tokenizer.
    pub bpe: BpeSettings,
    /// `text` only: fraction held out for validation (after train).
    pub valid_fraction: f64,
    /// `text` only: fraction held out for test (at the end).
    pub test_fraction: f64,
}

/// The folder a named corpus is expected in, under `root`.
pub fn corpus_dir(root: &Path, corpus: Corpus) -> PathBuf {
    root.join(corpus.name())
}

/// The source files of a request, in split order (one file, three split files, or a
/// directory's files sorted).
pub fn sources(req: &LoadRequest) -> Result<Vec<PathBuf>, DataError> {
    match req.corpus.spec().map(|s| s.layout) {
        None => {
            let path = req.path;
            if path.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|source| DataError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file())
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(DataError::Empty {
                        path: path.to_path_buf(),
                    });
                }
                Ok(files)
            } else {
                Ok(vec![path.to_path_buf()])
            }
        }
        // `data.path` may name the file itself rather than its folder.
        Some(Layout::OneFile { .. }) if req.path.is_file() => Ok(vec![req.path.to_path_buf()]),
        Some(Layout::OneFile { file, .. }) => Ok(vec![find(req.path, file, req.corpus)?]),
        Some(Layout::Files { train, valid, test }) => [train, valid, test]
            .into_iter()
            .map(|names| find(req.path, names, req.corpus))
            .collect(),
    }
}

/// Load and split a corpus per its protocol, through the token cache in `cache_dir`: a valid
/// cache is memory-mapped instead of tokenising; a damaged one is reported through `notify`
/// and rebuilt; a cache that cannot be written (a read-only folder) is reported and skipped.
pub fn load_cached(
    req: &LoadRequest,
    cache_dir: &Path,
    notify: &mut dyn FnMut(String),
) -> Result<Splits, DataError> {
    let mut srcs = sources(req)?;
    let level = req.corpus.level(req.level);
    let mut settings = format!(
        "{}|{:?}|{}|{}",
        req.corpus.name(),
        level,
        req.valid_fraction,
        req.test_fraction
    );
    if level == Level::Bpe {
        // The vocabulary size, or the loaded tokenizer file (fingerprinted like a source).
        settings.push_str(&format!("|{}", req.bpe.describe()));
        srcs.extend(req.bpe.tokenizer.clone());
    }
    let dir = crate::cache::entry_dir(cache_dir, req.corpus.name(), &settings, &srcs);
    match crate::cache::load(&dir) {
        Ok(splits) => return Ok(splits),
        Err(crate::cache::Stale::Absent) => {}
        Err(crate::cache::Stale::Invalid(why)) => {
            notify(format!("rebuilding the token cache ({why})"))
        }
    }
    let splits = load(req)?;
    if let Err(e) = crate::cache::store(&dir, &splits) {
        notify(format!(
            "cannot write the token cache in {} ({e}); continuing without it",
            dir.display()
        ));
    }
    Ok(splits)
}

/// Load and split a corpus per its protocol (no cache).
pub fn load(req: &LoadRequest) -> Result<Splits, DataError> {
    let srcs = sources(req)?;
    let Some(spec) = req.corpus.spec() else {
        let mut bytes = vec![];
        for f in &srcs {
            bytes.extend(read(f)?);
        }
        let (v, t) = (req.valid_fraction, req.test_fraction);
        let pieces = cut_fraction(&bytes, req.level, req.path, 1.0 - v - t, v)?;
        return tokenize_pieces(req.level, &req.bpe, pieces, req.path, t > 0.0);
    };
    let level = req.corpus.level(req.level);
    match spec.layout {
        Layout::OneFile {
            train_pct,
            valid_pct,
            ..
        } => {
            let path = &srcs[0];
            let bytes = read(path)?;
            let pieces = cut_percent(&bytes, level, path, train_pct, valid_pct)?;
            tokenize_pieces(level, &req.bpe, pieces, path, train_pct + valid_pct < 100)
        }
        Layout::Files { .. } => {
            let texts = srcs
                .iter()
                .map(|p| read(p))
                .collect::<Result<Vec<_>, _>>()?;
            let paths: Vec<&Path> = srcs.iter().map(PathBuf::as_path).collect();
            split_files(level, &req.bpe, [&texts[0], &texts[1], &texts[2]], &paths)
        }
    }
}

/// The first existing file among `names` in `dir`.
fn find(dir: &Path, names: &[&str], corpus: Corpus) -> Result<PathBuf, DataError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::Missing {
            corpus: corpus.name(),
            path: dir.join(names[0]),
        })
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn utf8<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.valid_up_to(),
    })
}

/// Cut at `train_pct` and `train_pct + valid_pct` percent of the units of `level` (bytes, or
/// characters), with exact integer arithmetic (enwik8: 90,000,000 / 5,000,000 / 5,000,000).
fn cut_percent<'a>(
    bytes: &'a [u8],
    level: Level,
    path: &Path,
    train_pct: usize,
    valid_pct: usize,
) -> Result<[&'a [u8]; 3], DataError> {
    let units = unit_offsets(bytes, level, path)?;
    let n = units.len() - 1;
    let a = n * train_pct / 100;
    let b = (n * (train_pct + valid_pct) / 100).min(n);
    Ok([
        &bytes[..units[a]],
        &bytes[units[a]..units[b]],
        &bytes[units[b]..],
    ])
}

/// Cut by fractions (nanoGPT's `int(n * 0.9)` for the train part).
fn cut_fraction<'a>(
    bytes: &'a [u8],
    level: Level,
    path: &Path,
    train: f64,
    valid: f64,
) -> Result<[&'a [u8]; 3], DataError> {
    let units = unit_offsets(bytes, level, path)?;
    let n = units.len() - 1;
    let a = ((n as f64 * train).floor() as usize).min(n);
    let b = ((n as f64 * (train + valid)).floor() as usize).clamp(a, n);
    Ok([
        &bytes[..units[a]],
        &bytes[units[a]..units[b]],
        &bytes[units[b]..],
    ])
}

/// Byte offsets of unit boundaries (`len + 1` entries): every byte at byte level, every char
/// start at char level (and for BPE, which cuts where char level does), every line start at
/// word level (words split within lines).
fn unit_offsets(bytes: &[u8], level: Level, path: &Path) -> Result<Vec<usize>, DataError> {
    Ok(match level {
        Level::Byte => (0..=bytes.len()).collect(),
        Level::Char | Level::Bpe => {
            let text = utf8(bytes, path)?;
            text.char_indices()
                .map(|(i, _)| i)
                .chain([bytes.len()])
                .collect()
        }
        Level::Word => {
            utf8(bytes, path)?;
            std::iter::once(0)
                .chain(
                    bytes
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| **b == b'\n')
                        .map(|(i, _)| i + 1),
                )
                .filter(|&i| i < bytes.len())
                .chain([bytes.len()])
                .collect()
        }
    })
}

fn tokenize_pieces(
    level: Level,
    bpe: &BpeSettings,
    pieces: [&[u8]; 3],
    path: &Path,
    has_test: bool,
) -> Result<Splits, DataError> {
    let paths = [path, path, path];
    let mut splits = split_files(level, bpe, pieces, &paths)?;
    if !has_test {
        splits.test = None;
    }
    Ok(splits)
}

/// Tokenise three split texts; the vocabulary (char, word, a trained BPE) comes from the
/// training split.
fn split_files(
    level: Level,
    bpe: &BpeSettings,
    texts: [&[u8]; 3],
    paths: &[&Path],
) -> Result<Splits, DataError> {
    let [train, valid, test] = texts;
    let (tokenizer, ids): (Tokenizer, Vec<Vec<u32>>) = match level {
        Level::Byte => (
            Tokenizer::Byte,
            texts
                .iter()
                .map(|t| t.iter().map(|&b| u32::from(b)).collect())
                .collect(),
        ),
        Level::Char => {
            let strs = [
                utf8(train, paths[0])?,
                utf8(valid, paths[1])?,
                utf8(test, paths[2])?,
            ];
            let rest = format!("{}{}", strs[1], strs[2]);
            let tok = Tokenizer::char_level(strs[0], &rest);
            let ids = strs.iter().map(|s| tok.encode(s)).collect();
            (tok, ids)
        }
        Level::Word => {
            let vocab = WordVocab::from_train(utf8(train, paths[0])?);
            let mut ids = vec![vocab.encode_lines(utf8(train, paths[0])?, "train", paths[0])?];
            ids.push(vocab.encode_lines(utf8(valid, paths[1])?, "valid", paths[1])?);
            ids.push(vocab.encode_lines(utf8(test, paths[2])?, "test", paths[2])?);
            (Tokenizer::Word(vocab), ids)
        }
        Level::Bpe => {
            let strs = [
                utf8(train, paths[0])?,
                utf8(valid, paths[1])?,
                utf8(test, paths[2])?,
            ];
            let tokenizer = match &bpe.tokenizer {
                Some(path) => Bpe::load(path)?,
                None => Bpe::train(strs[0], bpe.vocab_size)?,
            };
            let ids = strs.iter().map(|s| tokenizer.encode(s)).collect();
            (Tokenizer::Bpe(tokenizer), ids)
        }
    };
    let mut ids = ids.into_iter();
    let (train, valid, test) = (
        ids.next().unwrap(),
        ids.next().unwrap(),
        ids.next().unwrap(),
    );
    Ok(Splits {
        tokenizer,
        train,
        valid,
        test: Some(test),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(corpus: &str) -> Option<PathBuf> {
        let dir = crate::crate_dir()
            .join("../../../shared/datasets")
            .join(corpus);
        if dir.is_dir() {
            Some(dir)
        } else {
            eprintln!("skipped: {} is absent", dir.display());
            None
        }
    }

    fn load_named(corpus: Corpus, dir: &Path) -> Splits {
        load(&LoadRequest {
            corpus,
            path: dir,
            level: Level::Byte,
            bpe: crate::BpeSettings::default(),
            valid_fraction: 0.1,
            test_fraction: 0.0,
        })
        .unwrap()
    }

    #[test]
    fn ptb_has_the_published_vocabulary_and_token_counts() {
        let Some(dir) = shared("ptb") else { return };
        let s = load_named(Corpus::Ptb, &dir);
        assert_eq!(s.tokenizer.vocab_size(), 10_000);
        assert_eq!(s.train.len(), 929_589);
        assert_eq!(s.valid.len(), 73_760);
        assert_eq!(s.test.as_ref().unwrap().len(), 82_430);
        println!(
            "ptb: vocab {} | {} / {} / {}",
            s.tokenizer.vocab_size(),
            s.train.len(),
            s.valid.len(),
            s.test.unwrap().len()
        );
    }

    #[test]
    fn wikitext2_has_the_published_vocabulary_and_token_counts() {
        let Some(dir) = shared("wikitext-2") else {
            return;
        };
        let s = load_named(Corpus::Wikitext2, &dir);
        assert_eq!(s.tokenizer.vocab_size(), 33_278);
        assert_eq!(s.train.len(), 2_088_628);
        assert_eq!(s.valid.len(), 217_646);
        assert_eq!(s.test.as_ref().unwrap().len(), 245_569);
        println!(
            "wikitext-2: vocab {} | {} / {} / {}",
            s.tokenizer.vocab_size(),
            s.train.len(),
            s.valid.len(),
            s.test.unwrap().len()
        );
    }

    #[test]
    fn tinyshakespeare_is_65_chars_split_90_10() {
        let Some(dir) = shared("tinyshakespeare") else {
            return;
        };
        let s = load_named(Corpus::Tinyshakespeare, &dir);
        assert_eq!(s.tokenizer.vocab_size(), 65);
        assert_eq!((s.train.len(), s.valid.len()), (1_003_854, 111_540));
        assert!(s.test.is_none());
    }

    /// `level = "bpe"` overrides a named corpus's own level: tiny-shakespeare cut where char
    /// level cuts it (90 / 10 of its characters), a BPE of 1,000 tokens trained on the training
    /// part, both splits decoding back to exactly their text.
    #[test]
    fn a_named_corpus_takes_the_bpe_level() {
        let Some(dir) = shared("tinyshakespeare") else {
            return;
        };
        let s = load(&LoadRequest {
            corpus: Corpus::Tinyshakespeare,
            path: &dir,
            level: Level::Bpe,
            bpe: BpeSettings {
                vocab_size: 1000,
                tokenizer: None,
            },
            valid_fraction: 0.1,
            test_fraction: 0.0,
        })
        .unwrap();
        assert!(matches!(s.tokenizer, Tokenizer::Bpe(_)));
        assert_eq!(s.tokenizer.vocab_size(), 1000);
        let text = std::fs::read_to_string(dir.join("input.txt")).unwrap();
        let cut = text.char_indices().nth(1_003_854).unwrap().0;
        assert_eq!(s.tokenizer.decode(&s.train), text[..cut]);
        assert_eq!(s.tokenizer.decode(&s.valid), text[cut..]);
        assert!(
            s.train.len() < 1_003_854 / 2,
            "merges: {} tokens",
            s.train.len()
        );
        assert!(Corpus::Tinyshakespeare.reports_perplexity(Level::Bpe));
    }

    /// PTB's word vocabulary is ordered by frequency: the counts of ids 0, 1, 2, ... in the
    /// encoded training split never increase, and a second build gives the same ids.
    #[test]
    fn ptb_word_ids_are_frequency_ranks() {
        let Some(dir) = shared("ptb") else {
            return;
        };
        let text = std::fs::read_to_string(dir.join("ptb.train.txt")).unwrap();
        let vocab = WordVocab::from_train(&text);
        let ids = vocab.encode_lines(&text, "train", &dir).unwrap();
        let mut counts = vec![0u64; vocab.len()];
        for &id in &ids {
            counts[id as usize] += 1;
        }
        assert_eq!(vocab.len(), 10_000);
        assert!(
            counts.windows(2).all(|w| w[0] >= w[1]),
            "counts not non-increasing"
        );
        assert_eq!(vocab.word(0), Some("the"));
        assert_eq!(WordVocab::from_train(&text), vocab);
    }

    #[test]
    fn ptb_char_valid_loads_as_symbols() {
        let Some(dir) = shared("ptb-char") else {
            return;
        };
        let text = std::fs::read_to_string(dir.join("valid.txt")).unwrap();
        let vocab = WordVocab::from_train(&text);
        let ids = vocab.encode_lines(&text, "valid", &dir).unwrap();
        // 49 distinct symbols plus <eos>.
        assert_eq!(vocab.len(), 50);
        assert_eq!(
            ids.len(),
            text.split_whitespace().count() + text.lines().count()
        );
        assert!(
            !Corpus::PtbChar.reports_perplexity(Level::Byte),
            "ptb-char reports bpc"
        );
    }

    #[test]
    fn enwik8_and_text8_split_90_5_5_through_the_same_code_path() {
        let dir = std::env::temp_dir().join(format!("mixlab-cat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        std::fs::write(dir.join("enwik8"), &bytes).unwrap();
        std::fs::write(dir.join("text8"), &bytes).unwrap();
        let e = load_named(Corpus::Enwik8, &dir);
        assert_eq!(
            (e.train.len(), e.valid.len(), e.test.as_ref().unwrap().len()),
            (90, 5, 5)
        );
        assert_eq!(e.tokenizer.vocab_size(), 256);
        assert_eq!(e.valid[0], u32::from(bytes[90]));
        let t = load_named(Corpus::Text8, &dir);
        assert_eq!(
            (t.train.len(), t.valid.len(), t.test.as_ref().unwrap().len()),
            (90, 5, 5)
        );
        assert_eq!(t.tokenizer.vocab_size(), 26);
        // 10^8 bytes would cut at exactly 90,000,000 and 95,000,000.
        let n = 100_000_000usize;
        assert_eq!((n * 90 / 100, n * 95 / 100), (90_000_000, 95_000_000));
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("mixlab-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty.txt"), b"").unwrap();
        fn req(corpus: Corpus, path: &Path) -> LoadRequest<'_> {
            LoadRequest {
                corpus,
                path,
                level: Level::Char,
                bpe: crate::BpeSettings::default(),
                valid_fraction: 0.1,
                test_fraction: 0.0,
            }
        }
        let err = load(&req(Corpus::Text, &dir.join("empty.txt")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");
        let err = load(&req(Corpus::Ptb, &dir)).unwrap_err().to_string();
        assert!(
            err.contains("ptb.train.txt") && err.contains("ptb"),
            "{err}"
        );
        // A word corpus whose valid split has a word the training split lacks, without <unk>.
        let words = dir.join("words");
        std::fs::create_dir_all(&words).unwrap();
        std::fs::write(words.join("ptb.train.txt"), " a b \n b a \n").unwrap();
        std::fs::write(words.join("ptb.valid.txt"), " a c \n").unwrap();
        std::fs::write(words.join("ptb.test.txt"), " a \n").unwrap();
        let err = load(&req(Corpus::Ptb, &words)).unwrap_err().to_string();
        assert!(
            err.contains("`c`") && err.contains("ptb.valid.txt") && err.contains("line 1"),
            "{err}"
        );
        // With <unk> in the training split, unseen words map to it.
        std::fs::write(words.join("ptb.train.txt"), " a <unk> \n b a \n").unwrap();
        let s = load(&req(Corpus::Ptb, &words)).unwrap();
        let Tokenizer::Word(v) = &s.tokenizer else {
            panic!("word level")
        };
        assert_eq!(
            s.valid,
            vec![
                v.id("a").unwrap(),
                v.id("<unk>").unwrap(),
                v.id("<eos>").unwrap()
            ]
        );
        // Unknown corpus names are serde errors listing the valid ones.
        let err = serde_json::from_str::<Corpus>("\"enwik9\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("enwik8") && err.contains("wikitext-103"),
            "{err}"
        );
    }

    #[test]
    fn the_cache_returns_what_tokenising_returns_and_heals_itself() {
        let dir = std::env::temp_dir().join(format!("mixlab-lc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("c.txt"),
            " the cat sat \n on the mat \n the end \n".repeat(50),
        )
        .unwrap();
        let req = LoadRequest {
            corpus: Corpus::Text,
            path: &dir.join("c.txt"),
            level: Level::Word,
            bpe: crate::BpeSettings::default(),
            valid_fraction: 0.2,
            test_fraction: 0.1,
        };
        let cache = dir.join("cache");
        let mut notes = vec![];
        let fresh = load(&req).unwrap();
        let first = load_cached(&req, &cache, &mut |m| notes.push(m)).unwrap();
        let second = load_cached(&req, &cache, &mut |m| notes.push(m)).unwrap();
        for s in [&first, &second] {
            assert_eq!(
                (&s.train, &s.valid, &s.test, &s.tokenizer),
                (&fresh.train, &fresh.valid, &fresh.test, &fresh.tokenizer)
            );
        }
        assert!(notes.is_empty(), "{notes:?}");
        // Damage the cache: it is reported and rebuilt, with the same result.
        let entry = std::fs::read_dir(&cache)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(entry.join("valid.bin"), b"junk").unwrap();
        let healed = load_cached(&req, &cache, &mut |m| notes.push(m)).unwrap();
        assert_eq!(healed.valid, fresh.valid);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("rebuilding"), "{notes:?}");
        assert!(crate::cache::load(&entry).is_ok(), "rebuilt");
    }

    #[test]
    fn text_splits_three_ways_by_fraction() {
        let dir = std::env::temp_dir().join(format!("mixlab-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "x".repeat(100)).unwrap();
        let s = load(&LoadRequest {
            corpus: Corpus::Text,
            path: &dir.join("a.txt"),
            level: Level::Byte,
            bpe: crate::BpeSettings::default(),
            valid_fraction: 0.1,
            test_fraction: 0.1,
        })
        .unwrap();
        assert_eq!(
            (s.train.len(), s.valid.len(), s.test.unwrap().len()),
            (80, 10, 10)
        );
    }
}
