//! Linear layers on `[batch, seq, d]` activations as one 2-D GEMM over `batch·seq` rows.
//!
//! Burn's `Linear::forward` keeps a rank-3 input batched when each batch's row count is a
//! multiple of its row tile (our `seq` always is): flex then runs one small GEMM per batch
//! element, packing the weight again for each, and the input gradient the same way. Folding the
//! rows first makes the forward and both backward products one GEMM each (the weight gradient
//! is already one in Burn). Same values up to summation order.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `layer.forward(x)` with the batch and sequence axes folded into the GEMM's rows.
///
/// # Shapes
/// - `x`: `[batch, seq, d_in]`
/// - output: `[batch, seq, d_out]`
pub fn forward(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let y = layer.forward(x.reshape([batch * seq, d_in])); // [batch·seq, d_out]
    let [_, d_out] = y.dims();
    y.reshape([batch, seq, d_out])
}

/// `x · w` for a `[d_in, d_out]` matrix `w` shared by every row (e.g. the tied head's `Eᵀ`).
///
/// # Shapes
/// - `x`: `[batch, seq, d_in]`
/// - `w`: `[d_in, d_out]`
/// - output: `[batch, seq, d_out]`
pub fn matmul_rows(x: Tensor<3>, w: Tensor<2>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let [_, d_out] = w.dims();
    x.reshape([batch * seq, d_in])
        .matmul(w)
        .reshape([batch, seq, d_out])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{devices, to_vec};
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// Values and gradients (input, weight, bias) against Burn's own batched `Linear::forward`.
    #[test]
    fn folded_rows_equal_burns_linear() {
        for (name, device) in devices() {
            let device = device.autodiff();
            device.seed(4);
            let layer = LinearConfig::new(6, 5).init(&device);
            let x = Tensor::<3>::random([3, 4, 6], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let g = Tensor::<3>::random([3, 4, 5], Distribution::Normal(0.0, 1.0), &device);
            let run = |folded: bool| {
                let y = if folded {
                    forward(&layer, x.clone())
                } else {
                    layer.forward(x.clone())
                };
                let grads = (y.clone() * g.clone()).sum().backward();
                let bias = layer.bias.as_ref().expect("bias");
                [
                    to_vec(y),
                    to_vec(x.grad(&grads).expect("dx")),
                    to_vec(layer.weight.grad(&grads).expect("dw")),
                    to_vec(bias.grad(&grads).expect("db")),
                ]
            };
            let (want, got) = (run(false), run(true));
            for (what, (w, g)) in ["y", "dx", "dw", "db"].iter().zip(want.iter().zip(&got)) {
                assert_eq!(w.len(), g.len(), "{name} {what}");
                for (a, b) in w.iter().zip(g) {
                    assert!((a - b).abs() < 1e-5, "{name} {what}: {a} vs {b}");
                }
            }
        }
    }
}
