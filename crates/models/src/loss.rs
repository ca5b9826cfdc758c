//! Language-modelling losses, kept apart from the modules that produce logits.

use burn::tensor::{FloatDType, Int, Tensor, activation};

/// Per-token negative log-likelihood in nats, computed in f32 whatever the model's precision
/// (a half-precision log-softmax over a large vocabulary loses the small probabilities).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `targets`: `[batch, seq]` token ids in `0..vocab`
/// - output: `[batch, seq]`
pub fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    if crate::ops::device::on_flex(&logits.device()) {
        // One pass per row forward and backward (`ops/loss.rs`).
        return crate::ops::loss::fused_token_nll(logits, targets);
    }
    token_nll_composed(logits, targets)
}

/// [`token_nll`] composed from Burn's `log_softmax` and `gather` (every backend; the reference
/// the fused flex operation is tested against).
pub fn token_nll_composed(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, seq, _] = logits.dims();
    let log_probs = activation::log_softmax(logits.cast(FloatDType::F32), 2);
    log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2)) // [batch, seq, 1]
        .reshape([batch, seq])
        .neg()
}

/// Sum of the per-token cross-entropies (nats), each multiplied by its weight when `weights` is
/// given (0 leaves a position out, as the copy task does for its first half).
///
/// Divide by the total weight (or token count) for the mean: the caller knows it without a
/// device round trip, and gradient accumulation needs the sum over micro-batches anyway.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `targets`: `[batch, seq]`
/// - `weights`: `[batch, seq]`
/// - output: `[1]`
pub fn cross_entropy_sum(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    weights: Option<Tensor<2>>,
) -> Tensor<1> {
    let nll = token_nll(logits, targets);
    match weights {
        Some(w) => (nll * w.cast(FloatDType::F32)).sum(),
        None => nll.sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{devices, to_vec};
    use burn::tensor::{Distribution, TensorData};

    /// The fused flex operation against the composed `log_softmax` + `gather`: per-token
    /// values and the logits' gradient under weights (some zero), rows in several chunks and a
    /// partial one, a vocabulary that is not a multiple of the SIMD width, large logits; the
    /// same bits on 1 and 3 threads.
    #[test]
    fn fused_cross_entropy_equals_the_composed_one_in_values_and_gradients() {
        use crate::test_util::same_bits_on_1_and_3_threads;
        let device = burn::tensor::Device::flex().autodiff();
        for (b, s, v) in [(3usize, 50usize, 65usize), (1, 1, 7), (2, 40, 256)] {
            device.seed(v as u64);
            let logits = Tensor::<3>::random([b, s, v], Distribution::Normal(0.0, 8.0), &device)
                .require_grad();
            let ids: Vec<i64> = (0..b * s).map(|i| ((i * 37 + 5) % v) as i64).collect();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
            let w: Vec<f32> = (0..b * s).map(|i| (i % 3) as f32 * 0.5).collect();
            let weights = Tensor::<2>::from_data(TensorData::new(w, [b, s]), &device);
            let run = |f: fn(Tensor<3>, Tensor<2, Int>) -> Tensor<2>| {
                let nll = f(logits.clone(), targets.clone());
                let grads = (nll.clone() * weights.clone()).sum().backward();
                [to_vec(nll), to_vec(logits.grad(&grads).unwrap())]
            };
            let fused = run(token_nll);
            let composed = run(token_nll_composed);
            for (what, (a, c)) in ["nll", "d logits"].iter().zip(fused.iter().zip(&composed)) {
                assert_eq!(a.len(), c.len());
                for (x, y) in a.iter().zip(c) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{b}x{s}x{v} {what}: {x} vs {y}"
                    );
                }
            }
            assert!(
                same_bits_on_1_and_3_threads(|| run(token_nll)),
                "{b}x{s}x{v}"
            );
        }
    }

    #[test]
    fn cross_entropy_matches_log_sum_exp_reference() {
        for (name, device) in devices() {
            device.seed(2);
            let (b, s, v) = (2, 3, 5);
            let logits = Tensor::<3>::random([b, s, v], Distribution::Normal(0.0, 2.0), &device);
            let ids: Vec<i64> = vec![0, 4, 2, 1, 3, 3];
            let w: Vec<f32> = vec![1.0, 0.0, 1.0, 0.5, 1.0, 0.0];
            let targets =
                Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [b, s]), &device);
            let weights = Tensor::<2>::from_data(TensorData::new(w.clone(), [b, s]), &device);
            let l = to_vec(logits.clone());
            let mut expected = 0.0f64;
            let mut unweighted = 0.0f64;
            for p in 0..b * s {
                let row = &l[p * v..(p + 1) * v];
                let lse = row.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
                let nll = lse - f64::from(row[ids[p] as usize]);
                expected += f64::from(w[p]) * nll;
                unweighted += nll;
            }
            let got = f64::from(
                cross_entropy_sum(logits.clone(), targets.clone(), Some(weights))
                    .into_scalar::<f32>(),
            );
            assert!((got - expected).abs() < 1e-4, "{name}: {got} vs {expected}");
            let got = f64::from(cross_entropy_sum(logits, targets, None).into_scalar::<f32>());
            assert!(
                (got - unweighted).abs() < 1e-4,
                "{name}: {got} vs {unweighted}"
            );
        }
    }
}
