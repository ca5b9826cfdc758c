//! Host side of a call: the block lists uploaded once per layout (a [`Memo`]), operands
//! checked and made contiguous ([`Call`]), and the helpers every launch uses.

use burn::tensor::{DType, Shape, TensorData};
use burn_backend::TensorMetadata;
use burn_backend::ops::IntTensorOps;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl::prelude::*;

use super::common::{Flags, threshold};
use crate::ops::attention::layout::{KeyLayout, SparseKeys, pe_columns};
use crate::ops::kernel::Memo;

/// Whether the Cube kernels cover a head width (at most 256: a unit keeps its output row in
/// registers).
pub(crate) fn supported(d_head: usize) -> bool {
    (1..=256).contains(&d_head)
}

/// Which keys the kernels walk, as two compressed lists over `(head group, block)`:
/// `fwd`: the key blocks each query block lists (ascending); `bwd`: the query blocks that list
/// each key block (ascending). `offsets[g · blocks + b] .. offsets[g · blocks + b + 1]` index
/// `items`.
pub(crate) struct BlockLists {
    pub(crate) fwd_offsets: Vec<u32>,
    pub(crate) fwd_items: Vec<u32>,
    pub(crate) bwd_offsets: Vec<u32>,
    pub(crate) bwd_items: Vec<u32>,
}

impl BlockLists {
    /// Dense keys as one block of `n` queries listing one block of `n` keys (causality is the
    /// kernels' own test).
    pub(crate) fn dense() -> Self {
        Self {
            fwd_offsets: vec![0, 1],
            fwd_items: vec![0],
            bwd_offsets: vec![0, 1],
            bwd_items: vec![0],
        }
    }

    pub(crate) fn new(keys: &SparseKeys) -> Self {
        let blocks = keys.runs[0].len();
        let (mut fwd_offsets, mut fwd_items) = (vec![0u32], vec![]);
        let mut listed_by: Vec<Vec<u32>> = vec![];
        for group in &keys.runs {
            let mut by_key = vec![vec![]; blocks];
            for (qb, runs) in group.iter().enumerate() {
                for &(first, count) in runs {
                    let last = (first + count).min(blocks);
                    for (kb, listed) in by_key.iter_mut().enumerate().take(last).skip(first) {
                        fwd_items.push(kb as u32);
                        listed.push(qb as u32);
                    }
                }
                fwd_offsets.push(fwd_items.len() as u32);
            }
            listed_by.extend(by_key);
        }
        let (mut bwd_offsets, mut bwd_items) = (vec![0u32], vec![]);
        for list in listed_by {
            bwd_items.extend(list);
            bwd_offsets.push(bwd_items.len() as u32);
        }
        Self {
            fwd_offsets,
            fwd_items,
            bwd_offsets,
            bwd_items,
        }
    }
}

/// An uninitialised f32 tensor of `shape` beside `like`.
pub(crate) fn empty_like(like: &CubeTensor, shape: Vec<usize>) -> CubeTensor {
    empty_like_dtype(like, shape, DType::F32)
}

/// An uninitialised tensor of `shape` and `dtype` beside `like`.
pub(crate) fn empty_like_dtype(like: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

/// The vector width the kernels read rows with: 4, 2 or 1, the largest dividing `d`.
pub(crate) fn line_of(d: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|line| d.is_multiple_of(*line))
        .expect("1 divides d")
}

/// One unit per row of `rows`, in cubes of 64, the cubes spread over the grid's dimensions
/// when they outnumber one dimension's limit (the kernels skip units past the last row).
pub(crate) fn launch_shape(like: &CubeTensor, rows: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(64);
    (
        cubecl::calculate_cube_count_elemwise(&like.client, rows, dim),
        dim,
    )
}

pub(crate) fn dims3(t: &CubeTensor) -> [usize; 3] {
    t.shape().dims::<3>()
}

/// A `u32` list on the device of `like`.
pub(crate) fn upload(like: &CubeTensor, values: Vec<u32>) -> CubeTensor {
    let len = values.len().max(1);
    let mut values = values;
    values.resize(len, 0);
    <CubeBackend as IntTensorOps<CubeBackend>>::int_from_data(
        TensorData::new(values, [len]),
        &like.device,
    )
}

/// The block lists of `keys` for `n` tokens on a device, and the kernels' scalars: block size,
/// heads per batch row, heads per group (dense: one block of `n`, one group).
#[derive(Clone)]
pub(crate) struct DeviceLists {
    /// Offsets and items of the key blocks each query block lists.
    pub(crate) fwd: [CubeTensor; 2],
    /// Offsets and items of the query blocks listing each key block.
    pub(crate) bwd: [CubeTensor; 2],
    pub(crate) block: u32,
    pub(crate) n_heads: u32,
    pub(crate) group_heads: u32,
}

/// Layouts whose uploaded lists are kept (a few per layer and length).
pub(crate) const LISTS_KEPT: usize = 64;

/// [`DeviceLists`] of `keys` for `n` tokens on `like`'s device, built and uploaded once per
/// (layout, length, device): a layer's forward and backward, and every step, share them.
pub(crate) fn device_lists(keys: &KeyLayout, n: usize, like: &CubeTensor) -> DeviceLists {
    static CACHE: Memo<(KeyLayout, usize, CubeDevice), DeviceLists> = Memo::new(LISTS_KEPT);
    let key = (keys.clone(), n, like.device.clone());
    CACHE.get_or_build(key, || {
        let (lists, block, n_heads, group_heads) = match &keys.sparse {
            None => (BlockLists::dense(), n.max(1) as u32, 1, 1),
            Some(s) => {
                let group_heads = (s.n_heads / s.runs.len()) as u32;
                (
                    BlockLists::new(s),
                    s.block as u32,
                    s.n_heads as u32,
                    group_heads,
                )
            }
        };
        DeviceLists {
            fwd: [
                upload(like, lists.fwd_offsets),
                upload(like, lists.fwd_items),
            ],
            bwd: [
                upload(like, lists.bwd_offsets),
                upload(like, lists.bwd_items),
            ],
            block,
            n_heads,
            group_heads,
        }
    })
}

/// All-attention's parts on the device, each `None` when absent.
#[derive(Default)]
pub(crate) struct Parts {
    /// Persistent keys and values, `[mem_heads, m, d]`.
    pub(crate) memory: Option<[CubeTensor; 2]>,
    /// Relative-position keys `[d, span]`.
    pub(crate) key_pe: Option<CubeTensor>,
    /// The adaptive span's `z` per span head, `[span_heads]`.
    pub(crate) span_z: Option<CubeTensor>,
}

/// One call's operands (contiguous; absent parts as one-element placeholders the kernels
/// never read), its switches and scalars.
pub(crate) struct Call {
    /// `q`, `k`, `v` in the model's precision `elem` (f32, f16 or bf16); everything else, and
    /// every sum the kernels take, in f32.
    pub(crate) q: CubeTensor,
    pub(crate) k: CubeTensor,
    pub(crate) v: CubeTensor,
    pub(crate) elem: DType,
    pub(crate) mk: CubeTensor,
    pub(crate) mv: CubeTensor,
    pub(crate) pe: CubeTensor,
    pub(crate) z: CubeTensor,
    pub(crate) flags: Flags,
    pub(crate) lists: DeviceLists,
    /// A cached layer's window as `u32`s: `[s, dmin, dmax, heads per batch row, then each batch
    /// row's first visible key]` (query `i` is key `s + i` and sees the keys from its row's
    /// first on at distances `dmin..=dmax`); a placeholder otherwise.
    pub(crate) win: CubeTensor,
    /// Flattened heads, queries, context keys, persistent slots, distances `key_pe` covers.
    pub(crate) heads: usize,
    pub(crate) n: usize,
    pub(crate) nk: usize,
    pub(crate) mem: usize,
    pub(crate) span: usize,
    pub(crate) seed: u32,
    pub(crate) threshold: u32,
    pub(crate) keep: f32,
    pub(crate) ramp: f32,
}

impl Call {
    /// Checks the shapes against each other and the layout (all-attention's parts need dense
    /// keys; relative positions causal ones and `span ≥ n`).
    pub(crate) fn new(
        [q, k, v]: [CubeTensor; 3],
        parts: Parts,
        keys: &KeyLayout,
        (ramp, p, seed): (f32, f32, u32),
    ) -> Self {
        let [q, k, v] = [q, k, v].map(into_contiguous);
        let [heads, n, d] = dims3(&q);
        let nk = dims3(&k)[1];
        assert!(
            dims3(&k) == [heads, nk, d] && dims3(&v) == [heads, nk, d],
            "tiled_attention on Cube: k and v must both be [{heads}, keys, {d}]"
        );
        assert!(
            supported(d),
            "tiled_attention on Cube: head width {d} is outside 1..=256"
        );
        let elem = q.dtype;
        assert!(
            [k.dtype, v.dtype] == [elem, elem]
                && matches!(elem, DType::F32 | DType::F16 | DType::BF16),
            "tiled_attention on Cube: q, k and v must share one float type of f32, f16 or bf16 \
             (got {elem:?}, {:?}, {:?})",
            k.dtype,
            v.dtype
        );
        let (min_distance, max_distance) = keys.check(n, nk, heads);
        let extras = parts.memory.is_some() || parts.key_pe.is_some() || parts.span_z.is_some();
        assert!(
            !extras || keys.sparse.is_none(),
            "tiled_attention on Cube: persistent memory, relative positions and the adaptive \
             span need dense keys"
        );
        let placeholder = || empty_like(&q, vec![1]);
        // Read as vectors: at least one whole vector.
        let row_placeholder = || empty_like(&q, vec![d]);
        let (mk, mv, mem) = match parts.memory {
            Some([mk, mv]) => {
                let [mem_heads, mem, mem_d] = dims3(&mk);
                assert!(
                    dims3(&mv) == [mem_heads, mem, mem_d] && mem_d == d && mem_heads > 0,
                    "tiled_attention on Cube: memory keys and values must be [mem_heads, m, {d}]"
                );
                (into_contiguous(mk), into_contiguous(mv), mem)
            }
            None => (row_placeholder(), row_placeholder(), 0),
        };
        let (pe, span) = match parts.key_pe {
            Some(pe) => {
                let [pe_d, span] = pe.shape().dims::<2>();
                let needed = pe_columns(nk, (min_distance, max_distance));
                assert!(
                    pe_d == d && span >= needed && keys.causal,
                    "tiled_attention on Cube: key_pe [{pe_d}, {span}] needs [{d}, ≥ {needed}] \
                     and causal keys"
                );
                (into_contiguous(pe), span)
            }
            None => (placeholder(), 0),
        };
        let span_on = parts.span_z.is_some();
        assert!(
            !span_on || ramp > 0.0,
            "tiled_attention on Cube: ramp {ramp}"
        );
        let z = parts.span_z.map_or_else(placeholder, into_contiguous);
        assert!(
            [&mk, &mv, &pe, &z].iter().all(|t| t.dtype == DType::F32),
            "tiled_attention on Cube: memory keys and values, key_pe and span_z must be f32"
        );
        let (lists, win) = match &keys.cached {
            // Dense lists over one block of all `s + n` keys; the window is the kernels' test.
            Some(c) => {
                let mut win = vec![
                    c.cache as u32,
                    c.min_distance as u32,
                    c.max_distance as u32,
                    c.n_heads as u32,
                ];
                win.extend(c.first.iter().map(|&f| f as u32));
                (
                    device_lists(&KeyLayout::dense(true), nk, &q),
                    upload(&q, win),
                )
            }
            None => (device_lists(keys, n, &q), upload(&q, vec![0])),
        };
        Self {
            flags: Flags {
                d,
                line: line_of(d),
                causal: keys.causal,
                dropout: p > 0.0,
                memory: mem > 0,
                relative: span > 0,
                span: span_on,
                cached: keys.cached.is_some(),
            },
            lists,
            win,
            heads,
            n,
            nk,
            mem,
            span,
            seed,
            threshold: threshold(p),
            keep: 1.0 / (1.0 - p),
            ramp,
            q,
            k,
            v,
            elem,
            mk,
            mv,
            pe,
            z,
        }
    }
}
