//! The position-wise feed-forward sublayer: `Linear(d_model -> d_ff) -> GELU -> Linear(d_ff ->
//! d_model) -> Dropout`.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::init;

/// Configuration of an [`Mlp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Hidden width (4 · d_model in GPT-2).
    pub d_ff: usize,
    /// Dropout applied to the sublayer output.
    pub dropout: f64,
    /// Number of layers of the whole model, for the residual-projection initialisation.
    pub n_layers: usize,
}

/// GELU feed-forward network.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `d_model -> d_ff`.
    pub fc: Linear,
    /// `d_ff -> d_model`, writes into the residual stream.
    pub proj: Linear,
    /// Dropout on the output.
    pub dropout: Dropout,
}

impl MlpConfig {
    /// Build the module on `device`.
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            fc: init::linear(self.d_model, self.d_ff, true, init::STD, device),
            proj: init::linear(
                self.d_ff,
                self.d_model,
                true,
                init::residual_std(self.n_layers),
                device,
            ),
            dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

impl Mlp {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = crate::gelu_op::linear_gelu(&self.fc, x); // [batch, seq, d_ff]
        self.dropout.forward(crate::linear::forward(&self.proj, h))
    }
}
