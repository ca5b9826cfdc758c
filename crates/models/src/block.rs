//! The one transformer block every model is made of, with a pluggable token mixer and the
//! LayerNorm placed before or after each sublayer ([`NormPlacement`]):
//! - pre-norm (GPT-2): `x = x + mixer(LN(x))`, then `x = x + mlp(LN(x))`;
//! - post-norm (Vaswani et al., BERT, FNet, the all-attention code):
//!   `x = LN(x + mixer(x))`, then `x = LN(x + mlp(x))`.
//!
//! The MLP sublayer and its norm exist only when the block has an MLP.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::mixer::context::MixerContext;
use crate::mixer::{Mixer, MixerConfig};
use crate::mlp::{Mlp, MlpConfig};
use crate::ops::norm::layer_norm;

/// Where each block's LayerNorms sit (`model.norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormPlacement {
    /// Before each sublayer, inside the residual branch, with a final LayerNorm before the head
    /// (GPT-2; trains stably without a long warmup).
    #[default]
    Pre,
    /// After each residual add, and no final LayerNorm (the original Transformer, BERT, FNet,
    /// and Sukhbaatar et al.'s all-attention code).
    Post,
}

/// Configuration of a [`Block`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// The token mixer.
    pub mixer: MixerConfig,
    /// Shared model settings the mixer needs.
    pub ctx: MixerContext,
    /// Hidden width of the MLP; `None` builds a block without one (all-attention).
    pub d_ff: Option<usize>,
    /// Where the LayerNorms sit.
    pub norm: NormPlacement,
    /// The MLP's GELU.
    pub activation: crate::mlp::Activation,
}

/// Residual block with a pluggable token mixer, pre- or post-norm.
#[derive(Module, Debug)]
pub struct Block {
    /// The mixer sublayer's norm: before the mixer (pre-norm) or after its residual add
    /// (post-norm).
    pub norm_mixer: LayerNorm,
    /// The token mixer.
    pub mixer: Mixer,
    /// The MLP sublayer's norm (present exactly when `mlp` is), placed like `norm_mixer`.
    pub norm_mlp: Option<LayerNorm>,
    /// Position-wise feed-forward network.
    pub mlp: Option<Mlp>,
    /// Whether the norms follow the residual adds (post-norm) rather than precede the
    /// sublayers.
    pub post_norm: bool,
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
                activation: self.activation,
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
            post_norm: self.norm == NormPlacement::Post,
        }
    }
}

impl Block {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - `key_pe`: `[d_head, seq_len]`, the model's shared relative-position keys, if any
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>, key_pe: Option<&Tensor<2>>) -> Tensor<3> {
        let x = self.sublayer(x, &self.norm_mixer, |h| self.mixer.forward(h, key_pe));
        match (&self.norm_mlp, &self.mlp) {
            (Some(norm), Some(mlp)) => self.sublayer(x, norm, |h| mlp.forward(h)),
            _ => x,
        }
    }

    /// [`forward`](Self::forward) over a block with `cache`, the block inputs of earlier
    /// positions of the stream (`[batch, s, d_model]`): the mixer attends over
    /// `[cache ; x]` (normalised first in a pre-norm block, as `x` is).
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: Tensor<3>,
        key_pe: Option<&Tensor<2>>,
        view: &crate::cache::CacheView,
    ) -> Tensor<3> {
        let norm = |t: Tensor<3>| {
            if self.post_norm {
                t
            } else {
                layer_norm(&self.norm_mixer, t)
            }
        };
        // Only what the layer's spans can reach is normalised and projected.
        let cache = self.mixer.trim_cache(cache, view.window.span);
        let y = self
            .mixer
            .forward_cached(norm(x.clone()), norm(cache), key_pe, view);
        let x = if self.post_norm {
            layer_norm(&self.norm_mixer, x + y)
        } else {
            x + y
        };
        match (&self.norm_mlp, &self.mlp) {
            (Some(norm), Some(mlp)) => self.sublayer(x, norm, |h| mlp.forward(h)),
            _ => x,
        }
    }

    /// One residual sublayer: `x + f(LN(x))` (pre-norm) or `LN(x + f(x))` (post-norm).
    fn sublayer(
        &self,
        x: Tensor<3>,
        norm: &LayerNorm,
        f: impl FnOnce(Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        if self.post_norm {
            layer_norm(norm, x.clone() + f(x))
        } else {
            x.clone() + f(layer_norm(norm, x))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::DenseAttentionConfig;
    use crate::test_util::{devices, to_vec};
    use burn::tensor::Distribution;

    fn config(norm: NormPlacement) -> BlockConfig {
        BlockConfig {
            mixer: MixerConfig::Dense(DenseAttentionConfig {
                n_heads: 2,
                causal: true,
            }),
            ctx: MixerContext {
                d_model: 8,
                n_layers: 2,
                dropout: 0.0,
                max_seq_len: 6,
                rope_theta: None,
                relative_positions: false,
                bias: true,
                layer: 0,
                fused_attention: true,
            },
            d_ff: Some(16),
            norm,
            activation: Default::default(),
        }
    }

    /// LayerNorm of the last dimension from tensor ops (eps 1e-5, Burn's default), the
    /// reference for the block's norm kernel.
    fn reference_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        let y = centred / var.add_scalar(1e-5).sqrt();
        y * norm.gamma.val().unsqueeze::<3>() + norm.beta.as_ref().unwrap().val().unsqueeze::<3>()
    }

    fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        to_vec(a)
            .iter()
            .zip(to_vec(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn pre_and_post_norm_blocks_compute_their_formulas() {
        for (name, device) in devices() {
            for placement in [NormPlacement::Pre, NormPlacement::Post] {
                device.seed(3);
                let mut block = config(placement).init(&device);
                // Non-trivial norm parameters, so a norm applied in the wrong place shows.
                block.norm_mixer.gamma = burn::module::Param::from_tensor(Tensor::random(
                    [8],
                    Distribution::Uniform(0.5, 1.5),
                    &device,
                ));
                block.norm_mixer.beta = Some(burn::module::Param::from_tensor(Tensor::random(
                    [8],
                    Distribution::Uniform(-0.5, 0.5),
                    &device,
                )));
                let x = Tensor::<3>::random([2, 6, 8], Distribution::Normal(1.0, 2.0), &device);
                let mlp = block.mlp.as_ref().unwrap();
                let norm_mlp = block.norm_mlp.as_ref().unwrap();
                let expected = match placement {
                    NormPlacement::Pre => {
                        let h = x.clone()
                            + block
                                .mixer
                                .forward(reference_norm(&block.norm_mixer, x.clone()), None);
                        h.clone() + mlp.forward(reference_norm(norm_mlp, h))
                    }
                    NormPlacement::Post => {
                        let h = reference_norm(
                            &block.norm_mixer,
                            x.clone() + block.mixer.forward(x.clone(), None),
                        );
                        reference_norm(norm_mlp, h.clone() + mlp.forward(h))
                    }
                };
                let got = block.forward(x, None);
                let diff = max_diff(got.clone(), expected);
                assert!(diff < 1e-4, "{name} {placement:?}: differs by {diff}");
                if placement == NormPlacement::Post {
                    // Every output row is normalised: mean beta's mean, spread set by gamma.
                    let rows = to_vec(got);
                    let beta = to_vec(norm_mlp.beta.as_ref().unwrap().val().unsqueeze::<3>());
                    let beta_mean = beta.iter().sum::<f32>() / 8.0;
                    for row in rows.chunks(8) {
                        let mean = row.iter().sum::<f32>() / 8.0;
                        assert!((mean - beta_mean).abs() < 1e-4, "{name}: row mean {mean}");
                    }
                }
            }
        }
    }
}
