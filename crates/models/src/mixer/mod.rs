//! Token mixers: the sublayer of a [`Block`](crate::Block) that moves information between
//! positions. One enum ([`Mixer`]) and one config enum ([`MixerConfig`]) dispatch to one file per
//! mixer. Every mixer maps `[batch, seq, d_model] -> [batch, seq, d_model]` and does its own
//! causal masking, as its config declares.
//!
//! Adding a mixer = one file here, one arm in each enum, its tests and a `configs/*.toml`;
//! `Block` and `Lm` do not change.

mod attention_op;
mod dense;
mod fourier;
mod fourier_op;
pub(crate) mod kernel;
mod persistent;
mod sparse;

pub use attention_op::{AttentionOps, KeyLayout};
pub use dense::{DenseAttention, DenseAttentionConfig};
pub use fourier::{
    FourierImpl, FourierMixer, FourierMixerConfig, FourierPath, cached_dft_matrices, dft_matrices,
    dft_mix, fft_mix, fft_mix_composed, seq_fft_mix,
};
pub use fourier_op::FourierOps;
pub use persistent::{PersistentAttention, PersistentAttentionConfig, relative_scores, span_mask};
pub use sparse::{
    SparseAttention, SparseAttentionConfig, block_sparse_attention, masked_dense_attention,
};

use burn::module::Module;
use burn::nn::Dropout;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Whether `device` is flex (autodiff or not), where the fused mixer operations
/// (`attention_op/`, `fourier_op.rs`) run. Burn 0.22 has no backend query on
/// a `Device`; its `Debug` form names the backend.
pub(crate) fn on_flex(device: &Device) -> bool {
    format!("{device:?}").contains("Flex")
}

/// Whether `device` is one of Burn's CubeCL backends (wgpu, CUDA, ...).
pub(crate) fn on_cube(device: &Device) -> bool {
    format!("{device:?}").contains("Cube")
}

/// Whether `dropout` drops anything now: `p > 0`, training, on an autodiff device.
fn dropout_active(dropout: &Dropout, device: &Device) -> bool {
    dropout.prob > 0.0 && dropout.training.is_enabled() && device.is_autodiff()
}

/// Whether attention (dense, block-sparse or all-attention) of width `d_head` runs as the fused
/// operation on `device`: always on flex; on the Cube backends when their kernels cover it
/// (head width ≤ 256; `attention_op/cube.rs`).
pub fn attention_fused_on(device: &Device, d_head: usize) -> bool {
    on_flex(device) || (on_cube(device) && attention_op::cube_supported(d_head))
}

/// Whether a cached layer's attention (keys `[cache ; block]`, [`crate::cache`]) of width
/// `d_head` runs as the fused operation on `device`: as [`attention_fused_on`].
pub fn cached_attention_fused_on(device: &Device, d_head: usize) -> bool {
    attention_fused_on(device, d_head)
}

/// The fused operations' dropout seeds: per device, a seed and a counter, advanced on the host
/// at every draw, so no draw waits for the device (a GPU step keeps its one read).
static DROPOUT_SEEDS: std::sync::Mutex<Vec<(String, u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// The device's key in [`DROPOUT_SEEDS`]: its `Debug` form (the trainer seeds the autodiff
/// device the mixers see).
fn seed_key(device: &Device) -> String {
    format!("{device:?}")
}

/// Restart the fused attention dropout's mask seeds of `device` from `seed` (the trainer calls
/// it with the device's per-step seed, next to `Device::seed`, so a resumed run draws the same
/// masks). Unseeded devices start from seed 0.
pub fn seed_dropout(device: &Device, seed: u64) {
    let key = seed_key(device);
    let mut seeds = DROPOUT_SEEDS.lock().expect("dropout seeds");
    match seeds.iter_mut().find(|(k, ..)| *k == key) {
        Some(entry) => *entry = (key, seed, 0),
        None => seeds.push((key, seed, 0)),
    }
}

/// The dropout probability and mask seed a fused attention operation should use now: `p` and
/// the next seed of the device's host-side stream ([`seed_dropout`]) when `dropout` is active
/// (training, on an autodiff device), else `(0, 0)`.
pub(crate) fn fused_dropout(dropout: &Dropout, device: &Device) -> (f32, u32) {
    if !dropout_active(dropout, device) {
        return (0.0, 0);
    }
    let key = seed_key(device);
    let draw = {
        let mut seeds = DROPOUT_SEEDS.lock().expect("dropout seeds");
        let index = match seeds.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                seeds.push((key, 0, 0));
                seeds.len() - 1
            }
        };
        let (_, seed, counter) = &mut seeds[index];
        *counter += 1;
        splitmix(seed.wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    };
    // f64 -> f32 must not round a valid p < 1 up to 1.
    let p = (dropout.prob as f32).min(1.0 - f32::EPSILON);
    (p, (draw >> 32) as u32)
}

/// SplitMix64's finaliser.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

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

/// What every mixer is told about the model it sits in (the `[model]` settings it shares).
#[derive(Debug, Clone, PartialEq)]
pub struct MixerContext {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks, for the residual-projection initialisation.
    pub n_layers: usize,
    /// Dropout probability (attention weights and sublayer output).
    pub dropout: f64,
    /// Longest sequence the model accepts.
    pub max_seq_len: usize,
    /// Rotary position embedding inside the mixer (`Some(theta)`), or none.
    pub rope_theta: Option<f32>,
    /// The model passes a relative-position key embedding (`position = "relative"`).
    pub relative_positions: bool,
    /// Biases in the attention projections (`model.attention_bias`).
    pub bias: bool,
    /// Index of this block, input first (sparse patterns alternate with the layer).
    pub layer: usize,
    /// Whether attention may use the fused operations (`model.attention_impl = "fused"`).
    pub fused_attention: bool,
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
