//! The run configuration: one TOML file with `[model]`, `[data]`, `[optim]` and `[train]`,
//! mirrored 1:1 by the structs here (the model and data sections are the `models` and `data`
//! crates' own config types).
//!
//! `--set a.b=value` overrides are applied to the TOML document before it is typed, so an
//! override is checked exactly like a line of the file. Unknown keys and wrong types are errors
//! that name the file, the key and the line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mixlab_data::DataConfig;
use mixlab_models::LmConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::device::Precision;
use crate::device::{BackendChoice, Selected, select_many, set_precision};

/// A whole run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The model (see `mixlab_models::LmConfig`).
    pub model: LmConfig,
    /// The data (see `mixlab_data::DataConfig`).
    pub data: DataConfig,
    /// Optimiser and learning-rate schedule.
    pub optim: OptimConfig,
    /// The training loop.
    pub train: TrainConfig,
}

/// `[optim]`: AdamW with decoupled weight decay (or the all-attention paper's Adagrad),
/// global-norm clipping, warmup + cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (`train.steps`).
    pub min_lr: f64,
    /// Linear warmup from 0 over this many steps.
    pub warmup_steps: usize,
    /// Decoupled weight decay of matrices (not of norms, biases or embeddings).
    pub weight_decay: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Clip the global L2 norm of all gradients to this value; 0 disables clipping.
    pub grad_clip: f64,
    /// `adamw`, or `adagrad` (Sukhbaatar et al.'s `AdagradWithGradClip`, with `step_clip`).
    #[serde(skip_serializing_if = "OptimKind::is_adamw")]
    pub kind: OptimKind,
    /// Adagrad only: a parameter tensor whose gradient's L2 norm passes this takes a step
    /// scaled by `step_clip / norm` (its accumulator still adds the raw squared gradient);
    /// 0 = off. The all-attention paper's `--grad-clip 0.03`.
    #[serde(skip_serializing_if = "is_zero")]
    pub step_clip: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// `optim.kind`: which optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// AdamW (β₁, β₂, ε, decoupled weight decay on matrices).
    #[default]
    AdamW,
    /// Adagrad with the per-parameter step clipping of Sukhbaatar et al.'s code.
    Adagrad,
}

impl OptimKind {
    fn is_adamw(&self) -> bool {
        *self == OptimKind::AdamW
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            kind: OptimKind::AdamW,
            step_clip: 0.0,
        }
    }
}

/// `[train]`: the loop, evaluation, checkpoints and where the run lands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `auto`, `flex`, `ndarray`, `wgpu` or `cuda` (the `--backend` flag overrides it).
    pub backend: String,
    /// Data-parallel devices (the `--devices` flag overrides it): each micro-batch's rows are
    /// split across them, every device runs forward and backward on its shard with a copy of
    /// the model, and the gradients are summed on the first (main) device, which steps the
    /// optimizer, evaluates and checkpoints. Entries: `flex`, `ndarray`, `wgpu`, `wgpu:N`,
    /// `cuda:N`, or a bare index `N` of `backend`'s GPUs. Empty: `backend`'s one device.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Optimiser steps in the whole run.
    pub steps: usize,
    /// Seed of the initialisation, the data sampler and per-step randomness (dropout).
    pub seed: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    pub grad_accum: usize,
    /// Evaluate on the validation split every this many steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Validation batches per periodic evaluation; 0 = the whole split. The evaluation at the
    /// end of training always covers the whole valid split (and the test split, if any).
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// Complete checkpoints kept; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Write the training loss to `metrics.jsonl` every this many steps.
    pub log_every: usize,
    /// `causal` (next-token prediction; causal mixers only) or `masked` (BERT-style masked LM:
    /// `mask_rate` of the positions chosen, 80% `[MASK]`, 10% random, 10% kept; the loss and
    /// bpc / ppl are over the chosen positions; the vocabulary gets one extra id, `[MASK]`).
    pub objective: Objective,
    /// Fraction of positions chosen per sequence by the masked objective.
    pub mask_rate: f64,
    /// What a non-finite loss or gradient norm does: `stop` (exit 1 naming the step; nothing is
    /// written for it, the last checkpoint stays) or `skip` (drop that update, count it, warn).
    pub on_nonfinite: NonFinite,
    /// Float precision of parameters and activations: `f32`, `f16` or `bf16` (flex has both
    /// halves; wgpu needs the adapter's f16 / bf16 support; ndarray has neither). The loss,
    /// the gradient norm and Fourier transforms are computed in f32 regardless.
    pub precision: Precision,
    /// Run directory; default `runs/<config file name without .toml>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
}

impl TrainConfig {
    /// The devices of the run, as `backend` and `devices` ask (`device::select_many`), each
    /// set to `precision` (`device::set_precision`). The first is the main device.
    pub fn select_devices(&self) -> Result<Vec<Selected>> {
        let mut all = select_many(BackendChoice::parse(&self.backend)?, &self.devices)?;
        for selected in &mut all {
            set_precision(selected, self.precision)?;
        }
        Ok(all)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            devices: vec![],
            steps: 1000,
            seed: 1337,
            batch_size: 16,
            grad_accum: 1,
            eval_every: 200,
            eval_batches: 20,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            log_every: 10,
            objective: Objective::Causal,
            mask_rate: 0.15,
            on_nonfinite: NonFinite::Stop,
            precision: Precision::F32,
            run_dir: None,
        }
    }
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Predict token t + 1 from tokens <= t.
    Causal,
    /// Reconstruct masked tokens from the corrupted sequence (both directions).
    Masked,
}

/// Policy for a step whose loss or gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Exit with an error naming the step.
    Stop,
    /// Drop the update (the step and its batches are consumed), count it and warn.
    Skip,
}

impl Config {
    /// Read `path` and apply `overrides` (`key=value`, value in TOML syntax; a bare word is taken
    /// as a string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parse TOML `text` (named `origin` in errors) and apply `overrides`.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| anyhow::anyhow!("{origin}: invalid TOML: {e}"))?;
        for item in overrides {
            apply_override(&mut doc, item)?;
        }
        let text = doc.to_string();
        let config: Config = toml::from_str(&text).map_err(|e| {
            let hint = if overrides.is_empty() {
                String::new()
            } else {
                format!(" (after --set {})", overrides.join(" --set "))
            };
            anyhow::anyhow!("{origin}{hint}: {e}")
        })?;
        Ok(config)
    }

    /// A model with a cache trains on contiguous streams, one per batch row, and scores
    /// next tokens.
    fn validate_cache(&self) -> Result<()> {
        if self.data.corpus == mixlab_data::Corpus::Copy {
            bail!(
                "model.cache with data.corpus = \"copy\": the copy task's rows are independent \
                 sequences, not streams a cache could follow; use a text corpus or remove \
                 [model.cache]"
            );
        }
        if self.data.sampler != mixlab_data::Sampler::Stream {
            bail!(
                "model.cache needs data.sampler = \"stream\" (each batch row one contiguous \
                 stream, the cache following it from step to step); the random sampler's \
                 windows have no text before them to cache"
            );
        }
        if self.train.objective != Objective::Causal {
            bail!(
                "model.cache with train.objective = \"masked\": the cache carries earlier \
                 positions of a left-to-right stream; use objective = \"causal\" or remove \
                 [model.cache]"
            );
        }
        if self.data.eval_streams == 0 {
            bail!("data.eval_streams = 0: must be at least 1 (the paper's is 8)");
        }
        Ok(())
    }

    /// Cross-section checks that the types alone cannot express; each error names the key.
    pub fn validate(&self) -> Result<()> {
        if self.train.precision == Precision::F16 && self.optim.eps < 6.2e-5 {
            bail!(
                "optim.eps = {:e} is below the smallest normal f16 number (6.1e-5), so with \
                 train.precision = \"f16\" AdamW would divide by zero: set optim.eps = 1e-4 \
                 (or use precision = \"bf16\", which has f32's range)",
                self.optim.eps
            );
        }
        if self.model.cache.is_some() {
            self.validate_cache()?;
        }
        let t = &self.train;
        for (key, value) in [
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.keep_checkpoints", t.keep_checkpoints),
            ("train.log_every", t.log_every),
        ] {
            if value == 0 {
                bail!("{key} = 0: must be at least 1");
            }
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr <= 1.0) {
            bail!("optim.lr = {}: must be in (0, 1]", o.lr);
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            bail!(
                "optim.min_lr = {}: must be in [0, optim.lr = {}]",
                o.min_lr,
                o.lr
            );
        }
        for (key, value) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&value) {
                bail!("{key} = {value}: must be in [0, 1)");
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 || o.weight_decay < 0.0 || o.grad_clip < 0.0 {
            bail!(
                "optim.eps must be > 0, optim.weight_decay and optim.grad_clip >= 0 \
                 (got {}, {}, {})",
                o.eps,
                o.weight_decay,
                o.grad_clip
            );
        }
        if o.step_clip.is_nan() || o.step_clip < 0.0 {
            bail!("optim.step_clip = {}: must be >= 0 (0 = off)", o.step_clip);
        }
        match o.kind {
            OptimKind::AdamW if o.step_clip > 0.0 => bail!(
                "optim.step_clip = {} is Adagrad's per-parameter step clipping: set \
                 optim.kind = \"adagrad\", or use optim.grad_clip (global) with AdamW",
                o.step_clip
            ),
            OptimKind::Adagrad if o.weight_decay > 0.0 => bail!(
                "optim.weight_decay = {} is AdamW's: set optim.weight_decay = 0 with \
                 optim.kind = \"adagrad\" (the paper's Adagrad has none)",
                o.weight_decay
            ),
            _ => {}
        }
        if t.objective == Objective::Causal && !self.model.is_causal() {
            bail!(
                "model.mixer.causal = false with train.objective = \"causal\": a bidirectional \
                 {} mixer lets position t see the token it must predict. Use \
                 train.objective = \"masked\" (masked-LM), or model.mixer.causal = true (for \
                 kind = \"fourier\": the causal Fourier variant)",
                self.model.kind()
            );
        }
        if !(t.mask_rate > 0.0 && t.mask_rate < 1.0) {
            bail!("train.mask_rate = {}: must be in (0, 1)", t.mask_rate);
        }
        let backend = crate::device::BackendChoice::parse(&t.backend)?;
        for entry in &t.devices {
            crate::device::parse_device(backend, entry)?;
        }
        if t.devices.len() > t.batch_size {
            bail!(
                "train.devices has {} devices but train.batch_size = {}: each device needs at \
                 least one row of every micro-batch; raise batch_size or list fewer devices",
                t.devices.len(),
                t.batch_size
            );
        }
        Ok(())
    }

    /// The resolved config as TOML (what a run directory stores and `--resume` trusts).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }

    /// SHA-256 of the `[model]` section: two checkpoints are interchangeable iff it matches.
    pub fn architecture_hash(&self) -> String {
        let text = toml::to_string(&self.model).expect("a model config always serialises");
        hex(&Sha256::digest(text.as_bytes()))
    }

    /// SHA-256 of the whole resolved config.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.to_toml().as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Apply one `a.b.c=value` to the document.
fn apply_override(doc: &mut toml_edit::DocumentMut, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item}: expected key=value, e.g. --set train.steps=200");
    };
    let key = key.trim();
    let raw = raw.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {item}: the key `{key}` has an empty part");
    }
    // A value is TOML (`200`, `true`, `"flex"`, `[1, 2]`); a bare word that is not TOML is a
    // string, so `--set train.backend=flex` works without quotes.
    let value: toml_edit::Value = raw.parse().unwrap_or_else(|_| toml_edit::Value::from(raw));
    let mut table = doc.as_table_mut();
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part)
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
        table = entry
            .as_table_mut()
            .with_context(|| format!("--set {item}: `{part}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1], toml_edit::Item::Value(value));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_an_empty_file() {
        let c = Config::parse("", "empty.toml", &[]).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let err = Config::parse("[model]\nd_model = 64\nd_modle = 3\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml"), "{err}");
        assert!(err.contains("d_modle"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = Config::parse("[train]\nsteps = \"many\"\n", "y.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("steps"), "{err}");
    }

    #[test]
    fn norm_placement_parses_and_a_wrong_one_names_key_line_and_choices() {
        let c = Config::parse("[model]\nnorm = \"post\"\n", "n.toml", &[]).unwrap();
        assert_eq!(c.model.norm, mixlab_models::NormPlacement::Post);
        assert_eq!(
            Config::default().model.norm,
            mixlab_models::NormPlacement::Pre
        );
        let err = Config::parse("[model]\nnorm = \"middle\"\n", "n.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("n.toml") && err.contains("line 2") && err.contains("norm"),
            "{err}"
        );
        assert!(err.contains("pre") && err.contains("post"), "{err}");
    }

    #[test]
    fn a_cache_parses_and_needs_stream_batches_of_a_text_corpus() {
        let text = "[model]\nposition = \"none\"\n[model.cache]\nspan = 64\nstart = \"masked\"\n\
                    [data]\ncorpus = \"text\"\nsampler = \"stream\"\n";
        let c = Config::parse(text, "c.toml", &[]).unwrap();
        let cache = c.model.cache.clone().unwrap();
        assert_eq!(cache.span, 64);
        assert_eq!(cache.start, mixlab_models::CacheStart::Masked);
        assert!(!cache.include_self);
        c.validate().unwrap();
        for (set, keys) in [
            (
                "data.sampler=random",
                &["model.cache", "data.sampler", "stream"][..],
            ),
            ("data.corpus=copy", &["model.cache", "data.corpus"][..]),
            (
                "train.objective=masked",
                &["model.cache", "train.objective"][..],
            ),
            ("data.eval_streams=0", &["data.eval_streams"][..]),
        ] {
            let err = Config::parse(text, "c.toml", &[set.into()])
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            for key in keys {
                assert!(err.contains(key), "--set {set}: {err}");
            }
        }
    }

    #[test]
    fn overrides_apply_before_typing() {
        let c = Config::parse(
            "[model.mixer]\nkind = \"dense\"\n[train]\nsteps = 5\n",
            "z.toml",
            &[
                "train.steps=200".into(),
                "train.backend=flex".into(),
                "model.mixer.n_heads=8".into(),
                "data.path=../shared/x.txt".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 200);
        assert_eq!(c.train.backend, "flex");
        assert_eq!(c.data.path.as_deref(), Some(Path::new("../shared/x.txt")));
        let mixlab_models::MixerConfig::Dense(d) = &c.model.mixer else {
            panic!("dense mixer expected");
        };
        assert_eq!(d.n_heads, 8);
        let err = Config::parse("", "z.toml", &["train.stepz=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("stepz") && err.contains("--set"), "{err}");
        assert!(Config::parse("", "z.toml", &["nokey".into()]).is_err());
    }

    #[test]
    fn resolved_config_round_trips() {
        let mut c = Config::default();
        c.model.vocab_size = Some(65);
        c.train.run_dir = Some("runs/x".into());
        let back = Config::parse(&c.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.hash(), c.hash());
    }

    #[test]
    fn validation_names_the_key() {
        let c = Config::parse("[optim]\nlr = 2.0\n", "v.toml", &[]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("optim.lr"));
        // Adagrad's step clipping belongs to Adagrad; AdamW's weight decay to AdamW.
        let c = Config::parse("[optim]\nstep_clip = 0.03\n", "v.toml", &[]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("optim.step_clip") && err.contains("adagrad"),
            "{err}"
        );
        let text = "[optim]\nkind = \"adagrad\"\nweight_decay = 0.1\n";
        let err = Config::parse(text, "v.toml", &[])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("optim.weight_decay"), "{err}");
        let text = "[optim]\nkind = \"adagrad\"\nweight_decay = 0.0\nstep_clip = 0.03\n";
        let c = Config::parse(text, "v.toml", &[]).unwrap();
        assert_eq!(
            (c.optim.kind, c.optim.step_clip),
            (OptimKind::Adagrad, 0.03)
        );
        let back = Config::parse(&c.to_toml(), "resolved", &[]).unwrap();
        assert_eq!(back, c);
        let c = Config::parse("[model.mixer]\nkind = \"fourier\"\n", "v.toml", &[]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("model.mixer.causal = false") && err.contains("fourier"),
            "{err}"
        );
        let c = Config::parse("[train]\nbackend = \"tpu\"\n", "v.toml", &[]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("flex"), "{err}");
    }

    #[test]
    fn every_shipped_config_parses_and_validates() {
        let dir = crate::crate_dir().join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(&path, &[]).unwrap();
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let mut model = c.model.clone();
                // What the data gives (word corpora: their published vocabularies).
                model.vocab_size.get_or_insert(match c.data.corpus.name() {
                    "wikitext-2" => 33_278,
                    "wikitext-103" => 267_735,
                    "ptb" => 10_000,
                    _ => 256,
                });
                model
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "configs/ should hold the shipped configs");
    }

    /// `configs/allattn.toml` builds the paper's small enwik8 model: 39M parameters (18 layers
    /// of 4·d² bias-free projections, 2·N·d persistent vectors and one LayerNorm, an untied 256-byte head
    /// with a bias, relative keys over the 8192-position span).
    #[test]
    fn the_allattn_config_is_the_papers_39m_model() {
        let path = crate::crate_dir().join("../../configs/allattn.toml");
        let mut model = Config::load(&path, &[]).unwrap().model;
        model.vocab_size = Some(256);
        use burn::module::Module;
        let lm = model.init(&burn::tensor::Device::flex()).unwrap();
        let (d, n, layers) = (512, 1024, 18);
        let per_layer = 4 * d * d + 2 * n * d + 2 * d + 8; // + its one LayerNorm, 8 spans
        let expected = layers * per_layer + 2 * 256 * d + 256 + 64 * 8192;
        assert_eq!(lm.num_params(), expected);
        assert!((38_000_000..40_000_000).contains(&expected), "{expected}");
    }

    /// `configs/wt103.toml` builds the paper's WikiText-103 all-attention model: 36 layers of
    /// bias-free projections, 2·N·d persistent vectors and one LayerNorm, relative keys over the
    /// 2048-position span, tied adaptive input and softmax over 267,735 words (cluster widths
    /// 512 / 128 / 32 / 8, projections for the tails, the head's cluster logits and biases):
    /// 132.3M parameters (the paper: 133M).
    #[test]
    fn the_wt103_config_is_the_papers_133m_model() {
        let path = crate::crate_dir().join("../../configs/wt103.toml");
        let mut model = Config::load(&path, &[]).unwrap().model;
        let vocab = 267_735;
        model.vocab_size = Some(vocab);
        use burn::module::Module;
        let lm = model.init(&burn::tensor::Device::flex()).unwrap();
        let (d, n, layers) = (512, 2048, 36);
        let per_layer = 4 * d * d + 2 * n * d + 2 * d + 8;
        let clusters = [
            (0, 20_000, 512),
            (20_000, 40_000, 128),
            (40_000, 200_000, 32),
        ];
        let mut embeddings = 0;
        for (start, end, width) in clusters.into_iter().chain([(200_000, vocab, 8)]) {
            embeddings += (end - start) * width + if width < d { width * d } else { 0 };
        }
        let softmax = 3 * d + (20_000 + 3) + (vocab - 20_000); // cluster logits, biases
        let expected = layers * per_layer + embeddings + softmax + 64 * 2048;
        assert_eq!(lm.num_params(), expected);
        assert!((132_000_000..133_500_000).contains(&expected), "{expected}");
    }

    /// `configs/fnet-paper.toml` builds FNet-Base as the paper and `transformers` define it:
    /// 32,000 ids (31,999 BPE tokens + [MASK]), word + position + 4 token-type embeddings with
    /// their LayerNorm and projection, 12 post-norm layers of two LayerNorms and a 768/3072
    /// FFN, the MLM transform and the decoder's bias: 82.9M parameters (the paper: 83M).
    #[test]
    fn the_fnet_paper_config_is_fnet_base() {
        let path = crate::crate_dir().join("../../configs/fnet-paper.toml");
        let config = Config::load(&path, &[]).unwrap();
        assert_eq!(config.train.objective, Objective::Masked);
        let mut model = config.model;
        assert_eq!(model.activation, mixlab_models::Activation::GeluNew);
        let vocab = config.data.bpe_vocab_size + 1; // + [MASK]
        assert_eq!(vocab, 32_000);
        model.vocab_size = Some(vocab);
        use burn::module::Module;
        let lm = model.init(&burn::tensor::Device::flex()).unwrap();
        let (d, ff, layers) = (768, 3072, 12);
        let embeddings = vocab * d + 512 * d + 4 * d + 2 * d + d * d + d;
        let per_layer = 2 * d + d * ff + ff + ff * d + d + 2 * d;
        let head = d * d + d + 2 * d + vocab;
        let expected = embeddings + layers * per_layer + head;
        assert_eq!(lm.num_params(), expected);
        assert_eq!(expected, 82_894_592);
    }

    /// Fuzzing the config loader (proptest): shipped configs with random edits, random
    /// `--set` overrides and line soup must parse-and-validate to a value or an error — never
    /// a panic — and an accepted config must also build its model's mixers' settings.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn shipped() -> Vec<String> {
            let dir = crate::crate_dir().join("../../configs");
            let mut texts: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| {
                    let p = e.ok()?.path();
                    (p.extension()? == "toml").then(|| std::fs::read_to_string(p).unwrap())
                })
                .collect();
            texts.sort();
            texts
        }

        fn check(text: &str, overrides: &[String]) {
            if let Ok(config) = Config::parse(text, "fuzz.toml", overrides)
                && config.validate().is_ok()
            {
                let mut model = config.model.clone();
                model.vocab_size.get_or_insert(7);
                let _ = model.validate();
                let _ = model.layer_mixers();
            }
        }

        proptest! {
            #[test]
            fn edited_shipped_configs_never_panic(
                pick in 0usize..64,
                edits in prop::collection::vec((0usize..4000, prop_oneof![
                    Just(String::new()),
                    Just("0".to_string()),
                    Just("-1".to_string()),
                    Just("\"".to_string()),
                    Just("[".to_string()),
                    Just("]".to_string()),
                    Just("=".to_string()),
                    Just("\n".to_string()),
                    Just("1e400".to_string()),
                    Just("nan".to_string()),
                    "[a-z_.]{1,8}",
                ]), 1..6),
            ) {
                let texts = shipped();
                let mut text = texts[pick % texts.len()].clone();
                for (at, insert) in edits {
                    let mut at = at % (text.len() + 1);
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    // Replace one character (or insert at the end).
                    let end = text[at..].chars().next().map_or(at, |c| at + c.len_utf8());
                    text.replace_range(at..end, &insert);
                }
                check(&text, &[]);
            }

            #[test]
            fn random_overrides_never_panic(
                key in prop_oneof![
                    Just("model.d_model"), Just("model.n_layers"), Just("model.seq_len"),
                    Just("model.mixer.n_heads"), Just("model.mixer.block"),
                    Just("model.mixer.kind"), Just("model.mixer"), Just("model.mixer.pattern"),
                    Just("data.corpus"), Just("data.valid_fraction"), Just("train.steps"),
                    Just("optim.lr"), Just("train.backend"), Just("model"), Just("x.y.z"),
                ],
                value in prop_oneof![
                    Just("0"), Just("-3"), Just("1"), Just("65536"), Just("1e308"), Just("nan"),
                    Just("\"sparse\""), Just("\"fourier\""), Just("[]"), Just("{}"),
                    Just("[{kind=\"window\",width=0}]"), Just("[{kind=\"heads\",of=[]}]"),
                    Just("{kind=\"sparse\",pattern=[{kind=\"strided\",stride=2}]}"),
                    Just("true"), Just("\"\""),
                ],
            ) {
                let texts = shipped();
                for text in &texts {
                    check(text, &[format!("{key}={value}")]);
                }
            }

            #[test]
            fn line_soup_never_panics(lines in prop::collection::vec(prop_oneof![
                Just("[model]"), Just("[model.mixer]"), Just("[data]"), Just("[train]"),
                Just("[[model.layers]]"), Just("[[model.mixer.pattern]]"), Just("kind = \"dense\""),
                Just("kind = \"sparse\""), Just("kind = \"window\""), Just("width = 3"),
                Just("d_model = 0"), Just("n_heads = 3"), Just("block = 0"), Just("steps = 5"),
                Just("seq_len = 1"), Just("corpus = \"copy\""), Just("x = ["), Just("= 1"),
            ], 0..12)) {
                check(&lines.join("\n"), &[]);
            }
        }
    }
}
