//! Parameter initialisation, in one place so that it is deliberate and documented.
//!
//! GPT-2 / nanoGPT scheme: every linear weight and embedding is drawn from N(0, 0.02²); biases
//! start at zero; LayerNorm starts as the identity (gain 1, shift 0). Projections that write into
//! the residual stream (the attention output and the MLP's second linear) use
//! std = 0.02 / sqrt(2 · n_layers), so the residual stream's variance does not grow with depth
//! (each layer adds two such writes).

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

/// Standard deviation of every weight that does not write into the residual stream.
pub const STD: f64 = 0.02;

/// Standard deviation of the residual-stream output projections for a model of `n_layers`.
pub fn residual_std(n_layers: usize) -> f64 {
    STD / (2.0 * n_layers.max(1) as f64).sqrt()
}

/// A linear layer `[.., d_input] -> [.., d_output]` with N(0, std²) weights and a zero bias.
pub fn linear(d_input: usize, d_output: usize, bias: bool, std: f64, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_input, d_output)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device);
    if bias {
        layer.bias = Some(Param::from_tensor(Tensor::<1>::zeros([d_output], device)));
    }
    layer
}
