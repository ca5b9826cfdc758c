//! Sparse attention patterns as pure data (no tensors): which key blocks each query block
//! attends to, per layer and per head group.
//!
//! A pattern works at **block granularity**: the sequence is cut into blocks of `block` tokens
//! (the last one possibly short), and for each query block `i` a sorted list of key blocks `j`
//! says where its tokens may look. Every token of block `i` sees every token of block `j` —
//! except, when the pattern is causal, the keys after the query itself. With `block = 1` a
//! pattern is a token-level pattern (tests, small `n`).
//!
//! Every size parameter of a built-in ([`PatternSpec`]) counts **blocks**, not tokens:
//! `window` of width 3 with `block = 64` lets a token see three 64-token blocks.
//!
//! Three combinators give the ways the papers combine patterns (Yun et al. 2020, Child et al.
//! 2019): [`PatternSpec::Union`] within a layer, [`PatternSpec::Heads`] across heads, and
//! alternation across layers with period `p` (the `pattern` list of the sparse mixer: layer `l`
//! uses entry `l mod p`, Yun's `A^1..A^p`). [`check`] tests Yun et al.'s Assumption 1 on the
//! result.

pub mod check;
mod layer;

pub use layer::{BlockPattern, LayerPattern};

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// One attention pattern, as written in TOML (`{ kind = "window", width = 3 }`). Sizes count
/// blocks. The causal flag belongs to the mixer, not to the pattern: a causal mixer drops every
/// key block after the query block (and masks the future inside the query's own block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PatternSpec {
    /// Local band: `width` blocks centred on the query block (causal: the query block and the
    /// `width - 1` before it).
    Window {
        /// Number of key blocks per query block, at least 1.
        width: usize,
    },
    /// Child et al.'s strided pattern (the union of its two heads): the `stride` nearest blocks
    /// on each side and every block a multiple of `stride` away. Keys per row grow as
    /// `stride + n_blocks / stride`, so choose `stride ≈ √n_blocks` (O(n√n) overall).
    Strided {
        /// Distance between the strided columns, at least 1.
        stride: usize,
    },
    /// Child et al.'s fixed pattern: the query's own chunk of `stride` blocks, plus the last
    /// `summary` blocks of every chunk (the summary columns).
    Fixed {
        /// Chunk length, at least 1.
        stride: usize,
        /// Summary blocks at the end of each chunk, 1..=stride.
        summary: usize,
    },
    /// Yun et al.'s STAR: each block sees its two neighbours on a ring (plus itself) and the
    /// relay blocks; relay blocks see everything. Bidirectional: the relays are the last
    /// `relays` blocks; causal: the first ones (a causal query can only see earlier keys).
    Star {
        /// Number of relay blocks, at least 1.
        #[serde(default = "one")]
        relays: usize,
    },
    /// Longformer: a `width` window plus `global` global blocks at the start that see, and are
    /// seen by, every block.
    Global {
        /// Number of global blocks, at least 1.
        global: usize,
        /// Window width in blocks, at least 1.
        width: usize,
    },
    /// The query block plus `per_row` key blocks drawn at random (without replacement) from
    /// those it may see. Seeded: a model rebuilt from its saved config has the same pattern;
    /// layers and head groups draw differently. Rows depend only on the query block (and, when
    /// bidirectional, on `n_blocks`), so a causal prefix keeps its pattern as the sequence grows.
    Random {
        /// Random key blocks per query block.
        per_row: usize,
        /// Seed of the draw.
        #[serde(default)]
        seed: u64,
    },
    /// BigBird: window + global + `random` extra blocks per row drawn from those not already
    /// in the row.
    Bigbird {
        /// Window width in blocks, at least 1.
        width: usize,
        /// Global blocks at the start.
        global: usize,
        /// Random blocks per query block.
        random: usize,
        /// Seed of the random part.
        #[serde(default)]
        seed: u64,
    },
    /// A window with holes: `width` blocks spaced `dilation` apart, centred on the query block
    /// (causal: the query block and `width - 1` earlier ones).
    Dilated {
        /// Number of key blocks per query block, at least 1.
        width: usize,
        /// Spacing between them, at least 1.
        dilation: usize,
    },
    /// Every block (causal: every earlier block). The pattern version of dense attention.
    Dense {},
    /// Within one layer: a block is attended if any member attends it.
    Union {
        /// The patterns to join (none of them `heads`).
        of: Vec<PatternSpec>,
    },
    /// Across heads: the heads are split into `of.len()` equal groups, group `g` using `of[g]`.
    /// Only at the top of a layer's pattern; `n_heads` must be a multiple of `of.len()`.
    Heads {
        /// One pattern per head group (none of them `heads`).
        of: Vec<PatternSpec>,
    },
}

fn one() -> usize {
    1
}

impl PatternSpec {
    /// Short name: the `kind`, with the members of combinators (`union(window+dilated)`).
    pub fn name(&self) -> String {
        let list = |of: &[PatternSpec]| {
            of.iter()
                .map(PatternSpec::name)
                .collect::<Vec<_>>()
                .join("+")
        };
        match self {
            PatternSpec::Window { .. } => "window".into(),
            PatternSpec::Strided { .. } => "strided".into(),
            PatternSpec::Fixed { .. } => "fixed".into(),
            PatternSpec::Star { .. } => "star".into(),
            PatternSpec::Global { .. } => "global".into(),
            PatternSpec::Random { .. } => "random".into(),
            PatternSpec::Bigbird { .. } => "bigbird".into(),
            PatternSpec::Dilated { .. } => "dilated".into(),
            PatternSpec::Dense {} => "dense".into(),
            PatternSpec::Union { of } => format!("union({})", list(of)),
            PatternSpec::Heads { of } => format!("heads({})", list(of)),
        }
    }

    /// Number of head groups this pattern asks for (1 unless it is `heads`).
    pub fn head_groups(&self) -> usize {
        match self {
            PatternSpec::Heads { of } => of.len(),
            _ => 1,
        }
    }

    /// Check the parameters; `field` is the TOML path of this pattern for the error message.
    pub fn validate(&self, field: &str) -> Result<(), ModelError> {
        let at_least_one = |key: &str, value: usize| {
            if value == 0 {
                Err(ModelError::invalid(
                    format!("{field}.{key}"),
                    0,
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        match self {
            PatternSpec::Window { width } => at_least_one("width", *width),
            PatternSpec::Strided { stride } => at_least_one("stride", *stride),
            PatternSpec::Fixed { stride, summary } => {
                at_least_one("stride", *stride)?;
                at_least_one("summary", *summary)?;
                if summary > stride {
                    return Err(ModelError::invalid(
                        format!("{field}.summary"),
                        summary,
                        format!("at most stride = {stride} (the summary blocks end each chunk)"),
                    ));
                }
                Ok(())
            }
            PatternSpec::Star { relays } => at_least_one("relays", *relays),
            PatternSpec::Global { global, width } => {
                at_least_one("global", *global)?;
                at_least_one("width", *width)
            }
            PatternSpec::Random { .. } | PatternSpec::Dense {} => Ok(()),
            PatternSpec::Bigbird { width, .. } => at_least_one("width", *width),
            PatternSpec::Dilated { width, dilation } => {
                at_least_one("width", *width)?;
                at_least_one("dilation", *dilation)
            }
            PatternSpec::Union { of } | PatternSpec::Heads { of } => {
                if of.is_empty() {
                    return Err(ModelError::invalid(
                        format!("{field}.of"),
                        "[]",
                        "list at least one pattern",
                    ));
                }
                for (i, p) in of.iter().enumerate() {
                    if matches!(p, PatternSpec::Heads { .. }) {
                        return Err(ModelError::invalid(
                            format!("{field}.of[{i}].kind"),
                            "\"heads\"",
                            "`heads` splits a whole layer's heads; use it only at the top of \
                             a layer's pattern",
                        ));
                    }
                    p.validate(&format!("{field}.of[{i}]"))?;
                }
                Ok(())
            }
        }
    }

    /// Resolve the pattern for `n_blocks` blocks of `block` tokens in layer `layer` (the layer
    /// index salts the random draws). Call [`validate`](Self::validate) first.
    pub fn build(&self, n_blocks: usize, block: usize, causal: bool, layer: usize) -> LayerPattern {
        let groups = match self {
            PatternSpec::Heads { of } => of
                .iter()
                .enumerate()
                .map(|(g, p)| p.block_pattern(n_blocks, causal, salt(layer, g)))
                .collect(),
            p => vec![p.block_pattern(n_blocks, causal, salt(layer, 0))],
        };
        LayerPattern { block, groups }
    }

    fn block_pattern(&self, n: usize, causal: bool, salt: u64) -> BlockPattern {
        let rows = (0..n)
            .map(|i| {
                let mut row = self.row(i, n, causal, salt);
                if causal {
                    row.retain(|&j| j <= i);
                }
                row.into_iter().collect()
            })
            .collect();
        BlockPattern {
            n_blocks: n,
            causal,
            rows,
        }
    }

    /// Key blocks of query block `i` of `n` (before the causal cut, except where the pattern's
    /// shape itself depends on causality).
    fn row(&self, i: usize, n: usize, causal: bool, salt: u64) -> BTreeSet<usize> {
        match self {
            PatternSpec::Window { width } => window(i, n, *width, 1, causal),
            PatternSpec::Dilated { width, dilation } => window(i, n, *width, *dilation, causal),
            PatternSpec::Strided { stride } => (0..n)
                .filter(|&j| {
                    let d = i.abs_diff(j);
                    d < *stride || d.is_multiple_of(*stride)
                })
                .collect(),
            PatternSpec::Fixed { stride, summary } => (0..n)
                .filter(|&j| j / stride == i / stride || j % stride >= stride - summary)
                .collect(),
            PatternSpec::Star { relays } => star(i, n, *relays, causal),
            PatternSpec::Global { global, width } => {
                let mut row = window(i, n, *width, 1, causal);
                add_global(&mut row, i, n, *global);
                row
            }
            PatternSpec::Random { per_row, seed } => {
                let mut row = BTreeSet::from([i]);
                add_random(&mut row, i, n, causal, *per_row, seed ^ salt);
                row
            }
            PatternSpec::Bigbird {
                width,
                global,
                random,
                seed,
            } => {
                let mut row = window(i, n, *width, 1, causal);
                add_global(&mut row, i, n, *global);
                add_random(&mut row, i, n, causal, *random, seed ^ salt);
                row
            }
            PatternSpec::Dense {} => (0..n).collect(),
            PatternSpec::Union { of } | PatternSpec::Heads { of } => of
                .iter()
                .enumerate()
                .flat_map(|(k, p)| p.row(i, n, causal, salt.wrapping_add(k as u64 + 1)))
                .collect(),
        }
    }
}

/// `width` blocks spaced `step` apart: centred on `i`, or ending at `i` when causal.
fn window(i: usize, n: usize, width: usize, step: usize, causal: bool) -> BTreeSet<usize> {
    let (before, after) = if causal {
        (width - 1, 0)
    } else {
        ((width - 1) / 2, width / 2)
    };
    let first = i as isize - (before * step) as isize;
    (0..=before + after)
        .map(|m| first + (m * step) as isize)
        .filter(|&j| j >= 0 && (j as usize) < n)
        .map(|j| j as usize)
        .collect()
}

fn add_global(row: &mut BTreeSet<usize>, i: usize, n: usize, global: usize) {
    let global = global.min(n);
    if i < global {
        row.extend(0..n);
    } else {
        row.extend(0..global);
    }
}

fn star(i: usize, n: usize, relays: usize, causal: bool) -> BTreeSet<usize> {
    let relays = relays.min(n);
    // Relays first when causal (so that everybody can see them), last otherwise.
    let (relay_range, ring) = if causal {
        (0..relays, relays..n)
    } else {
        (n - relays..n, 0..n - relays)
    };
    if relay_range.contains(&i) {
        return (0..n).collect();
    }
    let m = ring.len();
    let k = i - ring.start;
    let mut row: BTreeSet<usize> = relay_range.collect();
    row.insert(i);
    if causal {
        // No wrap-around: the ring's far end lies in the future.
        if k > 0 {
            row.insert(i - 1);
        }
    } else {
        row.insert(ring.start + (k + m - 1) % m);
        row.insert(ring.start + (k + 1) % m);
    }
    row
}

/// Add `count` key blocks of query `i` not yet in `row`, drawn without replacement from those it
/// may see, with a generator seeded by `(seed, i)` only.
fn add_random(
    row: &mut BTreeSet<usize>,
    i: usize,
    n: usize,
    causal: bool,
    count: usize,
    seed: u64,
) {
    let limit = if causal { i + 1 } else { n };
    let candidates: Vec<usize> = (0..limit).filter(|j| !row.contains(j)).collect();
    let count = count.min(candidates.len());
    // Floyd's algorithm: `count` distinct indices into `candidates`.
    let mut state = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut picked = BTreeSet::new();
    for top in candidates.len() - count..candidates.len() {
        let t = (splitmix64(&mut state) % (top as u64 + 1)) as usize;
        if !picked.insert(t) {
            picked.insert(top);
        }
    }
    row.extend(picked.into_iter().map(|t| candidates[t]));
}

fn salt(layer: usize, group: usize) -> u64 {
    let mut state = ((layer as u64) << 32) ^ group as u64 ^ 0x5EED;
    splitmix64(&mut state)
}

/// SplitMix64: a small, well-mixed generator; enough to draw patterns reproducibly.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(spec: &PatternSpec, n: usize, causal: bool) -> Vec<Vec<usize>> {
        spec.validate("pattern").unwrap();
        spec.build(n, 1, causal, 0).groups[0].rows.clone()
    }

    #[test]
    fn builtins_have_the_documented_rows() {
        assert_eq!(
            rows(&PatternSpec::Window { width: 3 }, 4, false),
            vec![vec![0, 1], vec![0, 1, 2], vec![1, 2, 3], vec![2, 3]]
        );
        assert_eq!(
            rows(&PatternSpec::Window { width: 3 }, 4, true),
            vec![vec![0], vec![0, 1], vec![0, 1, 2], vec![1, 2, 3]]
        );
        assert_eq!(
            rows(&PatternSpec::Strided { stride: 3 }, 8, true)[7],
            vec![1, 4, 5, 6, 7]
        );
        assert_eq!(
            rows(
                &PatternSpec::Fixed {
                    stride: 4,
                    summary: 1
                },
                8,
                false
            )[1],
            vec![0, 1, 2, 3, 7]
        );
        // Star, bidirectional, 5 blocks: ring 0..4 and relay 4.
        let star = rows(&PatternSpec::Star { relays: 1 }, 5, false);
        assert_eq!(star[0], vec![0, 1, 3, 4]);
        assert_eq!(star[4], vec![0, 1, 2, 3, 4]);
        let global = rows(
            &PatternSpec::Global {
                global: 1,
                width: 1,
            },
            4,
            false,
        );
        assert_eq!(
            global,
            vec![vec![0, 1, 2, 3], vec![0, 1], vec![0, 2], vec![0, 3]]
        );
        assert_eq!(
            rows(
                &PatternSpec::Dilated {
                    width: 3,
                    dilation: 2
                },
                8,
                true
            )[7],
            vec![3, 5, 7]
        );
        assert_eq!(rows(&PatternSpec::Dense {}, 3, true)[2], vec![0, 1, 2]);
        let bigbird = rows(
            &PatternSpec::Bigbird {
                width: 3,
                global: 1,
                random: 2,
                seed: 9,
            },
            32,
            false,
        );
        for (i, row) in bigbird.iter().enumerate().skip(2).take(28) {
            // window (3) + global (1) + 2 random, all distinct
            assert_eq!(row.len(), 6, "row {i}: {row:?}");
        }
    }

    #[test]
    fn random_is_reproducible_by_seed_and_prefix_stable_when_causal() {
        let spec = |seed| PatternSpec::Random { per_row: 3, seed };
        assert_eq!(rows(&spec(1), 64, false), rows(&spec(1), 64, false));
        assert_ne!(rows(&spec(1), 64, false), rows(&spec(2), 64, false));
        let long = rows(&spec(5), 64, true);
        let short = rows(&spec(5), 40, true);
        assert_eq!(&long[..40], &short[..]);
        for (i, row) in long.iter().enumerate() {
            assert!(
                row.contains(&i) && row.len() == (i + 1).min(4),
                "{i}: {row:?}"
            );
        }
        // Layers draw differently.
        let a = spec(1).build(64, 1, false, 0);
        let b = spec(1).build(64, 1, false, 1);
        assert_ne!(a, b);
    }

    #[test]
    fn heads_and_union_combine() {
        let spec = PatternSpec::Heads {
            of: vec![
                PatternSpec::Window { width: 1 },
                PatternSpec::Union {
                    of: vec![
                        PatternSpec::Window { width: 1 },
                        PatternSpec::Dilated {
                            width: 2,
                            dilation: 3,
                        },
                    ],
                },
            ],
        };
        spec.validate("pattern").unwrap();
        let layer = spec.build(8, 2, true, 0);
        assert_eq!(layer.groups.len(), 2);
        assert_eq!(layer.groups[0].rows[5], vec![5]);
        assert_eq!(layer.groups[1].rows[5], vec![2, 5]);
        assert_eq!(layer.max_row(), 2);
        assert!(layer.padding_waste() > 0.0);
        // token 11 (block 5) sees token 4 (block 2) in group 1, not in group 0
        assert!(layer.groups[1].allows(2, 11, 4) && !layer.groups[0].allows(2, 11, 4));
        let nested = PatternSpec::Union {
            of: vec![spec.clone()],
        };
        let err = nested.validate("mixer.pattern[0]").unwrap_err().to_string();
        assert!(err.contains("mixer.pattern[0].of[0].kind"), "{err}");
        let err = PatternSpec::Fixed {
            stride: 2,
            summary: 3,
        }
        .validate("mixer.pattern[1]")
        .unwrap_err()
        .to_string();
        assert!(err.contains("mixer.pattern[1].summary"), "{err}");
    }

    #[test]
    fn specs_round_trip_through_toml() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct W {
            pattern: Vec<PatternSpec>,
        }
        let text = r#"
            [[pattern]]
            kind = "bigbird"
            width = 3
            global = 1
            random = 2
            seed = 7
            [[pattern]]
            kind = "heads"
            of = [{ kind = "window", width = 3 }, { kind = "star" }]
        "#;
        let w: W = toml::from_str(text).unwrap();
        assert_eq!(w.pattern[1].head_groups(), 2);
        assert_eq!(w.pattern[1].name(), "heads(window+star)");
        assert_eq!(
            toml::from_str::<W>(&toml::to_string(&w).unwrap()).unwrap(),
            w
        );
        let err = toml::from_str::<W>("[[pattern]]\nkind = \"window\"\nwidht = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("widht"), "{err}");
    }
}
