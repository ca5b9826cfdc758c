//! A pattern resolved for one layer: [`LayerPattern`] (the block size and one
//! [`BlockPattern`] per head group), what the sparse mixer, the checker and the fused
//! attention's key layout read.

use std::collections::BTreeSet;

use crate::ops::attention::KeyLayout;

/// The key blocks of every query block for one head group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPattern {
    /// Number of query (and key) blocks.
    pub n_blocks: usize,
    /// Whether queries see only earlier keys (the rows hold no block after the query block).
    pub causal: bool,
    /// For each query block, its key blocks, sorted and distinct.
    pub rows: Vec<Vec<usize>>,
}

/// One layer's pattern: one [`BlockPattern`] per head group (one group = all heads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerPattern {
    /// Block size in tokens.
    pub block: usize,
    /// Head groups in order; head `h` of `n_heads` uses group `h / (n_heads / groups.len())`.
    pub groups: Vec<BlockPattern>,
}

impl LayerPattern {
    /// The fused attention's key layout of this pattern for `n_heads` heads per batch row.
    ///
    /// # Panics
    /// If the head groups do not divide `n_heads`, or a row lacks its own (diagonal) block.
    pub fn key_layout(&self, n_heads: usize) -> KeyLayout {
        let rows: Vec<&[Vec<usize>]> = self.groups.iter().map(|g| g.rows.as_slice()).collect();
        KeyLayout::sparse(self.block, self.groups[0].causal, &rows, n_heads)
    }
}

impl BlockPattern {
    /// A pattern from explicit rows (tests, custom patterns). Rows are sorted and deduplicated;
    /// keys after the query block are dropped when `causal`.
    pub fn from_rows(rows: Vec<Vec<usize>>, causal: bool) -> Self {
        let n_blocks = rows.len();
        let rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.into_iter()
                    .filter(|&j| j < n_blocks && (!causal || j <= i))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .collect();
        BlockPattern {
            n_blocks,
            causal,
            rows,
        }
    }

    /// Longest row: the key blocks every row is padded to in the kernel.
    pub fn max_row(&self) -> usize {
        self.rows.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Whether token `query` may attend token `key` (tokens of `block`-sized blocks, `n` tokens).
    pub fn allows(&self, block: usize, query: usize, key: usize) -> bool {
        (!self.causal || key <= query) && self.rows[query / block].contains(&(key / block))
    }
}

impl LayerPattern {
    /// Longest row over all head groups.
    pub fn max_row(&self) -> usize {
        self.groups
            .iter()
            .map(BlockPattern::max_row)
            .max()
            .unwrap_or(0)
    }

    /// How the kernel groups query blocks: one or two buckets of `(query blocks, key slots)`.
    /// Rows are padded to their bucket's longest row, so a few long rows (global or relay
    /// blocks that see everything) get a bucket of their own instead of inflating every row to
    /// `n_blocks` — which would make the kernel O(n²). The split (by row length) is the one that
    /// minimises the total slots, taken when it saves at least a quarter of them.
    pub fn buckets(&self) -> Vec<(Vec<usize>, usize)> {
        let n = self.groups[0].n_blocks;
        let len: Vec<usize> = (0..n)
            .map(|i| {
                self.groups
                    .iter()
                    .map(|g| g.rows[i].len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| len[i]);
        let longest = order.last().map_or(0, |&i| len[i]);
        let one = n * longest;
        let best = (1..n)
            .map(|s| (s * len[order[s - 1]] + (n - s) * longest, s))
            .min();
        match best {
            Some((cost, s)) if 4 * cost <= 3 * one => {
                let (mut short, mut long) = (order[..s].to_vec(), order[s..].to_vec());
                short.sort_unstable();
                long.sort_unstable();
                vec![(short, len[order[s - 1]]), (long, longest)]
            }
            _ => vec![((0..n).collect(), longest)],
        }
    }

    /// Fraction of the kernel's key-block slots that are padding (rows shorter than their
    /// bucket's longest; see [`buckets`](Self::buckets)).
    pub fn padding_waste(&self) -> f64 {
        let slots: usize = self.groups.len()
            * self
                .buckets()
                .iter()
                .map(|(blocks, k)| blocks.len() * k)
                .sum::<usize>();
        let used: usize = self
            .groups
            .iter()
            .flat_map(|g| g.rows.iter().map(Vec::len))
            .sum();
        if slots == 0 {
            0.0
        } else {
            1.0 - used as f64 / slots as f64
        }
    }

    /// Token-level mask of head group `g` over `n` tokens: `mask[q * n + k]` is true where query
    /// `q` may attend key `k`. O(n²): for tests, references and pictures only.
    pub fn token_mask(&self, g: usize, n: usize) -> Vec<bool> {
        let p = &self.groups[g];
        let mut mask = vec![false; n * n];
        for q in 0..n {
            for &j in &p.rows[q / self.block] {
                for k in j * self.block..((j + 1) * self.block).min(n) {
                    mask[q * n + k] = !p.causal || k <= q;
                }
            }
        }
        mask
    }
}
