//! Segment-level recurrence (Transformer-XL; Sukhbaatar et al. 2019's `h_cache`): each
//! attention layer keeps the last `span` inputs of its mixer from earlier blocks of the same
//! stream, detached, and computes its keys and values over `[cache ; block]`, so a query reaches
//! back `span` positions whatever the block length.
//!
//! Which keys query `i` of a block (position `s + i` of `[cache ; block]`, `s` the cache
//! length) sees is its **window**: the keys `j` at distance `δ = s + i − j` with
//! `1 ≤ δ ≤ span` (the paper's: exactly `span` earlier positions, the query itself excluded),
//! or `0 ≤ δ ≤ span − 1` when `include_self`. At a stream's start the cache is either zero
//! vectors (`start = "zeros"`, as the paper's code: they are keys like any other) or
//! masked out (`start = "masked"`: a row's first `s − valid` cache positions are not keys).
//!
//! On flex and the Cube backends a cached layer's attention is the fused operation
//! (`KeyLayout::cached`: the query offset, the window, a masked start, memory, relative
//! positions and the adaptive span in one online softmax; the `[block, span + block]` scores
//! never materialised); on ndarray composed tensor ops, the fused path's test reference. With an
//! adaptive span a layer reads only the last `⌈max z + ramp⌉` cache positions
//! (`Mixer::trim_cache`), so its cost follows the spans it learned.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::ops::attention::KeyLayout;

/// How a stream's start fills the cache (`model.cache.start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStart {
    /// Zero vectors, attended like any other input (Sukhbaatar et al.'s code).
    #[default]
    Zeros,
    /// Positions before the stream's start are not keys.
    Masked,
}

/// The `[model.cache]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Keys each query sees, counting back from the query (the cache holds this many earlier
    /// positions of every layer's input).
    pub span: usize,
    /// Whether a query is one of its own keys (the paper: no).
    pub include_self: bool,
    /// What stands before a stream's first token: `zeros` or `masked`.
    pub start: CacheStart,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            span: 256,
            include_self: false,
            start: CacheStart::Zeros,
        }
    }
}

impl CacheConfig {
    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        if self.span == 0 {
            return Err(ModelError::invalid(
                "cache.span",
                0,
                "must be at least 1 (leave [model.cache] out for no cache)",
            ));
        }
        Ok(())
    }

    /// The window this config gives every cached layer.
    pub fn window(&self) -> Window {
        Window {
            span: self.span,
            include_self: self.include_self,
        }
    }
}

/// The keys a cached query sees, by distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Number of keys counting back from the query.
    pub span: usize,
    /// Whether distance 0 (the query itself) is one of them.
    pub include_self: bool,
}

impl Window {
    /// The smallest visible distance: 0 with self, else 1.
    pub fn min_distance(&self) -> usize {
        usize::from(!self.include_self)
    }

    /// The largest visible distance.
    pub fn max_distance(&self) -> usize {
        self.span - 1 + self.min_distance()
    }
}

/// What a cached mixer is told besides its input: the window, and for each batch row how many
/// of the cache's last positions are real inputs (the rest are masked; all of them under
/// `start = "zeros"`).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheView {
    /// The window of every query.
    pub window: Window,
    /// Per batch row, the number of valid cache positions (at the cache's end).
    pub valid: Vec<usize>,
}

impl CacheView {
    /// The fused attention's key layout of a block after `cache` cached positions, for
    /// `n_heads` heads per batch row.
    pub fn key_layout(&self, cache: usize, n_heads: usize) -> KeyLayout {
        let window = (self.window.min_distance(), self.window.max_distance());
        KeyLayout::cached(cache, window, &self.valid, n_heads)
    }

    /// The masks of a block of `n` queries over `[cache (s) ; block (n)]`:
    /// `hidden` `[batch, 1, n, s + n]` (true where the key is not in the query's window or is
    /// a masked cache position) and the distances `δ = s + i − j` `[n, s + n]` (i64, negative
    /// for keys after the query).
    pub fn masks(&self, n: usize, s: usize, device: &Device) -> (Tensor<4, Bool>, Tensor<2, Int>) {
        let batch = self.valid.len();
        let keys = s + n;
        let (lo, hi) = (
            self.window.min_distance() as i64,
            self.window.max_distance() as i64,
        );
        let mut hidden = Vec::with_capacity(batch * n * keys);
        for &valid in &self.valid {
            let first = s.saturating_sub(valid);
            for i in 0..n {
                for j in 0..keys {
                    let delta = (s + i) as i64 - j as i64;
                    hidden.push(delta < lo || delta > hi || j < first);
                }
            }
        }
        let distances: Vec<i64> = (0..n)
            .flat_map(|i| (0..keys).map(move |j| (s + i) as i64 - j as i64))
            .collect();
        (
            Tensor::from_data(TensorData::new(hidden, [batch, 1, n, keys]), device),
            Tensor::from_data(TensorData::new(distances, [n, keys]), device),
        )
    }
}

/// A model's cache between blocks of its streams: per layer, the last `span` mixer inputs
/// `[batch, span, d_model]` (detached), and per batch row how many of them are real.
#[derive(Debug, Clone)]
pub struct LmCache {
    /// One tensor per block, input first.
    pub layers: Vec<Tensor<3>>,
    /// Per batch row, valid positions at the end of every layer's cache (`span` under
    /// `start = "zeros"`).
    pub valid: Vec<usize>,
}

impl LmCache {
    /// Rows of the batch.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Rows `rows` of the cache (the streams of a shard of the batch).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> LmCache {
        assert!(
            rows.end <= self.batch(),
            "rows {rows:?} of {}",
            self.batch()
        );
        LmCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.clone().narrow(0, rows.start, rows.len()))
                .collect(),
            valid: self.valid[rows].to_vec(),
        }
    }

    /// The caches of consecutive shards, rejoined in order on `device`.
    pub fn cat(parts: Vec<LmCache>, device: &Device) -> LmCache {
        let n_layers = parts.first().map_or(0, |p| p.layers.len());
        let mut layers: Vec<Vec<Tensor<3>>> = vec![Vec::with_capacity(parts.len()); n_layers];
        let mut valid = vec![];
        for part in parts {
            for (all, layer) in layers.iter_mut().zip(part.layers) {
                all.push(layer.to_device(device));
            }
            valid.extend(part.valid);
        }
        LmCache {
            layers: layers.into_iter().map(|l| Tensor::cat(l, 0)).collect(),
            valid,
        }
    }

    /// The cache on `device`.
    pub fn to_device(self, device: &Device) -> LmCache {
        LmCache {
            layers: self
                .layers
                .into_iter()
                .map(|l| l.to_device(device))
                .collect(),
            valid: self.valid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::{
        DenseAttentionConfig, MixerConfig, MixerContext, PersistentAttentionConfig,
    };
    use crate::test_util::{assert_all_close, devices, to_vec, tokens};
    use crate::{LmConfig, NormPlacement, Position};
    use burn::module::Param;
    use burn::tensor::Distribution;

    fn ctx(d_model: usize, relative: bool) -> MixerContext {
        MixerContext {
            d_model,
            n_layers: 2,
            dropout: 0.0,
            max_seq_len: 64,
            rope_theta: None,
            relative_positions: relative,
            bias: true,
            layer: 0,
            fused_attention: true,
        }
    }

    /// All-attention's parts for the naive reference, as the layer uses them.
    #[derive(Default)]
    struct Parts {
        /// `[d, P]` relative-position keys, row-major.
        key_pe: Option<(Vec<f32>, usize)>,
        /// `[h, N, d]` effective memory keys and values.
        memory: Option<(Vec<f32>, Vec<f32>, usize)>,
        /// Per head span `z` in tokens, and the ramp.
        span: Option<(Vec<f32>, f32)>,
    }

    /// Naive loops in f64: query `i` of each row over keys `j` of `[cache (s) ; block (n)]`
    /// in its window (distance `s + i − j`), not before the row's first valid position, plus
    /// memory; one joint normalisation. A row with nothing to see gives zeros.
    fn naive(
        [q, k, v]: [&[f32]; 3],
        [b, h, n, d]: [usize; 4],
        s: usize,
        view: &CacheView,
        parts: &Parts,
    ) -> Vec<f32> {
        let keys = s + n;
        let dot = |a: &[f32], bv: &[f32]| -> f64 {
            a.iter()
                .zip(bv)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum()
        };
        let scale = 1.0 / (d as f64).sqrt();
        let (lo, hi) = (view.window.min_distance(), view.window.max_distance());
        let mut out = vec![0.0f32; b * h * n * d];
        for bi in 0..b {
            let first = s - view.valid[bi].min(s);
            for hi_ in 0..h {
                let row = |t: &[f32], len: usize, i: usize| {
                    let at = ((bi * h + hi_) * len + i) * d;
                    t[at..at + d].to_vec()
                };
                for i in 0..n {
                    let qi = row(q, n, i);
                    // (score, weight factor, value)
                    let mut terms: Vec<(f64, f64, Vec<f32>)> = vec![];
                    for j in first..keys {
                        let delta = (s + i) as i64 - j as i64;
                        if delta < lo as i64 || delta > hi as i64 {
                            continue;
                        }
                        let delta = delta as usize;
                        let mut score = dot(&qi, &row(k, keys, j));
                        if let Some((pe, p)) = &parts.key_pe {
                            let col: Vec<f32> = (0..d).map(|c| pe[c * p + delta - lo]).collect();
                            score += dot(&qi, &col);
                        }
                        let factor = parts.span.as_ref().map_or(1.0, |(z, ramp)| {
                            ((f64::from(*ramp) + f64::from(z[hi_]) - delta as f64)
                                / f64::from(*ramp))
                            .clamp(0.0, 1.0)
                        });
                        terms.push((score * scale, factor, row(v, keys, j)));
                    }
                    if let Some((mk, mv, slots)) = &parts.memory {
                        for m in 0..*slots {
                            let at = (hi_ * slots + m) * d;
                            let score = dot(&qi, &mk[at..at + d]) * scale;
                            terms.push((score, 1.0, mv[at..at + d].to_vec()));
                        }
                    }
                    if terms.is_empty() {
                        continue;
                    }
                    let max = terms.iter().map(|t| t.0).fold(f64::MIN, f64::max);
                    let norm: f64 = terms.iter().map(|t| (t.0 - max).exp() * t.1).sum();
                    for c in 0..d {
                        let y: f64 = terms
                            .iter()
                            .map(|t| (t.0 - max).exp() * t.1 * f64::from(t.2[c]))
                            .sum();
                        out[((bi * h + hi_) * n + i) * d + c] = (y / norm) as f32;
                    }
                }
            }
        }
        out
    }

    fn views(s: usize) -> Vec<CacheView> {
        let mut out = vec![];
        for include_self in [false, true] {
            for valid in [vec![s, s], vec![0, 3]] {
                out.push(CacheView {
                    window: Window {
                        span: 7,
                        include_self,
                    },
                    valid,
                });
            }
        }
        out
    }

    #[test]
    fn cached_dense_attention_equals_naive_loops() {
        let (b, h, n, d, s) = (2, 2, 5, 4, 7);
        for (name, device) in devices() {
            device.seed(2);
            let layer = DenseAttentionConfig {
                n_heads: h,
                causal: true,
            }
            .init(&ctx(h * d, false), &device);
            let normal = Distribution::Normal(0.0, 1.0);
            let q = Tensor::<4>::random([b, h, n, d], normal, &device);
            let k = Tensor::<4>::random([b, h, s + n, d], normal, &device);
            let v = Tensor::<4>::random([b, h, s + n, d], normal, &device);
            let (qv, kv, vv) = (to_vec(q.clone()), to_vec(k.clone()), to_vec(v.clone()));
            for view in views(s) {
                let got = to_vec(layer.attend_cached(q.clone(), k.clone(), v.clone(), &view));
                let want = naive([&qv, &kv, &vv], [b, h, n, d], s, &view, &Parts::default());
                assert_all_close(&got, &want, 1e-5, &format!("{name} {view:?}"));
                if view.valid[0] == 0 && !view.window.include_self {
                    // Row 0's first query sees only masked positions and not itself: zeros.
                    let first = &got[..d];
                    assert!(first.iter().all(|&x| x == 0.0), "{name}: {first:?}");
                }
            }
        }
    }

    #[test]
    fn cached_all_attention_equals_naive_loops() {
        let (b, h, n, d, s, slots) = (2, 2, 5, 4, 7, 3);
        for (name, device) in devices() {
            device.seed(3);
            let mut layer = PersistentAttentionConfig {
                n_heads: h,
                n_persistent: Some(slots),
                adaptive_span: true,
                span_ramp: 2,
                ..Default::default()
            }
            .init(&ctx(h * d, true), &device);
            layer.span_fraction =
                Some(Param::from_tensor(Tensor::from_floats([0.3, 0.9], &device)));
            let normal = Distribution::Normal(0.0, 1.0);
            let q = Tensor::<4>::random([b, h, n, d], normal, &device);
            let k = Tensor::<4>::random([b, h, s + n, d], normal, &device);
            let v = Tensor::<4>::random([b, h, s + n, d], normal, &device);
            let key_pe = Tensor::<2>::random([d, 9], normal, &device);
            let (qv, kv, vv) = (to_vec(q.clone()), to_vec(k.clone()), to_vec(v.clone()));
            let mk = to_vec(
                layer
                    .persistent_keys
                    .as_ref()
                    .unwrap()
                    .val()
                    .mul_scalar((d as f64).sqrt()),
            );
            let mv = to_vec(
                layer
                    .persistent_values
                    .as_ref()
                    .unwrap()
                    .val()
                    .mul_scalar((slots as f64).sqrt()),
            );
            for view in views(s) {
                let span = view.window.span as f32;
                let parts = Parts {
                    key_pe: Some((to_vec(key_pe.clone()), 9)),
                    memory: Some((mk.clone(), mv.clone(), slots)),
                    span: Some((vec![0.3 * span, 0.9 * span], 2.0)),
                };
                let got = to_vec(layer.attend_cached(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(&key_pe),
                    &view,
                ));
                let want = naive([&qv, &kv, &vv], [b, h, n, d], s, &view, &parts);
                assert_all_close(&got, &want, 1e-5, &format!("{name} {view:?}"));
            }
        }
    }

    /// The defining invariant: `k` consecutive blocks with the cache carried give the logits
    /// of one pass over the whole sequence, each query limited to its window — several layers,
    /// so deeper layers see cached inputs that themselves used the cache.
    #[test]
    fn blocks_with_the_cache_equal_one_pass_over_the_whole_sequence() {
        let dense = MixerConfig::Dense(DenseAttentionConfig {
            n_heads: 2,
            causal: true,
        });
        let persistent = MixerConfig::Persistent(PersistentAttentionConfig {
            n_heads: 2,
            n_persistent: Some(4),
            adaptive_span: true,
            span_ramp: 3,
            span_init: 0.6,
            ..Default::default()
        });
        let cases = [
            (
                dense.clone(),
                Position::None,
                NormPlacement::Pre,
                false,
                CacheStart::Zeros,
            ),
            (
                dense.clone(),
                Position::Rope,
                NormPlacement::Post,
                true,
                CacheStart::Masked,
            ),
            (
                dense,
                Position::None,
                NormPlacement::Post,
                false,
                CacheStart::Masked,
            ),
            (
                persistent.clone(),
                Position::Relative,
                NormPlacement::Post,
                false,
                CacheStart::Zeros,
            ),
            (
                persistent,
                Position::Relative,
                NormPlacement::Pre,
                true,
                CacheStart::Masked,
            ),
        ];
        let (batch, block, blocks, vocab) = (2, 8, 3, 13);
        let mut on = devices();
        on.extend(crate::test_util::wgpu().map(|d| ("wgpu", d)));
        for (name, device) in on {
            for (mixer, position, norm, include_self, start) in cases.clone() {
                let what = format!(
                    "{name} {} {position:?} {norm:?} self={include_self} {start:?}",
                    mixer.kind()
                );
                device.seed(4);
                let model = LmConfig {
                    vocab_size: Some(vocab),
                    d_model: 8,
                    n_layers: 3,
                    d_ff: 16,
                    seq_len: block * blocks,
                    position,
                    norm,
                    mixer,
                    cache: Some(CacheConfig {
                        span: 12, // longer than a block: the cache reaches two blocks back
                        include_self,
                        start,
                    }),
                    ..LmConfig::default()
                }
                .init(&device)
                .unwrap();
                let ids = tokens(batch, block * blocks, vocab, 9, &device);
                let whole = to_vec(model.forward(ids.clone()));
                let mut cache = model.new_cache(batch, &device).unwrap();
                let mut pieces = vec![vec![]; batch];
                let mut fresh_second = vec![];
                for i in 0..blocks {
                    let part = ids.clone().narrow(1, i * block, block);
                    if i == 1 {
                        fresh_second = to_vec(model.forward(part.clone()));
                    }
                    let (logits, next) = model.forward_cached(part, &cache);
                    cache = next;
                    let logits = to_vec(logits);
                    for (r, piece) in pieces.iter_mut().enumerate() {
                        piece
                            .extend_from_slice(&logits[r * block * vocab..(r + 1) * block * vocab]);
                    }
                }
                let pieces: Vec<f32> = pieces.concat();
                let diff = whole
                    .iter()
                    .zip(&pieces)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= 1e-5,
                    "{what}: blocks differ from one pass by {diff}"
                );
                assert_eq!(cache.valid, vec![12; batch], "{what}");
                // The cache matters: the second block alone (a fresh stream) differs.
                let second: Vec<f32> = (0..batch)
                    .flat_map(|r| {
                        let at = (r * blocks + 1) * block * vocab;
                        whole[at..at + block * vocab].to_vec()
                    })
                    .collect();
                let change = second
                    .iter()
                    .zip(&fresh_second)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                eprintln!("{what}: blocks vs one pass {diff:.1e}, cache effect {change:.1e}");
                assert!(
                    change > 1e-5_f32.max(10.0 * diff),
                    "{what}: the cache changed nothing ({change}; blocks vs one pass {diff})"
                );
            }
        }
    }

    #[test]
    fn cache_config_errors_name_the_key() {
        let base = LmConfig {
            vocab_size: Some(5),
            position: Position::None,
            cache: Some(CacheConfig::default()),
            ..LmConfig::default()
        };
        assert!(base.validate().is_ok());
        let err = |c: LmConfig| c.validate().unwrap_err().to_string();
        let e = err(LmConfig {
            cache: Some(CacheConfig {
                span: 0,
                ..CacheConfig::default()
            }),
            ..base.clone()
        });
        assert!(e.contains("model.cache.span"), "{e}");
        let e = err(LmConfig {
            position: Position::Learned,
            ..base.clone()
        });
        assert!(e.contains("model.position") && e.contains("cache"), "{e}");
        let e = err(LmConfig {
            mixer: MixerConfig::Fourier(Default::default()),
            ..base
        });
        assert!(e.contains("model.cache") && e.contains("fourier"), "{e}");
    }

    /// With a cache, an adaptive span is a fraction of the cache's span: a fraction of 0.5 of
    /// a 20-position cache is 10 tokens for every head (blocks of 8).
    #[test]
    fn learned_spans_are_fractions_of_the_cache_span() {
        let device = Device::flex();
        let model = LmConfig {
            vocab_size: Some(7),
            d_model: 8,
            n_layers: 2,
            d_ff: 0,
            seq_len: 8,
            position: Position::Relative,
            cache: Some(CacheConfig {
                span: 20,
                ..CacheConfig::default()
            }),
            mixer: MixerConfig::Persistent(PersistentAttentionConfig {
                n_heads: 2,
                n_persistent: Some(2),
                adaptive_span: true,
                span_init: 0.5,
                ..PersistentAttentionConfig::default()
            }),
            ..LmConfig::default()
        }
        .init(&device)
        .unwrap();
        assert_eq!(model.learned_spans(), vec![vec![10.0, 10.0]; 2]);
    }

    /// A cached layer's fused operation (the flex kernel; the Cube kernels on wgpu) against
    /// its composed tensor ops, values and gradients of every input: a cache of 300 before 70
    /// queries (two query tiles, several key runs; two cubes of units), a window of 290 (some
    /// cache positions out of every window), with and without self, zeros and masked starts
    /// (one row with 5 valid positions, one with none); dense attention, and all-attention
    /// with memory, relative positions and an adaptive span whose ramp ends inside the cache
    /// (key runs past it skipped).
    #[test]
    fn fused_cached_attention_equals_the_composed_path_in_values_and_gradients() {
        let mut on = vec![("flex", Device::flex())];
        on.extend(crate::test_util::wgpu().map(|d| ("wgpu", d)));
        for (name, device) in on {
            fused_cached_attention_equals_the_composed_path(name, &device.autodiff());
        }
    }

    fn fused_cached_attention_equals_the_composed_path(name: &str, device: &Device) {
        let (b, h, n, d, s) = (2, 2, 70, 8, 300);
        let device = device.clone();
        device.seed(12);
        let dense = DenseAttentionConfig {
            n_heads: h,
            causal: true,
        }
        .init(&ctx(h * d, false), &device);
        let mut persistent = PersistentAttentionConfig {
            n_heads: h,
            n_persistent: Some(3),
            adaptive_span: true,
            span_ramp: 16,
            ..Default::default()
        }
        .init(&ctx(h * d, true), &device);
        persistent.span_fraction = Some(Param::from_tensor(
            Tensor::from_floats([0.25, 0.7], &device).require_grad(),
        ));
        let r = |shape: [usize; 4], std: f64| {
            Tensor::<4>::random(shape, Distribution::Normal(0.0, std), &device).require_grad()
        };
        let (q, k, v) = (
            r([b, h, n, d], 3.0),
            r([b, h, s + n, d], 1.0),
            r([b, h, s + n, d], 1.0),
        );
        let key_pe =
            Tensor::<2>::random([d, 300], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<4>::random([b, h, n, d], Distribution::Normal(0.0, 1.0), &device);
        for include_self in [false, true] {
            for valid in [vec![s, s], vec![5, 0]] {
                let view = CacheView {
                    window: Window {
                        span: 290,
                        include_self,
                    },
                    valid,
                };
                for all_attention in [false, true] {
                    let run = |fused: bool| {
                        let y = if all_attention {
                            persistent.attend_cached_with(
                                q.clone(),
                                k.clone(),
                                v.clone(),
                                Some(&key_pe),
                                &view,
                                fused,
                            )
                        } else {
                            dense.attend_cached_with(q.clone(), k.clone(), v.clone(), &view, fused)
                        };
                        let grads = (y.clone() * w.clone()).sum().backward();
                        let mut out = vec![to_vec(y)];
                        for t in [&q, &k, &v] {
                            out.push(to_vec(t.grad(&grads).unwrap()));
                        }
                        if all_attention {
                            let m = &persistent;
                            for t in [
                                m.persistent_keys.as_ref().unwrap().val(),
                                m.persistent_values.as_ref().unwrap().val(),
                            ] {
                                out.push(to_vec(t.grad(&grads).unwrap()));
                            }
                            out.push(to_vec(key_pe.grad(&grads).unwrap()));
                            let fraction = m.span_fraction.as_ref().unwrap().val();
                            out.push(to_vec(fraction.grad(&grads).unwrap()));
                        }
                        out
                    };
                    let (fused, composed) = (run(true), run(false));
                    let names = [
                        "output",
                        "dq",
                        "dk",
                        "dv",
                        "d mem keys",
                        "d mem values",
                        "d key_pe",
                        "d span",
                    ];
                    for ((part, a), b) in names.iter().zip(&fused).zip(&composed) {
                        let what = format!("{name} all={all_attention} {view:?} {part}");
                        assert!(a.iter().all(|x| x.is_finite()), "{what}: not finite");
                        assert_all_close(a, b, 2e-5, &what);
                    }
                }
            }
        }
    }

    /// With an adaptive span a cached layer reads only the cache positions its ramp reaches:
    /// spans of 0.25 and 0.5 of 40 with a ramp of 4 keep the last ⌈20 + 4⌉ = 24; without a
    /// span, all of them.
    #[test]
    fn the_cache_is_trimmed_to_the_largest_learned_span() {
        let device = Device::flex();
        let mut layer = PersistentAttentionConfig {
            n_heads: 2,
            n_persistent: Some(2),
            adaptive_span: true,
            span_ramp: 4,
            ..Default::default()
        }
        .init(&ctx(8, true), &device);
        layer.span_fraction = Some(Param::from_tensor(Tensor::from_floats(
            [0.25, 0.5],
            &device,
        )));
        let cache = Tensor::<3>::random([2, 40, 8], Distribution::Normal(0.0, 1.0), &device);
        let trimmed = layer.trim_cache(cache.clone(), 40);
        assert_eq!(trimmed.dims(), [2, 24, 8]);
        assert_eq!(to_vec(trimmed), to_vec(cache.clone().narrow(1, 16, 24)));
        layer.span_fraction = None;
        assert_eq!(layer.trim_cache(cache, 40).dims(), [2, 40, 8]);
    }
}
