//! The backward kernel: per tile, probabilities recomputed from the log-sum-exp; dQ per tile,
//! dK / dV and the shared gradients (memory, key_pe, span) summed in a fixed order.

use rayon::prelude::*;

use super::layout::{GROUPS, KeyLayout, Shape};
use super::tiles::{
    Head, Inputs, Range, add_relative, head, range_scores, scratch, span_weight, tile_ranges,
};
use crate::ops::kernel::{Dropout, exp_nonpositive, matmul};

/// One group's running sums of the shared gradients: context dK / dV of its head, memory
/// dK / dV, `d key_pe` and `d z`.
pub(super) struct Sums {
    pub(super) dk: Vec<f32>,
    pub(super) dv: Vec<f32>,
    pub(super) dmk: Vec<f32>,
    pub(super) dmv: Vec<f32>,
    pub(super) dpe: Vec<f32>,
    pub(super) dz: f32,
}

impl Sums {
    pub(super) fn new(shape: Shape) -> Self {
        let Shape { nk, d, mem, .. } = shape;
        Self {
            dk: vec![0.0; nk * d],
            dv: vec![0.0; nk * d],
            dmk: vec![0.0; mem * d],
            dmv: vec![0.0; mem * d],
            dpe: vec![0.0; d * shape.pe_span],
            dz: 0.0,
        }
    }

    /// `self += other`, element by element.
    pub(super) fn add(&mut self, other: &Self) {
        let pairs = [
            (&mut self.dk, &other.dk),
            (&mut self.dv, &other.dv),
            (&mut self.dmk, &other.dmk),
            (&mut self.dmv, &other.dmv),
            (&mut self.dpe, &other.dpe),
        ];
        for (a, b) in pairs {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.dz += other.dz;
    }
}

/// One per-head field of `parts` summed into `count` shared slots of `chunk` elements, head
/// `h` adding to slot `h mod count`, in head order.
pub(super) fn add_per_shared(
    parts: &[Sums],
    field: impl Fn(&Sums) -> &[f32],
    count: usize,
    chunk: usize,
) -> Vec<f32> {
    let mut dst = vec![0.0f32; count * chunk];
    if chunk == 0 {
        return dst;
    }
    for (h, part) in parts.iter().enumerate() {
        let slot = &mut dst[(h % count) * chunk..][..chunk];
        slot.iter_mut().zip(field(part)).for_each(|(x, y)| *x += y);
    }
    dst
}

/// Backward kernel; see [`AttentionBackward::tiled_attention_backward`].
pub(super) fn backward(
    x: Inputs,
    out: &[f32],
    grad: &[f32],
    shape: Shape,
    keys: &KeyLayout,
    dropout: Dropout,
) -> [Vec<f32>; 7] {
    let Shape {
        heads,
        n,
        nk,
        d,
        mem,
        ..
    } = shape;
    let width = d + 1;
    let rows = keys.tile_rows();
    let mut dq = vec![0.0f32; heads * n * d];
    if dq.is_empty() {
        let empty = |len: usize| vec![0.0f32; len];
        return [
            dq,
            empty(heads * nk * d),
            empty(heads * nk * d),
            empty(x.mk.len()),
            empty(x.mv.len()),
            empty(x.pe.len()),
            empty(x.z.len()),
        ];
    }
    let tile_count = n.div_ceil(rows);
    let per_group = tile_count.div_ceil(GROUPS);
    let per_head: Vec<Sums> = dq
        .par_chunks_mut(n * d)
        .enumerate()
        .map(|(h, dq)| {
            let x = x.head(h, shape, keys);
            let (out, grad) = (head(out, h, n * width), head(grad, h, n * width));
            // Δ_i = Σ_c dO[i, c] · O[i, c].
            let delta: Vec<f32> = out
                .chunks_exact(width)
                .zip(grad.chunks_exact(width))
                .map(|(o, g)| o[..d].iter().zip(&g[..d]).map(|(a, b)| a * b).sum())
                .collect();
            let partials: Vec<Sums> = dq
                .par_chunks_mut(per_group * rows * d)
                .enumerate()
                .map(|(g, dq)| {
                    let mut sums = Sums::new(shape);
                    for (t, dq) in dq.chunks_mut(rows * d).enumerate() {
                        let tile = ((g * per_group + t) * rows, dq.len() / d);
                        let ranges = tile_ranges(&x, tile, shape, keys);
                        let saved = [out, grad, &delta];
                        backward_tile(&x, saved, dq, &mut sums, tile, &ranges, shape, dropout);
                    }
                    sums
                })
                .collect();
            let mut partials = partials.into_iter();
            let mut sums = partials.next().expect("at least one group");
            for part in partials {
                sums.add(&part);
            }
            sums
        })
        .collect();
    let mut dk = Vec::with_capacity(heads * nk * d);
    let mut dv = Vec::with_capacity(heads * nk * d);
    for sums in &per_head {
        dk.extend_from_slice(&sums.dk);
        dv.extend_from_slice(&sums.dv);
    }
    // Memory heads and span heads are shared by every batch row: sum in head order.
    let (dmk, dmv) = if mem == 0 {
        (vec![0.0; x.mk.len()], vec![0.0; x.mv.len()])
    } else {
        (
            add_per_shared(&per_head, |s| &s.dmk, shape.mem_heads, mem * d),
            add_per_shared(&per_head, |s| &s.dmv, shape.mem_heads, mem * d),
        )
    };
    let dpe = add_per_shared(&per_head, |s| &s.dpe, 1, d * shape.pe_span);
    let mut dz = vec![0.0f32; shape.span_heads];
    for (h, sums) in per_head.iter().enumerate() {
        if let Some(z) = dz.get_mut(h % shape.span_heads.max(1)) {
            *z += sums.dz;
        }
    }
    [dq, dk, dv, dmk, dmv, dpe, dz]
}

/// One backward tile: writes the tile's `dq` rows (zeroed) and adds its terms to this group's
/// running sums.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_tile(
    x: &Head,
    [out, grad, delta]: [&[f32]; 3],
    dq: &mut [f32],
    sums: &mut Sums,
    (start, len): (usize, usize),
    ranges: &[Range],
    shape: Shape,
    dropout: Dropout,
) {
    let d = shape.d;
    let width = d + 1;
    let q_tile = &x.q[start * d..];
    let grad_tile = &grad[start * width..];
    let mut p = scratch(len, ranges);
    let mut dp = scratch(len, ranges);
    let mut rel = vec![];
    for &range in ranges {
        let kl = range.len;
        let (p, dp) = (&mut p[..len * kl], &mut dp[..len * kl]);
        let relative = range_scores(x, (start, len), range, shape, p, &mut rel);
        let (k, v) = x.source(range, d);
        // dP = dO_tile · V_rangeᵀ.
        matmul(
            (len, kl, d),
            dp,
            kl,
            false,
            grad_tile,
            (width, 1),
            v,
            (1, d),
        );
        score_gradients(
            x,
            (start, range, shape),
            (out, delta),
            (p, dp),
            relative.map(|(lo, w)| (lo, w, rel.as_slice())),
            &mut sums.dz,
            dropout,
        );
        let (ds, p) = (&*dp, &*p);
        // dQ_tile += dS · K_range.
        matmul((len, d, kl), dq, d, true, ds, (kl, 1), k, (d, 1));
        // dK_range += dSᵀ · Q_tile; dV_range += Pᵀ · dO_tile.
        let (dk, dv) = if range.memory {
            (&mut sums.dmk, &mut sums.dmv)
        } else {
            (&mut sums.dk, &mut sums.dv)
        };
        let at = range.first * d;
        matmul(
            (kl, d, len),
            &mut dk[at..],
            d,
            true,
            ds,
            (1, kl),
            q_tile,
            (d, 1),
        );
        matmul(
            (kl, d, len),
            &mut dv[at..],
            d,
            true,
            p,
            (1, kl),
            grad_tile,
            (width, 1),
        );
        if let Some((lo, w)) = relative {
            relative_gradients(
                x,
                (start, len),
                range,
                shape,
                (lo, w),
                ds,
                &mut rel,
                dq,
                sums,
            );
        }
    }
}

/// One tile's probabilities and score gradients for one key range, row by row: `P` from the
/// scores and `L` (span-masked, with dropout for dV), `dS = P ∘ (dP − Δ)` in `dp` (dropout on
/// `dP` first), and the span gradient added to `dz`. `p` holds the scores on entry, `dp` the
/// product `dO · Vᵀ`; both `[rows, range.len]`.
fn score_gradients(
    x: &Head,
    (start, range, shape): (usize, Range, Shape),
    (out, delta): (&[f32], &[f32]),
    (p, dp): (&mut [f32], &mut [f32]),
    relative: Option<(usize, usize, &[f32])>,
    dz: &mut f32,
    dropout: Dropout,
) {
    let (d, kl) = (shape.d, range.len);
    let width = d + 1;
    for (i, (p, dp)) in p
        .chunks_exact_mut(kl)
        .zip(dp.chunks_exact_mut(kl))
        .enumerate()
    {
        let r = start + i;
        let (a, b) = range.visible(r, x, shape);
        let lse = out[r * width + d];
        let base = range.mask_base(x.h, r, shape);
        p[..a].fill(0.0);
        p[b..].fill(0.0);
        let seen = &mut p[a..b];
        if let (Some((lo, w, rel)), false) = (relative, seen.is_empty()) {
            add_relative(seen, &rel[i * w..][..w], range.nearest(r, a, lo, shape));
        }
        if x.z.is_some() && !range.memory {
            // With the span mask, L normalises the masked weights: a masked-down key can
            // score above L, beyond `exp_nonpositive`'s domain (capped so that a fully
            // masked one gives 0 · e, not 0 · ∞).
            for s in seen.iter_mut() {
                *s = (*s - lse).min(80.0).exp();
            }
        } else {
            for s in seen.iter_mut() {
                *s = exp_nonpositive(*s - lse);
            }
        }
        // dP ∘ mask · scale; then dS = P ∘ (dP − Δ), with P the masked weights.
        dropout.apply_at(dp, base);
        match (x.z, range.memory) {
            (Some(z), false) => {
                for (j, (e, g)) in seen.iter_mut().zip(dp[a..b].iter_mut()).enumerate() {
                    let (m, passes) = span_weight(z, shape.ramp, range.distance(r, a + j, shape));
                    let diff = *g - delta[r];
                    if passes {
                        *dz += *e * diff / shape.ramp;
                    }
                    *e *= m;
                    *g = *e * diff;
                }
                dp[..a].fill(0.0);
                dp[b..].fill(0.0);
            }
            _ => {
                for (g, &e) in dp.iter_mut().zip(p.iter()) {
                    *g = e * (*g - delta[r]);
                }
            }
        }
        // P turns into the dropped weights for dV.
        dropout.apply_at(p, base);
    }
}

/// The relative-position term's gradients for one key range: `dRel[i, δ − lo] = dS[i, j]` for
/// the key at distance `δ`, then `dQ_tile += dRel · key_pe[:, lo..]ᵀ` and
/// `d key_pe[:, lo..] += Q_tileᵀ · dRel`.
#[allow(clippy::too_many_arguments)]
fn relative_gradients(
    x: &Head,
    (start, len): (usize, usize),
    range: Range,
    shape: Shape,
    (lo, w): (usize, usize),
    ds: &[f32],
    rel: &mut [f32],
    dq: &mut [f32],
    sums: &mut Sums,
) {
    let (d, kl) = (shape.d, range.len);
    let q_tile = &x.q[start * d..];
    // dRel[i, δ − lo] = dS[i, j] for the key at distance δ; then
    // dQ_tile += dRel · key_pe[:, lo..]ᵀ and d key_pe[:, lo..] += Q_tileᵀ · dRel.
    rel.fill(0.0);
    for i in 0..len {
        let r = start + i;
        let (a, b) = range.visible(r, x, shape);
        for j in a..b {
            rel[i * w + range.nearest(r, a, lo, shape) - (j - a)] = ds[i * kl + j];
        }
    }
    let span = shape.pe_span;
    matmul(
        (len, d, w),
        dq,
        d,
        true,
        rel,
        (w, 1),
        &x.pe[lo..],
        (1, span),
    );
    matmul(
        (d, w, len),
        &mut sums.dpe[lo..],
        span,
        true,
        q_tile,
        (1, d),
        rel,
        (w, 1),
    );
}
