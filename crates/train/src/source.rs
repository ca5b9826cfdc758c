//! The data a run trains on, built from `[data]`, and its conversion to tensors.

use anyhow::{Context, Result, bail};

use crate::config::{Config, Objective};
use burn::tensor::{Device, Int, Tensor, TensorData};
use mixlab_data::{
    Batch, CopyTask, Corpus, DataConfig, DataError, Level, LoadRequest, Sampler, Splits, Tokenizer,
    corpus_dir, eval_windows, stream_eval_batches, stream_restarts,
};

/// How a split is scored; every printed and logged evaluation names it, so numbers of two
/// protocols are never set side by side unawares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A model without a cache: windows of `seq` tokens starting every `stride`
    /// (`data.eval_stride`), `batch` to a batch; each token scored once, with at least
    /// `seq - stride` tokens of context.
    Windows {
        /// Rows per batch (`train.batch_size`).
        batch: usize,
        /// Window length (`model.seq_len`).
        seq: usize,
        /// Distance between window starts.
        stride: usize,
    },
    /// A model with a cache: the split as `streams` contiguous streams
    /// (`data.eval_streams`), read in blocks of `seq` with the cache carried from block to
    /// block (Sukhbaatar et al.'s and Transformer-XL's full evaluation); each token scored
    /// once.
    Streams {
        /// Streams (rows of every batch).
        streams: usize,
        /// Block length (`model.seq_len`).
        seq: usize,
    },
}

impl Protocol {
    /// The protocol of `config`'s model.
    pub fn of(config: &Config) -> Self {
        let seq = config.model.seq_len;
        match config.model.cache {
            Some(_) => Protocol::Streams {
                streams: config.data.eval_streams,
                seq,
            },
            None => Protocol::Windows {
                batch: config.train.batch_size,
                seq,
                stride: config.data.eval_stride.unwrap_or(seq),
            },
        }
    }

    /// Its name in log lines and `metrics.jsonl`, e.g. `windows 256/128` (length / stride)
    /// or `streams 8x256 cached`.
    pub fn describe(&self) -> String {
        match *self {
            Protocol::Windows { seq, stride, .. } => format!("windows {seq}/{stride}"),
            Protocol::Streams { streams, seq } => format!("streams {streams}x{seq} cached"),
        }
    }

    /// Its batches over `tokens` (at most `max_batches`).
    pub fn batches(&self, tokens: &[u32], max_batches: Option<usize>) -> Vec<Batch> {
        match *self {
            Protocol::Windows { batch, seq, stride } => {
                eval_windows(tokens, batch, seq, stride, max_batches)
            }
            Protocol::Streams { streams, seq } => {
                stream_eval_batches(tokens, streams, seq, max_batches)
            }
        }
    }

    fn rows(&self) -> usize {
        match *self {
            Protocol::Windows { batch, .. } => batch,
            Protocol::Streams { streams, .. } => streams,
        }
    }

    fn seq(&self) -> usize {
        match *self {
            Protocol::Windows { seq, .. } | Protocol::Streams { seq, .. } => seq,
        }
    }
}

/// How losses are reported besides nats per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bits per character / byte (`loss / ln 2`).
    Bpc,
    /// Perplexity (`exp(loss)`), for word-level data.
    Ppl,
    /// Nats only (synthetic tasks).
    Nats,
}

impl Unit {
    /// `("bpc", value)` / `("ppl", value)` for a loss in nats, or `None`.
    pub fn metric(self, loss: f64) -> Option<(&'static str, f64)> {
        match self {
            Unit::Bpc => Some(("bpc", loss / std::f64::consts::LN_2)),
            Unit::Ppl => Some(("ppl", loss.exp())),
            Unit::Nats => None,
        }
    }
}

/// A training data source.
#[derive(Debug, Clone)]
pub enum Source {
    /// The synthetic copy task.
    Copy {
        /// Training batches.
        task: CopyTask,
        /// Validation batches: the same task on a disjoint seed.
        valid: CopyTask,
    },
    /// A text corpus (named or a local file).
    Text {
        /// Tokens of every split, and the tokenizer.
        splits: Splits,
        /// How training batches are drawn.
        sampler: Sampler,
        /// Seed of the sampler.
        seed: u64,
    },
}

/// Set by `--offline` (or `MIXLAB_OFFLINE=1` in the environment): never download.
static OFFLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Forbid (or allow) downloads for the rest of this process.
pub fn set_offline(offline: bool) {
    OFFLINE.store(offline, std::sync::atomic::Ordering::SeqCst);
}

/// Whether downloads are off (`--offline` or `MIXLAB_OFFLINE` set to anything but 0/empty).
pub fn offline() -> bool {
    OFFLINE.load(std::sync::atomic::Ordering::SeqCst)
        || std::env::var("MIXLAB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Download whatever files of `corpus` are missing from `dir`, with a progress bar on stderr
/// (pinned checksums, resume, mirrors: see `mixlab_data::fetch`).
pub fn fetch_corpus(corpus: Corpus, dir: &std::path::Path) -> Result<()> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let downloads = mixlab_data::downloads(corpus);
    let mut bar: Option<ProgressBar> = None;
    mixlab_data::fetch(dir, &downloads, offline(), &mut |event| match event {
        mixlab_data::FetchEvent::Start {
            url,
            total,
            resumed_from,
        } => {
            if resumed_from > 0 {
                eprintln!("mixlab: resuming {url} from byte {resumed_from}");
            } else {
                eprintln!("mixlab: downloading {url}");
            }
            let b = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b.set_position(resumed_from);
            bar = Some(b);
        }
        mixlab_data::FetchEvent::Progress(n) => {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        }
        mixlab_data::FetchEvent::Extract(member) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("mixlab: extracting {member}");
        }
        mixlab_data::FetchEvent::Done => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    })
    .with_context(|| format!("corpus {}", corpus.name()))
}

impl Source {
    /// Build the source for `config`, windows of `seq` inputs, seeded by `seed`.
    pub fn build(config: &DataConfig, seq: usize, batch_size: usize, seed: u64) -> Result<Self> {
        let source: Result<Self> = match config.corpus {
            Corpus::Copy => {
                if !seq.is_multiple_of(2) || seq < 2 {
                    bail!(DataError::Invalid {
                        field: "corpus",
                        message: format!(
                            "the copy task needs an even model.seq_len >= 2 (rows are x SEP x \
                             with |x| = seq_len / 2), got {seq}"
                        ),
                    });
                }
                if config.n_symbols < 2 {
                    bail!(DataError::Invalid {
                        field: "n_symbols",
                        message: format!("must be at least 2, got {}", config.n_symbols),
                    });
                }
                let task = CopyTask {
                    n_symbols: config.n_symbols,
                    seq,
                    seed,
                };
                let valid = CopyTask {
                    seed: seed ^ 0x9E37_79B9_7F4A_7C15,
                    ..task
                };
                Ok(Source::Copy { task, valid })
            }
            corpus => {
                let path = match (&config.path, corpus) {
                    (Some(path), _) => path.clone(),
                    (None, Corpus::Text) => bail!(DataError::Invalid {
                        field: "path",
                        message: "corpus = \"text\" needs a file: set data.path in the config \
                                  or pass --set data.path=FILE"
                            .into(),
                    }),
                    (None, named) => {
                        // The default folder of a named corpus: fetch what is missing.
                        let dir = corpus_dir(&config.root, named);
                        fetch_corpus(named, &dir)?;
                        dir
                    }
                };
                let (v, t) = (config.valid_fraction, config.test_fraction);
                if !(v > 0.0 && t >= 0.0 && v + t < 1.0) {
                    bail!(DataError::Invalid {
                        field: "valid_fraction",
                        message: format!(
                            "valid_fraction must be > 0, test_fraction >= 0, and together < 1 \
                             (got {v} and {t})"
                        ),
                    });
                }
                if config.tokenizer.is_some() && corpus.level(config.level) != Level::Bpe {
                    bail!(DataError::Invalid {
                        field: "tokenizer",
                        message: "a tokenizer.json is for level = \"bpe\": set data.level = \
                                  \"bpe\" or leave data.tokenizer out"
                            .into(),
                    });
                }
                let stride = config.eval_stride.unwrap_or(seq);
                if stride == 0 || stride > seq {
                    bail!(DataError::Invalid {
                        field: "eval_stride",
                        message: format!("must be in 1..=model.seq_len ({seq}), got {stride}"),
                    });
                }
                let request = LoadRequest {
                    corpus,
                    path: &path,
                    level: config.level,
                    bpe: mixlab_data::BpeSettings {
                        vocab_size: config.bpe_vocab_size,
                        tokenizer: config.tokenizer.clone(),
                    },
                    valid_fraction: v,
                    test_fraction: t,
                };
                let splits = if config.cache_dir.as_os_str().is_empty() {
                    mixlab_data::load(&request)?
                } else {
                    mixlab_data::load_cached(&request, &config.cache_dir, &mut |note| {
                        eprintln!("mixlab: {note}")
                    })?
                };
                let what = path.display().to_string();
                let train_needed = match config.sampler {
                    Sampler::Random => seq + 1,
                    Sampler::Stream => (seq + 1) * batch_size,
                };
                for (split, tokens, needed) in [
                    ("train", &splits.train, train_needed),
                    ("valid", &splits.valid, seq + 1),
                ] {
                    if tokens.len() < needed {
                        bail!(DataError::TooShort {
                            split,
                            what: what.clone(),
                            tokens: tokens.len(),
                            needed,
                        });
                    }
                }
                Ok(Source::Text {
                    splits,
                    sampler: config.sampler,
                    seed,
                })
            }
        };
        source.context("invalid [data]")
    }

    /// Number of token ids the model needs.
    pub fn vocab_size(&self) -> usize {
        match self {
            Source::Copy { task, .. } => task.vocab_size(),
            Source::Text { splits, .. } => splits.tokenizer.vocab_size(),
        }
    }

    /// Refuses a run whose saved `tokenizer.json` is not the tokenizer this corpus gives now:
    /// the run's token ids would mean other tokens (a run made before word vocabularies were
    /// ordered by frequency, or an edited corpus). A run without the file passes.
    pub fn check_run_tokenizer(&self, run_dir: &std::path::Path) -> Result<()> {
        let path = run_dir.join("tokenizer.json");
        let (Some(now), Ok(text)) = (self.tokenizer(), std::fs::read_to_string(&path)) else {
            return Ok(());
        };
        let saved: Tokenizer = serde_json::from_str(&text)
            .with_context(|| format!("cannot read the run's tokenizer {}", path.display()))?;
        if &saved != now {
            bail!(
                "{}: this run's vocabulary ({} tokens) is not the one its corpus gives now \
                 ({} tokens, or the same words with other ids), so its token ids would mean \
                 other tokens. Word vocabularies are ordered by frequency since token-cache \
                 format 3; a word-level run made before cannot be resumed or evaluated by this \
                 build: train it again, or use the build that made it",
                path.display(),
                saved.vocab_size(),
                now.vocab_size()
            );
        }
        Ok(())
    }

    /// The tokenizer of a text corpus.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        match self {
            Source::Copy { .. } => None,
            Source::Text { splits, .. } => Some(&splits.tokenizer),
        }
    }

    /// Vocabulary the model needs under `objective`: the data's, plus `[MASK]` when masked.
    pub fn model_vocab(&self, objective: Objective) -> usize {
        self.vocab_size() + usize::from(objective == Objective::Masked)
    }

    /// Shape a drawn batch for `objective`: unchanged for next-token prediction; masked with
    /// `[MASK] = vocab_size()` for the masked objective (`salt` separates training from
    /// evaluation masks).
    pub fn for_objective(
        &self,
        batch: Batch,
        objective: Objective,
        mask_rate: f64,
        seed: u64,
        index: u64,
    ) -> Batch {
        match objective {
            Objective::Causal => batch,
            Objective::Masked => {
                let vocab = self.vocab_size() as u32;
                batch.masked(vocab, vocab, mask_rate, seed, index)
            }
        }
    }

    /// How many distinct token ids occur in the training data (enwik8: 205 of 256 bytes).
    pub fn occurring(&self) -> usize {
        match self {
            Source::Copy { task, .. } => task.vocab_size(),
            Source::Text { splits, .. } => {
                let mut seen = vec![false; splits.tokenizer.vocab_size()];
                for &t in &splits.train {
                    seen[t as usize] = true;
                }
                seen.iter().filter(|&&s| s).count()
            }
        }
    }

    /// The unit losses are reported in.
    pub fn unit(&self, config: &DataConfig) -> Unit {
        match self {
            Source::Copy { .. } => Unit::Nats,
            Source::Text { .. } if config.corpus.reports_perplexity(config.level) => Unit::Ppl,
            Source::Text { .. } => Unit::Bpc,
        }
    }

    /// Training batch number `index`.
    pub fn train_batch(&self, batch: usize, seq: usize, index: u64) -> Batch {
        match self {
            Source::Copy { task, .. } => task.batch(batch, index),
            Source::Text {
                splits,
                sampler,
                seed,
                ..
            } => sampler.batch(&splits.train, batch, seq, *seed, index),
        }
    }

    /// Whether training batch `index` (of `batch` rows of `seq`) starts the `stream`
    /// sampler's streams over, where a model's cache is reset; never for other samplers.
    pub fn stream_restarts(&self, batch: usize, seq: usize, index: u64) -> bool {
        match self {
            Source::Text {
                splits,
                sampler: Sampler::Stream,
                ..
            } => stream_restarts(splits.train.len(), batch, seq, index),
            _ => false,
        }
    }

    /// Validation batches under `protocol`: at most `max_batches` (`None` = the whole split).
    pub fn valid_batches(&self, protocol: &Protocol, max_batches: Option<usize>) -> Vec<Batch> {
        match self {
            Source::Copy { valid, .. } => (0..max_batches.unwrap_or(8) as u64)
                .map(|i| valid.batch(protocol.rows(), i))
                .collect(),
            Source::Text { splits, .. } => protocol.batches(&splits.valid, max_batches),
        }
    }

    /// Test batches over the whole test split under `protocol`, when the corpus has one.
    pub fn test_batches(&self, protocol: &Protocol) -> Option<Vec<Batch>> {
        match self {
            Source::Copy { .. } => None,
            Source::Text { splits, .. } => splits
                .test
                .as_ref()
                .filter(|t| t.len() > protocol.seq())
                .map(|t| protocol.batches(t, None)),
        }
    }
}

/// A batch as tensors on `device`: inputs and targets `[batch, seq]`, weights `[batch, seq]`.
pub fn to_tensors(
    batch: &Batch,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, Option<Tensor<2>>) {
    let shape = [batch.batch, batch.seq];
    let (inputs, targets) = batch.inputs_targets();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, shape), device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, shape), device);
    let weights = batch
        .weights
        .as_ref()
        .map(|w| Tensor::<2>::from_data(TensorData::new(w.clone(), shape), device));
    (inputs, targets, weights)
}
