//! Log-softmax cross-entropy as one Burn operation (a backend extension) with its own backward.
//!
//! Under autodiff Burn composes `log_softmax` + `gather` from about ten elementwise and
//! reduction ops over the `[batch · seq, vocab]` logits (max, shift, exp with libm's scalar
//! `expf`, sum, log, subtract, gather, negate — and their backward nodes), each a fresh buffer.
//! The flex kernel makes one pass per row forward — `L = m + ln Σ exp(x − m)` and
//! `nll = L − x[t]` — and one backward, `dx = g · (exp(x − L) − 1[j = t])`, with the
//! vectorised `exp` of the attention kernel; rows are independent, so the result is the same
//! bits on any thread count.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::ops::kernel::{exp_nonpositive, lanes, slice};

/// Rows per parallel chunk.
const CHUNK: usize = 32;

/// Cross-entropy per row as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait CrossEntropyOps: Backend {
    /// `logits` `[rows, vocab]` and `targets` `[rows]` (token ids as f32, exact below 2²⁴),
    /// both f32: the negative log-likelihood of each row's target, `[rows]`.
    fn fused_token_nll(logits: FloatTensor<Self>, targets: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The backward of [`CrossEntropyOps::fused_token_nll`]; called from the autodiff node only.
pub trait CrossEntropyBackward: Backend {
    /// The gradient of the logits given the per-row output gradient `grad` `[rows]`.
    fn fused_token_nll_backward(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `logits` `[rows, vocab]`, contiguous f32, checked: `(rows, vocab, logits)`.
fn logits_operand(logits: &FlexTensor) -> (usize, usize, FlexTensor) {
    assert_eq!(logits.dtype(), DType::F32, "fused_token_nll: f32 only");
    let shape = logits.layout().shape();
    assert_eq!(
        shape.num_dims(),
        2,
        "fused_token_nll: logits must be [rows, vocab]"
    );
    (shape[0], shape[1], logits.to_contiguous())
}

/// A `[rows]` f32 vector (targets, or the output gradient), contiguous, checked.
fn row_vector(v: &FlexTensor, rows: usize) -> FlexTensor {
    assert_eq!(v.dtype(), DType::F32, "fused_token_nll: f32 only");
    let shape = v.layout().shape();
    assert!(
        shape.num_dims() == 1 && shape[0] == rows,
        "fused_token_nll: a [{rows}] vector per row"
    );
    v.to_contiguous()
}

/// The target of a row: its id, checked against the vocabulary.
#[inline]
fn target(t: f32, vocab: usize) -> usize {
    let id = t as usize;
    assert!(
        t >= 0.0 && t.fract() == 0.0 && id < vocab,
        "fused_token_nll: target {t} outside 0..{vocab}"
    );
    id
}

/// `ln Σ exp(x)` of one row, shifted by its maximum; `scratch` holds `x − m` afterwards.
#[inline]
fn log_sum_exp(row: &[f32], scratch: &mut [f32]) -> f32 {
    let m = lanes(row, f32::NEG_INFINITY, f32::max);
    for (s, &x) in scratch.iter_mut().zip(row) {
        *s = exp_nonpositive(x - m);
    }
    m + lanes(scratch, 0.0, |a, b| a + b).ln()
}

impl CrossEntropyOps for Flex {
    fn fused_token_nll(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let (rows, vocab, logits) = logits_operand(&logits);
        let targets = row_vector(&targets, rows);
        let (x, t) = (slice(&logits), slice(&targets));
        let mut nll = vec![0.0f32; rows];
        nll.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK * vocab.max(1)))
            .zip(t.par_chunks(CHUNK))
            .for_each(|((nll, x), t)| {
                let mut scratch = vec![0.0f32; vocab];
                for ((nll, row), &t) in nll.iter_mut().zip(x.chunks_exact(vocab)).zip(t) {
                    *nll = log_sum_exp(row, &mut scratch) - row[target(t, vocab)];
                }
            });
        FlexTensor::from_data(TensorData::new(nll, [rows]))
    }
}

impl CrossEntropyBackward for Flex {
    fn fused_token_nll_backward(
        logits: FlexTensor,
        targets: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let (rows, vocab, logits) = logits_operand(&logits);
        let (targets, grad) = (row_vector(&targets, rows), row_vector(&grad, rows));
        let (x, t, g) = (slice(&logits), slice(&targets), slice(&grad));
        let mut dx = vec![0.0f32; rows * vocab];
        dx.par_chunks_mut(CHUNK * vocab.max(1))
            .zip(x.par_chunks(CHUNK * vocab.max(1)))
            .zip(t.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|((dx, x), (t, g))| {
                for (((dx, row), &t), &g) in dx
                    .chunks_exact_mut(vocab)
                    .zip(x.chunks_exact(vocab))
                    .zip(t)
                    .zip(g)
                {
                    let lse = log_sum_exp(row, dx);
                    for (d, &x) in dx.iter_mut().zip(row) {
                        *d = g * exp_nonpositive(x - lse);
                    }
                    dx[target(t, vocab)] -= g;
                }
            });
        FlexTensor::from_data(TensorData::new(dx, [rows, vocab]))
    }
}

impl<B: CrossEntropyOps + CrossEntropyBackward, C: CheckpointStrategy> CrossEntropyOps
    for Autodiff<B, C>
{
    fn fused_token_nll(logits: FloatTensor<Self>, targets: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FusedTokenNll;

        impl<B: CrossEntropyBackward> Backward<B, 1> for FusedTokenNll {
            /// The logits and the targets (the probabilities are recomputed).
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (logits, targets) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let dx = B::fused_token_nll_backward(logits, targets, grad);
                if let Some(node) = &ops.parents[0] {
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        let (logits_node, logits) = (logits.node(), logits.into_primitive());
        let targets = targets.into_primitive();
        let out = B::fused_token_nll(logits.clone(), targets.clone());
        match FusedTokenNll
            .prepare::<C>([logits_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, targets), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// Per-token negative log-likelihood as the fused operation (flex only; the caller checks).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `targets`: `[batch, seq]`
/// - output: `[batch, seq]`
pub(crate) fn fused_token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, seq, vocab] = logits.dims();
    let targets = targets
        .reshape([batch * seq])
        .float()
        .cast(FloatDType::F32)
        .into_dispatch();
    let nll = Tensor::<1>::from_dispatch(
        <burn::backend::Dispatch as CrossEntropyOps>::fused_token_nll(
            logits
                .reshape([batch * seq, vocab])
                .cast(FloatDType::F32)
                .into_dispatch(),
            targets,
        ),
    );
    nll.reshape([batch, seq])
}
