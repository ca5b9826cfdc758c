//! The feed-forward sublayer's bias add and GELU as one Burn operation (a backend extension)
//! with its own backward.
//!
//! Burn's `Linear` adds its bias as a separate broadcast op, and flex runs GELU and its
//! backward as single-threaded elementwise maps; the bias gradient is one more reduction over
//! all rows. The flex kernel here makes one pass forward (`y = gelu(h + b)`, the exact GELU
//! `z · Φ(z)` with `Φ(z) = (1 + erf(z / √2)) / 2`, erf from a branch-free approximation within
//! 6e-7 that vectorises) and one
//! pass backward (`dh = dy · (Φ(z) + z · φ(z))`, `db = Σ_rows dh`), both over chunks of rows in
//! parallel. `db` sums each chunk in row order, then the chunks in order: the same bits on any
//! thread count.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::nn::Linear;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use rayon::prelude::*;

use crate::ops::kernel::{exp_nonpositive, slice};

/// Rows per chunk: the unit of parallel work and of the ordered bias-gradient sums.
const CHUNK: usize = 32;

/// `gelu(h + bias)` as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait BiasGeluOps: Backend {
    /// `h` `[rows, d]` and `bias` `[d]`, both f32: `gelu(h + bias)` (exact, erf-based GELU).
    fn fused_bias_gelu(h: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The backward of [`BiasGeluOps::fused_bias_gelu`]; called from the autodiff node only.
pub trait BiasGeluBackward: Backend {
    /// The gradients of `h` (`[rows, d]`) and `bias` (`[d]`) given the output gradient `grad`.
    fn fused_bias_gelu_backward(
        h: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// A tensor's shape, checked to be f32.
fn dims(t: &FlexTensor) -> Vec<usize> {
    assert_eq!(t.dtype(), DType::F32, "fused_bias_gelu: f32 only");
    let shape = t.layout().shape();
    (0..shape.num_dims()).map(|i| shape[i]).collect()
}

/// `h` `[rows, d]` and `bias` `[d]`, checked, contiguous.
fn operands(h: &FlexTensor, bias: &FlexTensor) -> (usize, usize, [FlexTensor; 2]) {
    let shape = dims(h);
    let [rows, d] = shape[..] else {
        panic!("fused_bias_gelu: h must be [rows, d], got {shape:?}")
    };
    assert_eq!(dims(bias), [d], "fused_bias_gelu: bias must be [d]");
    (rows, d, [h.to_contiguous(), bias.to_contiguous()])
}

impl BiasGeluOps for Flex {
    fn fused_bias_gelu(h: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (rows, d, [h, bias]) = operands(&h, &bias);
        let y = forward(slice(&h), slice(&bias));
        FlexTensor::from_data(TensorData::new(y, [rows, d]))
    }
}

impl BiasGeluBackward for Flex {
    fn fused_bias_gelu_backward(
        h: FlexTensor,
        bias: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (rows, d, [h, bias]) = operands(&h, &bias);
        assert_eq!(dims(&grad), [rows, d], "fused_bias_gelu: gradient shape");
        let grad = grad.to_contiguous();
        let (dh, db) = backward(slice(&h), slice(&bias), slice(&grad));
        (
            FlexTensor::from_data(TensorData::new(dh, [rows, d])),
            FlexTensor::from_data(TensorData::new(db, [d])),
        )
    }
}

/// `erf(x)` to within 6e-7 absolute (Abramowitz & Stegun 7.1.26, `1 − t·P(t)·e^(−x²)` with
/// `t = 1/(1 + p|x|)`, is within 1.5e-7; the rest is f32 rounding), branch-free so that loops over slices vectorise (`libm::erff`, which
/// flex's GELU calls, does not).
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp_nonpositive(-a * a)).copysign(x)
}

/// `Φ(z)`, the standard normal CDF.
#[inline(always)]
fn cdf(z: f32) -> f32 {
    0.5 * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d/dz [z Φ(z)] = Φ(z) + z φ(z)`.
#[inline(always)]
fn gelu_slope(z: f32) -> f32 {
    let pdf = (-0.5 * z * z).exp()
        * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
    cdf(z) + z * pdf
}

fn forward(h: &[f32], bias: &[f32]) -> Vec<f32> {
    let d = bias.len();
    let mut y = vec![0.0f32; h.len()];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(CHUNK * d)
        .zip(h.par_chunks(CHUNK * d))
        .for_each(|(y, h)| {
            for (y, h) in y.chunks_exact_mut(d).zip(h.chunks_exact(d)) {
                for ((y, &h), &b) in y.iter_mut().zip(h).zip(bias) {
                    let z = h + b;
                    *y = z * cdf(z);
                }
            }
        });
    y
}

fn backward(h: &[f32], bias: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = bias.len();
    let mut dh = vec![0.0f32; h.len()];
    if d == 0 || h.is_empty() {
        return (dh, vec![0.0; d]);
    }
    let partials: Vec<Vec<f32>> = dh
        .par_chunks_mut(CHUNK * d)
        .zip(h.par_chunks(CHUNK * d).zip(grad.par_chunks(CHUNK * d)))
        .map(|(dh, (h, grad))| {
            let mut db = vec![0.0f32; d];
            for ((dh, h), g) in dh
                .chunks_exact_mut(d)
                .zip(h.chunks_exact(d))
                .zip(grad.chunks_exact(d))
            {
                for ((((dh, &h), &g), &b), db) in
                    dh.iter_mut().zip(h).zip(g).zip(bias).zip(db.iter_mut())
                {
                    *dh = g * gelu_slope(h + b);
                    *db += *dh;
                }
            }
            db
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut db = parts.next().expect("at least one chunk");
    for part in parts {
        db.iter_mut().zip(&part).for_each(|(x, y)| *x += y);
    }
    (dh, db)
}

impl<B: BiasGeluOps + BiasGeluBackward, C: CheckpointStrategy> BiasGeluOps for Autodiff<B, C> {
    fn fused_bias_gelu(h: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FusedBiasGelu;

        impl<B: BiasGeluBackward> Backward<B, 2> for FusedBiasGelu {
            /// The pre-activation and the bias.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (h, bias) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dh, db) = B::fused_bias_gelu_backward(h, bias, grad);
                for (parent, grad) in ops.parents.into_iter().zip([dh, db]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [h.node(), bias.node()];
        let (h, bias) = (h.into_primitive(), bias.into_primitive());
        let out = B::fused_bias_gelu(h.clone(), bias.clone());
        match FusedBiasGelu.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((h, bias), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// `gelu(fc.forward(x))`: on flex the weight product through Burn's `linear` without bias, then
/// the bias and GELU as the fused operation (f32 inside whatever the model's precision); Burn's
/// modules elsewhere or when `fc` has no bias.
///
/// # Shapes
/// - `x`: `[batch, seq, d_in]`
/// - output: `[batch, seq, d_out]`
pub fn linear_gelu(fc: &Linear, x: Tensor<3>) -> Tensor<3> {
    match &fc.bias {
        Some(bias) if crate::ops::device::on_flex(&x.device()) => {
            let [batch, seq, _] = x.dims();
            let [_, d_out] = fc.weight.dims();
            let h =
                crate::ops::linear::matmul_rows(x, fc.weight.val()).reshape([batch * seq, d_out]);
            let dtype = h.dtype();
            let y = Tensor::<2>::from_dispatch(
                <burn::backend::Dispatch as BiasGeluOps>::fused_bias_gelu(
                    h.cast(FloatDType::F32).into_dispatch(),
                    bias.val().cast(FloatDType::F32).into_dispatch(),
                ),
            );
            y.reshape([batch, seq, d_out]).cast(dtype)
        }
        _ => burn::tensor::activation::gelu(fc.forward(x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, pattern, same_bits_on_1_and_3_threads, to_vec};
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution, activation};

    /// The fused path against Burn's `Linear` then `gelu` (flex's own GELU and its backward):
    /// values and the gradients of the input, weight and bias, for row counts that fill several
    /// chunks and a partial one.
    #[test]
    fn fused_equals_linear_then_gelu_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        for (batch, seq, d_in, d_out) in [(2, 50, 8, 24), (1, 1, 3, 5), (3, 33, 16, 7)] {
            device.seed(d_out as u64);
            let mut fc = LinearConfig::new(d_in, d_out).init(&device);
            fc.bias = Some(Param::from_tensor(Tensor::<1>::random(
                [d_out],
                Distribution::Normal(0.0, 1.0),
                &device,
            )));
            let r = |d: usize| {
                Tensor::<3>::random([batch, seq, d], Distribution::Normal(0.0, 2.0), &device)
            };
            let (x, w) = (r(d_in).require_grad(), r(d_out));
            let run = |fused: bool| {
                let y = if fused {
                    linear_gelu(&fc, x.clone())
                } else {
                    activation::gelu(fc.forward(x.clone()))
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                vec![
                    to_vec(y),
                    to_vec(x.grad(&grads).unwrap()),
                    to_vec(fc.weight.val().grad(&grads).unwrap()),
                    to_vec(fc.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
                ]
            };
            let (fused, composed) = (run(true), run(false));
            for ((what, a), b) in ["y", "dx", "dweight", "dbias"]
                .iter()
                .zip(&fused)
                .zip(&composed)
            {
                assert_all_close(a, b, 1e-5, &format!("[{batch}, {seq}, {d_out}] {what}"));
            }
        }
    }

    /// The slope against central finite differences of `z Φ(z)` in f64 (erf from libm's f64).
    #[test]
    fn slope_matches_finite_differences() {
        let gelu = |z: f64| z * 0.5 * (1.0 + libm::erf(z / std::f64::consts::SQRT_2));
        for i in -60..=60 {
            let z = i as f64 / 10.0;
            let eps = 1e-5;
            let want = (gelu(z + eps) - gelu(z - eps)) / (2.0 * eps);
            let got = f64::from(gelu_slope(z as f32));
            assert!((got - want).abs() < 1e-5, "z = {z}: {got} vs {want}");
        }
    }

    /// The branch-free erf against libm's f64 erf over [−6, 6], within 6e-7 absolute.
    #[test]
    fn erf_matches_f64_within_its_bound() {
        let mut worst = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((f64::from(erf(x)) - libm::erf(f64::from(x))).abs());
        }
        assert!(worst < 6e-7, "worst absolute error {worst}");
        assert!(erf(0.0).abs() < 1e-7 && erf(-0.5) == -erf(0.5));
        assert_eq!(erf(-9.0), -1.0);
    }

    /// The same bits on 1 and 3 threads (the bias gradient sums fixed chunks in order).
    #[test]
    fn kernels_are_bit_identical_across_thread_counts() {
        let (rows, d) = (1000, 24);
        let v = |salt: usize, len: usize| pattern(len, salt, 3.0);
        let (h, bias, grad) = (v(1, rows * d), v(2, d), v(3, rows * d));
        let same = same_bits_on_1_and_3_threads(|| {
            let y = forward(&h, &bias);
            let (dh, db) = backward(&h, &bias, &grad);
            [y, dh, db]
        });
        assert!(same, "results differ between 1 and 3 threads");
    }
}
