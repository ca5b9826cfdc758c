//! The attention operation on Burn's Cube backend (wgpu, CUDA, ...): CubeCL kernels for dense
//! and block-sparse attention and for all-attention (persistent memory, relative positions,
//! adaptive span, on dense keys), with hashed attention dropout, and the flex kernel's contract —
//! `[heads, n, d + 1]` out, the row's log-sum-exp in the last column — and nothing of size
//! `n × n` ever stored, so memory is linear in the sequence length.
//!
//! Which keys a query sees travels as two compressed lists (dense keys: one block of `n`
//! listing itself; causality is the kernels' own test). One unit per query row in the forward
//! (an online softmax over the listed keys, the output row in registers) and in the backward's
//! query pass (`Δ = rowsum(dO ∘ O)`, `dQ = Σ_j dS_ij k_j` with `P` recomputed from the
//! log-sum-exp); one unit per key row in the key pass (`dK_j = Σ_i dS_ij q_i`,
//! `dV_j = Σ_i P_ij dO_i` over the query blocks that list its block), so every sum is one unit's
//! loop in a fixed order: no atomics, the same bits on every run.
//! A unit reads the rows it reuses at every step of its loop (its query and output-gradient
//! rows; in the key pass its key and value rows) from global memory once, into registers; the
//! loops over the head width are unrolled (`d` is comptime), so those rows and the
//! accumulators stay in registers rather than local memory. Rows of `q`, `k`, `v`, the
//! persistent vectors and the output gradient are read as vectors of 4 lanes (2 or 1 where `d`
//! is not a multiple of 4), a quarter of the load instructions; the query pass copies the
//! output gradient out of the `[heads, n, d + 1]` layout (whose rows are not vector-aligned)
//! into `[heads, n, d]` for the key, memory and position passes. Units of a cube walk keys in
//! step (`first_in_step`), and the forward rescales its accumulator only when a key raises
//! the running maximum. (On lavapipe, one dense layer's forward + backward at n = 1024 went
//! from 4.6 s to 1.5–1.7 s with these; no GPU has measured them.)
//!
//! All-attention (Sukhbaatar et al. 2019) adds, each behind a comptime switch (so dense and
//! sparse attention compile to the kernels without them): persistent slots as more keys of
//! every row's online softmax (memory head `h mod mem_heads`, dropout key `n + slot`); the
//! relative-position logit `q_i · key_pe[:, i − j]`; the adaptive span's ramp weight on context
//! keys (keys past the ramp are not visited). Gradients shared by heads — of the persistent
//! vectors, `key_pe` and the span `z` — are written per flattened head (per row for `z`) by
//! one unit each (the key pass's extra units for the slots; a position pass of one unit per
//! head and distance), then summed over heads in order by `shared_sum_kernel`.
//! [`supported`] says which head widths the kernels take; the mixers use their composed
//! tensor-op path otherwise.
//!
//! **Bounds.** The kernels launch unchecked (no bounds test on every buffer access): every
//! index is in bounds by construction — units past the last row return first; rows are
//! `pos · w + c` with `c < w` in contiguous tensors of the shapes [`Call`] checks; key and query
//! indices come from the block lists, which hold blocks of the tensors' own length; `key_pe`
//! distances are `i − j ≥ 0` for causal keys with `span ≥ n` (a cached layer's: columns
//! `δ − dmin` of visible pairs, `key_pe` covering the window; its `win` list holds one entry per
//! batch row of `heads / n_heads`; all validated before any kernel runs);
//! an absent part's empty placeholder is never read (its comptime switch is off). The tests run
//! ragged lengths (n = 1, 5, 37, 70) and widths (3, 6) so a wrong bound shows as a wrong value.
//!
//! A cached layer's keys (`KeyLayout::cached`: `[cache ; block]`, query `i` at key `s + i`,
//! a window of distances, a masked start per batch row) travel as one small `u32` list
//! ([`Call::win`]) behind the comptime switch `cached`: the query passes walk each row's window,
//! the key pass (one unit per key of `[cache ; block]`) the queries whose window holds it, the
//! position pass the pairs at each distance.
//!
//! Files: `common.rs` (what the kernels share on the device), `launch.rs` (the host side of a
//! call: block lists, operand checks, launch helpers), `forward.rs`, `backward.rs` (query and
//! key passes), `shared.rs` (the gradients heads share: memory and position passes, ordered
//! sums); this file registers the operation with the fusion backend.
//!
//! Burn's `Cube` is `Fusion<CubeBackend>`: the operation resolves its fusion inputs to Cube
//! tensors (running the queued fused work they depend on), launches, and registers its
//! outputs back with the fusion client.

use burn::backend::tensor::FloatTensor;
use burn_backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::stream::StreamId;
use burn_fusion::{Fusion, FusionBackend, FusionTensor, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};

use super::extension::{AttentionBackward, AttentionOps, Operands};
use super::layout::KeyLayout;
use backward::backward;
use forward::forward;
use launch::{Call, Parts};

mod backward;
mod common;
mod forward;
mod launch;
mod shared;

pub(crate) use launch::supported;

type Runtime = <CubeBackend as FusionBackend>::FusionRuntime;

/// A fusion tensor's Cube tensor (the fused work it depends on runs first).
fn resolve(t: FusionTensor<Runtime>) -> CubeTensor {
    let client = t.client.clone();
    client.resolve_tensor_float::<CubeBackend>(t)
}

/// A present (non-empty) part's Cube tensor.
fn present(t: &FusionTensor<Runtime>) -> Option<CubeTensor> {
    (t.shape().num_elements() > 0).then(|| resolve(t.clone()))
}

/// All-attention's parts of a call, each `None` when empty.
fn parts(
    mk: &FusionTensor<Runtime>,
    mv: &FusionTensor<Runtime>,
    pe: &FusionTensor<Runtime>,
    z: &FusionTensor<Runtime>,
) -> Parts {
    Parts {
        memory: present(mk).zip(present(mv)).map(|(k, v)| [k, v]),
        key_pe: present(pe),
        span_z: present(z),
    }
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
        memory_values: FloatTensor<Self>,
        key_pe: FloatTensor<Self>,
        span_z: FloatTensor<Self>,
        keys: KeyLayout,
        ramp: f32,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self> {
        let client = q.client.clone();
        let parts = parts(&memory_keys, &memory_values, &key_pe, &span_z);
        let call = Call::new(
            [resolve(q), resolve(k), resolve(v)],
            parts,
            &keys,
            (ramp, dropout, seed),
        );
        register(&client, forward(&call))
    }
}

impl AttentionBackward for Fusion<CubeBackend> {
    fn tiled_attention_backward(
        inputs: Operands<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        keys: &KeyLayout,
        settings: (f32, f32, u32),
    ) -> Operands<Self> {
        let [q, k, v, mk, mv, pe, z] = inputs;
        let client = q.client.clone();
        let parts = parts(&mk, &mv, &pe, &z);
        let call = Call::new([resolve(q), resolve(k), resolve(v)], parts, keys, settings);
        let grads = backward(&call, resolve(out), resolve(grad));
        let reg = |t: CubeTensor| register(&client, t);
        let [dq, dk, dv] = grads.qkv.map(reg);
        // An absent part is empty: its (empty) gradient is itself.
        let (dmk, dmv) = match grads.memory {
            Some([dmk, dmv]) => (reg(dmk), reg(dmv)),
            None => (mk, mv),
        };
        let dpe = grads.key_pe.map_or(pe, reg);
        let dz = grads.span_z.map_or(z, reg);
        [dq, dk, dv, dmk, dmv, dpe, dz]
    }
}

#[cfg(test)]
mod tests {
    use super::super::KeyLayout;
    use super::super::tests::{cached_cases, check_all_attention_on, check_on, sparse_cases};
    use super::common::dropout_factor;
    use crate::test_util::wgpu_kernels;
    use burn::tensor::{Device, FloatDType, Tensor, TensorData};

    /// The Cube kernels' dropout mask for `[heads, n, width]` weights (key `t` of flattened
    /// row `r`: context key `t < n`, memory slot `t − n`).
    fn cube_mask(p: f32, seed: u32, [heads, n, width]: [usize; 3], device: &Device) -> Tensor<3> {
        let mask: Vec<f32> = (0..heads * n * width)
            .map(|i| dropout_factor(seed, i / width, i % width, p))
            .collect();
        Tensor::from_data(TensorData::new(mask, [heads, n, width]), device)
    }

    /// One case of [`check_on`]: name, `[heads, n, d]`, keys, allowed pairs, dropout.
    type Case = (String, [usize; 3], KeyLayout, Vec<bool>, (f32, u32));

    /// [`check_on`] for each case on wgpu with `q`, `k`, `v` in `dtype`, against tensor ops on
    /// flex; nothing unless wgpu has an adapter ([`wgpu_kernels`]).
    fn check_cases_on_wgpu(dtype: FloatDType, cases: impl IntoIterator<Item = Case>) {
        let Some(device) = wgpu_kernels() else {
            return;
        };
        let (device, flex) = (device.autodiff(), Device::flex().autodiff());
        for (name, shape, keys, allowed, dropout) in cases {
            let name = format!("wgpu {dtype:?} {name}");
            check_on(
                &device, &flex, &cube_mask, dtype, shape, keys, allowed, dropout, &name,
            );
        }
    }

    /// The CubeCL kernels on wgpu (WGSL, or SPIR-V in a `vulkan` build) against softmax
    /// attention from tensor ops on flex: on wgpu nothing runs but the kernels, slices and
    /// elementwise ops, so the test runs on either compiler (`test_util::wgpu_kernels`).
    /// Outputs, log-sum-exps and the gradients of q, k and v, causal and bidirectional, at
    /// lengths 1 to 70 and head widths 8 and 24 (rows read as 4-lane vectors), 6 (2 lanes) and
    /// 3 (scalars), dropout 0 and 0.3 (the reference applies the kernels' hashed mask).
    #[test]
    fn cube_kernels_equal_tensor_ops_in_values_and_gradients() {
        let heads = 3;
        let mut cases: Vec<Case> = vec![];
        for (n, d) in [(1usize, 8usize), (5, 24), (70, 8), (9, 6), (11, 3)] {
            for causal in [true, false] {
                let allowed: Vec<bool> = (0..heads * n * n)
                    .map(|i| !causal || i % n <= (i / n) % n)
                    .collect();
                for dropout in [(0.0f32, 0u32), (0.3, 11)] {
                    let name = format!("n={n} d={d} causal={causal} p={}", dropout.0);
                    let keys = KeyLayout::dense(causal);
                    cases.push((name, [heads, n, d], keys, allowed.clone(), dropout));
                }
            }
        }
        check_cases_on_wgpu(FloatDType::F32, cases);
    }

    /// Block-sparse layouts on wgpu: every built-in pattern, causal and bidirectional, a ragged
    /// last block, token-level blocks, and two batch rows of four heads (head groups repeat per
    /// batch row), dropout 0.3 at n = 37, against masked tensor-op attention on flex.
    #[test]
    fn cube_sparse_kernels_equal_masked_tensor_ops() {
        let cases =
            sparse_cases(&[(37, 5), (13, 1)])
                .into_iter()
                .map(|(name, shape, keys, allowed)| {
                    let dropout = if shape[1] == 37 { (0.3, 7) } else { (0.0, 0) };
                    (name, shape, keys, allowed, dropout)
                });
        check_cases_on_wgpu(FloatDType::F32, cases);
    }

    /// Cached layouts on wgpu ([`cached_cases`]: the query offset, windows with and without
    /// self, masked starts; 70 queries after a cache of 50, 2 cubes of units), dropout 0.3,
    /// against masked tensor ops on flex with the kernels' mask.
    #[test]
    fn cube_cached_layouts_equal_masked_tensor_ops() {
        let cases = cached_cases(&[(70, 50, 60), (9, 4, 7)])
            .into_iter()
            .map(|(name, shape, keys, allowed)| (name, shape, keys, allowed, (0.3, 9)));
        check_cases_on_wgpu(FloatDType::F32, cases);
    }

    /// All-attention's kernels on wgpu (persistent slots, relative positions, adaptive span,
    /// with dropout 0.3) against its reference from tensor ops on flex with the kernels' mask
    /// ([`check_all_attention_on`]).
    #[test]
    fn cube_all_attention_kernels_equal_masked_tensor_ops() {
        let Some(device) = wgpu_kernels() else {
            return;
        };
        let flex = Device::flex().autodiff();
        check_all_attention_on(
            &device.autodiff(),
            &flex,
            &cube_mask,
            FloatDType::F32,
            "wgpu",
        );
    }

    /// Half precision: `q`, `k` and `v` in f16 (the model's precision under
    /// `train.precision = "f16"`) go into the kernels as they are, every sum runs in f32, and
    /// the gradients come back in f16. Against the f32 tensor-op reference on flex from the
    /// same f16-rounded inputs: the output and log-sum-exp within 1e-5 (an f16 accumulator
    /// would be off by ~1e-3), the gradients within f16's rounding (1e-3) — dense (causal,
    /// dropout), block-sparse, cached, and all-attention with every part. Skips (printed) on
    /// an adapter without shader-f16.
    #[test]
    fn cube_kernels_read_f16_and_sum_in_f32() {
        let Some(device) = wgpu_kernels() else {
            return;
        };
        if !device.supports_dtype(FloatDType::F16) {
            eprintln!("skipped: this wgpu adapter has no shader-f16");
            return;
        }
        let (heads, n, d) = (3, 70, 8);
        let allowed: Vec<bool> = (0..heads * n * n).map(|i| i % n <= (i / n) % n).collect();
        let dense = (
            "dense".to_string(),
            [heads, n, d],
            KeyLayout::dense(true),
            allowed,
        );
        let cases = std::iter::once(dense)
            .chain(sparse_cases(&[(37, 5)]).into_iter().take(2))
            .chain(cached_cases(&[(9, 4, 7)]))
            .enumerate()
            .map(|(seed, (name, shape, keys, allowed))| {
                (name, shape, keys, allowed, (0.3, seed as u32))
            });
        check_cases_on_wgpu(FloatDType::F16, cases);
        let flex = Device::flex().autodiff();
        check_all_attention_on(
            &device.autodiff(),
            &flex,
            &cube_mask,
            FloatDType::F16,
            "wgpu f16",
        );
    }
}
