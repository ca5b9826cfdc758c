//! Token mixers: the sublayer of a [`Block`](crate::Block) that moves information between
//! positions. One enum ([`Mixer`]) and one config enum ([`MixerConfig`]) dispatch to one file per
//! mixer. Every mixer maps `[batch, seq, d_model] -> [batch, seq, d_model]` and does its own
//! causal masking, as its config declares.
//!
//! Adding a mixer = one file here, one arm in each enum, its tests and a `configs/*.toml`;
//! `Block` and `Lm` do not change.

mod dense;

pub use dense::{DenseAttention, DenseAttentionConfig};

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ModelError;

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
}

/// The token mixer of every block, as written under `[model.mixer]` (`kind = "dense"`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum MixerConfig {
    /// Multi-head scaled dot-product self-attention over all (earlier) positions.
    Dense(DenseAttentionConfig),
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
        }
    }

    /// Whether position t sees only positions <= t.
    pub fn is_causal(&self) -> bool {
        match self {
            MixerConfig::Dense(c) => c.causal,
        }
    }

    /// Check the settings against the model they will sit in.
    pub fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        match self {
            MixerConfig::Dense(c) => c.validate(ctx),
        }
    }

    /// Build the mixer on `device`. Call [`validate`](Self::validate) first.
    pub fn init(&self, ctx: &MixerContext, device: &Device) -> Mixer {
        match self {
            MixerConfig::Dense(c) => Mixer::Dense(c.init(ctx, device)),
        }
    }
}

/// A token mixer module.
#[derive(Module, Debug)]
pub enum Mixer {
    /// See [`DenseAttention`].
    Dense(DenseAttention),
}

impl Mixer {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Mixer::Dense(m) => m.forward(x),
        }
    }
}
