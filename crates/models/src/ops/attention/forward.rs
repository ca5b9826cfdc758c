//! The forward kernel: per head and tile, an online softmax over the tile's key ranges;
//! output and row log-sum-exp.

use rayon::prelude::*;

use super::layout::{KeyLayout, Shape};
use super::tiles::{
    Head, Inputs, Range, add_relative, range_scores, scratch, span_weight, tile_ranges, tiles,
};
use crate::ops::kernel::{Dropout, exp_nonpositive, lanes, matmul};

/// Forward kernel; see [`AttentionOps::tiled_attention`].
pub(super) fn forward(x: Inputs, shape: Shape, keys: &KeyLayout, dropout: Dropout) -> Vec<f32> {
    let Shape { heads, n, d, .. } = shape;
    let width = d + 1;
    let rows = keys.tile_rows();
    let mut out = vec![0.0f32; heads * n * width];
    if out.is_empty() {
        return out;
    }
    let work: Vec<(usize, (usize, usize))> = (0..heads)
        .flat_map(|h| tiles(n, rows).map(move |tile| (h, tile)))
        .collect();
    // Split by head, then by tile (a head's last tile may be partial).
    let chunks: Vec<&mut [f32]> = out
        .chunks_mut(n * width)
        .flat_map(|head| head.chunks_mut(rows * width))
        .collect();
    chunks
        .into_par_iter()
        .zip(work)
        .for_each(|(out, (h, tile))| {
            let x = x.head(h, shape, keys);
            let ranges = tile_ranges(&x, tile, shape, keys);
            forward_tile(&x, out, tile, &ranges, shape, dropout);
        });
    out
}

/// One forward tile over `ranges`: `out` is the tile's `[len, d + 1]` output rows, zeroed.
pub(super) fn forward_tile(
    x: &Head,
    out: &mut [f32],
    (start, len): (usize, usize),
    ranges: &[Range],
    shape: Shape,
    dropout: Dropout,
) {
    let d = shape.d;
    let width = d + 1;
    let mut max = vec![f32::NEG_INFINITY; len];
    let mut sum = vec![0.0f32; len];
    let mut s = scratch(len, ranges);
    let mut rel = vec![];
    for &range in ranges {
        let kl = range.len;
        let s = &mut s[..len * kl];
        let relative = range_scores(x, (start, len), range, shape, s, &mut rel);
        for (i, row) in s.chunks_exact_mut(kl).enumerate() {
            let r = start + i;
            let (a, b) = range.visible(r, x, shape);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let seen = &mut row[a..b];
            if seen.is_empty() {
                continue;
            }
            if let Some((lo, w)) = relative {
                add_relative(seen, &rel[i * w..][..w], range.nearest(r, a, lo, shape));
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
            for s in seen.iter_mut() {
                *s = exp_nonpositive(*s - m);
            }
            if let (Some(z), false) = (x.z, range.memory) {
                for (j, e) in seen.iter_mut().enumerate() {
                    *e *= span_weight(z, shape.ramp, range.distance(r, a + j, shape)).0;
                }
            }
            sum[i] += lanes(seen, 0.0, |a, b| a + b);
            dropout.apply_at(seen, range.mask_base(x.h, r, shape) + a as u64);
        }
        // O_tile += P · V_range.
        let (_, v) = x.source(range, d);
        matmul((len, d, kl), out, width, true, s, (kl, 1), v, (d, 1));
    }
    for (i, row) in out.chunks_exact_mut(width).enumerate() {
        // A row that saw no key (a cached layer's masked stream start) stays zero.
        let inv = if sum[i] > 0.0 { 1.0 / sum[i] } else { 0.0 };
        for o in &mut row[..d] {
            *o *= inv;
        }
        row[d] = max[i] + sum[i].ln();
    }
}
