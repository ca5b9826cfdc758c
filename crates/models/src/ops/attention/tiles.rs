//! What the forward and backward kernels share: the operands as slices, one head's view,
//! the key ranges a tile walks (context runs, memory slots), span weights and the
//! relative-position logits.

use burn::backend::flex::FlexTensor;

use super::layout::{KEYS, KeyLayout, Shape};
use crate::ops::kernel::{matmul, slice};

/// The kernels' operands as slices.
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) mk: &'a [f32],
    pub(super) mv: &'a [f32],
    pub(super) pe: &'a [f32],
    pub(super) z: &'a [f32],
}

impl<'a> Inputs<'a> {
    pub(super) fn new(t: &'a [FlexTensor; 7]) -> Self {
        let [q, k, v, mk, mv, pe, z] = t.each_ref().map(slice);
        Self {
            q,
            k,
            v,
            mk,
            mv,
            pe,
            z,
        }
    }

    /// Flattened head `h`'s view: its queries, keys and values, its memory head's vectors,
    /// its span and its first visible key under `keys`.
    pub(super) fn head(&self, h: usize, shape: Shape, keys: &KeyLayout) -> Head<'a> {
        let Shape { n, nk, d, mem, .. } = shape;
        let mh = h % shape.mem_heads;
        Head {
            h,
            first: keys.first_key(h),
            q: head(self.q, h, n * d),
            k: head(self.k, h, nk * d),
            v: head(self.v, h, nk * d),
            mk: head(self.mk, mh, mem * d),
            mv: head(self.mv, mh, mem * d),
            pe: self.pe,
            z: (shape.span_heads > 0).then(|| self.z[h % shape.span_heads]),
        }
    }
}

/// One flattened head's operands.
#[derive(Clone, Copy)]
pub(super) struct Head<'a> {
    pub(super) h: usize,
    /// The first context key any query sees (after a masked stream start; else 0).
    pub(super) first: usize,
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    pub(super) mk: &'a [f32],
    pub(super) mv: &'a [f32],
    pub(super) pe: &'a [f32],
    pub(super) z: Option<f32>,
}

impl Head<'_> {
    /// The keys and values a range reads (rows from `first` on).
    pub(super) fn source(&self, range: Range, d: usize) -> (&[f32], &[f32]) {
        let (k, v) = if range.memory {
            (self.mk, self.mv)
        } else {
            (self.k, self.v)
        };
        (&k[range.first * d..], &v[range.first * d..])
    }
}

/// A run of keys one tile walks: context keys `first..first + len`, or memory slots.
#[derive(Clone, Copy, Debug)]
pub(super) struct Range {
    pub(super) first: usize,
    pub(super) len: usize,
    pub(super) memory: bool,
}

impl Range {
    /// For the row `r` seeing the range's keys from `a` on: the column of key `a` relative to
    /// the tile's lowest column `lo` (the index into its row of relative logits).
    pub(super) fn nearest(&self, r: usize, a: usize, lo: usize, shape: Shape) -> usize {
        shape.position(r) - self.first - a - shape.min_distance - lo
    }

    /// The keys `a..b` of the range (indices into it) that query row `r` of head `x` sees
    /// (memory: all of them); `a == b` when none.
    pub(super) fn visible(&self, r: usize, x: &Head, shape: Shape) -> (usize, usize) {
        if self.memory {
            return (0, self.len);
        }
        let (lo, hi) = shape.window(r, x.first);
        let end = self.first + self.len;
        let a = lo.clamp(self.first, end) - self.first;
        let b = hi.clamp(self.first, end) - self.first;
        (a, b.max(a))
    }

    /// The dropout-mask index of row `r`'s weight for the range's first key, in flattened head
    /// `h` (memory slot `s` is key `nk + s`).
    pub(super) fn mask_base(&self, h: usize, r: usize, shape: Shape) -> u64 {
        let Shape { n, nk, mem, .. } = shape;
        let key = if self.memory {
            nk + self.first
        } else {
            self.first
        };
        ((h * n + r) * (nk + mem) + key) as u64
    }

    /// The distance of row `r`'s query to the range's key `j` (context ranges, causal).
    pub(super) fn distance(&self, r: usize, j: usize, shape: Shape) -> f32 {
        shape.position(r) as f32 - (self.first + j) as f32
    }
}

/// The adaptive-span weight of a context key at distance `delta` from its query, and whether
/// its gradient in `z` passes (the ratio inside `[0, 1]`, as Burn's `clamp` lets it).
#[inline(always)]
pub(super) fn span_weight(z: f32, ramp: f32, delta: f32) -> (f32, bool) {
    let ratio = ((z - delta) + ramp) / ramp;
    (ratio.clamp(0.0, 1.0), (0.0..=1.0).contains(&ratio))
}

/// Every key range the tile `[start, start + len)` of head `x` walks: its context ranges less
/// those wholly past the adaptive span, then the memory in runs of [`KEYS`].
pub(super) fn tile_ranges(
    x: &Head,
    (start, len): (usize, usize),
    shape: Shape,
    keys: &KeyLayout,
) -> Vec<Range> {
    let mut ranges: Vec<Range> = keys
        .key_ranges(x.h, (start, len), shape)
        .into_iter()
        .filter(|&(first, count)| match x.z {
            // The tile's smallest distance to the range's last key.
            Some(z) => {
                let nearest = shape.position(start) as f32 - (first + count - 1) as f32;
                (z - nearest) + shape.ramp >= 0.0
            }
            None => true,
        })
        .map(|(first, len)| Range {
            first,
            len,
            memory: false,
        })
        .collect();
    ranges.extend((0..shape.mem.div_ceil(KEYS)).map(|b| Range {
        first: b * KEYS,
        len: KEYS.min(shape.mem - b * KEYS),
        memory: true,
    }));
    ranges
}

/// The `key_pe` columns `lo..=hi` (distance `δ` is column `δ − min_distance`) of the visible
/// pairs between the tile's rows and a context range's keys (`None`: no pair is visible).
pub(super) fn distances(
    (start, len): (usize, usize),
    range: Range,
    shape: Shape,
) -> Option<(usize, usize)> {
    let hi = (shape.position(start + len - 1))
        .checked_sub(range.first)?
        .min(shape.max_distance);
    let lo = (shape.position(start))
        .saturating_sub(range.first + range.len - 1)
        .max(shape.min_distance);
    (lo <= hi).then(|| (lo - shape.min_distance, hi - shape.min_distance))
}

/// Relative-position scores of a tile against a context range: `rel[i, t] = q_i ·
/// key_pe[:, lo + t]` for the columns `lo..=hi`; returns `(lo, width)`.
pub(super) fn relative_logits(
    x: &Head,
    q_tile: &[f32],
    tile: (usize, usize),
    range: Range,
    shape: Shape,
    rel: &mut Vec<f32>,
) -> Option<(usize, usize)> {
    let (lo, hi) = distances(tile, range, shape)?;
    let (len, width, d) = (tile.1, hi - lo + 1, shape.d);
    rel.resize(len * width, 0.0);
    // rel = Q_tile · key_pe[:, lo..=hi]: key_pe[c, δ] at c · span + δ.
    matmul(
        (len, width, d),
        rel,
        width,
        false,
        q_tile,
        (d, 1),
        &x.pe[lo..],
        (shape.pe_span, 1),
    );
    Some((lo, width))
}

/// A tile's scores against one key range: `s = Q_tile · K_rangeᵀ` (`[len, range.len]`) and,
/// for context ranges with relative positions, the relative logits in `rel`; returns their
/// `(lo, width)` (see [`relative_logits`]).
pub(super) fn range_scores(
    x: &Head,
    (start, len): (usize, usize),
    range: Range,
    shape: Shape,
    s: &mut [f32],
    rel: &mut Vec<f32>,
) -> Option<(usize, usize)> {
    let d = shape.d;
    let q_tile = &x.q[start * d..];
    let (k, _) = x.source(range, d);
    // S = Q_tile · K_rangeᵀ: Kᵀ[c, j] = K[j, c], row stride 1, column stride d.
    matmul(
        (len, range.len, d),
        s,
        range.len,
        false,
        q_tile,
        (d, 1),
        k,
        (1, d),
    );
    if range.memory || shape.pe_span == 0 {
        return None;
    }
    relative_logits(x, q_tile, (start, len), range, shape, rel)
}

/// `seen[j] += rel_row[nearest − j]`: the relative term of the row's visible keys, `seen[0]`
/// sitting at column `lo + nearest` (see [`Range::nearest`]).
pub(super) fn add_relative(seen: &mut [f32], rel_row: &[f32], nearest: usize) {
    for (j, s) in seen.iter_mut().enumerate() {
        *s += rel_row[nearest - j];
    }
}

/// Head `h`'s part of a `[heads, ...]` array with `size` elements per head.
pub(super) fn head(t: &[f32], h: usize, size: usize) -> &[f32] {
    &t[h * size..][..size]
}

/// The tiles of `rows` rows each that `n` query rows are cut into: `(first row, row count)`.
pub(super) fn tiles(n: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(rows)).map(move |t| (t * rows, rows.min(n - t * rows)))
}

/// The scratch a tile's ranges need: `[len, keys]` for the widest.
pub(super) fn scratch(len: usize, ranges: &[Range]) -> Vec<f32> {
    vec![0.0f32; len * ranges.iter().map(|r| r.len).max().unwrap_or(0)]
}
