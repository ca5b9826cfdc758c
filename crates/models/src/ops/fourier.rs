//! The FNet transform `Re(F_s X F_h)` as one Burn operation (a backend extension), so that
//! autodiff records one node instead of the dozen slices, flips, concatenations and FFTs that
//! compose it from tensor ops, and its backward is one more transform.
//!
//! The backward is the same transform: `y = C_s X C_h − S_s X S_h` is linear in `X`, and the
//! cosine and sine DFT matrices are symmetric, so `∂L/∂X = C_sᵀ G C_hᵀ − S_sᵀ G S_hᵀ = C_s G C_h
//! − S_s G S_h` — the transform of the output gradient `G`.
//!
//! Implemented for flex (the CPU backend) with `realfft`/`rustfft` (planned, SIMD FFTs) and
//! rayon, per batch element of `X` (`[seq, d]`):
//! 1. a real FFT of every row: the `d/2 + 1` non-redundant hidden columns `Z = X F_h[:, ..=d/2]`;
//! 2. a complex FFT of every one of those columns along the sequence (after a transpose, so
//!    each is contiguous): `F_s Z`, whose real part is the result for `k_h <= d/2`;
//! 3. the columns `k_h > d/2` from Hermitian symmetry of the 2-D spectrum of a real input:
//!    `Re Y[k_s, k_h] = Re Y[(n − k_s) mod n, d − k_h]`.
//!
//! Any lengths work (rustfft plans mixed radices and Bluestein); the callers keep to powers of
//! two, which the composed GPU path needs. Other backends compose the transform from
//! `burn::signal` ops ([`fft_mix`](super::fft_mix) chooses); ndarray has no FFTs at all.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use rustfft::{Fft, FftPlanner};
use std::sync::{Arc, Mutex, OnceLock};

/// The FNet transform as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait FourierOps: Backend {
    /// `Re(FFT_seq(FFT_hidden(x)))` of an f32 `[batch, seq, d_model]` tensor; same shape out.
    fn fourier_mix(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl FourierOps for Flex {
    fn fourier_mix(x: FlexTensor) -> FlexTensor {
        assert_eq!(x.dtype(), DType::F32, "fourier_mix: f32 only");
        let shape = x.layout().shape().clone();
        assert_eq!(shape.num_dims(), 3, "fourier_mix: [batch, seq, d_model]");
        let [batch, seq, d] = [shape[0], shape[1], shape[2]];
        let x = x.to_contiguous();
        let out = transform(x.as_slice().expect("contiguous f32"), batch, seq, d);
        FlexTensor::from_data(TensorData::new(out, [batch, seq, d]))
    }
}

/// Planned FFTs, built once per length and shared by every thread.
fn plans(d: usize, seq: usize) -> (Arc<dyn RealToComplex<f32>>, Arc<dyn Fft<f32>>) {
    static PLANNERS: OnceLock<Mutex<(RealFftPlanner<f32>, FftPlanner<f32>)>> = OnceLock::new();
    let mut planners = PLANNERS
        .get_or_init(|| Mutex::new((RealFftPlanner::new(), FftPlanner::new())))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    (
        planners.0.plan_fft_forward(d),
        planners.1.plan_fft_forward(seq),
    )
}

/// `Re(F_s X F_h)` of each `[seq, d]` matrix in `x` (row-major, `batch` of them).
pub(crate) fn transform(x: &[f32], batch: usize, seq: usize, d: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        batch * seq * d,
        "fourier_mix: data does not match its shape"
    );
    let mut out = vec![0.0f32; batch * seq * d];
    if out.is_empty() {
        return out;
    }
    let width = d / 2 + 1;
    let (rows, columns) = plans(d, seq);
    // Pieces of fixed size (not derived from the thread count): how rustfft groups the FFTs of
    // one call could change the last bits, and results must not depend on the machine.
    let mut spectrum = vec![Complex::<f32>::default(); seq * width]; // [seq, width]
    let mut by_column = vec![Complex::<f32>::default(); width * seq]; // [width, seq]
    for (x, out) in x.chunks_exact(seq * d).zip(out.chunks_exact_mut(seq * d)) {
        // 1. Real FFT of every row.
        let rows_per_piece = 16;
        spectrum
            .par_chunks_mut(width * rows_per_piece)
            .zip(x.par_chunks(d * rows_per_piece))
            .for_each(|(spectrum, x)| {
                let mut input = vec![0.0f32; d];
                let mut scratch = rows.make_scratch_vec();
                for (z, x) in spectrum.chunks_exact_mut(width).zip(x.chunks_exact(d)) {
                    input.copy_from_slice(x); // the real FFT uses its input as scratch
                    rows.process_with_scratch(&mut input, z, &mut scratch)
                        .expect("planned lengths");
                }
            });
        // 2. Transpose, then a complex FFT of every column (several per call).
        let columns_per_piece = 8;
        by_column
            .par_chunks_mut(seq * columns_per_piece)
            .enumerate()
            .for_each(|(piece, block)| {
                for (c, column) in block.chunks_exact_mut(seq).enumerate() {
                    let k = piece * columns_per_piece + c;
                    for (s, z) in column.iter_mut().enumerate() {
                        *z = spectrum[s * width + k];
                    }
                }
                let mut scratch = vec![Complex::default(); columns.get_inplace_scratch_len()];
                columns.process_with_scratch(block, &mut scratch);
            });
        // 3. Real parts, the upper hidden half mirrored.
        let by_column = &by_column;
        out.par_chunks_mut(d).enumerate().for_each(|(s, row)| {
            let mirror = (seq - s) % seq;
            for (k, y) in row.iter_mut().enumerate() {
                *y = if k < width {
                    by_column[k * seq + s].re
                } else {
                    by_column[(d - k) * seq + mirror].re
                };
            }
        });
    }
    out
}

impl<B: Backend + FourierOps, C: CheckpointStrategy> FourierOps for Autodiff<B, C> {
    fn fourier_mix(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FourierMix;

        impl<B: Backend + FourierOps> Backward<B, 1> for FourierMix {
            type State = ();

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                // Self-adjoint: the gradient is the transform of the output gradient.
                unary::<B, _>(ops.parents, ops.node, grads, B::fourier_mix);
            }
        }

        let node = x.node();
        let output = B::fourier_mix(x.into_primitive());
        FourierMix
            .prepare::<C>([node])
            .compute_bound()
            .stateless(output)
    }
}
