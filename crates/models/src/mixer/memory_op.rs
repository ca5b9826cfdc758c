//! The persistent-memory part of all-attention as one Burn operation (a backend extension):
//! for every head and query row, the memory scores `s_j = q · k_j` over the `N` persistent keys,
//! `e_j = exp(s_j − m)` with `m` the larger of the row's context maximum and `max_j s_j`, and
//! the unnormalised output `Σ_j e_j v_j` and weight `Σ_j e_j` that the joint softmax adds to
//! the context's (see [`PersistentAttention::attend`](super::PersistentAttention::attend)).
//!
//! Composed from tensor ops this materialises `[n_heads, batch·seq, N]` scores, exponentials
//! and their gradients (64 MB each at batch 16, seq 256, 4 heads, N 1024) and walks them about
//! twenty times per step. The flex kernel here works on tiles of 64 query rows, whose
//! `[64, N]` scores stay in cache: scores, exponentials, row sums and the value product in
//! one pass, with GEMMs from the `gemm` crate (flex's own) and a vectorisable `exp`. The
//! backward recomputes each tile's exponentials instead of storing them:
//! `dE = (dY Vᵀ) ∘ M·s + dΣ`, `dS = dE ∘ E`, `dQ = dS K`, `dK = dSᵀ Q`, `dV = Dᵀ dY`, with
//! `M` the dropout mask, `s = 1/(1 − p)` and `D = E ∘ M·s` (no dropout: `M·s = 1`, `D = E`).
//!
//! `m` needs no gradient: the joint softmax is invariant to a shift shared by its context and
//! memory parts, so the caller uses the returned `m` (detached) for the context part too.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, TensorData};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Query rows per tile: `[64, N]` scores of N = 1024 are 256 KB.
const TILE: usize = 64;

/// Groups of tiles whose dK / dV partial sums the backward adds in a fixed order.
const GROUPS: usize = 8;

/// Heads, query rows per head, persistent vectors per head, head width.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    rows: usize,
    n: usize,
    d: usize,
}

/// Dropout of the memory weights in the value product: a keep/drop decision per
/// `(head, row, j)` from a hash, so the backward can regenerate the mask.
#[derive(Clone, Copy)]
pub(super) struct Dropout {
    /// Drop when the element's 32-bit hash is below this.
    threshold: u32,
    /// `1 / (1 − p)`.
    scale: f32,
    /// Added (times an odd constant) to each element's 64-bit index before mixing.
    offset: u64,
}

impl Dropout {
    pub(super) fn new(p: f32, seed: u32) -> Self {
        assert!(
            (0.0..1.0).contains(&p),
            "memory_attention: dropout {p} not in [0, 1)"
        );
        Self {
            threshold: (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32,
            scale: 1.0 / (1.0 - p),
            offset: mix(u64::from(seed) ^ 0x5151_7a5e_ed00_0000),
        }
    }

    /// `weights ← weights ∘ mask · scale` for the `n` weights of query `row` of `head`.
    fn apply(&self, weights: &mut [f32], head: usize, rows: usize, row: usize) {
        self.apply_at(weights, ((head * rows + row) * weights.len()) as u64);
    }

    /// `weights ← weights ∘ mask · scale`, where `weights[j]` is element `base + j` of the
    /// operation's (flattened) weight array: its mask bit depends on that index alone.
    pub(super) fn apply_at(&self, weights: &mut [f32], base: u64) {
        if self.threshold == 0 {
            return;
        }
        for (j, w) in weights.iter_mut().enumerate() {
            let bits = (mix(self.offset.wrapping_add(base + j as u64)) >> 32) as u32;
            *w = if bits >= self.threshold {
                *w * self.scale
            } else {
                0.0
            };
        }
    }
}

/// The SplitMix64 finaliser: a bijective 64-bit mix, consecutive inputs giving unrelated
/// outputs.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Persistent-memory attention as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait MemoryAttentionOps: Backend {
    /// Forward. All f32; `q` `[h, M, d]` (scaled queries), `keys` and `values` `[h, N, d]`
    /// (reparameterised and, for keys, score-scaled), `context_max` `[h, M, 1]` (no gradient).
    /// Returns `[h, M, d + 2]`: `Σ_j e_j v_j` in the first `d` columns, `Σ_j e_j` in column
    /// `d`, the shift `m` in column `d + 1` (no gradient).
    ///
    /// With `dropout = p > 0`, each `e_j` in the value product (not in the sum: dropout of the
    /// unnormalised weights, as the composed path does it) is zeroed with probability `p` and
    /// the rest scaled by `1 / (1 − p)`, the mask a hash of `(seed, head, row, j)` so that the
    /// backward regenerates it.
    fn memory_attention(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        context_max: FloatTensor<Self>,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self>;
}

/// The backward of [`MemoryAttentionOps::memory_attention`] on a backend with the forward
/// kernel; called from the autodiff node only, so not routed through `Dispatch`.
pub trait MemoryAttentionBackward: Backend {
    /// Given the forward's output `out` (for the shifts) and the output gradient `grad`
    /// (`[h, M, d + 2]`, the last column ignored): the gradients of `q`, `keys` and `values`.
    fn memory_attention_backward(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        dropout: f32,
        seed: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// A contiguous f32 tensor's data and its three dimensions.
pub(super) fn data3(t: &FlexTensor) -> ([usize; 3], FlexTensor) {
    assert_eq!(t.dtype(), DType::F32, "memory_attention: f32 only");
    let shape = t.layout().shape();
    assert_eq!(shape.num_dims(), 3, "memory_attention: 3-D tensors");
    ([shape[0], shape[1], shape[2]], t.to_contiguous())
}

/// The queries `[h, rows, d]`, keys and values `[h, n, d]` (n ≥ 1) as contiguous f32, their
/// shape checked, and `extra` operands checked against the shapes `want(shape)` gives.
fn operands<const E: usize>(
    [q, keys, values]: [&FlexTensor; 3],
    extra: [&FlexTensor; E],
    want: impl Fn(Shape) -> [[usize; 3]; E],
) -> (Shape, [FlexTensor; 3], [FlexTensor; E]) {
    let ([heads, rows, d], q) = data3(q);
    let (key_shape, keys) = data3(keys);
    let (value_shape, values) = data3(values);
    let shape = Shape {
        heads,
        rows,
        n: key_shape[1],
        d,
    };
    assert!(shape.n > 0, "memory_attention: no persistent vectors");
    assert_eq!(
        [key_shape, value_shape],
        [[heads, shape.n, d]; 2],
        "memory_attention: keys and values must be [heads, N, d] with the queries' heads and d"
    );
    let extra = extra.map(data3);
    assert_eq!(
        extra.each_ref().map(|(got, _)| *got),
        want(shape),
        "memory_attention: operand shapes"
    );
    (shape, [q, keys, values], extra.map(|(_, t)| t))
}

pub(crate) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice().expect("contiguous f32")
}

impl MemoryAttentionOps for Flex {
    fn memory_attention(
        q: FlexTensor,
        keys: FlexTensor,
        values: FlexTensor,
        context_max: FlexTensor,
        dropout: f32,
        seed: u32,
    ) -> FlexTensor {
        let (shape, [q, keys, values], [context_max]) =
            operands([&q, &keys, &values], [&context_max], |s| {
                [[s.heads, s.rows, 1]]
            });
        let out = forward(
            slice(&q),
            slice(&keys),
            slice(&values),
            slice(&context_max),
            shape,
            Dropout::new(dropout, seed),
        );
        FlexTensor::from_data(TensorData::new(out, [shape.heads, shape.rows, shape.d + 2]))
    }
}

impl MemoryAttentionBackward for Flex {
    fn memory_attention_backward(
        q: FlexTensor,
        keys: FlexTensor,
        values: FlexTensor,
        out: FlexTensor,
        grad: FlexTensor,
        dropout: f32,
        seed: u32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (shape, [q, keys, values], [out, grad]) =
            operands([&q, &keys, &values], [&out, &grad], |s| {
                [[s.heads, s.rows, s.d + 2]; 2]
            });
        let (dq, dk, dv) = backward(
            slice(&q),
            slice(&keys),
            slice(&values),
            slice(&out),
            slice(&grad),
            shape,
            Dropout::new(dropout, seed),
        );
        let Shape { heads, rows, n, d } = shape;
        (
            FlexTensor::from_data(TensorData::new(dq, [heads, rows, d])),
            FlexTensor::from_data(TensorData::new(dk, [heads, n, d])),
            FlexTensor::from_data(TensorData::new(dv, [heads, n, d])),
        )
    }
}

/// `dst[m, n] (= dst +) lhs[m, k] · rhs[k, n]`, each operand given by its row and column
/// strides (in elements), single-threaded (the callers parallelise over tiles).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds of every operand, so that the unchecked GEMM below stays inside the slices.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    if k > 0 {
        assert!(last(m, k, lhs_rs, lhs_cs) < lhs.len());
        assert!(last(k, n, rhs_rs, rhs_cs) < rhs.len());
    }
    // SAFETY: the asserts above keep every element the GEMM touches inside the three slices,
    // `dst` is borrowed mutably and does not alias `lhs` or `rhs`, and `k = 0` reads neither.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `exp(x)` for `x <= 0` (clamped below at −87, where it is ~1.6e-38) to within ~2 ulp: a
/// branch-free Cody–Waite reduction and a degree-6 polynomial, so loops over slices vectorise.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to integer
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `e = exp(s − m)` in place over a row; returns `Σ e`. The exponentials are one loop and the
/// sum another with eight running lanes, so that both vectorise (a single running sum would
/// pin the whole loop to scalar code: float addition is not reassociated).
fn exp_row(row: &mut [f32], m: f32) -> f32 {
    for s in row.iter_mut() {
        *s = exp_nonpositive(*s - m);
    }
    lanes(row, 0.0, |a, b| a + b)
}

/// A reduction of `x` from `init` over eight interleaved lanes, then across them.
#[inline(always)]
pub(crate) fn lanes(x: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| op(a, b));
    for chunk in chunks {
        for (a, &b) in acc.iter_mut().zip(chunk) {
            *a = op(*a, b);
        }
    }
    acc.iter().fold(tail, |a, &b| op(a, b))
}

/// The tiles of one head's `rows` query rows: `(first row, row count)`.
fn tiles(rows: usize) -> impl IndexedParallelIterator<Item = (usize, usize)> {
    (0..rows.div_ceil(TILE))
        .into_par_iter()
        .map(move |t| (t * TILE, TILE.min(rows - t * TILE)))
}

/// One tile's exponentials `[len, n]`, their row sums and their shifts (from `shift(row,
/// scores)`).
fn tile_exponentials(
    q: &[f32],
    keys: &[f32],
    (start, len): (usize, usize),
    (n, d): (usize, usize),
    shift: impl Fn(usize, &[f32]) -> f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut e = vec![0.0f32; len * n];
    let (mut sums, mut shifts) = (vec![0.0f32; len], vec![0.0f32; len]);
    // s = Q_tile · Kᵀ: Kᵀ[kk, j] = K[j, kk], row stride 1, column stride d.
    matmul(
        (len, n, d),
        &mut e,
        n,
        false,
        &q[start * d..],
        (d, 1),
        keys,
        (1, d),
    );
    for (i, row) in e.chunks_exact_mut(n).enumerate() {
        let m = shift(start + i, row);
        shifts[i] = m;
        sums[i] = exp_row(row, m);
    }
    (e, sums, shifts)
}

/// Forward kernel; see [`MemoryAttentionOps::memory_attention`].
#[allow(clippy::too_many_arguments)]
fn forward(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    context_max: &[f32],
    Shape { heads, rows, n, d }: Shape,
    dropout: Dropout,
) -> Vec<f32> {
    let width = d + 2;
    let mut out = vec![0.0f32; heads * rows * width];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(rows * width)
        .enumerate()
        .for_each(|(h, out)| {
            let q = &q[h * rows * d..][..rows * d];
            let (keys, values) = (&keys[h * n * d..][..n * d], &values[h * n * d..][..n * d]);
            let context_max = &context_max[h * rows..][..rows];
            out.par_chunks_mut(TILE * width)
                .zip(tiles(rows))
                .for_each(|(out, (start, len))| {
                    let shift =
                        |row: usize, scores: &[f32]| lanes(scores, context_max[row], f32::max);
                    let (mut e, sums, shifts) =
                        tile_exponentials(q, keys, (start, len), (n, d), shift);
                    // Σ_j e_j v_j (dropout applied) into the first d columns of each output row.
                    for (i, e) in e.chunks_exact_mut(n).enumerate() {
                        dropout.apply(e, h, rows, start + i);
                    }
                    matmul((len, d, n), out, width, false, &e, (n, 1), values, (d, 1));
                    for (i, row) in out.chunks_exact_mut(width).enumerate() {
                        row[d] = sums[i];
                        row[d + 1] = shifts[i];
                    }
                });
        });
    out
}

/// Backward kernel; see [`MemoryAttentionBackward::memory_attention_backward`].
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &[f32],
    grad: &[f32],
    Shape { heads, rows, n, d }: Shape,
    dropout: Dropout,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = d + 2;
    let mut dq = vec![0.0f32; heads * rows * d];
    let mut dk = vec![0.0f32; heads * n * d];
    let mut dv = vec![0.0f32; heads * n * d];
    if dq.is_empty() || dk.is_empty() {
        return (dq, dk, dv);
    }
    let per_head = dq
        .par_chunks_mut(rows * d)
        .zip(dk.par_chunks_mut(n * d))
        .zip(dv.par_chunks_mut(n * d));
    per_head.enumerate().for_each(|(h, ((dq, dk), dv))| {
        let q = &q[h * rows * d..][..rows * d];
        let (keys, values) = (&keys[h * n * d..][..n * d], &values[h * n * d..][..n * d]);
        let out = &out[h * rows * width..][..rows * width];
        let grad = &grad[h * rows * width..][..rows * width];
        let zeros = || (vec![0.0f32; n * d], vec![0.0f32; n * d]);
        // One tile: its dQ rows, and its terms added to the running dK and dV.
        let tile = |(mut dk, mut dv): (Vec<f32>, Vec<f32>),
                    (dq, (start, len)): (&mut [f32], (usize, usize))| {
            let shift = |row: usize, _: &[f32]| out[row * width + d + 1];
            let (mut e, _, _) = tile_exponentials(q, keys, (start, len), (n, d), shift);
            let grad = &grad[start * width..];
            // dE = (dY · Vᵀ) ∘ mask · scale + dΣ (per row), then dS = dE ∘ E; and E turns
            // into the dropped weights D that the value product used, for dV.
            let mut de = vec![0.0f32; len * n];
            matmul(
                (len, n, d),
                &mut de,
                n,
                false,
                grad,
                (width, 1),
                values,
                (1, d),
            );
            for (i, (de, e)) in de
                .chunks_exact_mut(n)
                .zip(e.chunks_exact_mut(n))
                .enumerate()
            {
                dropout.apply(de, h, rows, start + i);
                let dsum = grad[i * width + d];
                for (g, &e) in de.iter_mut().zip(e.iter()) {
                    *g = (*g + dsum) * e;
                }
                dropout.apply(e, h, rows, start + i);
            }
            // dQ_tile = dS · K.
            matmul((len, d, n), dq, d, false, &de, (n, 1), keys, (d, 1));
            // dK += dSᵀ · Q_tile; dV += Dᵀ · dY.
            let q_tile = &q[start * d..];
            matmul((n, d, len), &mut dk, d, true, &de, (1, n), q_tile, (d, 1));
            matmul((n, d, len), &mut dv, d, true, &e, (1, n), grad, (width, 1));
            (dk, dv)
        };
        // dK and dV sum over tiles: in a fixed number of groups of consecutive tiles, each
        // summed in order, then the groups in order — the same bits whatever the thread count
        // or scheduling, so training stays reproducible.
        let per_group = rows.div_ceil(TILE).div_ceil(GROUPS);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dq
            .par_chunks_mut(per_group * TILE * d)
            .enumerate()
            .map(|(g, dq)| {
                dq.chunks_mut(TILE * d)
                    .enumerate()
                    .map(|(t, dq)| {
                        let len = dq.len() / d;
                        (dq, ((g * per_group + t) * TILE, len))
                    })
                    .fold(zeros(), tile)
            })
            .collect();
        let (dk_h, dv_h) = partials
            .into_iter()
            .reduce(|(mut a, mut b), (c, e)| {
                a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                (a, b)
            })
            .unwrap_or_else(zeros);
        dk.copy_from_slice(&dk_h);
        dv.copy_from_slice(&dv_h);
    });
    (dq, dk, dv)
}

impl<B: MemoryAttentionOps + MemoryAttentionBackward, C: CheckpointStrategy> MemoryAttentionOps
    for Autodiff<B, C>
{
    fn memory_attention(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        context_max: FloatTensor<Self>,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MemoryAttention;

        impl<B: MemoryAttentionBackward> Backward<B, 3> for MemoryAttention {
            /// The inputs, the forward output (for its shifts) and the dropout settings.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                (f32, u32),
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (q, keys, values, out, (dropout, seed)) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::memory_attention_backward(q, keys, values, out, grad, dropout, seed);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [q.node(), keys.node(), values.node()];
        let (q, keys, values) = (
            q.into_primitive(),
            keys.into_primitive(),
            values.into_primitive(),
        );
        let out = B::memory_attention(
            q.clone(),
            keys.clone(),
            values.clone(),
            context_max.into_primitive(),
            dropout,
            seed,
        );
        match MemoryAttention
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((q, keys, values, out.clone(), (dropout, seed)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, pattern, same_bits_on_1_and_3_threads, to_vec};
    use burn::tensor::{Device, Distribution, Tensor};

    /// The operation (through `Dispatch` and autodiff on flex) against the same function built
    /// from tensor ops with the same dropout mask: outputs (`Σ e v` and `Σ e`) and the gradients
    /// of queries, keys and values, without and with dropout, over 150 query rows (a partial
    /// tile) and memory maxima that sometimes beat the context ones.
    #[test]
    fn operation_equals_tensor_ops_with_the_same_dropout_mask() {
        let device = Device::flex().autodiff();
        let (heads, rows, n, d) = (2, 150, 37, 8);
        for (p, seed) in [(0.0f32, 0u32), (0.3, 7), (0.3, 8)] {
            device.seed(3);
            let r = |shape: [usize; 3], std: f64| {
                Tensor::<3>::random(shape, Distribution::Normal(0.0, std), &device)
            };
            let q = r([heads, rows, d], 1.0).require_grad();
            let keys = r([heads, n, d], 1.0).require_grad();
            let values = r([heads, n, d], 1.0).require_grad();
            let context_max = r([heads, rows, 1], 2.0);
            let w = r([heads, rows, d + 1], 1.0);
            // The mask the kernel draws, read off by dropping a tensor of ones.
            let dropout = Dropout::new(p, seed);
            let mut mask = vec![1.0f32; heads * rows * n];
            for (i, row) in mask.chunks_exact_mut(n).enumerate() {
                dropout.apply(row, i / rows, rows, i % rows);
            }
            let mask = Tensor::<3>::from_data(TensorData::new(mask, [heads, rows, n]), &device);

            let fused = Tensor::<3>::from_dispatch(
                <burn::backend::Dispatch as MemoryAttentionOps>::memory_attention(
                    q.clone().into_dispatch(),
                    keys.clone().into_dispatch(),
                    values.clone().into_dispatch(),
                    context_max.clone().into_dispatch(),
                    p,
                    seed,
                ),
            );
            let scores = q.clone().matmul(keys.clone().swap_dims(1, 2)); // [heads, rows, n]
            let shift = scores.clone().max_dim(2).max_pair(context_max).detach();
            let e = (scores - shift.clone()).exp();
            let reference = Tensor::cat(
                vec![(e.clone() * mask).matmul(values.clone()), e.sum_dim(2)],
                2,
            );
            let shifts = to_vec(fused.clone().narrow(2, d + 1, 1));
            for (a, b) in shifts.iter().zip(to_vec(shift)) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "p={p} shift {a} vs {b}"
                );
            }
            let fused = fused.narrow(2, 0, d + 1);
            let mut results = vec![];
            for out in [fused, reference] {
                let grads = (out.clone() * w.clone()).sum().backward();
                let mut r = vec![to_vec(out)];
                for t in [&q, &keys, &values] {
                    r.push(to_vec(t.grad(&grads).unwrap()));
                }
                results.push(r);
            }
            for (name, (a, b)) in ["output", "dq", "dkeys", "dvalues"]
                .iter()
                .zip(results[0].iter().zip(&results[1]))
            {
                assert_all_close(a, b, 1e-5, &format!("p={p} seed={seed} {name}"));
            }
        }
    }

    /// The kernels give the same bits on 1 thread and on 3 (training must be reproducible
    /// whatever the machine's core count): the backward sums dK and dV in a fixed order.
    #[test]
    fn kernels_are_bit_identical_across_thread_counts() {
        let shape = Shape {
            heads: 2,
            rows: 700,
            n: 19,
            d: 6,
        };
        let data = |len: usize, salt: usize| pattern(len, salt, 4.0);
        let Shape { heads, rows, n, d } = shape;
        let q = data(heads * rows * d, 1);
        let (keys, values) = (data(heads * n * d, 2), data(heads * n * d, 3));
        let context_max = data(heads * rows, 4);
        let grad = data(heads * rows * (d + 2), 5);
        let dropout = Dropout::new(0.2, 5);
        let same = same_bits_on_1_and_3_threads(|| {
            let out = forward(&q, &keys, &values, &context_max, shape, dropout);
            let (dq, dk, dv) = backward(&q, &keys, &values, &out, &grad, shape, dropout);
            [out, dq, dk, dv]
        });
        assert!(same, "results differ between 1 and 3 threads");
    }

    /// The hashed mask drops the asked-for fraction and differs between seeds.
    #[test]
    fn dropout_mask_has_its_rate_and_follows_the_seed() {
        let count = |seed: u32| {
            let dropout = Dropout::new(0.25, seed);
            let mut ones = vec![1.0f32; 4096];
            let mut kept = vec![];
            for row in 0..64 {
                ones.fill(1.0);
                dropout.apply(&mut ones, 1, 64, row);
                kept.extend(ones.iter().map(|&x| x > 0.0));
                assert!(
                    ones.iter()
                        .all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6)
                );
            }
            kept
        };
        let (a, b) = (count(1), count(2));
        let rate = a.iter().filter(|&&k| !k).count() as f64 / a.len() as f64;
        assert!((rate - 0.25).abs() < 0.005, "dropped fraction {rate}");
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
        assert!(same < 0.7, "seeds 1 and 2 agree on {same} of the mask");
    }

    /// The polynomial `exp` against f64's over [−87, 0], within 3e-7 relative (≈ 2.5 ulp).
    #[test]
    fn exp_matches_f64_over_its_domain() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(
            exp_nonpositive(-1000.0) < 1e-37,
            "clamped, not denormal or garbage"
        );
    }
}
