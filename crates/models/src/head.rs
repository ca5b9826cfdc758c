//! The masked-LM head's transform (BERT, FNet): before the output layer, each hidden state goes
//! through `Linear(d_model -> d_model) -> GELU -> LayerNorm` (`model.head_transform`).

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Tensor};

use crate::init;
use crate::mlp::{Activation, linear_activation};
use crate::ops::norm::layer_norm;

/// Dense, GELU, LayerNorm: what BERT's and FNet's `PredictionHeadTransform` compute.
#[derive(Module, Debug)]
pub struct HeadTransform {
    /// `d_model -> d_model`.
    pub dense: Linear,
    /// The LayerNorm after the activation.
    pub norm: LayerNorm,
    /// Whether the GELU is the tanh approximation ([`Activation::GeluNew`]).
    pub tanh_gelu: bool,
}

impl HeadTransform {
    /// A transform of width `d_model` (weights N(0, 0.02²), zero bias, unit LayerNorm).
    pub fn init(d_model: usize, activation: Activation, device: &Device) -> Self {
        Self {
            dense: init::linear(d_model, d_model, true, init::STD, device),
            norm: LayerNormConfig::new(d_model).init(device),
            tanh_gelu: activation == Activation::GeluNew,
        }
    }

    /// # Shapes
    /// - `h`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        layer_norm(
            &self.norm,
            linear_activation(&self.dense, h, self.tanh_gelu),
        )
    }
}
