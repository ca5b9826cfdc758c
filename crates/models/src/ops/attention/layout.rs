//! Which keys each query sees ([`KeyLayout`]: dense, block-sparse or a cached layer's window)
//! and the flex kernels' tiling: tile and key-block sizes, the operands' [`Shape`].

use std::sync::Arc;

/// Query rows per tile.
pub(super) const TILE: usize = 64;

/// Keys per block: a `[TILE, KEYS]` score block is 64 KB, well inside L2.
pub(super) const KEYS: usize = 256;

/// Groups of query tiles whose dK / dV partial sums the backward adds in a fixed order.
pub(super) const GROUPS: usize = 8;

/// Heads (batch × heads, flattened), query rows and context keys, head width, causality and a
/// cached layer's window, and all-attention's parts (zero sizes when absent).
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub(super) heads: usize,
    /// Query rows per head.
    pub(super) n: usize,
    /// Context keys per head: `n`, or `s + n` over `[cache ; block]` (query `i` is key `s + i`).
    pub(super) nk: usize,
    pub(super) d: usize,
    pub(super) causal: bool,
    /// The visible distances `δ = offset + i − j` of a causal query: `min_distance..=max_distance`
    /// (`0..=usize::MAX` without a cache).
    pub(super) min_distance: usize,
    pub(super) max_distance: usize,
    /// Persistent vectors per memory head (0: none) and memory heads.
    pub(super) mem: usize,
    pub(super) mem_heads: usize,
    /// Distances `key_pe` covers (0: no relative positions); its column `c` is distance
    /// `c + min_distance`.
    pub(super) pe_span: usize,
    /// Heads of the adaptive span (0: none) and its ramp width.
    pub(super) span_heads: usize,
    pub(super) ramp: f32,
}

impl Shape {
    /// The query row `row`'s key position (`nk − n` keys come before the block).
    pub(super) fn position(&self, row: usize) -> usize {
        self.nk - self.n + row
    }

    /// The context keys `lo..hi` query row `row` sees when its first visible key is `first`
    /// (a masked stream start; 0 otherwise); `lo ≥ hi` when none.
    pub(super) fn window(&self, row: usize, first: usize) -> (usize, usize) {
        if !self.causal {
            return (0, self.nk);
        }
        let p = self.position(row);
        let hi = (p + 1).saturating_sub(self.min_distance).min(self.nk);
        (first.max(p.saturating_sub(self.max_distance)), hi)
    }
}

/// Which keys each query attends to: every key (when causal, every key not after the query),
/// the key blocks a block-sparse pattern lists for the query's block (when causal, again only
/// keys not after the query), or a cached layer's window over `[cache ; block]`. Cheap to
/// clone.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyLayout {
    pub(super) causal: bool,
    pub(super) sparse: Option<Arc<SparseKeys>>,
    pub(super) cached: Option<Arc<CachedKeys>>,
}

/// A cached layer's keys ([`crate::cache`]): `cache` positions before the block, each query's
/// window of distances, and per batch row the first key that is not a masked stream start.
#[derive(Debug, PartialEq)]
pub(super) struct CachedKeys {
    pub(super) cache: usize,
    pub(super) min_distance: usize,
    pub(super) max_distance: usize,
    /// Heads per batch row (flattened head `h` is batch row `h / n_heads`).
    pub(super) n_heads: usize,
    /// Per batch row, the first visible key.
    pub(super) first: Vec<usize>,
}

/// A block-sparse pattern resolved for the kernel.
#[derive(Debug, PartialEq)]
pub(super) struct SparseKeys {
    /// Pattern block size in tokens: the kernel's tile height.
    pub(super) block: usize,
    /// Heads per batch row (the kernel sees `batch · n_heads` flattened heads).
    pub(super) n_heads: usize,
    /// `runs[g][i]`: the key blocks of query block `i` in head group `g` as runs of
    /// consecutive blocks `(first block, count)`, each at most `max(KEYS, block)` keys.
    pub(super) runs: Vec<Vec<Vec<(usize, usize)>>>,
}

impl KeyLayout {
    /// Every key, or every key not after the query when `causal`.
    pub fn dense(causal: bool) -> Self {
        Self {
            causal,
            sparse: None,
            cached: None,
        }
    }

    /// A cached layer's keys: `cache` positions of earlier inputs before a block, each causal
    /// query seeing the keys at distances `min_distance..=max_distance` (not a masked start),
    /// for `n_heads` heads per batch row; `valid[b]` is batch row `b`'s number of valid cache
    /// positions (at the cache's end). The models build it from a cache view
    /// (`CacheView::key_layout`).
    pub fn cached(
        cache: usize,
        (min_distance, max_distance): (usize, usize),
        valid: &[usize],
        n_heads: usize,
    ) -> Self {
        Self {
            causal: true,
            sparse: None,
            cached: Some(Arc::new(CachedKeys {
                cache,
                min_distance,
                max_distance,
                n_heads,
                first: valid
                    .iter()
                    .map(|&valid| cache.saturating_sub(valid))
                    .collect(),
            })),
        }
    }

    /// The first context key flattened head `h` may see (after a masked stream start).
    pub(super) fn first_key(&self, h: usize) -> usize {
        self.cached.as_ref().map_or(0, |c| c.first[h / c.n_heads])
    }

    /// The key blocks of a block-sparse pattern of `block`-token blocks for `n_heads` heads per
    /// batch row: `groups[g][i]` lists (sorted, distinct) the key blocks of query block `i` in
    /// head group `g`, and head `h` uses group `h / (n_heads / groups)`. The models build it
    /// from a pattern (`LayerPattern::key_layout`).
    ///
    /// # Panics
    /// If the head groups do not divide `n_heads`, or a row lacks its own (diagonal) block: every
    /// query needs a key.
    pub fn sparse(block: usize, causal: bool, groups: &[&[Vec<usize>]], n_heads: usize) -> Self {
        let n_groups = groups.len();
        assert!(
            n_groups > 0 && n_heads.is_multiple_of(n_groups),
            "a pattern of {n_groups} head groups for {n_heads} heads"
        );
        let per_run = (KEYS / block).max(1);
        let runs = groups
            .iter()
            .map(|rows| {
                rows.iter()
                    .enumerate()
                    .map(|(i, row)| {
                        assert!(
                            row.binary_search(&i).is_ok(),
                            "row {i} of the pattern lacks its own block; every query needs a key"
                        );
                        let mut runs: Vec<(usize, usize)> = vec![];
                        for &j in row {
                            match runs.last_mut() {
                                Some((first, count))
                                    if *first + *count == j && *count < per_run =>
                                {
                                    *count += 1
                                }
                                _ => runs.push((j, 1)),
                            }
                        }
                        runs
                    })
                    .collect()
            })
            .collect();
        Self {
            causal,
            sparse: Some(Arc::new(SparseKeys {
                block,
                n_heads,
                runs,
            })),
            cached: None,
        }
    }

    /// Query rows per tile.
    pub(super) fn tile_rows(&self) -> usize {
        self.sparse.as_ref().map_or(TILE, |s| s.block)
    }

    /// The key ranges `(first key, count)` the tile `[start, start + len)` of flattened head
    /// `h` walks, in increasing order, none empty, none past `shape.nk`.
    pub(super) fn key_ranges(
        &self,
        h: usize,
        (start, len): (usize, usize),
        shape: Shape,
    ) -> Vec<(usize, usize)> {
        match &self.sparse {
            None => {
                // Windows only move forward with the row: the tile's keys are the first row's
                // window start to the last row's window end.
                let first = self.first_key(h);
                let begin = shape.window(start, first).0;
                let end = shape.window(start + len - 1, first).1;
                (begin..end)
                    .step_by(KEYS)
                    .map(|b| (b, KEYS.min(end - b)))
                    .collect()
            }
            Some(s) => {
                let groups = s.runs.len();
                let group = (h % s.n_heads) / (s.n_heads / groups);
                let row = &s.runs[group][start / s.block];
                row.iter()
                    .map(|&(first, count)| {
                        let from = first * s.block;
                        (
                            from,
                            ((first + count) * s.block)
                                .min(shape.nk)
                                .saturating_sub(from),
                        )
                    })
                    .filter(|&(_, count)| count > 0)
                    .collect()
            }
        }
    }

    /// Checks the layout against the operands' query rows `n` and context keys `nk`, and
    /// returns its window of distances.
    pub(super) fn check(&self, n: usize, nk: usize, heads: usize) -> (usize, usize) {
        if let Some(s) = &self.sparse {
            let blocks = s.runs[0].len();
            assert_eq!(
                blocks,
                n.div_ceil(s.block),
                "tiled_attention: a pattern over {blocks} blocks of {} for {n} tokens",
                s.block
            );
        }
        match &self.cached {
            None => {
                assert_eq!(
                    nk, n,
                    "tiled_attention: {nk} keys for {n} queries without a cache"
                );
                (0, usize::MAX)
            }
            Some(c) => {
                assert!(
                    self.sparse.is_none() && nk == c.cache + n,
                    "tiled_attention: {nk} keys for {n} queries after a cache of {}",
                    c.cache
                );
                assert_eq!(
                    c.first.len() * c.n_heads,
                    heads,
                    "tiled_attention: a cached layout for {} batch rows of {} heads, {heads} heads",
                    c.first.len(),
                    c.n_heads
                );
                (c.min_distance, c.max_distance)
            }
        }
    }
}

/// The `key_pe` columns a layout's visible distances `min..=max` over `nk` keys need: up to the
/// farthest visible distance, column `δ − min`.
pub(super) fn pe_columns(nk: usize, (min_distance, max_distance): (usize, usize)) -> usize {
    max_distance.min(nk.saturating_sub(1)) + 1 - min_distance
}
