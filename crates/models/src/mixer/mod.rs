//! Token mixers: the sublayer of a [`Block`](crate::Block) that moves information between
//! positions. One enum ([`Mixer`]) and one config enum ([`MixerConfig`]) dispatch to one file per
//! mixer. Every mixer maps `[batch, seq, d_model] -> [batch, seq, d_model]` and does its own
//! causal masking, as its config declares.
//!
//! Adding a mixer = one file here, one arm in each enum, its tests and a `configs/*.toml`;
//! `Block` and `Lm` do not change.

pub mod context;
mod dense;
mod fourier;
mod persistent;
mod sparse;

pub use crate::ops::attention::{
    AttentionOps, KeyLayout, attention_fused_on, cached_attention_fused_on,
};
pub use crate::ops::dropout::seed_dropout;
pub use crate::ops::fourier::FourierOps;
pub use context::MixerContext;
pub use dense::{DenseAttention, DenseAttentionConfig};
pub use fourier::{
    FourierImpl, FourierMixer, FourierMixerConfig, FourierPath, cached_dft_matrices, dft_matrices,
    dft_mix, fft_mix, fft_mix_composed, seq_fft_mix,
};
pub use persistent::{PersistentAttention, PersistentAttentionConfig, relative_scores, span_mask};
#[cfg(test)]
pub(crate) use sparse::builtin_patterns;
pub use sparse::{
    SparseAttention, SparseAttentionConfig, block_sparse_attention, masked_dense_attention,
};

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// How attention mixers compute softmax attention (`model.attention_impl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// One tiled operation with its own backward where the backend has a kernel for it (flex),
    /// the composed tensor ops elsewhere.
    #[default]
    Fused,
    /// Tensor ops everywhere (the reference the fused kernels are tested against).
    Composed,
}

/// The token mixer of every block, as written under `[model.mixer]` (`kind = "dense"`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum MixerConfig {
    /// Multi-head scaled dot-product self-attention over all (earlier) positions.
    Dense(DenseAttentionConfig),
    /// Attention over the context plus learned persistent key/value vectors (all-attention).
    Persistent(PersistentAttentionConfig),
    /// FNet: parameter-free `Re(DFT_seq(DFT_hidden(x)))` (bidirectional unless `causal`).
    Fourier(FourierMixerConfig),
    /// Attention restricted to a block-sparse pattern (Yun et al. 2020; Child et al. 2019).
    Sparse(SparseAttentionConfig),
}

impl Default for MixerConfig {
    fn default() -> Self {
        MixerConfig::Dense(DenseAttentionConfig::default())
    }
}

impl MixerConfig {
    /// Short name, as in the TOML `kind` key.
    pub fn kind(&self) -> &'static str {
        match self {
            MixerConfig::Dense(_) => "dense",
            MixerConfig::Persistent(_) => "persistent",
            MixerConfig::Fourier(_) => "fourier",
            MixerConfig::Sparse(_) => "sparse",
        }
    }

    /// Whether position t sees only positions <= t.
    pub fn is_causal(&self) -> bool {
        match self {
            MixerConfig::Dense(c) => c.causal,
            MixerConfig::Persistent(c) => c.causal,
            MixerConfig::Fourier(c) => c.causal,
            MixerConfig::Sparse(c) => c.causal,
        }
    }

    /// Whether the mixer can attend over a cache of earlier blocks (dense and all-attention;
    /// FNet mixes a fixed window, and sparse patterns are laid over one window).
    pub fn takes_cache(&self) -> bool {
        matches!(self, MixerConfig::Dense(_) | MixerConfig::Persistent(_))
    }

    /// Width of one head, for mixers that have heads.
    pub fn d_head(&self, d_model: usize) -> Option<usize> {
        let n_heads = match self {
            MixerConfig::Dense(c) => c.n_heads,
            MixerConfig::Persistent(c) => c.n_heads,
            MixerConfig::Sparse(c) => c.n_heads,
            MixerConfig::Fourier(_) => return None,
        };
        (n_heads > 0).then(|| d_model / n_heads)
    }

    /// Check the settings against the model they will sit in.
    pub fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        match self {
            MixerConfig::Dense(c) => c.validate(ctx),
            MixerConfig::Persistent(c) => c.validate(ctx),
            MixerConfig::Fourier(c) => c.validate(ctx),
            MixerConfig::Sparse(c) => c.validate(ctx),
        }
    }

    /// Build the mixer on `device`. Call [`validate`](Self::validate) first.
    pub fn init(&self, ctx: &MixerContext, device: &Device) -> Mixer {
        match self {
            MixerConfig::Dense(c) => Mixer::Dense(c.init(ctx, device)),
            MixerConfig::Persistent(c) => Mixer::Persistent(c.init(ctx, device)),
            MixerConfig::Fourier(c) => Mixer::Fourier(c.init(ctx)),
            MixerConfig::Sparse(c) => Mixer::Sparse(c.init(ctx, device)),
        }
    }
}

/// A token mixer module.
// One mixer per block, built once: the variants' size difference costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer {
    /// See [`DenseAttention`].
    Dense(DenseAttention),
    /// See [`PersistentAttention`].
    Persistent(PersistentAttention),
    /// See [`FourierMixer`].
    Fourier(FourierMixer),
    /// See [`SparseAttention`].
    Sparse(SparseAttention),
}

impl Mixer {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - `key_pe`: `[d_head, seq_len]` relative-position keys when `position = "relative"`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>, key_pe: Option<&Tensor<2>>) -> Tensor<3> {
        match self {
            Mixer::Dense(m) => m.forward(x),
            Mixer::Persistent(m) => m.forward(x, key_pe),
            Mixer::Fourier(m) => m.forward(x),
            Mixer::Sparse(m) => m.forward(x),
        }
    }

    /// [`forward`](Self::forward) for a block with the `cache` of its stream's earlier inputs
    /// ([`crate::cache`]); dense and all-attention only ([`MixerConfig::takes_cache`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, n, d_model]`, `cache`: `[batch, s, d_model]`
    /// - output: `[batch, n, d_model]`
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: Tensor<3>,
        key_pe: Option<&Tensor<2>>,
        view: &crate::cache::CacheView,
    ) -> Tensor<3> {
        match self {
            Mixer::Dense(m) => m.forward_cached(x, cache, view),
            Mixer::Persistent(m) => m.forward_cached(x, cache, key_pe, view),
            Mixer::Fourier(_) | Mixer::Sparse(_) => {
                panic!("a cache is for dense and persistent attention (LmConfig::validate)")
            }
        }
    }

    /// The part of a cached layer's `cache` that its queries can still weigh (all-attention
    /// with an adaptive span: the last `⌈max z + ramp⌉` positions; else all of it).
    ///
    /// # Shapes
    /// - `cache`: `[batch, s, d_model]`; output: `[batch, ≤ s, d_model]` (its last rows)
    pub fn trim_cache(&self, cache: Tensor<3>, span: usize) -> Tensor<3> {
        match self {
            Mixer::Persistent(m) => m.trim_cache(cache, span),
            _ => cache,
        }
    }

    /// A penalty this mixer adds to the training loss (adaptive span), if any.
    pub fn regularization(&self, seq_len: usize) -> Option<Tensor<1>> {
        match self {
            Mixer::Dense(_) | Mixer::Fourier(_) | Mixer::Sparse(_) => None,
            Mixer::Persistent(m) => m.regularization(seq_len),
        }
    }
}
