//! The attention operation on Burn's Cube backend (wgpu, CUDA, ...): CubeCL kernels for dense
//! and block-sparse attention with hashed attention dropout, with the flex kernel's contract —
//! `[heads, n, d + 1]` out, the row's log-sum-exp in the last column — and nothing of size
//! `n × n` ever stored, so memory is linear in the sequence length.
//!
//! Which keys a query sees travels as two compressed lists (dense keys: one block of `n`
//! listing itself; causality is the kernels' own test). One unit per query row in the forward
//! (an online softmax over the listed keys, the output row in registers) and in the backward's
//! query pass (`Δ = rowsum(dO ∘ O)`, `dQ = Σ_j dS_ij k_j` with `P` recomputed from the
//! log-sum-exp); one unit per key row in the key pass (`dK_j = Σ_i dS_ij q_i`,
//! `dV_j = Σ_i P_ij dO_i` over the query blocks that list its block), so every sum is one unit's
//! loop in a fixed order: no atomics, the same bits on every run. Persistent memory, relative
//! positions and the adaptive span are flex-only for now: [`supported`] says when a call can
//! come here, and the mixers use their composed tensor-op path otherwise.
//!
//! Burn's `Cube` is `Fusion<CubeBackend>`: the operation resolves its fusion inputs to Cube
//! tensors (running the queued fused work they depend on), launches, and registers its
//! outputs back with the fusion client.

use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, TensorData};
use burn_backend::TensorMetadata;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_backend::ops::IntTensorOps;
use burn_cubecl::{CubeBackend, CubeDevice};

use crate::mixer::kernel::Memo;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::stream::StreamId;
use burn_fusion::{Fusion, FusionBackend, FusionTensor, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};
use cubecl::prelude::*;

use super::{AttentionBackward, AttentionOps, KeyLayout, Operands};

/// Whether the Cube kernels cover a call: dense or block-sparse keys (with or without
/// attention dropout), no persistent memory, relative positions or adaptive span, head width
/// at most 256.
pub(crate) fn supported(extras: bool, d_head: usize) -> bool {
    !extras && (1..=256).contains(&d_head)
}

/// The dropout factor of weight `(row, key)` (`row` the flattened query row `head · n + i`):
/// `keep` (= `1 / (1 − p)`) when a 32-bit hash of `(seed, row, key)` is at least `threshold`
/// (= `p · 2³²`), else 0. Two rounds of Wellons' `lowbias32` (32-bit: WGSL has no 64-bit
/// integers), so the masks differ from flex's (a SplitMix64 of the flat index); the backward
/// regenerates the same mask. [`dropout_factor`] is the host twin the tests build masks from.
#[cube]
fn dropout_factor_cube<F: Float>(seed: u32, row: usize, key: usize, threshold: u32, keep: F) -> F {
    let bits = lowbias32(lowbias32(seed ^ (row as u32 * 0x9e37_79b9u32)) ^ key as u32);
    let mut factor = keep;
    if bits < threshold {
        factor = F::new(0.0);
    }
    factor
}

#[cube]
fn lowbias32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16;
    x *= 0x7feb_352du32;
    x ^= x >> 15;
    x *= 0x846c_a68bu32;
    x ^ (x >> 16)
}

/// Host twin of the kernels' dropout factor (for the tests' reference masks).
#[cfg(test)]
fn dropout_factor(seed: u32, row: usize, key: usize, p: f32) -> f32 {
    let h = |mut x: u32| {
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^ (x >> 16)
    };
    let bits = h(h(seed ^ (row as u32).wrapping_mul(0x9e37_79b9)) ^ key as u32);
    if bits < threshold(p) {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `p · 2³²` as the hash threshold.
fn threshold(p: f32) -> u32 {
    (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32
}

/// Which keys the kernels walk, as two compressed lists over `(head group, block)`:
/// `fwd`: the key blocks each query block lists (ascending); `bwd`: the query blocks that list
/// each key block (ascending). `offsets[g · blocks + b] .. offsets[g · blocks + b + 1]` index
/// `items`.
struct BlockLists {
    fwd_offsets: Vec<u32>,
    fwd_items: Vec<u32>,
    bwd_offsets: Vec<u32>,
    bwd_items: Vec<u32>,
}

impl BlockLists {
    /// Dense keys as one block of `n` queries listing one block of `n` keys (causality is the
    /// kernels' own test).
    fn dense() -> Self {
        Self {
            fwd_offsets: vec![0, 1],
            fwd_items: vec![0],
            bwd_offsets: vec![0, 1],
            bwd_items: vec![0],
        }
    }

    fn new(keys: &super::SparseKeys) -> Self {
        let blocks = keys.runs[0].len();
        let (mut fwd_offsets, mut fwd_items) = (vec![0u32], vec![]);
        let mut listed_by: Vec<Vec<u32>> = vec![];
        for group in &keys.runs {
            let mut by_key = vec![vec![]; blocks];
            for (qb, runs) in group.iter().enumerate() {
                for &(first, count) in runs {
                    let last = (first + count).min(blocks);
                    for (kb, listed) in by_key.iter_mut().enumerate().take(last).skip(first) {
                        fwd_items.push(kb as u32);
                        listed.push(qb as u32);
                    }
                }
                fwd_offsets.push(fwd_items.len() as u32);
            }
            listed_by.extend(by_key);
        }
        let (mut bwd_offsets, mut bwd_items) = (vec![0u32], vec![]);
        for list in listed_by {
            bwd_items.extend(list);
            bwd_offsets.push(bwd_items.len() as u32);
        }
        Self {
            fwd_offsets,
            fwd_items,
            bwd_offsets,
            bwd_items,
        }
    }
}

/// The head group of flattened head `head`: `(head mod n_heads) / group_heads`.
#[cube]
fn group_of(head: usize, n_heads: u32, group_heads: u32) -> usize {
    (head % n_heads as usize) / group_heads as usize
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    out: &mut Tensor<F>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[comptime] dropout: bool,
    #[define(F)] _dtype: ElemType,
) {
    let n = q.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * n {
        terminate!();
    }
    let head = pos / n;
    let row = pos % n;
    let bs = block as usize;
    let blocks = n.div_ceil(bs);
    let list = group_of(head, n_heads, group_heads) * blocks + row / bs;
    let qb = pos * d;
    let mut acc = Array::<F>::new(d);
    for c in 0..d {
        acc[c] = F::new(0.0);
    }
    let mut m = F::new(-1.0e30);
    let mut l = F::new(0.0);
    for idx in offsets[list] as usize..offsets[list + 1] as usize {
        let first = items[idx] as usize * bs;
        let mut end = (first + bs).min(n);
        if causal {
            end = end.min(row + 1);
        }
        for j in first..end {
            let kb = (head * n + j) * d;
            let mut s = F::new(0.0);
            for c in 0..d {
                s += q[qb + c] * k[kb + c];
            }
            let m_new = F::max(m, s);
            let corr = F::exp(m - m_new);
            let p = F::exp(s - m_new);
            l = l * corr + p;
            let mut pw = p;
            if dropout {
                pw = p * dropout_factor_cube::<F>(seed, pos, j, threshold, F::cast_from(keep));
            }
            for c in 0..d {
                acc[c] = acc[c] * corr + pw * v[kb + c];
            }
            m = m_new;
        }
    }
    let ob = pos * (d + 1);
    for c in 0..d {
        out[ob + c] = acc[c] / l;
    }
    out[ob + d] = m + F::ln(l);
}

#[cube(launch)]
fn backward_query_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<F>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[comptime] dropout: bool,
    #[define(F)] _dtype: ElemType,
) {
    let n = q.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * n {
        terminate!();
    }
    let head = pos / n;
    let row = pos % n;
    let bs = block as usize;
    let blocks = n.div_ceil(bs);
    let list = group_of(head, n_heads, group_heads) * blocks + row / bs;
    let qb = pos * d;
    let ob = pos * (d + 1);
    let lse = out[ob + d];
    let mut dl = F::new(0.0);
    for c in 0..d {
        dl += grad[ob + c] * out[ob + c];
    }
    delta[pos] = dl;
    let mut acc = Array::<F>::new(d);
    for c in 0..d {
        acc[c] = F::new(0.0);
    }
    for idx in offsets[list] as usize..offsets[list + 1] as usize {
        let first = items[idx] as usize * bs;
        let mut end = (first + bs).min(n);
        if causal {
            end = end.min(row + 1);
        }
        for j in first..end {
            let kb = (head * n + j) * d;
            let mut s = F::new(0.0);
            let mut dp = F::new(0.0);
            for c in 0..d {
                s += q[qb + c] * k[kb + c];
                dp += grad[ob + c] * v[kb + c];
            }
            if dropout {
                dp *= dropout_factor_cube::<F>(seed, pos, j, threshold, F::cast_from(keep));
            }
            let ds = F::exp(s - lse) * (dp - dl);
            for c in 0..d {
                acc[c] += ds * k[kb + c];
            }
        }
    }
    for c in 0..d {
        dq[qb + c] = acc[c];
    }
}

#[cube(launch)]
fn backward_key_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    delta: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    #[comptime] d: usize,
    #[comptime] causal: bool,
    #[comptime] dropout: bool,
    #[define(F)] _dtype: ElemType,
) {
    let n = q.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * n {
        terminate!();
    }
    let head = pos / n;
    let key = pos % n;
    let bs = block as usize;
    let blocks = n.div_ceil(bs);
    let list = group_of(head, n_heads, group_heads) * blocks + key / bs;
    let kb = pos * d;
    let mut acc_k = Array::<F>::new(d);
    let mut acc_v = Array::<F>::new(d);
    for c in 0..d {
        acc_k[c] = F::new(0.0);
        acc_v[c] = F::new(0.0);
    }
    for idx in offsets[list] as usize..offsets[list + 1] as usize {
        let mut first = items[idx] as usize * bs;
        let end = (first + bs).min(n);
        if causal {
            first = first.max(key);
        }
        for i in first..end {
            let qi = head * n + i;
            let qb = qi * d;
            let ob = qi * (d + 1);
            let mut s = F::new(0.0);
            let mut dp = F::new(0.0);
            for c in 0..d {
                s += q[qb + c] * k[kb + c];
                dp += grad[ob + c] * v[kb + c];
            }
            let p = F::exp(s - out[ob + d]);
            let mut factor = F::new(1.0);
            if dropout {
                factor = dropout_factor_cube::<F>(seed, qi, key, threshold, F::cast_from(keep));
            }
            let ds = p * (dp * factor - delta[qi]);
            let pw = p * factor;
            for c in 0..d {
                acc_k[c] += ds * q[qb + c];
                acc_v[c] += pw * grad[ob + c];
            }
        }
    }
    for c in 0..d {
        dk[kb + c] = acc_k[c];
        dv[kb + c] = acc_v[c];
    }
}

/// An uninitialised f32 tensor of `shape` beside `like`.
fn empty_like(like: &CubeTensor, shape: Vec<usize>) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        DType::F32,
    )
}

/// One unit per row of `rows`, in cubes of 64, the cubes spread over the grid's dimensions
/// when they outnumber one dimension's limit (the kernels skip units past the last row).
fn launch_shape(like: &CubeTensor, rows: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(64);
    (
        cubecl::calculate_cube_count_elemwise(&like.client, rows, dim),
        dim,
    )
}

fn dims3(t: &CubeTensor) -> [usize; 3] {
    t.shape().dims::<3>()
}

/// A `u32` list on the device of `like`.
fn upload(like: &CubeTensor, values: Vec<u32>) -> CubeTensor {
    let len = values.len().max(1);
    let mut values = values;
    values.resize(len, 0);
    <CubeBackend as IntTensorOps<CubeBackend>>::int_from_data(
        TensorData::new(values, [len]),
        &like.device,
    )
}

/// The kernels' dropout arguments: seed, threshold, `1 / (1 − p)`, and whether to drop.
fn dropout_args(p: f32, seed: u32) -> (u32, u32, f32, bool) {
    (seed, threshold(p), 1.0 / (1.0 - p), p > 0.0)
}

/// The block lists of `keys` for `n` tokens on a device, and the kernels' scalars: block size,
/// heads per batch row, heads per group (dense: one block of `n`, one group).
#[derive(Clone)]
struct DeviceLists {
    /// Offsets and items of the key blocks each query block lists.
    fwd: [CubeTensor; 2],
    /// Offsets and items of the query blocks listing each key block.
    bwd: [CubeTensor; 2],
    block: u32,
    n_heads: u32,
    group_heads: u32,
}

/// Layouts whose uploaded lists are kept (a few per layer and length).
const LISTS_KEPT: usize = 64;

/// [`DeviceLists`] of `keys` for `n` tokens on `like`'s device, built and uploaded once per
/// (layout, length, device): a layer's forward and backward, and every step, share them.
fn device_lists(keys: &KeyLayout, n: usize, like: &CubeTensor) -> DeviceLists {
    static CACHE: Memo<(KeyLayout, usize, CubeDevice), DeviceLists> = Memo::new(LISTS_KEPT);
    let key = (keys.clone(), n, like.device.clone());
    CACHE.get_or_build(key, || {
        let (lists, block, n_heads, group_heads) = match &keys.sparse {
            None => (BlockLists::dense(), n.max(1) as u32, 1, 1),
            Some(s) => {
                let group_heads = (s.n_heads / s.runs.len()) as u32;
                (
                    BlockLists::new(s),
                    s.block as u32,
                    s.n_heads as u32,
                    group_heads,
                )
            }
        };
        DeviceLists {
            fwd: [
                upload(like, lists.fwd_offsets),
                upload(like, lists.fwd_items),
            ],
            bwd: [
                upload(like, lists.bwd_offsets),
                upload(like, lists.bwd_items),
            ],
            block,
            n_heads,
            group_heads,
        }
    })
}

/// The forward on Cube tensors: `[heads, n, d + 1]`.
fn forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    keys: &KeyLayout,
    (p, seed): (f32, u32),
) -> CubeTensor {
    let drop = dropout_args(p, seed);
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [heads, n, d] = dims3(&q);
    let out = empty_like(&q, vec![heads, n, d + 1]);
    let (count, dim) = launch_shape(&q, heads * n);
    let lists = device_lists(keys, n, &q);
    let [offsets, items] = lists.fwd;
    forward_kernel::launch(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        offsets.into_tensor_arg(),
        items.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lists.block,
        lists.n_heads,
        lists.group_heads,
        drop.0,
        drop.1,
        drop.2,
        d,
        keys.causal,
        drop.3,
        dtype_to_storage_type(DType::F32),
    );
    out
}

/// The backward on Cube tensors: `(dq, dk, dv)`.
fn backward(
    [q, k, v]: [CubeTensor; 3],
    out: CubeTensor,
    grad: CubeTensor,
    keys: &KeyLayout,
    (p, seed): (f32, u32),
) -> [CubeTensor; 3] {
    let drop = dropout_args(p, seed);
    let [q, k, v, out, grad] = [q, k, v, out, grad].map(into_contiguous);
    let [heads, n, d] = dims3(&q);
    let (dq, dk, dv) = (
        empty_like(&q, vec![heads, n, d]),
        empty_like(&q, vec![heads, n, d]),
        empty_like(&q, vec![heads, n, d]),
    );
    let delta = empty_like(&q, vec![heads, n]);
    let (count, dim) = launch_shape(&q, heads * n);
    let client = q.client.clone();
    let dtype = dtype_to_storage_type(DType::F32);
    let causal = keys.causal;
    let lists = device_lists(keys, n, &q);
    let (fwd, bwd) = (lists.fwd, lists.bwd);
    backward_query_kernel::launch(
        &client,
        count.clone(),
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        fwd[0].clone().into_tensor_arg(),
        fwd[1].clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        lists.block,
        lists.n_heads,
        lists.group_heads,
        drop.0,
        drop.1,
        drop.2,
        d,
        causal,
        drop.3,
        dtype,
    );
    backward_key_kernel::launch(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        out.into_tensor_arg(),
        grad.into_tensor_arg(),
        delta.into_tensor_arg(),
        bwd[0].clone().into_tensor_arg(),
        bwd[1].clone().into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        lists.block,
        lists.n_heads,
        lists.group_heads,
        drop.0,
        drop.1,
        drop.2,
        d,
        causal,
        drop.3,
        dtype,
    );
    [dq, dk, dv]
}

type Runtime = <CubeBackend as FusionBackend>::FusionRuntime;

/// A fusion tensor's Cube tensor (the fused work it depends on runs first).
fn resolve(t: FusionTensor<Runtime>) -> CubeTensor {
    let client = t.client.clone();
    client.resolve_tensor_float::<CubeBackend>(t)
}

/// A Cube tensor registered with the fusion `client`.
fn register(client: &GlobalFusionClient<Runtime>, t: CubeTensor) -> FusionTensor<Runtime> {
    let (shape, dtype) = (t.shape(), t.dtype());
    let handle = CubeBackend::float_tensor_handle(t);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(
            StreamId::current(),
            OperationIr::Init(desc),
            NoOp::<CubeBackend>::new(),
        )
        .pop()
        .expect("one output")
}

impl AttentionOps for Fusion<CubeBackend> {
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        memory_keys: FloatTensor<Self>,
        _memory_values: FloatTensor<Self>,
        key_pe: FloatTensor<Self>,
        span_z: FloatTensor<Self>,
        keys: KeyLayout,
        _ramp: f32,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self> {
        let extras = [&memory_keys, &key_pe, &span_z]
            .iter()
            .any(|t| t.shape().num_elements() > 0);
        let d = q.shape().dims::<3>()[2];
        assert!(
            supported(extras, d),
            "tiled_attention on Cube: dense or block-sparse keys without memory, positions or \
             span only (the mixers take the composed path otherwise)"
        );
        let client = q.client.clone();
        let (q, k, v) = (resolve(q), resolve(k), resolve(v));
        register(&client, forward(q, k, v, &keys, (dropout, seed)))
    }
}

impl AttentionBackward for Fusion<CubeBackend> {
    fn tiled_attention_backward(
        inputs: Operands<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        keys: &KeyLayout,
        (_ramp, p, seed): (f32, f32, u32),
    ) -> Operands<Self> {
        let [q, k, v, mk, mv, pe, z] = inputs;
        let client = q.client.clone();
        let [dq, dk, dv] = backward(
            [resolve(q), resolve(k), resolve(v)],
            resolve(out),
            resolve(grad),
            keys,
            (p, seed),
        )
        .map(|t| register(&client, t));
        // The absent parts are empty: their (empty) gradients are themselves.
        [dq, dk, dv, mk, mv, pe, z]
    }
}

#[cfg(test)]
mod tests {
    use super::super::KeyLayout;
    use super::super::tests::{check_on, sparse_cases};
    use burn::tensor::{Device, Tensor, TensorData};

    /// The Cube kernels' dropout mask for `[heads, n, n]` weights.
    fn cube_mask(p: f32, seed: u32, heads: usize, n: usize, device: &Device) -> Tensor<3> {
        let mask: Vec<f32> = (0..heads * n * n)
            .map(|i| super::dropout_factor(seed, i / n, i % n, p))
            .collect();
        Tensor::from_data(TensorData::new(mask, [heads, n, n]), device)
    }

    /// wgpu's adapter (Mesa's llvmpipe in CI), started once per test binary (wgpu's runtime
    /// registers once), or `None` with the reason printed — unless `MIXLAB_REQUIRE_WGPU` is set,
    /// when a missing adapter fails the test.
    fn wgpu() -> Option<Device> {
        static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
        let device = DEVICE.get_or_init(|| {
            if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
                // SAFETY: before wgpu starts; Mesa only reads it.
                unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
            }
            Device::wgpu_options().init().map_err(|e| e.to_string())
        });
        match device {
            Ok(device) => Some(device.clone()),
            Err(e) => {
                assert!(
                    std::env::var_os("MIXLAB_REQUIRE_WGPU").is_none(),
                    "MIXLAB_REQUIRE_WGPU is set but wgpu has no adapter: {e}"
                );
                eprintln!("skipped: no wgpu adapter ({e})");
                None
            }
        }
    }

    /// The CubeCL kernels on wgpu against softmax attention from tensor ops on the same device:
    /// outputs, log-sum-exps and the gradients of q, k and v, causal and bidirectional, at
    /// lengths 1, 5 and 70 and head widths 8 and 24, dropout 0 and 0.3 (the reference applies
    /// the kernels' hashed mask).
    #[test]
    fn cube_kernels_equal_tensor_ops_in_values_and_gradients() {
        let Some(device) = wgpu() else {
            return;
        };
        let device = device.autodiff();
        let heads = 3;
        for (n, d) in [(1usize, 8usize), (5, 24), (70, 8)] {
            for causal in [true, false] {
                let allowed: Vec<bool> = (0..heads * n * n)
                    .map(|i| !causal || i % n <= (i / n) % n)
                    .collect();
                for dropout in [(0.0f32, 0u32), (0.3, 11)] {
                    let name = format!("wgpu n={n} d={d} causal={causal} p={}", dropout.0);
                    let keys = KeyLayout::dense(causal);
                    let shape = [heads, n, d];
                    check_on(
                        &device,
                        &cube_mask,
                        shape,
                        keys,
                        allowed.clone(),
                        dropout,
                        &name,
                    );
                }
            }
        }
    }

    /// Block-sparse layouts on wgpu: every built-in pattern, causal and bidirectional, a ragged
    /// last block, token-level blocks, and two batch rows of four heads (head groups repeat per
    /// batch row), dropout 0.3 at n = 37, against masked tensor-op attention on the same device.
    #[test]
    fn cube_sparse_kernels_equal_masked_tensor_ops() {
        let Some(device) = wgpu() else {
            return;
        };
        let device = device.autodiff();
        for (name, shape, keys, allowed) in sparse_cases(&[(37, 5), (13, 1)]) {
            let dropout = if shape[1] == 37 { (0.3, 7) } else { (0.0, 0) };
            let name = format!("wgpu {name}");
            check_on(&device, &cube_mask, shape, keys, allowed, dropout, &name);
        }
    }
}
