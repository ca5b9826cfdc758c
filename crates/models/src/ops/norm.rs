//! LayerNorm as one Burn operation (a backend extension) with its own backward.
//!
//! Under autodiff Burn 0.22 composes `LayerNorm` from about a dozen elementwise and reduction
//! ops (mean, centring, variance, square root, division, scale, shift — and their backward
//! nodes), each writing a fresh `[batch, seq, d_model]` buffer. The flex kernel here makes one
//! pass per row forward (`y = (x − μ) · r · γ + β`, `r = 1/√(σ² + ε)`) and one backward,
//! recomputing `μ` and `r` from `x`: with `x̂ = (x − μ) r` and `g = dy ∘ γ`,
//! `dx = r (g − mean(g) − x̂ · mean(g ∘ x̂))`, `dγ = Σ_rows dy ∘ x̂`, `dβ = Σ_rows dy`; the row
//! sums of `dγ` and `dβ` are taken over fixed chunks of rows, then over the chunks in order,
//! so the result is the same bits on any thread count.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::nn::LayerNorm;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use rayon::prelude::*;

use crate::ops::kernel::{lanes, slice};

/// Rows per chunk: the unit of parallel work, and of the ordered dγ / dβ sums.
const CHUNK: usize = 64;

/// The ε of every LayerNorm in our models (`LayerNormConfig`'s default; Burn keeps the field
/// private, and the tests check the fused path against `LayerNorm::forward`).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// LayerNorm over the last dimension as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait LayerNormOps: Backend {
    /// `x` `[rows, d]`, `gamma` and `beta` `[d]`, all f32: `(x − μ) / √(σ² + ε) · γ + β` per
    /// row (biased variance, as `burn::nn::LayerNorm`).
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

/// The backward of [`LayerNormOps::fused_layer_norm`]; called from the autodiff node only.
pub trait LayerNormBackward: Backend {
    /// The gradients of `x`, `gamma` and `beta` given the output gradient `grad` `[rows, d]`.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// A contiguous f32 tensor's data and shape.
fn data(t: &FlexTensor) -> (Vec<usize>, FlexTensor) {
    assert_eq!(t.dtype(), DType::F32, "fused_layer_norm: f32 only");
    let shape = t.layout().shape();
    (
        (0..shape.num_dims()).map(|i| shape[i]).collect(),
        t.to_contiguous(),
    )
}

/// `x` `[rows, d]` and the `[d]` vectors, checked.
fn operands<const V: usize>(
    x: &FlexTensor,
    vectors: [&FlexTensor; V],
) -> (usize, usize, FlexTensor, [FlexTensor; V]) {
    let (shape, x) = data(x);
    let [rows, d] = shape[..] else {
        panic!("fused_layer_norm: x must be [rows, d], got {shape:?}")
    };
    let vectors = vectors.map(|v| {
        let (shape, v) = data(v);
        assert_eq!(shape, [d], "fused_layer_norm: gamma and beta must be [d]");
        v
    });
    (rows, d, x, vectors)
}

impl LayerNormOps for Flex {
    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f32,
    ) -> FlexTensor {
        let (rows, d, x, [gamma, beta]) = operands(&x, [&gamma, &beta]);
        let y = forward(slice(&x), slice(&gamma), slice(&beta), d, eps);
        FlexTensor::from_data(TensorData::new(y, [rows, d]))
    }
}

impl LayerNormBackward for Flex {
    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        eps: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (rows, d, x, [gamma]) = operands(&x, [&gamma]);
        let (grad_shape, grad) = data(&grad);
        assert_eq!(grad_shape, [rows, d], "fused_layer_norm: gradient shape");
        let (dx, dgamma, dbeta) = backward(slice(&x), slice(&gamma), slice(&grad), d, eps);
        (
            FlexTensor::from_data(TensorData::new(dx, [rows, d])),
            FlexTensor::from_data(TensorData::new(dgamma, [d])),
            FlexTensor::from_data(TensorData::new(dbeta, [d])),
        )
    }
}

/// The sum of `x` over eight interleaved lanes (vectorises; a fixed order).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    lanes(x, 0.0, |a, b| a + b)
}

/// A row's mean and `1/√(σ² + ε)`.
#[inline(always)]
fn moments(row: &[f32], eps: f32, scratch: &mut [f32]) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = sum(row) / d;
    for (s, &x) in scratch.iter_mut().zip(row) {
        *s = (x - mean) * (x - mean);
    }
    (mean, 1.0 / (sum(scratch) / d + eps).sqrt())
}

fn forward(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(CHUNK * d)
        .zip(x.par_chunks(CHUNK * d))
        .for_each(|(y, x)| {
            let mut scratch = vec![0.0f32; d];
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (mean, r) = moments(x, eps, &mut scratch);
                for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                    *y = (x - mean) * r * g + b;
                }
            }
        });
    y
}

fn backward(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    d: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; x.len()];
    if d == 0 || x.is_empty() {
        return (dx, vec![0.0; d], vec![0.0; d]);
    }
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(CHUNK * d)
        .zip(x.par_chunks(CHUNK * d).zip(grad.par_chunks(CHUNK * d)))
        .map(|(dx, (x, grad))| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
            let (mut xhat, mut g) = (vec![0.0f32; d], vec![0.0f32; d]);
            for ((dx, x), dy) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(grad.chunks_exact(d))
            {
                let (mean, r) = moments(x, eps, &mut xhat);
                for (h, &x) in xhat.iter_mut().zip(x) {
                    *h = (x - mean) * r;
                }
                for (((g, &dy), &gm), ((dg, db), &h)) in g
                    .iter_mut()
                    .zip(dy)
                    .zip(gamma)
                    .zip(dgamma.iter_mut().zip(dbeta.iter_mut()).zip(&xhat))
                {
                    *g = dy * gm;
                    *dg += dy * h;
                    *db += dy;
                }
                let mean_g = sum(&g) / d as f32;
                for (dx, (&g, &h)) in dx.iter_mut().zip(g.iter().zip(&xhat)) {
                    *dx = g * h;
                }
                let mean_gx = sum(dx) / d as f32;
                for (dx, (&g, &h)) in dx.iter_mut().zip(g.iter().zip(&xhat)) {
                    *dx = r * (g - mean_g - h * mean_gx);
                }
            }
            (dgamma, dbeta)
        })
        .collect();
    let mut parts = partials.into_iter();
    let (mut dgamma, mut dbeta) = parts.next().expect("at least one chunk");
    for (a, b) in parts {
        dgamma.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        dbeta.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    }
    (dx, dgamma, dbeta)
}

impl<B: LayerNormOps + LayerNormBackward, C: CheckpointStrategy> LayerNormOps for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FusedLayerNorm;

        impl<B: LayerNormBackward> Backward<B, 3> for FusedLayerNorm {
            /// The input, the gain and ε.
            type State = (FloatTensor<B>, FloatTensor<B>, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (x, gamma, eps) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dx, dgamma, dbeta) = B::fused_layer_norm_backward(x, gamma, grad, eps);
                for (parent, grad) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        let out = B::fused_layer_norm(x.clone(), gamma.clone(), beta, eps);
        match FusedLayerNorm
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, eps), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `norm.forward(x)`, as the fused operation on flex (f32 inside whatever the model's
/// precision) and as Burn's module elsewhere or when the norm has no shift.
///
/// # Shapes
/// - `x`: `[batch, seq, d_model]`
/// - output: `[batch, seq, d_model]`
pub fn layer_norm(norm: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
    match &norm.beta {
        Some(beta) if crate::ops::device::on_flex(&x.device()) => {
            let [batch, seq, d] = x.dims();
            let dtype = x.dtype();
            let f32 = |t: Tensor<1>| t.cast(FloatDType::F32).into_dispatch();
            let y = Tensor::<2>::from_dispatch(
                <burn::backend::Dispatch as LayerNormOps>::fused_layer_norm(
                    x.reshape([batch * seq, d])
                        .cast(FloatDType::F32)
                        .into_dispatch(),
                    f32(norm.gamma.val()),
                    f32(beta.val()),
                    LAYER_NORM_EPS,
                ),
            );
            y.reshape([batch, seq, d]).cast(dtype)
        }
        _ => norm.forward(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, pattern, same_bits_on_1_and_3_threads, to_vec};
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution};

    /// The fused path against `burn::nn::LayerNorm::forward` (composed under autodiff): values
    /// and the gradients of the input, γ and β, for row counts that fill several chunks and a
    /// partial one, and odd widths.
    #[test]
    fn fused_equals_burn_layer_norm_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        for (batch, seq, d) in [(2, 100, 16), (1, 1, 7), (3, 50, 33)] {
            device.seed(d as u64);
            let mut norm = LayerNormConfig::new(d).init(&device);
            // Non-trivial gain and shift (fresh leaf parameters).
            let vector = |mean: f64| {
                Param::from_tensor(Tensor::<1>::random(
                    [d],
                    Distribution::Normal(mean, 0.5),
                    &device,
                ))
            };
            norm.gamma = vector(1.0);
            norm.beta = Some(vector(0.25));
            let r = |std: f64| {
                Tensor::<3>::random([batch, seq, d], Distribution::Normal(1.0, std), &device)
            };
            let (x, w) = (r(3.0).require_grad(), r(1.0));
            let run = |fused: bool| {
                let y = if fused {
                    layer_norm(&norm, x.clone())
                } else {
                    norm.forward(x.clone())
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                vec![
                    to_vec(y),
                    to_vec(x.grad(&grads).unwrap()),
                    to_vec(norm.gamma.val().grad(&grads).unwrap()),
                    to_vec(norm.beta.as_ref().unwrap().val().grad(&grads).unwrap()),
                ]
            };
            let (fused, composed) = (run(true), run(false));
            for ((what, a), b) in ["y", "dx", "dgamma", "dbeta"]
                .iter()
                .zip(&fused)
                .zip(&composed)
            {
                assert_all_close(a, b, 2e-5, &format!("[{batch}, {seq}, {d}] {what}"));
            }
        }
    }

    /// The same bits on 1 and 3 threads (the dγ / dβ sums run over fixed chunks in order).
    #[test]
    fn kernels_are_bit_identical_across_thread_counts() {
        let (rows, d) = (1000, 24);
        let v = |salt: usize, len: usize| pattern(len, salt, 4.0);
        let (x, gamma, beta, grad) = (v(1, rows * d), v(2, d), v(3, d), v(4, rows * d));
        let same = same_bits_on_1_and_3_threads(|| {
            let y = forward(&x, &gamma, &beta, d, LAYER_NORM_EPS);
            let (dx, dg, db) = backward(&x, &gamma, &grad, d, LAYER_NORM_EPS);
            [y, dx, dg, db]
        });
        assert!(same, "results differ between 1 and 3 threads");
    }
}
