//! The optimiser: AdamW with decoupled weight decay applied to matrices only (or the
//! all-attention paper's Adagrad with per-parameter step clipping), global-norm gradient
//! clipping, and a linear-warmup + cosine-decay learning rate.
//!
//! Burn's built-in `GradientClippingConfig::Norm` clips each parameter tensor on its own; we
//! implement the usual global-norm clipping (PyTorch's `clip_grad_norm_`, nanoGPT): one L2 norm
//! over all gradients, and all of them scaled by `min(1, max_norm / norm)`.

use std::f64::consts::PI;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{
    AdamWConfig, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, RecordState, StateSink,
    StateSource,
};
use burn::tensor::{Device, Tensor};

use crate::config::{OptimConfig, OptimKind};

/// The optimiser `config.kind` names for `model`: [`adamw`] or [`ClippedAdagrad`].
pub fn optimizer<M: Module>(config: &OptimConfig, model: &M) -> ModuleOptimizer {
    match config.kind {
        OptimKind::AdamW => adamw(config, model),
        OptimKind::Adagrad => ModuleOptimizer::from(ClippedAdagrad {
            step_clip: config.step_clip,
        }),
    }
}

/// Adagrad as the all-attention paper's code runs it (Sukhbaatar et al. 2019,
/// `AdagradWithGradClip`): per parameter tensor, the accumulator adds the raw squared
/// gradient, `a += g²`, and the step is `lr · s · g / (√a + 1e-10)` with
/// `s = min(1, step_clip / (‖g‖₂ + 1e-10))` when `step_clip > 0` (else 1) — the clipping
/// scales the step, not the gradient the accumulator sees, which Burn's AdaGrad (gradient
/// clipping before the accumulator, ε 1e-5) cannot express. The scale stays on the device (no
/// read per parameter). No weight decay, no learning-rate decay (the paper's are 0).
#[derive(Clone, Debug)]
pub struct ClippedAdagrad {
    /// Per-parameter step clipping threshold; 0 = off.
    pub step_clip: f64,
}

/// [`ClippedAdagrad`]'s state of one parameter: the sum of its squared gradients.
#[derive(Clone)]
pub struct AdagradState<const D: usize> {
    sum: Tensor<D>,
}

impl<const D: usize> RecordState for AdagradState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "sum", self.sum.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let data = src.take_tensor(prefix, "sum")?;
        Some(Self {
            sum: Tensor::from_data(data, device),
        })
    }
}

impl Optimizer for ClippedAdagrad {
    type State<const D: usize> = AdagradState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let squared = grad.clone().square();
        let sum = match state {
            Some(state) => state.sum + squared,
            None => squared,
        };
        let mut step = grad.clone() / sum.clone().sqrt().add_scalar(1e-10);
        if self.step_clip > 0.0 {
            // min(1, clip / (‖g‖ + 1e-10)), one element broadcast over the tensor.
            let scale = grad
                .square()
                .sum()
                .sqrt()
                .add_scalar(1e-10)
                .recip()
                .mul_scalar(self.step_clip)
                .clamp_max(1.0)
                .reshape([1usize; D]);
            step = step * scale;
        }
        (tensor - step.mul_scalar(lr), Some(AdagradState { sum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdagradState {
            sum: state.sum.to_device(device),
        }
    }
}

/// AdamW for `model`: weight decay on every parameter of rank >= 2 that is not an embedding;
/// none on norms, biases, embeddings and position keys (nanoGPT / GPT-3 practice). With a tied head the
/// output projection is the token embedding, so it is not decayed either.
pub fn adamw<M: Module>(config: &OptimConfig, model: &M) -> ModuleOptimizer {
    let adamw = |weight_decay: f64| {
        AdamWConfig::new()
            .with_beta_1(config.beta1 as f32)
            .with_beta_2(config.beta2 as f32)
            .with_epsilon(config.eps as f32)
            .with_weight_decay(weight_decay as f32)
            .build()
    };
    let no_decay = no_decay_params(model);
    ModuleOptimizer::from(adamw(config.weight_decay)).with_group(
        ParamGroup::from_ids(no_decay),
        adamw(0.0),
        None,
    )
}

/// Ids of the parameters that get no weight decay.
pub fn no_decay_params<M: Module>(model: &M) -> Vec<ParamId> {
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        ids: Vec<ParamId>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Token / position embeddings, and position keys such as `key_pe`.
            let in_embedding = self
                .path
                .iter()
                .any(|p| p.contains("embedding") || p.ends_with("_pe"));
            if D < 2 || in_embedding {
                self.ids.push(param.id);
            }
        }
    }
    let mut c = Collect::default();
    model.visit(&mut c);
    c.ids
}

/// Global L2 norm of all gradients of `model`'s parameters, as a `[1]` f32 tensor on the
/// gradients' device (nothing is read back); `None` without gradients.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                // In f32: a half-precision sum of squares overflows at 65504.
                let s = g.cast(burn::tensor::FloatDType::F32).square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut v = SumSquares { grads, total: None };
    model.visit(&mut v);
    v.total.map(Tensor::sqrt)
}

/// Multiply every gradient by the `[1]` tensor `factor` (on the gradients' device).
pub fn scale_grads<M: Module>(
    model: &M,
    grads: GradientsParams,
    factor: &Tensor<1>,
) -> GradientsParams {
    struct Scale<'a> {
        grads: GradientsParams,
        factor: &'a Tensor<1>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                let factor = self.factor.clone().cast(g.dtype()).reshape([1; D]);
                self.grads.register(param.id, g * factor);
            }
        }
    }
    let mut v = Scale { grads, factor };
    model.visit(&mut v);
    v.grads
}

/// Clip the global gradient norm to `max_norm` (0 = off) without waiting for the device: the
/// factor `max_norm / (norm + 1e-6)` where `norm > max_norm`, else exactly 1 (gradients keep
/// their bits), is computed on the device and applied there. Returns the clipped gradients
/// and the norm before clipping as a `[1]` tensor, for the step's one read
/// ([`read_scalars`]); `None` without gradients.
pub fn clip_global_norm<M: Module>(
    model: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, Option<Tensor<1>>) {
    let Some(norm) = global_grad_norm(model, &grads) else {
        return (grads, None);
    };
    if max_norm <= 0.0 {
        return (grads, Some(norm));
    }
    let over = norm.clone().greater_elem(max_norm);
    let factor = norm.ones_like().mask_where(
        over,
        norm.clone().add_scalar(1e-6).recip().mul_scalar(max_norm),
    );
    (scale_grads(model, grads, &factor), Some(norm))
}

/// Values of several `[1]` tensors on one device in one device-to-host read (the step's loss
/// and gradient norm together, after everything they depend on is queued).
pub fn read_scalars(values: Vec<Tensor<1>>) -> Vec<f64> {
    if values.is_empty() {
        return vec![];
    }
    let values = Tensor::cat(
        values
            .into_iter()
            .map(|v| v.cast(burn::tensor::FloatDType::F32))
            .collect(),
        0,
    );
    values
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 values")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Learning rate at optimiser step `step` (0-based) of `total`: linear warmup from 0 to `lr`
/// over `warmup_steps`, then cosine decay to `min_lr` at `total`. A pure function of the step,
/// so the schedule's whole state is the step a checkpoint already stores.
pub fn learning_rate(config: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < config.warmup_steps {
        return config.lr * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(config.warmup_steps).max(1);
    let progress = ((step - config.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    config.min_lr + 0.5 * (1.0 + (PI * progress).cos()) * (config.lr - config.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's Adagrad against f64 loops over three steps: a tensor whose gradient norm
    /// passes `step_clip` (its step scaled by `clip / norm`, its accumulator unclipped) and
    /// one below it (plain Adagrad); then the state through its record and back gives the
    /// same fourth step.
    #[test]
    fn clipped_adagrad_equals_the_papers_update() {
        let device = Device::flex();
        let optim = ClippedAdagrad { step_clip: 0.5 };
        let lr = 0.07;
        for (name, size) in [("clipped", 1.0f64), ("unclipped", 0.01)] {
            let w0: Vec<f64> = (0..6).map(|i| 0.3 * i as f64 - 0.7).collect();
            let grads: Vec<Vec<f64>> = (0..4)
                .map(|t| {
                    (0..6)
                        .map(|i| size * ((i * 7 + t * 3) % 5) as f64 - size * 1.5)
                        .collect()
                })
                .collect();
            let to = |v: &[f64]| {
                Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(
                        v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                        [2, 3],
                    ),
                    &device,
                )
            };
            // The reference.
            let (mut w, mut sum) = (w0.clone(), vec![0.0f64; 6]);
            let mut want = vec![];
            for g in &grads {
                let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                let scale = if norm > 0.5 {
                    0.5 / (norm + 1e-10)
                } else {
                    1.0
                };
                for i in 0..6 {
                    sum[i] += g[i] * g[i];
                    w[i] -= lr * scale * g[i] / (sum[i].sqrt() + 1e-10);
                }
                want.push(w.clone());
            }
            let (mut t, mut state) = (to(&w0), None);
            for (step, g) in grads.iter().enumerate() {
                if step == 3 {
                    // Through the record, as a checkpoint stores it.
                    let mut sink = StateSink::default();
                    let s: &AdagradState<2> = state.as_ref().unwrap();
                    s.state_flatten("p", &mut sink);
                    let mut src = StateSource::default();
                    for (k, v) in sink.tensors {
                        src.insert_tensor(k, v);
                    }
                    state = AdagradState::state_unflatten("p", &mut src, &device);
                    assert!(state.is_some(), "{name}: the state did not come back");
                }
                let (next, s) = optim.step(lr, t, to(g), state);
                (t, state) = (next, s);
                let got: Vec<f32> = t.to_data().try_to_vec().unwrap();
                for (a, b) in got.iter().zip(&want[step]) {
                    assert!(
                        (f64::from(*a) - b).abs() < 1e-5,
                        "{name} step {step}: {got:?} vs {:?}",
                        want[step]
                    );
                }
            }
        }
    }

    /// Global-norm clipping on the device against an f64 reference: the norm of all gradients,
    /// every gradient scaled by `max_norm / (norm + 1e-6)` when the norm is over, and the very
    /// same bits when it is not; the loss and norm come back in one read.
    #[test]
    fn clipping_scales_by_the_global_norm_on_the_device() {
        use burn::nn::LinearConfig;
        use burn::tensor::{Distribution, Tensor};

        let device = burn::tensor::Device::flex().autodiff();
        device.seed(3);
        let layer = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::random([4, 3], Distribution::Normal(0.0, 1.0), &device);
        let grads = || {
            let loss = layer.forward(x.clone()).powi_scalar(2).sum();
            GradientsParams::from_grads(loss.backward(), &layer)
        };
        let flat = |g: &GradientsParams| {
            let mut v = g
                .get::<2>(layer.weight.id)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let bias = layer.bias.as_ref().unwrap();
            v.extend(
                g.get::<1>(bias.id)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
            );
            v
        };
        let raw = flat(&grads());
        let want = raw
            .iter()
            .map(|g| f64::from(*g).powi(2))
            .sum::<f64>()
            .sqrt();

        let (clipped, norm) = clip_global_norm(&layer, grads(), want / 2.0);
        let norm = read_scalars(vec![norm.unwrap()])[0];
        assert!((norm - want).abs() < 1e-5 * want, "norm {norm} vs {want}");
        let factor = (want / 2.0) / (want + 1e-6);
        for (got, g) in flat(&clipped).iter().zip(&raw) {
            let expected = f64::from(*g) * factor;
            assert!((f64::from(*got) - expected).abs() < 1e-5 * (1.0 + expected.abs()));
        }

        let (kept, _) = clip_global_norm(&layer, grads(), want * 2.0);
        assert_eq!(
            flat(&kept),
            raw,
            "under the limit the gradients keep their bits"
        );
        let (off, _) = clip_global_norm(&layer, grads(), 0.0);
        assert_eq!(flat(&off), raw, "max_norm 0 turns clipping off");

        let both = read_scalars(vec![
            Tensor::<1>::from_floats([1.5], &device),
            Tensor::<1>::from_floats([-2.0], &device),
        ]);
        assert_eq!(both, vec![1.5, -2.0]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            ..OptimConfig::default()
        };
        assert!((learning_rate(&c, 0, 100) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&c, 9, 100) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 100) - 1e-3).abs() < 1e-12);
        let mid = learning_rate(&c, 55, 100);
        assert!((mid - 5.5e-4).abs() < 1e-9, "{mid}");
        assert!((learning_rate(&c, 100, 100) - 1e-4).abs() < 1e-12);
        let mut last = f64::MAX;
        for s in 10..100 {
            let lr = learning_rate(&c, s, 100);
            assert!(lr <= last);
            last = lr;
        }
    }
}
