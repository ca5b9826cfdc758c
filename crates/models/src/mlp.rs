//! The position-wise feed-forward sublayer: `Linear(d_model -> d_ff) -> GELU -> Linear(d_ff ->
//! d_model) -> Dropout`, with the exact GELU or its tanh approximation ([`Activation`]).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::init;

/// The GELU of the feed-forward sublayers and of an MLM head's transform (`model.activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact GELU `x · Φ(x)` (erf-based; PyTorch's `nn.GELU()`, `transformers`' `"gelu"`),
    /// fused with the bias add on flex.
    #[default]
    Gelu,
    /// The tanh approximation `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` that GPT-2, BERT's
    /// and FNet's code use (`transformers`' `"gelu_new"`); composed tensor ops.
    GeluNew,
}

impl Activation {
    /// The name `transformers` gives this activation (`ACT2FN`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluNew => "gelu_new",
        }
    }
}

/// `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`, elementwise (the cube as products, so negative
/// inputs are exact).
pub fn gelu_new<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let sqrt_2_over_pi = (2.0 / std::f64::consts::PI).sqrt();
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * sqrt_2_over_pi;
    (x * (inner.tanh() + 1.0)) * 0.5
}

/// `activation(layer(x))`: the fused bias + exact GELU, or the linear layer then `gelu_new`.
pub fn linear_activation(layer: &Linear, x: Tensor<3>, tanh_gelu: bool) -> Tensor<3> {
    if tanh_gelu {
        gelu_new(crate::ops::linear::forward(layer, x))
    } else {
        crate::ops::gelu::linear_gelu(layer, x)
    }
}

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
    /// The GELU between the two layers.
    #[serde(default)]
    pub activation: Activation,
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
    /// Whether the GELU is the tanh approximation ([`Activation::GeluNew`]).
    pub tanh_gelu: bool,
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
            tanh_gelu: self.activation == Activation::GeluNew,
        }
    }
}

impl Mlp {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = linear_activation(&self.fc, x, self.tanh_gelu); // [batch, seq, d_ff]
        self.dropout
            .forward(crate::ops::linear::forward(&self.proj, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, devices, pattern, to_vec};
    use burn::tensor::TensorData;

    /// `gelu_new` against its formula in f64 (negative inputs included: the cube must not go
    /// through a float power), and an MLP with it computes `proj(gelu_new(fc(x)))`, which
    /// differs from the exact GELU's output.
    #[test]
    fn gelu_new_is_the_tanh_formula() {
        for (name, device) in devices() {
            let xs = pattern(64, 1, 12.0);
            let got = to_vec(gelu_new(Tensor::<1>::from_data(
                TensorData::new(xs.clone(), [64]),
                &device,
            )));
            let want: Vec<f32> = xs
                .iter()
                .map(|&x| {
                    let x = f64::from(x);
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
                })
                .collect();
            assert_all_close(&got, &want, 1e-6, name);
            let config = MlpConfig {
                d_model: 8,
                d_ff: 16,
                dropout: 0.0,
                n_layers: 1,
                activation: Activation::GeluNew,
            };
            device.seed(2);
            let mlp = config.init(&device);
            let x =
                Tensor::<3>::from_data(TensorData::new(pattern(48, 2, 6.0), [2, 3, 8]), &device);
            let fc = |x: Tensor<3>| {
                x.matmul(mlp.fc.weight.val().unsqueeze::<3>())
                    + mlp.fc.bias.as_ref().unwrap().val().unsqueeze::<3>()
            };
            let proj = |h: Tensor<3>| {
                h.matmul(mlp.proj.weight.val().unsqueeze::<3>())
                    + mlp.proj.bias.as_ref().unwrap().val().unsqueeze::<3>()
            };
            let want = to_vec(proj(gelu_new(fc(x.clone()))));
            assert_all_close(&to_vec(mlp.forward(x.clone())), &want, 1e-5, name);
            // The approximation is not the exact GELU (they differ by ~1e-3 near |x| = 2).
            let exact = to_vec(burn::tensor::activation::gelu(Tensor::<1>::from_data(
                TensorData::new(xs, [64]),
                &device,
            )));
            let diff = exact
                .iter()
                .zip(&got)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff > 1e-4, "{name}: the two GELUs should differ ({diff})");
        }
    }
}
