//! Dense scaled dot-product attention as one Burn operation (a backend extension) whose flex
//! kernel never materialises the `n × n` scores: FlashAttention-2's schedule on a CPU.
//!
//! Forward, per head and tile of [`TILE`] query rows: for each block of [`KEYS`] keys, the
//! scores `S = Q_tile K_blockᵀ` (queries come pre-scaled), an online softmax (running row
//! maximum `m` and sum `l`, the accumulated output rescaled by `exp(m_old − m_new)` when the
//! maximum grows), `O += P V_block`; at the end `O /= l` and the row's log-sum-exp
//! `L = m + ln l` is kept beside the output. Causal attention skips every key block above the
//! diagonal and masks only the blocks that straddle it.
//!
//! Backward, per tile, the probabilities recomputed from `L` (`P = exp(S − L)`, nothing
//! stored but `O` and `L`): `dP = dO Vᵀ`, `dS = P ∘ (dP − Δ)` with `Δ = rowsum(dO ∘ O)`,
//! `dQ += dS K`, `dK += dSᵀ Q`, `dV += Pᵀ dO`. dK and dV sum over query tiles in a fixed number
//! of groups of consecutive tiles, each summed in order, then the groups in order — the same
//! bits on any thread count.
//!
//! Attention dropout: each probability of the value product is kept with probability
//! `1 − p` and scaled by `1 / (1 − p)`, the mask a hash of `(seed, head, row, key)` that the
//! backward regenerates (`dP` is masked the same way; `Δ = rowsum(dO ∘ O)` stays exact).
//!
//! Memory: `O(TILE · KEYS)` scratch per thread plus `O(n · d)` per head for the dK / dV
//! partial sums, so peak memory is linear in the sequence length.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::TensorData;
use rayon::prelude::*;

use super::memory_op::{Dropout, data3, exp_nonpositive, lanes, matmul, slice};

/// Query rows per tile.
const TILE: usize = 64;

/// Keys per block: a `[TILE, KEYS]` score block is 64 KB, well inside L2.
const KEYS: usize = 256;

/// Groups of query tiles whose dK / dV partial sums the backward adds in a fixed order.
const GROUPS: usize = 8;

/// Heads (batch × heads, flattened), sequence length, head width, causality.
#[derive(Clone, Copy, Debug)]
struct Shape {
    heads: usize,
    n: usize,
    d: usize,
    causal: bool,
}

impl Shape {
    /// Keys visible to the rows of the tile `[start, start + len)`: `0..end`.
    fn key_end(&self, start: usize, len: usize) -> usize {
        if self.causal { start + len } else { self.n }
    }

    /// How many keys of the block starting at `block` row `row` sees (causal: keys `≤ row`).
    fn visible(&self, row: usize, block: usize, block_len: usize) -> usize {
        if self.causal {
            (row + 1).saturating_sub(block).min(block_len)
        } else {
            block_len
        }
    }
}

/// Dense attention as a backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait AttentionOps: Backend {
    /// Forward. All f32: `q` (already multiplied by the score scale), `k` and `v`
    /// `[heads, n, d]` with `heads = batch · n_heads`. Returns `[heads, n, d + 1]`: the
    /// attention output in the first `d` columns and each row's log-sum-exp of scores in column
    /// `d` (no gradient flows through it).
    ///
    /// `causal` hides keys after each query. With `dropout = p > 0` each weight in the value
    /// product is zeroed with probability `p` and the rest scaled by `1 / (1 − p)`, the mask a
    /// hash of `(seed, head, row, key)` that the backward regenerates.
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self>;
}

/// The backward of [`AttentionOps::tiled_attention`] on a backend with the forward kernel;
/// called from the autodiff node only, so not routed through `Dispatch`.
pub trait AttentionBackward: Backend {
    /// Given the forward's output `out` (`[heads, n, d + 1]`) and its gradient `grad` (same
    /// shape, the last column ignored): the gradients of `q`, `k` and `v`.
    #[allow(clippy::too_many_arguments)]
    fn tiled_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        causal: bool,
        dropout: f32,
        seed: u32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `q`, `k`, `v` as contiguous f32 with their common shape checked, and `extra` operands
/// checked to be `[heads, n, d + 1]`.
fn operands<const E: usize>(
    [q, k, v]: [&FlexTensor; 3],
    extra: [&FlexTensor; E],
    causal: bool,
) -> (Shape, [FlexTensor; 3], [FlexTensor; E]) {
    let (q_shape, q) = data3(q);
    let (k_shape, k) = data3(k);
    let (v_shape, v) = data3(v);
    assert_eq!(
        [k_shape, v_shape],
        [q_shape; 2],
        "tiled_attention: q, k and v must all be [heads, n, d]"
    );
    let [heads, n, d] = q_shape;
    let extra = extra.map(|t| {
        let (shape, t) = data3(t);
        assert_eq!(shape, [heads, n, d + 1], "tiled_attention: operand shapes");
        t
    });
    (
        Shape {
            heads,
            n,
            d,
            causal,
        },
        [q, k, v],
        extra,
    )
}

impl AttentionOps for Flex {
    fn tiled_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        causal: bool,
        dropout: f32,
        seed: u32,
    ) -> FlexTensor {
        let (shape, [q, k, v], []) = operands([&q, &k, &v], [], causal);
        let out = forward(
            slice(&q),
            slice(&k),
            slice(&v),
            shape,
            Dropout::new(dropout, seed),
        );
        FlexTensor::from_data(TensorData::new(out, [shape.heads, shape.n, shape.d + 1]))
    }
}

impl AttentionBackward for Flex {
    fn tiled_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        grad: FlexTensor,
        causal: bool,
        dropout: f32,
        seed: u32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (shape, [q, k, v], [out, grad]) = operands([&q, &k, &v], [&out, &grad], causal);
        let grads = backward(
            [slice(&q), slice(&k), slice(&v)],
            slice(&out),
            slice(&grad),
            shape,
            Dropout::new(dropout, seed),
        );
        let dims = [shape.heads, shape.n, shape.d];
        let [dq, dk, dv] = grads.map(|g| FlexTensor::from_data(TensorData::new(g, dims)));
        (dq, dk, dv)
    }
}

/// Head `h`'s part of a `[heads, ...]` array with `size` elements per head.
fn head(t: &[f32], h: usize, size: usize) -> &[f32] {
    &t[h * size..][..size]
}

/// The tiles of `n` query rows: `(first row, row count)`.
fn tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(TILE)).map(move |t| (t * TILE, TILE.min(n - t * TILE)))
}

/// The key blocks `[0, end)` is cut into: `(first key, key count)`.
fn key_blocks(end: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..end.div_ceil(KEYS)).map(move |b| (b * KEYS, KEYS.min(end - b * KEYS)))
}

/// Forward kernel; see [`AttentionOps::tiled_attention`].
fn forward(q: &[f32], k: &[f32], v: &[f32], shape: Shape, dropout: Dropout) -> Vec<f32> {
    let Shape { heads, n, d, .. } = shape;
    let width = d + 1;
    let mut out = vec![0.0f32; heads * n * width];
    if out.is_empty() {
        return out;
    }
    let work: Vec<(usize, (usize, usize))> = (0..heads)
        .flat_map(|h| tiles(n).map(move |tile| (h, tile)))
        .collect();
    // Split by head, then by tile (a head's last tile may be partial).
    let chunks: Vec<&mut [f32]> = out
        .chunks_mut(n * width)
        .flat_map(|head| head.chunks_mut(TILE * width))
        .collect();
    chunks
        .into_par_iter()
        .zip(work)
        .for_each(|(out, (h, (start, len)))| {
            let qkv = [q, k, v].map(|t| head(t, h, n * d));
            forward_tile(qkv, out, (h, start, len), shape, dropout);
        });
    out
}

/// One forward tile: `out` is the tile's `[len, d + 1]` output rows, zeroed.
fn forward_tile(
    [q, k, v]: [&[f32]; 3],
    out: &mut [f32],
    (h, start, len): (usize, usize, usize),
    shape: Shape,
    dropout: Dropout,
) {
    let Shape { n, d, .. } = shape;
    let width = d + 1;
    let mut max = vec![f32::NEG_INFINITY; len];
    let mut sum = vec![0.0f32; len];
    let mut s = vec![0.0f32; len * KEYS];
    for (block, kl) in key_blocks(shape.key_end(start, len)) {
        let s = &mut s[..len * kl];
        // S = Q_tile · K_blockᵀ: Kᵀ[c, j] = K[block + j, c], row stride 1, column stride d.
        matmul(
            (len, kl, d),
            s,
            kl,
            false,
            &q[start * d..],
            (d, 1),
            &k[block * d..],
            (1, d),
        );
        for (i, row) in s.chunks_exact_mut(kl).enumerate() {
            let visible = shape.visible(start + i, block, kl);
            let (seen, hidden) = row.split_at_mut(visible);
            hidden.fill(0.0);
            if seen.is_empty() {
                continue;
            }
            let m = lanes(seen, max[i], f32::max);
            if m > max[i] {
                // The running output and sum were relative to the old maximum.
                let alpha = exp_nonpositive(max[i] - m);
                sum[i] *= alpha;
                for o in &mut out[i * width..][..d] {
                    *o *= alpha;
                }
                max[i] = m;
            }
            for x in seen.iter_mut() {
                *x = exp_nonpositive(*x - m);
            }
            sum[i] += lanes(seen, 0.0, |a, b| a + b);
            dropout.apply_at(seen, ((h * n + start + i) * n + block) as u64);
        }
        // O_tile += P · V_block.
        matmul(
            (len, d, kl),
            out,
            width,
            true,
            s,
            (kl, 1),
            &v[block * d..],
            (d, 1),
        );
    }
    for (i, row) in out.chunks_exact_mut(width).enumerate() {
        let inv = 1.0 / sum[i];
        for o in &mut row[..d] {
            *o *= inv;
        }
        row[d] = max[i] + sum[i].ln();
    }
}

/// Backward kernel; see [`AttentionBackward::tiled_attention_backward`].
fn backward(
    [q, k, v]: [&[f32]; 3],
    out: &[f32],
    grad: &[f32],
    shape: Shape,
    dropout: Dropout,
) -> [Vec<f32>; 3] {
    let Shape { heads, n, d, .. } = shape;
    let width = d + 1;
    let mut dq = vec![0.0f32; heads * n * d];
    let mut dk = vec![0.0f32; heads * n * d];
    let mut dv = vec![0.0f32; heads * n * d];
    if dq.is_empty() {
        return [dq, dk, dv];
    }
    let tile_count = n.div_ceil(TILE);
    let per_group = tile_count.div_ceil(GROUPS);
    let per_head = dq
        .par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(n * d))
        .zip(dv.par_chunks_mut(n * d));
    per_head.enumerate().for_each(|(h, ((dq, dk), dv))| {
        let [q, k, v] = [q, k, v].map(|t| head(t, h, n * d));
        let (out, grad) = (head(out, h, n * width), head(grad, h, n * width));
        // Δ_i = Σ_c dO[i, c] · O[i, c].
        let delta: Vec<f32> = out
            .chunks_exact(width)
            .zip(grad.chunks_exact(width))
            .map(|(o, g)| o[..d].iter().zip(&g[..d]).map(|(a, b)| a * b).sum())
            .collect();
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dq
            .par_chunks_mut(per_group * TILE * d)
            .enumerate()
            .map(|(g, dq)| {
                let mut acc = (vec![0.0f32; n * d], vec![0.0f32; n * d]);
                for (t, dq) in dq.chunks_mut(TILE * d).enumerate() {
                    let tile = (h, (g * per_group + t) * TILE, dq.len() / d);
                    backward_tile(
                        [q, k, v],
                        out,
                        grad,
                        &delta,
                        dq,
                        &mut acc,
                        tile,
                        shape,
                        dropout,
                    );
                }
                acc
            })
            .collect();
        let mut partials = partials.into_iter();
        if let Some((dk_h, dv_h)) = partials.next() {
            dk.copy_from_slice(&dk_h);
            dv.copy_from_slice(&dv_h);
        }
        for (a, b) in partials {
            dk.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
            dv.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
        }
    });
    [dq, dk, dv]
}

/// One backward tile: writes the tile's `dq` rows and adds its terms to this group's running
/// `(dK, dV)` of the head.
#[allow(clippy::too_many_arguments)]
fn backward_tile(
    [q, k, v]: [&[f32]; 3],
    out: &[f32],
    grad: &[f32],
    delta: &[f32],
    dq: &mut [f32],
    (dk, dv): &mut (Vec<f32>, Vec<f32>),
    (h, start, len): (usize, usize, usize),
    shape: Shape,
    dropout: Dropout,
) {
    let Shape { n, d, .. } = shape;
    let width = d + 1;
    let q_tile = &q[start * d..];
    let grad_tile = &grad[start * width..];
    let mut p = vec![0.0f32; len * KEYS];
    let mut dp = vec![0.0f32; len * KEYS];
    for (first, (block, kl)) in key_blocks(shape.key_end(start, len)).enumerate() {
        let (p, dp) = (&mut p[..len * kl], &mut dp[..len * kl]);
        matmul(
            (len, kl, d),
            p,
            kl,
            false,
            q_tile,
            (d, 1),
            &k[block * d..],
            (1, d),
        );
        // dP = dO_tile · V_blockᵀ.
        matmul(
            (len, kl, d),
            dp,
            kl,
            false,
            grad_tile,
            (width, 1),
            &v[block * d..],
            (1, d),
        );
        for (i, (p, dp)) in p
            .chunks_exact_mut(kl)
            .zip(dp.chunks_exact_mut(kl))
            .enumerate()
        {
            let row = start + i;
            let visible = shape.visible(row, block, kl);
            let lse = out[row * width + d];
            let base = ((h * n + row) * n + block) as u64;
            let (seen, hidden) = p.split_at_mut(visible);
            hidden.fill(0.0);
            for x in seen.iter_mut() {
                *x = exp_nonpositive(*x - lse);
            }
            // dS = P ∘ (dP ∘ mask · scale − Δ); P turns into the dropped weights for dV.
            dropout.apply_at(dp, base);
            for (g, &x) in dp.iter_mut().zip(p.iter()) {
                *g = x * (*g - delta[row]);
            }
            dropout.apply_at(p, base);
        }
        let (ds, p) = (&*dp, &*p);
        // dQ_tile (+)= dS · K_block.
        matmul(
            (len, d, kl),
            dq,
            d,
            first > 0,
            ds,
            (kl, 1),
            &k[block * d..],
            (d, 1),
        );
        // dK_block += dSᵀ · Q_tile; dV_block += Pᵀ · dO_tile.
        matmul(
            (kl, d, len),
            &mut dk[block * d..],
            d,
            true,
            ds,
            (1, kl),
            q_tile,
            (d, 1),
        );
        matmul(
            (kl, d, len),
            &mut dv[block * d..],
            d,
            true,
            p,
            (1, kl),
            grad_tile,
            (width, 1),
        );
    }
}

impl<B: AttentionOps + AttentionBackward, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct TiledAttention;

        impl<B: AttentionBackward> Backward<B, 3> for TiledAttention {
            /// The inputs, the forward output (for its log-sum-exps) and the settings.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                (bool, f32, u32),
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (q, k, v, out, (causal, dropout, seed)) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) =
                    B::tiled_attention_backward(q, k, v, out, grad, causal, dropout, seed);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let out = B::tiled_attention(q.clone(), k.clone(), v.clone(), causal, dropout, seed);
        match TiledAttention
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((q, k, v, out.clone(), (causal, dropout, seed)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, pattern, same_bits_on_1_and_3_threads, to_vec};
    use burn::tensor::{Bool, Device, Distribution, Tensor, activation};

    /// The kernel's dropout mask for `[heads, n, n]` weights, as a tensor of `0` and `1/(1−p)`.
    fn mask(p: f32, seed: u32, heads: usize, n: usize, device: &Device) -> Tensor<3> {
        let dropout = Dropout::new(p, seed);
        let mut mask = vec![1.0f32; heads * n * n];
        for (r, row) in mask.chunks_exact_mut(n).enumerate() {
            dropout.apply_at(row, (r * n) as u64);
        }
        Tensor::from_data(TensorData::new(mask, [heads, n, n]), device)
    }

    /// The operation (through `Dispatch` and autodiff on flex) against softmax attention built
    /// from tensor ops with the same dropout mask, in outputs, log-sum-exps and the gradients
    /// of q, k and v: lengths 1, 7, 100 (a partial tile) and 300 (two key blocks, the second
    /// partial), causal and bidirectional, dropout 0 and 0.3.
    #[test]
    fn operation_equals_tensor_ops_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        let (heads, d) = (3, 8);
        for n in [1usize, 7, 100, 300] {
            for causal in [true, false] {
                for (p, seed) in [(0.0f32, 0u32), (0.3, 11)] {
                    device.seed(n as u64);
                    let r = |shape: [usize; 3]| {
                        Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                    };
                    let q = r([heads, n, d]).mul_scalar(0.7).require_grad();
                    let k = r([heads, n, d]).require_grad();
                    let v = r([heads, n, d]).require_grad();
                    let w = r([heads, n, d]);
                    let fused = Tensor::<3>::from_dispatch(
                        <burn::backend::Dispatch as AttentionOps>::tiled_attention(
                            q.clone().into_dispatch(),
                            k.clone().into_dispatch(),
                            v.clone().into_dispatch(),
                            causal,
                            p,
                            seed,
                        ),
                    );
                    let mut scores = q.clone().matmul(k.clone().swap_dims(1, 2)); // [heads, n, n]
                    if causal {
                        let future = Tensor::<2, Bool>::tril_mask([n, n], 0, &device)
                            .unsqueeze::<3>()
                            .expand([heads, n, n]);
                        scores = scores.mask_fill(future, f32::NEG_INFINITY);
                    }
                    let lse = to_vec(scores.clone().exp().sum_dim(2).log());
                    let weights = activation::softmax(scores, 2) * mask(p, seed, heads, n, &device);
                    let reference = weights.matmul(v.clone());
                    let name = format!("n={n} causal={causal} p={p}");
                    assert_all_close(
                        &to_vec(fused.clone().narrow(2, d, 1)),
                        &lse,
                        1e-5,
                        &format!("{name} lse"),
                    );
                    let mut results = vec![];
                    for out in [fused.narrow(2, 0, d), reference] {
                        let grads = (out.clone() * w.clone()).sum().backward();
                        let mut r = vec![to_vec(out)];
                        for t in [&q, &k, &v] {
                            r.push(to_vec(t.grad(&grads).unwrap()));
                        }
                        results.push(r);
                    }
                    for (what, (a, b)) in ["output", "dq", "dk", "dv"]
                        .iter()
                        .zip(results[0].iter().zip(&results[1]))
                    {
                        // Relative to the inputs' unit scale: at n = 1 dq is zero up to the
                        // rounding of Δ − dP (~1e-7), which a purely relative check would fail.
                        let mut want = b.clone();
                        want.push(1.0);
                        let mut got = a.clone();
                        got.push(1.0);
                        assert_all_close(&got, &want, 1e-5, &format!("{name} {what}"));
                    }
                }
            }
        }
    }

    /// The kernels give the same bits on 1 thread and on 3: the backward sums dK and dV in a
    /// fixed order whatever the scheduling.
    #[test]
    fn kernels_are_bit_identical_across_thread_counts() {
        let data = |len: usize, salt: usize| pattern(len, salt, 3.0);
        for causal in [true, false] {
            let shape = Shape {
                heads: 2,
                n: 700,
                d: 6,
                causal,
            };
            let len = shape.heads * shape.n * shape.d;
            let (q, k, v) = (data(len, 1), data(len, 2), data(len, 3));
            let grad = data(shape.heads * shape.n * (shape.d + 1), 4);
            let dropout = Dropout::new(0.2, 5);
            let same = same_bits_on_1_and_3_threads(|| {
                let out = forward(&q, &k, &v, shape, dropout);
                let [dq, dk, dv] = backward([&q, &k, &v], &out, &grad, shape, dropout);
                [out, dq, dk, dv]
            });
            assert!(
                same,
                "causal={causal}: results differ between 1 and 3 threads"
            );
        }
    }

    /// Large score ranges (a row whose maximum arrives in a late key block) stay exact: the
    /// online softmax rescales what it accumulated before.
    #[test]
    fn late_maximum_rescales_earlier_blocks() {
        let (n, d) = (600, 4);
        let mut q = vec![0.0f32; n * d];
        let mut k = vec![0.0f32; n * d];
        let v: Vec<f32> = (0..n * d).map(|i| (i % 13) as f32).collect();
        q[(n - 1) * d] = 1.0; // the last query
        for j in 0..n {
            k[j * d] = j as f32 / 10.0; // scores grow along the keys: 0 .. 59.9
        }
        let shape = Shape {
            heads: 1,
            n,
            d,
            causal: false,
        };
        let out = forward(&q, &k, &v, shape, Dropout::new(0.0, 0));
        let row = &out[(n - 1) * (d + 1)..][..d + 1];
        let scores: Vec<f64> = (0..n).map(|j| j as f64 / 10.0).collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for c in 0..d {
            let want: f64 = (0..n)
                .map(|j| (scores[j] - m).exp() / z * f64::from(v[j * d + c]))
                .sum();
            assert!(
                (f64::from(row[c]) - want).abs() < 1e-4 * (1.0 + want.abs()),
                "col {c}: {} vs {want}",
                row[c]
            );
        }
        let lse = m + z.ln();
        assert!(
            (f64::from(row[d]) - lse).abs() < 1e-4,
            "lse {} vs {lse}",
            row[d]
        );
    }
}
