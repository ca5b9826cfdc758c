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
use burn::tensor::{Bool, Device, Distribution, Tensor, activation};
use serde::{Deserialize, Serialize};

use super::context::MixerContext;
use super::dense::{DenseAttention, DenseAttentionConfig};
use crate::cache::CacheView;
use crate::error::ModelError;

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
            .forward(crate::ops::linear::forward(&self.attn.proj, y))
    }

    /// The attention kernel: the same function as `combine(weights(q, k), v)` without ever
    /// concatenating context and memory. The joint softmax is taken as
    /// `(e_ctx · v + e_mem · V) / (Σ e_ctx + Σ e_mem)` with `e = exp(score - m)` and one row
    /// maximum `m` over both parts, and the memory part runs per head over all `batch · seq`
    /// queries at once (`[batch·seq, d_head] x [d_head, N]`) instead of `batch` small GEMMs.
    ///
    /// On flex and the Cube backends (with `model.attention_impl = "fused"`) the whole layer —
    /// context keys with the relative-position term and the adaptive span, and the persistent
    /// memory — is one call of the tiled attention operation ([`AttentionOps`](super::AttentionOps)): no
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
        let d_head = q.dims()[3];
        let fused =
            self.attn.fused && crate::ops::attention::attention_fused_on(&q.device(), d_head);
        self.attend_with(q, k, v, key_pe, fused)
    }

    /// [`attend`](Self::attend) as the tiled operation (flex and Cube) or composed from tensor ops
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
        let [_, _, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
        let context = self.context_scores(q.clone(), k, key_pe).mul_scalar(scale); // [batch, n_heads, seq, seq]
        let span = self.span_fraction.as_ref().map(|fraction| {
            span_mask(fraction.val(), seq, self.span_ramp, &context.device()).unsqueeze::<4>()
        });
        self.joint_softmax(q, context, v, |e| match span {
            Some(mask) => e * mask,
            None => e,
        })
    }

    /// The joint softmax over `[context ; memory]` and its output, from the scaled context
    /// scores; `weigh` multiplies the exponentiated context scores by their masks (adaptive
    /// span; a cached layer's window) before the joint normalisation.
    ///
    /// # Shapes
    /// - `q`: `[batch, n_heads, n, d_head]`; `context`: `[batch, n_heads, n, keys]`;
    ///   `v`: `[batch, n_heads, keys, d_head]`
    /// - output: `[batch, n_heads, n, d_head]`
    fn joint_softmax(
        &self,
        q: Tensor<4>,
        context: Tensor<4>,
        v: Tensor<4>,
        weigh: impl FnOnce(Tensor<4>) -> Tensor<4>,
    ) -> Tensor<4> {
        let [batch, n_heads, seq, d_head] = q.dims();
        let scale = 1.0 / (d_head as f64).sqrt();
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
        let e_context = weigh((context - max).exp());
        let mut norm = e_context.clone().sum_dim(3); // [batch, n_heads, seq, 1]
        // Dropout on unnormalised weights = dropout on normalised ones (the norm is per row).
        let mut y = self.attn.attn_dropout.forward(e_context).matmul(v);
        if let Some((y_memory, sum)) = memory_part {
            norm = norm + from_heads(sum, 1);
            y = y + from_heads(y_memory, d_head);
        }
        // A cached row with no visible key and no memory has norm 0 (and output 0); every
        // other row's norm is far above the floor, which then changes nothing.
        y / norm.clamp_min(1e-30)
    }

    /// The mixer over a block `x` with its `cache` of earlier inputs ([`crate::cache`]):
    /// queries from `x`, keys and values from `[cache ; x]`, each query over its window, plus
    /// the persistent memory (always visible). Composed tensor ops on every backend.
    ///
    /// # Shapes
    /// - `x`: `[batch, n, d_model]`, `cache`: `[batch, s, d_model]`
    /// - `key_pe`: `[d_head, ≥ span]`, or `None`
    /// - output: `[batch, n, d_model]`
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cache: Tensor<3>,
        key_pe: Option<&Tensor<2>>,
        view: &CacheView,
    ) -> Tensor<3> {
        self.attn.cached_layer(x, cache, |q, k, v| {
            self.attend_cached(q, k, v, key_pe, view)
        })
    }

    /// The cache positions any query of the block can still weigh: with an adaptive span, the
    /// last `⌈max z + ramp⌉` of `cache` (a key at distance `δ ≥ z + ramp` has weight 0; query 0
    /// sees cache position `j` at distance `s − j`), as adaptive-span's `get_cache_size`; the
    /// whole cache otherwise. The cost of a cached layer follows the spans it learned.
    ///
    /// # Shapes
    /// - `cache`: `[batch, s, d_model]`; output: `[batch, ≤ s, d_model]` (its last rows)
    pub fn trim_cache(&self, cache: Tensor<3>, span: usize) -> Tensor<3> {
        let Some(z) = self.span_tokens(span) else {
            return cache;
        };
        let s = cache.dims()[1];
        let z = z.max().into_scalar::<f32>();
        let keep = ((z + self.span_ramp as f32).ceil() as usize).min(s);
        if keep == s {
            cache
        } else {
            cache.narrow(1, s - keep, keep)
        }
    }

    /// All-attention of `n` queries over the `s + n` keys `[cache ; block]` and the persistent
    /// memory. Query `i` sees the keys of its window ([`crate::cache::Window`]); the
    /// relative-position term of a key at distance `δ` is `q_i · key_pe[:, δ − δ_min]`
    /// (`δ_min` = 0 with self, 1 without, so `span` columns serve `span` distances); the
    /// adaptive span is `z = clamp(fraction, 0, 1) · span`. A query with no key and no memory
    /// gives zeros.
    ///
    /// # Shapes
    /// - `q`: `[batch, n_heads, n, d_head]`; `k`, `v`: `[batch, n_heads, s + n, d_head]`
    /// - output: `[batch, n_heads, n, d_head]`
    pub fn attend_cached(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pe: Option<&Tensor<2>>,
        view: &CacheView,
    ) -> Tensor<4> {
        let fused = self.attn.fused
            && crate::ops::attention::cached_attention_fused_on(&q.device(), q.dims()[3]);
        self.attend_cached_with(q, k, v, key_pe, view, fused)
    }

    /// [`attend_cached`](Self::attend_cached) as the fused operation (flex, Cube: context over the
    /// window, relative positions, adaptive span and memory in one online softmax, the
    /// `[n, s + n]` scores never materialised) or composed from tensor ops (every backend, and
    /// the fused path's reference).
    pub fn attend_cached_with(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        key_pe: Option<&Tensor<2>>,
        view: &CacheView,
        fused: bool,
    ) -> Tensor<4> {
        let [batch, n_heads, n, d_head] = q.dims();
        let keys = k.dims()[2];
        let device = q.device();
        let scale = 1.0 / (d_head as f64).sqrt();
        let span = view.window.span;
        if fused {
            let extras = crate::ops::attention::Extras {
                memory: self.memory(1.0), // the score scale is on q
                key_pe: key_pe.cloned(),
                span: self.span_tokens(span).map(|z| (z, self.span_ramp as f32)),
            };
            let layout = view.key_layout(keys - n, n_heads);
            let dropout = crate::ops::dropout::fused_dropout(&self.attn.attn_dropout, &device);
            return crate::ops::attention::attention(
                q.mul_scalar(scale),
                k,
                v,
                extras,
                layout,
                dropout,
            );
        }
        let (hidden, distance) = view.masks(n, keys - n, &device);
        let hidden = hidden.expand([batch, n_heads, n, keys]);
        let mut context = q.clone().matmul(k.swap_dims(2, 3)); // [batch, n_heads, n, keys]
        if let Some(pe) = key_pe {
            let by_distance = q
                .clone()
                .matmul(pe.clone().narrow(1, 0, span).unsqueeze::<4>());
            let column = distance
                .clone()
                .sub_scalar(view.window.min_distance() as i64)
                .clamp(0, span as i64 - 1)
                .unsqueeze::<4>()
                .expand([batch, n_heads, n, keys]);
            context = context + by_distance.gather(3, column);
        }
        let context = context
            .mul_scalar(scale)
            .mask_fill(hidden.clone(), super::dense::MASKED);
        let ramp = self.span_tokens(span).map(|z| {
            let z = z.reshape([1, n_heads, 1, 1]);
            let r = self.span_ramp as f64;
            (z - distance.float().unsqueeze::<4>())
                .add_scalar(r)
                .div_scalar(r)
                .clamp(0.0, 1.0) // [1, n_heads, n, keys]
        });
        self.joint_softmax(q, context, v, |e| {
            let e = e.mask_fill(hidden, 0.0);
            match ramp {
                Some(m) => e * m,
                None => e,
            }
        })
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
        let span = self.span_tokens(seq).map(|z| (z, self.span_ramp as f32));
        let extras = crate::ops::attention::Extras {
            memory,
            key_pe: key_pe.cloned(),
            span,
        };
        let keys = crate::ops::attention::KeyLayout::dense(self.attn.causal);
        let dropout = crate::ops::dropout::fused_dropout(&self.attn.attn_dropout, &q.device());
        crate::ops::attention::attention(q.mul_scalar(scale), k, v, extras, keys, dropout)
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
}

mod relative;
mod span;

pub use relative::relative_scores;
pub use span::span_mask;

#[cfg(test)]
mod tests;
