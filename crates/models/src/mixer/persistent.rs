//! All-attention with persistent memory (Sukhbaatar et al. 2019, "Augmenting self-attention
//! with persistent memory").
//!
//! Differs from dense attention in three ways:
//! - every head owns `N` learned persistent key/value vectors that every query attends to
//!   alongside the context, in **one joint softmax** over `[context ; memory]` (memory scores
//!   carry no position term; causality applies to the context part only);
//! - it is meant to replace the feed-forward sublayer (`model.d_ff = 0`): with
//!   `N = d_ff` the persistent vectors have exactly the FFN's weight count (see
//!   [`PersistentAttentionConfig::default_n_persistent`]);
//! - positions are the paper's learned relative-position key embedding `key_pe`
//!   (`[d_head, seq_len]`, shared by all layers, owned by the [`Lm`](crate::Lm)) when
//!   `model.position = "relative"`; absolute or RoPE positions also work.
//!
//! Reparameterisation (as in the paper's code, it matters for Adam-style learning rates):
//! persistent keys are stored as `randn / sqrt(d_head)` and multiplied by `sqrt(d_head)` in the
//! forward pass; persistent values are stored as `randn / sqrt(N)` and multiplied by `sqrt(N)`.
//! Adam's step size is then comparable to that of the other weights while the effective vectors
//! start at unit scale.
//!
//! Optional adaptive span (Sukhbaatar et al. 2019a): a per-head soft mask
//! `m(d) = clamp((R + z - d) / R, 0, 1)` on the weights of context keys at distance `d`, the
//! memory weights untouched, then joint renormalisation; `z = span_fraction · seq_len` is learned
//! and penalised by `span_loss · Σ z` (see [`PersistentAttention::regularization`]).

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, activation};
use serde::{Deserialize, Serialize};

use super::MixerContext;
use super::dense::{DenseAttention, DenseAttentionConfig};
use crate::ModelError;

/// Settings of [`PersistentAttention`] under `[model.mixer]` with `kind = "persistent"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistentAttentionConfig {
    /// Number of heads; must divide `d_model`.
    pub n_heads: usize,
    /// Persistent vectors per head (`N`). Left out: [`Self::default_n_persistent`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_persistent: Option<usize>,
    /// Mask future context positions (memory is always visible).
    pub causal: bool,
    /// Learn a per-head attention span with a soft mask (the paper's results use it).
    pub adaptive_span: bool,
    /// Ramp width `R` of the soft span mask, in tokens.
    pub span_ramp: usize,
    /// Coefficient of the L1 penalty on the spans (in tokens), added to the loss.
    pub span_loss: f64,
    /// Initial span as a fraction of `seq_len`.
    pub span_init: f64,
}

impl Default for PersistentAttentionConfig {
    fn default() -> Self {
        Self {
            n_heads: 4,
            n_persistent: None,
            causal: true,
            adaptive_span: false,
            span_ramp: 32,
            span_loss: 2e-6,
            span_init: 1.0,
        }
    }
}

impl PersistentAttentionConfig {
    /// Parameter parity with the attention + FFN layer this one replaces. The memory holds
    /// `2 · n_heads · N · d_head = 2 · N · d_model` weights; a GELU FFN `d_model -> d_ff ->
    /// d_model` holds `2 · d_model · d_ff` weights plus `d_ff + d_model` biases and its
    /// LayerNorm's `2 · d_model`. So `N = d_ff` matches the FFN's weights exactly and the whole
    /// layer up to `d_ff + 3 · d_model` parameters (0.4% at d_model 512). The default assumes the
    /// usual `d_ff = 4 · d_model` (at d_model 512, 8 heads: N = 2048).
    pub fn default_n_persistent(d_model: usize) -> usize {
        4 * d_model
    }

    /// `N` for a model of width `d_model`.
    pub fn n_persistent(&self, d_model: usize) -> usize {
        self.n_persistent
            .unwrap_or_else(|| Self::default_n_persistent(d_model))
    }

    fn dense(&self) -> DenseAttentionConfig {
        DenseAttentionConfig {
            n_heads: self.n_heads,
            causal: self.causal,
        }
    }

    pub(crate) fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        self.dense().validate_heads(ctx)?;
        if ctx.relative_positions && !self.causal {
            // `key_pe` embeds distances i − j ≥ 0 only: keys after the query have none.
            return Err(ModelError::invalid(
                "mixer.causal",
                false,
                "relative positions (model.position = \"relative\") embed only distances to \
                 earlier keys: use causal = true, or position = \"learned\" or \"rope\" for a \
                 bidirectional model",
            ));
        }
        if self.adaptive_span {
            if self.span_ramp == 0 {
                return Err(ModelError::invalid(
                    "mixer.span_ramp",
                    0,
                    "must be at least 1",
                ));
            }
            if !(0.0..=1.0).contains(&self.span_init) {
                return Err(ModelError::invalid(
                    "mixer.span_init",
                    self.span_init,
                    "is a fraction of seq_len in [0, 1]",
                ));
            }
            if self.span_loss < 0.0 {
                return Err(ModelError::invalid(
                    "mixer.span_loss",
                    self.span_loss,
                    "must be >= 0",
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn init(&self, ctx: &MixerContext, device: &Device) -> PersistentAttention {
        let d_head = ctx.d_model / self.n_heads;
        let n = self.n_persistent(ctx.d_model);
        let normal = |std: f64| Distribution::Normal(0.0, std);
        let (keys, values) = if n == 0 {
            (None, None)
        } else {
            let shape = [self.n_heads, n, d_head];
            (
                Some(Param::from_tensor(Tensor::random(
                    shape,
                    normal(1.0 / (d_head as f64).sqrt()),
                    device,
                ))),
                Some(Param::from_tensor(Tensor::random(
                    shape,
                    normal(1.0 / (n as f64).sqrt()),
                    device,
                ))),
            )
        };
        PersistentAttention {
            attn: self.dense().init(ctx, device),
            persistent_keys: keys,
            persistent_values: values,
            span_fraction: self
                .adaptive_span
                .then(|| Param::from_tensor(Tensor::full([self.n_heads], self.span_init, device))),
            span_ramp: self.span_ramp,
            span_loss: self.span_loss,
        }
    }
}

/// Multi-head attention over the context plus learned persistent key/value vectors.
#[derive(Module, Debug)]
pub struct PersistentAttention {
    /// Query/key/value and output projections, dropouts, optional RoPE (shared code with
    /// dense attention; only the score kernel differs).
    pub attn: DenseAttention,
    /// `[n_heads, N, d_head]` persistent keys, stored divided by `sqrt(d_head)`.
    pub persistent_keys: Option<Param<Tensor<3>>>,
    /// `[n_heads, N, d_head]` persistent values, stored divided by `sqrt(N)`.
    pub persistent_values: Option<Param<Tensor<3>>>,
    /// `[n_heads]` learned spans as fractions of the sequence length (adaptive span only).
    pub span_fraction: Option<Param<Tensor<1>>>,
    /// Ramp width `R` of the soft span mask.
    pub span_ramp: usize,
    /// L1 penalty coefficient on spans (tokens).
    pub span_loss: f64,
}

impl PersistentAttention {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - `key_pe`: `[d_head, span]` relative-position key embedding, `span >= seq`, or `None`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>, key_pe: Option<&Tensor<2>>) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let (q, k, v) = self.attn.project(x);
        let y = self.attend(q, k, v, key_pe); // [batch, n_heads, seq, d_head]
        let y = y.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.attn
            .resid_dropout
            .forward(crate::linear::forward(&self.attn.proj, y))
    }

    /// The attention kernel: the same function as `combine(weights(q, k), v)` without ever
    /// concatenating context and memory. The joint softmax is taken as
    /// `(e_ctx · v + e_mem · V) / (Σ e_ctx + Σ e_mem)` with `e = exp(score - m)` and one row
    /// maximum `m` over both parts, and the memory part runs per head over all `batch · seq`
    /// queries at once (`[batch·seq, d_head] x [d_head, N]`) instead of `batch` small GEMMs.
    ///
    /// On flex (with `model.attention_impl = "fused"`) the whole layer — context keys with the
    /// relative-position term and the adaptive span, and the persistent memory — is one call
    /// of the tiled attention operation ([`AttentionOps`](super::AttentionOps)): no
    /// `[seq, seq]` or `[batch·seq, N]` scores are materialised, the backward recomputes them.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, n_heads, seq, d_head]`
    /// - output: `[batch, n_heads, seq, d_head]`
    pub fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pe: Option<&Tensor<2>>,
    ) -> Tensor<4> {
        let fused = self.attn.fused && super::on_flex(&q.device());
        self.attend_with(q, k, v, key_pe, fused)
    }

    /// [`attend`](Self::attend) as the tiled operation (flex only) or composed from tensor ops
    /// (every backend, and the reference the operation is tested against).
    pub fn attend_with(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pe: Option<&Tensor<2>>,
        fused: bool,
    ) -> Tensor<4> {
        if fused {
            return self.attend_tiled(q, k, v, key_pe);
        }
        let [batch, n_heads, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let context = self.context_scores(q.clone(), k, key_pe).mul_scalar(scale); // [batch, n_heads, seq, seq]
        // Per head, all queries at once: [n_heads, batch·seq, d_head].
        let by_head =
            |t: Tensor<4>, width: usize| t.swap_dims(0, 1).reshape([n_heads, batch * seq, width]);
        let from_heads = |t: Tensor<3>, width: usize| {
            t.reshape([n_heads, batch, seq, width]).swap_dims(0, 1) // [batch, n_heads, seq, width]
        };
        let memory = self.memory(scale); // [n_heads, N, d_head] each
        let mut max = context.clone().max_dim(3).detach(); // [batch, n_heads, seq, 1]
        // The memory part's unnormalised output and weight, [n_heads, batch·seq, d_head | 1].
        let mut memory_part = None;
        if let Some((keys, values)) = memory {
            let scores = by_head(q, d_head).matmul(keys.swap_dims(1, 2)); // [n_heads, batch·seq, N]
            // The softmax is shift-invariant, so the row maximum needs no gradient.
            max = max
                .max_pair(from_heads(scores.clone().max_dim(2), 1))
                .detach();
            let e_memory = (scores - by_head(max.clone(), 1)).exp(); // [n_heads, batch·seq, N]
            let sum = e_memory.clone().sum_dim(2);
            let y = self.attn.attn_dropout.forward(e_memory).matmul(values);
            memory_part = Some((y, sum));
        }
        let mut e_context = (context - max).exp();
        if let Some(fraction) = &self.span_fraction {
            let mask = span_mask(fraction.val(), seq, self.span_ramp, &e_context.device());
            e_context = e_context * mask.unsqueeze::<4>();
        }
        let mut norm = e_context.clone().sum_dim(3); // [batch, n_heads, seq, 1]
        // Dropout on unnormalised weights = dropout on normalised ones (the norm is per row).
        let mut y = self.attn.attn_dropout.forward(e_context).matmul(v);
        if let Some((y_memory, sum)) = memory_part {
            norm = norm + from_heads(sum, 1);
            y = y + from_heads(y_memory, d_head);
        }
        y / norm
    }

    /// The persistent keys and values as used, `[n_heads, N, d_head]` each: reparameterised
    /// (keys stored / sqrt(d_head) and used * sqrt(d_head), values stored / sqrt(N) and used *
    /// sqrt(N)), the keys also times `key_scale` (the score scale, when q is unscaled).
    fn memory(&self, key_scale: f64) -> Option<(Tensor<3>, Tensor<3>)> {
        let (keys, values) = (
            self.persistent_keys.as_ref()?,
            self.persistent_values.as_ref()?,
        );
        let [_, n, d_head] = values.dims();
        Some((
            keys.val().mul_scalar((d_head as f64).sqrt() * key_scale),
            values.val().mul_scalar((n as f64).sqrt()),
        ))
    }

    /// The fused path: the scaled queries, the reparameterised persistent vectors, `key_pe` and
    /// the span `z = clamp(fraction, 0, 1) · seq` handed to the tiled operation.
    fn attend_tiled(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pe: Option<&Tensor<2>>,
    ) -> Tensor<4> {
        let [_, _, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let memory = self.memory(1.0); // the score scale is on q
        let span = self.span_fraction.as_ref().map(|fraction| {
            let z = fraction.val().clamp(0.0, 1.0).mul_scalar(seq as f64);
            (z, self.span_ramp as f32)
        });
        let extras = super::attention_op::Extras {
            memory,
            key_pe: key_pe.cloned(),
            span,
        };
        let keys = super::KeyLayout::dense(self.attn.causal);
        let dropout = super::fused_dropout(&self.attn.attn_dropout, &q.device());
        super::attention_op::attention(q.mul_scalar(scale), k, v, extras, keys, dropout)
    }

    /// Context scores `q·k (+ relative term)`, future positions at -inf when causal (unscaled).
    fn context_scores(&self, q: Tensor<4>, k: Tensor<4>, key_pe: Option<&Tensor<2>>) -> Tensor<4> {
        let [batch, n_heads, seq, _] = q.dims();
        let mut context = q.clone().matmul(k.swap_dims(2, 3)); // [batch, n_heads, seq, seq]
        if let Some(pe) = key_pe {
            context = context + relative_scores(q, pe);
        }
        if self.attn.causal {
            let future = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &context.device())
                .unsqueeze::<4>()
                .expand([batch, n_heads, seq, seq]);
            context = context.mask_fill(future, f32::NEG_INFINITY);
        }
        context
    }

    /// Attention weights over `[context ; memory]`, materialised: one softmax over both (then
    /// the adaptive span mask and joint renormalisation, when enabled). Each row sums to one.
    /// For inspection and tests; [`attend`](Self::attend) computes the same output without
    /// building this tensor.
    ///
    /// # Shapes
    /// - `q`, `k`: `[batch, n_heads, seq, d_head]`
    /// - output: `[batch, n_heads, seq, seq + N]`
    pub fn weights(&self, q: Tensor<4>, k: Tensor<4>, key_pe: Option<&Tensor<2>>) -> Tensor<4> {
        let [_, _, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let context = self.context_scores(q.clone(), k, key_pe);
        let scores = match &self.persistent_keys {
            Some(keys) => {
                let keys = keys
                    .val()
                    .mul_scalar((d_head as f64).sqrt())
                    .unsqueeze::<4>(); // [1, n_heads, N, d_head]
                let memory = q.matmul(keys.swap_dims(2, 3)); // [batch, n_heads, seq, N]
                Tensor::cat(vec![context, memory], 3)
            }
            None => context,
        };
        let weights = activation::softmax(scores.mul_scalar(scale), 3);
        match &self.span_fraction {
            Some(fraction) => self.apply_span(weights, fraction.val(), seq),
            None => weights,
        }
    }

    /// Soft span mask on the context part, then joint renormalisation over context + memory.
    fn apply_span(&self, weights: Tensor<4>, fraction: Tensor<1>, seq: usize) -> Tensor<4> {
        let [batch, n_heads, _, total] = weights.dims();
        let device = weights.device();
        let mask = span_mask(fraction, seq, self.span_ramp, &device); // [n_heads, seq, seq]
        let n_memory = total - seq;
        let mask = if n_memory > 0 {
            Tensor::cat(
                vec![mask, Tensor::ones([n_heads, seq, n_memory], &device)],
                2,
            )
        } else {
            mask
        };
        let masked = weights * mask.unsqueeze::<4>().expand([batch, n_heads, seq, total]);
        let norm = masked.clone().sum_dim(3).add_scalar(1e-8); // [batch, n_heads, seq, 1]
        masked / norm
    }

    /// `weights · [v ; memory values]` (the reference path, with [`weights`](Self::weights)).
    ///
    /// # Shapes
    /// - `weights`: `[batch, n_heads, seq, seq + N]`
    /// - `v`: `[batch, n_heads, seq, d_head]`
    /// - output: `[batch, n_heads, seq, d_head]`
    pub fn combine(&self, weights: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let [batch, n_heads, _, d_head] = v.dims();
        match &self.persistent_values {
            Some(values) => {
                let [_, n, _] = values.dims();
                let values = values
                    .val()
                    .mul_scalar((n as f64).sqrt())
                    .unsqueeze::<4>()
                    .expand([batch, n_heads, n, d_head]);
                weights.matmul(Tensor::cat(vec![v, values], 2))
            }
            None => weights.matmul(v),
        }
    }

    /// The span penalty `span_loss · Σ_heads z` (z in tokens), to add to the training loss;
    /// `None` without adaptive span. It depends on parameters only, not on the batch.
    pub fn regularization(&self, seq_len: usize) -> Option<Tensor<1>> {
        self.span_fraction.as_ref().map(|f| {
            f.val()
                .clamp(0.0, 1.0)
                .sum()
                .mul_scalar(self.span_loss * seq_len as f64)
        })
    }

    /// Current spans in tokens, one per head (adaptive span only).
    pub fn spans(&self, seq_len: usize) -> Option<Vec<f32>> {
        self.span_fraction.as_ref().map(|f| {
            f.val()
                .clamp(0.0, 1.0)
                .mul_scalar(seq_len as f64)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        })
    }
}

/// Relative-position scores `q_i · key_pe[:, i - j]` for every query `i` and key `j <= i`
/// (entries with `j > i` hold other values and must be masked by the caller).
///
/// # Shapes
/// - `q`: `[batch, n_heads, seq, d_head]`
/// - `key_pe`: `[d_head, span]`, `span >= seq`
/// - output: `[batch, n_heads, seq, seq]`
pub fn relative_scores(q: Tensor<4>, key_pe: &Tensor<2>) -> Tensor<4> {
    let [batch, n_heads, seq, _] = q.dims();
    let [_, span] = key_pe.dims();
    assert!(
        span >= seq,
        "key_pe covers {span} distances, sequence has {seq}"
    );
    let device = q.device();
    // by_distance[.., i, m] = q_i · key_pe[:, seq - 1 - m] (distances in reverse order).
    let reversed = key_pe.clone().narrow(1, 0, seq).flip([1]); // [d_head, seq]
    let by_distance = q.matmul(reversed.unsqueeze::<4>()); // [batch, n_heads, seq, seq]
    // The relative shift (Transformer-XL's `_rel_shift`): pad one zero column on the left, read
    // the [seq, seq + 1] rows as [seq + 1, seq], drop the first row. Then
    // out[i, j] = by_distance[i, j + seq - 1 - i] = q_i · key_pe[:, i - j] for j <= i: a few
    // copies instead of a gather (whose backward is a slow scatter-add).
    let zeros = Tensor::<4>::zeros([batch, n_heads, seq, 1], &device);
    Tensor::cat(vec![zeros, by_distance], 3)
        .reshape([batch, n_heads, seq + 1, seq])
        .narrow(2, 1, seq)
        .reshape([batch, n_heads, seq, seq])
}

/// `m[h, i, j] = clamp((R + z_h - (i - j)) / R, 0, 1)` with `z_h = fraction_h · seq`.
///
/// # Shapes
/// - `fraction`: `[n_heads]`
/// - output: `[n_heads, seq, seq]`
pub fn span_mask(fraction: Tensor<1>, seq: usize, ramp: usize, device: &Device) -> Tensor<3> {
    let [n_heads] = fraction.dims();
    let i = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([seq, 1]);
    let j = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([1, seq]);
    let distance = (i.expand([seq, seq]) - j.expand([seq, seq]))
        .float()
        .unsqueeze::<3>()
        .expand([n_heads, seq, seq]);
    let z = fraction
        .clamp(0.0, 1.0)
        .mul_scalar(seq as f64)
        .reshape([n_heads, 1, 1])
        .expand([n_heads, seq, seq]);
    ((z - distance)
        .add_scalar(ramp as f64)
        .div_scalar(ramp as f64))
    .clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::{MixerConfig, MixerContext};
    use crate::test_util::{assert_all_close, devices, to_vec, tokens};
    use crate::{BlockConfig, LmConfig, Position};
    use burn::optim::GradientsParams;

    fn ctx(d_model: usize, relative: bool) -> MixerContext {
        MixerContext {
            d_model,
            n_layers: 2,
            dropout: 0.0,
            max_seq_len: 8,
            rope_theta: None,
            relative_positions: relative,
            layer: 0,
            fused_attention: true,
        }
    }

    fn config(n: usize) -> PersistentAttentionConfig {
        PersistentAttentionConfig {
            n_heads: 2,
            n_persistent: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn without_memory_and_with_absolute_positions_it_is_dense_attention() {
        for (name, device) in devices() {
            device.seed(1);
            let dense = DenseAttentionConfig {
                n_heads: 2,
                causal: true,
            }
            .init(&ctx(8, false), &device);
            let mut layer = config(0).init(&ctx(8, false), &device);
            assert!(layer.persistent_keys.is_none());
            layer.attn = dense.clone();
            let x = Tensor::<3>::random([2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
            let a = to_vec(dense.forward(x.clone()));
            let b = to_vec(layer.forward(x, None));
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-6, "{name}: {p} vs {q}");
            }
        }
    }

    /// Naive loops: joint softmax over context (with the relative term) and memory.
    #[test]
    fn weights_and_output_match_naive_loops() {
        for (name, device) in devices() {
            device.seed(4);
            let (b, h, s, dh, n) = (2, 2, 5, 4, 3);
            let layer = config(n).init(&ctx(h * dh, true), &device);
            let q = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<4>::random([b, h, s, dh], Distribution::Normal(0.0, 1.0), &device);
            let pe = Tensor::<2>::random([dh, 8], Distribution::Normal(0.0, 1.0), &device);
            let w = layer.weights(q.clone(), k.clone(), Some(&pe));
            let out = to_vec(layer.combine(w.clone(), v.clone()));
            let w = to_vec(w);
            let (qv, kv, vv, pev) = (to_vec(q), to_vec(k), to_vec(v), to_vec(pe));
            let mk = to_vec(layer.persistent_keys.as_ref().unwrap().val());
            let mv = to_vec(layer.persistent_values.as_ref().unwrap().val());
            let idx4 =
                |bi: usize, hi: usize, si: usize, d: usize| ((bi * h + hi) * s + si) * dh + d;
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..s {
                        let dot = |f: &dyn Fn(usize) -> f64| (0..dh).map(f).sum::<f64>();
                        let mut scores = vec![];
                        for j in 0..=i {
                            let qk = dot(&|d| {
                                f64::from(qv[idx4(bi, hi, i, d)])
                                    * f64::from(kv[idx4(bi, hi, j, d)])
                            });
                            let qp = dot(&|d| {
                                f64::from(qv[idx4(bi, hi, i, d)]) * f64::from(pev[d * 8 + (i - j)])
                            });
                            scores.push(qk + qp);
                        }
                        for m in 0..n {
                            let key = |d: usize| {
                                f64::from(mk[(hi * n + m) * dh + d]) * (dh as f64).sqrt()
                            };
                            scores.push(dot(&|d| f64::from(qv[idx4(bi, hi, i, d)]) * key(d)));
                        }
                        let scores: Vec<f64> =
                            scores.iter().map(|x| x / (dh as f64).sqrt()).collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                        let p: Vec<f64> = scores.iter().map(|x| (x - max).exp() / z).collect();
                        let row = &w[((bi * h + hi) * s + i) * (s + n)
                            ..((bi * h + hi) * s + i + 1) * (s + n)];
                        for j in 0..s + n {
                            let expected = if j <= i {
                                p[j]
                            } else if j < s {
                                0.0
                            } else {
                                p[i + 1 + (j - s)]
                            };
                            assert!(
                                (f64::from(row[j]) - expected).abs() < 1e-5,
                                "{name} w[{i},{j}] {} vs {expected}",
                                row[j]
                            );
                        }
                        for d in 0..dh {
                            let mut y: f64 = (0..=i)
                                .map(|j| p[j] * f64::from(vv[idx4(bi, hi, j, d)]))
                                .sum();
                            for m in 0..n {
                                y += p[i + 1 + m]
                                    * f64::from(mv[(hi * n + m) * dh + d])
                                    * (n as f64).sqrt();
                            }
                            let got = f64::from(out[idx4(bi, hi, i, d)]);
                            assert!((got - y).abs() < 1e-4, "{name} out {got} vs {y}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_kernel_equals_materialised_weights_path() {
        for (name, device) in devices() {
            for (relative, span) in [(false, false), (true, false), (true, true)] {
                device.seed(8);
                let mut cfg = config(5);
                cfg.adaptive_span = span;
                cfg.span_ramp = 2;
                cfg.span_init = 0.4;
                let layer = cfg.init(&ctx(8, relative), &device);
                let r = |shape: [usize; 4]| {
                    Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                };
                let (q, k, v) = (r([3, 2, 7, 4]), r([3, 2, 7, 4]), r([3, 2, 7, 4]));
                let pe = relative
                    .then(|| Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device));
                let reference = to_vec(
                    layer.combine(layer.weights(q.clone(), k.clone(), pe.as_ref()), v.clone()),
                );
                let fused = to_vec(layer.attend(q, k, v, pe.as_ref()));
                for (a, b) in fused.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                        "{name} rel={relative} span={span}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The tiled operation on flex (tiles of 64 query rows, probabilities recomputed in its
    /// backward) against the same attention composed from tensor ops: outputs and the
    /// gradients of queries, keys, values, the persistent keys and values, `key_pe` and the
    /// span fractions, with 300 tokens (four full tiles and a partial one, two key blocks, key
    /// blocks wholly past the span skipped), causal or not, relative positions (causal only)
    /// and adaptive span. Scores are scaled up so that the row maximum is sometimes a memory
    /// score and sometimes a context one.
    #[test]
    fn flex_tiled_operation_equals_the_composed_path_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        for (causal, relative, span) in [
            (true, false, false),
            (false, false, true),
            (true, true, true),
        ] {
            device.seed(9);
            let mut cfg = config(37);
            cfg.causal = causal;
            cfg.adaptive_span = span;
            cfg.span_ramp = 3;
            cfg.span_init = 0.5;
            let mut context = ctx(16, relative);
            context.max_seq_len = 300;
            let layer = cfg.init(&context, &device);
            let r = |shape: [usize; 4], std: f64| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, std), &device).require_grad()
            };
            let shape = [2, 2, 300, 8];
            let (q, k, v) = (r(shape, 3.0), r(shape, 1.0), r(shape, 1.0));
            let pe = relative.then(|| {
                Tensor::<2>::random([8, 310], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad()
            });
            let w = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let y = layer.attend_with(q.clone(), k.clone(), v.clone(), pe.as_ref(), fused);
                let grads = (y.clone() * w.clone()).sum().backward();
                let keys = layer.persistent_keys.as_ref().unwrap().val();
                let values = layer.persistent_values.as_ref().unwrap().val();
                let mut out = vec![to_vec(y)];
                for t in [&q, &k, &v] {
                    out.push(to_vec(t.grad(&grads).unwrap()));
                }
                out.push(to_vec(keys.grad(&grads).unwrap()));
                out.push(to_vec(values.grad(&grads).unwrap()));
                if let Some(pe) = &pe {
                    out.push(to_vec(pe.grad(&grads).unwrap()));
                }
                if let Some(fraction) = &layer.span_fraction {
                    out.push(to_vec(fraction.val().grad(&grads).unwrap()));
                }
                out
            };
            let (fused, composed) = (run(true), run(false));
            let names = [
                "output",
                "dq",
                "dk",
                "dv",
                "d persistent keys",
                "d persistent values",
                if relative { "d key_pe" } else { "d span" },
                "d span",
            ];
            for ((name, a), b) in names.iter().zip(&fused).zip(&composed) {
                let what = format!("causal={causal} relative={relative} span={span} {name}");
                assert_all_close(a, b, 2e-5, &what);
            }
        }
    }

    /// Attention dropout in the tiled operation: active only when training on an autodiff
    /// device (two calls draw different masks; gradients stay finite), off for inference
    /// (then equal to the composed path), as `Dropout::forward` decides.
    #[test]
    fn flex_memory_dropout_is_drawn_in_training_only() {
        let mut context = ctx(16, false);
        context.dropout = 0.5;
        context.max_seq_len = 20;
        let train = Device::flex().autodiff();
        train.seed(11);
        let layer = config(37).init(&context, &train);
        let r = |device: &Device| {
            device.seed(12);
            Tensor::<4>::random([2, 2, 20, 8], Distribution::Normal(0.0, 1.0), device)
        };
        let q = r(&train).require_grad();
        let a = layer.attend_with(q.clone(), q.clone(), q.clone(), None, true);
        let b = layer.attend_with(q.clone(), q.clone(), q.clone(), None, true);
        assert_ne!(to_vec(a.clone()), to_vec(b), "each call draws its own mask");
        let grads = a.sum().backward();
        assert!(
            to_vec(q.grad(&grads).unwrap())
                .iter()
                .all(|g| g.is_finite())
        );

        let infer = Device::flex();
        let layer = layer.valid();
        let q = r(&infer);
        let fused = to_vec(layer.attend_with(q.clone(), q.clone(), q.clone(), None, true));
        let composed = to_vec(layer.attend_with(q.clone(), q.clone(), q, None, false));
        for (x, y) in fused.iter().zip(&composed) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "inference: {x} vs {y}"
            );
        }
    }

    #[test]
    fn joint_softmax_sums_to_one_and_never_looks_ahead() {
        for (name, device) in devices() {
            let (s, n) = (6, 5);
            let layer = config(n).init(&ctx(8, false), &device);
            let q = Tensor::<4>::random([1, 2, s, 4], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<4>::random([1, 2, s, 4], Distribution::Normal(0.0, 1.0), &device);
            let w = to_vec(layer.weights(q, k, None));
            for row in 0..2 * s {
                let i = row % s;
                let r = &w[row * (s + n)..(row + 1) * (s + n)];
                let total: f32 = r.iter().sum();
                assert!((total - 1.0).abs() < 1e-5, "{name}: row sums to {total}");
                assert!(
                    r[i + 1..s].iter().all(|&x| x == 0.0),
                    "{name}: future context has weight"
                );
                assert!(
                    r[s..].iter().all(|&x| x > 0.0),
                    "{name}: memory is always visible"
                );
            }
        }
    }

    fn all_attention(n: usize, adaptive_span: bool) -> LmConfig {
        LmConfig {
            vocab_size: Some(11),
            d_model: 16,
            n_layers: 2,
            d_ff: 0,
            seq_len: 8,
            position: Position::Relative,
            mixer: MixerConfig::Persistent(PersistentAttentionConfig {
                n_heads: 2,
                n_persistent: Some(n),
                adaptive_span,
                span_ramp: 2,
                span_init: 0.5,
                span_loss: 1e-2,
                ..Default::default()
            }),
            ..LmConfig::default()
        }
    }

    fn persistent(model: &crate::Lm, layer: usize) -> &PersistentAttention {
        match &model.blocks[layer].mixer {
            crate::Mixer::Persistent(m) => m,
            other => panic!("expected a persistent mixer, got {other:?}"),
        }
    }

    #[test]
    fn gradients_reach_every_persistent_key_and_value() {
        for (name, device) in devices() {
            let ad = device.clone().autodiff();
            ad.seed(2);
            let model = all_attention(6, true).init(&ad).unwrap();
            let loss = crate::loss::cross_entropy_sum(
                model.forward(tokens(2, 8, 11, 1, &ad)),
                tokens(2, 8, 11, 2, &ad),
                None,
            ) + model.regularization().unwrap();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            for layer in 0..2 {
                let m = persistent(&model, layer);
                for p in [
                    m.persistent_keys.as_ref().unwrap(),
                    m.persistent_values.as_ref().unwrap(),
                ] {
                    let g = grads.get::<3>(p.id).expect("a gradient");
                    let rows = to_vec(g.abs().sum_dim(2)); // [n_heads, N, 1]
                    assert_eq!(rows.len(), 12);
                    assert!(
                        rows.iter().all(|&r| r > 0.0),
                        "{name} layer {layer}: {rows:?}"
                    );
                }
                let span = grads
                    .get::<1>(m.span_fraction.as_ref().unwrap().id)
                    .expect("span gradient");
                assert!(
                    to_vec(span).iter().all(|&g| g != 0.0),
                    "{name}: span gets a gradient"
                );
            }
            let pe = grads
                .get::<2>(model.key_pe.as_ref().unwrap().id)
                .expect("key_pe gradient");
            assert!(to_vec(pe.abs().sum()).iter().all(|&g| g > 0.0));
        }
    }

    #[test]
    fn memory_values_matter_and_future_tokens_do_not() {
        for (name, device) in devices() {
            device.seed(3);
            let mut model = all_attention(4, false).init(&device).unwrap();
            let a = tokens(1, 8, 11, 1, &device);
            let base = to_vec(model.forward(a.clone()));
            // Causality: change tokens after t = 3; logits at <= 3 stay exactly the same.
            let mut ids = a.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
            for id in ids.iter_mut().skip(4) {
                *id = (*id + 5) % 11;
            }
            let b =
                Tensor::<2, Int>::from_data(burn::tensor::TensorData::new(ids, [1, 8]), &device);
            let changed = to_vec(model.forward(b));
            assert_eq!(
                base[..4 * 11],
                changed[..4 * 11],
                "{name}: the future leaked"
            );
            assert_ne!(base[4 * 11..5 * 11], changed[4 * 11..5 * 11]);
            // Zeroing every persistent value changes the output.
            for block in model.blocks.iter_mut() {
                if let crate::Mixer::Persistent(m) = &mut block.mixer {
                    let v = m.persistent_values.take().unwrap();
                    m.persistent_values = Some(Param::from_tensor(v.val().zeros_like()));
                }
            }
            assert_ne!(
                base,
                to_vec(model.forward(a)),
                "{name}: memory values unused"
            );
        }
    }

    #[test]
    fn default_memory_has_the_parameter_count_of_the_ffn_it_replaces() {
        assert_eq!(PersistentAttentionConfig::default_n_persistent(512), 2048);
        let device = burn::tensor::Device::flex();
        for (d_model, n_heads) in [(64, 4), (128, 8)] {
            let d_ff = 4 * d_model;
            let mixer_ctx = ctx(d_model, true);
            let dense = BlockConfig {
                mixer: MixerConfig::Dense(DenseAttentionConfig {
                    n_heads,
                    causal: true,
                }),
                ctx: MixerContext {
                    relative_positions: false,
                    ..mixer_ctx.clone()
                },
                d_ff: Some(d_ff),
            }
            .init(&device);
            let all_attn = BlockConfig {
                mixer: MixerConfig::Persistent(PersistentAttentionConfig {
                    n_heads,
                    ..Default::default()
                }),
                ctx: mixer_ctx,
                d_ff: None,
            }
            .init(&device);
            let crate::Mixer::Persistent(m) = &all_attn.mixer else {
                unreachable!()
            };
            let memory = m.persistent_keys.as_ref().unwrap().num_params()
                + m.persistent_values.as_ref().unwrap().num_params();
            assert_eq!(memory, 2 * d_model * d_ff, "memory = FFN weights");
            // The rest of the difference: FFN biases (d_ff + d_model) and its LayerNorm (2 d_model).
            assert_eq!(
                dense.num_params() - all_attn.num_params(),
                d_ff + 3 * d_model
            );
        }
    }

    #[test]
    fn span_mask_ramps_down_over_r_tokens() {
        let device = burn::tensor::Device::flex();
        // z = 0.25 · 16 = 4 tokens, R = 4: full weight up to distance 4, zero from distance 8.
        let mask = to_vec(span_mask(
            Tensor::from_floats([0.25], &device),
            16,
            4,
            &device,
        ));
        let at = |i: usize, j: usize| mask[i * 16 + j];
        assert_eq!(at(10, 6), 1.0);
        assert_eq!(at(10, 4), 0.5);
        assert_eq!(at(10, 2), 0.0);
        assert_eq!(at(3, 3), 1.0);
    }

    #[test]
    fn adaptive_span_renormalises_jointly() {
        for (name, device) in devices() {
            let mut cfg = config(3);
            cfg.adaptive_span = true;
            cfg.span_ramp = 1;
            cfg.span_init = 0.25; // 2 of 8 tokens
            let layer = cfg.init(&ctx(8, false), &device);
            let q = Tensor::<4>::random([1, 2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<4>::random([1, 2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
            let w = to_vec(layer.weights(q, k, None));
            for row in 0..16 {
                let i = row % 8;
                let r = &w[row * 11..(row + 1) * 11];
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{name}");
                for (j, &x) in r[..8].iter().enumerate() {
                    if j + 3 <= i {
                        assert_eq!(
                            x,
                            0.0,
                            "{name}: distance {} is beyond span 2 + ramp 1",
                            i - j
                        );
                    }
                }
            }
            assert_eq!(layer.spans(8).unwrap(), vec![2.0, 2.0]);
        }
    }

    #[test]
    fn a_small_all_attention_model_overfits_one_batch() {
        let device = burn::tensor::Device::flex().autodiff();
        device.seed(7);
        let model = all_attention(8, false).init(&device).unwrap();
        let (x, y) = (tokens(4, 8, 11, 4, &device), tokens(4, 8, 11, 5, &device));
        let losses = crate::test_util::overfit(model, |m| {
            crate::loss::cross_entropy_sum(m.forward(x.clone()), y.clone(), None).div_scalar(32.0)
        });
        assert!(
            losses[149] < 0.1 * losses[0],
            "loss {} -> {}",
            losses[0],
            losses[149]
        );
    }

    /// `key_pe` embeds distances to earlier keys only, so a bidirectional all-attention layer
    /// with relative positions is refused (it once scored later keys with the next query's
    /// shifted position terms).
    #[test]
    fn relative_positions_need_a_causal_layer() {
        let mut cfg = all_attention(4, false);
        let MixerConfig::Persistent(p) = &mut cfg.mixer else {
            panic!("all_attention builds a persistent mixer")
        };
        p.causal = false;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("mixer.causal") && err.contains("relative"),
            "{err}"
        );
        cfg.position = crate::Position::Learned;
        cfg.validate().unwrap();
    }

    #[test]
    fn relative_positions_are_refused_by_dense_attention() {
        let mut cfg = all_attention(4, false);
        cfg.mixer = MixerConfig::Dense(DenseAttentionConfig {
            n_heads: 2,
            causal: true,
        });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("model.position") && err.contains("persistent"),
            "{err}"
        );
    }
}
