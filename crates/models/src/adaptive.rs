//! Adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs"), as
//! Transformer-XL's and adaptive-span's WikiText-103 models use it: the vocabulary, ordered by
//! frequency, is cut at `cutoffs` into a head `[0, c₁)` and tails `[cᵢ, cᵢ₊₁)`. The head
//! cluster scores the head words plus one logit per tail; tail `i` projects the hidden state to
//! `d_model / div_valⁱ` and scores its words there. A word's log-probability is its head
//! log-probability, or its tail's head log-probability plus its log-probability within the
//! tail — exact, summing to one over the whole vocabulary.
//!
//! [`AdaptiveSoftmax::nll`] computes each tail only for the rows whose target falls in it, so no
//! `[rows, vocab]` matrix is built in training or evaluation; [`AdaptiveSoftmax::log_probs`]
//! builds the whole distribution (sampling, and the test reference). [`Clusters`] holds the
//! words' vectors by cluster: it is the adaptive input embedding (Baevski & Auli 2019), and a
//! tied adaptive softmax scores with the input's clusters instead of its own.

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, FloatDType, Int, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// The `[model.adaptive]` section: adaptive softmax (and input) clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Increasing word ids where the head ends and each tail begins (Transformer-XL on
    /// WikiText-103: `[20000, 40000, 200000]`); empty: one cluster, a plain softmax.
    pub cutoffs: Vec<usize>,
    /// Tail `i` works at width `d_model / div_valⁱ` (1: every cluster at `d_model`).
    pub div_val: usize,
    /// Adaptive input embeddings with the same clusters instead of a `[vocab, d_model]` token
    /// embedding (Baevski & Auli 2019). With `model.tie_embeddings` the softmax scores words
    /// with the input's vectors and projections (Transformer-XL's `tie_weight` + `tie_projs`,
    /// adaptive-span's `--adapt-io-tied`).
    pub input: bool,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            cutoffs: vec![],
            div_val: 1,
            input: true,
        }
    }
}

impl AdaptiveConfig {
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

    /// The word vectors of `vocab` words by cluster for hidden states of `d_model` (normal,
    /// std 0.02): what an adaptive input is, and what a tied adaptive softmax reads.
    pub fn init_clusters(&self, vocab: usize, d_model: usize, device: &Device) -> Clusters {
        let mut bounds = self.cutoffs.clone();
        bounds.push(vocab);
        Clusters {
            head: normal([bounds[0], d_model], device),
            tails: bounds
                .windows(2)
                .enumerate()
                .map(|(i, w)| {
                    let width = self.width(d_model, i + 1);
                    Tail {
                        start: w[0],
                        end: w[1],
                        proj: normal([width, d_model], device),
                        weight: normal([w[1] - w[0], width], device),
                    }
                })
                .collect(),
            shortlist: bounds[0],
        }
    }

    /// An adaptive softmax over `vocab` words from hidden states of `d_model`: with word
    /// vectors of its own, or (`tied`) reading an adaptive input's. Biases start at zero.
    pub fn init_softmax(
        &self,
        vocab: usize,
        d_model: usize,
        tied: bool,
        device: &Device,
    ) -> AdaptiveSoftmax {
        let zeros = |n: usize| Param::from_tensor(Tensor::zeros([n], device));
        let words = (!tied).then(|| self.init_clusters(vocab, d_model, device));
        let mut bounds = self.cutoffs.clone();
        bounds.push(vocab);
        let n_tails = self.cutoffs.len();
        AdaptiveSoftmax {
            words,
            cluster_weight: (n_tails > 0).then(|| normal([n_tails, d_model], device)),
            head_bias: zeros(bounds[0] + n_tails),
            tail_bias: bounds.windows(2).map(|w| zeros(w[1] - w[0])).collect(),
        }
    }
}

fn normal(shape: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Normal(0.0, 0.02),
        device,
    ))
}

/// One tail cluster's word vectors: words `start..end` at width `proj`'s rows.
#[derive(Module, Debug)]
pub struct Tail {
    /// First word id.
    pub start: usize,
    /// One past the last word id.
    pub end: usize,
    /// `[width, d_model]`: the softmax projects hidden states down with `h · projᵀ`, the
    /// adaptive input projects embeddings up with `e · proj`.
    pub proj: Param<Tensor<2>>,
    /// `[end − start, width]` word vectors of the tail.
    pub weight: Param<Tensor<2>>,
}

impl Tail {
    fn contains(&self, id: usize) -> bool {
        (self.start..self.end).contains(&id)
    }

    /// Log-probabilities within the tail, `[rows, end − start]`, of hidden states `[rows, d]`
    /// (the logits in the model's precision, the log-softmax in f32 as for a full softmax).
    fn log_probs(&self, h: Tensor<2>, bias: &Param<Tensor<1>>) -> Tensor<2> {
        activation::log_softmax(self.logits(h, bias).cast(FloatDType::F32), 1)
    }

    /// Logits within the tail, `[rows, end − start]`.
    fn logits(&self, h: Tensor<2>, bias: &Param<Tensor<1>>) -> Tensor<2> {
        let x = h.matmul(self.proj.val().transpose());
        x.matmul(self.weight.val().transpose()) + bias.val().unsqueeze()
    }
}

/// Word vectors by frequency cluster (head `[0, c₁)` at `d_model`, tail `i` at
/// `d_model / div_valⁱ` with a projection): as a module of its own, the adaptive input
/// embedding (Baevski & Auli 2019); an adaptive softmax has one, or reads the input's when
/// tied.
#[derive(Module, Debug)]
pub struct Clusters {
    /// `[shortlist, d_model]`: the head words' vectors.
    pub head: Param<Tensor<2>>,
    /// The tail clusters in word order.
    pub tails: Vec<Tail>,
    /// Words in the head (the first cutoff, or the whole vocabulary).
    pub shortlist: usize,
}

impl Clusters {
    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tails.last().map_or(self.shortlist, |t| t.end)
    }

    /// The adaptive input embeddings of `ids` `[batch, seq]`: `[batch, seq, d_model]`. Every
    /// cluster looks up its own words (others clamped into range and zeroed by a mask) and
    /// projects them up, and the clusters are summed: exact, no scatter.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
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

/// The adaptive softmax output layer (Grave et al. 2017).
#[derive(Module, Debug)]
pub struct AdaptiveSoftmax {
    /// The word vectors it scores with; `None` when tied to an adaptive input's (pass those
    /// to every method).
    pub words: Option<Clusters>,
    /// `[tails, d_model]`: each tail cluster's logit in the head softmax (`None`: no tails).
    pub cluster_weight: Option<Param<Tensor<2>>>,
    /// `[shortlist + tails]`: the head softmax's biases, words then clusters.
    pub head_bias: Param<Tensor<1>>,
    /// `[end − start]` per tail.
    pub tail_bias: Vec<Param<Tensor<1>>>,
}

impl AdaptiveSoftmax {
    /// Its word vectors: its own, or `tied` (an adaptive input's).
    ///
    /// # Panics
    /// When it has none of its own and `tied` is `None`.
    fn words<'a>(&'a self, tied: Option<&'a Clusters>) -> &'a Clusters {
        self.words
            .as_ref()
            .or(tied)
            .expect("a tied adaptive softmax reads its adaptive input's clusters")
    }

    /// The head cluster's log-probabilities, `[rows, shortlist + tails]`.
    fn head_log_probs(&self, words: &Clusters, h: Tensor<2>) -> Tensor<2> {
        activation::log_softmax(self.head_logits(words, h).cast(FloatDType::F32), 1)
    }

    /// The head cluster's logits, `[rows, shortlist + tails]`.
    fn head_logits(&self, words: &Clusters, h: Tensor<2>) -> Tensor<2> {
        let weight = match &self.cluster_weight {
            Some(c) => Tensor::cat(vec![words.head.val(), c.val()], 0),
            None => words.head.val(),
        };
        h.matmul(weight.transpose()) + self.head_bias.val().unsqueeze()
    }

    /// Log-probabilities of every word, `[rows, vocab]`, from hidden states `[rows, d_model]`
    /// (`tied`: the adaptive input's clusters, when it has none of its own).
    pub fn log_probs(&self, tied: Option<&Clusters>, h: Tensor<2>) -> Tensor<2> {
        let words = self.words(tied);
        let head = self.head_log_probs(words, h.clone());
        let s = words.shortlist;
        let mut parts = vec![head.clone().narrow(1, 0, s)];
        for (i, (tail, bias)) in words.tails.iter().zip(&self.tail_bias).enumerate() {
            let cluster = head.clone().narrow(1, s + i, 1);
            parts.push(tail.log_probs(h.clone(), bias) + cluster);
        }
        Tensor::cat(parts, 1)
    }

    /// The negative log-likelihood of `targets` `[rows]` (word ids) given hidden states
    /// `[rows, d_model]`, each row's multiplied by its weight (`weights` `[rows]`, when
    /// given), summed: the head for every row, each tail only for the rows whose target is
    /// in it (their indices read once from `targets`). Never a `[rows, vocab]` matrix.
    pub fn nll(
        &self,
        tied: Option<&Clusters>,
        h: Tensor<2>,
        targets: Tensor<1, Int>,
        weights: Option<Tensor<1>>,
    ) -> Tensor<1> {
        let words = self.words(tied);
        let device = h.device();
        let ids: Vec<i64> = targets
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("integer targets");
        // Each softmax's negative log-likelihood straight from its logits (the fused
        // cross-entropy on flex, one pass per row each way; log-softmax + gather elsewhere):
        // no log-probability matrix is kept for the backward.
        let nll_of = |logits: Tensor<2>, picks: Vec<i64>| {
            let [n, _] = logits.dims();
            let picks = Tensor::<2, Int>::from_data(TensorData::new(picks, [1, n]), &device);
            crate::loss::token_nll(logits.unsqueeze_dim(0), picks).reshape([n])
        };
        // The head column each row reads: its word, or its tail's logit.
        let column: Vec<i64> = ids
            .iter()
            .map(
                |&t| match words.tails.iter().position(|x| x.contains(t as usize)) {
                    Some(i) => (words.shortlist + i) as i64,
                    None => t,
                },
            )
            .collect();
        let picked = nll_of(self.head_logits(words, h.clone()), column);
        let weights = weights.map(|w| w.cast(FloatDType::F32));
        let mut total = match &weights {
            Some(w) => (picked * w.clone()).sum(),
            None => picked.sum(),
        };
        for (tail, bias) in words.tails.iter().zip(&self.tail_bias) {
            let (selected, within): (Vec<i64>, Vec<i64>) = ids
                .iter()
                .enumerate()
                .filter(|(_, t)| tail.contains(**t as usize))
                .map(|(r, &t)| (r as i64, t - tail.start as i64))
                .unzip();
            if selected.is_empty() {
                continue;
            }
            let n = selected.len();
            let selected = Tensor::<1, Int>::from_data(TensorData::new(selected, [n]), &device);
            let picked = nll_of(
                tail.logits(h.clone().select(0, selected.clone()), bias),
                within,
            );
            total = total
                + match &weights {
                    Some(w) => (picked * w.clone().select(0, selected)).sum(),
                    None => picked.sum(),
                };
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, to_vec};

    fn config(cutoffs: &[usize], div_val: usize) -> AdaptiveConfig {
        AdaptiveConfig {
            cutoffs: cutoffs.to_vec(),
            div_val,
            input: false,
        }
    }

    /// f64 log-probabilities of every word from the layer's weights, composed by hand: head
    /// softmax, and for a tail word its cluster's head probability times its tail softmax.
    fn naive(layer: &AdaptiveSoftmax, h: &[f32], rows: usize, d: usize) -> Vec<f32> {
        let words = layer.words.as_ref().unwrap();
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
        let mut head = mat(&words.head);
        if let Some(c) = &layer.cluster_weight {
            let (w, r, _) = mat(c);
            head.0.extend(w);
            head.1 += r;
        }
        let head_b = to_vec(layer.head_bias.val());
        let mut out = vec![];
        for r in 0..rows {
            let x: Vec<f64> = h[r * d..(r + 1) * d]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let hl = log_softmax(&x, &head, &head_b);
            out.extend(hl[..words.shortlist].iter().map(|&v| v as f32));
            for (i, tail) in words.tails.iter().enumerate() {
                let (p, pr, pc) = mat(&tail.proj);
                let y: Vec<f64> = (0..pr)
                    .map(|j| (0..pc).map(|k| x[k] * f64::from(p[j * pc + k])).sum())
                    .collect();
                let tl = log_softmax(&y, &mat(&tail.weight), &to_vec(layer.tail_bias[i].val()));
                out.extend(tl.iter().map(|&v| (v + hl[words.shortlist + i]) as f32));
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
            let layer = config(&cutoffs, div).init_softmax(vocab, d, false, &device);
            // Non-zero biases, so that they are checked too.
            let layer = AdaptiveSoftmax {
                head_bias: Param::from_tensor(layer.head_bias.val().add_scalar(0.3)),
                tail_bias: layer
                    .tail_bias
                    .iter()
                    .map(|b| Param::from_tensor(b.val().sub_scalar(0.2)))
                    .collect(),
                ..layer
            };
            let h = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 3.0), &device);
            let lp = layer.log_probs(None, h.clone());
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
    /// every weight; targets in the head, in every tail, and a tail no target falls in;
    /// without weights and with per-row weights (some zero).
    #[test]
    fn nll_equals_the_whole_distribution_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let (d, vocab) = (12, 40);
        let layer = config(&[8, 20, 30], 2).init_softmax(vocab, d, false, &device);
        let words = layer.words.as_ref().unwrap();
        let targets = [0i64, 9, 25, 7, 19, 3, 8];
        let rows = targets.len();
        let t = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), [rows]), &device);
        let w = Tensor::<1>::from_floats([1.0, 0.0, 2.0, 0.5, 1.0, 0.0, 3.0], &device);
        for weights in [None, Some(w)] {
            let h = Tensor::<2>::random([rows, d], Distribution::Normal(0.0, 2.0), &device)
                .require_grad();
            let run = |loss: Tensor<1>| {
                let grads = loss.clone().backward();
                let mut out = vec![to_vec(loss), to_vec(h.grad(&grads).unwrap())];
                out.push(to_vec(words.head.val().grad(&grads).unwrap()));
                let clusters = layer.cluster_weight.as_ref().unwrap();
                out.push(to_vec(clusters.val().grad(&grads).unwrap()));
                out.push(to_vec(layer.head_bias.val().grad(&grads).unwrap()));
                for (tail, bias) in words.tails[..2].iter().zip(&layer.tail_bias) {
                    out.push(to_vec(tail.proj.val().grad(&grads).unwrap()));
                    out.push(to_vec(tail.weight.val().grad(&grads).unwrap()));
                    out.push(to_vec(bias.val().grad(&grads).unwrap()));
                }
                out
            };
            let fast = run(layer.nll(None, h.clone(), t.clone(), weights.clone()));
            let picked = layer
                .log_probs(None, h.clone())
                .gather(1, t.clone().unsqueeze_dim(1))
                .reshape([rows]);
            let full = match &weights {
                Some(w) => (picked * w.clone()).sum().neg(),
                None => picked.sum().neg(),
            };
            let reference = run(full);
            for (i, (a, b)) in fast.iter().zip(&reference).enumerate() {
                assert_all_close(
                    a,
                    b,
                    1e-5,
                    &format!("weights {} part {i}", weights.is_some()),
                );
            }
        }
    }

    /// Without cutoffs it is a plain softmax head: `log_softmax(h Wᵀ + b)`.
    #[test]
    fn without_cutoffs_it_is_a_plain_softmax() {
        let device = Device::flex();
        device.seed(5);
        let layer = config(&[], 1).init_softmax(30, 8, false, &device);
        let words = layer.words.as_ref().unwrap();
        assert!(words.tails.is_empty() && layer.cluster_weight.is_none());
        let h = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
        let plain = activation::log_softmax(
            h.clone().matmul(words.head.val().transpose()) + layer.head_bias.val().unsqueeze(),
            1,
        );
        assert_eq!(to_vec(layer.log_probs(None, h)), to_vec(plain));
    }

    /// Bad settings name the key and the fix.
    #[test]
    fn bad_cutoffs_and_div_val_name_the_key() {
        let err = |c: &[usize], div: usize| {
            config(c, div)
                .validate("adaptive", 100, 64)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[20, 10], 1).contains("model.adaptive.cutoffs"));
        assert!(err(&[20, 100], 1).contains("below the vocabulary"));
        assert!(err(&[0], 1).contains("model.adaptive.cutoffs"));
        assert!(err(&[10], 0).contains("model.adaptive.div_val"));
        let e = err(&[10, 20, 30, 40], 4); // 64 / 4^4 = 0
        assert!(
            e.contains("model.adaptive.div_val") && e.contains("width of 0"),
            "{e}"
        );
        assert!(
            config(&[10, 20, 30], 4)
                .validate("adaptive", 100, 64)
                .is_ok()
        );
    }

    /// Adaptive input equals a lookup by hand: a head word's row, or a tail word's row
    /// times its cluster's projection; words of every cluster in one batch.
    #[test]
    fn adaptive_input_equals_a_lookup_by_hand() {
        let device = Device::flex();
        device.seed(6);
        let (d, vocab) = (8, 30);
        let input = config(&[6, 15], 2).init_clusters(vocab, d, &device);
        let ids = [0i64, 5, 6, 14, 15, 29, 3, 20];
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [2, 4]), &device);
        let got = to_vec(input.embed(t));
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
