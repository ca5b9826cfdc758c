//! The one transformer block every model is made of (pre-norm, GPT-2 style):
//! `x = x + mixer(norm(x))`, then `x = x + mlp(norm(x))` when the block has an MLP.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor};

use crate::mixer::{Mixer, MixerConfig, MixerContext};
use crate::mlp::{Mlp, MlpConfig};
use crate::norm_op::layer_norm;

/// Configuration of a [`Block`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// The token mixer.
    pub mixer: MixerConfig,
    /// Shared model settings the mixer needs.
    pub ctx: MixerContext,
    /// Hidden width of the MLP; `None` builds a block without one (all-attention).
    pub d_ff: Option<usize>,
}

/// Pre-norm residual block with a pluggable token mixer.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before the mixer.
    pub norm_mixer: LayerNorm,
    /// The token mixer.
    pub mixer: Mixer,
    /// Norm before the MLP (present exactly when `mlp` is).
    pub norm_mlp: Option<LayerNorm>,
    /// Position-wise feed-forward network.
    pub mlp: Option<Mlp>,
}

impl BlockConfig {
    /// Build the block on `device`.
    pub fn init(&self, device: &Device) -> Block {
        let d_model = self.ctx.d_model;
        let mlp = self.d_ff.map(|d_ff| {
            MlpConfig {
                d_model,
                d_ff,
                dropout: self.ctx.dropout,
                n_layers: self.ctx.n_layers,
            }
            .init(device)
        });
        Block {
            norm_mixer: LayerNormConfig::new(d_model).init(device),
            mixer: self.mixer.init(&self.ctx, device),
            norm_mlp: mlp
                .as_ref()
                .map(|_| LayerNormConfig::new(d_model).init(device)),
            mlp,
        }
    }
}

impl Block {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - `key_pe`: `[d_head, seq_len]`, the model's shared relative-position keys, if any
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>, key_pe: Option<&Tensor<2>>) -> Tensor<3> {
        let x = x.clone() + self.mixer.forward(layer_norm(&self.norm_mixer, x), key_pe);
        match (&self.norm_mlp, &self.mlp) {
            (Some(norm), Some(mlp)) => x.clone() + mlp.forward(layer_norm(norm, x)),
            _ => x,
        }
    }
}
