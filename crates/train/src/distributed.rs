//! Data parallel across processes ([`World`]): every rank holds the whole model and AdamW's
//! state, trains on its share of every global micro-batch (on its own devices, as
//! [`crate::parallel`] does within a process), and the ranks meet once per optimiser step in
//! one all-reduce of the flattened gradients, the loss sum and the stop flag. Clipping, the
//! finite check and AdamW then run on every rank with the same summed values, so the replicas
//! stay equal; a weight hash compared every logged step stops the run if they ever drift.
//!
//! Every rank's loss is divided by the loss weight of the whole global step, so the sum over
//! ranks is the single-process gradient: the update equals the one-process run up to the
//! floating-point order of the sums.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use mixlab_models::Lm;
use sha2::{Digest, Sha256};

use crate::world::World;

/// One optimiser step's sums over the ranks.
pub struct Reduced {
    /// The gradients summed over ranks, on the main device (a parameter no rank has a
    /// gradient for stays without one, as in one process).
    pub grads: GradientsParams,
    /// The loss summed over ranks.
    pub loss: f64,
    /// Whether any rank was asked to stop (Ctrl-C, SIGTERM).
    pub stop: bool,
    /// Bytes each rank sent to the all-reduce.
    pub bytes: usize,
    /// Seconds the sum took, copies to and from the device included.
    pub seconds: f64,
}

/// Sum `grads`, `loss` (a `[1]` tensor) and the `stop` flag over the ranks: one device-to-host
/// copy, one all-reduce (chunked), one upload. Layout of the buffer:
/// `[every parameter's gradient in module order | loss | one presence count per parameter | stop]`;
/// a rank without a gradient for a parameter sends zeros and presence 0.
pub fn all_reduce_step(
    world: &World,
    model: &Lm,
    grads: GradientsParams,
    loss: Tensor<1>,
    stop: bool,
    device: &Device,
) -> Reduced {
    let started = Instant::now();
    let mut flat = Flatten {
        grads,
        device: device.clone(),
        parts: vec![],
        present: vec![],
        dtypes: vec![],
    };
    model.visit(&mut flat);
    let n: usize = flat.parts.iter().map(|t| t.dims()[0]).sum();
    flat.parts.push(loss.cast(FloatDType::F32));
    let mut buf = Tensor::cat(flat.parts, 0)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    buf.extend(&flat.present);
    buf.push(if stop { 1.0 } else { 0.0 });

    world.all_reduce_sum(&mut buf);

    let (loss, stop) = (f64::from(buf[n]), buf[buf.len() - 1] > 0.0);
    let present: Vec<bool> = buf[n + 1..buf.len() - 1].iter().map(|&c| c > 0.0).collect();
    let bytes = buf.len() * 4;
    buf.truncate(n);
    let summed: Tensor<1> = Tensor::from_data(TensorData::new(buf, [n]), device);
    let mut back = Unflatten {
        summed,
        offset: 0,
        index: 0,
        present,
        dtypes: flat.dtypes,
        grads: GradientsParams::new(),
    };
    model.visit(&mut back);
    Reduced {
        grads: back.grads,
        loss,
        stop,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Each parameter's gradient as a flat f32 tensor (zeros where this rank has none).
struct Flatten {
    grads: GradientsParams,
    device: Device,
    parts: Vec<Tensor<1>>,
    present: Vec<f32>,
    dtypes: Vec<burn::tensor::DType>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        match self.grads.remove::<D>(param.id) {
            Some(g) => {
                self.dtypes.push(g.dtype());
                self.parts.push(g.cast(FloatDType::F32).reshape([n]));
                self.present.push(1.0);
            }
            None => {
                self.dtypes.push(param.val().dtype());
                self.parts.push(Tensor::zeros([n], &self.device));
                self.present.push(0.0);
            }
        }
    }
}

/// The summed buffer cut back into gradients, in the same module order.
struct Unflatten {
    summed: Tensor<1>,
    offset: usize,
    index: usize,
    present: Vec<bool>,
    dtypes: Vec<burn::tensor::DType>,
    grads: GradientsParams,
}

impl ModuleVisitor for Unflatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        if self.present[self.index] {
            let g = self
                .summed
                .clone()
                .narrow(0, self.offset, n)
                .reshape::<D, _>(shape)
                .cast(self.dtypes[self.index]);
            self.grads.register(param.id, g);
        }
        self.offset += n;
        self.index += 1;
    }
}

/// Rank 0's parameters on every rank (after initialising or loading): the replicas start equal
/// whatever each rank's backend drew.
pub fn broadcast_parameters(world: &World, model: Lm) -> Lm {
    if !world.is_distributed() {
        return model;
    }
    let mut values = crate::export::parameter_values(&model);
    world.broadcast_from_root(&mut values);
    load_parameter_values(model, &values)
}

/// `model` with its float parameters set from `values` (f32, module order, as
/// [`crate::export::parameter_values`] gives them), each in its own dtype, device and
/// gradient requirement.
pub fn load_parameter_values(model: Lm, values: &[f32]) -> Lm {
    struct Load<'a> {
        values: &'a [f32],
        offset: usize,
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let n = param.val().shape().num_elements();
            let slice = self.values[self.offset..self.offset + n].to_vec();
            self.offset += n;
            param.map(|t| {
                let (shape, device, dtype) = (t.shape(), t.device(), t.dtype());
                let grad = t.is_require_grad();
                let v = Tensor::<D>::from_data(TensorData::new(slice, shape), &device).cast(dtype);
                if grad { v.require_grad() } else { v }
            })
        }
    }
    let mut load = Load { values, offset: 0 };
    let model = model.map(&mut load);
    assert_eq!(load.offset, values.len(), "every value loaded");
    model
}

/// A 64-bit digest of every parameter's f32 bits, in module order.
pub fn parameter_hash(model: &Lm) -> u64 {
    let mut hasher = Sha256::new();
    for v in crate::export::parameter_values(model) {
        hasher.update(v.to_bits().to_le_bytes());
    }
    u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("8 bytes"))
}

/// Stop with an error naming the ranks whose weights differ from rank 0's.
pub fn check_replicas(world: &World, model: &Lm, step: usize) -> Result<()> {
    if !world.is_distributed() {
        return Ok(());
    }
    let hashes = world.all_gather(parameter_hash(model));
    let drifted: Vec<String> = hashes
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != hashes[0])
        .map(|(r, h)| format!("rank {r} ({h:016x})"))
        .collect();
    if !drifted.is_empty() {
        bail!(
            "the replicas drifted apart at step {step}: the weights of {} differ from rank 0's \
             ({:016x}). Every rank must run the same build on the same kind of device; resume \
             from the last checkpoint with --resume",
            drifted.join(", "),
            hashes[0]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn model(device: &Device, seed: u64) -> Lm {
        let config: mixlab_models::LmConfig = toml::from_str(
            "d_model = 16\nn_layers = 1\nd_ff = 32\nseq_len = 8\nvocab_size = 11\n\
             [mixer]\nkind = \"dense\"\nn_heads = 2\n",
        )
        .unwrap();
        device.seed(seed);
        config.init(device).unwrap()
    }

    /// Alone, the all-reduce gives back the very gradients (bits), the loss and the stop flag;
    /// a parameter without a gradient stays without one.
    #[test]
    fn one_rank_round_trip_keeps_every_gradient_bit() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        let lm = model(&ad, 3);
        let inputs = Tensor::<2, burn::tensor::Int>::from_data([[1, 2, 3, 4, 5, 6, 7, 8]], &ad);
        let loss = lm.forward(inputs).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &lm);
        let before = grads_in_order(&lm, &grads);
        // Drop one gradient: it must stay absent.
        let mut grads = grads;
        let first = first_param_id(&lm);
        let removed: Option<Tensor<2>> = grads.remove(first);
        assert!(removed.is_some(), "the first parameter is a matrix");
        let r = all_reduce_step(
            &World::alone(),
            &lm,
            grads,
            Tensor::from_data([2.5f32], &device),
            true,
            &device,
        );
        assert_eq!((r.loss, r.stop), (2.5, true));
        assert!(r.grads.get::<2>(first).is_none());
        let after = grads_in_order(&lm, &r.grads);
        assert_eq!(after.len() + 1, before.len());
        for ((ia, a), (ib, b)) in after.iter().zip(before.iter().skip(1)) {
            assert_eq!(ia, ib);
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "gradient of parameter {ia} changed"
            );
        }
        assert_eq!(
            r.bytes,
            4 * (after.iter().map(|g| g.1.len()).sum::<usize>()
                + removed.unwrap().shape().num_elements()
                + 1
                + before.len()
                + 1)
        );
    }

    /// Two models from different seeds: different hashes; the same model: equal ones; a broadcast
    /// alone changes nothing.
    #[test]
    fn parameter_hash_tells_replicas_apart() {
        let device = Device::flex();
        let (a, b) = (model(&device, 1), model(&device, 2));
        assert_ne!(parameter_hash(&a), parameter_hash(&b));
        assert_eq!(parameter_hash(&a), parameter_hash(&a.clone()));
        let h = parameter_hash(&a);
        assert_eq!(
            parameter_hash(&broadcast_parameters(&World::alone(), a.clone())),
            h
        );
        // What a rank does with rank 0's values: the same model, bit for bit, and another
        // model's values make it that model.
        let values = crate::export::parameter_values(&a);
        assert_eq!(
            parameter_hash(&load_parameter_values(a.clone(), &values)),
            h
        );
        assert_eq!(
            parameter_hash(&load_parameter_values(b.clone(), &values)),
            h
        );
        assert!(check_replicas(&World::alone(), &b, 1).is_ok());
    }

    fn first_param_id(lm: &Lm) -> burn::module::ParamId {
        struct First(Option<burn::module::ParamId>);
        impl ModuleVisitor for First {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.get_or_insert(param.id);
            }
        }
        let mut f = First(None);
        lm.visit(&mut f);
        f.0.unwrap()
    }

    fn grads_in_order(lm: &Lm, grads: &GradientsParams) -> Vec<(usize, Vec<f32>)> {
        struct Collect<'a>(&'a GradientsParams, usize, Vec<(usize, Vec<f32>)>);
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.0.get::<D>(param.id) {
                    let v = g
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap();
                    self.2.push((self.1, v));
                }
                self.1 += 1;
            }
        }
        let mut c = Collect(grads, 0, vec![]);
        lm.visit(&mut c);
        c.2
    }
}
