//! The optimiser: AdamW with decoupled weight decay applied to matrices only, global-norm
//! gradient clipping, and a linear-warmup + cosine-decay learning rate.
//!
//! Burn's built-in `GradientClippingConfig::Norm` clips each parameter tensor on its own; we
//! implement the usual global-norm clipping (PyTorch's `clip_grad_norm_`, nanoGPT): one L2 norm
//! over all gradients, and all of them scaled by `min(1, max_norm / norm)`.

use std::f64::consts::PI;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

use crate::config::OptimConfig;

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

/// Global L2 norm of all gradients of `model`'s parameters.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
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
    v.total
        .map_or(0.0, |t| f64::from(t.into_scalar::<f32>()).sqrt())
}

/// Multiply every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: GradientsParams, factor: f64) -> GradientsParams {
    struct Scale {
        grads: GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut v = Scale { grads, factor };
    model.visit(&mut v);
    v.grads
}

/// Clip the global gradient norm to `max_norm` (0 = off). Returns the clipped gradients and the
/// norm before clipping.
pub fn clip_global_norm<M: Module>(
    model: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let norm = global_grad_norm(model, &grads);
    if max_norm > 0.0 && norm > max_norm {
        (scale_grads(model, grads, max_norm / (norm + 1e-6)), norm)
    } else {
        (grads, norm)
    }
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
