//! Yun et al. (2020)'s Assumption 1 for a sparse pattern family `A^1..A^p` over `n` tokens:
//!
//! 1. every token attends to itself in every layer;
//! 2. a Hamiltonian path runs through the union graph `∪_l A^l` (a permutation γ with
//!    `γ(i-1) ∈ A^l_{γ(i)}` for some layer `l`);
//! 3. some `s` layers let every token reach every other (causal: every earlier one).
//!
//! Under these conditions sparse transformers are universal approximators of
//! sequence-to-sequence functions. [`check`] decides (1) and (3) exactly at token level, and (2)
//! constructively: it tries the orders the paper's proofs use (sequential and reversed), then a
//! bounded depth-first search, and proves absence when the union graph is disconnected.

use std::fmt;

use serde::Serialize;

use super::layer::LayerPattern;

/// What [`check`] found for a pattern family.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Number of tokens.
    pub n: usize,
    /// Block size in tokens.
    pub block: usize,
    /// Whether the layers are causal.
    pub causal: bool,
    /// Number of distinct layers before the pattern repeats.
    pub period: usize,
    /// Condition 1: every token attends to itself in every layer.
    pub self_attention: bool,
    /// The first (layer, token) without a self-loop, when condition 1 fails.
    pub missing_self_loop: Option<(usize, usize)>,
    /// Condition 2.
    pub hamiltonian_path: Hamiltonian,
    /// Condition 3: the smallest number of layers after which every token has every other
    /// (causal: every earlier) token in its receptive field; `None` = never.
    pub reach_layers: Option<usize>,
    /// Mean keys per token (union over head groups, averaged over the layers of one period).
    pub connections_mean: f64,
    /// Most keys of any token in any layer.
    pub connections_max: usize,
    /// Attended pairs / pairs dense attention would attend (causal: the lower triangle).
    pub density: f64,
    /// Longest row, in key blocks (what the kernel pads to).
    pub max_row_blocks: usize,
    /// Fraction of the kernel's key-block slots that are padding, mean over layers.
    pub padding_waste: f64,
}

/// Condition 2's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hamiltonian {
    /// `0, 1, ..., n-1`: every token attends to its predecessor in some layer.
    Sequential,
    /// `n-1, ..., 0`: every token attends to its successor in some layer.
    Reversed,
    /// Another path, found by search.
    Found,
    /// No path can exist (the reason says why).
    Absent(String),
    /// The bounded search gave up; neither found nor ruled out.
    Unknown,
}

impl Hamiltonian {
    /// Whether a path is known to exist.
    pub fn exists(&self) -> bool {
        matches!(
            self,
            Hamiltonian::Sequential | Hamiltonian::Reversed | Hamiltonian::Found
        )
    }
}

/// Union over head groups of the key blocks of every query block, per layer.
fn union_rows(layer: &LayerPattern) -> Vec<Vec<usize>> {
    let n_blocks = layer.groups[0].n_blocks;
    (0..n_blocks)
        .map(|i| {
            let mut row: Vec<usize> = layer
                .groups
                .iter()
                .flat_map(|g| g.rows[i].iter().copied())
                .collect();
            row.sort_unstable();
            row.dedup();
            row
        })
        .collect()
}

/// Keys per token and density of a pattern family — the cheap part of [`check`], for callers
/// that need no Assumption-1 verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Connections {
    /// Mean keys per token (union over head groups, averaged over the layers).
    pub mean: f64,
    /// Most keys of any token in any layer.
    pub max: usize,
    /// Attended pairs / pairs dense attention would attend (causal: the lower triangle).
    pub density: f64,
}

/// The union rows of each layer, after checking that the layers form one family over `n`
/// tokens; with the block size and causality they share.
fn family(layers: &[LayerPattern], n: usize) -> (Vec<Vec<Vec<usize>>>, usize, bool) {
    assert!(
        !layers.is_empty() && n > 0,
        "check needs a pattern and tokens"
    );
    let block = layers[0].block;
    let causal = layers[0].groups[0].causal;
    let n_blocks = n.div_ceil(block);
    for layer in layers {
        assert!(
            layer.block == block
                && layer.groups.iter().all(|g| g.causal == causal)
                && layer.groups[0].n_blocks >= n_blocks,
            "the layers of one family must agree on block, causality and size"
        );
    }
    (layers.iter().map(union_rows).collect(), block, causal)
}

/// Keys per token and density of the family `layers` over `n` tokens.
pub fn connections(layers: &[LayerPattern], n: usize) -> Connections {
    let (rows, block, causal) = family(layers, n);
    count_connections(&rows, n, block, causal)
}

fn count_connections(
    rows: &[Vec<Vec<usize>>],
    n: usize,
    block: usize,
    causal: bool,
) -> Connections {
    let n_blocks = n.div_ceil(block);
    let tokens = |j: usize| j * block..((j + 1) * block).min(n);
    // Keys of token t in layer l (a count).
    let keys = |l: usize, t: usize| -> usize {
        rows[l][t / block]
            .iter()
            .filter(|&&j| j < n_blocks)
            .map(|&j| {
                let r = tokens(j);
                if causal {
                    r.end.min(t + 1).saturating_sub(r.start)
                } else {
                    r.len()
                }
            })
            .sum()
    };
    let (mut total, mut most) = (0usize, 0usize);
    for l in 0..rows.len() {
        for t in 0..n {
            let k = keys(l, t);
            total += k;
            most = most.max(k);
        }
    }
    let dense_pairs = if causal { n * (n + 1) / 2 } else { n * n };
    let per_layer = total as f64 / rows.len() as f64;
    Connections {
        mean: per_layer / n as f64,
        max: most,
        density: per_layer / dense_pairs as f64,
    }
}

/// Check Assumption 1 for the family `layers` (one period, layer `l` of the model uses
/// `layers[l % layers.len()]`) over `n` tokens. All layers must share block size, causality
/// and a block count covering `n`.
pub fn check(layers: &[LayerPattern], n: usize) -> Report {
    let (rows, block, causal) = family(layers, n);
    let block_of = |t: usize| t / block;
    let attends = |l: usize, t: usize, u: usize| -> bool {
        (!causal || u <= t) && rows[l][block_of(t)].binary_search(&block_of(u)).is_ok()
    };
    let missing_self_loop = (0..layers.len())
        .flat_map(|l| (0..n).map(move |t| (l, t)))
        .find(|&(l, t)| !attends(l, t, t));
    let connections = count_connections(&rows, n, block, causal);

    Report {
        n,
        block,
        causal,
        period: layers.len(),
        self_attention: missing_self_loop.is_none(),
        missing_self_loop,
        hamiltonian_path: hamiltonian(&rows, n, block, causal, &attends),
        reach_layers: reach(&rows, n, block, causal),
        connections_mean: connections.mean,
        connections_max: connections.max,
        density: connections.density,
        max_row_blocks: layers.iter().map(LayerPattern::max_row).max().unwrap_or(0),
        padding_waste: layers.iter().map(LayerPattern::padding_waste).sum::<f64>()
            / layers.len() as f64,
    }
}

/// Condition 3 by bitsets: `reach[t]` = tokens whose information has arrived at `t`.
fn reach(rows: &[Vec<Vec<usize>>], n: usize, block: usize, causal: bool) -> Option<usize> {
    let words = n.div_ceil(64);
    let n_blocks = n.div_ceil(block);
    let mut state = vec![0u64; n * words];
    for t in 0..n {
        state[t * words + t / 64] |= 1 << (t % 64);
    }
    let complete = |state: &[u64]| {
        (0..n).all(|t| {
            let want = if causal { t + 1 } else { n };
            let row = &state[t * words..(t + 1) * words];
            (0..words).all(|w| {
                let bits = want.saturating_sub(w * 64).min(64);
                let mask = if bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                row[w] & mask == mask
            })
        })
    };
    if complete(&state) {
        return Some(0);
    }
    let period = rows.len();
    let mut at_period_start = state.clone();
    let mut full = vec![0u64; n_blocks * words];
    let mut base = vec![0u64; words];
    let mut prefix = vec![0u64; words];
    let limit = period * (n + 2);
    for s in 1..=limit {
        let layer = &rows[(s - 1) % period];
        full.iter_mut().for_each(|w| *w = 0);
        for t in 0..n {
            let j = t / block;
            for w in 0..words {
                full[j * words + w] |= state[t * words + w];
            }
        }
        let mut next = vec![0u64; n * words];
        for (i, row) in layer.iter().enumerate().take(n_blocks) {
            base.iter_mut().for_each(|w| *w = 0);
            let mut diagonal = false;
            for &j in row.iter().filter(|&&j| j < n_blocks) {
                if causal && j == i {
                    diagonal = true;
                    continue;
                }
                for w in 0..words {
                    base[w] |= full[j * words + w];
                }
            }
            prefix.iter_mut().for_each(|w| *w = 0);
            for t in i * block..((i + 1) * block).min(n) {
                if diagonal {
                    for w in 0..words {
                        prefix[w] |= state[t * words + w];
                    }
                }
                for w in 0..words {
                    next[t * words + w] = base[w] | prefix[w];
                }
            }
        }
        state = next;
        if complete(&state) {
            return Some(s);
        }
        if s % period == 0 {
            if state == at_period_start {
                return None; // a whole period changed nothing: a fixed point short of complete
            }
            at_period_start.clone_from(&state);
        }
    }
    None
}

/// Condition 2: the paper's orders first, then connectivity, then a bounded search.
fn hamiltonian(
    rows: &[Vec<Vec<usize>>],
    n: usize,
    block: usize,
    causal: bool,
    attends: &dyn Fn(usize, usize, usize) -> bool,
) -> Hamiltonian {
    let any = |t: usize, u: usize| (0..rows.len()).any(|l| attends(l, t, u));
    if (1..n).all(|t| any(t, t - 1)) {
        return Hamiltonian::Sequential;
    }
    if (0..n.saturating_sub(1)).all(|t| any(t, t + 1)) {
        return Hamiltonian::Reversed;
    }
    // Weak connectivity by union-find: token t is joined to the first token of every key block.
    let n_blocks = n.div_ceil(block);
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for layer in rows {
        for (i, row) in layer.iter().enumerate().take(n_blocks) {
            for &j in row.iter().filter(|&&j| j < n_blocks) {
                for t in i * block..((i + 1) * block).min(n) {
                    let (a, b) = (find(&mut parent, t), find(&mut parent, j * block));
                    parent[a] = b;
                }
            }
        }
    }
    let root = find(&mut parent, 0);
    if (1..n).any(|t| find(&mut parent, t) != root) {
        return Hamiltonian::Absent("the union graph is disconnected".into());
    }
    if causal {
        // Causal edges point forward only: the one candidate path is 0, 1, ..., checked above.
        return Hamiltonian::Absent(
            "a causal pattern's only candidate path is 0, 1, ..., n-1, and some token does \
             not attend its predecessor"
                .into(),
        );
    }
    if n > 4096 {
        return Hamiltonian::Unknown; // the search below is quadratic in n
    }
    // Out-neighbours of u: tokens that attend u (the next token on the path may be any of them).
    let mut next: Vec<Vec<usize>> = vec![vec![]; n];
    for t in 0..n {
        for (u, out) in next.iter_mut().enumerate() {
            if u != t && any(t, u) {
                out.push(t);
            }
        }
    }
    // Depth-first search, fewest-onward-moves first (Warnsdorff), with a step budget.
    let mut budget = 2_000_000usize;
    for start in [0, n - 1] {
        let mut on_path = vec![false; n];
        let mut path = vec![start];
        on_path[start] = true;
        let mut choice = vec![0usize];
        let order = |u: usize, on_path: &[bool]| {
            let mut c: Vec<usize> = next[u].iter().copied().filter(|&v| !on_path[v]).collect();
            c.sort_by_key(|&v| next[v].iter().filter(|&&w| !on_path[w]).count());
            c
        };
        let mut options = vec![order(start, &on_path)];
        while let Some(&u) = path.last() {
            if path.len() == n {
                return Hamiltonian::Found;
            }
            if budget == 0 {
                return Hamiltonian::Unknown;
            }
            budget -= 1;
            let k = choice.last_mut().unwrap();
            let opts = options.last().unwrap();
            if *k < opts.len() {
                let v = opts[*k];
                *k += 1;
                on_path[v] = true;
                path.push(v);
                choice.push(0);
                options.push(order(v, &on_path));
            } else {
                on_path[u] = false;
                path.pop();
                choice.pop();
                options.pop();
            }
        }
    }
    Hamiltonian::Absent("exhaustive search found no path".into())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        writeln!(
            f,
            "  n = {} tokens, block {}, {}, period {}",
            self.n,
            self.block,
            if self.causal {
                "causal"
            } else {
                "bidirectional"
            },
            self.period
        )?;
        write!(
            f,
            "  (1) every token attends to itself: {}",
            yes(self.self_attention)
        )?;
        if let Some((l, t)) = self.missing_self_loop {
            write!(f, " (layer {l}, token {t} does not)")?;
        }
        writeln!(f)?;
        let path = match &self.hamiltonian_path {
            Hamiltonian::Sequential => "yes (0, 1, ..., n-1)".to_string(),
            Hamiltonian::Reversed => "yes (n-1, ..., 0)".to_string(),
            Hamiltonian::Found => "yes (found by search)".to_string(),
            Hamiltonian::Absent(why) => format!("NO ({why})"),
            Hamiltonian::Unknown => "unknown (search budget exhausted)".to_string(),
        };
        writeln!(f, "  (2) Hamiltonian path in the union graph: {path}")?;
        match self.reach_layers {
            Some(s) => writeln!(
                f,
                "  (3) every token reaches every {} within {s} layer(s)",
                if self.causal { "later one" } else { "other" }
            )?,
            None => writeln!(
                f,
                "  (3) full reach: NEVER (some pairs are never connected)"
            )?,
        }
        write!(
            f,
            "  keys per token: mean {:.1}, max {}; density {:.4}; longest row {} blocks, \
             padding {:.1}%",
            self.connections_mean,
            self.connections_max,
            self.density,
            self.max_row_blocks,
            100.0 * self.padding_waste
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{BlockPattern, PatternSpec};

    fn family(spec: &PatternSpec, n: usize, block: usize, causal: bool) -> Vec<LayerPattern> {
        spec.validate("pattern").unwrap();
        vec![spec.build(n.div_ceil(block), block, causal, 0)]
    }

    #[test]
    fn window_of_width_three_satisfies_all_three_conditions() {
        let r = check(&family(&PatternSpec::Window { width: 3 }, 64, 1, false), 64);
        assert!(r.self_attention);
        assert_eq!(r.hamiltonian_path, Hamiltonian::Sequential);
        // Information moves one token per layer: the ends are 63 apart.
        assert_eq!(r.reach_layers, Some(63));
        assert_eq!(r.connections_max, 3);
        let causal = check(&family(&PatternSpec::Window { width: 3 }, 64, 1, true), 64);
        assert!(causal.self_attention && causal.hamiltonian_path.exists());
        assert_eq!(causal.reach_layers, Some(32)); // two tokens further back per layer
    }

    #[test]
    fn missing_self_loops_fail_condition_one() {
        // Each token sees only its neighbours.
        let rows = (0..8)
            .map(|i: usize| {
                [i.wrapping_sub(1), i + 1]
                    .into_iter()
                    .filter(|&j| j < 8)
                    .collect()
            })
            .collect();
        let layer = LayerPattern {
            block: 1,
            groups: vec![BlockPattern::from_rows(rows, false)],
        };
        let r = check(&[layer], 8);
        assert!(!r.self_attention);
        assert_eq!(r.missing_self_loop, Some((0, 0)));
        assert!(
            r.to_string()
                .contains("(1) every token attends to itself: NO")
        );
    }

    #[test]
    fn disconnected_pattern_never_reaches() {
        // Two halves that never see each other.
        let rows = (0..8)
            .map(|i: usize| {
                if i < 4 {
                    (0..4).collect()
                } else {
                    (4..8).collect()
                }
            })
            .collect();
        let layer = LayerPattern {
            block: 1,
            groups: vec![BlockPattern::from_rows(rows, false)],
        };
        let r = check(&[layer], 8);
        assert!(r.self_attention);
        assert_eq!(r.reach_layers, None);
        assert!(matches!(r.hamiltonian_path, Hamiltonian::Absent(_)));
        assert!(r.to_string().contains("NEVER"));
    }

    #[test]
    fn strided_with_root_n_stride_reaches_everyone_in_two_layers() {
        for causal in [false, true] {
            let r = check(
                &family(&PatternSpec::Strided { stride: 8 }, 64, 1, causal),
                64,
            );
            assert_eq!(r.reach_layers, Some(2), "causal = {causal}");
            assert!(r.self_attention && r.hamiltonian_path.exists());
            assert!(r.density < 0.5, "{}", r.density);
        }
        // The same at block level: 1024 tokens in blocks of 16, stride 8 blocks.
        let r = check(
            &family(&PatternSpec::Strided { stride: 8 }, 1024, 16, true),
            1024,
        );
        assert_eq!(r.reach_layers, Some(2));
    }

    #[test]
    fn star_reaches_through_the_relay_in_two_layers() {
        let r = check(&family(&PatternSpec::Star { relays: 1 }, 32, 1, false), 32);
        assert_eq!(r.reach_layers, Some(2));
        assert!(r.self_attention && r.hamiltonian_path.exists());
        assert_eq!(r.connections_max, 32); // the relay sees everyone
    }

    #[test]
    fn alternating_layers_compose() {
        // Yun et al.'s two-layer family at token level: chunks of 8, then the columns of equal
        // residue mod 8. Neither layer alone connects everything; alternating reaches everyone
        // in 2 layers.
        let chunks = LayerPattern {
            block: 1,
            groups: vec![BlockPattern::from_rows(
                (0..64)
                    .map(|i| (i / 8 * 8..i / 8 * 8 + 8).collect())
                    .collect(),
                false,
            )],
        };
        let columns = PatternSpec::Dilated {
            width: 15,
            dilation: 8,
        }
        .build(64, 1, false, 1);
        assert_eq!(check(std::slice::from_ref(&chunks), 64).reach_layers, None);
        assert_eq!(check(std::slice::from_ref(&columns), 64).reach_layers, None);
        let r = check(&[chunks, columns], 64);
        assert_eq!(r.period, 2);
        assert_eq!(r.reach_layers, Some(2));
        assert!(r.self_attention && r.hamiltonian_path.exists());
    }
}
