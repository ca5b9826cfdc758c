//! The synthetic copy task (Yun et al. 2020 test their sparse patterns on it): each row is
//! `x SEP x` with `x` a string of random symbols, and the loss counts only on the copied half,
//! which a model can predict perfectly only by attending `L + 1` positions back.

use rand::Rng;

use crate::batch::{Batch, stream};

/// Generator of copy-task batches. Row length `seq + 1 = 2L + 1`: `L` symbols, the separator,
/// the same `L` symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTask {
    /// Symbols are `0..n_symbols`; the separator is `n_symbols`.
    pub n_symbols: usize,
    /// Input length of a row (`2L`); must be even.
    pub seq: usize,
    /// Seed of every stream.
    pub seed: u64,
}

impl CopyTask {
    /// Vocabulary: the symbols plus the separator.
    pub fn vocab_size(&self) -> usize {
        self.n_symbols + 1
    }

    /// Length `L` of the string that is copied.
    pub fn half(&self) -> usize {
        self.seq / 2
    }

    /// The `index`-th batch: a pure function of `(seed, index)`.
    ///
    /// Targets `L..2L` (the copied string) have weight 1; the rest weight 0.
    pub fn batch(&self, batch: usize, index: u64) -> Batch {
        let half = self.half();
        let mut rng = stream(self.seed, index);
        let mut tokens = Vec::with_capacity(batch * (2 * half + 1));
        let mut weights = Vec::with_capacity(batch * 2 * half);
        for _ in 0..batch {
            let x: Vec<u32> = (0..half)
                .map(|_| rng.random_range(0..self.n_symbols as u32))
                .collect();
            tokens.extend_from_slice(&x);
            tokens.push(self.n_symbols as u32);
            tokens.extend_from_slice(&x);
            // Target j predicts token j + 1; the copy occupies tokens L+1..=2L.
            weights.extend((0..2 * half).map(|j| if j >= half { 1.0 } else { 0.0 }));
        }
        Batch {
            batch,
            seq: 2 * half,
            tokens,
            weights: Some(weights),
            masked_inputs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_x_sep_x_and_only_the_copy_is_weighted() {
        let task = CopyTask {
            n_symbols: 5,
            seq: 8,
            seed: 3,
        };
        let b = task.batch(4, 0);
        assert_eq!(b.tokens.len(), 4 * 9);
        for row in b.tokens.chunks(9) {
            assert_eq!(row[4], 5, "separator in the middle");
            assert_eq!(row[..4], row[5..], "second half copies the first");
            assert!(row[..4].iter().all(|&t| t < 5));
        }
        let (_, targets) = b.inputs_targets();
        let w = b.weights.as_ref().unwrap();
        // The weighted targets are exactly the copied string.
        let copied: Vec<i64> = targets
            .iter()
            .zip(w)
            .filter(|(_, w)| **w == 1.0)
            .map(|(t, _)| *t)
            .collect();
        let firsts: Vec<i64> = b
            .tokens
            .chunks(9)
            .flat_map(|r| r[..4].iter().map(|&t| t as i64))
            .collect();
        assert_eq!(copied, firsts);
        assert_eq!(b.weight_sum(), 16.0);
        assert_ne!(task.batch(4, 1).tokens, b.tokens);
        assert_eq!(task.batch(4, 0), b);
    }
}
