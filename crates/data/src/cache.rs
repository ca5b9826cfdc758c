//! The tokenised-corpus cache: each split's token ids in a compact binary file, memory-mapped
//! on later runs, so a large corpus (WikiText-103: 540 MB of text) is tokenised once.
//!
//! Layout of `<cache_dir>/<key>/{train,valid,test}.bin`: a 64-byte header — magic
//! `MIXLABTK`, format version (u32), id width in bytes (u32: 1, 2 or 4), token count (u64), the
//! SHA-256 of the tokenizer's JSON (32 bytes), the CRC-32 of the id bytes (u32), 4 reserved —
//! then the ids, little-endian. The
//! tokenizer is `tokenizer.json` beside them. `<key>` names the corpus, level and split
//! settings and a fingerprint (path, size, mtime) of every source file, so an edited corpus
//! gets a new cache. A file that does not verify (short, wrong magic, version, width, tokenizer
//! hash or checksum — the checksum catches damage that leaves the count and length consistent)
//! is reported and rebuilt.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use crate::text::{Splits, Tokenizer};

const MAGIC: &[u8; 8] = b"MIXLABTK";
/// 3: word vocabularies ordered by frequency (2 had them in order of first appearance, so a
/// version-2 cache is rebuilt, never read with the other order).
const VERSION: u32 = 3;
const HEADER: usize = 64;

/// Why a cache could not be used (it is then rebuilt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// No cache yet.
    Absent,
    /// A cache exists but does not verify; the reason, for the user.
    Invalid(String),
}

/// The cache folder for one corpus configuration.
pub fn entry_dir(cache_dir: &Path, name: &str, settings: &str, sources: &[PathBuf]) -> PathBuf {
    let mut h = Sha256::new();
    h.update(settings.as_bytes());
    for p in sources {
        h.update(p.to_string_lossy().as_bytes());
        if let Ok(m) = fs::metadata(p) {
            h.update(m.len().to_le_bytes());
            if let Ok(t) = m.modified().and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_err(std::io::Error::other)
            }) {
                h.update(t.as_nanos().to_le_bytes());
            }
        }
    }
    let digest = hex(&h.finalize()[..8]);
    cache_dir.join(format!("{name}-{digest}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tokenizer_hash(tokenizer: &Tokenizer) -> [u8; 32] {
    let json = serde_json::to_vec(tokenizer).expect("a tokenizer serialises");
    Sha256::digest(&json).into()
}

fn width(vocab: usize) -> u32 {
    match vocab {
        0..=256 => 1,
        257..=65_536 => 2,
        _ => 4,
    }
}

/// Write `splits` into `dir` (each file via a temporary name and a rename, so a crash never
/// leaves a half-written file under the final name).
pub fn store(dir: &Path, splits: &Splits) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let hash = tokenizer_hash(&splits.tokenizer);
    let w = width(splits.tokenizer.vocab_size());
    let parts = [
        ("train", Some(&splits.train)),
        ("valid", Some(&splits.valid)),
        ("test", splits.test.as_ref()),
    ];
    for (name, ids) in parts {
        let Some(ids) = ids else { continue };
        let mut bytes = Vec::with_capacity(HEADER + ids.len() * w as usize);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&w.to_le_bytes());
        bytes.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&hash);
        bytes.resize(HEADER, 0);
        match w {
            1 => bytes.extend(ids.iter().map(|&i| i as u8)),
            2 => ids
                .iter()
                .for_each(|&i| bytes.extend_from_slice(&(i as u16).to_le_bytes())),
            _ => ids
                .iter()
                .for_each(|&i| bytes.extend_from_slice(&i.to_le_bytes())),
        }
        let crc = crc32fast::hash(&bytes[HEADER..]);
        bytes[56..60].copy_from_slice(&crc.to_le_bytes());
        write_atomic(&dir.join(format!("{name}.bin")), &bytes)?;
    }
    write_atomic(
        &dir.join("tokenizer.json"),
        &serde_json::to_vec(&splits.tokenizer)?,
    )?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

/// Read the splits cached in `dir` (a test split when `test.bin` exists).
pub fn load(dir: &Path) -> Result<Splits, Stale> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Stale::Absent);
    }
    let invalid = |why: String| Stale::Invalid(format!("{}: {why}", dir.display()));
    let tokenizer: Tokenizer = fs::read(&tok_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| invalid("tokenizer.json does not parse".into()))?;
    let hash = tokenizer_hash(&tokenizer);
    let w = width(tokenizer.vocab_size());
    let read = |name: &str| -> Result<Vec<u32>, Stale> {
        let path = dir.join(format!("{name}.bin"));
        let file = File::open(&path).map_err(|e| invalid(format!("{name}.bin: {e}")))?;
        // SAFETY: the cache is ours; a file truncated or rewritten under us is caught by the
        // length check below or, at worst, reads wrong ids — never undefined behaviour in safe
        // code that only reads bytes.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| invalid(format!("{name}.bin: {e}")))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(invalid(format!("{name}.bin is not a Mixlab token cache")));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        if u32_at(8) != VERSION || u32_at(12) != w {
            return Err(invalid(format!(
                "{name}.bin has format version {} (this build writes {VERSION}: word \
                 vocabularies ordered by frequency) or another id width",
                u32_at(8)
            )));
        }
        if map[24..56] != hash {
            return Err(invalid(format!(
                "{name}.bin was written for another vocabulary"
            )));
        }
        let count = u64::from_le_bytes(map[16..24].try_into().unwrap()) as usize;
        let body = &map[HEADER..];
        if body.len() != count * w as usize {
            return Err(invalid(format!(
                "{name}.bin is truncated ({} bytes of ids, {} expected)",
                body.len(),
                count * w as usize
            )));
        }
        if crc32fast::hash(body) != u32_at(56) {
            return Err(invalid(format!(
                "{name}.bin fails its checksum (damaged ids)"
            )));
        }
        let ids: Vec<u32> = match w {
            1 => body.iter().map(|&b| u32::from(b)).collect(),
            2 => body
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => body
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        // A damaged id could index past the embedding table: check the range (one pass).
        let vocab = tokenizer.vocab_size() as u32;
        if let Some(at) = ids.iter().position(|&i| i >= vocab) {
            return Err(invalid(format!(
                "{name}.bin holds id {} at position {at}, outside the vocabulary of {vocab}",
                ids[at]
            )));
        }
        Ok(ids)
    };
    Ok(Splits {
        train: read("train")?,
        valid: read("valid")?,
        test: if dir.join("test.bin").exists() {
            Some(read("test")?)
        } else {
            None
        },
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::WordVocab;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mixlab-cache-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trips_at_every_width() {
        let words: String = (0..70_000).map(|i| format!("w{i} ")).collect();
        for (tok, max) in [
            (Tokenizer::Byte, 255u32),
            (Tokenizer::Word(WordVocab::from_train("a b c\n")), 3),
            (Tokenizer::Word(WordVocab::from_train(&words)), 70_000),
        ] {
            let dir = scratch(&format!("w{max}"));
            let splits = Splits {
                train: (0..=max).collect(),
                valid: vec![max, 0, 1],
                test: None,
                tokenizer: tok,
            };
            store(&dir, &splits).unwrap();
            let back = load(&dir).unwrap();
            assert_eq!(back.train, splits.train);
            assert_eq!(back.valid, splits.valid);
            assert_eq!(back.tokenizer, splits.tokenizer);
            let bytes = fs::metadata(dir.join("train.bin")).unwrap().len() as usize;
            assert_eq!(
                bytes,
                HEADER + (max as usize + 1) * width(splits.tokenizer.vocab_size()) as usize
            );
        }
    }

    #[test]
    fn damaged_caches_are_reported() {
        let dir = scratch("damaged");
        assert_eq!(load(&dir).unwrap_err(), Stale::Absent);
        let splits = Splits {
            train: vec![1, 2, 3],
            valid: vec![4],
            test: Some(vec![5]),
            tokenizer: Tokenizer::Byte,
        };
        store(&dir, &splits).unwrap();
        assert!(load(&dir).is_ok());
        // Truncated.
        let f = dir.join("train.bin");
        let len = fs::metadata(&f).unwrap().len();
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let Stale::Invalid(why) = load(&dir).unwrap_err() else {
            panic!("invalid expected")
        };
        assert!(why.contains("truncated"), "{why}");
        // Another vocabulary.
        store(&dir, &splits).unwrap();
        let other = Tokenizer::Char {
            chars: vec!['a'],
            unknown: false,
        };
        fs::write(
            dir.join("tokenizer.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        let Stale::Invalid(why) = load(&dir).unwrap_err() else {
            panic!("invalid expected")
        };
        assert!(why.contains("width") || why.contains("vocabulary"), "{why}");
        // Garbage.
        fs::write(dir.join("valid.bin"), b"nonsense").unwrap();
        store(&dir, &splits).unwrap();
        fs::write(dir.join("valid.bin"), b"nonsense").unwrap();
        let Stale::Invalid(why) = load(&dir).unwrap_err() else {
            panic!("invalid expected")
        };
        assert!(why.contains("not a Mixlab token cache"), "{why}");
        // Consistent damage (found by the fuzz test): the count lowered and the ids cut to
        // match, or an id changed in place. Only the checksum can tell.
        store(&dir, &splits).unwrap();
        let mut bytes = fs::read(&f).unwrap();
        bytes[16] = 2; // count 3 -> 2
        bytes.truncate(bytes.len() - 1);
        fs::write(&f, &bytes).unwrap();
        let Stale::Invalid(why) = load(&dir).unwrap_err() else {
            panic!("invalid expected")
        };
        assert!(why.contains("checksum"), "{why}");
        store(&dir, &splits).unwrap();
        let mut bytes = fs::read(&f).unwrap();
        bytes[HEADER] = 9; // id 1 -> 9, still in the vocabulary
        fs::write(&f, &bytes).unwrap();
        let Stale::Invalid(why) = load(&dir).unwrap_err() else {
            panic!("invalid expected")
        };
        assert!(why.contains("checksum"), "{why}");
    }

    #[test]
    fn the_key_changes_when_a_source_changes() {
        let dir = scratch("key");
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("corpus.txt");
        fs::write(&src, "abc").unwrap();
        let a = entry_dir(&dir, "text", "byte", std::slice::from_ref(&src));
        assert_eq!(
            a,
            entry_dir(&dir, "text", "byte", std::slice::from_ref(&src))
        );
        assert_ne!(
            a,
            entry_dir(&dir, "text", "char", std::slice::from_ref(&src))
        );
        fs::write(&src, "abcd").unwrap();
        assert_ne!(a, entry_dir(&dir, "text", "byte", &[src]));
    }
}
