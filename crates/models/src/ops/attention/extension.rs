//! The operation's interface: the backend extension [`AttentionOps`] (dispatched to flex, the
//! Cube backends and autodiff) and its backward [`AttentionBackward`].

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};

use super::layout::KeyLayout;

/// Attention (dense, block-sparse, or all-attention's context + persistent memory) as a
/// backend operation.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait AttentionOps: Backend {
    /// Forward. All f32: `q` (already multiplied by the score scale) `[heads, n, d]` with
    /// `heads = batch · n_heads`, `k` and `v` `[heads, nk, d]` (`nk = n`, or `s + n` over a
    /// cached layer's `[cache ; block]`). Returns `[heads, n, d + 1]`: the attention output in
    /// the first `d` columns and each row's log-sum-exp of (masked) weights in column `d` (no
    /// gradient flows through it; a row with no visible key outputs zeros and `−∞`).
    ///
    /// `keys` says which context keys each query sees ([`KeyLayout::cached`]: query `i` is key
    /// `s + i`, seeing the distances `δ = s + i − j` of its window; distances below are
    /// measured so). All-attention's parts, each empty when absent (Sukhbaatar et al. 2019):
    /// - `memory_keys`, `memory_values` `[mem_heads, m, d]`: persistent vectors that every
    ///   query of flattened head `h` sees (memory head `h mod mem_heads`), in the same softmax
    ///   as its context keys; keys already scaled like the context keys;
    /// - `key_pe` `[d, span]` (causal only; `span` covers every visible distance): the score
    ///   of query `i` and a key at distance `δ` gains `q_i · key_pe[:, δ − δ_min]` (`δ_min` the
    ///   window's smallest distance: 0 without a cache);
    /// - `span_z` `[span_heads]` (tokens) with `ramp`: context weights at distance `δ = i − j`
    ///   are multiplied by `clamp((ramp + z − δ) / ramp, 0, 1)` (adaptive span, head
    ///   `h mod span_heads`) before the joint normalisation; key blocks wholly past the ramp
    ///   are skipped.
    ///
    /// With `dropout = p > 0` each weight in the value product is zeroed with probability `p`
    /// and the rest scaled by `1 / (1 − p)`, the mask a hash of `(seed, head, row, key)` (memory
    /// slot `s` is key `nk + s`) that the backward regenerates.
    #[allow(clippy::too_many_arguments)]
    fn tiled_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        memory_keys: FloatTensor<Self>,
        memory_values: FloatTensor<Self>,
        key_pe: FloatTensor<Self>,
        span_z: FloatTensor<Self>,
        keys: KeyLayout,
        ramp: f32,
        dropout: f32,
        seed: u32,
    ) -> FloatTensor<Self>;
}

/// The seven inputs of [`AttentionOps::tiled_attention`] (or their gradients), in order.
pub type Operands<B> = [FloatTensor<B>; 7];

/// The backward of [`AttentionOps::tiled_attention`] on a backend with the forward kernel;
/// called from the autodiff node only, so not routed through `Dispatch`.
pub trait AttentionBackward: Backend {
    /// Given the inputs, the forward's output `out` (`[heads, n, d + 1]`) and its gradient
    /// `grad` (same shape, the last column ignored): the gradients of the seven inputs.
    fn tiled_attention_backward(
        inputs: Operands<Self>,
        out: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        keys: &KeyLayout,
        settings: (f32, f32, u32),
    ) -> Operands<Self>;
}
