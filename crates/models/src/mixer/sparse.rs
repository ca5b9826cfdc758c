//! Block-sparse multi-head attention (Child et al. 2019; Yun et al. 2020): the projections of
//! [`DenseAttention`], but each query block attends only to the key blocks its
//! [`PatternSpec`](crate::pattern::PatternSpec) lists.
//!
//! The kernel gathers, for every query block, its key and value blocks (`select` on the
//! block-major keys), so scores have shape `[batch, heads, q_blocks, block, k_max · block]`
//! where `k_max` is the longest row. **No `n × n` tensor is ever built**: time and memory are
//! O(n · k_max · block · d_head). Rows shorter than `k_max` are padded with masked slots; the
//! pattern checker reports the padding fraction of each pattern.
//!
//! On flex (with `model.attention_impl = "fused"`, the default) the mixer instead runs the
//! tiled attention operation ([`KeyLayout::sparse`](crate::ops::attention::KeyLayout::sparse)): each query
//! block walks only its listed key blocks, consecutive ones as one run, with no padding and
//! nothing gathered; the backward recomputes the probabilities. The gathering kernel below
//! stays as the path of the other backends and the fused path's test reference.
//!
//! The pattern is rebuilt from its spec for each sequence length (cheap: O(n_blocks · k_max)),
//! so training windows, evaluation tails and a growing sampling context all work; causal
//! built-in rows depend only on the query block, so a prefix keeps its pattern as `n` grows.

use burn::module::Module;
use burn::nn::Dropout;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

use super::context::MixerContext;
use super::dense::{DenseAttention, DenseAttentionConfig};
use crate::error::ModelError;
use crate::ops::kernel::Memo;
use crate::pattern::{LayerPattern, PatternSpec};

/// Settings of [`SparseAttention`] under `[model.mixer]` with `kind = "sparse"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SparseAttentionConfig {
    /// Number of heads; must divide `d_model` (and be a multiple of the head groups of any
    /// `heads` pattern).
    pub n_heads: usize,
    /// Mask future positions (autoregressive LM).
    pub causal: bool,
    /// Block size in tokens: the granularity of the pattern (16–128 is typical; 1 makes a
    /// token-level pattern).
    pub block: usize,
    /// The patterns, one per layer in a cycle of period `p = pattern.len()`: layer `l` uses
    /// `pattern[l % p]` (Yun et al.'s `A^1..A^p`). Sizes inside count blocks.
    pub pattern: Vec<PatternSpec>,
}

impl Default for SparseAttentionConfig {
    fn default() -> Self {
        Self {
            n_heads: 4,
            causal: true,
            block: 64,
            pattern: vec![],
        }
    }
}

impl SparseAttentionConfig {
    fn dense(&self) -> DenseAttentionConfig {
        DenseAttentionConfig {
            n_heads: self.n_heads,
            causal: self.causal,
        }
    }

    pub(crate) fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        if ctx.relative_positions {
            return Err(ModelError::invalid(
                "position",
                "\"relative\"",
                "sparse attention has no relative-position term; use \"learned\" or \"rope\"",
            ));
        }
        self.dense().validate_heads(ctx)?;
        if self.block == 0 {
            return Err(ModelError::invalid(
                "mixer.block",
                0,
                "must be at least 1 (1 = token-level pattern)",
            ));
        }
        if self.pattern.is_empty() {
            return Err(ModelError::invalid(
                "mixer.pattern",
                "[]",
                "list at least one pattern, e.g. pattern = [{ kind = \"window\", width = 3 }]",
            ));
        }
        for (i, spec) in self.pattern.iter().enumerate() {
            spec.validate(&format!("mixer.pattern[{i}]"))?;
            let groups = spec.head_groups();
            if !self.n_heads.is_multiple_of(groups) {
                return Err(ModelError::invalid(
                    format!("mixer.pattern[{i}].of"),
                    format!("[{groups} patterns]"),
                    format!(
                        "`heads` splits n_heads = {} into equal groups: list a divisor of it",
                        self.n_heads
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The names of the patterns of one period, joined by `separator` (`window | dilated`).
    pub fn pattern_names(&self, separator: &str) -> String {
        self.pattern
            .iter()
            .map(PatternSpec::name)
            .collect::<Vec<_>>()
            .join(separator)
    }

    /// The pattern of layer `layer` over `n` tokens.
    pub fn layer_pattern(&self, layer: usize, n: usize) -> LayerPattern {
        self.pattern[layer % self.pattern.len()].build(
            n.div_ceil(self.block),
            self.block,
            self.causal,
            layer,
        )
    }

    pub(crate) fn init(&self, ctx: &MixerContext, device: &Device) -> SparseAttention {
        SparseAttention {
            attention: self.dense().init(ctx, device),
            block: self.block,
            layer: ctx.layer,
            pattern: self.pattern[ctx.layer % self.pattern.len()].clone(),
        }
    }
}

/// Multi-head attention restricted to a block-sparse pattern.
#[derive(Module, Debug)]
pub struct SparseAttention {
    /// Projections, dropout and RoPE, shared with dense attention; only the core differs.
    pub attention: DenseAttention,
    /// Block size in tokens.
    pub block: usize,
    /// Index of this layer in the model (selects the pattern and salts random draws).
    pub layer: usize,
    /// This layer's pattern (rebuilt from the config when a model is loaded).
    #[module(skip)]
    pub pattern: PatternSpec,
}

impl SparseAttention {
    /// This layer's resolved pattern for `n` tokens.
    pub fn layer_pattern(&self, n: usize) -> LayerPattern {
        self.pattern.build(
            n.div_ceil(self.block),
            self.block,
            self.attention.causal,
            self.layer,
        )
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let (q, k, v) = self.attention.project(x);
        let layout = self.layer_pattern(seq);
        let d_head = q.dims()[3];
        let y = if self.attention.fused
            && crate::ops::attention::attention_fused_on(&q.device(), d_head)
        {
            let n_heads = self.attention.n_heads;
            self.attention
                .attend_tiled(q, k, v, layout.key_layout(n_heads))
        } else {
            block_sparse_attention(q, k, v, &layout, Some(&self.attention.attn_dropout))
        };
        let y = y.swap_dims(1, 2).reshape([batch, seq, d_model]);
        self.attention
            .resid_dropout
            .forward(crate::ops::linear::forward(&self.attention.proj, y))
    }
}

/// Scaled dot-product attention where query block `i` of head `h` sees only the key blocks of
/// its head group's row `i` (and, when causal, only keys not after the query).
///
/// Every row must contain its own (diagonal) block, as every built-in pattern does, so that no
/// query is left without a key.
///
/// # Shapes
/// - `q`, `k`, `v`: `[batch, heads, n, d_head]`
/// - output: `[batch, heads, n, d_head]`
pub fn block_sparse_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &LayerPattern,
    dropout: Option<&Dropout>,
) -> Tensor<4> {
    let [batch, heads, n, d_head] = q.dims();
    let device = q.device();
    let b = layout.block;
    let n_blocks = n.div_ceil(b);
    let padded = n_blocks * b;
    let groups = layout.groups.len();
    assert!(
        heads.is_multiple_of(groups) && layout.groups[0].n_blocks == n_blocks,
        "pattern with {groups} head groups over {} blocks for {heads} heads and {n_blocks} blocks",
        layout.groups[0].n_blocks
    );
    for i in 0..n_blocks {
        assert!(
            layout
                .groups
                .iter()
                .all(|g| g.rows[i].binary_search(&i).is_ok()),
            "row {i} of the pattern lacks its own block; every query needs a key"
        );
    }
    let pad = |t: Tensor<4>| {
        if padded == n {
            t
        } else {
            let zeros = Tensor::zeros([batch, heads, padded - n, d_head], &device);
            Tensor::cat(vec![t, zeros], 2)
        }
    };
    let flat = |t: Tensor<4>| pad(t).reshape([batch, heads * n_blocks, b * d_head]);
    let (keys, values) = (flat(k), flat(v));
    let queries = pad(q).reshape([batch, heads, n_blocks, b, d_head]);
    let core = Core { layout, n, dropout };
    let buckets = layout.buckets();
    let y = if buckets.len() == 1 {
        core.attend(queries, &keys, &values, &buckets[0].0, buckets[0].1)
    } else {
        // Each bucket's query blocks, attended apart, then put back in block order.
        let order = BucketOrder::cached(layout, n, &buckets, &device);
        let mut outputs = vec![];
        for ((blocks, k_max), ids) in buckets.iter().zip(&order.ids) {
            outputs.push(core.attend(
                queries.clone().select(2, ids.clone()),
                &keys,
                &values,
                blocks,
                *k_max,
            ));
        }
        let inverse = order.inverse.clone();
        Tensor::cat(outputs, 2).select(2, inverse)
    };
    let y = y.reshape([batch, heads, padded, d_head]);
    if padded == n {
        y
    } else {
        y.slice([0..batch, 0..heads, 0..n, 0..d_head])
    }
}

/// What every bucket of [`block_sparse_attention`] shares.
struct Core<'a> {
    layout: &'a LayerPattern,
    n: usize,
    dropout: Option<&'a Dropout>,
}

impl Core<'_> {
    /// Attention of the query blocks `blocks`, each padded to `k_max` key blocks.
    ///
    /// # Shapes
    /// - `queries`: `[batch, heads, blocks.len(), block, d_head]`
    /// - `keys`, `values`: `[batch, heads · n_blocks, block · d_head]` (block-major)
    /// - output: `[batch, heads, blocks.len(), block, d_head]`
    fn attend(
        &self,
        queries: Tensor<5>,
        keys: &Tensor<3>,
        values: &Tensor<3>,
        blocks: &[usize],
        k_max: usize,
    ) -> Tensor<5> {
        let [batch, heads, m, b, d_head] = queries.dims();
        let slots = k_max * b;
        let tables =
            SlotTables::cached(self.layout, heads, self.n, blocks, k_max, &queries.device());
        let gather = |t: &Tensor<3>| {
            t.clone()
                .select(1, tables.index.clone())
                .reshape([batch, heads, m, slots, d_head])
        };
        let scale = 1.0 / (d_head as f64).sqrt();
        let mut scores = queries
            .matmul(gather(keys).swap_dims(3, 4))
            .mul_scalar(scale); // [batch, heads, m, b, slots]
        if let Some(masked) = &tables.masked {
            let masked: Tensor<5, Bool> = masked
                .clone()
                .unsqueeze::<5>()
                .expand([batch, heads, m, b, slots]);
            scores = scores.mask_fill(masked, f32::NEG_INFINITY);
        }
        let mut weights = activation::softmax(scores, 4);
        if let Some(dropout) = self.dropout {
            weights = dropout.forward(weights);
        }
        weights.matmul(gather(values))
    }
}

/// Which query blocks each bucket holds (`ids`, one index tensor per bucket) and where each
/// block's rows land after concatenating the buckets (`inverse`): built once per (pattern,
/// length, device) like [`SlotTables`].
#[derive(Clone)]
struct BucketOrder {
    ids: Vec<Tensor<1, Int>>,
    inverse: Tensor<1, Int>,
}

impl BucketOrder {
    fn cached(
        layout: &LayerPattern,
        n: usize,
        buckets: &[(Vec<usize>, usize)],
        device: &Device,
    ) -> Self {
        type Key = (LayerPattern, usize, Device);
        static CACHE: Memo<Key, BucketOrder> = Memo::new(SLOT_TABLES_KEPT);
        CACHE.get_or_build((layout.clone(), n, device.clone()), || {
            Self::build(buckets, device)
        })
    }

    fn build(buckets: &[(Vec<usize>, usize)], device: &Device) -> Self {
        let mut ids = vec![];
        let mut order = vec![];
        for (blocks, _) in buckets {
            let list: Vec<i64> = blocks.iter().map(|&i| i as i64).collect();
            ids.push(Tensor::<1, Int>::from_data(
                TensorData::new(list, [blocks.len()]),
                device,
            ));
            order.extend(blocks.iter().copied());
        }
        let mut inverse = vec![0i64; order.len()];
        for (at, &i) in order.iter().enumerate() {
            inverse[i] = at as i64;
        }
        let inverse = Tensor::<1, Int>::from_data(TensorData::new(inverse, [order.len()]), device);
        Self { ids, inverse }
    }
}

/// The index and mask tensors of one bucket of query blocks: built on the CPU and uploaded
/// once per (pattern, heads, length, bucket, device), then reused by every forward
/// ([`SlotTables::cached`]): no CPU work per step on GPUs.
#[derive(Clone)]
struct SlotTables {
    /// Which key block fills each slot, flattened over heads: `[heads · m · k_max]`.
    index: Tensor<1, Int>,
    /// Slots a query must not see (causally later keys, padding): `[heads, m, block, slots]`,
    /// `None` when nothing is masked.
    masked: Option<Tensor<4, Bool>>,
}

/// How many bucket tables [`SlotTables::cached`] keeps (a model has a few patterns and
/// buckets per length; training and evaluation lengths).
const SLOT_TABLES_KEPT: usize = 64;

impl SlotTables {
    fn cached(
        layout: &LayerPattern,
        heads: usize,
        n: usize,
        blocks: &[usize],
        k_max: usize,
        device: &Device,
    ) -> Self {
        type Key = (LayerPattern, usize, usize, Vec<usize>, usize, Device);
        static CACHE: Memo<Key, SlotTables> = Memo::new(SLOT_TABLES_KEPT);
        let key = (
            layout.clone(),
            heads,
            n,
            blocks.to_vec(),
            k_max,
            device.clone(),
        );
        CACHE.get_or_build(key, || Self::build(layout, heads, n, blocks, k_max, device))
    }

    fn build(
        layout: &LayerPattern,
        heads: usize,
        n: usize,
        blocks: &[usize],
        k_max: usize,
        device: &Device,
    ) -> Self {
        let b = layout.block;
        let n_blocks = n.div_ceil(b);
        let m = blocks.len();
        let groups = layout.groups.len();
        let causal = layout.groups[0].causal;
        let slots = k_max * b;
        // Which block fills each slot (flattened over heads), and the key position of every
        // slot column; padding gets a position past every query so that masks drop it.
        let beyond = (2 * n_blocks * b) as i64;
        let mut index = Vec::with_capacity(heads * m * k_max);
        let mut key_pos = Vec::with_capacity(heads * m * slots);
        let mut any_padding = false;
        for h in 0..heads {
            let group = &layout.groups[h / (heads / groups)];
            for &i in blocks {
                let row = &group.rows[i];
                for s in 0..k_max {
                    match row.get(s) {
                        Some(&j) => {
                            index.push((h * n_blocks + j) as i64);
                            for p in j * b..(j + 1) * b {
                                any_padding |= p >= n;
                                key_pos.push(if p < n { p as i64 } else { beyond });
                            }
                        }
                        None => {
                            any_padding = true;
                            index.push((h * n_blocks + i) as i64);
                            key_pos.extend(std::iter::repeat_n(beyond, b));
                        }
                    }
                }
            }
        }
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(index, [heads * m * k_max]), device);
        let masked = (causal || any_padding).then(|| {
            let shape = [heads, m, b, slots];
            let key_pos =
                Tensor::<4, Int>::from_data(TensorData::new(key_pos, [heads, m, 1, slots]), device)
                    .expand(shape);
            if causal {
                let query_pos: Vec<i64> = blocks
                    .iter()
                    .flat_map(|&i| (i * b..(i + 1) * b).map(|p| p as i64))
                    .collect();
                let query_pos =
                    Tensor::<4, Int>::from_data(TensorData::new(query_pos, [1, m, b, 1]), device)
                        .expand(shape);
                key_pos.greater(query_pos)
            } else {
                key_pos.greater_equal_elem(n as i64)
            }
        });
        Self { index, masked }
    }
}

/// The reference the kernel is tested against: dense attention with the pattern's token-level
/// mask (an `n × n` tensor per head group, so O(n²) — tests and small `n` only).
///
/// # Shapes
/// - `q`, `k`, `v`: `[batch, heads, n, d_head]`
/// - output: `[batch, heads, n, d_head]`
pub fn masked_dense_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &LayerPattern,
) -> Tensor<4> {
    let [batch, heads, n, d_head] = q.dims();
    let groups = layout.groups.len();
    let mut blocked = Vec::with_capacity(heads * n * n);
    for h in 0..heads {
        blocked.extend(
            layout
                .token_mask(h / (heads / groups), n)
                .into_iter()
                .map(|allowed| !allowed),
        );
    }
    let blocked =
        Tensor::<3, Bool>::from_data(TensorData::new(blocked, [heads, n, n]), &q.device())
            .unsqueeze::<4>()
            .expand([batch, heads, n, n]);
    let scale = 1.0 / (d_head as f64).sqrt();
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(scale)
        .mask_fill(blocked, f32::NEG_INFINITY);
    activation::softmax(scores, 3).matmul(v)
}

#[cfg(test)]
/// Every built-in and both combinators, with sizes in blocks.
pub(crate) fn builtin_patterns() -> Vec<PatternSpec> {
    use PatternSpec::*;
    vec![
        Window { width: 3 },
        Strided { stride: 2 },
        Fixed {
            stride: 3,
            summary: 1,
        },
        Star { relays: 1 },
        Global {
            global: 1,
            width: 1,
        },
        Random {
            per_row: 2,
            seed: 4,
        },
        Bigbird {
            width: 3,
            global: 1,
            random: 1,
            seed: 5,
        },
        Dilated {
            width: 2,
            dilation: 2,
        },
        Dense {},
        Union {
            of: vec![
                Window { width: 1 },
                Dilated {
                    width: 2,
                    dilation: 3,
                },
            ],
        },
        Heads {
            of: vec![Window { width: 2 }, Strided { stride: 3 }],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{devices, to_vec};
    use burn::tensor::Distribution;

    fn ctx(d_model: usize, layer: usize) -> MixerContext {
        MixerContext {
            d_model,
            n_layers: 2,
            dropout: 0.0,
            max_seq_len: 64,
            rope_theta: None,
            relative_positions: false,
            bias: true,
            layer,
            fused_attention: true,
        }
    }

    fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        got.iter()
            .zip(want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
            / scale
    }

    /// The index and mask tables are cached per (pattern, heads, length, bucket, device):
    /// repeated calls, alternating devices and lengths, keep matching the masked reference
    /// (a table served to the wrong device or length would fail or differ).
    #[test]
    fn cached_slot_tables_serve_repeated_calls_on_every_device() {
        let spec = builtin_patterns().remove(0);
        for round in 0..2 {
            for (name, device) in devices() {
                for n in [23usize, 40] {
                    let layout = spec.build(n.div_ceil(4), 4, true, 1);
                    device.seed(round);
                    let r = || {
                        Tensor::<4>::random([1, 2, n, 8], Distribution::Normal(0.0, 1.0), &device)
                    };
                    let (q, k, v) = (r(), r(), r());
                    let got = to_vec(block_sparse_attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        &layout,
                        None,
                    ));
                    let want = to_vec(masked_dense_attention(q, k, v, &layout));
                    let diff = max_rel_diff(&got, &want);
                    assert!(diff < 1e-5, "{name} round {round} n={n}: {diff}");
                }
            }
        }
    }

    #[test]
    fn kernel_matches_masked_dense_attention_with_gradients() {
        let (batch, heads, d_head) = (2, 4, 8);
        let mut split = 0; // layouts whose long rows got a bucket of their own
        for (name, device) in devices() {
            let ad = device.clone().autodiff();
            for spec in builtin_patterns() {
                for causal in [true, false] {
                    // 37 tokens in blocks of 5 (a ragged last block) and token level.
                    for (n, block) in [(37usize, 5usize), (13, 1)] {
                        ad.seed(11);
                        let layout = spec.build(n.div_ceil(block), block, causal, 1);
                        split += usize::from(layout.buckets().len() == 2);
                        let rand = || {
                            Tensor::<4>::random(
                                [batch, heads, n, d_head],
                                Distribution::Normal(0.0, 1.0),
                                &ad,
                            )
                            .require_grad()
                        };
                        let (q, k, v) = (rand(), rand(), rand());
                        let w = Tensor::<4>::random(
                            [batch, heads, n, d_head],
                            Distribution::Normal(0.0, 1.0),
                            &ad,
                        );
                        let run = |sparse: bool| {
                            let y = if sparse {
                                block_sparse_attention(
                                    q.clone(),
                                    k.clone(),
                                    v.clone(),
                                    &layout,
                                    None,
                                )
                            } else {
                                masked_dense_attention(q.clone(), k.clone(), v.clone(), &layout)
                            };
                            let grads = (y.clone() * w.clone()).sum().backward();
                            let g = |t: &Tensor<4>| to_vec(t.grad(&grads).unwrap());
                            (to_vec(y), g(&q), g(&k), g(&v))
                        };
                        let (got, want) = (run(true), run(false));
                        if !matches!(spec, PatternSpec::Dense {}) {
                            // The pattern must matter: unmasked attention gives other outputs.
                            let all =
                                PatternSpec::Dense {}.build(n.div_ceil(block), block, causal, 1);
                            let full = to_vec(masked_dense_attention(
                                q.clone(),
                                k.clone(),
                                v.clone(),
                                &all,
                            ));
                            assert!(
                                max_rel_diff(&full, &want.0) > 1e-3,
                                "{} is dense",
                                spec.name()
                            );
                        }
                        let what =
                            format!("{name} {} causal={causal} n={n} b={block}", spec.name());
                        for (part, g, e) in [
                            ("output", &got.0, &want.0),
                            ("dq", &got.1, &want.1),
                            ("dk", &got.2, &want.2),
                            ("dv", &got.3, &want.3),
                        ] {
                            let d = max_rel_diff(g, e);
                            assert!(d <= 1e-5, "{what}: {part} differs by {d:e} (relative)");
                        }
                    }
                }
            }
        }
        assert!(split >= 4, "only {split} two-bucket layouts were tested");
    }

    /// The mixer's fused path (the tiled operation over the pattern's key blocks) against its
    /// composed path (gathered blocks): outputs and the gradients of the input and both
    /// projections, for every built-in pattern, causal and bidirectional, 30 tokens in blocks
    /// of 4 (a ragged last block).
    #[test]
    fn fused_path_equals_composed_path_in_values_and_gradients() {
        let device = burn::tensor::Device::flex().autodiff();
        for spec in builtin_patterns() {
            for causal in [true, false] {
                device.seed(3);
                let cfg = SparseAttentionConfig {
                    n_heads: 4,
                    causal,
                    block: 4,
                    pattern: vec![spec.clone()],
                };
                let fused = cfg.init(&ctx(16, 1), &device);
                let mut composed = fused.clone();
                composed.attention.fused = false;
                let r =
                    || Tensor::<3>::random([2, 30, 16], Distribution::Normal(0.0, 1.0), &device);
                let (x, w) = (r().require_grad(), r());
                let run = |attn: &SparseAttention| {
                    let y = attn.forward(x.clone());
                    let grads = (y.clone() * w.clone()).sum().backward();
                    let a = &attn.attention;
                    [
                        to_vec(y),
                        to_vec(x.grad(&grads).unwrap()),
                        to_vec(a.qkv.weight.val().grad(&grads).unwrap()),
                        to_vec(a.proj.weight.val().grad(&grads).unwrap()),
                    ]
                };
                let (got, want) = (run(&fused), run(&composed));
                for ((part, g), e) in ["output", "dx", "d qkv", "d proj"]
                    .iter()
                    .zip(&got)
                    .zip(&want)
                {
                    let d = max_rel_diff(g, e);
                    let what = format!("{} causal={causal}", spec.name());
                    assert!(d <= 2e-5, "{what}: {part} differs by {d:e} (relative)");
                }
            }
        }
    }

    #[test]
    fn dense_pattern_equals_the_dense_mixer() {
        for (name, device) in devices() {
            for causal in [true, false] {
                device.seed(2);
                let cfg = SparseAttentionConfig {
                    n_heads: 4,
                    causal,
                    block: 4,
                    pattern: vec![PatternSpec::Dense {}],
                };
                let sparse = cfg.init(&ctx(16, 0), &device);
                let dense = cfg.dense().init(&ctx(16, 0), &device);
                let sparse = SparseAttention {
                    attention: dense.clone(),
                    ..sparse
                };
                let x = Tensor::<3>::random([2, 30, 16], Distribution::Normal(0.0, 1.0), &device);
                let d = max_rel_diff(
                    &to_vec(sparse.forward(x.clone())),
                    &to_vec(dense.forward(x)),
                );
                assert!(d <= 1e-5, "{name} causal={causal}: {d:e}");
            }
        }
    }

    #[test]
    fn causal_patterns_are_causal() {
        let device = burn::tensor::Device::flex();
        for spec in builtin_patterns() {
            device.seed(8);
            let cfg = SparseAttentionConfig {
                n_heads: 4,
                causal: true,
                block: 3,
                pattern: vec![spec.clone()],
            };
            cfg.validate(&ctx(16, 1)).unwrap();
            let attn = cfg.init(&ctx(16, 1), &device);
            let n = 20;
            let x = Tensor::<3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device);
            let base = to_vec(attn.forward(x.clone()));
            for t in [0, 7, 14, 18] {
                let bump = Tensor::<3>::ones([1, 1, 16], &device);
                let y = x.clone().slice_assign(
                    [0..1, t + 1..t + 2, 0..16],
                    x.clone().slice([0..1, t + 1..t + 2, 0..16]) + bump,
                );
                let out = to_vec(attn.forward(y));
                let upto = (t + 1) * 16;
                assert_eq!(
                    &out[..upto],
                    &base[..upto],
                    "{}: token {} saw the future",
                    spec.name(),
                    t
                );
                assert_ne!(
                    &out[upto..],
                    &base[upto..],
                    "{}: no effect at all",
                    spec.name()
                );
            }
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut cfg = SparseAttentionConfig::default();
        let err = cfg.validate(&ctx(16, 0)).unwrap_err().to_string();
        assert!(err.contains("model.mixer.pattern"), "{err}");
        cfg.pattern = vec![PatternSpec::Heads {
            of: vec![PatternSpec::Dense {}; 3],
        }];
        let err = cfg.validate(&ctx(16, 0)).unwrap_err().to_string();
        assert!(
            err.contains("mixer.pattern[0].of") && err.contains("n_heads = 4"),
            "{err}"
        );
        cfg.pattern = vec![PatternSpec::Window { width: 0 }];
        let err = cfg.validate(&ctx(16, 0)).unwrap_err().to_string();
        assert!(err.contains("mixer.pattern[0].width"), "{err}");
        cfg.pattern = vec![PatternSpec::Window { width: 1 }];
        cfg.block = 0;
        assert!(
            cfg.validate(&ctx(16, 0))
                .unwrap_err()
                .to_string()
                .contains("mixer.block")
        );
    }
}
