//! `LmConfig`: the `[model]` section, 1:1, its validation (errors name the key) and
//! `init`, which builds an [`Lm`].

use burn::module::Param;
use burn::nn::{DropoutConfig, EmbeddingConfig, Initializer, LayerNormConfig};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::model::Lm;
use crate::adaptive::AdaptiveConfig;
use crate::block::{BlockConfig, NormPlacement};
use crate::cache::{CacheConfig, CacheStart};
use crate::error::ModelError;
use crate::head::HeadTransform;
use crate::init;
use crate::mixer::{AttentionImpl, MixerConfig, MixerContext};
use crate::mlp::Activation;

/// How the model knows where a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// A learned absolute embedding per position, added to the token embedding (GPT-2).
    Learned,
    /// Rotary embedding of queries and keys inside attention mixers (Su et al. 2021).
    Rope,
    /// A learned relative-position key embedding `[d_head, seq_len]` shared by all layers
    /// (Sukhbaatar et al. 2019), for mixers that support it (`persistent`).
    Relative,
    /// No position information (only meaningful for mixers that carry their own).
    None,
}

/// Where the attention layers of a hybrid model sit (FNet's `attention_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionLayout {
    /// The last layers (nearest the output): the paper's FNet-Hybrid.
    Top,
    /// The first layers.
    Bottom,
    /// Centred in the stack.
    Middle,
    /// Spread evenly through the stack.
    Mixed,
}

/// Layer indices (input first) of `k` attention layers among `n` under `layout`.
pub fn attention_positions(layout: AttentionLayout, n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    match layout {
        AttentionLayout::Bottom => (0..k).collect(),
        AttentionLayout::Top => (n - k..n).collect(),
        AttentionLayout::Middle => ((n - k) / 2..(n - k) / 2 + k).collect(),
        AttentionLayout::Mixed => (0..k).map(|i| (2 * i + 1) * n / (2 * k)).collect(),
    }
}

/// The `[model]` section: everything needed to rebuild an [`Lm`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmConfig {
    /// Number of token ids. Left out, it is taken from the data (256 for bytes, the number of
    /// distinct characters for char-level text, symbols + 1 for the copy task).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Hidden width of each block's MLP; 0 builds blocks without an MLP.
    pub d_ff: usize,
    /// Context length: the longest sequence the model accepts (and the training window).
    pub seq_len: usize,
    /// Dropout on embeddings, attention weights and sublayer outputs (0 disables it).
    pub dropout: f64,
    /// Position information: `learned`, `rope` or `none`.
    pub position: Position,
    /// RoPE base frequency, used when `position = "rope"`.
    pub rope_theta: f32,
    /// Share the output head with the token embedding (with `[model.adaptive]` and adaptive
    /// input: the softmax scores with the input's cluster vectors and projections).
    pub tie_embeddings: bool,
    /// Biases in the attention mixers' query/key/value and output projections (GPT-2: yes;
    /// Sukhbaatar et al.'s all-attention: no).
    #[serde(skip_serializing_if = "is_true")]
    pub attention_bias: bool,
    /// A bias on the output layer: the untied head's own (Sukhbaatar et al.'s `out_emb`), or a
    /// vector of its own beside the tied embedding (BERT's and FNet's MLM decoder). GPT-2: none.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub head_bias: bool,
    /// The GELU of every MLP and of the head transform: `gelu` (exact, erf-based; the default)
    /// or `gelu_new` (the tanh approximation of GPT-2's, BERT's and FNet's code).
    #[serde(skip_serializing_if = "is_default")]
    pub activation: Activation,
    /// Token-type (segment) embeddings, a table of this many vectors (BERT: 2, FNet: 4) of
    /// which the first is added at every position (Mixlab's corpora are one segment; the others
    /// are there for fine-tuning on sentence pairs after export). 0: none.
    #[serde(skip_serializing_if = "is_zero")]
    pub token_types: usize,
    /// A LayerNorm over the summed embeddings, before the first block (BERT, FNet).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub embedding_norm: bool,
    /// A linear `d_model -> d_model` projection of the (normalised) embeddings (FNet).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub embedding_projection: bool,
    /// The masked-LM head's transform before the output layer: dense, GELU, LayerNorm (BERT,
    /// FNet).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub head_transform: bool,
    /// Where the blocks' LayerNorms sit: `pre` (GPT-2: before each sublayer, plus a final
    /// LayerNorm) or `post` (BERT, FNet, all-attention: after each residual add, no final
    /// LayerNorm).
    pub norm: NormPlacement,
    /// A cache of earlier positions for every attention layer (`[model.cache]`; segment-level
    /// recurrence): each query sees `span` keys back, across blocks of its stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// An adaptive softmax head, and adaptive input embeddings, over frequency clusters
    /// (`[model.adaptive]`: `cutoffs`, `div_val`, `input`) instead of a full softmax.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveConfig>,
    /// The token mixer of every block (unless `layers` or the hybrid keys say otherwise).
    pub mixer: MixerConfig,
    /// Per-layer mixers, input first (`[[model.layers]]` tables with a `kind`); when given it
    /// must list exactly `n_layers` mixers and replaces `mixer`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<MixerConfig>,
    /// Hybrid shorthand (FNet-Hybrid): this many layers use `attention` instead of `mixer`.
    pub num_attention_layers: usize,
    /// Where those layers sit: `top` (the paper's choice), `bottom`, `middle` or `mixed`.
    pub attention_layout: AttentionLayout,
    /// The attention mixer of the hybrid layers; default dense attention, 4 heads, as causal
    /// as `mixer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<MixerConfig>,
    /// How attention mixers compute softmax attention: `fused` (one tiled operation with its
    /// own backward where the backend has a kernel: flex) or `composed` (tensor ops).
    pub attention_impl: AttentionImpl,
}

fn is_true(value: &bool) -> bool {
    *value
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Default for LmConfig {
    fn default() -> Self {
        Self {
            vocab_size: None,
            d_model: 256,
            n_layers: 4,
            d_ff: 1024,
            seq_len: 256,
            dropout: 0.0,
            position: Position::Learned,
            rope_theta: 10_000.0,
            tie_embeddings: true,
            attention_bias: true,
            head_bias: false,
            activation: Activation::Gelu,
            token_types: 0,
            embedding_norm: false,
            embedding_projection: false,
            head_transform: false,
            norm: NormPlacement::Pre,
            cache: None,
            adaptive: None,
            mixer: MixerConfig::default(),
            layers: vec![],
            num_attention_layers: 0,
            attention_layout: AttentionLayout::Top,
            attention: None,
            attention_impl: AttentionImpl::Fused,
        }
    }
}

impl LmConfig {
    fn mixer_context(&self) -> MixerContext {
        MixerContext {
            d_model: self.d_model,
            n_layers: self.n_layers,
            dropout: self.dropout,
            // RoPE rotates by position within `[cache ; block]`.
            max_seq_len: self.seq_len + self.cache_span(),
            rope_theta: (self.position == Position::Rope).then_some(self.rope_theta),
            relative_positions: self.position == Position::Relative,
            bias: self.attention_bias,
            layer: 0,
            fused_attention: self.attention_impl == AttentionImpl::Fused,
        }
    }

    /// The cache's span, 0 without a cache.
    pub fn cache_span(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.span)
    }

    /// Distances the relative-position keys cover: the window length (`seq_len`, or the
    /// cache's span when larger).
    pub fn relative_distances(&self) -> usize {
        self.seq_len.max(self.cache_span())
    }

    /// The mixer of each layer, input first, after `layers` and the hybrid shorthand.
    pub fn layer_mixers(&self) -> Result<Vec<MixerConfig>, ModelError> {
        if !self.layers.is_empty() {
            if self.layers.len() != self.n_layers {
                return Err(ModelError::invalid(
                    "layers",
                    format!("[{} mixers]", self.layers.len()),
                    format!("list exactly n_layers = {} mixers", self.n_layers),
                ));
            }
            if self.num_attention_layers > 0 {
                return Err(ModelError::invalid(
                    "num_attention_layers",
                    self.num_attention_layers,
                    "use either model.layers or the hybrid shorthand, not both",
                ));
            }
            return Ok(self.layers.clone());
        }
        if self.num_attention_layers > self.n_layers {
            return Err(ModelError::invalid(
                "num_attention_layers",
                self.num_attention_layers,
                format!("at most n_layers = {}", self.n_layers),
            ));
        }
        let attention = self.attention.clone().unwrap_or_else(|| {
            MixerConfig::Dense(crate::mixer::DenseAttentionConfig {
                n_heads: 4,
                causal: self.mixer.is_causal(),
            })
        });
        let mut mixers = vec![self.mixer.clone(); self.n_layers];
        for i in attention_positions(
            self.attention_layout,
            self.n_layers,
            self.num_attention_layers,
        ) {
            mixers[i] = attention.clone();
        }
        Ok(mixers)
    }

    /// Whether every layer is causal (position t sees only positions <= t).
    pub fn is_causal(&self) -> bool {
        self.layer_mixers()
            .map(|m| m.iter().all(MixerConfig::is_causal))
            .unwrap_or(false)
    }

    /// The mixer kind, or `hybrid` when the layers differ.
    pub fn kind(&self) -> &'static str {
        match self.layer_mixers() {
            Ok(m) if m.iter().all(|x| x.kind() == m[0].kind()) => m[0].kind(),
            _ => "hybrid",
        }
    }

    /// Check every field; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self.vocab_size {
            None => {
                return Err(ModelError::invalid(
                    "vocab_size",
                    "(unset)",
                    "set it, or let the data fill it in",
                ));
            }
            Some(0) => return Err(ModelError::invalid("vocab_size", 0, "must be at least 1")),
            Some(_) => {}
        }
        for (field, value) in [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("seq_len", self.seq_len),
        ] {
            if value == 0 {
                return Err(ModelError::invalid(field, 0, "must be at least 1"));
            }
        }
        if let Some(adaptive) = &self.adaptive {
            adaptive.validate("adaptive", self.vocab_size.expect("checked"), self.d_model)?;
            if self.tie_embeddings && !adaptive.input {
                return Err(ModelError::invalid(
                    "adaptive.input",
                    false,
                    "a tied adaptive softmax scores with the adaptive input's clusters: set \
                     input = true, or model.tie_embeddings = false for a softmax of its own",
                ));
            }
            if self.head_bias {
                return Err(ModelError::invalid(
                    "head_bias",
                    true,
                    "the adaptive softmax always has biases of its own: leave head_bias out \
                     with [model.adaptive]",
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::invalid(
                "dropout",
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        if self.position == Position::Rope && (self.rope_theta.is_nan() || self.rope_theta <= 0.0) {
            return Err(ModelError::invalid(
                "rope_theta",
                self.rope_theta,
                "must be positive",
            ));
        }
        let ctx = self.mixer_context();
        let mixers = self.layer_mixers()?;
        for mixer in &mixers {
            mixer.validate(&ctx)?;
        }
        if let Some(cache) = &self.cache {
            cache.validate()?;
            if let Some(m) = mixers.iter().find(|m| !m.takes_cache()) {
                return Err(ModelError::invalid(
                    "cache",
                    "{ .. }",
                    format!(
                        "a cache of earlier positions is for dense and persistent attention, \
                         not kind = \"{}\": leave [model.cache] out",
                        m.kind()
                    ),
                ));
            }
            if self.position == Position::Learned {
                return Err(ModelError::invalid(
                    "position",
                    "\"learned\"",
                    "a cache needs positions that move with the query: use \"relative\" \
                     (persistent), \"rope\" or \"none\" with [model.cache]",
                ));
            }
        }
        if self.position == Position::Relative {
            let widths: Vec<usize> = mixers
                .iter()
                .filter_map(|m| m.d_head(self.d_model))
                .collect();
            if widths.is_empty() || widths.iter().any(|&w| w != widths[0]) {
                return Err(ModelError::invalid(
                    "position",
                    "\"relative\"",
                    "relative-position keys need attention layers with one head width",
                ));
            }
        }
        Ok(())
    }

    /// Validate, then build the model on `device` (seed the device first for a reproducible
    /// initialisation).
    pub fn init(&self, device: &Device) -> Result<Lm, ModelError> {
        self.validate()?;
        let vocab_size = self.vocab_size.expect("validated");
        let embedding = |n| {
            EmbeddingConfig::new(n, self.d_model)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: init::STD,
                })
                .init(device)
        };
        let mixers = self.layer_mixers()?;
        let block = |layer: usize, mixer: &MixerConfig| BlockConfig {
            mixer: mixer.clone(),
            ctx: MixerContext {
                layer,
                ..self.mixer_context()
            },
            d_ff: (self.d_ff > 0).then_some(self.d_ff),
            norm: self.norm,
            activation: self.activation,
        };
        let adaptive_input = self
            .adaptive
            .as_ref()
            .filter(|a| a.input)
            .map(|a| a.init_clusters(vocab_size, self.d_model, device));
        let adaptive_softmax = self
            .adaptive
            .as_ref()
            .map(|a| a.init_softmax(vocab_size, self.d_model, self.tie_embeddings, device));
        Ok(Lm {
            token_embedding: adaptive_input.is_none().then(|| embedding(vocab_size)),
            adaptive_input,
            pos_embedding: (self.position == Position::Learned).then(|| embedding(self.seq_len)),
            type_embedding: (self.token_types > 0).then(|| embedding(self.token_types)),
            embedding_norm: self
                .embedding_norm
                .then(|| LayerNormConfig::new(self.d_model).init(device)),
            embedding_projection: self
                .embedding_projection
                .then(|| init::linear(self.d_model, self.d_model, true, init::STD, device)),
            key_pe: (self.position == Position::Relative).then(|| {
                let d_head = mixers
                    .iter()
                    .find_map(|m| m.d_head(self.d_model))
                    .expect("validated");
                Param::from_tensor(Tensor::random(
                    [d_head, self.relative_distances()],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ))
            }),
            dropout: DropoutConfig::new(self.dropout).init(),
            blocks: mixers
                .iter()
                .enumerate()
                .map(|(layer, m)| block(layer, m).init(device))
                .collect(),
            norm_final: (self.norm == NormPlacement::Pre)
                .then(|| LayerNormConfig::new(self.d_model).init(device)),
            head_transform: self
                .head_transform
                .then(|| HeadTransform::init(self.d_model, self.activation, device)),
            head: (!self.tie_embeddings && adaptive_softmax.is_none())
                .then(|| init::linear(self.d_model, vocab_size, self.head_bias, init::STD, device)),
            tied_bias: (self.tie_embeddings && self.head_bias && adaptive_softmax.is_none())
                .then(|| Param::from_tensor(Tensor::zeros([vocab_size], device))),
            adaptive_softmax,
            d_model: self.d_model,
            seq_len: self.seq_len,
            cache_span: self.cache_span(),
            cache_self: self.cache.as_ref().is_some_and(|c| c.include_self),
            cache_masked: self
                .cache
                .as_ref()
                .is_some_and(|c| c.start == CacheStart::Masked),
        })
    }
}
