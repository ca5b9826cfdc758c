//! Batches of token windows, and the seeded sampler that draws them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `batch` rows of `seq + 1` tokens: inputs are the first `seq`, targets the last `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Number of rows.
    pub batch: usize,
    /// Input length of each row.
    pub seq: usize,
    /// Row-major `[batch, seq + 1]` token ids.
    pub tokens: Vec<u32>,
    /// Row-major `[batch, seq]` loss weight of each target; `None` means all ones.
    pub weights: Option<Vec<f32>>,
}

impl Batch {
    /// Row-major `[batch, seq]` inputs and targets as `i64` (Burn's `Int` input).
    pub fn inputs_targets(&self) -> (Vec<i64>, Vec<i64>) {
        let mut inputs = Vec::with_capacity(self.batch * self.seq);
        let mut targets = Vec::with_capacity(self.batch * self.seq);
        for row in self.tokens.chunks_exact(self.seq + 1) {
            inputs.extend(row[..self.seq].iter().map(|&t| i64::from(t)));
            targets.extend(row[1..].iter().map(|&t| i64::from(t)));
        }
        (inputs, targets)
    }

    /// Total loss weight: the number of targets that count.
    pub fn weight_sum(&self) -> f64 {
        match &self.weights {
            Some(w) => w.iter().map(|&x| f64::from(x)).sum(),
            None => (self.batch * self.seq) as f64,
        }
    }
}

/// Draws random windows of `seq + 1` consecutive tokens.
///
/// Stateless by design: batch number `index` is a pure function of `(seed, index)` (a ChaCha8
/// stream per index), so a run resumed at step k draws exactly the batches the uninterrupted
/// run would have, and the sampler state in a checkpoint is just the next index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSampler {
    /// Seed of every stream.
    pub seed: u64,
}

impl WindowSampler {
    /// The `index`-th batch of `batch` windows from `tokens`.
    ///
    /// # Panics
    /// If `tokens` is shorter than one window (callers check with a clear error first).
    pub fn batch(&self, tokens: &[u32], batch: usize, seq: usize, index: u64) -> Batch {
        assert!(
            tokens.len() > seq,
            "{} tokens < one window of {}",
            tokens.len(),
            seq + 1
        );
        let mut rng = stream(self.seed, index);
        let last_start = tokens.len() - (seq + 1);
        let mut out = Vec::with_capacity(batch * (seq + 1));
        for _ in 0..batch {
            let start = rng.random_range(0..=last_start);
            out.extend_from_slice(&tokens[start..start + seq + 1]);
        }
        Batch {
            batch,
            seq,
            tokens: out,
            weights: None,
        }
    }
}

/// The random stream of batch `index` under `seed`.
pub(crate) fn stream(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Deterministic evaluation batches: consecutive non-overlapping windows (stride `seq`, so every
/// token but the first is predicted once), at most `max_batches` batches of `batch` windows.
/// The last batch may have fewer rows.
pub fn eval_windows(tokens: &[u32], batch: usize, seq: usize, max_batches: usize) -> Vec<Batch> {
    let n_windows = tokens.len().saturating_sub(1) / seq;
    let windows: Vec<&[u32]> = (0..n_windows.min(batch * max_batches))
        .map(|w| &tokens[w * seq..w * seq + seq + 1])
        .collect();
    windows
        .chunks(batch)
        .map(|rows| Batch {
            batch: rows.len(),
            seq,
            tokens: rows.concat(),
            weights: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_contiguous_slices_and_reproducible() {
        let tokens: Vec<u32> = (0..1000).collect();
        let s = WindowSampler { seed: 7 };
        let a = s.batch(&tokens, 4, 16, 3);
        assert_eq!(
            a,
            s.batch(&tokens, 4, 16, 3),
            "same (seed, index) -> same batch"
        );
        assert_ne!(
            a,
            s.batch(&tokens, 4, 16, 4),
            "another index -> another batch"
        );
        for row in a.tokens.chunks(17) {
            for pair in row.windows(2) {
                assert_eq!(pair[1], pair[0] + 1, "a window is a contiguous slice");
            }
        }
        let (x, y) = a.inputs_targets();
        assert_eq!(x.len(), 64);
        assert_eq!(x[1], y[0], "targets are inputs shifted by one");
    }

    #[test]
    fn windows_reach_both_ends() {
        let tokens: Vec<u32> = (0..20).collect();
        let s = WindowSampler { seed: 1 };
        let starts: Vec<u32> = (0..200)
            .flat_map(|i| {
                s.batch(&tokens, 2, 9, i)
                    .tokens
                    .chunks(10)
                    .map(|r| r[0])
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(*starts.iter().min().unwrap(), 0);
        assert_eq!(*starts.iter().max().unwrap(), 10);
    }

    #[test]
    fn eval_windows_cover_the_split_once() {
        let tokens: Vec<u32> = (0..101).collect();
        let batches = eval_windows(&tokens, 3, 10, 100);
        let rows: usize = batches.iter().map(|b| b.batch).sum();
        assert_eq!(rows, 10);
        assert_eq!(batches.last().unwrap().batch, 1);
        let (_, targets): (Vec<_>, Vec<_>) = batches.iter().map(|b| b.inputs_targets()).unzip();
        let all: Vec<i64> = targets.concat();
        assert_eq!(
            all,
            (1..101).collect::<Vec<i64>>(),
            "every token but the first is a target once"
        );
        assert_eq!(
            eval_windows(&tokens, 3, 10, 2).len(),
            2,
            "max_batches caps the work"
        );
    }
}
