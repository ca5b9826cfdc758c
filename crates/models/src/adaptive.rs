//! Adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs"), as
//! Transformer-XL's and adaptive-span's WikiText-103 models use it: the vocabulary, ordered by
//! frequency, is cut at `cutoffs` into a head `[0, c₁)` and tails `[cᵢ, cᵢ₊₁)`. The head
//! cluster scores the head words plus one logit per tail; tail `i` projects the hidden state to
//! `d_model / div_valⁱ` and scores its words there. A word's log-probability is its head
//! log-probability, or its tail's head log-probability plus its log-probability within the
//! tail — exact, summing to one over the whole vocabulary.
//!
//! [`AdaptiveSoftmax::nll`] computes each tail only for the rows whose target falls in it, so no
//! `[rows, vocab]` matrix is built in training; [`AdaptiveSoftmax::log_probs`] builds the whole
//! distribution (evaluation of every word, sampling, and the test reference).
//! [`AdaptiveInput`] (Baevski & Auli 2019) embeds words with the same clusters.

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The adaptive softmax's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveSoftmaxConfig {
    /// Increasing word ids where the head ends and each tail begins (Transformer-XL on
    /// WikiText-103: `[20000, 40000, 200000]`); empty: one cluster, a plain softmax.
    pub cutoffs: Vec<usize>,
    /// Tail `i` works at width `d_model / div_valⁱ` (1: every cluster at `d_model`).
    pub div_val: usize,
}

impl Default for AdaptiveSoftmaxConfig {
    fn default() -> Self {
        Self {
            cutoffs: vec![],
            div_val: 1,
        }
    }
}

impl AdaptiveSoftmaxConfig {
    /// Checks the cutoffs against the vocabulary and the widths against `d_model`; `key` is
    /// the config path the errors name.
    pub fn validate(&self, key: &str, vocab: usize, d_model: usize) -> Result<(), ModelError> {
        let mut previous = 0;
        for &c in &self.cutoffs {
            if c <= previous || c >= vocab {
                return Err(ModelError::invalid(
                    format!("{key}.cutoffs"),
                    format!("{:?}", self.cutoffs),
                    format!(
                        "must be increasing word ids, each above 0 and below the vocabulary \
                         ({vocab} words)"
                    ),
                ));
            }
            previous = c;
        }
        if self.div_val == 0 {
            return Err(ModelError::invalid(
                format!("{key}.div_val"),
                0,
                "must be at least 1 (1: every cluster at d_model)",
            ));
        }
        let last = self.width(d_model, self.cutoffs.len());
        if last == 0 {
            return Err(ModelError::invalid(
                format!("{key}.div_val"),
                self.div_val,
                format!(
                    "leaves the last of {} tails a width of 0 (d_model {d_model} / {}^{}): \
                     lower div_val or use fewer cutoffs",
                    self.cutoffs.len(),
                    self.div_val,
                    self.cutoffs.len()
                ),
            ));
        }
        Ok(())
    }

    /// The width of cluster `i` (0: the head).
    fn width(&self, d_model: usize, i: usize) -> usize {
        (0..i).fold(d_model, |w, _| w / self.div_val)
    }

    /// The head and tails for a vocabulary of `vocab` words from hidden states of `d_model`
    /// (weights normal with std 0.02, biases zero).
    pub fn init(&self, vocab: usize, d_model: usize, device: &Device) -> AdaptiveSoftmax {
        let normal = |shape: [usize; 2]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        let zeros = |n: usize| Param::from_tensor(Tensor::zeros([n], device));
        let mut bounds = self.cutoffs.clone();
        bounds.push(vocab);
        let shortlist = bounds[0];
        let tails = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let width = self.width(d_model, i + 1);
                Tail {
                    start: w[0],
                    end: w[1],
                    proj: normal([width, d_model]),
                    weight: normal([w[1] - w[0], width]),
                    bias: zeros(w[1] - w[0]),
                }
            })
            .collect::<Vec<_>>();
        AdaptiveSoftmax {
            head: normal([shortlist + tails.len(), d_model]),
            head_bias: zeros(shortlist + tails.len()),
            tails,
            shortlist,
        }
    }
}

/// One tail cluster: words `start..end`, scored at width `proj`'s rows.
#[derive(Module, Debug)]
pub struct Tail {
    /// First word id.
    pub start: usize,
    /// One past the last word id.
    pub end: usize,
    /// `d_model → width`, no bias.
    pub proj: Param<Tensor<2>>,
    /// `[end − start, width]` word embeddings of the tail.
    pub weight: Param<Tensor<2>>,
    /// `[end − start]`.
    pub bias: Param<Tensor<1>>,
}

impl Tail {
    /// Log-probabilities within the tail, `[rows, end − start]`, of hidden states `[rows, d]`.
    fn log_probs(&self, h: Tensor<2>) -> Tensor<2> {
        let x = h.matmul(self.proj.val().transpose());
        let logits = x.matmul(self.weight.val().transpose()) + self.bias.val().unsqueeze();
        activation::log_softmax(logits, 1)
    }
}

/// The adaptive softmax output layer.
#[derive(Module, Debug)]
pub struct AdaptiveSoftmax {
    /// `[shortlist + tails, d_model]`: the head words' and each tail's logit weights.
    pub head: Param<Tensor<2>>,
    /// `[shortlist + tails]`.
    pub head_bias: Param<Tensor<1>>,
    /// The tail clusters in word order.
    pub tails: Vec<Tail>,
    /// Words in the head (the first cutoff, or the whole vocabulary).
    pub shortlist: usize,
}

impl AdaptiveSoftmax {
    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tails.last().map_or(self.shortlist, |t| t.end)
    }

    /// The head cluster's log-probabilities, `[rows, shortlist + tails]`.
    fn head_log_probs(&self, h: Tensor<2>) -> Tensor<2> {
        let logits = h.matmul(self.head.val().transpose()) + self.head_bias.val().unsqueeze();
        activation::log_softmax(logits, 1)
    }

    /// Log-probabilities of every word, `[rows, vocab]`, from hidden states `[rows, d_model]`.
    pub fn log_probs(&self, h: Tensor<2>) -> Tensor<2> {
        let head = self.head_log_probs(h.clone());
        let mut parts = vec![head.clone().narrow(1, 0, self.shortlist)];
        for (i, tail) in self.tails.iter().enumerate() {
            let cluster = head.clone().narrow(1, self.shortlist + i, 1);
            parts.push(tail.log_probs(h.clone()) + cluster);
        }
        Tensor::cat(parts, 1)
    }

    /// The summed negative log-likelihood of `targets` `[rows]` (word ids) given hidden states
    /// `[rows, d_model]`: the head for every row, each tail only for the rows whose target is
    /// in it (their indices read once from `targets`).
    pub fn nll(&self, h: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let device = h.device();
        let ids: Vec<i64> = targets
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("integer targets");
        let head = self.head_log_probs(h.clone());
        // The head column each row reads: its word, or its tail's logit.
        let column: Vec<i64> = ids
            .iter()
            .map(|&t| {
                let t = t as usize;
                match self
                    .tails
                    .iter()
                    .position(|tail| t >= tail.start && t < tail.end)
                {
                    Some(i) => (self.shortlist + i) as i64,
                    None => t as i64,
                }
            })
            .collect();
        let rows = ids.len();
        let column = Tensor::<2, Int>::from_data(TensorData::new(column, [rows, 1]), &device);
        let mut total = head.gather(1, column).sum();
        for tail in &self.tails {
            let (rows, within): (Vec<i64>, Vec<i64>) = ids
                .iter()
                .enumerate()
                .filter(|(_, t)| (tail.start..tail.end).contains(&(**t as usize)))
                .map(|(r, &t)| (r as i64, t - tail.start as i64))
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device);
            let within = Tensor::<2, Int>::from_data(TensorData::new(within, [n, 1]), &device);
            let lp = tail.log_probs(h.clone().select(0, rows));
            total = total + lp.gather(1, within).sum();
        }
        total.neg()
    }
}

/// Adaptive input embeddings (Baevski & Auli 2019) with an adaptive softmax's clusters: the
/// words of cluster `i` (head `[0, c₁)`, tails `[cᵢ, cᵢ₊₁)`) have embeddings of width
/// `d_model / div_valⁱ`, each cluster projected up to `d_model` (the head too when its width
/// is not `d_model`; here it always is, so the head has no projection).
#[derive(Module, Debug)]
pub struct AdaptiveInput {
    /// `[shortlist, d_model]`: the head words' embeddings.
    pub head: Param<Tensor<2>>,
    /// The tail clusters: `weight` `[words, width]` and `proj` `[width, d_model]` read as the
    /// up-projection `x · proj`.
    pub tails: Vec<Tail>,
    /// Words in the head.
    pub shortlist: usize,
}

impl AdaptiveSoftmaxConfig {
    /// Adaptive input embeddings of `vocab` words into `d_model` with these clusters (weights
    /// normal with std 0.02; the tails' biases are unused).
    pub fn init_input(&self, vocab: usize, d_model: usize, device: &Device) -> AdaptiveInput {
        let layer = self.init(vocab, d_model, device);
        let head = Param::from_tensor(Tensor::random(
            [layer.shortlist, d_model],
            Distribution::Normal(0.0, 0.02),
            device,
        ));
        AdaptiveInput {
            head,
            tails: layer.tails,
            shortlist: layer.shortlist,
        }
    }
}

impl AdaptiveInput {
    /// The embeddings of `ids` `[batch, seq]`: `[batch, seq, d_model]`. Every cluster looks up
    /// its own words (others clamped into range and zeroed by a mask) and projects them, and
    /// the clusters are summed: exact, no scatter.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let flat = ids.reshape([batch * seq]);
        let d_model = self.head.val().dims()[1];
        let lookup = |table: Tensor<2>, start: usize, end: usize| {
            let inside = flat
                .clone()
                .greater_equal_elem(start as i64)
                .bool_and(flat.clone().lower_elem(end as i64));
            let local = flat
                .clone()
                .sub_scalar(start as i64)
                .clamp(0, (end - start - 1) as i64);
            let rows = table.select(0, local); // [batch · seq, width]
            let width = rows.dims()[1];
            rows * inside
                .float()
                .unsqueeze_dim::<2>(1)
                .expand([batch * seq, width])
        };
        let mut out = lookup(self.head.val(), 0, self.shortlist);
        for tail in &self.tails {
            let rows = lookup(tail.weight.val(), tail.start, tail.end);
            out = out + rows.matmul(tail.proj.val());
        }
        out.reshape([batch, seq, d_model])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, to_vec};

    fn config(cutoffs: &[usize], div_val: usize) -> AdaptiveSoftmaxConfig {
        AdaptiveSoftmaxConfig {
            cutoffs: cutoffs.to_vec(),
            div_val,
        }
    }

    /// f64 log-probabilities of every word from the layer's weights, composed by hand: head
    /// softmax, and for a tail word its cluster's head probability times its tail softmax.
    fn naive(layer: &AdaptiveSoftmax, h: &[f32], rows: usize, d: usize) -> Vec<f32> {
        let mat = |p: &Param<Tensor<2>>| {
            let [r, c] = p.val().dims();
            (to_vec(p.val()), r, c)
        };
        // logits = x W^T + b, then log-softmax, in f64.
        let log_softmax = |x: &[f64], (w, r, c): &(Vec<f32>, usize, usize), b: &[f32]| {
            let logits: Vec<f64> = (0..*r)
                .map(|j| {
                    (0..*c).map(|k| x[k] * f64::from(w[j * c + k])).sum::<f64>() + f64::from(b[j])
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z = logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln() + m;
            logits.iter().map(|l| l - z).collect::<Vec<f64>>()
        };
        let head = mat(&layer.head);
        let head_b = to_vec(layer.head_bias.val());
        let mut out = vec![];
        for r in 0..rows {
            let x: Vec<f64> = h[r * d..(r + 1) * d]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let hl = log_softmax(&x, &head, &head_b);
            out.extend(hl[..layer.shortlist].iter().map(|&v| v as f32));
            for (i, tail) in layer.tails.iter().enumerate() {
                let (p, pr, pc) = mat(&tail.proj);
                let y: Vec<f64> = (0..pr)
                    .map(|j| (0..pc).map(|k| x[k] * f64::from(p[j * pc + k])).sum())
                    .collect();
                let tl = log_softmax(&y, &mat(&tail.weight), &to_vec(tail.bias.val()));
                out.extend(tl.iter().map(|&v| (v + hl[layer.shortlist + i]) as f32));
            }
        }
        out
    }

    /// Log-probabilities over the whole vocabulary equal the hand-composed f64 ones and sum
    /// to one per row, for one, two and three tails at div_val 1, 2 and 4.
    #[test]
    fn log_probs_are_the_composed_distribution_and_sum_to_one() {
        let device = Device::flex();
        device.seed(3);
        let (rows, d, vocab) = (5, 16, 50);
        for (cutoffs, div) in [(vec![20], 1), (vec![10, 30], 2), (vec![5, 15, 40], 4)] {
            let layer = config(&cutoffs, div).init(vocab, d, &device);
            let h = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 3.0), &device);
            let lp = layer.log_probs(h.clone());
            assert_eq!(lp.dims(), [rows, vocab]);
            let got = to_vec(lp.clone());
            let want = naive(&layer, &to_vec(h), rows, d);
            assert_all_close(&got, &want, 1e-5, &format!("{cutoffs:?}"));
            for r in 0..rows {
                let sum: f64 = got[r * vocab..(r + 1) * vocab]
                    .iter()
                    .map(|&v| f64::from(v).exp())
                    .sum();
                assert!((sum - 1.0).abs() < 1e-5, "{cutoffs:?} row {r}: {sum}");
            }
        }
    }

    /// The training loss (tails only for their rows) equals the negative log-likelihood read
    /// off the whole distribution, in value and in the gradients of the hidden states and of
    /// every weight; targets in the head, in every tail, and a tail no target falls in.
    #[test]
    fn nll_equals_the_whole_distribution_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let (d, vocab) = (12, 40);
        let layer = config(&[8, 20, 30], 2).init(vocab, d, &device);
        let targets = [0i64, 9, 25, 7, 19, 3, 8];
        let rows = targets.len();
        let h =
            Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 2.0), &device).require_grad();
        let t = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [rows]), &device);
        let run = |loss: Tensor<1>| {
            let grads = loss.clone().backward();
            let mut out = vec![to_vec(loss), to_vec(h.grad(&grads).unwrap())];
            out.push(to_vec(layer.head.val().grad(&grads).unwrap()));
            for tail in &layer.tails[..2] {
                out.push(to_vec(tail.proj.val().grad(&grads).unwrap()));
                out.push(to_vec(tail.weight.val().grad(&grads).unwrap()));
            }
            out
        };
        let fast = run(layer.nll(h.clone(), t.clone()));
        let full = layer
            .log_probs(h.clone())
            .gather(1, t.clone().unsqueeze_dim(1))
            .sum()
            .neg();
        let reference = run(full);
        for (i, (a, b)) in fast.iter().zip(&reference).enumerate() {
            assert_all_close(a, b, 1e-5, &format!("part {i}"));
        }
    }

    /// Without cutoffs it is a plain softmax head: `log_softmax(h Wᵀ + b)`.
    #[test]
    fn without_cutoffs_it_is_a_plain_softmax() {
        let device = Device::flex();
        device.seed(5);
        let layer = config(&[], 1).init(30, 8, &device);
        assert!(layer.tails.is_empty());
        let h = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
        let plain = activation::log_softmax(
            h.clone().matmul(layer.head.val().transpose()) + layer.head_bias.val().unsqueeze(),
            1,
        );
        assert_eq!(to_vec(layer.log_probs(h)), to_vec(plain));
    }

    /// Bad settings name the key and the fix.
    #[test]
    fn bad_cutoffs_and_div_val_name_the_key() {
        let err = |c: &[usize], div: usize| {
            config(c, div)
                .validate("head", 100, 64)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[20, 10], 1).contains("model.head.cutoffs"));
        assert!(err(&[20, 100], 1).contains("below the vocabulary"));
        assert!(err(&[0], 1).contains("model.head.cutoffs"));
        assert!(err(&[10], 0).contains("model.head.div_val"));
        let e = err(&[10, 20, 30, 40], 4); // 64 / 4^4 = 0
        assert!(
            e.contains("model.head.div_val") && e.contains("width of 0"),
            "{e}"
        );
        assert!(config(&[10, 20, 30], 4).validate("head", 100, 64).is_ok());
    }

    /// Adaptive input equals a lookup by hand: a head word's row, or a tail word's row
    /// times its cluster's projection; words of every cluster in one batch.
    #[test]
    fn adaptive_input_equals_a_lookup_by_hand() {
        let device = Device::flex();
        device.seed(6);
        let (d, vocab) = (8, 30);
        let input = config(&[6, 15], 2).init_input(vocab, d, &device);
        let ids = [0i64, 5, 6, 14, 15, 29, 3, 20];
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [2, 4]), &device);
        let got = to_vec(input.forward(t));
        let head = to_vec(input.head.val());
        let mut want = vec![];
        for &id in &ids {
            let id = id as usize;
            match input
                .tails
                .iter()
                .find(|tail| (tail.start..tail.end).contains(&id))
            {
                None => want.extend_from_slice(&head[id * d..(id + 1) * d]),
                Some(tail) => {
                    let w = to_vec(tail.weight.val());
                    let p = to_vec(tail.proj.val()); // [width, d]
                    let width = tail.proj.val().dims()[0];
                    let row = &w[(id - tail.start) * width..][..width];
                    want.extend((0..d).map(|c| {
                        (0..width)
                            .map(|k| f64::from(row[k]) * f64::from(p[k * d + c]))
                            .sum::<f64>() as f32
                    }));
                }
            }
        }
        assert_all_close(&got, &want, 1e-5, "adaptive input");
        assert_eq!(input.tails[1].proj.val().dims(), [2, d], "width 8 / 2^2");
    }
}
