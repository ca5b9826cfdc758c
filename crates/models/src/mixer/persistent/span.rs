//! Adaptive span (Sukhbaatar et al. 2019): a learned per-head context length whose soft mask
//! multiplies the context weights before the joint renormalisation with the memory, and its
//! L1 penalty.

use burn::tensor::{Device, Int, Tensor};

use super::PersistentAttention;

impl PersistentAttention {
    /// Soft span mask on the context part, then joint renormalisation over context + memory.
    pub(super) fn apply_span(
        &self,
        weights: Tensor<4>,
        fraction: Tensor<1>,
        seq: usize,
    ) -> Tensor<4> {
        let [batch, n_heads, _, total] = weights.dims();
        let device = weights.device();
        let mask = span_mask(fraction, seq, self.span_ramp, &device); // [n_heads, seq, seq]
        let n_memory = total - seq;
        let mask = if n_memory > 0 {
            Tensor::cat(
                vec![mask, Tensor::ones([n_heads, seq, n_memory], &device)],
                2,
            )
        } else {
            mask
        };
        let masked = weights * mask.unsqueeze::<4>().expand([batch, n_heads, seq, total]);
        let norm = masked.clone().sum_dim(3).add_scalar(1e-8); // [batch, n_heads, seq, 1]
        masked / norm
    }

    /// The span penalty `span_loss · Σ_heads z` (z in tokens), to add to the training loss;
    /// `None` without adaptive span. It depends on parameters only, not on the batch.
    pub fn regularization(&self, seq_len: usize) -> Option<Tensor<1>> {
        self.span_fraction.as_ref().map(|f| {
            f.val()
                .clamp(0.0, 1.0)
                .sum()
                .mul_scalar(self.span_loss * seq_len as f64)
        })
    }

    /// The adaptive span `z = clamp(fraction, 0, 1) · basis` in tokens, `[n_heads]` (`basis`:
    /// the cache's span, or `seq_len` without a cache); `None` without adaptive span.
    pub fn span_tokens(&self, basis: usize) -> Option<Tensor<1>> {
        self.span_fraction
            .as_ref()
            .map(|f| f.val().clamp(0.0, 1.0).mul_scalar(basis as f64))
    }

    /// Current spans in tokens, one per head (adaptive span only).
    pub fn spans(&self, seq_len: usize) -> Option<Vec<f32>> {
        self.span_tokens(seq_len).map(|z| {
            z.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        })
    }
}

/// `m[h, i, j] = clamp((R + z_h - (i - j)) / R, 0, 1)` with `z_h = fraction_h · seq`.
///
/// # Shapes
/// - `fraction`: `[n_heads]`
/// - output: `[n_heads, seq, seq]`
pub fn span_mask(fraction: Tensor<1>, seq: usize, ramp: usize, device: &Device) -> Tensor<3> {
    let [n_heads] = fraction.dims();
    let i = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([seq, 1]);
    let j = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([1, seq]);
    let distance = (i.expand([seq, seq]) - j.expand([seq, seq]))
        .float()
        .unsqueeze::<3>()
        .expand([n_heads, seq, seq]);
    let z = fraction
        .clamp(0.0, 1.0)
        .mul_scalar(seq as f64)
        .reshape([n_heads, 1, 1])
        .expand([n_heads, seq, seq]);
    ((z - distance)
        .add_scalar(ramp as f64)
        .div_scalar(ramp as f64))
    .clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mixer::persistent::tests::{config, ctx};
    use crate::test_util::{devices, to_vec};
    use burn::tensor::Distribution;

    #[test]
    fn span_mask_ramps_down_over_r_tokens() {
        let device = burn::tensor::Device::flex();
        // z = 0.25 · 16 = 4 tokens, R = 4: full weight up to distance 4, zero from distance 8.
        let mask = to_vec(span_mask(
            Tensor::from_floats([0.25], &device),
            16,
            4,
            &device,
        ));
        let at = |i: usize, j: usize| mask[i * 16 + j];
        assert_eq!(at(10, 6), 1.0);
        assert_eq!(at(10, 4), 0.5);
        assert_eq!(at(10, 2), 0.0);
        assert_eq!(at(3, 3), 1.0);
    }

    #[test]
    fn adaptive_span_renormalises_jointly() {
        for (name, device) in devices() {
            let mut cfg = config(3);
            cfg.adaptive_span = true;
            cfg.span_ramp = 1;
            cfg.span_init = 0.25; // 2 of 8 tokens
            let layer = cfg.init(&ctx(8, false), &device);
            let q = Tensor::<4>::random([1, 2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
            let k = Tensor::<4>::random([1, 2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
            let w = to_vec(layer.weights(q, k, None));
            for row in 0..16 {
                let i = row % 8;
                let r = &w[row * 11..(row + 1) * 11];
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{name}");
                for (j, &x) in r[..8].iter().enumerate() {
                    if j + 3 <= i {
                        assert_eq!(
                            x,
                            0.0,
                            "{name}: distance {} is beyond span 2 + ramp 1",
                            i - j
                        );
                    }
                }
            }
            assert_eq!(layer.spans(8).unwrap(), vec![2.0, 2.0]);
        }
    }
}
