//! The language model: token embedding (a table, or adaptive input clusters), position
//! information (and BERT/FNet's token types, embedding LayerNorm and projection), `n_layers`
//! [`Block`]s (pre- or post-norm), a final LayerNorm (pre-norm only), an MLM head transform
//! (optional) and an output head (a full softmax or an adaptive softmax, tied to the input
//! embedding or not, with or without a bias).

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear,
};
use burn::tensor::{Device, Distribution, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::adaptive::{AdaptiveConfig, AdaptiveSoftmax, Clusters};
use crate::block::{Block, BlockConfig, NormPlacement};
use crate::cache::{CacheConfig, CacheStart, CacheView, LmCache, Window};
use crate::head::HeadTransform;
use crate::mixer::{AttentionImpl, MixerConfig, MixerContext};
use crate::mlp::Activation;
use crate::{ModelError, init};

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

/// A decoder (or, with a bidirectional mixer, encoder) language model.
#[derive(Module, Debug)]
pub struct Lm {
    /// `[vocab, d_model]` token embedding; `None` with adaptive input.
    pub token_embedding: Option<Embedding>,
    /// Adaptive input embeddings (`model.adaptive.input`), which a tied adaptive softmax
    /// also scores with.
    pub adaptive_input: Option<Clusters>,
    /// `[seq_len, d_model]` learned absolute positions, when `position = "learned"`.
    pub pos_embedding: Option<Embedding>,
    /// `[token_types, d_model]` token-type embeddings (`model.token_types`); the first is added
    /// at every position.
    pub type_embedding: Option<Embedding>,
    /// LayerNorm over the summed embeddings (`model.embedding_norm`).
    pub embedding_norm: Option<LayerNorm>,
    /// `d_model -> d_model` projection of the embeddings (`model.embedding_projection`).
    pub embedding_projection: Option<Linear>,
    /// `[d_head, seq_len]` relative-position keys shared by every block, when
    /// `position = "relative"` (index = distance between query and key).
    pub key_pe: Option<Param<Tensor<2>>>,
    /// Dropout on the summed embeddings.
    pub dropout: Dropout,
    /// The blocks, input first.
    pub blocks: Vec<Block>,
    /// LayerNorm before the head (pre-norm models; a post-norm model's last block ends in one).
    pub norm_final: Option<LayerNorm>,
    /// The MLM head's transform before the output layer (`model.head_transform`).
    pub head_transform: Option<HeadTransform>,
    /// Untied output head `d_model -> vocab`; `None` when tied to `token_embedding` or with an
    /// adaptive softmax.
    pub head: Option<Linear>,
    /// `[vocab]` bias of the tied output layer (`model.head_bias` with `tie_embeddings`).
    pub tied_bias: Option<Param<Tensor<1>>>,
    /// The adaptive softmax head (`[model.adaptive]`).
    pub adaptive_softmax: Option<AdaptiveSoftmax>,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Longest sequence accepted.
    pub seq_len: usize,
    /// Keys a query sees back through the cache (`model.cache.span`); 0: no cache.
    pub cache_span: usize,
    /// Whether a cached query is one of its own keys.
    pub cache_self: bool,
    /// Whether a stream's start is masked (else zero vectors).
    pub cache_masked: bool,
}

impl Lm {
    /// Penalties the mixers add to the training loss (adaptive span), summed; `None` if none.
    pub fn regularization(&self) -> Option<Tensor<1>> {
        self.blocks
            .iter()
            .filter_map(|b| b.mixer.regularization(self.span_basis()))
            .reduce(|a, b| a + b)
    }

    /// The learned attention span of every head, in tokens, per layer (input first); an empty
    /// list for a layer without adaptive span.
    pub fn learned_spans(&self) -> Vec<Vec<f32>> {
        self.blocks
            .iter()
            .map(|b| match &b.mixer {
                crate::mixer::Mixer::Persistent(m) => {
                    m.spans(self.span_basis()).unwrap_or_default()
                }
                _ => vec![],
            })
            .collect()
    }

    /// What an adaptive span's fraction is a fraction of: the cache's span, or `seq_len`.
    pub fn span_basis(&self) -> usize {
        if self.cache_span > 0 {
            self.cache_span
        } else {
            self.seq_len
        }
    }

    /// The window of every cached query, if the model has a cache.
    pub fn window(&self) -> Option<Window> {
        (self.cache_span > 0).then_some(Window {
            span: self.cache_span,
            include_self: self.cache_self,
        })
    }

    /// The cache of `batch` streams at their start: zero vectors (`start = "zeros"`, all
    /// valid) or nothing valid (`"masked"`); `None` without a cache.
    pub fn new_cache(&self, batch: usize, device: &Device) -> Option<LmCache> {
        let span = self.window()?.span;
        let d_model = self.d_model;
        Some(LmCache {
            layers: (0..self.blocks.len())
                .map(|_| Tensor::zeros([batch, span, d_model], device))
                .collect(),
            valid: vec![if self.cache_masked { 0 } else { span }; batch],
        })
    }

    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`
    /// - output: `[batch, seq, vocab]` logits (with an adaptive softmax: the
    ///   log-probabilities, logits whose log-sum-exp is 0)
    ///
    /// A model with a cache sees `tokens` as the start of `batch` streams (a fresh
    /// [`new_cache`](Self::new_cache)); [`forward_cached`](Self::forward_cached) continues one.
    /// Training and evaluation read [`hidden`](Self::hidden) and [`nll_sum`](Self::nll_sum)
    /// instead, which an adaptive softmax computes without a `[batch, seq, vocab]` tensor.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.logits(self.hidden(tokens, None).0)
    }

    /// The next block of `batch` streams after `cache`: the logits, and the cache for the block
    /// after it (each layer's last `span` inputs over `[cache ; block]`, detached: no gradient
    /// reaches earlier blocks).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`; `cache` of `batch` rows
    /// - output: `[batch, seq, vocab]` logits
    ///
    /// # Panics
    /// Without a cache (`model.cache`), or with one of another batch size or layer count.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &LmCache) -> (Tensor<3>, LmCache) {
        assert!(self.window().is_some(), "forward_cached needs model.cache");
        let (h, next) = self.hidden(tokens, Some(cache));
        (self.logits(h), next.expect("a model with a cache"))
    }

    /// The hidden states the head reads (after the final LayerNorm of a pre-norm model and the
    /// head transform of an MLM head), and
    /// for a model with a cache the cache for the next block: `cache` continues `batch`
    /// streams, `None` starts them (a fresh [`new_cache`](Self::new_cache)).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`; `cache` of `batch` rows
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    /// With a cache of another batch size or layer count, or one given to a model without
    /// `model.cache`.
    pub fn hidden(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&LmCache>,
    ) -> (Tensor<3>, Option<LmCache>) {
        let fresh;
        let cache = match (cache, self.window()) {
            (Some(cache), Some(_)) => cache,
            (None, Some(_)) => {
                fresh = self
                    .new_cache(tokens.dims()[0], &tokens.device())
                    .expect("a window");
                &fresh
            }
            (Some(_), None) => panic!("a cache given to a model without model.cache"),
            (None, None) => {
                let (mut x, key_pe) = self.embed(tokens);
                for block in &self.blocks {
                    x = block.forward(x, key_pe.as_ref());
                }
                return (self.final_norm(x), None);
            }
        };
        let window = self.window().expect("matched");
        let [batch, seq] = tokens.dims();
        assert!(
            cache.batch() == batch && cache.layers.len() == self.blocks.len(),
            "a cache of {} rows and {} layers for {batch} rows and {} layers",
            cache.batch(),
            cache.layers.len(),
            self.blocks.len()
        );
        let view = CacheView {
            window,
            valid: cache.valid.clone(),
        };
        let (mut x, key_pe) = self.embed(tokens);
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (block, past) in self.blocks.iter().zip(&cache.layers) {
            // The next cache, the last `span` rows of `[past ; x]`, without building the whole.
            let span = past.dims()[1];
            let next = if seq >= span {
                x.clone().narrow(1, seq - span, span)
            } else {
                Tensor::cat(vec![past.clone().narrow(1, seq, span - seq), x.clone()], 1)
            };
            layers.push(next.detach());
            x = block.forward_cached(x, past.clone(), key_pe.as_ref(), &view);
        }
        let valid = cache
            .valid
            .iter()
            .map(|v| (v + seq).min(window.span))
            .collect();
        (self.final_norm(x), Some(LmCache { layers, valid }))
    }

    /// The head's scores of every word from hidden states `[batch, seq, d_model]`:
    /// `[batch, seq, vocab]` logits (an adaptive softmax gives its log-probabilities).
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_model] = h.dims();
        match (&self.adaptive_softmax, &self.head, &self.token_embedding) {
            (Some(softmax), _, _) => {
                let lp = softmax.log_probs(
                    self.adaptive_input.as_ref(),
                    h.reshape([batch * seq, d_model]),
                );
                let vocab = lp.dims()[1];
                lp.reshape([batch, seq, vocab])
            }
            (None, Some(head), _) => crate::ops::linear::forward(head, h),
            // Tied head: logits = h · Eᵀ, `[batch·seq, d_model] x [d_model, vocab]`.
            (None, None, Some(embedding)) => {
                let logits = crate::ops::linear::matmul_rows(h, embedding.weight.val().transpose());
                match &self.tied_bias {
                    Some(bias) => logits + bias.val().unsqueeze::<3>(),
                    None => logits,
                }
            }
            (None, None, None) => unreachable!("adaptive input comes with an adaptive softmax"),
        }
    }

    /// The summed negative log-likelihood (nats) of `targets` given hidden states `h` (from
    /// [`hidden`](Self::hidden)), each position's multiplied by its weight when `weights` is
    /// given: the full softmax through [`cross_entropy_sum`](crate::loss::cross_entropy_sum),
    /// an adaptive softmax with each tail only for the positions whose target is in it.
    ///
    /// # Shapes
    /// - `h`: `[batch, seq, d_model]`; `targets`, `weights`: `[batch, seq]`
    /// - output: `[1]`
    pub fn nll_sum(
        &self,
        h: Tensor<3>,
        targets: Tensor<2, Int>,
        weights: Option<Tensor<2>>,
    ) -> Tensor<1> {
        match &self.adaptive_softmax {
            Some(softmax) => {
                let [batch, seq, d_model] = h.dims();
                let rows = batch * seq;
                softmax.nll(
                    self.adaptive_input.as_ref(),
                    h.reshape([rows, d_model]),
                    targets.reshape([rows]),
                    weights.map(|w| w.reshape([rows])),
                )
            }
            None => crate::loss::cross_entropy_sum(self.logits(h), targets, weights),
        }
    }

    /// Token embedding plus learned positions and the first token type, then the embedding
    /// LayerNorm and projection, dropout; and the relative-position keys.
    fn embed(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Option<Tensor<2>>) {
        let [batch, seq] = tokens.dims();
        assert!(
            seq <= self.seq_len,
            "sequence of {seq} tokens is longer than the model's seq_len {}",
            self.seq_len
        );
        let device = tokens.device();
        let mut x = match (&self.token_embedding, &self.adaptive_input) {
            (Some(table), _) => table.forward(tokens), // [batch, seq, d_model]
            (None, Some(clusters)) => clusters.embed(tokens),
            (None, None) => unreachable!("every model has an input embedding"),
        };
        if let Some(pos) = &self.pos_embedding {
            let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
            let [_, _, d_model] = x.dims();
            x = x + pos.forward(positions).expand([batch, seq, d_model]);
        }
        if let Some(types) = &self.type_embedding {
            // Every position is of the first type: one segment.
            let first = types.weight.val().narrow(0, 0, 1); // [1, d_model]
            x = x + first.unsqueeze::<3>();
        }
        if let Some(norm) = &self.embedding_norm {
            x = crate::ops::norm::layer_norm(norm, x);
        }
        if let Some(projection) = &self.embedding_projection {
            x = crate::ops::linear::forward(projection, x);
        }
        let key_pe = self.key_pe.as_ref().map(|p| p.val());
        (self.dropout.forward(x), key_pe)
    }

    /// The final LayerNorm of a pre-norm model, then the MLM head's transform.
    fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.norm_final {
            Some(norm) => crate::ops::norm::layer_norm(norm, x),
            None => x,
        };
        match &self.head_transform {
            Some(transform) => transform.forward(x),
            None => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::cross_entropy_sum;
    use crate::mixer::DenseAttentionConfig;
    use crate::test_util::{assert_all_close, devices, to_vec, tokens};
    use burn::module::{ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::TensorData;

    fn tiny(position: Position, tie: bool) -> LmConfig {
        LmConfig {
            vocab_size: Some(11),
            d_model: 16,
            n_layers: 2,
            d_ff: 32,
            seq_len: 8,
            dropout: 0.0,
            position,
            rope_theta: 10_000.0,
            tie_embeddings: tie,
            mixer: MixerConfig::Dense(DenseAttentionConfig {
                n_heads: 4,
                causal: true,
            }),
            ..LmConfig::default()
        }
    }

    #[test]
    fn logits_have_shape_batch_seq_vocab() {
        for (name, device) in devices() {
            for (position, tie) in [
                (Position::Learned, true),
                (Position::Rope, false),
                (Position::None, true),
            ] {
                let model = tiny(position, tie).init(&device).unwrap();
                let logits = model.forward(tokens(3, 5, 11, 0, &device));
                assert_eq!(logits.dims(), [3, 5, 11], "{name} {position:?}");
                assert!(to_vec(logits).iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn future_tokens_do_not_change_past_logits_exactly() {
        for (name, device) in devices() {
            for (position, norm) in [
                (Position::Learned, NormPlacement::Pre),
                (Position::Rope, NormPlacement::Pre),
                (Position::Learned, NormPlacement::Post),
            ] {
                device.seed(11);
                let model = LmConfig {
                    norm,
                    ..tiny(position, true)
                }
                .init(&device)
                .unwrap();
                let (batch, seq, vocab) = (2, 8, 11);
                let a = tokens(batch, seq, vocab, 1, &device);
                for t in 0..seq - 1 {
                    // Change every token after position t.
                    let mut ids = a.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
                    for b in 0..batch {
                        for s in t + 1..seq {
                            ids[b * seq + s] = (ids[b * seq + s] + 3) % vocab as i64;
                        }
                    }
                    let changed = Tensor::<2, Int>::from_data(
                        burn::tensor::TensorData::new(ids, [batch, seq]),
                        &device,
                    );
                    let la = to_vec(model.forward(a.clone()));
                    let lb = to_vec(model.forward(changed));
                    for b in 0..batch {
                        for s in 0..seq {
                            let row = |l: &[f32]| {
                                l[(b * seq + s) * vocab..(b * seq + s + 1) * vocab].to_vec()
                            };
                            if s <= t {
                                assert_eq!(
                                    row(&la),
                                    row(&lb),
                                    "{name} {position:?}: t={t} leaked into s={s}"
                                );
                            } else if s == t + 1 {
                                assert_ne!(
                                    row(&la),
                                    row(&lb),
                                    "{name}: position {s} should see its own token"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_parameter_receives_a_nonzero_gradient() {
        struct Check<'a> {
            grads: &'a GradientsParams,
            path: Vec<String>,
            missing: Vec<String>,
            count: usize,
        }
        impl ModuleVisitor for Check<'_> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.into());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.count += 1;
                let norm = self
                    .grads
                    .get::<D>(param.id)
                    .map_or(0.0, |g| g.abs().sum().into_scalar::<f32>());
                if norm.is_nan() || norm <= 0.0 {
                    self.missing.push(self.path.join("."));
                }
            }
        }
        for (name, device) in devices() {
            // `paper`: Sukhbaatar et al.'s biases (none in the projections, one on the head).
            for (position, tie, norm, paper) in [
                (Position::Learned, true, NormPlacement::Pre, false),
                (Position::Rope, false, NormPlacement::Pre, false),
                (Position::Learned, false, NormPlacement::Post, false),
                (Position::None, false, NormPlacement::Post, true),
            ] {
                let ad = device.clone().autodiff();
                ad.seed(5);
                let model = LmConfig {
                    norm,
                    attention_bias: !paper,
                    head_bias: paper,
                    ..tiny(position, tie)
                }
                .init(&ad)
                .unwrap();
                let loss = cross_entropy_sum(
                    model.forward(tokens(2, 8, 11, 2, &ad)),
                    tokens(2, 8, 11, 3, &ad),
                    None,
                );
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let mut check = Check {
                    grads: &grads,
                    path: vec![],
                    missing: vec![],
                    count: 0,
                };
                model.visit(&mut check);
                assert!(check.count >= 10, "{name}: visited {} params", check.count);
                assert!(
                    check.missing.is_empty(),
                    "{name} {position:?}: no gradient for {:?}",
                    check.missing
                );
            }
        }
    }

    #[test]
    fn projection_and_head_biases_follow_the_config() {
        let device = Device::flex();
        let count = |c: LmConfig| c.init(&device).unwrap().num_params();
        let base = tiny(Position::Learned, false);
        let p = count(base.clone());
        // 2 layers x (3·16 query/key/value + 16 output) biases.
        let no_bias = LmConfig {
            attention_bias: false,
            ..base.clone()
        };
        assert_eq!(count(no_bias.clone()), p - 2 * 64);
        let model = no_bias.init(&device).unwrap();
        let attn = match &model.blocks[0].mixer {
            crate::mixer::Mixer::Dense(a) => a,
            other => panic!("{other:?}"),
        };
        assert!(attn.qkv.bias.is_none() && attn.proj.bias.is_none());
        let head_bias = LmConfig {
            head_bias: true,
            ..base.clone()
        };
        assert_eq!(
            count(head_bias.clone()),
            p + 11,
            "one bias per vocabulary entry"
        );
        // The head's bias is added to every position's logits.
        let mut model = head_bias.init(&device).unwrap();
        let x = tokens(2, 8, 11, 1, &device);
        let before = to_vec(model.forward(x.clone()));
        let head = model.head.as_mut().unwrap();
        let b = head.bias.take().unwrap();
        head.bias = Some(Param::from_tensor(b.val().add_scalar(0.5)));
        let after = to_vec(model.forward(x));
        for (a, b) in before.iter().zip(&after) {
            assert!((b - a - 0.5).abs() < 1e-5, "{a} -> {b}");
        }
        // A tied head's bias (BERT's and FNet's decoder) is a vector of its own, added too.
        let tied = tiny(Position::Learned, true);
        let tied_bias = LmConfig {
            head_bias: true,
            ..tied.clone()
        };
        assert_eq!(count(tied_bias.clone()), count(tied) + 11);
        let mut model = tied_bias.init(&device).unwrap();
        let x = tokens(2, 8, 11, 1, &device);
        let before = to_vec(model.forward(x.clone()));
        let b = model.tied_bias.take().unwrap();
        let shift = Tensor::<1, Int>::arange(0..11, &device).float() * 0.25;
        model.tied_bias = Some(Param::from_tensor(b.val() + shift));
        let after = to_vec(model.forward(x));
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let expected = 0.25 * (i % 11) as f32;
            assert!((b - a - expected).abs() < 1e-5, "{i}: {a} -> {b}");
        }
    }

    /// FNet's published model (`configs/fnet-paper.toml`'s options) computes what
    /// `transformers`' FNetForMaskedLM does: `x = LN(E[t] + P[pos] + T[0])`, projected; the
    /// post-norm blocks; `h = LN(gelu_new(dense(x)))`; logits `h · Eᵀ + b`. Checked against
    /// those formulas from tensor ops (a LayerNorm of our own, not the fused kernel), with
    /// non-trivial norm parameters and biases so a misplaced piece shows.
    #[test]
    fn fnet_paper_options_compute_their_formulas() {
        fn reference_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
            let mean = x.clone().mean_dim(2);
            let centred = x - mean;
            let var = centred.clone().powi_scalar(2).mean_dim(2);
            let y = centred / var.add_scalar(1e-5).sqrt();
            y * norm.gamma.val().unsqueeze::<3>()
                + norm.beta.as_ref().unwrap().val().unsqueeze::<3>()
        }
        fn jiggle(norm: &mut LayerNorm, device: &Device) {
            let d = norm.gamma.val().dims()[0];
            norm.gamma =
                Param::from_tensor(Tensor::random([d], Distribution::Uniform(0.5, 1.5), device));
            norm.beta = Some(Param::from_tensor(Tensor::random(
                [d],
                Distribution::Uniform(-0.5, 0.5),
                device,
            )));
        }
        let linear = |l: &Linear, x: Tensor<3>| {
            x.matmul(l.weight.val().unsqueeze::<3>())
                + l.bias.as_ref().unwrap().val().unsqueeze::<3>()
        };
        for (name, device) in devices() {
            let config = LmConfig {
                norm: NormPlacement::Post,
                activation: Activation::GeluNew,
                token_types: 4,
                embedding_norm: true,
                embedding_projection: true,
                head_transform: true,
                head_bias: true,
                mixer: MixerConfig::Fourier(crate::mixer::FourierMixerConfig::default()),
                ..tiny(Position::Learned, true)
            };
            device.seed(5);
            let mut model = config.init(&device).unwrap();
            jiggle(model.embedding_norm.as_mut().unwrap(), &device);
            let transform = model.head_transform.as_mut().unwrap();
            jiggle(&mut transform.norm, &device);
            transform.dense.bias = Some(Param::from_tensor(Tensor::random(
                [16],
                Distribution::Normal(0.0, 0.5),
                &device,
            )));
            model.tied_bias = Some(Param::from_tensor(Tensor::random(
                [11],
                Distribution::Normal(0.0, 1.0),
                &device,
            )));
            let ids = tokens(2, 8, 11, 3, &device);
            let table = model.token_embedding.as_ref().unwrap().weight.val();
            let rows: Vec<i64> = ids
                .clone()
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .unwrap();
            let gathered = table.clone().select(
                0,
                Tensor::<1, Int>::from_data(TensorData::new(rows, [16]), &device),
            );
            let x = gathered.reshape([2, 8, 16])
                + model
                    .pos_embedding
                    .as_ref()
                    .unwrap()
                    .weight
                    .val()
                    .unsqueeze::<3>()
                + model
                    .type_embedding
                    .as_ref()
                    .unwrap()
                    .weight
                    .val()
                    .narrow(0, 0, 1)
                    .unsqueeze::<3>();
            let x = reference_norm(model.embedding_norm.as_ref().unwrap(), x);
            let mut x = linear(model.embedding_projection.as_ref().unwrap(), x);
            for block in &model.blocks {
                x = block.forward(x, None);
            }
            let t = model.head_transform.as_ref().unwrap();
            let h = reference_norm(&t.norm, crate::mlp::gelu_new(linear(&t.dense, x)));
            let want = h.matmul(table.transpose().unsqueeze::<3>())
                + model.tied_bias.as_ref().unwrap().val().unsqueeze::<3>();
            assert_all_close(&to_vec(model.forward(ids)), &to_vec(want), 1e-4, name);
        }
    }

    #[test]
    fn post_norm_model_has_no_final_norm_and_ends_in_its_last_blocks_norm() {
        for (name, device) in devices() {
            let pre = tiny(Position::Learned, false).init(&device).unwrap();
            let post_config = LmConfig {
                norm: NormPlacement::Post,
                ..tiny(Position::Learned, false)
            };
            let post = post_config.init(&device).unwrap();
            assert!(pre.norm_final.is_some() && post.norm_final.is_none());
            assert!(post.blocks.iter().all(|b| b.post_norm));
            assert!(pre.blocks.iter().all(|b| !b.post_norm));
            assert_eq!(
                pre.num_params() - post.num_params(),
                2 * 16,
                "{name}: the final norm's gamma and beta"
            );
            // The logits are the head applied to the last block's (normalised) output.
            let ids = tokens(2, 8, 11, 6, &device);
            let mut x = post.token_embedding.as_ref().unwrap().forward(ids.clone());
            let positions = Tensor::<1, Int>::arange(0..8, &device).reshape([1, 8]);
            x = x + post
                .pos_embedding
                .as_ref()
                .unwrap()
                .forward(positions)
                .expand([2, 8, 16]);
            for block in &post.blocks {
                x = block.forward(x, None);
            }
            let head = post.head.as_ref().unwrap();
            let expected = to_vec(head.forward(x));
            let got = to_vec(post.forward(ids));
            let diff = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    #[test]
    fn tiny_pre_and_post_norm_models_overfit_one_batch_on_flex() {
        let device = burn::tensor::Device::flex().autodiff();
        for norm in [NormPlacement::Pre, NormPlacement::Post] {
            device.seed(7);
            let config = LmConfig {
                norm,
                ..tiny(Position::Learned, true)
            };
            let model = config.init(&device).unwrap();
            let inputs = tokens(4, 8, 11, 4, &device);
            let targets = tokens(4, 8, 11, 5, &device);
            let losses = crate::test_util::overfit(model, |m| {
                cross_entropy_sum(m.forward(inputs.clone()), targets.clone(), None).div_scalar(32.0)
            });
            let (first, last) = (losses[0], *losses.last().unwrap());
            assert!(last < 0.1 * first, "{norm:?}: loss {first} -> {last}");
        }
    }

    #[test]
    fn hybrid_layouts_place_attention_layers() {
        use AttentionLayout::*;
        assert_eq!(attention_positions(Top, 12, 2), vec![10, 11]);
        assert_eq!(attention_positions(Bottom, 12, 2), vec![0, 1]);
        assert_eq!(attention_positions(Middle, 12, 2), vec![5, 6]);
        assert_eq!(attention_positions(Mixed, 12, 2), vec![3, 9]);
        assert_eq!(attention_positions(Mixed, 4, 4), vec![0, 1, 2, 3]);
        let fnet = crate::mixer::FourierMixerConfig::default();
        let mut c = tiny(Position::Learned, true);
        c.n_layers = 4;
        c.mixer = MixerConfig::Fourier(fnet.clone());
        c.num_attention_layers = 2;
        let kinds: Vec<&str> = c.layer_mixers().unwrap().iter().map(|m| m.kind()).collect();
        assert_eq!(kinds, vec!["fourier", "fourier", "dense", "dense"]);
        assert_eq!(c.kind(), "hybrid");
        assert!(
            !c.is_causal(),
            "default attention follows the (bidirectional) mixer"
        );
        let model = c.init(&burn::tensor::Device::flex()).unwrap();
        assert!(matches!(model.blocks[3].mixer, crate::Mixer::Dense(_)));
        assert!(matches!(model.blocks[0].mixer, crate::Mixer::Fourier(_)));
        assert_eq!(
            model
                .forward(tokens(2, 8, 11, 0, &burn::tensor::Device::flex()))
                .dims(),
            [2, 8, 11]
        );
        // An explicit per-layer list must have n_layers entries.
        c.num_attention_layers = 0;
        c.layers = vec![MixerConfig::Fourier(fnet)];
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("model.layers") && err.contains("n_layers = 4"),
            "{err}"
        );
    }

    #[test]
    fn invalid_config_names_the_field() {
        let mut c = tiny(Position::Learned, true);
        c.vocab_size = None;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("model.vocab_size")
        );
        let mut c = tiny(Position::Learned, true);
        c.dropout = 1.5;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("model.dropout")
        );
        let mut c = tiny(Position::Learned, true);
        c.mixer = MixerConfig::Dense(DenseAttentionConfig {
            n_heads: 5,
            causal: true,
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("model.mixer.n_heads = 5"), "{err}");
    }

    /// A tiny model with an adaptive softmax over 40 words (head 8, tails 12 and 20 at widths
    /// 8 and 4), adaptive input or not, tied or not.
    fn adaptive(input: bool, tie: bool) -> LmConfig {
        LmConfig {
            vocab_size: Some(40),
            tie_embeddings: tie,
            adaptive: Some(AdaptiveConfig {
                cutoffs: vec![8, 20],
                div_val: 2,
                input,
            }),
            ..tiny(Position::Learned, tie)
        }
    }

    /// Every float parameter's gradient, in module order (zeros where none reached it).
    fn parameter_grads(model: &Lm, grads: &GradientsParams) -> Vec<Vec<f32>> {
        struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let g = self
                    .0
                    .get::<D>(param.id)
                    .map_or_else(|| vec![0.0; param.val().shape().num_elements()], to_vec);
                self.1.push(g);
            }
        }
        let mut c = Collect(grads, vec![]);
        model.visit(&mut c);
        c.1
    }

    /// With an adaptive softmax the logits are log-probabilities over the whole vocabulary
    /// (log-sum-exp 0 at every position), and the training loss (`hidden` + `nll_sum`, tails
    /// only for their positions, weights some zero) equals the cross-entropy of those logits
    /// in value and in every parameter's gradient: plain or adaptive input, tied or not.
    #[test]
    fn an_adaptive_lm_scores_the_whole_vocabulary_and_trains_on_it() {
        for (name, device) in devices() {
            for (input, tie) in [(false, false), (true, false), (true, true)] {
                let ad = device.clone().autodiff();
                ad.seed(21);
                let model = adaptive(input, tie).init(&ad).unwrap();
                assert_eq!(model.token_embedding.is_some(), !input);
                assert_eq!(
                    model.adaptive_softmax.as_ref().unwrap().words.is_none(),
                    tie
                );
                assert!(model.head.is_none());
                let (batch, seq) = (3, 8);
                let x = tokens(batch, seq, 40, 4, &ad);
                let y = tokens(batch, seq, 40, 5, &ad);
                let w = Tensor::<2>::from_data(
                    TensorData::new(
                        (0..batch * seq)
                            .map(|i| [1.0f32, 0.0, 2.0][i % 3])
                            .collect::<Vec<_>>(),
                        [batch, seq],
                    ),
                    &ad,
                );
                let logits = model.forward(x.clone());
                assert_eq!(logits.dims(), [batch, seq, 40]);
                let lse = to_vec(logits.clone().exp().sum_dim(2).log());
                assert!(
                    lse.iter().all(|v| v.abs() < 1e-5),
                    "{name} input {input} tie {tie}: {lse:?}"
                );
                let fast = model.nll_sum(model.hidden(x, None).0, y.clone(), Some(w.clone()));
                let reference = cross_entropy_sum(logits, y, Some(w));
                let what = format!("{name} input {input} tie {tie}");
                assert_all_close(
                    &to_vec(fast.clone()),
                    &to_vec(reference.clone()),
                    1e-5,
                    &what,
                );
                let g_fast = GradientsParams::from_grads(fast.backward(), &model);
                let g_ref = GradientsParams::from_grads(reference.backward(), &model);
                let (a, b) = (
                    parameter_grads(&model, &g_fast),
                    parameter_grads(&model, &g_ref),
                );
                assert_eq!(a.len(), b.len());
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_all_close(x, y, 1e-4, &format!("{what} parameter {i}"));
                }
            }
        }
    }

    /// Tying shares the tensors: a tied model has one set of cluster vectors and projections
    /// (its parameter count is the untied one's less a whole set), and their gradient is the
    /// sum of the input's and the softmax's gradients in an untied model holding copies of the
    /// same values — one update moves both.
    #[test]
    fn tied_adaptive_clusters_are_one_set_of_parameters_for_input_and_output() {
        let device = Device::flex().autodiff();
        device.seed(22);
        let tied = adaptive(true, true).init(&device).unwrap();
        let untied_count = adaptive(true, false).init(&device).unwrap().num_params();
        let input = tied.adaptive_input.as_ref().unwrap();
        let copy = |p: &Param<Tensor<2>>| Param::from_tensor(p.val().detach());
        let words = Clusters {
            head: copy(&input.head),
            tails: input
                .tails
                .iter()
                .map(|t| crate::adaptive::Tail {
                    start: t.start,
                    end: t.end,
                    proj: copy(&t.proj),
                    weight: copy(&t.weight),
                })
                .collect(),
            shortlist: input.shortlist,
        };
        assert_eq!(untied_count - tied.num_params(), words.num_params());
        let untied = Lm {
            adaptive_softmax: Some(AdaptiveSoftmax {
                words: Some(words),
                ..tied.adaptive_softmax.clone().unwrap()
            }),
            ..tied.clone()
        };
        let (x, y) = (tokens(2, 8, 40, 6, &device), tokens(2, 8, 40, 7, &device));
        let loss = |m: &Lm| m.nll_sum(m.hidden(x.clone(), None).0, y.clone(), None);
        let (lt, lu) = (loss(&tied), loss(&untied));
        assert_eq!(to_vec(lt.clone()), to_vec(lu.clone()), "same function");
        let gt = GradientsParams::from_grads(lt.backward(), &tied);
        let gu = GradientsParams::from_grads(lu.backward(), &untied);
        let grad = |g: &GradientsParams, p: &Param<Tensor<2>>| to_vec(g.get::<2>(p.id).unwrap());
        let own = untied
            .adaptive_softmax
            .as_ref()
            .unwrap()
            .words
            .as_ref()
            .unwrap();
        let mut pairs = vec![(&input.head, &own.head)];
        for (a, b) in input.tails.iter().zip(&own.tails) {
            pairs.push((&a.proj, &b.proj));
            pairs.push((&a.weight, &b.weight));
        }
        for (i, (shared, out)) in pairs.into_iter().enumerate() {
            let through_input = grad(&gu, shared); // the untied model's input copy
            let through_output = grad(&gu, out);
            assert!(through_input.iter().any(|v| *v != 0.0), "tensor {i} input");
            assert!(
                through_output.iter().any(|v| *v != 0.0),
                "tensor {i} output"
            );
            let sum: Vec<f32> = through_input
                .iter()
                .zip(&through_output)
                .map(|(a, b)| a + b)
                .collect();
            assert_all_close(&grad(&gt, shared), &sum, 1e-5, &format!("tensor {i}"));
        }
    }

    /// Without cutoffs a tied adaptive model is the plain tied model: the same logits up to
    /// log-softmax (the adaptive head gives log-probabilities) and the same loss, from the
    /// same weights.
    #[test]
    fn without_cutoffs_a_tied_adaptive_lm_is_the_plain_tied_lm() {
        for (name, device) in devices() {
            device.seed(23);
            let config = LmConfig {
                adaptive: Some(AdaptiveConfig::default()),
                ..tiny(Position::Learned, true)
            };
            let a = config.init(&device).unwrap();
            let plain = Lm {
                token_embedding: Some(Embedding {
                    weight: a.adaptive_input.as_ref().unwrap().head.clone(),
                }),
                adaptive_input: None,
                adaptive_softmax: None,
                ..a.clone()
            };
            let (x, y) = (tokens(2, 8, 11, 8, &device), tokens(2, 8, 11, 9, &device));
            let got = to_vec(a.forward(x.clone()));
            let want = to_vec(burn::tensor::activation::log_softmax(
                plain.forward(x.clone()),
                2,
            ));
            assert_all_close(&got, &want, 1e-6, name);
            let la = to_vec(a.nll_sum(a.hidden(x.clone(), None).0, y.clone(), None));
            let lp = to_vec(cross_entropy_sum(plain.forward(x), y, None));
            assert_all_close(&la, &lp, 1e-6, name);
        }
    }

    /// An adaptive model (tied adaptive input and softmax) overfits a fixed batch.
    #[test]
    fn an_adaptive_lm_overfits_a_batch() {
        let device = Device::flex().autodiff();
        device.seed(24);
        let model = adaptive(true, true).init(&device).unwrap();
        let (x, y) = (tokens(2, 8, 40, 10, &device), tokens(2, 8, 40, 11, &device));
        let losses = crate::test_util::overfit(model, |m| {
            m.nll_sum(m.hidden(x.clone(), None).0, y.clone(), None)
                .div_scalar(16.0)
        });
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.2 * first, "{first} -> {last}");
    }

    /// Adaptive settings that cannot build a model are refused, naming the key.
    #[test]
    fn bad_adaptive_settings_name_the_key() {
        let err = |c: LmConfig| c.validate().unwrap_err().to_string();
        let e = err(adaptive(false, true));
        assert!(e.contains("model.adaptive.input"), "{e}");
        let e = err(LmConfig {
            head_bias: true,
            ..adaptive(true, false)
        });
        assert!(e.contains("model.head_bias"), "{e}");
        let mut c = adaptive(true, true);
        c.adaptive.as_mut().unwrap().cutoffs = vec![8, 40];
        let e = err(c);
        assert!(
            e.contains("model.adaptive.cutoffs") && e.contains("40 words"),
            "{e}"
        );
        assert!(adaptive(true, true).validate().is_ok());
    }
}
