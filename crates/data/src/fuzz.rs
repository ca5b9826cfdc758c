//! Property-based fuzzing of the corpus readers (proptest): arbitrary bytes as a corpus file at
//! every level and split setting, and arbitrary damage to a token cache, must give a value or
//! an error, never a panic. `PROPTEST_CASES=N cargo test --release -p mixlab-data fuzz` runs
//! more cases than the default 256.

use std::path::PathBuf;

use proptest::prelude::*;

use crate::{Corpus, Level, LoadRequest};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mixlab-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Text-like bytes: mostly printable ASCII, newlines and spaces, some UTF-8, some invalid bytes.
fn corpus_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => b'a'..=b'z',
            3 => Just(b' '),
            2 => Just(b'\n'),
            1 => any::<u8>(),
        ],
        0..400,
    )
}

proptest! {
    #[test]
    fn corpus_readers_never_panic(
        bytes in corpus_bytes(),
        level in prop_oneof![Just(Level::Byte), Just(Level::Char), Just(Level::Word)],
        valid in 0.0f64..1.2,
        test in 0.0f64..0.6,
    ) {
        let dir = scratch("corpus");
        let path = dir.join("corpus.txt");
        std::fs::write(&path, &bytes).unwrap();
        let req = LoadRequest {
            corpus: Corpus::Text,
            path: &path,
            level,
            bpe: crate::BpeSettings::default(),
            valid_fraction: valid,
            test_fraction: test,
        };
        if let Ok(splits) = crate::load(&req) {
            let vocab = splits.tokenizer.vocab_size() as u32;
            let all = splits.train.iter().chain(&splits.valid).chain(splits.test.iter().flatten());
            for &id in all {
                prop_assert!(id < vocab, "token {id} outside the vocabulary of {vocab}");
            }
        }
    }

    #[test]
    fn named_split_files_never_panic(
        train in corpus_bytes(),
        valid in corpus_bytes(),
        test in corpus_bytes(),
    ) {
        let dir = scratch("ptb");
        for (name, bytes) in [("ptb.train.txt", &train), ("ptb.valid.txt", &valid), ("ptb.test.txt", &test)] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let req = LoadRequest {
            corpus: Corpus::Ptb,
            path: &dir,
            level: Level::Word,
            bpe: crate::BpeSettings::default(),
            valid_fraction: 0.1,
            test_fraction: 0.0,
        };
        let _ = crate::load(&req);
    }

    #[test]
    fn damaged_token_caches_are_rejected_not_trusted(
        cut in 0usize..200,
        flips in prop::collection::vec((0usize..200, any::<u8>()), 0..8),
    ) {
        let dir = scratch("cache-src");
        let path = dir.join("corpus.txt");
        std::fs::write(&path, "to be or not to be\nthat is the question\n".repeat(20)).unwrap();
        let req = LoadRequest {
            corpus: Corpus::Text,
            path: &path,
            level: Level::Char,
            bpe: crate::BpeSettings::default(),
            valid_fraction: 0.2,
            test_fraction: 0.0,
        };
        let good = crate::load(&req).unwrap();
        let cache = scratch("cache").join(format!("{cut}-{}", flips.len()));
        crate::cache::store(&cache, &good).unwrap();
        let file = cache.join("train.bin");
        let mut bytes = std::fs::read(&file).unwrap();
        for (at, value) in &flips {
            let at = at % bytes.len();
            bytes[at] = *value;
        }
        bytes.truncate(bytes.len().saturating_sub(cut));
        std::fs::write(&file, &bytes).unwrap();
        if let Ok(loaded) = crate::cache::load(&cache) {
            // Accepted only if the damage left a consistent file (ids in range, right count).
            let vocab = loaded.tokenizer.vocab_size() as u32;
            prop_assert!(loaded.train.iter().all(|&i| i < vocab));
            prop_assert_eq!(loaded.train.len(), good.train.len());
        }
    }
}
