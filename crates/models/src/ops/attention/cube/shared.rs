//! Gradients that heads share: the persistent slots' pass, the relative positions' pass (one
//! unit per head and distance), and their sums over heads in a fixed order.

use burn::tensor::DType;
use burn_backend::TensorMetadata;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::common::*;
use super::launch::{empty_like, launch_shape};

/// The persistent slots' pass: one unit per (flattened head, slot), that head's share of the
/// slot's `dK` and `dV` over all its queries (summed over heads by [`shared_sum_kernel`]).
#[cube(launch_unchecked)]
pub(crate) fn backward_memory_kernel<F: Float, E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
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
    #[define(F, E)] _dtypes: [ElemType; 2],
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
pub(crate) fn backward_position_kernel<F: Float, E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
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
    #[define(F, E)] _dtypes: [ElemType; 2],
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
pub(crate) fn shared_sum_kernel<F: Float>(
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

/// `[shared, ...]` sums of `part` (`[heads, rows, len]`) over the heads `h ≡ s (mod shared)`
/// and the rows, in a fixed order (see [`shared_sum_kernel`]); `shape` is the output's.
pub(crate) fn shared_sum(
    part: &CubeTensor,
    shared: usize,
    rows: usize,
    shape: Vec<usize>,
) -> CubeTensor {
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
