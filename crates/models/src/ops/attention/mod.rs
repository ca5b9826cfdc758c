//! Scaled dot-product attention — dense, block-sparse, or all-attention's context plus
//! persistent memory — as one Burn operation (a backend extension) whose flex kernel never
//! materialises the `n × n` scores: FlashAttention-2's schedule on a CPU. Every attention
//! mixer calls it on flex.
//!
//! Forward, per head and tile of `TILE` query rows: for each block of `KEYS` keys, the
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
//! Which keys a query sees is a [`KeyLayout`]: every key (causal: every earlier key), in
//! tiles of `TILE` rows, or a block-sparse pattern's key blocks for each query block, in tiles
//! of one pattern block (consecutive listed key blocks are walked as one run of up to
//! `KEYS` keys; unlisted blocks cost nothing and no padded slot is computed).
//!
//! All-attention (Sukhbaatar et al. 2019): persistent keys and values are one more run of keys
//! for every tile, in the same online softmax; the relative-position term `q_i · key_pe[:, i −
//! j]` comes from one `[TILE, distances]` GEMM per tile and key run (and two in the backward:
//! `dQ`, `d key_pe`); the adaptive span multiplies context weights by its ramp mask before the
//! joint normalisation (gradient `Σ e ∘ (dP − Δ) / R` inside the ramp), and key runs wholly
//! past the ramp are skipped.
//!
//! Memory: `O(TILE · KEYS)` scratch per thread plus, in the backward, partial sums of
//! `O(n · d)` (dK / dV), `O(N · d)` (persistent dK / dV) and `O(d · span)` (`d key_pe`) per
//! tile group of each head in flight and per flattened head until the final ordered sum — so
//! peak memory is linear in the sequence length, and all-attention adds `O(batch · heads · N · d)`
//! (about 256 MB at N = 2048, d 64, 256 flattened heads).
//!
//! Files: `extension.rs` (the backend extension's interface), `layout.rs` ([`KeyLayout`], the
//! tiling), `flex.rs` (operands checked, then `forward.rs` / `backward.rs` over `tiles.rs`),
//! `autodiff.rs` (the node and its backward), `cube/` (the same operation as CubeCL kernels);
//! this file holds the tensor-level [`attention`] the mixers call.

use burn::tensor::{Device, FloatDType, Tensor};

mod autodiff;
mod backward;
mod cube;
mod extension;
mod flex;
mod forward;
mod layout;
mod tiles;

pub(crate) use cube::supported as cube_supported;
pub use extension::{AttentionBackward, AttentionOps, Operands};
pub use layout::KeyLayout;

/// Whether attention (dense, block-sparse or all-attention) of width `d_head` runs as the fused
/// operation on `device`: always on flex; on the Cube backends when their kernels cover it
/// (head width ≤ 256; `ops/attention/cube/`).
pub fn attention_fused_on(device: &Device, d_head: usize) -> bool {
    super::device::on_flex(device) || (super::device::on_cube(device) && cube_supported(d_head))
}

/// Whether a cached layer's attention (keys `[cache ; block]`, a cache) of width
/// `d_head` runs as the fused operation on `device`: as [`attention_fused_on`].
pub fn cached_attention_fused_on(device: &Device, d_head: usize) -> bool {
    attention_fused_on(device, d_head)
}

/// All-attention's parts beside the context keys, each optional (see
/// [`AttentionOps::tiled_attention`]).
#[derive(Default)]
pub(crate) struct Extras {
    /// Persistent keys (scaled as the context keys are) and values, `[n_heads, m, d_head]`.
    pub memory: Option<(Tensor<3>, Tensor<3>)>,
    /// Relative-position key embedding `[d_head, span]`, `span ≥ seq` (causal only).
    pub key_pe: Option<Tensor<2>>,
    /// Adaptive span `z` in tokens `[n_heads]`, and the ramp width.
    pub span: Option<(Tensor<1>, f32)>,
}

/// Attention through [`AttentionOps::tiled_attention`]: heads flattened into
/// `[batch · n_heads, seq, d_head]`. On the Cube backends `q`, `k` and `v` enter in the model's
/// precision (f16 or bf16 rows read and gradients written at half the bytes; every sum in f32);
/// on flex, and for all-attention's parts everywhere, f32. The output is f32 inside the
/// operation (its log-sum-exp column needs it) and returned in the model's precision.
/// `q` comes multiplied by the score scale; `dropout` is `(p, seed)`.
///
/// # Shapes
/// - `q`: `[batch, n_heads, seq, d_head]`
/// - `k`, `v`: `[batch, n_heads, seq, d_head]`, or `[batch, n_heads, s + seq, d_head]` over a
///   cached layer's `[cache ; block]` ([`KeyLayout::cached`])
/// - output: `[batch, n_heads, seq, d_head]`
pub(crate) fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    extras: Extras,
    keys: KeyLayout,
    (p, seed): (f32, u32),
) -> Tensor<4> {
    let [batch, n_heads, seq, d_head] = q.dims();
    let dtype = q.dtype();
    let device = q.device();
    let f32 = |t: Tensor<3>| t.cast(FloatDType::F32).into_dispatch();
    // The Cube kernels read q, k, v in their own type; flex's take f32.
    let own_type = crate::ops::device::on_cube(&device);
    let flat = |t: Tensor<4>| {
        let rows = t.dims()[2];
        let t = t.reshape([batch * n_heads, rows, d_head]);
        if own_type { t.into_dispatch() } else { f32(t) }
    };
    let (mk, mv) = extras.memory.unwrap_or_else(|| {
        let none = Tensor::<3>::zeros([n_heads, 0, d_head], &device);
        (none.clone(), none)
    });
    let pe = extras
        .key_pe
        .unwrap_or_else(|| Tensor::<2>::zeros([d_head, 0], &device));
    let (z, ramp) = extras
        .span
        .unwrap_or_else(|| (Tensor::<1>::zeros([0], &device), 1.0));
    let out =
        Tensor::<3>::from_dispatch(<burn::backend::Dispatch as AttentionOps>::tiled_attention(
            flat(q),
            flat(k),
            flat(v),
            f32(mk),
            f32(mv),
            pe.cast(FloatDType::F32).into_dispatch(),
            z.cast(FloatDType::F32).into_dispatch(),
            keys,
            ramp,
            p,
            seed,
        )); // [batch · n_heads, seq, d_head + 1]: output | log-sum-exp
    out.narrow(2, 0, d_head)
        .reshape([batch, n_heads, seq, d_head])
        .cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::backward::backward;
    use super::forward::forward;
    use super::layout::Shape;
    use super::tiles::Inputs;
    use super::*;
    use crate::ops::kernel::Dropout;
    use crate::test_util::{assert_all_close, pattern, same_bits_on_1_and_3_threads, to_vec};
    use burn::tensor::TensorData;
    use burn::tensor::{Bool, Device, Distribution, Tensor, activation};

    /// The flex kernel's dropout mask for `[heads, n, width]` weights (key `t` of a row: context
    /// key `t < n`, memory slot `t − n`), as a tensor of `0` and `1/(1−p)`.
    fn mask(p: f32, seed: u32, [heads, n, width]: [usize; 3], device: &Device) -> Tensor<3> {
        let dropout = Dropout::new(p, seed);
        let mut mask = vec![1.0f32; heads * n * width];
        for (r, row) in mask.chunks_exact_mut(width).enumerate() {
            dropout.apply_at(row, (r * width) as u64);
        }
        Tensor::from_data(TensorData::new(mask, [heads, n, width]), device)
    }

    /// Runs the operation (through `Dispatch` and autodiff on flex) and softmax attention
    /// built from tensor ops over the keys `allowed` (`[heads, n, nk]`, row-major; `nk = n`, or
    /// `s + n` for a cached layout) with the same
    /// dropout mask, and compares outputs, log-sum-exps and the gradients of q, k and v.
    fn check_against_tensor_ops(
        [heads, n, d]: [usize; 3],
        keys: KeyLayout,
        allowed: Vec<bool>,
        dropout: (f32, u32),
        name: &str,
    ) {
        let device = Device::flex().autodiff();
        check_on(
            &device,
            &device,
            &mask,
            FloatDType::F32,
            [heads, n, d],
            keys,
            allowed,
            dropout,
            name,
        );
    }

    /// A kernel's dropout mask for `[heads, n, width]` weights (`width = n + memory slots`):
    /// `(p, seed, [heads, n, width], device)`.
    pub(super) type MaskFn = dyn Fn(f32, u32, [usize; 3], &Device) -> Tensor<3>;

    /// Standard-normal values of `shape` drawn on flex from `seed` (the same on every device
    /// they are then moved to), times `scale`.
    pub(super) fn host_normal<const D: usize>(
        shape: [usize; D],
        seed: u64,
        scale: f32,
    ) -> TensorData {
        let flex = Device::flex();
        flex.seed(seed);
        Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), &flex)
            .mul_scalar(scale)
            .into_data()
    }

    /// [`check_against_tensor_ops`] with the operation on `device` and the tensor-op reference
    /// on `reference` (both autodiff devices; the same one, or flex for a device whose own
    /// matmul and reduction kernels cannot run, see `cube_reference`), the dropout mask
    /// `mask` builds. On `device` nothing runs but the operation, slices and elementwise ops
    /// (the backward is seeded by `backward` itself, with no sum).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_on(
        device: &Device,
        reference: &Device,
        mask: &MaskFn,
        dtype: FloatDType,
        [heads, n, d]: [usize; 3],
        keys: KeyLayout,
        allowed: Vec<bool>,
        (p, seed): (f32, u32),
        name: &str,
    ) {
        // Keys per head (n, or s + n for a cached layout).
        let nk = allowed.len() / (heads * n).max(1);
        let data = [
            rounded(host_normal([heads, n, d], n as u64, 0.7), dtype),
            rounded(host_normal([heads, nk, d], n as u64 + 1, 1.0), dtype),
            rounded(host_normal([heads, nk, d], n as u64 + 2, 1.0), dtype),
            host_normal([heads, n, d], n as u64 + 3, 1.0),
        ];
        let on = |device: &Device, dtype: FloatDType| {
            let [q, k, v, w] = data.clone();
            let leaf = |x| Tensor::<3>::from_data(x, device).cast(dtype).require_grad();
            [leaf(q), leaf(k), leaf(v), Tensor::from_data(w, device)]
        };
        let [q, k, v, w] = on(device, dtype);
        let none = |shape: [usize; 3]| Tensor::<3>::zeros(shape, device).into_dispatch();
        let fused =
            Tensor::<3>::from_dispatch(<burn::backend::Dispatch as AttentionOps>::tiled_attention(
                q.clone().into_dispatch(),
                k.clone().into_dispatch(),
                v.clone().into_dispatch(),
                none([1, 0, d]),
                none([1, 0, d]),
                Tensor::<2>::zeros([d, 0], device).into_dispatch(),
                Tensor::<1>::zeros([0], device).into_dispatch(),
                keys,
                1.0,
                p,
                seed,
            ));
        let fused_lse = to_vec(fused.clone().narrow(2, d, 1));
        let out = fused.narrow(2, 0, d);
        let grads = (out.clone() * w).backward();
        let mut got = vec![to_vec(out)];
        got.extend([&q, &k, &v].map(|t| {
            let grad = t.grad(&grads).unwrap();
            assert_eq!(
                grad.dtype(),
                dtype.into(),
                "{name}: gradients in the inputs' type"
            );
            to_vec(grad)
        }));

        let [q, k, v, w] = on(reference, FloatDType::F32);
        let hidden = allowed.into_iter().map(|a| !a).collect::<Vec<_>>();
        let hidden =
            Tensor::<3, Bool>::from_data(TensorData::new(hidden, [heads, n, nk]), reference);
        let scores = q
            .clone()
            .matmul(k.clone().swap_dims(1, 2)) // [heads, n, nk]
            .mask_fill(hidden, f32::NEG_INFINITY);
        let lse = to_vec(scores.clone().exp().sum_dim(2).log());
        let weights = activation::softmax(scores, 2) * mask(p, seed, [heads, n, nk], reference);
        let out = weights.matmul(v.clone());
        let grads = (out.clone() * w).backward();
        let mut want = vec![to_vec(out)];
        want.extend([&q, &k, &v].map(|t| to_vec(t.grad(&grads).unwrap())));

        assert_all_close(&fused_lse, &lse, 1e-5, &format!("{name} lse"));
        // The output and its log-sum-exp are f32 sums of the (rounded) inputs whatever their
        // type; only the gradients are rounded to it.
        let grad_tolerance = if dtype == FloatDType::F32 { 1e-5 } else { 1e-3 };
        for (i, (what, (a, b))) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(got.iter().zip(&want))
            .enumerate()
        {
            // Relative to the inputs' unit scale: at n = 1 dq is zero up to the rounding of
            // Δ − dP (~1e-7), which a purely relative check would fail.
            let mut want = b.clone();
            want.push(1.0);
            let mut got = a.clone();
            got.push(1.0);
            let tolerance = if i == 0 { 1e-5 } else { grad_tolerance };
            assert_all_close(&got, &want, tolerance, &format!("{name} {what}"));
        }
    }

    /// `x` rounded to `dtype` (through flex), as f32 data: inputs that a `dtype` tensor holds
    /// exactly, so an f32 reference sees the same values.
    pub(super) fn rounded(x: TensorData, dtype: FloatDType) -> TensorData {
        Tensor::<3>::from_data(x, &Device::flex())
            .cast(dtype)
            .cast(FloatDType::F32)
            .into_data()
    }

    /// Dense layouts: lengths 1, 7, 100 (a partial tile) and 300 (two key blocks, the second
    /// partial), causal and bidirectional, dropout 0 and 0.3.
    #[test]
    fn operation_equals_tensor_ops_in_values_and_gradients() {
        let (heads, d) = (3, 8);
        for n in [1usize, 7, 100, 300] {
            for causal in [true, false] {
                let allowed: Vec<bool> = (0..heads * n * n)
                    .map(|i| !causal || i % n <= (i / n) % n)
                    .collect();
                for dropout in [(0.0f32, 0u32), (0.3, 11)] {
                    let name = format!("n={n} causal={causal} p={}", dropout.0);
                    let keys = KeyLayout::dense(causal);
                    check_against_tensor_ops([heads, n, d], keys, allowed.clone(), dropout, &name);
                }
            }
        }
    }

    /// Cached layouts ([`KeyLayout::cached`]) on flex against masked tensor ops, dropout 0 and
    /// 0.3 ([`cached_cases`]).
    #[test]
    fn cached_layouts_equal_masked_tensor_ops() {
        for (name, shape, keys, allowed) in cached_cases(&[(37, 20, 25), (300, 290, 260)]) {
            for dropout in [(0.0f32, 0u32), (0.3, 5)] {
                let name = format!("{name} p={}", dropout.0);
                check_against_tensor_ops(shape, keys.clone(), allowed.clone(), dropout, &name);
            }
        }
    }

    /// Cached layouts for `(queries, cache, span)` sizes: windows with and without self, zeros
    /// and masked starts (batch rows of 2 heads with different valid counts, every query seeing
    /// at least one key), head width 8: a name, the queries' `[heads, n, d]`, the layout, and
    /// the keys each query may see (`[heads, n, cache + n]`).
    pub(super) fn cached_cases(
        sizes: &[(usize, usize, usize)],
    ) -> Vec<(String, [usize; 3], KeyLayout, Vec<bool>)> {
        let (n_heads, batch, d) = (2, 2, 8);
        let heads = n_heads * batch;
        let mut cases = vec![];
        for &(n, cache, span) in sizes {
            for include_self in [false, true] {
                for valid in [vec![cache, cache], vec![3, cache / 2]] {
                    let view = crate::cache::CacheView {
                        window: crate::cache::Window { span, include_self },
                        valid,
                    };
                    let (lo, hi) = (view.window.min_distance(), view.window.max_distance());
                    let nk = cache + n;
                    let allowed: Vec<bool> = (0..heads * n * nk)
                        .map(|t| {
                            let (h, i, j) = (t / (n * nk), (t / nk) % n, t % nk);
                            let first = cache - view.valid[h / n_heads];
                            let delta = (cache + i) as i64 - j as i64;
                            j >= first && delta >= lo as i64 && delta <= hi as i64
                        })
                        .collect();
                    let name = format!("n={n} cache={cache} {view:?}");
                    let keys = view.key_layout(cache, n_heads);
                    cases.push((name, [heads, n, d], keys, allowed));
                }
            }
        }
        cases
    }

    /// Block-sparse layouts: every built-in pattern and both combinators, causal and
    /// bidirectional, ragged last blocks, token-level blocks, blocks of 64 whose consecutive
    /// key blocks merge into runs (and split at `KEYS`), two batch rows of four heads (the head
    /// groups repeat per batch row), dropout 0 and 0.3.
    #[test]
    fn sparse_layouts_equal_masked_tensor_ops() {
        for (name, shape, keys, allowed) in sparse_cases(&[(37, 5), (13, 1), (300, 64), (7, 16)]) {
            let dropout = if shape[1] == 37 { (0.3, 7) } else { (0.0, 0) };
            check_against_tensor_ops(shape, keys, allowed, dropout, &name);
        }
    }

    /// Every built-in pattern, causal and bidirectional, at each `(n, block)`, for two batch rows
    /// of four heads of width 8 (the head groups repeat per batch row): a name, the operands'
    /// `[heads, n, d]`, the layout, and the keys each query may see (`[heads, n, n]`).
    pub(super) fn sparse_cases(
        sizes: &[(usize, usize)],
    ) -> Vec<(String, [usize; 3], KeyLayout, Vec<bool>)> {
        let (n_heads, batch, d) = (4, 2, 8);
        let heads = batch * n_heads;
        let mut cases = vec![];
        for spec in crate::mixer::builtin_patterns() {
            for causal in [true, false] {
                for &(n, block) in sizes {
                    let pattern = spec.build(n.div_ceil(block), block, causal, 1);
                    let groups = pattern.groups.len();
                    let allowed: Vec<bool> = (0..heads)
                        .flat_map(|h| pattern.token_mask((h % n_heads) / (n_heads / groups), n))
                        .collect();
                    let keys = pattern.key_layout(n_heads);
                    let name = format!("{} causal={causal} n={n} b={block}", spec.name());
                    cases.push((name, [heads, n, d], keys, allowed));
                }
            }
        }
        cases
    }

    /// Runs of consecutive key blocks stop at `KEYS` keys; blocks wider than `KEYS` are runs
    /// of one.
    #[test]
    fn sparse_runs_merge_consecutive_blocks_up_to_keys() {
        let dense = crate::pattern::PatternSpec::Dense {};
        let runs = |block: usize, n_blocks: usize| {
            let keys = dense.build(n_blocks, block, false, 0).key_layout(1);
            keys.sparse.unwrap().runs[0][0].clone()
        };
        assert_eq!(runs(64, 10), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(runs(512, 3), vec![(0, 1), (1, 1), (2, 1)]);
        let keys = dense.build(3, 100, true, 0).key_layout(1);
        // Row 250 (block 2) of a causal 3-block pattern over 270 tokens: keys 0..270 in runs of
        // two blocks, clipped at n.
        assert_eq!(
            keys.key_ranges(0, (200, 70), plain(1, 270, 1, true)),
            vec![(0, 200), (200, 70)]
        );
    }

    /// A shape without all-attention's parts.
    fn plain(heads: usize, n: usize, d: usize, causal: bool) -> Shape {
        Shape {
            heads,
            n,
            nk: n,
            d,
            causal,
            min_distance: 0,
            max_distance: usize::MAX,
            mem: 0,
            mem_heads: 1,
            pe_span: 0,
            span_heads: 0,
            ramp: 1.0,
        }
    }

    /// The kernels give the same bits on 1 thread and on 3: the backward sums dK and dV (and
    /// the shared memory, position and span gradients) in a fixed order whatever the
    /// scheduling. Dense, sparse, and all-attention with every part.
    #[test]
    fn kernels_are_bit_identical_across_thread_counts() {
        let data = |len: usize, salt: usize| pattern(len, salt, 3.0);
        let (heads, n, d) = (4, 700, 6);
        let len = heads * n * d;
        let (q, k, v) = (data(len, 1), data(len, 2), data(len, 3));
        let grad = data(heads * n * (d + 1), 4);
        let (mk, mv, pe) = (data(2 * 300 * d, 5), data(2 * 300 * d, 6), data(d * n, 7));
        let z = vec![150.0f32, 400.5];
        let dropout = Dropout::new(0.2, 5);
        let window = crate::pattern::PatternSpec::Window { width: 3 };
        let plain_inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            mk: &[],
            mv: &[],
            pe: &[],
            z: &[],
        };
        let all_attention = Shape {
            mem: 300,
            mem_heads: 2,
            pe_span: n,
            span_heads: 2,
            ramp: 32.0,
            ..plain(heads, n, d, true)
        };
        let all_inputs = Inputs {
            mk: &mk,
            mv: &mv,
            pe: &pe,
            z: &z,
            ..plain_inputs
        };
        let mut cases = vec![];
        for causal in [true, false] {
            let shape = plain(heads, n, d, causal);
            cases.push((shape, plain_inputs, KeyLayout::dense(causal)));
            let pattern = window.build(n.div_ceil(32), 32, causal, 0);
            cases.push((shape, plain_inputs, pattern.key_layout(2)));
        }
        cases.push((all_attention, all_inputs, KeyLayout::dense(true)));
        // A cached layer's all-attention: 400 queries after a cache of 300 (k and v are the
        // 700 rows), a window of 500 without self, one masked batch row.
        let view = crate::cache::CacheView {
            window: crate::cache::Window {
                span: 500,
                include_self: false,
            },
            valid: vec![300, 120],
        };
        let cached = Shape {
            n: 400,
            nk: n,
            min_distance: 1,
            max_distance: 500,
            ..all_attention
        };
        let cached_grad = data(heads * 400 * (d + 1), 8);
        let cached_inputs = Inputs {
            q: &q[..heads * 400 * d],
            ..all_inputs
        };
        cases.push((cached, cached_inputs, view.key_layout(300, 2)));
        for (shape, inputs, keys) in cases {
            let grad = if keys.cached.is_some() {
                &cached_grad
            } else {
                &grad
            };
            let same = same_bits_on_1_and_3_threads(|| {
                let out = forward(inputs, shape, &keys, dropout);
                let grads = backward(inputs, &out, grad, shape, &keys, dropout);
                let mut all = vec![out];
                all.extend(grads);
                <[Vec<f32>; 8]>::try_from(all).expect("eight arrays")
            });
            assert!(
                same,
                "{shape:?} sparse={}: results differ between 1 and 3 threads",
                keys.sparse.is_some()
            );
        }
    }

    /// All-attention with attention dropout 0.3 on flex against its reference from tensor ops
    /// ([`check_all_attention_on`]).
    #[test]
    fn all_attention_with_dropout_equals_masked_tensor_ops() {
        let flex = Device::flex().autodiff();
        check_all_attention_on(&flex, &flex, &mask, FloatDType::F32, "flex");
    }

    /// The operation with every part of all-attention against the same attention built from
    /// tensor ops with the kernel's dropout `mask` (memory slot `s` is key `n + s` of its row),
    /// the operation on `device` and the reference on `reference` (autodiff devices, as in
    /// [`check_on`]): two batch rows of two heads (flattened head `h` uses memory head and span
    /// head `h mod 2`), 40 tokens, 5 persistent slots, dropout 0.3; head width 6 (the Cube
    /// kernels read its rows as 2-lane vectors); memory alone (causal and bidirectional),
    /// memory with the adaptive span (bidirectional; spans 10.5 and 30 with a ramp of 4, so
    /// some keys are past the span), and memory with relative positions (47 distances) and the
    /// span (causal). Outputs, log-sum-exps and the gradients of q, k, v, the memory keys and
    /// values, `key_pe` and `z`.
    pub(super) fn check_all_attention_on(
        device: &Device,
        reference: &Device,
        mask: &MaskFn,
        dtype: FloatDType,
        name: &str,
    ) {
        let (batch, n_heads, n, mem, d, span) = (2, 2, 40, 5, 6, 47);
        let heads = batch * n_heads;
        let (p, seed, ramp) = (0.3f32, 23u32, 4.0f32);
        let cases = [
            (true, false, false),
            (false, false, true),
            (true, true, true),
        ];
        for (causal, relative, with_span) in cases {
            // q, k, v in `dtype` on `device` (the memory, key_pe and z stay f32).
            let data = [
                rounded(host_normal([heads, n, d], 5, 1.0), dtype),
                rounded(host_normal([heads, n, d], 6, 1.0), dtype),
                rounded(host_normal([heads, n, d], 7, 1.0), dtype),
                host_normal([n_heads, mem, d], 8, 1.0),
                host_normal([n_heads, mem, d], 9, 1.0),
                host_normal([heads, n, d], 10, 1.0),
            ];
            let pe_data = host_normal([d, span], 11, 0.5);
            let z_data = TensorData::new(vec![10.5f32, 30.0], [2]);
            let inputs = |device: &Device, dtype: FloatDType| {
                (
                    std::array::from_fn(|i| {
                        let x = Tensor::<3>::from_data(data[i].clone(), device);
                        if i < 3 { x.cast(dtype) } else { x }.require_grad()
                    }),
                    Tensor::<2>::from_data(pe_data.clone(), device).require_grad(),
                    Tensor::<1>::from_data(z_data.clone(), device).require_grad(),
                )
            };
            // The gradients of the inputs (those present) after a backward seeded with `w`.
            let results = |out: Tensor<3>,
                           w: Tensor<3>,
                           t: &[&Tensor<3>; 5],
                           pe: &Tensor<2>,
                           z: &Tensor<1>| {
                let grads = (out.clone() * w.detach()).backward();
                let mut r = vec![to_vec(out)];
                r.extend(t.map(|t| to_vec(t.grad(&grads).unwrap())));
                r.push(if relative {
                    to_vec(pe.grad(&grads).unwrap())
                } else {
                    vec![]
                });
                r.push(if with_span {
                    to_vec(z.grad(&grads).unwrap())
                } else {
                    vec![]
                });
                r
            };

            let ([q, k, v, mk, mv, w], pe, z) = inputs(device, dtype);
            let fused = Tensor::<3>::from_dispatch(
                <burn::backend::Dispatch as AttentionOps>::tiled_attention(
                    q.clone().into_dispatch(),
                    k.clone().into_dispatch(),
                    v.clone().into_dispatch(),
                    mk.clone().into_dispatch(),
                    mv.clone().into_dispatch(),
                    if relative {
                        pe.clone()
                    } else {
                        Tensor::zeros([d, 0], device)
                    }
                    .into_dispatch(),
                    if with_span {
                        z.clone()
                    } else {
                        Tensor::zeros([0], device)
                    }
                    .into_dispatch(),
                    KeyLayout::dense(causal),
                    ramp,
                    p,
                    seed,
                ),
            );
            let fused_lse = to_vec(fused.clone().narrow(2, d, 1));
            let got = results(fused.narrow(2, 0, d), w, &[&q, &k, &v, &mk, &mv], &pe, &z);

            let device = reference;
            let ([q, k, v, mk, mv, w], pe, z) = inputs(device, FloatDType::F32);
            // Memory head and span head `h mod n_heads` for flattened head `h = b · n_heads + h'`.
            // (Transposed before the repeat: on wgpu, Burn 0.22.1 returns the gradient of
            // `matmul(q, repeated.swap_dims(1, 2))` for a repeated or expanded leaf in the wrong
            // layout; flex gets it right.)
            let per_head = |m: Tensor<3>| {
                let [_, rows, cols] = m.dims();
                m.unsqueeze_dim::<4>(0)
                    .repeat_dim(0, batch)
                    .reshape([heads, rows, cols])
            };
            let mut context = q.clone().matmul(k.clone().swap_dims(1, 2)); // [heads, n, n]
            if relative {
                let rel = crate::mixer::relative_scores(q.clone().unsqueeze(), &pe);
                context = context + rel.reshape([heads, n, n]);
            }
            if causal {
                let future = Tensor::<2, Bool>::tril_mask([n, n], 0, device)
                    .unsqueeze::<3>()
                    .expand([heads, n, n]);
                context = context.mask_fill(future, f32::NEG_INFINITY);
            }
            let memory = q.clone().matmul(per_head(mk.clone().swap_dims(1, 2))); // [heads, n, mem]
            let scores = Tensor::cat(vec![context, memory], 2);
            let max = scores.clone().max_dim(2).detach();
            let mut e = (scores - max.clone()).exp();
            if with_span {
                let distance: Vec<f32> = (0..n * n)
                    .map(|i| (i / n) as f32 - (i % n) as f32)
                    .collect();
                let distance = Tensor::<3>::from_data(TensorData::new(distance, [1, n, n]), device);
                let z = z
                    .clone()
                    .unsqueeze_dim::<2>(0)
                    .repeat_dim(0, batch)
                    .reshape([heads, 1, 1]);
                let ratio = ((z - distance).add_scalar(ramp).div_scalar(ramp)).clamp(0.0, 1.0);
                let ones = Tensor::<3>::ones([heads, n, mem], device);
                e = e * Tensor::cat(vec![ratio, ones], 2);
            }
            let norm = e.clone().sum_dim(2); // [heads, n, 1]
            let keep = mask(p, seed, [heads, n, n + mem], device);
            let values = Tensor::cat(vec![v.clone(), per_head(mv.clone())], 1);
            let out = (e * keep).matmul(values) / norm.clone();
            let lse = norm.log() + max;
            let what = format!("{name} causal={causal} relative={relative} span={with_span}");
            assert_all_close(&fused_lse, &to_vec(lse), 1e-5, &format!("{what} lse"));
            let want = results(out, w, &[&q, &k, &v, &mk, &mv], &pe, &z);
            let names = [
                "output",
                "dq",
                "dk",
                "dv",
                "d memory keys",
                "d memory values",
                "d key_pe",
                "d z",
            ];
            for (i, (part, (a, b))) in names.iter().zip(got.iter().zip(&want)).enumerate() {
                // q, k and v's gradients are rounded to their type (1 to 3).
                let tolerance = match (dtype, i) {
                    (FloatDType::F32, _) | (_, 0 | 4..) => 2e-5,
                    _ => 1e-3,
                };
                assert_all_close(a, b, tolerance, &format!("{what} {part}"));
            }
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
        let shape = plain(1, n, d, false);
        let keys = KeyLayout::dense(false);
        let inputs = Inputs {
            q: &q,
            k: &k,
            v: &v,
            mk: &[],
            mv: &[],
            pe: &[],
            z: &[],
        };
        let out = forward(inputs, shape, &keys, Dropout::new(0.0, 0));
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
