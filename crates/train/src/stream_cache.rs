//! The cache a model with `[model.cache]` carries through training: each rank holds the rows
//! of its own streams (its shard of every global batch), a checkpoint holds every row
//! (gathered to rank 0), and a resume gives each rank its rows back, whatever the world size.
//!
//! On disk, `cache.bin` beside the model: the values as little-endian f32,
//! `[layers, rows, span, d_model]` row-major; the manifest records the shape and each row's
//! valid count ([`CacheMeta`]). f32 holds f16 and bf16 values exactly, so resume is bit-exact
//! at every precision.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};
use mixlab_models::{Lm, LmCache};
use serde::{Deserialize, Serialize};

use crate::world::World;

/// The cache's file in a checkpoint.
pub const FILE: &str = "cache.bin";

/// The shape of a checkpoint's cache and each row's valid positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// Rows (streams of the global batch, `train.batch_size`).
    pub rows: usize,
    /// Layers (one cache per block).
    pub layers: usize,
    /// Positions per row (`model.cache.span`).
    pub span: usize,
    /// Width of each position.
    pub d_model: usize,
    /// Per row, how many of its last positions are real inputs.
    pub valid: Vec<usize>,
}

/// Every row of the cache on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCache {
    /// Shape and valid counts.
    pub meta: CacheMeta,
    /// `[layers, rows, span, d_model]` values.
    pub values: Vec<f32>,
}

impl HostCache {
    /// The whole cache of a run whose ranks each hold `cache` for their `rows` of `total`:
    /// every rank calls this (one all-reduce when distributed; the other ranks' rows are
    /// zeros in each rank's buffer, so the sum is a gather).
    pub fn gather(world: &World, cache: &LmCache, rows: Range<usize>, total: usize) -> Self {
        let layers = cache.layers.len();
        let [n, span, d_model] = cache.layers[0].dims();
        assert_eq!(n, rows.len(), "the cache holds this rank's rows");
        let mut values = vec![0f32; layers * total * span * d_model];
        for (l, layer) in cache.layers.iter().enumerate() {
            let local = layer
                .clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 values");
            let at = (l * total + rows.start) * span * d_model;
            values[at..at + local.len()].copy_from_slice(&local);
        }
        let mut valid = vec![0f32; total];
        for (slot, &v) in valid[rows].iter_mut().zip(&cache.valid) {
            *slot = v as f32;
        }
        world.all_reduce_sum(&mut values);
        world.all_reduce_sum(&mut valid);
        Self {
            meta: CacheMeta {
                rows: total,
                layers,
                span,
                d_model,
                valid: valid.iter().map(|&v| v as usize).collect(),
            },
            values,
        }
    }

    /// Rows `rows` as `model`'s cache on its device (dtype as the model's own fresh cache).
    pub fn to_cache(
        &self,
        model: &Lm,
        rows: Range<usize>,
        device: &burn::tensor::Device,
    ) -> LmCache {
        let m = &self.meta;
        let fresh = model
            .new_cache(rows.len(), device)
            .expect("a model with a cache");
        let per_row = m.span * m.d_model;
        let layers = fresh
            .layers
            .iter()
            .enumerate()
            .map(|(l, like)| {
                let at = (l * m.rows + rows.start) * per_row;
                let values = self.values[at..at + rows.len() * per_row].to_vec();
                Tensor::<3>::from_data(
                    TensorData::new(values, [rows.len(), m.span, m.d_model]),
                    device,
                )
                .cast(like.dtype())
            })
            .collect();
        LmCache {
            layers,
            valid: m.valid[rows].to_vec(),
        }
    }

    /// The bytes of `cache.bin`.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Read `cache.bin` of the checkpoint in `dir`, of the shape `meta` says.
    pub fn read(dir: &Path, meta: &CacheMeta) -> Result<Self> {
        let path = dir.join(FILE);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let expected = meta.layers * meta.rows * meta.span * meta.d_model * 4;
        if bytes.len() != expected || meta.valid.len() != meta.rows {
            bail!(
                "{} holds {} bytes but its manifest describes {expected} ({} layers x {} rows x \
                 {} positions x {} floats)",
                path.display(),
                bytes.len(),
                meta.layers,
                meta.rows,
                meta.span,
                meta.d_model
            );
        }
        Ok(Self {
            meta: meta.clone(),
            values: bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};
    use mixlab_models::{CacheConfig, CacheStart, LmConfig, Position};

    fn values(t: &Tensor<3>) -> Vec<u32> {
        t.to_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// A cache survives gather -> bytes -> read -> this rank's rows bit for bit, and rows
    /// taken apart and rejoined are the cache again.
    #[test]
    fn a_cache_round_trips_through_its_file_bit_for_bit() {
        let device = Device::flex();
        let model = LmConfig {
            d_model: 8,
            n_layers: 3,
            seq_len: 4,
            vocab_size: Some(11),
            position: Position::None,
            cache: Some(CacheConfig {
                span: 5,
                include_self: false,
                start: CacheStart::Masked,
            }),
            ..LmConfig::default()
        }
        .init(&device)
        .unwrap();
        let mut cache = model.new_cache(5, &device).unwrap();
        for layer in &mut cache.layers {
            *layer = Tensor::random([5, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        }
        cache.valid = vec![0, 1, 2, 3, 5];
        let world = World::alone();
        let host = HostCache::gather(&world, &cache, 0..5, 5);
        assert_eq!(host.meta.valid, cache.valid);
        let dir = std::env::temp_dir().join(format!("mixlab-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), host.to_bytes()).unwrap();
        let read = HostCache::read(&dir, &host.meta).unwrap();
        assert_eq!(read, host);
        let part = read.to_cache(&model, 1..4, &device);
        assert_eq!(part.valid, vec![1, 2, 3]);
        for (got, all) in part.layers.iter().zip(&cache.layers) {
            assert_eq!(values(got), values(&all.clone().narrow(0, 1, 3)));
        }
        let rejoined = LmCache::cat(vec![cache.rows(0..2), cache.rows(2..5)], &device);
        assert_eq!(rejoined.valid, cache.valid);
        for (a, b) in rejoined.layers.iter().zip(&cache.layers) {
            assert_eq!(values(a), values(b));
        }
        // A file of the wrong size is refused naming it.
        std::fs::write(dir.join(FILE), &host.to_bytes()[4..]).unwrap();
        let err = HostCache::read(&dir, &host.meta).unwrap_err().to_string();
        assert!(err.contains("cache.bin"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
