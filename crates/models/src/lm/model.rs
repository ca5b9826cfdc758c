//! `Lm`: embeddings, blocks, final norm and head; the forward passes (with or without a
//! cache), logits and summed negative log-likelihoods.

use burn::module::{Module, Param};
use burn::nn::{Dropout, Embedding, LayerNorm, Linear};
use burn::tensor::{Device, Int, Tensor};

use crate::adaptive::{AdaptiveSoftmax, Clusters};
use crate::block::Block;
use crate::cache::{CacheView, LmCache, Window};
use crate::head::HeadTransform;

/// A decoder (or, with a bidirectional mixer, encoder) language model.
#[derive(Module, Debug)]
pub struct Lm {
    /// `[vocab, d_model]` token embedding; `None` with adaptive input.
    pub token_embedding: Option<Embedding>,
    /// Adaptive input embeddings (`model.adaptive.input`), which a tied adaptive softmax
    /// also scores with.
    pub adaptive_input: Option<Clusters>,
    /// `[seq_len, d_model]` learned absolute positions, when `position = "learned"`.
    pub pos_embedding: Option<Embedding>,
    /// `[token_types, d_model]` token-type embeddings (`model.token_types`); the first is added
    /// at every position.
    pub type_embedding: Option<Embedding>,
    /// LayerNorm over the summed embeddings (`model.embedding_norm`).
    pub embedding_norm: Option<LayerNorm>,
    /// `d_model -> d_model` projection of the embeddings (`model.embedding_projection`).
    pub embedding_projection: Option<Linear>,
    /// `[d_head, seq_len]` relative-position keys shared by every block, when
    /// `position = "relative"` (index = distance between query and key).
    pub key_pe: Option<Param<Tensor<2>>>,
    /// Dropout on the summed embeddings.
    pub dropout: Dropout,
    /// The blocks, input first.
    pub blocks: Vec<Block>,
    /// LayerNorm before the head (pre-norm models; a post-norm model's last block ends in one).
    pub norm_final: Option<LayerNorm>,
    /// The MLM head's transform before the output layer (`model.head_transform`).
    pub head_transform: Option<HeadTransform>,
    /// Untied output head `d_model -> vocab`; `None` when tied to `token_embedding` or with an
    /// adaptive softmax.
    pub head: Option<Linear>,
    /// `[vocab]` bias of the tied output layer (`model.head_bias` with `tie_embeddings`).
    pub tied_bias: Option<Param<Tensor<1>>>,
    /// The adaptive softmax head (`[model.adaptive]`).
    pub adaptive_softmax: Option<AdaptiveSoftmax>,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Longest sequence accepted.
    pub seq_len: usize,
    /// Keys a query sees back through the cache (`model.cache.span`); 0: no cache.
    pub cache_span: usize,
    /// Whether a cached query is one of its own keys.
    pub cache_self: bool,
    /// Whether a stream's start is masked (else zero vectors).
    pub cache_masked: bool,
}

impl Lm {
    /// Penalties the mixers add to the training loss (adaptive span), summed; `None` if none.
    pub fn regularization(&self) -> Option<Tensor<1>> {
        self.blocks
            .iter()
            .filter_map(|b| b.mixer.regularization(self.span_basis()))
            .reduce(|a, b| a + b)
    }

    /// The learned attention span of every head, in tokens, per layer (input first); an empty
    /// list for a layer without adaptive span.
    pub fn learned_spans(&self) -> Vec<Vec<f32>> {
        self.blocks
            .iter()
            .map(|b| match &b.mixer {
                crate::mixer::Mixer::Persistent(m) => {
                    m.spans(self.span_basis()).unwrap_or_default()
                }
                _ => vec![],
            })
            .collect()
    }

    /// What an adaptive span's fraction is a fraction of: the cache's span, or `seq_len`.
    pub fn span_basis(&self) -> usize {
        if self.cache_span > 0 {
            self.cache_span
        } else {
            self.seq_len
        }
    }

    /// The window of every cached query, if the model has a cache.
    pub fn window(&self) -> Option<Window> {
        (self.cache_span > 0).then_some(Window {
            span: self.cache_span,
            include_self: self.cache_self,
        })
    }

    /// The cache of `batch` streams at their start: zero vectors (`start = "zeros"`, all
    /// valid) or nothing valid (`"masked"`); `None` without a cache.
    pub fn new_cache(&self, batch: usize, device: &Device) -> Option<LmCache> {
        let span = self.window()?.span;
        let d_model = self.d_model;
        Some(LmCache {
            layers: (0..self.blocks.len())
                .map(|_| Tensor::zeros([batch, span, d_model], device))
                .collect(),
            valid: vec![if self.cache_masked { 0 } else { span }; batch],
        })
    }

    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`
    /// - output: `[batch, seq, vocab]` logits (with an adaptive softmax: the
    ///   log-probabilities, logits whose log-sum-exp is 0)
    ///
    /// A model with a cache sees `tokens` as the start of `batch` streams (a fresh
    /// [`new_cache`](Self::new_cache)); [`forward_cached`](Self::forward_cached) continues one.
    /// Training and evaluation read [`hidden`](Self::hidden) and [`nll_sum`](Self::nll_sum)
    /// instead, which an adaptive softmax computes without a `[batch, seq, vocab]` tensor.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.logits(self.hidden(tokens, None).0)
    }

    /// The next block of `batch` streams after `cache`: the logits, and the cache for the block
    /// after it (each layer's last `span` inputs over `[cache ; block]`, detached: no gradient
    /// reaches earlier blocks).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`; `cache` of `batch` rows
    /// - output: `[batch, seq, vocab]` logits
    ///
    /// # Panics
    /// Without a cache (`model.cache`), or with one of another batch size or layer count.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &LmCache) -> (Tensor<3>, LmCache) {
        assert!(self.window().is_some(), "forward_cached needs model.cache");
        let (h, next) = self.hidden(tokens, Some(cache));
        (self.logits(h), next.expect("a model with a cache"))
    }

    /// The hidden states the head reads (after the final LayerNorm of a pre-norm model and the
    /// head transform of an MLM head), and
    /// for a model with a cache the cache for the next block: `cache` continues `batch`
    /// streams, `None` starts them (a fresh [`new_cache`](Self::new_cache)).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` ids, `seq <= seq_len`; `cache` of `batch` rows
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    /// With a cache of another batch size or layer count, or one given to a model without
    /// `model.cache`.
    pub fn hidden(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&LmCache>,
    ) -> (Tensor<3>, Option<LmCache>) {
        let fresh;
        let cache = match (cache, self.window()) {
            (Some(cache), Some(_)) => cache,
            (None, Some(_)) => {
                fresh = self
                    .new_cache(tokens.dims()[0], &tokens.device())
                    .expect("a window");
                &fresh
            }
            (Some(_), None) => panic!("a cache given to a model without model.cache"),
            (None, None) => {
                let (mut x, key_pe) = self.embed(tokens);
                for block in &self.blocks {
                    x = block.forward(x, key_pe.as_ref());
                }
                return (self.final_norm(x), None);
            }
        };
        let window = self.window().expect("matched");
        let [batch, seq] = tokens.dims();
        assert!(
            cache.batch() == batch && cache.layers.len() == self.blocks.len(),
            "a cache of {} rows and {} layers for {batch} rows and {} layers",
            cache.batch(),
            cache.layers.len(),
            self.blocks.len()
        );
        let view = CacheView {
            window,
            valid: cache.valid.clone(),
        };
        let (mut x, key_pe) = self.embed(tokens);
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (block, past) in self.blocks.iter().zip(&cache.layers) {
            // The next cache, the last `span` rows of `[past ; x]`, without building the whole.
            let span = past.dims()[1];
            let next = if seq >= span {
                x.clone().narrow(1, seq - span, span)
            } else {
                Tensor::cat(vec![past.clone().narrow(1, seq, span - seq), x.clone()], 1)
            };
            layers.push(next.detach());
            x = block.forward_cached(x, past.clone(), key_pe.as_ref(), &view);
        }
        let valid = cache
            .valid
            .iter()
            .map(|v| (v + seq).min(window.span))
            .collect();
        (self.final_norm(x), Some(LmCache { layers, valid }))
    }

    /// The head's scores of every word from hidden states `[batch, seq, d_model]`:
    /// `[batch, seq, vocab]` logits (an adaptive softmax gives its log-probabilities).
    pub fn logits(&self, h: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_model] = h.dims();
        match (&self.adaptive_softmax, &self.head, &self.token_embedding) {
            (Some(softmax), _, _) => {
                let lp = softmax.log_probs(
                    self.adaptive_input.as_ref(),
                    h.reshape([batch * seq, d_model]),
                );
                let vocab = lp.dims()[1];
                lp.reshape([batch, seq, vocab])
            }
            (None, Some(head), _) => crate::ops::linear::forward(head, h),
            // Tied head: logits = h · Eᵀ, `[batch·seq, d_model] x [d_model, vocab]`.
            (None, None, Some(embedding)) => {
                let logits = crate::ops::linear::matmul_rows(h, embedding.weight.val().transpose());
                match &self.tied_bias {
                    Some(bias) => logits + bias.val().unsqueeze::<3>(),
                    None => logits,
                }
            }
            (None, None, None) => unreachable!("adaptive input comes with an adaptive softmax"),
        }
    }

    /// The summed negative log-likelihood (nats) of `targets` given hidden states `h` (from
    /// [`hidden`](Self::hidden)), each position's multiplied by its weight when `weights` is
    /// given: the full softmax through [`cross_entropy_sum`](crate::loss::cross_entropy_sum),
    /// an adaptive softmax with each tail only for the positions whose target is in it.
    ///
    /// # Shapes
    /// - `h`: `[batch, seq, d_model]`; `targets`, `weights`: `[batch, seq]`
    /// - output: `[1]`
    pub fn nll_sum(
        &self,
        h: Tensor<3>,
        targets: Tensor<2, Int>,
        weights: Option<Tensor<2>>,
    ) -> Tensor<1> {
        match &self.adaptive_softmax {
            Some(softmax) => {
                let [batch, seq, d_model] = h.dims();
                let rows = batch * seq;
                softmax.nll(
                    self.adaptive_input.as_ref(),
                    h.reshape([rows, d_model]),
                    targets.reshape([rows]),
                    weights.map(|w| w.reshape([rows])),
                )
            }
            None => crate::loss::cross_entropy_sum(self.logits(h), targets, weights),
        }
    }

    /// Token embedding plus learned positions and the first token type, then the embedding
    /// LayerNorm and projection, dropout; and the relative-position keys.
    fn embed(&self, tokens: Tensor<2, Int>) -> (Tensor<3>, Option<Tensor<2>>) {
        let [batch, seq] = tokens.dims();
        assert!(
            seq <= self.seq_len,
            "sequence of {seq} tokens is longer than the model's seq_len {}",
            self.seq_len
        );
        let device = tokens.device();
        let mut x = match (&self.token_embedding, &self.adaptive_input) {
            (Some(table), _) => table.forward(tokens), // [batch, seq, d_model]
            (None, Some(clusters)) => clusters.embed(tokens),
            (None, None) => unreachable!("every model has an input embedding"),
        };
        if let Some(pos) = &self.pos_embedding {
            let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
            let [_, _, d_model] = x.dims();
            x = x + pos.forward(positions).expand([batch, seq, d_model]);
        }
        if let Some(types) = &self.type_embedding {
            // Every position is of the first type: one segment.
            let first = types.weight.val().narrow(0, 0, 1); // [1, d_model]
            x = x + first.unsqueeze::<3>();
        }
        if let Some(norm) = &self.embedding_norm {
            x = crate::ops::norm::layer_norm(norm, x);
        }
        if let Some(projection) = &self.embedding_projection {
            x = crate::ops::linear::forward(projection, x);
        }
        let key_pe = self.key_pe.as_ref().map(|p| p.val());
        (self.dropout.forward(x), key_pe)
    }

    /// The final LayerNorm of a pre-norm model, then the MLM head's transform.
    fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.norm_final {
            Some(norm) => crate::ops::norm::layer_norm(norm, x),
            None => x,
        };
        match &self.head_transform {
            Some(transform) => transform.forward(x),
            None => x,
        }
    }
}
