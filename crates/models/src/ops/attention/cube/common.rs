//! What the kernels share, on the device: the dropout hash, rows of `d` values held in
//! registers as vectors (load, gather, dot products, accumulate, store), a query row's walk
//! over its keys ([`QueryKeys`]), the adaptive span's ramp, and the comptime [`Flags`].

use cubecl::prelude::*;

/// The dropout factor of weight `(row, key)` (`row` the flattened query row `head · n + i`):
/// `keep` (= `1 / (1 − p)`) when a 32-bit hash of `(seed, row, key)` is at least `threshold`
/// (= `p · 2³²`), else 0. Two rounds of Wellons' `lowbias32` (32-bit: WGSL has no 64-bit
/// integers), so the masks differ from flex's (a SplitMix64 of the flat index); the backward
/// regenerates the same mask. [`dropout_factor`] is the host twin the tests build masks from.
#[cube]
pub(crate) fn dropout_factor_cube<F: Float>(
    seed: u32,
    row: usize,
    key: usize,
    threshold: u32,
    keep: F,
) -> F {
    let bits = lowbias32(lowbias32(seed ^ (row as u32 * 0x9e37_79b9u32)) ^ key as u32);
    let mut factor = keep;
    if bits < threshold {
        factor = F::new(0.0);
    }
    factor
}

#[cube]
pub(crate) fn lowbias32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16;
    x *= 0x7feb_352du32;
    x ^= x >> 15;
    x *= 0x846c_a68bu32;
    x ^ (x >> 16)
}

/// Host twin of the kernels' dropout factor (for the tests' reference masks).
#[cfg(test)]
pub(crate) fn dropout_factor(seed: u32, row: usize, key: usize, p: f32) -> f32 {
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
pub(crate) fn threshold(p: f32) -> u32 {
    (f64::from(p) * 4_294_967_296.0).min(4_294_967_295.0) as u32
}

/// The head group of flattened head `head`: `(head mod n_heads) / group_heads`.
#[cube]
pub(crate) fn group_of(head: usize, n_heads: u32, group_heads: u32) -> usize {
    (head % n_heads as usize) / group_heads as usize
}

/// A row of `d` values as `d / line` vectors of `line` lanes (`line` divides `d`: 4, 2 or 1),
/// so a unit reads a row of `q`, `k`, `v`, the persistent vectors or the output gradient with
/// `d / line` vector loads rather than `d` scalar ones.
pub(crate) type Row<F, N> = Array<Vector<F, N>>;

/// `row[c] = t[base + c]` (vector indices): a row a unit reuses for every key (or query) it
/// visits, read from global memory once and kept in registers (the loops over the row are
/// unrolled, so the array's indices are constants). `t` holds elements of type `E` (the
/// model's precision for `q`, `k`, `v`), the row `F` (f32): every sum runs in f32.
#[cube]
pub(crate) fn load_row<E: Float, F: Float, N: Size>(
    row: &mut Row<F, N>,
    t: &Tensor<Vector<E, N>>,
    base: usize,
    #[comptime] w: usize,
) {
    #[unroll]
    for c in 0..w {
        row[c] = Vector::cast_from(t[base + c]);
    }
}

/// `row` from `w · line` consecutive scalars of `t` from `base` (rows of the forward's
/// `[heads, n, d + 1]` output and of its gradient, whose stride does not keep vectors aligned).
#[cube]
pub(crate) fn gather_row<F: Float, N: Size>(
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
pub(crate) fn zeros<F: Float, N: Size>(#[comptime] w: usize) -> Row<F, N> {
    let mut acc = Array::<Vector<F, N>>::new(w);
    #[unroll]
    for c in 0..w {
        acc[c] = Vector::new(F::new(0.0));
    }
    acc
}

/// The sum of a vector's lanes.
#[cube]
pub(crate) fn lanes<F: Float, N: Size>(x: Vector<F, N>, #[comptime] line: usize) -> F {
    let mut s = F::new(0.0);
    #[unroll]
    for i in 0..line {
        s += x.extract(i);
    }
    s
}

/// `Σ_c a[c] · b[bb + c]` (`a` a row in registers; `b`'s elements read as `F`).
#[cube]
pub(crate) fn dot_row<E: Float, F: Float, N: Size>(
    a: &Row<F, N>,
    b: &Tensor<Vector<E, N>>,
    bb: usize,
    #[comptime] w: usize,
    #[comptime] line: usize,
) -> F {
    let mut s = Vector::<F, N>::new(F::new(0.0));
    #[unroll]
    for c in 0..w {
        s += a[c] * Vector::<F, N>::cast_from(b[bb + c]);
    }
    lanes(s, line)
}

/// `Σ_c a[c] · b[c]` (two rows in registers).
#[cube]
pub(crate) fn dot_rows<F: Float, N: Size>(
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
pub(crate) struct QueryKeys<F: Float> {
    pub(crate) head: usize,
    /// The query's key position: `row`, or `s + row` after a cached layer's `s` positions.
    pub(crate) p: usize,
    /// The window's smallest distance (0 without a cache) and the end of the keys the row
    /// sees when causal (`p + 1 − dmin`).
    pub(crate) dmin: usize,
    pub(crate) hi: usize,
    pub(crate) list: usize,
    pub(crate) block: usize,
    pub(crate) z: F,
    pub(crate) lo: usize,
    pub(crate) lo_step: usize,
}

/// Keys `first..end` of one listed key block.
#[derive(CubeType)]
pub(crate) struct KeyRun {
    pub(crate) first: usize,
    pub(crate) end: usize,
}

#[cube]
impl<F: Float> QueryKeys<F> {
    /// Query row `pos` (flattened) of `n` queries over `nk` keys (`win`: a cached layer's
    /// window, read when `cached`; see `Call::win`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
    pub(crate) fn run(
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
pub(crate) fn first_in_step(row: usize) -> usize {
    row - row.min(UNIT_POS as usize)
}

/// `a − b`, or 0 when `b > a`.
#[cube]
pub(crate) fn sub_or_zero(a: usize, b: usize) -> usize {
    a - a.min(b)
}

/// The adaptive span's ratio `((z − δ) + ramp) / ramp` at distance `δ = row − key` (its
/// weight is the ratio clamped to `[0, 1]`; its gradient in `z` passes where the ratio is
/// inside `[0, 1]`). `δ` is negative for later keys of bidirectional attention (weight 1).
#[cube]
pub(crate) fn span_ratio<F: Float>(z: F, ramp: F, row: usize, key: usize) -> F {
    let delta = F::cast_from(row as u32) - F::cast_from(key as u32);
    ((z - delta) + ramp) / ramp
}

/// The largest distance a key can sit from its query and keep a non-zero span weight, plus
/// one (a margin for rounding; the weight of a key past the ramp is 0 anyway).
#[cube]
pub(crate) fn span_reach<F: Float>(z: F, ramp: F) -> usize {
    u32::cast_from(F::floor(F::max(z + ramp, F::new(0.0)))) as usize + 1
}

/// Flattened head `head`'s span `z` (span head `head mod span_heads`).
#[cube]
pub(crate) fn span_of<F: Float>(z: &Tensor<F>, head: usize) -> F {
    z[head % z.shape(0)]
}

/// `acc += x · v[vb..vb + w]` (`v`'s elements read as `F`).
#[cube]
pub(crate) fn accumulate<E: Float, F: Float, N: Size>(
    acc: &mut Row<F, N>,
    x: F,
    v: &Tensor<Vector<E, N>>,
    vb: usize,
    #[comptime] w: usize,
) {
    let x = Vector::<F, N>::new(x);
    #[unroll]
    for c in 0..w {
        acc[c] += x * Vector::<F, N>::cast_from(v[vb + c]);
    }
}

/// `acc += x · row`.
#[cube]
pub(crate) fn accumulate_row<F: Float, N: Size>(
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
pub(crate) fn rescale<F: Float, N: Size>(acc: &mut Row<F, N>, corr: F, #[comptime] w: usize) {
    let corr = Vector::<F, N>::new(corr);
    #[unroll]
    for c in 0..w {
        acc[c] *= corr;
    }
}

/// `t[base + c · stride]` for the `d` lanes of `row` (scalar stores).
#[cube]
pub(crate) fn scatter_row<F: Float, N: Size>(
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

/// `t[base + c] = row[c]` (vector stores, rounded to `t`'s element type `E`).
#[cube]
pub(crate) fn store_row<E: Float, F: Float, N: Size>(
    t: &mut Tensor<Vector<E, N>>,
    base: usize,
    row: &Row<F, N>,
    #[comptime] w: usize,
) {
    #[unroll]
    for c in 0..w {
        t[base + c] = Vector::cast_from(row[c]);
    }
}

/// The comptime switches every kernel takes: head width, the vector width `line` of its rows
/// (4, 2 or 1, dividing `d`; the launch's vector size), causality, and which optional parts
/// are on (attention dropout, persistent memory, relative positions, adaptive span).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Flags {
    pub(crate) d: usize,
    pub(crate) line: usize,
    pub(crate) causal: bool,
    pub(crate) dropout: bool,
    pub(crate) memory: bool,
    pub(crate) relative: bool,
    pub(crate) span: bool,
    /// A cached layer's keys: `[cache ; block]` with a window per query (`Call::win`).
    pub(crate) cached: bool,
}

/// `P = exp(s − L)`, capped at `exp(80)` with the adaptive span: `L` normalises the
/// span-masked weights, so a masked-down key may score above it (the cap keeps a fully masked
/// one at `0 · e`, not `0 · ∞`).
#[cube]
pub(crate) fn probability<F: Float>(s: F, lse: F, #[comptime] span: bool) -> F {
    let mut x = s - lse;
    if span {
        x = F::min(x, F::new(80.0));
    }
    F::exp(x)
}

/// One key's `dK` and `dV` terms from query row `qi`: `dS = P ∘ (dP ∘ mask − Δ)` and
/// `P ∘ mask` (`e` is `P`, span-weighted where it applies).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_terms<E: Float, F: Float, N: Size>(
    acc_k: &mut Row<F, N>,
    acc_v: &mut Row<F, N>,
    e: F,
    dp: F,
    factor: F,
    dl: F,
    q: &Tensor<Vector<E, N>>,
    go: &Tensor<Vector<F, N>>,
    qb: usize,
    #[comptime] w: usize,
) {
    accumulate(acc_k, e * (dp * factor - dl), q, qb, w);
    accumulate(acc_v, e * factor, go, qb, w);
}
