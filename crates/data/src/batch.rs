//! Batches of token windows, and the seeded sampler that draws them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `batch` windows of `seq + 1` tokens. For next-token prediction the inputs are the first
/// `seq` tokens of each window and the targets the last `seq`; a masked-LM batch (see
/// [`Batch::masked`]) has corrupted inputs and the window's first `seq` tokens as targets.
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
    /// Row-major `[batch, seq]` corrupted inputs of a masked-LM batch; `None` for next-token.
    pub masked_inputs: Option<Vec<u32>>,
}

impl Batch {
    /// Row-major `[batch, seq]` inputs and targets as `i64` (Burn's `Int` input).
    pub fn inputs_targets(&self) -> (Vec<i64>, Vec<i64>) {
        let mut inputs = Vec::with_capacity(self.batch * self.seq);
        let mut targets = Vec::with_capacity(self.batch * self.seq);
        for row in self.tokens.chunks_exact(self.seq + 1) {
            match self.masked_inputs {
                Some(_) => targets.extend(row[..self.seq].iter().map(|&t| i64::from(t))),
                None => {
                    inputs.extend(row[..self.seq].iter().map(|&t| i64::from(t)));
                    targets.extend(row[1..].iter().map(|&t| i64::from(t)));
                }
            }
        }
        if let Some(masked) = &self.masked_inputs {
            inputs.extend(masked.iter().map(|&t| i64::from(t)));
        }
        (inputs, targets)
    }

    /// BERT-style masked-LM corruption (Devlin et al. 2019) of this batch's windows: in each
    /// row `max(1, round(rate · seq))` distinct positions are chosen; 80% of them become
    /// `mask_id`, 10% a uniformly random token in `0..vocab`, 10% stay. Targets are the
    /// original tokens and only the chosen positions carry loss weight. A pure function of
    /// `(seed, index)`, like the samplers.
    pub fn masked(&self, mask_id: u32, vocab: u32, rate: f64, seed: u64, index: u64) -> Batch {
        let mut rng = stream(seed ^ 0x4D41_534B_4D41_534B, index); // "MASKMASK"
        let per_row = ((rate * self.seq as f64).round() as usize).clamp(1, self.seq);
        let mut inputs = Vec::with_capacity(self.batch * self.seq);
        let mut weights = vec![0.0f32; self.batch * self.seq];
        for (r, row) in self.tokens.chunks_exact(self.seq + 1).enumerate() {
            let mut input = row[..self.seq].to_vec();
            for p in rand::seq::index::sample(&mut rng, self.seq, per_row) {
                weights[r * self.seq + p] = 1.0;
                let roll: f64 = rng.random();
                if roll < 0.8 {
                    input[p] = mask_id;
                } else if roll < 0.9 {
                    input[p] = rng.random_range(0..vocab);
                }
            }
            inputs.extend(input);
        }
        Batch {
            batch: self.batch,
            seq: self.seq,
            tokens: self.tokens.clone(),
            weights: Some(weights),
            masked_inputs: Some(inputs),
        }
    }

    /// Rows `start..end` of this batch (inputs, targets, weights and masked inputs alike).
    pub fn rows(&self, start: usize, end: usize) -> Batch {
        assert!(
            start <= end && end <= self.batch,
            "rows {start}..{end} of {}",
            self.batch
        );
        let (w, s) = (self.seq + 1, self.seq);
        Batch {
            batch: end - start,
            seq: self.seq,
            tokens: self.tokens[start * w..end * w].to_vec(),
            weights: self
                .weights
                .as_ref()
                .map(|v| v[start * s..end * s].to_vec()),
            masked_inputs: self
                .masked_inputs
                .as_ref()
                .map(|v| v[start * s..end * s].to_vec()),
        }
    }

    /// Split the rows into `parts` contiguous shards whose sizes differ by at most one (the
    /// first `batch % parts` get the extra row), for data parallelism; empty shards are left
    /// out, so fewer than `parts` come back when `batch < parts`.
    pub fn split(&self, parts: usize) -> Vec<Batch> {
        shard_rows(self.batch, parts)
            .into_iter()
            .map(|r| self.rows(r.start, r.end))
            .collect()
    }

    /// Total loss weight: the number of targets that count.
    pub fn weight_sum(&self) -> f64 {
        match &self.weights {
            Some(w) => w.iter().map(|&x| f64::from(x)).sum(),
            None => (self.batch * self.seq) as f64,
        }
    }
}

/// The rows of each of `parts` contiguous shards of `rows` rows ([`Batch::split`]): sizes
/// differ by at most one (the first `rows % parts` get the extra row); empty shards are left
/// out. What else follows a batch's rows (a model's cache) is cut by the same ranges.
pub fn shard_rows(rows: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (rows / parts, rows % parts);
    let mut start = 0;
    let mut out = Vec::with_capacity(parts);
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        if len > 0 {
            out.push(start..start + len);
        }
        start += len;
    }
    out
}

/// How training batches are drawn. Both are pure functions of `(seed, batch index)`, so a run
/// resumed at step k draws exactly the batches the uninterrupted run would have, and the
/// sampler's whole state in a checkpoint is the next index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Windows at random offsets (a ChaCha8 stream per batch index).
    Random,
    /// The token stream cut into `batch` equal parallel streams, read in order one window at a
    /// time (Transformer-XL style), wrapping around at the end of an epoch.
    Stream,
}

impl Sampler {
    /// The `index`-th batch of `batch` windows of `seq + 1` tokens.
    ///
    /// # Panics
    /// If `tokens` is too short (callers check with a clear error first).
    pub fn batch(self, tokens: &[u32], batch: usize, seq: usize, seed: u64, index: u64) -> Batch {
        match self {
            Sampler::Random => random_batch(tokens, batch, seq, seed, index),
            Sampler::Stream => stream_batch(tokens, batch, seq, index),
        }
    }
}

fn random_batch(tokens: &[u32], batch: usize, seq: usize, seed: u64, index: u64) -> Batch {
    assert!(
        tokens.len() > seq,
        "{} tokens < one window of {}",
        tokens.len(),
        seq + 1
    );
    let mut rng = stream(seed, index);
    let last_start = tokens.len() - (seq + 1);
    windows_at(
        tokens,
        seq,
        (0..batch).map(|_| rng.random_range(0..=last_start)),
    )
}

/// Batch `index` of the contiguous-stream sampler: row `r` reads stream `r` (the `r`-th of
/// `batch` equal slices of `tokens`) at window `index mod windows_per_stream`.
pub fn stream_batch(tokens: &[u32], batch: usize, seq: usize, index: u64) -> Batch {
    let stream_len = tokens.len() / batch;
    let offset = (index % stream_windows(tokens.len(), batch, seq)) as usize * seq;
    windows_at(tokens, seq, (0..batch).map(|r| r * stream_len + offset))
}

/// Windows of `seq` inputs in each of the `batch` streams of `len` tokens (one epoch of the
/// `stream` sampler, after which every stream starts over).
///
/// # Panics
/// If a stream is shorter than one window of `seq + 1` tokens.
pub fn stream_windows(len: usize, batch: usize, seq: usize) -> u64 {
    let stream_len = len / batch;
    assert!(
        stream_len > seq,
        "streams of {stream_len} tokens < one window of {}",
        seq + 1
    );
    ((stream_len - 1) / seq) as u64
}

/// Whether batch `index` of the `stream` sampler starts its streams over (the first batch of
/// an epoch): a model carrying a cache from batch to batch resets it there, since the window
/// before is not the text before.
pub fn stream_restarts(len: usize, batch: usize, seq: usize, index: u64) -> bool {
    index.is_multiple_of(stream_windows(len, batch, seq))
}

/// A next-token batch of the windows of `seq + 1` tokens starting at `starts`.
fn windows_at(tokens: &[u32], seq: usize, starts: impl Iterator<Item = usize>) -> Batch {
    let mut out = vec![];
    let mut batch = 0;
    for start in starts {
        out.extend_from_slice(&tokens[start..start + seq + 1]);
        batch += 1;
    }
    Batch {
        batch,
        seq,
        tokens: out,
        weights: None,
        masked_inputs: None,
    }
}

/// The random stream of batch `index` under `seed`.
pub(crate) fn stream(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Evaluation batches over a whole split: every token but the first is scored exactly once
/// (weight 1), with at least `seq - stride` tokens of context (except near the start).
///
/// Windows of `seq + 1` tokens start every `stride` tokens; a window scores only the targets
/// no earlier window scored (its last `stride`, the first window all `seq`). The last window is
/// shifted to end at the split's last token. `stride = seq` gives non-overlapping windows.
/// `max_batches` caps the work (then only a prefix of the split is scored).
pub fn eval_windows(
    tokens: &[u32],
    batch: usize,
    seq: usize,
    stride: usize,
    max_batches: Option<usize>,
) -> Vec<Batch> {
    assert!(
        stride >= 1 && stride <= seq,
        "stride {stride} must be in 1..={seq}"
    );
    let targets = tokens.len().saturating_sub(1);
    let mut rows: Vec<(usize, usize)> = vec![]; // (start, first scored target index in window)
    let mut scored = 0; // targets 0..scored (global target t predicts token t + 1) are done
    let mut start = 0;
    while scored < targets && targets >= seq {
        let start_now = start.min(targets - seq);
        rows.push((start_now, scored - start_now));
        scored = start_now + seq;
        start += stride;
    }
    let limit = max_batches.map_or(usize::MAX, |m| m.saturating_mul(batch));
    rows.truncate(limit);
    rows.chunks(batch)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len() * (seq + 1));
            let mut weights = Vec::with_capacity(chunk.len() * seq);
            for &(s, first) in chunk {
                out.extend_from_slice(&tokens[s..s + seq + 1]);
                weights.extend((0..seq).map(|j| if j >= first { 1.0 } else { 0.0 }));
            }
            Batch {
                batch: chunk.len(),
                seq,
                tokens: out,
                weights: Some(weights),
                masked_inputs: None,
            }
        })
        .collect()
}

/// Evaluation batches over a whole split for a model with a cache (Transformer-XL's and
/// Sukhbaatar et al.'s `--full-eval-mode`): the split's targets are cut into `streams`
/// contiguous streams (their lengths differ by at most one; fewer streams when the split is
/// tiny), read block by block: batch `k` holds block `k` of every stream, so a model carries its
/// cache from one batch to the next, starting each stream with a fresh one. Every token but the
/// split's first is scored exactly once (weight 1). The last batch is the streams' last, partial
/// block (`seq` shorter than the others'); in it a stream that ended already is padded with the
/// tokens after it at weight 0. `max_batches` keeps only the first blocks of every stream.
pub fn stream_eval_batches(
    tokens: &[u32],
    streams: usize,
    seq: usize,
    max_batches: Option<usize>,
) -> Vec<Batch> {
    let targets = tokens.len().saturating_sub(1);
    let rows = streams.min(targets);
    if rows == 0 || seq == 0 {
        return vec![];
    }
    let (base, extra) = (targets / rows, targets % rows);
    let longest = base + usize::from(extra > 0);
    let blocks = longest.div_ceil(seq);
    let blocks = max_batches.map_or(blocks, |m| m.min(blocks));
    let last = tokens.len() - 1;
    (0..blocks)
        .map(|k| {
            let n = seq.min(longest - k * seq);
            let mut out = Vec::with_capacity(rows * (n + 1));
            let mut weights = Vec::with_capacity(rows * n);
            for r in 0..rows {
                let start = r * base + r.min(extra) + k * seq;
                let len = base + usize::from(r < extra);
                out.extend((0..=n).map(|j| tokens[(start + j).min(last)]));
                weights.extend((0..n).map(|j| if k * seq + j < len { 1.0 } else { 0.0 }));
            }
            Batch {
                batch: rows,
                seq: n,
                tokens: out,
                weights: Some(weights),
                masked_inputs: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_shards_are_contiguous_rows_that_rejoin_to_the_batch() {
        let tokens: Vec<u32> = (0..5000).collect();
        let batch = Sampler::Random
            .batch(&tokens, 7, 12, 3, 1)
            .masked(4999, 5000, 0.25, 3, 1);
        for parts in [1, 2, 3, 7, 9] {
            let shards = batch.split(parts);
            assert_eq!(shards.len(), parts.min(7));
            let sizes: Vec<usize> = shards.iter().map(|b| b.batch).collect();
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{sizes:?}"
            );
            let mut joined = shards[0].clone();
            for s in &shards[1..] {
                joined.batch += s.batch;
                joined.tokens.extend(&s.tokens);
                joined
                    .weights
                    .as_mut()
                    .unwrap()
                    .extend(s.weights.as_ref().unwrap());
                joined
                    .masked_inputs
                    .as_mut()
                    .unwrap()
                    .extend(s.masked_inputs.as_ref().unwrap());
            }
            assert_eq!(joined, batch, "{parts} shards rejoin to the batch");
            let total: f64 = shards.iter().map(Batch::weight_sum).sum();
            assert_eq!(total, batch.weight_sum());
        }
        let (x, y) = batch.rows(2, 4).inputs_targets();
        let (bx, by) = batch.inputs_targets();
        assert_eq!(x, bx[24..48]);
        assert_eq!(y, by[24..48]);
    }

    #[test]
    fn random_windows_are_contiguous_slices_and_reproducible() {
        let tokens: Vec<u32> = (0..1000).collect();
        let a = Sampler::Random.batch(&tokens, 4, 16, 7, 3);
        assert_eq!(
            a,
            Sampler::Random.batch(&tokens, 4, 16, 7, 3),
            "same (seed, index) -> same batch"
        );
        assert_ne!(
            a,
            Sampler::Random.batch(&tokens, 4, 16, 7, 4),
            "another index -> another batch"
        );
        assert_ne!(
            a,
            Sampler::Random.batch(&tokens, 4, 16, 8, 3),
            "another seed -> another batch"
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
    fn random_windows_reach_both_ends() {
        let tokens: Vec<u32> = (0..20).collect();
        let starts: Vec<u32> = (0..200)
            .flat_map(|i| {
                Sampler::Random
                    .batch(&tokens, 2, 9, 1, i)
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
    fn masking_follows_the_80_10_10_recipe_and_is_reproducible() {
        let tokens: Vec<u32> = (0..5000).map(|i| i % 50).collect();
        let plain = Sampler::Random.batch(&tokens, 64, 100, 1, 0);
        let m = plain.masked(50, 50, 0.15, 1, 0);
        assert_eq!(m, plain.masked(50, 50, 0.15, 1, 0));
        assert_ne!(m, plain.masked(50, 50, 0.15, 1, 1));
        let (inputs, targets) = m.inputs_targets();
        let (plain_inputs, _) = plain.inputs_targets();
        assert_eq!(
            targets, plain_inputs,
            "targets are the original, unshifted tokens"
        );
        let w = m.weights.as_ref().unwrap();
        assert_eq!(m.weight_sum(), 64.0 * 15.0, "15 positions per row of 100");
        let (mut masked, mut random, mut kept) = (0, 0, 0);
        for i in 0..inputs.len() {
            if w[i] == 0.0 {
                assert_eq!(inputs[i], targets[i], "unchosen positions are untouched");
            } else if inputs[i] == 50 {
                masked += 1;
            } else if inputs[i] == targets[i] {
                kept += 1;
            } else {
                random += 1;
            }
        }
        let n = f64::from(masked + random + kept);
        assert!(
            (f64::from(masked) / n - 0.8).abs() < 0.04,
            "{masked} of {n}"
        );
        // A random replacement can draw the original token (1 in 50), counted as kept.
        assert!(
            (f64::from(random) / n - 0.1).abs() < 0.03,
            "{random} of {n}"
        );
        assert!((f64::from(kept) / n - 0.1).abs() < 0.03, "{kept} of {n}");
    }

    #[test]
    fn streams_are_read_in_order_and_wrap() {
        let tokens: Vec<u32> = (0..100).collect();
        // 2 streams of 50 tokens, windows of 10 + 1: 4 windows per stream.
        let b0 = stream_batch(&tokens, 2, 10, 0);
        let b1 = stream_batch(&tokens, 2, 10, 1);
        assert_eq!(&b0.tokens[..11], &(0..11).collect::<Vec<u32>>()[..]);
        assert_eq!(&b0.tokens[11..], &(50..61).collect::<Vec<u32>>()[..]);
        assert_eq!(b1.tokens[0], 10, "the next batch continues each stream");
        assert_eq!(b1.tokens[11], 60);
        assert_eq!(
            stream_batch(&tokens, 2, 10, 4),
            b0,
            "an epoch later it wraps"
        );
        assert_eq!(
            Sampler::Stream.batch(&tokens, 2, 10, 99, 1),
            b1,
            "the seed does not matter"
        );
    }

    #[test]
    fn stream_restarts_mark_each_epochs_first_batch() {
        // 2 streams of 50 tokens, windows of 10 + 1: 4 windows per stream.
        let restarts: Vec<u64> = (0..10)
            .filter(|&i| stream_restarts(100, 2, 10, i))
            .collect();
        assert_eq!(restarts, vec![0, 4, 8]);
        assert_eq!(stream_windows(100, 2, 10), 4);
        assert_eq!(shard_rows(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(
            shard_rows(2, 3),
            vec![0..1, 1..2],
            "empty shards are left out"
        );
    }

    #[test]
    fn stream_eval_batches_score_every_token_once_in_stream_order() {
        let tokens: Vec<u32> = (0..101).collect();
        for (streams, seq) in [(8, 5), (3, 10), (1, 100), (4, 7), (7, 1), (200, 4), (3, 34)] {
            let batches = stream_eval_batches(&tokens, streams, seq, None);
            let rows = streams.min(100);
            let mut scored = vec![];
            // Each row of batch k + 1 continues the same row of batch k.
            let mut next: Vec<Option<i64>> = vec![None; rows];
            for (k, b) in batches.iter().enumerate() {
                assert_eq!(b.batch, rows, "{streams} streams, seq {seq}");
                assert!(
                    b.seq == seq || k == batches.len() - 1,
                    "only the last is short"
                );
                let (inputs, targets) = b.inputs_targets();
                let w = b.weights.as_ref().unwrap();
                for r in 0..rows {
                    let row = &inputs[r * b.seq..(r + 1) * b.seq];
                    if let Some(expected) = next[r]
                        && w[r * b.seq] == 1.0
                    {
                        assert_eq!(row[0], expected, "stream {r} continues at batch {k}");
                    }
                    next[r] = Some(row[b.seq - 1] + 1);
                    for j in 0..b.seq {
                        let i = r * b.seq + j;
                        if w[i] == 1.0 {
                            assert_eq!(targets[i], inputs[i] + 1, "a scored target follows");
                            scored.push(targets[i]);
                        } else {
                            // Padding only after a stream's end, in the last block.
                            assert_eq!(k, batches.len() - 1);
                            assert!(
                                w[i..(r + 1) * b.seq].iter().all(|&x| x == 0.0),
                                "padding is the row's tail"
                            );
                        }
                    }
                }
            }
            scored.sort();
            assert_eq!(
                scored,
                (1..101).collect::<Vec<i64>>(),
                "{streams} streams, seq {seq}"
            );
        }
        let capped = stream_eval_batches(&tokens, 4, 5, Some(2));
        assert_eq!(capped.len(), 2, "max_batches keeps the first blocks");
        assert_eq!(capped[1].tokens[0], 5, "of every stream");
        assert!(stream_eval_batches(&tokens[..1], 4, 5, None).is_empty());
    }

    #[test]
    fn eval_windows_score_every_token_once() {
        let tokens: Vec<u32> = (0..101).collect();
        for (seq, stride) in [(10, 10), (10, 3), (7, 7), (7, 1), (100, 100), (30, 20)] {
            let batches = eval_windows(&tokens, 3, seq, stride, None);
            let mut scored = vec![];
            for b in &batches {
                let (_, targets) = b.inputs_targets();
                let w = b.weights.as_ref().unwrap();
                for (row, chunk) in targets.chunks(seq).enumerate() {
                    for (j, t) in chunk.iter().enumerate() {
                        if w[row * seq + j] == 1.0 {
                            scored.push(*t);
                            // Context: every scored token but the first window's has >= seq - stride.
                            if *t as usize > seq {
                                assert!(
                                    j + 1 >= seq - stride,
                                    "seq {seq} stride {stride}: token {t} has context {j}"
                                );
                            }
                        }
                    }
                }
            }
            scored.sort();
            assert_eq!(
                scored,
                (1..101).collect::<Vec<i64>>(),
                "seq {seq} stride {stride}"
            );
        }
        assert_eq!(
            eval_windows(&tokens, 3, 10, 10, Some(2)).len(),
            2,
            "max_batches caps the work"
        );
        assert!(eval_windows(&tokens[..5], 3, 10, 10, None).is_empty());
    }
}
