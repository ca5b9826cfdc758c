//! The forward: one unit per query row, an online softmax over its keys (context keys,
//! then persistent slots), the output row and its log-sum-exp.

use burn::tensor::DType;
use burn_backend::cubecl::dtype_to_storage_type;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::common::*;
use super::launch::{Call, empty_like, launch_shape};

#[cube(launch_unchecked)]
pub(crate) fn forward_kernel<F: Float, E: Float, N: Size>(
    q: &Tensor<Vector<E, N>>,
    k: &Tensor<Vector<E, N>>,
    v: &Tensor<Vector<E, N>>,
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

/// The forward on Cube tensors: `[heads, n, d + 1]`.
pub(crate) fn forward(c: &Call) -> CubeTensor {
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
            [
                dtype_to_storage_type(DType::F32),
                dtype_to_storage_type(c.elem),
            ],
        );
    }
    out
}
