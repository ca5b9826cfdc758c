//! The data a run trains on, built from `[data]`, and its conversion to tensors.

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use mixlab_data::{
    Batch, CopyTask, Corpus, DataConfig, DataError, Level, TextCorpus, Tokenizer, WindowSampler,
    eval_windows,
};

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
    /// A text file.
    Text {
        /// Tokens and tokenizer.
        corpus: TextCorpus,
        /// Random-window sampler over the training split.
        sampler: WindowSampler,
    },
}

impl Source {
    /// Build the source for `config`, windows of `seq` inputs, seeded by `seed`.
    pub fn build(config: &DataConfig, seq: usize, seed: u64) -> Result<Self> {
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
            Corpus::Text => {
                let Some(path) = &config.path else {
                    bail!(DataError::Invalid {
                        field: "path",
                        message: "corpus = \"text\" needs a file: set data.path in the config \
                                  or pass --set data.path=FILE"
                            .into(),
                    });
                };
                if !(config.valid_fraction > 0.0 && config.valid_fraction < 1.0) {
                    bail!(DataError::Invalid {
                        field: "valid_fraction",
                        message: format!("must be in (0, 1), got {}", config.valid_fraction),
                    });
                }
                let corpus = TextCorpus::load(path, config.level, config.valid_fraction)?;
                let what = path.display().to_string();
                for (split, tokens) in [("train", &corpus.train), ("valid", &corpus.valid)] {
                    if tokens.len() <= seq {
                        bail!(DataError::TooShort {
                            split,
                            what: what.clone(),
                            tokens: tokens.len(),
                            needed: seq + 1,
                        });
                    }
                }
                Ok(Source::Text {
                    corpus,
                    sampler: WindowSampler { seed },
                })
            }
        };
        source.context("invalid [data]")
    }

    /// Number of token ids the model needs.
    pub fn vocab_size(&self) -> usize {
        match self {
            Source::Copy { task, .. } => task.vocab_size(),
            Source::Text { corpus, .. } => corpus.tokenizer.vocab_size(),
        }
    }

    /// The tokenizer of a text corpus.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        match self {
            Source::Copy { .. } => None,
            Source::Text { corpus, .. } => Some(&corpus.tokenizer),
        }
    }

    /// The unit losses are reported in.
    pub fn unit(&self, config: &DataConfig) -> Unit {
        match (self, config.level) {
            (Source::Copy { .. }, _) => Unit::Nats,
            (Source::Text { .. }, Level::Byte | Level::Char) => Unit::Bpc,
        }
    }

    /// Training batch number `index`.
    pub fn train_batch(&self, batch: usize, seq: usize, index: u64) -> Batch {
        match self {
            Source::Copy { task, .. } => task.batch(batch, index),
            Source::Text { corpus, sampler } => sampler.batch(&corpus.train, batch, seq, index),
        }
    }

    /// The fixed validation batches.
    pub fn valid_batches(&self, batch: usize, seq: usize, max_batches: usize) -> Vec<Batch> {
        match self {
            Source::Copy { valid, .. } => (0..max_batches as u64)
                .map(|i| valid.batch(batch, i))
                .collect(),
            Source::Text { corpus, .. } => eval_windows(&corpus.valid, batch, seq, max_batches),
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
