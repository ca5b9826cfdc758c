//! The backward: the query pass (`Δ`, `dQ`, the span's row shares, the output gradient as
//! vectors) and the key pass (`dK`, `dV` over the queries that see each key), then the
//! all-attention passes of `shared.rs`.

use burn::tensor::DType;
use burn_backend::TensorMetadata;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::common::*;
use super::launch::{Call, dims3, empty_like, empty_like_dtype, launch_shape};
use super::shared::{backward_memory_kernel, backward_position_kernel, shared_sum};

/// The query pass: one unit per query row, `Δ = rowsum(dO ∘ O)`, `dQ`, the row's share of the
/// span gradient, and the row's output gradient copied out as `[heads, n, d]` vectors (`go`)
/// for the other passes.
#[cube(launch_unchecked)]
pub(crate) fn backward_query_kernel<F: Float, E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    mk: &Tensor<Vector<F, N>>,
    mv: &Tensor<Vector<F, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    out: &Tensor<F>,
    grad: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    win: &Tensor<u32>,
    dq: &mut Tensor<Vector<E, N>>,
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
    #[define(F, E)] _dtypes: [ElemType; 2],
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

/// The key pass: one unit per context key, `dK` and `dV` over the queries that see it.
#[cube(launch_unchecked)]
pub(crate) fn backward_key_kernel<F: Float, E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
    pe: &Tensor<F>,
    z: &Tensor<F>,
    out: &Tensor<F>,
    go: &Tensor<Vector<F, N>>,
    delta: &Tensor<F>,
    offsets: &Tensor<u32>,
    items: &Tensor<u32>,
    win: &Tensor<u32>,
    dk: &mut Tensor<Vector<E, N>>,
    dv: &mut Tensor<Vector<E, N>>,
    block: u32,
    n_heads: u32,
    group_heads: u32,
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

/// The gradients the backward computes: of q, k, v, and of the parts that are present
/// (memory keys and values, `key_pe`, span `z`).
pub(crate) struct Grads {
    pub(crate) qkv: [CubeTensor; 3],
    pub(crate) memory: Option<[CubeTensor; 2]>,
    pub(crate) key_pe: Option<CubeTensor>,
    pub(crate) span_z: Option<CubeTensor>,
}

/// The backward on Cube tensors, from the forward's output and its gradient (both
/// `[heads, n, d + 1]`).
pub(crate) fn backward(c: &Call, out: CubeTensor, grad: CubeTensor) -> Grads {
    let [out, grad] = [out, grad].map(into_contiguous);
    let (heads, n, d, f) = (c.heads, c.n, c.flags.d, c.flags);
    assert!(
        dims3(&out) == [heads, n, d + 1] && dims3(&grad) == [heads, n, d + 1],
        "tiled_attention on Cube: the output and its gradient must be [{heads}, {n}, {}]",
        d + 1
    );
    let new = |shape: Vec<usize>| empty_like(&c.q, shape);
    let placeholder = || new(vec![1]);
    // In the inputs' precision (the sums behind them run in f32).
    let (dq, dk, dv) = (
        empty_like_dtype(&c.q, vec![heads, n, d], c.elem),
        empty_like_dtype(&c.q, vec![heads, c.nk, d], c.elem),
        empty_like_dtype(&c.q, vec![heads, c.nk, d], c.elem),
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
    let dtype = [
        dtype_to_storage_type(DType::F32),
        dtype_to_storage_type(c.elem),
    ];
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
