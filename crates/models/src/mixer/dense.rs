//! Dense multi-head self-attention (Vaswani et al. 2017), the baseline every other mixer is
//! measured against: each query attends to every key (or, when causal, every earlier key), so
//! time and memory grow as O(seq²) per head.
//!
//! Our own implementation rather than `burn::nn::attention::MultiHeadAttention`: we check
//! `d_model % n_heads`, support RoPE, and keep the projections apart from the score kernel so the
//! sparse variants can differ only in which keys each query sees.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::{Bool, Device, Tensor, activation};
use serde::{Deserialize, Serialize};

use super::context::MixerContext;
use crate::cache::CacheView;
use crate::error::ModelError;
use crate::init;

/// Settings of [`DenseAttention`] under `[model.mixer]` with `kind = "dense"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenseAttentionConfig {
    /// Number of heads; must divide `d_model`.
    pub n_heads: usize,
    /// Mask future positions (autoregressive LM). `false` gives a bidirectional encoder.
    pub causal: bool,
}

impl Default for DenseAttentionConfig {
    fn default() -> Self {
        Self {
            n_heads: 4,
            causal: true,
        }
    }
}

impl DenseAttentionConfig {
    pub(crate) fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        if ctx.relative_positions {
            return Err(ModelError::invalid(
                "position",
                "\"relative\"",
                "dense attention has no relative-position term; use \"learned\" or \"rope\" \
                 (relative positions belong to kind = \"persistent\")",
            ));
        }
        self.validate_heads(ctx)
    }

    /// Checks shared by every attention mixer built on these projections.
    pub(crate) fn validate_heads(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        if self.n_heads == 0 || !ctx.d_model.is_multiple_of(self.n_heads) {
            return Err(ModelError::invalid(
                "mixer.n_heads",
                self.n_heads,
                format!(
                    "n_heads must divide d_model = {} (try one of {:?})",
                    ctx.d_model,
                    divisors(ctx.d_model)
                ),
            ));
        }
        if ctx.rope_theta.is_some() && !(ctx.d_model / self.n_heads).is_multiple_of(2) {
            return Err(ModelError::invalid(
                "mixer.n_heads",
                self.n_heads,
                format!(
                    "RoPE needs an even head width, but d_model / n_heads = {}",
                    ctx.d_model / self.n_heads
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn init(&self, ctx: &MixerContext, device: &Device) -> DenseAttention {
        let d_head = ctx.d_model / self.n_heads;
        DenseAttention {
            qkv: init::linear(ctx.d_model, 3 * ctx.d_model, ctx.bias, init::STD, device),
            proj: init::linear(
                ctx.d_model,
                ctx.d_model,
                ctx.bias,
                init::residual_std(ctx.n_layers),
                device,
            ),
            attn_dropout: DropoutConfig::new(ctx.dropout).init(),
            resid_dropout: DropoutConfig::new(ctx.dropout).init(),
            rope: ctx.rope_theta.map(|theta| {
                RotaryEncodingConfig::new(ctx.max_seq_len, d_head)
                    .with_theta(theta)
                    .init(device)
            }),
            n_heads: self.n_heads,
            causal: self.causal,
            fused: ctx.fused_attention,
        }
    }
}

/// The score of a key outside a cached query's window: far below any real score, but finite,
/// so a row with no visible key gives no NaN (its weights are zeroed after the softmax).
pub(crate) const MASKED: f32 = -1.0e30;

/// Softmax over the last dimension of scores whose `hidden` entries hold [`MASKED`], those
/// weights then set to exactly zero (so a row with no visible key is all zeros, not uniform).
pub(crate) fn masked_softmax(scores: Tensor<4>, hidden: Tensor<4, Bool>) -> Tensor<4> {
    activation::softmax(scores, 3).mask_fill(hidden, 0.0)
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|k| n.is_multiple_of(*k)).take(8).collect()
}

/// Multi-head self-attention with a fused query/key/value projection.
#[derive(Module, Debug)]
pub struct DenseAttention {
    /// `d_model -> 3 · d_model`: queries, keys and values of all heads.
    pub qkv: Linear,
    /// `d_model -> d_model` output projection (writes into the residual stream).
    pub proj: Linear,
    /// Dropout on the attention weights.
    pub attn_dropout: Dropout,
    /// Dropout on the sublayer output.
    pub resid_dropout: Dropout,
    /// Rotary embedding of queries and keys, when the model uses RoPE.
    pub rope: Option<RotaryEncoding>,
    /// Number of heads.
    pub n_heads: usize,
    /// Whether future positions are masked.
    pub causal: bool,
    /// Whether attention may run as the fused tiled operation (where the backend has it).
    pub fused: bool,
}

impl DenseAttention {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let (q, k, v) = self.project(x);
        let y = self.attend(q, k, v); // [batch, n_heads, seq, d_head]
        let y = y.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.resid_dropout
            .forward(crate::ops::linear::forward(&self.proj, y))
    }

    /// Queries, keys and values per head, with RoPE applied when configured.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - outputs: three `[batch, n_heads, seq, d_head]`
    pub fn project(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [batch, seq, d_model] = x.dims();
        let d_head = d_model / self.n_heads;
        let heads = |t: Tensor<3>| {
            t.reshape([batch, seq, self.n_heads, d_head])
                .swap_dims(1, 2) // [batch, n_heads, seq, d_head]
        };
        let mut qkv = crate::ops::linear::forward(&self.qkv, x)
            .chunk(3, 2)
            .into_iter()
            .map(heads);
        let (mut q, mut k, v) = (
            qkv.next().unwrap(),
            qkv.next().unwrap(),
            qkv.next().unwrap(),
        );
        if let Some(rope) = &self.rope {
            q = rope.forward(q);
            k = rope.forward(k);
        }
        (q, k, v)
    }

    /// Scaled dot-product attention of every query over every (earlier, if causal) key.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, n_heads, seq, d_head]`
    /// - output: `[batch, n_heads, seq, d_head]`
    pub fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let d_head = q.dims()[3];
        let fused = self.fused && crate::ops::attention::attention_fused_on(&q.device(), d_head);
        self.attend_with(q, k, v, fused)
    }

    /// [`attend`](Self::attend) as the fused tiled operation
    /// ([`AttentionOps`](super::AttentionOps): flex and the Cube backends; `n × n` scores never
    /// materialised,
    /// probabilities recomputed in the backward) or composed from tensor ops (every backend,
    /// and the reference the fused operation is tested against).
    pub fn attend_with(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, fused: bool) -> Tensor<4> {
        if fused {
            return self.attend_tiled(
                q,
                k,
                v,
                crate::ops::attention::KeyLayout::dense(self.causal),
            );
        }
        let [batch, n_heads, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [batch, n_heads, seq, seq]
        if self.causal {
            // `true` above the diagonal: key j > query i is in the future.
            let future = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &scores.device())
                .unsqueeze::<4>()
                .expand([batch, n_heads, seq, seq]);
            scores = scores.mask_fill(future, f32::NEG_INFINITY);
        }
        let weights = self.attn_dropout.forward(activation::softmax(scores, 3));
        weights.matmul(v)
    }

    /// The mixer over a block `x` with its `cache` of earlier inputs (segment-level recurrence,
    /// [`crate::cache`]): queries from `x`, keys and values from `[cache ; x]`, each query over
    /// its window. RoPE rotates by position within `[cache ; x]` (only distances matter).
    /// Composed tensor ops on every backend.
    ///
    /// # Shapes
    /// - `x`: `[batch, n, d_model]`, `cache`: `[batch, s, d_model]`
    /// - output: `[batch, n, d_model]`
    pub fn forward_cached(&self, x: Tensor<3>, cache: Tensor<3>, view: &CacheView) -> Tensor<3> {
        self.cached_layer(x, cache, |q, k, v| self.attend_cached(q, k, v, view))
    }

    /// A cached layer around its attention: queries from `x`, keys and values from
    /// `[cache ; x]` (`attend` maps them to `[batch, n_heads, n, d_head]`), the output
    /// projection and its dropout.
    pub(crate) fn cached_layer(
        &self,
        x: Tensor<3>,
        cache: Tensor<3>,
        attend: impl FnOnce(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
    ) -> Tensor<3> {
        let [batch, n, d_model] = x.dims();
        let s = cache.dims()[1];
        let (q, k, v) = self.project(Tensor::cat(vec![cache, x], 1));
        let y = attend(q.narrow(2, s, n), k, v);
        let y = y.swap_dims(1, 2).reshape([batch, n, d_model]);
        self.resid_dropout
            .forward(crate::ops::linear::forward(&self.proj, y))
    }

    /// Scaled dot-product attention of `n` queries over `s + n` keys `[cache ; block]`, each
    /// query over its window (a query with no key in it — possible at a masked stream start
    /// without self — gives zeros): the fused operation on flex and Cube (the `[n, s + n]`
    /// scores never materialised), composed tensor ops elsewhere.
    ///
    /// # Shapes
    /// - `q`: `[batch, n_heads, n, d_head]`; `k`, `v`: `[batch, n_heads, s + n, d_head]`
    /// - output: `[batch, n_heads, n, d_head]`
    pub fn attend_cached(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        view: &CacheView,
    ) -> Tensor<4> {
        let fused = self.fused
            && crate::ops::attention::cached_attention_fused_on(&q.device(), q.dims()[3]);
        self.attend_cached_with(q, k, v, view, fused)
    }

    /// [`attend_cached`](Self::attend_cached) as the fused operation (flex, Cube) or composed from
    /// tensor ops (every backend, and the fused path's reference).
    pub fn attend_cached_with(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        view: &CacheView,
        fused: bool,
    ) -> Tensor<4> {
        let [batch, n_heads, n, d_head] = q.dims();
        let keys = k.dims()[2];
        if fused {
            let layout = view.key_layout(keys - n, n_heads);
            return self.attend_tiled(q, k, v, layout);
        }
        let scale = 1.0 / (d_head as f64).sqrt();
        let (hidden, _) = view.masks(n, keys - n, &q.device());
        let hidden = hidden.expand([batch, n_heads, n, keys]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(scale)
            .mask_fill(hidden.clone(), MASKED);
        let weights = masked_softmax(scores, hidden);
        self.attn_dropout.forward(weights).matmul(v)
    }

    /// The fused path over the keys `keys` (dense here; the sparse mixer passes its pattern).
    pub(crate) fn attend_tiled(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        keys: crate::ops::attention::KeyLayout,
    ) -> Tensor<4> {
        let [.., d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let dropout = crate::ops::dropout::fused_dropout(&self.attn_dropout, &q.device());
        let extras = crate::ops::attention::Extras::default();
        crate::ops::attention::attention(q.mul_scalar(scale), k, v, extras, keys, dropout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_all_close, devices, to_vec};
    use burn::tensor::Distribution;

    fn ctx(d_model: usize, rope: bool) -> MixerContext {
        MixerContext {
            d_model,
            n_layers: 2,
            dropout: 0.0,
            max_seq_len: 16,
            rope_theta: rope.then_some(10_000.0),
            relative_positions: false,
            bias: true,
            layer: 0,
            fused_attention: true,
        }
    }

    /// Naive reference: explicit loops over batch, head, query and key.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: [usize; 4],
        causal: bool,
    ) -> Vec<f32> {
        let [b, h, s, dh] = dims;
        let at = |t: &[f32], bi, hi, si, di| t[((bi * h + hi) * s + si) * dh + di];
        let mut out = vec![0.0f32; b * h * s * dh];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..s {
                    let keys = if causal { i + 1 } else { s };
                    let scores: Vec<f64> = (0..keys)
                        .map(|j| {
                            (0..dh)
                                .map(|d| {
                                    f64::from(at(q, bi, hi, i, d)) * f64::from(at(k, bi, hi, j, d))
                                })
                                .sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let exp: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = exp.iter().sum();
                    for d in 0..dh {
                        let y: f64 = (0..keys)
                            .map(|j| exp[j] / z * f64::from(at(v, bi, hi, j, d)))
                            .sum();
                        out[((bi * h + hi) * s + i) * dh + d] = y as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_per_head_loops() {
        for (name, device) in devices() {
            for causal in [true, false] {
                for rope in [false, true] {
                    device.seed(3);
                    let (batch, seq, d_model, n_heads) = (2, 7, 16, 4);
                    let cfg = DenseAttentionConfig { n_heads, causal };
                    let attn = cfg.init(&ctx(d_model, rope), &device);
                    let x = Tensor::<3>::random(
                        [batch, seq, d_model],
                        Distribution::Normal(0.0, 1.0),
                        &device,
                    );
                    let (q, k, v) = attn.project(x.clone());
                    let dims = q.dims();
                    let reference =
                        naive_attention(&to_vec(q), &to_vec(k), &to_vec(v), dims, causal);

                    // Merge heads and project by hand: y[b, s, h·dh + d] = out[b, h, s, d].
                    let dh = d_model / n_heads;
                    let w = to_vec(attn.proj.weight.val()); // [d_in, d_out]
                    let bias = to_vec(attn.proj.bias.as_ref().unwrap().val());
                    let mut expected = vec![0.0f32; batch * seq * d_model];
                    for b in 0..batch {
                        for s in 0..seq {
                            for o in 0..d_model {
                                let mut acc = f64::from(bias[o]);
                                for i in 0..d_model {
                                    let (h, d) = (i / dh, i % dh);
                                    let y = reference[((b * n_heads + h) * seq + s) * dh + d];
                                    acc += f64::from(y) * f64::from(w[i * d_model + o]);
                                }
                                expected[(b * seq + s) * d_model + o] = acc as f32;
                            }
                        }
                    }
                    let got = to_vec(attn.forward(x));
                    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{name} causal={causal} rope={rope} at {i}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The layer's fused path (the tiled flex operation) against its composed path: outputs and
    /// the gradients of the input and of both projections, causal and bidirectional, with RoPE,
    /// at lengths 1, 7 and 100 (a partial tile).
    #[test]
    fn fused_path_equals_composed_path_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        for causal in [true, false] {
            for seq in [1, 7, 100] {
                device.seed(seq as u64);
                let mut context = ctx(16, true);
                context.max_seq_len = 100;
                let attn = DenseAttentionConfig { n_heads: 2, causal }.init(&context, &device);
                let r =
                    || Tensor::<3>::random([2, seq, 16], Distribution::Normal(0.0, 1.0), &device);
                let (x, w) = (r().require_grad(), r());
                let run = |fused: bool| {
                    let (q, k, v) = attn.project(x.clone());
                    let y = attn
                        .attend_with(q, k, v, fused)
                        .swap_dims(1, 2)
                        .reshape([2, seq, 16]);
                    let y = attn.proj.forward(y);
                    let grads = (y.clone() * w.clone()).sum().backward();
                    vec![
                        to_vec(y),
                        to_vec(x.grad(&grads).unwrap()),
                        to_vec(attn.qkv.weight.val().grad(&grads).unwrap()),
                        to_vec(attn.proj.weight.val().grad(&grads).unwrap()),
                    ]
                };
                let (fused, composed) = (run(true), run(false));
                for ((name, a), b) in ["output", "dx", "d qkv", "d proj"]
                    .iter()
                    .zip(&fused)
                    .zip(&composed)
                {
                    assert_all_close(a, b, 2e-5, &format!("causal={causal} seq={seq} {name}"));
                }
            }
        }
    }

    /// Attention dropout in the fused path is drawn only when training on an autodiff device:
    /// two training calls differ, a reseed repeats them (`seed_dropout`), inference equals the
    /// composed path.
    #[test]
    fn fused_dropout_is_drawn_in_training_only() {
        let _stream = crate::test_util::FUSED_DROPOUT
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut context = ctx(16, false);
        context.dropout = 0.5;
        let train = Device::flex().autodiff();
        train.seed(4);
        let attn = DenseAttentionConfig {
            n_heads: 2,
            causal: true,
        }
        .init(&context, &train);
        let q = Tensor::<4>::random([1, 2, 16, 8], Distribution::Normal(0.0, 1.0), &train);
        crate::seed_dropout(&train, 7);
        let a = to_vec(attn.attend_with(q.clone(), q.clone(), q.clone(), true));
        let b = to_vec(attn.attend_with(q.clone(), q.clone(), q.clone(), true));
        assert_ne!(a, b, "each training call draws its own mask");
        // Reseeding repeats the masks; another seed draws others.
        crate::seed_dropout(&train, 7);
        let again = to_vec(attn.attend_with(q.clone(), q.clone(), q.clone(), true));
        assert_eq!(a, again, "the same seed, the same masks");
        crate::seed_dropout(&train, 8);
        let other = to_vec(attn.attend_with(q.clone(), q.clone(), q.clone(), true));
        assert_ne!(a, other, "another seed, other masks");
        let infer = Device::flex();
        let attn = attn.valid();
        let q = Tensor::<4>::from_data(q.into_data(), &infer);
        let fused = to_vec(attn.attend_with(q.clone(), q.clone(), q.clone(), true));
        let composed = to_vec(attn.attend_with(q.clone(), q.clone(), q, false));
        assert_all_close(&fused, &composed, 1e-5, "inference");
    }

    #[test]
    fn n_heads_must_divide_d_model() {
        let err = DenseAttentionConfig {
            n_heads: 3,
            causal: true,
        }
        .validate(&ctx(16, false))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mixer.n_heads") && err.contains("divide d_model = 16"),
            "{err}"
        );
        let err = DenseAttentionConfig {
            n_heads: 16,
            causal: true,
        }
        .validate(&ctx(16, true))
        .unwrap_err()
        .to_string();
        assert!(err.contains("RoPE"), "{err}");
    }
}
