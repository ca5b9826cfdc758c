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
//! step ([`first_in_step`]), and the forward rescales its accumulator only when a key raises
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
//! head and distance), then summed over heads in order by [`shared_sum_kernel`].
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
//! Burn's `Cube` is `Fusion<CubeBackend>`: the operation resolves its fusion inputs to Cube
//! tensors (running the queued fused work they depend on), launches, and registers its
//! outputs back with the fusion client.

use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, TensorData};
use burn_backend::TensorMetadata;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_backend::ops::IntTensorOps;
use burn_cubecl::{CubeBackend, CubeDevice};

use crate::ops::kernel::Memo;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::stream::StreamId;
use burn_fusion::{Fusion, FusionBackend, FusionTensor, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};
use cubecl::prelude::*;

use super::{AttentionBackward, AttentionOps, KeyLayout, Operands};

/// Whether the Cube kernels cover a head width (at most 256: a unit keeps its output row in
/// registers).
pub(crate) fn supported(d_head: usize) -> bool {
    (1..=256).contains(&d_head)
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

/// A row of `d` values as `d / line` vectors of `line` lanes (`line` divides `d`: 4, 2 or 1),
/// so a unit reads a row of `q`, `k`, `v`, the persistent vectors or the output gradient with
/// `d / line` vector loads rather than `d` scalar ones.
type Row<F, N> = Array<Vector<F, N>>;

/// `row[c] = t[base + c]` (vector indices): a row a unit reuses for every key (or query) it
/// visits, read from global memory once and kept in registers (the loops over the row are
/// unrolled, so the array's indices are constants).
#[cube]
fn load_row<F: Float, N: Size>(
    row: &mut Row<F, N>,
    t: &Tensor<Vector<F, N>>,
    base: usize,
    #[comptime] w: usize,
) {
    #[unroll]
    for c in 0..w {
        row[c] = t[base + c];
    }
}

/// `row` from `w · line` consecutive scalars of `t` from `base` (rows of the forward's
/// `[heads, n, d + 1]` output and of its gradient, whose stride does not keep vectors aligned).
#[cube]
fn gather_row<F: Float, N: Size>(
    row: &mut Row<F, N>,
    t: &Tensor<F>,
    base: usize,
    stride: usize,
    #[comptime] w: usize,
    #[comptime] line: usize,
) {
    #[unroll]
    for c in 0..w {
        let mut x = Vector::<F, N>::empty();
        #[unroll]
        for i in 0..line {
            x.insert(i, t[base + (c * line + i) * stride]);
        }
        row[c] = x;
    }
}

/// A zeroed accumulator row.
#[cube]
fn zeros<F: Float, N: Size>(#[comptime] w: usize) -> Row<F, N> {
    let mut acc = Array::<Vector<F, N>>::new(w);
    #[unroll]
    for c in 0..w {
        acc[c] = Vector::new(F::new(0.0));
    }
    acc
}

/// The sum of a vector's lanes.
#[cube]
fn lanes<F: Float, N: Size>(x: Vector<F, N>, #[comptime] line: usize) -> F {
    let mut s = F::new(0.0);
    #[unroll]
    for i in 0..line {
        s += x.extract(i);
    }
    s
}

/// `Σ_c a[c] · b[bb + c]` (`a` a row in registers).
#[cube]
fn dot_row<F: Float, N: Size>(
    a: &Row<F, N>,
    b: &Tensor<Vector<F, N>>,
    bb: usize,
    #[comptime] w: usize,
    #[comptime] line: usize,
) -> F {
    let mut s = Vector::<F, N>::new(F::new(0.0));
    #[unroll]
    for c in 0..w {
        s += a[c] * b[bb + c];
    }
    lanes(s, line)
}

/// `Σ_c a[c] · b[c]` (two rows in registers).
#[cube]
fn dot_rows<F: Float, N: Size>(
    a: &Row<F, N>,
    b: &Row<F, N>,
    #[comptime] w: usize,
    #[comptime] line: usize,
) -> F {
    let mut s = Vector::<F, N>::new(F::new(0.0));
    #[unroll]
    for c in 0..w {
        s += a[c] * b[c];
    }
    lanes(s, line)
}

/// Where a query row's loop over its keys runs: its flattened head and row, its key list,
/// the span's `z` for its head (0 without the span), and the first key with a non-zero span
/// weight for this row (`lo`) and for the first row of its cube in the same head (`lo_step`,
/// where the loop starts so that the cube's units walk keys in step; see [`first_in_step`]).
#[derive(CubeType)]
struct QueryKeys<F: Float> {
    head: usize,
    /// The query's key position: `row`, or `s + row` after a cached layer's `s` positions.
    p: usize,
    /// The window's smallest distance (0 without a cache) and the end of the keys the row
    /// sees when causal (`p + 1 − dmin`).
    dmin: usize,
    hi: usize,
    list: usize,
    block: usize,
    z: F,
    lo: usize,
    lo_step: usize,
}

/// Keys `first..end` of one listed key block.
#[derive(CubeType)]
struct KeyRun {
    first: usize,
    end: usize,
}

#[cube]
impl<F: Float> QueryKeys<F> {
    /// Query row `pos` (flattened) of `n` queries over `nk` keys (`win`: a cached layer's
    /// window, read when `cached`; see [`Call::win`]).
    #[allow(clippy::too_many_arguments)]
    fn new(
        pos: usize,
        n: usize,
        nk: usize,
        z: &Tensor<F>,
        ramp: F,
        win: &Tensor<u32>,
        block: u32,
        n_heads: u32,
        group_heads: u32,
        #[comptime] span: bool,
        #[comptime] cached: bool,
    ) -> QueryKeys<F> {
        let head = pos / n;
        let row = pos % n;
        let block = block as usize;
        let list = group_of(head, n_heads, group_heads) * n.div_ceil(block) + row / block;
        let mut zh = F::new(0.0);
        let mut lo = 0usize;
        let mut lo_step = 0usize;
        let mut p = row;
        let mut p0 = first_in_step(row);
        let mut dmin = 0usize;
        let mut hi = row + 1;
        if cached {
            // Keys `first.max(p − dmax) .. p + 1 − dmin` (the cube's first row: from `p0`).
            let offset = win[0] as usize;
            dmin = win[1] as usize;
            let dmax = win[2] as usize;
            let first = win[4 + head / win[3] as usize] as usize;
            p = row + offset;
            p0 += offset;
            hi = (p + 1 - dmin).min(nk);
            lo = first;
            lo_step = first;
            if p > dmax {
                lo = lo.max(p - dmax);
            }
            if p0 > dmax {
                lo_step = lo_step.max(p0 - dmax);
            }
        }
        if span {
            zh = span_of(z, head);
            let reach = span_reach::<F>(zh, ramp);
            if p > reach {
                lo = lo.max(p - reach);
            }
            if p0 > reach {
                lo_step = lo_step.max(p0 - reach);
            }
        }
        QueryKeys::<F> {
            head,
            p,
            dmin,
            hi,
            list,
            block,
            z: zh,
            lo,
            lo_step,
        }
    }

    /// The keys of list entry `idx` the cube walks among `nk` (causal: up to this row's
    /// window end; with the span or a cache: from `lo_step`).
    fn run(
        &self,
        items: &Tensor<u32>,
        idx: usize,
        nk: usize,
        #[comptime] causal: bool,
        #[comptime] from_lo: bool,
    ) -> KeyRun {
        let mut first = items[idx] as usize * self.block;
        let mut end = (first + self.block).min(nk);
        if causal {
            end = end.min(self.hi);
        }
        if from_lo {
            first = first.max(self.lo_step);
        }
        KeyRun { first, end }
    }
}

/// The first row of this unit's cube in the same head as `row` (cubes are consecutive
/// flattened rows). Where each unit's loop would start at its own row (causal keys in the key
/// pass, the span's first key in the others), the cube's units start together at the bound of
/// this row instead and skip the steps below their own: units walking in step read the same
/// key (or query) row at the same time, one broadcast load per warp rather than one load per
/// unit from rows `d` floats apart.
#[cube]
fn first_in_step(row: usize) -> usize {
    row - row.min(UNIT_POS as usize)
}

/// `a − b`, or 0 when `b > a`.
#[cube]
fn sub_or_zero(a: usize, b: usize) -> usize {
    a - a.min(b)
}

/// The adaptive span's ratio `((z − δ) + ramp) / ramp` at distance `δ = row − key` (its
/// weight is the ratio clamped to `[0, 1]`; its gradient in `z` passes where the ratio is
/// inside `[0, 1]`). `δ` is negative for later keys of bidirectional attention (weight 1).
#[cube]
fn span_ratio<F: Float>(z: F, ramp: F, row: usize, key: usize) -> F {
    let delta = F::cast_from(row as u32) - F::cast_from(key as u32);
    ((z - delta) + ramp) / ramp
}

/// The largest distance a key can sit from its query and keep a non-zero span weight, plus
/// one (a margin for rounding; the weight of a key past the ramp is 0 anyway).
#[cube]
fn span_reach<F: Float>(z: F, ramp: F) -> usize {
    u32::cast_from(F::floor(F::max(z + ramp, F::new(0.0)))) as usize + 1
}

/// Flattened head `head`'s span `z` (span head `head mod span_heads`).
#[cube]
fn span_of<F: Float>(z: &Tensor<F>, head: usize) -> F {
    z[head % z.shape(0)]
}

/// `acc += x · v[vb..vb + w]`.
#[cube]
fn accumulate<F: Float, N: Size>(
    acc: &mut Row<F, N>,
    x: F,
    v: &Tensor<Vector<F, N>>,
    vb: usize,
    #[comptime] w: usize,
) {
    let x = Vector::<F, N>::new(x);
    #[unroll]
    for c in 0..w {
        acc[c] += x * v[vb + c];
    }
}

/// `acc += x · row`.
#[cube]
fn accumulate_row<F: Float, N: Size>(
    acc: &mut Row<F, N>,
    x: F,
    row: &Row<F, N>,
    #[comptime] w: usize,
) {
    let x = Vector::<F, N>::new(x);
    #[unroll]
    for c in 0..w {
        acc[c] += x * row[c];
    }
}

/// `acc *= corr`: the online softmax's rescaling, only when a key raises the running maximum
/// (rare after the first keys, so most keys cost one `exp` and no rescale).
#[cube]
fn rescale<F: Float, N: Size>(acc: &mut Row<F, N>, corr: F, #[comptime] w: usize) {
    let corr = Vector::<F, N>::new(corr);
    #[unroll]
    for c in 0..w {
        acc[c] *= corr;
    }
}

/// `t[base + c · stride]` for the `d` lanes of `row` (scalar stores).
#[cube]
fn scatter_row<F: Float, N: Size>(
    t: &mut Tensor<F>,
    base: usize,
    stride: usize,
    row: &Row<F, N>,
    #[comptime] w: usize,
    #[comptime] line: usize,
) {
    #[unroll]
    for c in 0..w {
        #[unroll]
        for i in 0..line {
            t[base + (c * line + i) * stride] = row[c].extract(i);
        }
    }
}

/// `t[base + c] = row[c]` (vector stores).
#[cube]
fn store_row<F: Float, N: Size>(
    t: &mut Tensor<Vector<F, N>>,
    base: usize,
    row: &Row<F, N>,
    #[comptime] w: usize,
) {
    #[unroll]
    for c in 0..w {
        t[base + c] = row[c];
    }
}

/// The comptime switches every kernel takes: head width, the vector width `line` of its rows
/// (4, 2 or 1, dividing `d`; the launch's vector size), causality, and which optional parts
/// are on (attention dropout, persistent memory, relative positions, adaptive span).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Flags {
    d: usize,
    line: usize,
    causal: bool,
    dropout: bool,
    memory: bool,
    relative: bool,
    span: bool,
    /// A cached layer's keys: `[cache ; block]` with a window per query ([`Call::win`]).
    cached: bool,
}

#[cube(launch_unchecked)]
fn forward_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    mk: &Tensor<Vector<F, N>>,
    mv: &Tensor<Vector<F, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    win: &Tensor<u32>,
    out: &mut Tensor<F>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    ramp: f32,
    #[comptime] f: Flags,
    #[define(F)] _dtype: ElemType,
) {
    let (d, line) = comptime!((f.d, f.line));
    let w = comptime!(f.d / f.line);
    let n = q.shape(1);
    let nk = k.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * n {
        terminate!();
    }
    let keep = F::cast_from(keep);
    let ramp = F::cast_from(ramp);
    let at = QueryKeys::<F>::new(
        pos,
        n,
        nk,
        z,
        ramp,
        win,
        block,
        n_heads,
        group_heads,
        f.span,
        f.cached,
    );
    let head = at.head;
    let zh = at.z;
    let mut qr = Array::<Vector<F, N>>::new(w);
    load_row(&mut qr, q, pos * w, w);
    let mut acc = zeros::<F, N>(w);
    let mut column = Array::<Vector<F, N>>::new(w);
    let mut m = F::new(-1.0e30);
    let mut l = F::new(0.0);
    for idx in offsets[at.list] as usize..offsets[at.list + 1] as usize {
        let run = at.run(items, idx, nk, f.causal, comptime!(f.span || f.cached));
        for j in run.first..run.end {
            if j >= at.lo {
                let kb = (head * nk + j) * w;
                let mut s = dot_row(&qr, k, kb, w, line);
                if f.relative {
                    gather_row(&mut column, pe, at.p - j - at.dmin, pe.shape(1), w, line);
                    s += dot_rows(&qr, &column, w, line);
                }
                if s > m {
                    let corr = F::exp(m - s);
                    l *= corr;
                    rescale(&mut acc, corr, w);
                    m = s;
                }
                let mut p = F::exp(s - m);
                if f.span {
                    p *= F::clamp(span_ratio::<F>(zh, ramp, at.p, j), F::new(0.0), F::new(1.0));
                }
                l += p;
                let mut x = p;
                if f.dropout {
                    x = p * dropout_factor_cube::<F>(seed, pos, j, threshold, keep);
                }
                accumulate(&mut acc, x, v, kb, w);
            }
        }
    }
    if f.memory {
        let mem = mk.shape(1);
        let first = (head % mk.shape(0)) * mem;
        for slot in 0..mem {
            let kb = (first + slot) * w;
            let s = dot_row(&qr, mk, kb, w, line);
            if s > m {
                let corr = F::exp(m - s);
                l *= corr;
                rescale(&mut acc, corr, w);
                m = s;
            }
            let p = F::exp(s - m);
            l += p;
            let mut x = p;
            if f.dropout {
                x = p * dropout_factor_cube::<F>(seed, pos, nk + slot, threshold, keep);
            }
            accumulate(&mut acc, x, mv, kb, w);
        }
    }
    let ob = pos * (d + 1);
    // A row that saw no key (a cached layer's masked stream start) stays zero.
    let mut inv = F::new(0.0);
    if l > F::new(0.0) {
        inv = F::new(1.0) / l;
    }
    rescale(&mut acc, inv, w);
    scatter_row(out, ob, 1, &acc, w, line);
    out[ob + d] = m + F::ln(l);
}

/// `P = exp(s − L)`, capped at `exp(80)` with the adaptive span: `L` normalises the
/// span-masked weights, so a masked-down key may score above it (the cap keeps a fully masked
/// one at `0 · e`, not `0 · ∞`).
#[cube]
fn probability<F: Float>(s: F, lse: F, #[comptime] span: bool) -> F {
    let mut x = s - lse;
    if span {
        x = F::min(x, F::new(80.0));
    }
    F::exp(x)
}

/// The query pass: one unit per query row, `Δ = rowsum(dO ∘ O)`, `dQ`, the row's share of the
/// span gradient, and the row's output gradient copied out as `[heads, n, d]` vectors (`go`)
/// for the other passes.
#[cube(launch_unchecked)]
fn backward_query_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    mk: &Tensor<Vector<F, N>>,
    mv: &Tensor<Vector<F, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    win: &Tensor<u32>,
    dq: &mut Tensor<Vector<F, N>>,
    go: &mut Tensor<Vector<F, N>>,
    delta: &mut Tensor<F>,
    dz_rows: &mut Tensor<F>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    ramp: f32,
    #[comptime] f: Flags,
    #[define(F)] _dtype: ElemType,
) {
    let (d, line) = comptime!((f.d, f.line));
    let w = comptime!(f.d / f.line);
    let n = q.shape(1);
    let nk = k.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * n {
        terminate!();
    }
    let keep = F::cast_from(keep);
    let ramp = F::cast_from(ramp);
    let at = QueryKeys::<F>::new(
        pos,
        n,
        nk,
        z,
        ramp,
        win,
        block,
        n_heads,
        group_heads,
        f.span,
        f.cached,
    );
    let head = at.head;
    let zh = at.z;
    let qb = pos * w;
    let ob = pos * (d + 1);
    let lse = out[ob + d];
    let mut qr = Array::<Vector<F, N>>::new(w);
    load_row(&mut qr, q, qb, w);
    let mut gr = Array::<Vector<F, N>>::new(w);
    gather_row(&mut gr, grad, ob, 1, w, line);
    store_row(go, qb, &gr, w);
    let mut or = Array::<Vector<F, N>>::new(w);
    gather_row(&mut or, out, ob, 1, w, line);
    let dl = dot_rows(&gr, &or, w, line);
    delta[pos] = dl;
    let mut acc = zeros::<F, N>(w);
    let mut column = Array::<Vector<F, N>>::new(w);
    let mut dz = F::new(0.0);
    for idx in offsets[at.list] as usize..offsets[at.list + 1] as usize {
        let run = at.run(items, idx, nk, f.causal, comptime!(f.span || f.cached));
        for j in run.first..run.end {
            if j >= at.lo {
                let kb = (head * nk + j) * w;
                let mut s = dot_row(&qr, k, kb, w, line);
                if f.relative {
                    gather_row(&mut column, pe, at.p - j - at.dmin, pe.shape(1), w, line);
                    s += dot_rows(&qr, &column, w, line);
                }
                let mut dp = dot_row(&gr, v, kb, w, line);
                if f.dropout {
                    dp *= dropout_factor_cube::<F>(seed, pos, j, threshold, keep);
                }
                let diff = dp - dl;
                let mut e = probability::<F>(s, lse, f.span);
                if f.span {
                    let ratio = span_ratio::<F>(zh, ramp, at.p, j);
                    if ratio >= F::new(0.0) && ratio <= F::new(1.0) {
                        dz += e * diff / ramp;
                    }
                    e *= F::clamp(ratio, F::new(0.0), F::new(1.0));
                }
                let ds = e * diff;
                accumulate(&mut acc, ds, k, kb, w);
                if f.relative {
                    accumulate_row(&mut acc, ds, &column, w);
                }
            }
        }
    }
    if f.memory {
        let mem = mk.shape(1);
        let first = (head % mk.shape(0)) * mem;
        for slot in 0..mem {
            let kb = (first + slot) * w;
            let s = dot_row(&qr, mk, kb, w, line);
            let mut dp = dot_row(&gr, mv, kb, w, line);
            if f.dropout {
                dp *= dropout_factor_cube::<F>(seed, pos, nk + slot, threshold, keep);
            }
            let ds = probability::<F>(s, lse, f.span) * (dp - dl);
            accumulate(&mut acc, ds, mk, kb, w);
        }
    }
    store_row(dq, qb, &acc, w);
    if f.span {
        dz_rows[pos] = dz;
    }
}

/// One key's `dK` and `dV` terms from query row `qi`: `dS = P ∘ (dP ∘ mask − Δ)` and
/// `P ∘ mask` (`e` is `P`, span-weighted where it applies).
#[cube]
#[allow(clippy::too_many_arguments)]
fn key_terms<F: Float, N: Size>(
    acc_k: &mut Row<F, N>,
    acc_v: &mut Row<F, N>,
    e: F,
    dp: F,
    factor: F,
    dl: F,
    q: &Tensor<Vector<F, N>>,
    go: &Tensor<Vector<F, N>>,
    qb: usize,
    #[comptime] w: usize,
) {
    accumulate(acc_k, e * (dp * factor - dl), q, qb, w);
    accumulate(acc_v, e * factor, go, qb, w);
}

/// The key pass: one unit per context key, `dK` and `dV` over the queries that see it.
#[cube(launch_unchecked)]
fn backward_key_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    out: &Tensor<F>,
    go: &Tensor<Vector<F, N>>,
    delta: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    win: &Tensor<u32>,
    dk: &mut Tensor<Vector<F, N>>,
    dv: &mut Tensor<Vector<F, N>>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
    seed: u32,
    threshold: u32,
    keep: f32,
    ramp: f32,
    #[comptime] f: Flags,
    #[define(F)] _dtype: ElemType,
) {
    let (d, line) = comptime!((f.d, f.line));
    let w = comptime!(f.d / f.line);
    let n = q.shape(1);
    let nk = k.shape(1);
    let heads = q.shape(0);
    let pos = ABSOLUTE_POS;
    if pos >= heads * nk {
        terminate!();
    }
    let keep = F::cast_from(keep);
    let ramp = F::cast_from(ramp);
    let mut acc_k = zeros::<F, N>(w);
    let mut acc_v = zeros::<F, N>(w);
    let head = pos / nk;
    let key = pos % nk;
    let bs = block as usize;
    let blocks = n.div_ceil(bs);
    let list = group_of(head, n_heads, group_heads) * blocks + key / bs;
    let mut zh = F::new(0.0);
    let mut reach = n;
    if f.span {
        zh = span_of(z, head);
        reach = span_reach::<F>(zh, ramp);
    }
    let mut i_lo = 0usize;
    if f.causal {
        i_lo = key;
    }
    // A cached layer: query `i` sits at key position `offset + i` and sees this key at
    // distances `dmin..=dmax` (not at all before its batch row's first key).
    let mut offset = 0usize;
    let mut dmin = 0usize;
    let mut i_lo_step = first_in_step(key);
    let mut i_end = n;
    if f.cached {
        offset = win[0] as usize;
        dmin = win[1] as usize;
        let dmax = win[2] as usize;
        let first = win[4 + head / win[3] as usize] as usize;
        i_lo = sub_or_zero(key + dmin, offset);
        i_lo_step = sub_or_zero(first_in_step(key) + dmin, offset);
        i_end = i_end.min(sub_or_zero(key + dmax + 1, offset));
        if key < first {
            i_end = 0;
        }
    }
    let kb = pos * w;
    let mut kr = Array::<Vector<F, N>>::new(w);
    load_row(&mut kr, k, kb, w);
    let mut vr = Array::<Vector<F, N>>::new(w);
    load_row(&mut vr, v, kb, w);
    let mut column = Array::<Vector<F, N>>::new(w);
    for idx in offsets[list] as usize..offsets[list + 1] as usize {
        let mut first = items[idx] as usize * bs;
        let mut end = (first + bs).min(n.min(i_end));
        if f.causal {
            first = first.max(i_lo_step);
        }
        if f.span {
            end = end.min(sub_or_zero(key + reach + 1, offset));
        }
        for i in first..end {
            if i >= i_lo {
                let qi = head * n + i;
                let qb = qi * w;
                let mut s = dot_row(&kr, q, qb, w, line);
                if f.relative {
                    gather_row(
                        &mut column,
                        pe,
                        offset + i - key - dmin,
                        pe.shape(1),
                        w,
                        line,
                    );
                    s += dot_row(&column, q, qb, w, line);
                }
                let dp = dot_row(&vr, go, qb, w, line);
                let mut e = probability::<F>(s, out[qi * (d + 1) + d], f.span);
                if f.span {
                    let ratio = span_ratio::<F>(zh, ramp, offset + i, key);
                    e *= F::clamp(ratio, F::new(0.0), F::new(1.0));
                }
                let mut factor = F::new(1.0);
                if f.dropout {
                    factor = dropout_factor_cube::<F>(seed, qi, key, threshold, keep);
                }
                key_terms(
                    &mut acc_k, &mut acc_v, e, dp, factor, delta[qi], q, go, qb, w,
                );
            }
        }
    }
    store_row(dk, kb, &acc_k, w);
    store_row(dv, kb, &acc_v, w);
}

/// The persistent slots' pass: one unit per (flattened head, slot), that head's share of the
/// slot's `dK` and `dV` over all its queries (summed over heads by [`shared_sum_kernel`]).
#[cube(launch_unchecked)]
fn backward_memory_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    mk: &Tensor<Vector<F, N>>,
    mv: &Tensor<Vector<F, N>>,
    out: &Tensor<F>,
    go: &Tensor<Vector<F, N>>,
    delta: &Tensor<F>,
    win: &Tensor<u32>,
    dmk: &mut Tensor<Vector<F, N>>,
    dmv: &mut Tensor<Vector<F, N>>,
    seed: u32,
    threshold: u32,
    keep: f32,
    #[comptime] f: Flags,
    #[define(F)] _dtype: ElemType,
) {
    let (d, line) = comptime!((f.d, f.line));
    let w = comptime!(f.d / f.line);
    let n = q.shape(1);
    // Context keys before the slots (dropout key `nk + slot`): `n`, or `s + n` when cached.
    let mut nk = n;
    if f.cached {
        nk += win[0] as usize;
    }
    let mem = mk.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * mem {
        terminate!();
    }
    let head = pos / mem;
    let slot = pos % mem;
    let kb = ((head % mk.shape(0)) * mem + slot) * w;
    let keep = F::cast_from(keep);
    let mut acc_k = zeros::<F, N>(w);
    let mut acc_v = zeros::<F, N>(w);
    let mut kr = Array::<Vector<F, N>>::new(w);
    load_row(&mut kr, mk, kb, w);
    let mut vr = Array::<Vector<F, N>>::new(w);
    load_row(&mut vr, mv, kb, w);
    for i in 0..n {
        let qi = head * n + i;
        let qb = qi * w;
        let s = dot_row(&kr, q, qb, w, line);
        let dp = dot_row(&vr, go, qb, w, line);
        let e = probability::<F>(s, out[qi * (d + 1) + d], f.span);
        let mut factor = F::new(1.0);
        if f.dropout {
            factor = dropout_factor_cube::<F>(seed, qi, nk + slot, threshold, keep);
        }
        key_terms(
            &mut acc_k, &mut acc_v, e, dp, factor, delta[qi], q, go, qb, w,
        );
    }
    store_row(dmk, pos * w, &acc_k, w);
    store_row(dmv, pos * w, &acc_v, w);
}

/// The relative positions' pass (dense causal keys): one unit per (flattened head, distance
/// `δ`), `Σ_i dS[i, i − δ] q_i` into that head's `[d, span]` share of `d key_pe` (summed
/// over heads by [`shared_sum_kernel`]); distances no pair spans get zeros.
#[cube(launch_unchecked)]
fn backward_position_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    out: &Tensor<F>,
    go: &Tensor<Vector<F, N>>,
    delta: &Tensor<F>,
    win: &Tensor<u32>,
    dpe: &mut Tensor<F>,
    seed: u32,
    threshold: u32,
    keep: f32,
    ramp: f32,
    #[comptime] f: Flags,
    #[define(F)] _dtype: ElemType,
) {
    let (d, line) = comptime!((f.d, f.line));
    let w = comptime!(f.d / f.line);
    let n = q.shape(1);
    let nk = k.shape(1);
    let span = pe.shape(1);
    let pos = ABSOLUTE_POS;
    if pos >= q.shape(0) * span {
        terminate!();
    }
    let head = pos / span;
    let column_of = pos % span;
    // Column `c` is distance `c + dmin`; query `i` (key position `offset + i`) meets it in key
    // `offset + i − dist`, visible from the row's first key on and up to `dmax`.
    let mut dist = column_of;
    let mut offset = 0usize;
    let mut i_first = column_of;
    let mut within = true;
    if f.cached {
        offset = win[0] as usize;
        dist = column_of + win[1] as usize;
        let first = win[4 + head / win[3] as usize] as usize;
        i_first = sub_or_zero(first + dist, offset);
        within = dist <= win[2] as usize;
    }
    let keep = F::cast_from(keep);
    let ramp = F::cast_from(ramp);
    let mut acc = zeros::<F, N>(w);
    let mut column = Array::<Vector<F, N>>::new(w);
    gather_row(&mut column, pe, column_of, span, w, line);
    let mut qr = Array::<Vector<F, N>>::new(w);
    let mut vr = Array::<Vector<F, N>>::new(w);
    let mut zh = F::new(0.0);
    let mut reach = n;
    if f.span {
        zh = span_of(z, head);
        reach = span_reach::<F>(zh, ramp);
    }
    if dist <= reach && within {
        for i in i_first..n {
            let key = offset + i - dist;
            let qi = head * n + i;
            let qb = qi * w;
            let kb = (head * nk + key) * w;
            load_row(&mut qr, q, qb, w);
            let s = dot_row(&qr, k, kb, w, line) + dot_rows(&qr, &column, w, line);
            load_row(&mut vr, v, kb, w);
            let mut dp = dot_row(&vr, go, qb, w, line);
            if f.dropout {
                dp *= dropout_factor_cube::<F>(seed, qi, key, threshold, keep);
            }
            let mut e = probability::<F>(s, out[qi * (d + 1) + d], f.span);
            if f.span {
                e *= F::clamp(span_ratio::<F>(zh, ramp, dist, 0), F::new(0.0), F::new(1.0));
            }
            let ds = e * (dp - delta[qi]);
            accumulate_row(&mut acc, ds, &qr, w);
        }
    }
    scatter_row(dpe, head * d * span + column_of, span, &acc, w, line);
}

/// `out[s, l] = Σ_{h ≡ s (mod shared)} Σ_r part[h, r, l]` in increasing `h`, then `r`: the
/// per-head shares of a gradient shared by heads (memory heads, `key_pe`, span heads), summed
/// in a fixed order by one unit per output element. `part` is `[heads, rows, len]`, `out`
/// `[shared, len]`.
#[cube(launch_unchecked)]
fn shared_sum_kernel<F: Float>(
    part: &Tensor<F>,
    out: &mut Tensor<F>,
    heads: u32,
    shared: u32,
    rows: u32,
    len: u32,
    #[define(F)] _dtype: ElemType,
) {
    let pos = ABSOLUTE_POS;
    let n_part = heads as usize;
    let n_shared = shared as usize;
    let n_rows = rows as usize;
    let width = len as usize;
    if pos >= n_shared * width {
        terminate!();
    }
    let s = pos / width;
    let l = pos % width;
    let mut acc = F::new(0.0);
    for t in 0..(n_part + n_shared - 1 - s) / n_shared {
        let h = s + t * n_shared;
        for r in 0..n_rows {
            acc += part[(h * n_rows + r) * width + l];
        }
    }
    out[pos] = acc;
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

/// The vector width the kernels read rows with: 4, 2 or 1, the largest dividing `d`.
fn line_of(d: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|line| d.is_multiple_of(*line))
        .expect("1 divides d")
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

/// All-attention's parts on the device, each `None` when absent.
#[derive(Default)]
struct Parts {
    /// Persistent keys and values, `[mem_heads, m, d]`.
    memory: Option<[CubeTensor; 2]>,
    /// Relative-position keys `[d, span]`.
    key_pe: Option<CubeTensor>,
    /// The adaptive span's `z` per span head, `[span_heads]`.
    span_z: Option<CubeTensor>,
}

/// One call's operands (contiguous; absent parts as one-element placeholders the kernels
/// never read), its switches and scalars.
struct Call {
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    mk: CubeTensor,
    mv: CubeTensor,
    pe: CubeTensor,
    z: CubeTensor,
    flags: Flags,
    lists: DeviceLists,
    /// A cached layer's window as `u32`s: `[s, dmin, dmax, heads per batch row, then each batch
    /// row's first visible key]` (query `i` is key `s + i` and sees the keys from its row's
    /// first on at distances `dmin..=dmax`); a placeholder otherwise.
    win: CubeTensor,
    /// Flattened heads, queries, context keys, persistent slots, distances `key_pe` covers.
    heads: usize,
    n: usize,
    nk: usize,
    mem: usize,
    span: usize,
    seed: u32,
    threshold: u32,
    keep: f32,
    ramp: f32,
}

impl Call {
    /// Checks the shapes against each other and the layout (all-attention's parts need dense
    /// keys; relative positions causal ones and `span ≥ n`).
    fn new(
        [q, k, v]: [CubeTensor; 3],
        parts: Parts,
        keys: &KeyLayout,
        (ramp, p, seed): (f32, f32, u32),
    ) -> Self {
        let [q, k, v] = [q, k, v].map(into_contiguous);
        let [heads, n, d] = dims3(&q);
        let nk = dims3(&k)[1];
        assert!(
            dims3(&k) == [heads, nk, d] && dims3(&v) == [heads, nk, d],
            "tiled_attention on Cube: k and v must both be [{heads}, keys, {d}]"
        );
        assert!(
            supported(d),
            "tiled_attention on Cube: head width {d} is outside 1..=256"
        );
        let (min_distance, max_distance) = keys.check(n, nk, heads);
        let extras = parts.memory.is_some() || parts.key_pe.is_some() || parts.span_z.is_some();
        assert!(
            !extras || keys.sparse.is_none(),
            "tiled_attention on Cube: persistent memory, relative positions and the adaptive \
             span need dense keys"
        );
        let placeholder = || empty_like(&q, vec![1]);
        // Read as vectors: at least one whole vector.
        let row_placeholder = || empty_like(&q, vec![d]);
        let (mk, mv, mem) = match parts.memory {
            Some([mk, mv]) => {
                let [mem_heads, mem, mem_d] = dims3(&mk);
                assert!(
                    dims3(&mv) == [mem_heads, mem, mem_d] && mem_d == d && mem_heads > 0,
                    "tiled_attention on Cube: memory keys and values must be [mem_heads, m, {d}]"
                );
                (into_contiguous(mk), into_contiguous(mv), mem)
            }
            None => (row_placeholder(), row_placeholder(), 0),
        };
        let (pe, span) = match parts.key_pe {
            Some(pe) => {
                let [pe_d, span] = pe.shape().dims::<2>();
                let needed = super::pe_columns(nk, (min_distance, max_distance));
                assert!(
                    pe_d == d && span >= needed && keys.causal,
                    "tiled_attention on Cube: key_pe [{pe_d}, {span}] needs [{d}, ≥ {needed}] \
                     and causal keys"
                );
                (into_contiguous(pe), span)
            }
            None => (placeholder(), 0),
        };
        let span_on = parts.span_z.is_some();
        assert!(
            !span_on || ramp > 0.0,
            "tiled_attention on Cube: ramp {ramp}"
        );
        let z = parts.span_z.map_or_else(placeholder, into_contiguous);
        let (lists, win) = match &keys.cached {
            // Dense lists over one block of all `s + n` keys; the window is the kernels' test.
            Some(c) => {
                let mut win = vec![
                    c.cache as u32,
                    c.min_distance as u32,
                    c.max_distance as u32,
                    c.n_heads as u32,
                ];
                win.extend(c.first.iter().map(|&f| f as u32));
                (
                    device_lists(&KeyLayout::dense(true), nk, &q),
                    upload(&q, win),
                )
            }
            None => (device_lists(keys, n, &q), upload(&q, vec![0])),
        };
        Self {
            flags: Flags {
                d,
                line: line_of(d),
                causal: keys.causal,
                dropout: p > 0.0,
                memory: mem > 0,
                relative: span > 0,
                span: span_on,
                cached: keys.cached.is_some(),
            },
            lists,
            win,
            heads,
            n,
            nk,
            mem,
            span,
            seed,
            threshold: threshold(p),
            keep: 1.0 / (1.0 - p),
            ramp,
            q,
            k,
            v,
            mk,
            mv,
            pe,
            z,
        }
    }
}

/// The forward on Cube tensors: `[heads, n, d + 1]`.
fn forward(c: &Call) -> CubeTensor {
    let d = c.flags.d;
    let out = empty_like(&c.q, vec![c.heads, c.n, d + 1]);
    let (count, dim) = launch_shape(&c.q, c.heads * c.n);
    let [offsets, items] = &c.lists.fwd;
    let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
    // SAFETY: in bounds by construction (module doc, "Bounds").
    unsafe {
        forward_kernel::launch_unchecked(
            &c.q.client.clone(),
            count,
            dim,
            c.flags.line,
            arg(&c.q),
            arg(&c.k),
            arg(&c.v),
            arg(&c.mk),
            arg(&c.mv),
            arg(&c.pe),
            arg(&c.z),
            arg(offsets),
            arg(items),
            arg(&c.win),
            arg(&out),
            c.lists.block,
            c.lists.n_heads,
            c.lists.group_heads,
            c.seed,
            c.threshold,
            c.keep,
            c.ramp,
            c.flags,
            dtype_to_storage_type(DType::F32),
        );
    }
    out
}

/// `[shared, ...]` sums of `part` (`[heads, rows, len]`) over the heads `h ≡ s (mod shared)`
/// and the rows, in a fixed order (see [`shared_sum_kernel`]); `shape` is the output's.
fn shared_sum(part: &CubeTensor, shared: usize, rows: usize, shape: Vec<usize>) -> CubeTensor {
    let out = empty_like(part, shape);
    let len = out.shape().num_elements() / shared;
    let heads = part.shape().num_elements() / (rows * len);
    assert_eq!(
        heads * rows * len,
        part.shape().num_elements(),
        "shared_sum: shapes"
    );
    let (count, dim) = launch_shape(part, shared * len);
    // SAFETY: in bounds by construction (module doc, "Bounds").
    unsafe {
        shared_sum_kernel::launch_unchecked(
            &part.client.clone(),
            count,
            dim,
            part.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            heads as u32,
            shared as u32,
            rows as u32,
            len as u32,
            dtype_to_storage_type(DType::F32),
        );
    }
    out
}

/// The gradients the backward computes: of q, k, v, and of the parts that are present
/// (memory keys and values, `key_pe`, span `z`).
struct Grads {
    qkv: [CubeTensor; 3],
    memory: Option<[CubeTensor; 2]>,
    key_pe: Option<CubeTensor>,
    span_z: Option<CubeTensor>,
}

/// The backward on Cube tensors, from the forward's output and its gradient (both
/// `[heads, n, d + 1]`).
fn backward(c: &Call, out: CubeTensor, grad: CubeTensor) -> Grads {
    let [out, grad] = [out, grad].map(into_contiguous);
    let (heads, n, d, f) = (c.heads, c.n, c.flags.d, c.flags);
    assert!(
        dims3(&out) == [heads, n, d + 1] && dims3(&grad) == [heads, n, d + 1],
        "tiled_attention on Cube: the output and its gradient must be [{heads}, {n}, {}]",
        d + 1
    );
    let new = |shape: Vec<usize>| empty_like(&c.q, shape);
    let placeholder = || new(vec![1]);
    let (dq, dk, dv) = (
        new(vec![heads, n, d]),
        new(vec![heads, c.nk, d]),
        new(vec![heads, c.nk, d]),
    );
    // The output gradient without the log-sum-exp column, as vectors (the query pass writes it).
    let go = new(vec![heads, n, d]);
    let delta = new(vec![heads, n]);
    let dz_rows = if f.span {
        new(vec![heads, n])
    } else {
        placeholder()
    };
    let [dmk, dmv] = if f.memory {
        [new(vec![heads, c.mem, d]), new(vec![heads, c.mem, d])]
    } else {
        [new(vec![d]), new(vec![d])]
    };
    let client = c.q.client.clone();
    let dtype = dtype_to_storage_type(DType::F32);
    let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
    let (count, dim) = launch_shape(&c.q, heads * n);
    let [fwd_offsets, fwd_items] = &c.lists.fwd;
    // SAFETY: in bounds by construction (module doc, "Bounds").
    unsafe {
        backward_query_kernel::launch_unchecked(
            &client,
            count,
            dim,
            f.line,
            arg(&c.q),
            arg(&c.k),
            arg(&c.v),
            arg(&c.mk),
            arg(&c.mv),
            arg(&c.pe),
            arg(&c.z),
            arg(&out),
            arg(&grad),
            arg(fwd_offsets),
            arg(fwd_items),
            arg(&c.win),
            arg(&dq),
            arg(&go),
            arg(&delta),
            arg(&dz_rows),
            c.lists.block,
            c.lists.n_heads,
            c.lists.group_heads,
            c.seed,
            c.threshold,
            c.keep,
            c.ramp,
            f,
            dtype,
        );
    }
    let (count, dim) = launch_shape(&c.q, heads * c.nk);
    let [bwd_offsets, bwd_items] = &c.lists.bwd;
    // SAFETY: in bounds by construction (module doc, "Bounds").
    unsafe {
        backward_key_kernel::launch_unchecked(
            &client,
            count,
            dim,
            f.line,
            arg(&c.q),
            arg(&c.k),
            arg(&c.v),
            arg(&c.pe),
            arg(&c.z),
            arg(&out),
            arg(&go),
            arg(&delta),
            arg(bwd_offsets),
            arg(bwd_items),
            arg(&c.win),
            arg(&dk),
            arg(&dv),
            c.lists.block,
            c.lists.n_heads,
            c.lists.group_heads,
            c.seed,
            c.threshold,
            c.keep,
            c.ramp,
            f,
            dtype,
        );
    }
    if f.memory {
        let (count, dim) = launch_shape(&c.q, heads * c.mem);
        // SAFETY: in bounds by construction (module doc, "Bounds").
        unsafe {
            backward_memory_kernel::launch_unchecked(
                &client,
                count,
                dim,
                f.line,
                arg(&c.q),
                arg(&c.mk),
                arg(&c.mv),
                arg(&out),
                arg(&go),
                arg(&delta),
                arg(&c.win),
                arg(&dmk),
                arg(&dmv),
                c.seed,
                c.threshold,
                c.keep,
                f,
                dtype,
            );
        }
    }
    let key_pe = f.relative.then(|| {
        let part = new(vec![heads, d, c.span]);
        let (count, dim) = launch_shape(&c.q, heads * c.span);
        // SAFETY: in bounds by construction (module doc, "Bounds").
        unsafe {
            backward_position_kernel::launch_unchecked(
                &client,
                count,
                dim,
                f.line,
                arg(&c.q),
                arg(&c.k),
                arg(&c.v),
                arg(&c.pe),
                arg(&c.z),
                arg(&out),
                arg(&go),
                arg(&delta),
                arg(&c.win),
                arg(&part),
                c.seed,
                c.threshold,
                c.keep,
                c.ramp,
                f,
                dtype,
            );
        }
        shared_sum(&part, 1, 1, vec![d, c.span])
    });
    let memory = f.memory.then(|| {
        let mem_heads = dims3(&c.mk)[0];
        [&dmk, &dmv].map(|part| shared_sum(part, mem_heads, 1, vec![mem_heads, c.mem, d]))
    });
    let span_z = f.span.then(|| {
        let span_heads = c.z.shape().num_elements();
        shared_sum(&dz_rows, span_heads, n, vec![span_heads])
    });
    Grads {
        qkv: [dq, dk, dv],
        memory,
        key_pe,
        span_z,
    }
}

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
    use crate::test_util::wgpu;
    use burn::tensor::{Device, Tensor, TensorData};

    /// The Cube kernels' dropout mask for `[heads, n, width]` weights (key `t` of flattened
    /// row `r`: context key `t < n`, memory slot `t − n`).
    fn cube_mask(p: f32, seed: u32, [heads, n, width]: [usize; 3], device: &Device) -> Tensor<3> {
        let mask: Vec<f32> = (0..heads * n * width)
            .map(|i| super::dropout_factor(seed, i / width, i % width, p))
            .collect();
        Tensor::from_data(TensorData::new(mask, [heads, n, width]), device)
    }

    /// The CubeCL kernels on wgpu against softmax attention from tensor ops on the same device:
    /// outputs, log-sum-exps and the gradients of q, k and v, causal and bidirectional, at
    /// lengths 1 to 70 and head widths 8 and 24 (rows read as 4-lane vectors), 6 (2 lanes) and
    /// 3 (scalars), dropout 0 and 0.3 (the reference applies the kernels' hashed mask).
    #[test]
    fn cube_kernels_equal_tensor_ops_in_values_and_gradients() {
        let Some(device) = wgpu() else {
            return;
        };
        let device = device.autodiff();
        let heads = 3;
        for (n, d) in [(1usize, 8usize), (5, 24), (70, 8), (9, 6), (11, 3)] {
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

    /// Cached layouts on wgpu ([`cached_cases`]: the query offset, windows with and without
    /// self, masked starts; 70 queries after a cache of 50, 2 cubes of units), dropout 0.3,
    /// against masked tensor ops with the kernels' mask.
    #[test]
    fn cube_cached_layouts_equal_masked_tensor_ops() {
        let Some(device) = wgpu() else {
            return;
        };
        let device = device.autodiff();
        for (name, shape, keys, allowed) in cached_cases(&[(70, 50, 60), (9, 4, 7)]) {
            let name = format!("wgpu {name}");
            check_on(&device, &cube_mask, shape, keys, allowed, (0.3, 9), &name);
        }
    }

    /// All-attention's kernels on wgpu (persistent slots, relative positions, adaptive span,
    /// with dropout 0.3) against its reference from tensor ops on the same device with the
    /// kernels' mask ([`check_all_attention_on`]).
    #[test]
    fn cube_all_attention_kernels_equal_masked_tensor_ops() {
        let Some(device) = wgpu() else {
            return;
        };
        check_all_attention_on(&device.autodiff(), &cube_mask, "wgpu");
    }
}
