//! Data parallelism with Burn's own machinery, as burn-train's `MultiDevice` strategy does it:
//! each device gets a copy of the model (`Module::fork`, once per optimiser step), runs forward
//! and backward on its shard of each micro-batch in its own thread, and the gradients are moved to the main device
//! (`GradientsParams::to_device`) and summed there (`GradientsAccumulator`). The optimizer
//! steps once, on the main device, with the summed gradients: one copy of the model and of
//! AdamW's moments, so global-norm clipping, checkpoints and resume are the single-device code.
//!
//! Every shard's loss is divided by the whole optimiser step's loss weight, so the sum of the
//! shards' gradients is the gradient of the single-device loss: the update is the same as on
//! one device up to floating-point summation order. With one device this is the plain
//! single-device step (no thread, no copy).
//!
//! Randomness: Burn keeps one random generator per backend, not per device, so replicas on two
//! GPUs of the same backend draw their dropout masks from one generator in thread order. With
//! `dropout > 0` such a run is not bit-reproducible (the trainer warns); devices of different
//! backends (the CPU test's flex + ndarray) and `dropout = 0` are.

use anyhow::{Result, anyhow};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use mixlab_data::{Batch, shard_rows};
use mixlab_models::{Lm, LmCache};

use crate::source::to_tensors;

/// What one micro-batch adds to the loss beyond the weighted cross-entropy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    /// Add the model's regularisation penalty (adaptive span) divided by this (the number of
    /// micro-batches), once, on the main device.
    pub penalty_divisor: Option<f64>,
    /// Fault injection for the tests: make the loss NaN.
    pub poison: bool,
}

/// The model on every device of `devices` (autodiff devices, the first being `model`'s):
/// `model` itself on the first, a fork (`Module::fork`) on each other one. Once per optimiser
/// step, shared by its micro-batches.
pub fn fork_replicas(model: &Lm, devices: &[Device]) -> Vec<Lm> {
    std::iter::once(model.clone())
        .chain(devices[1..].iter().map(|d| model.clone().fork(d)))
        .collect()
}

/// What one shard's forward and backward gives back.
type ShardOutcome = (GradientsParams, Tensor<1>, Option<LmCache>);

/// Forward and backward of `batch` split across `devices`, each shard on its replica
/// ([`fork_replicas`]), gradients summed into `accumulator` on the main device. Every shard's
/// loss is divided by `weight` (the loss weight of the whole optimiser step). A model with a
/// cache continues `cache` (one row per batch row, on the main device; each shard takes its
/// rows to its device). Returns the shards' summed loss (without the penalty) as a `[1]`
/// tensor on the main device, not read back (the step reads it once, with the gradient norm:
/// [`crate::optim::read_scalars`]), and the cache for the next batch of the same streams.
pub fn accumulate_micro_batch(
    replicas: &[Lm],
    batch: &Batch,
    cache: Option<&LmCache>,
    devices: &[Device],
    weight: f64,
    extras: Extras,
    accumulator: &mut GradientsAccumulator<Lm>,
) -> Result<(Tensor<1>, Option<LmCache>)> {
    let model = &replicas[0];
    let ranges = shard_rows(batch.batch, devices.len());
    if ranges.len() == 1 {
        let (grads, loss, next) = shard_step(model, batch, cache, &devices[0], weight, extras)?;
        accumulator.accumulate(model, grads);
        return Ok((loss, next));
    }
    let results: Vec<Result<ShardOutcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .into_iter()
            .zip(replicas.iter().cloned().zip(devices.iter().cloned()))
            .enumerate()
            .map(|(i, (rows, (replica, device)))| {
                let extras = if i == 0 { extras } else { Extras::default() };
                let shard = batch.rows(rows.start, rows.end);
                let cache = cache.map(|c| c.rows(rows).to_device(&device));
                scope.spawn(move || {
                    shard_step(&replica, &shard, cache.as_ref(), &device, weight, extras)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.join().unwrap_or_else(|payload| {
                    let why = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(anyhow!("device {i} ({:?}) failed: {why}", devices[i]))
                })
            })
            .collect()
    });
    let mut loss: Option<Tensor<1>> = None;
    let mut caches = vec![];
    for result in results {
        let (grads, shard_loss, next) = result?;
        caches.extend(next);
        accumulator.accumulate(model, grads.to_device(&devices[0], model));
        loss = Some(match loss {
            Some(sum) => {
                let device = sum.device();
                sum + shard_loss.to_device(&device)
            }
            None => shard_loss,
        });
    }
    let next = (!caches.is_empty()).then(|| LmCache::cat(caches, &devices[0]));
    Ok((loss.expect("at least one shard"), next))
}

/// One device's forward and backward (continuing `cache`, if the model has one).
fn shard_step(
    model: &Lm,
    shard: &Batch,
    cache: Option<&LmCache>,
    device: &Device,
    weight: f64,
    extras: Extras,
) -> Result<ShardOutcome> {
    let (inputs, targets, weights) = to_tensors(shard, device);
    let (h, next) = model.hidden(inputs, cache);
    let mut loss = model.nll_sum(h, targets, weights).div_scalar(weight);
    if extras.poison {
        loss = loss.mul_scalar(f64::NAN);
    }
    let value = loss.clone().inner(); // the loss without the autodiff graph; not read here
    if let Some(divisor) = extras.penalty_divisor
        && let Some(penalty) = model.regularization()
    {
        loss = loss + penalty.div_scalar(divisor);
    }
    Ok((
        GradientsParams::from_grads(loss.backward(), model),
        value,
        next,
    ))
}
