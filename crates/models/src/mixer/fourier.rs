//! FNet Fourier mixing (Lee-Thorp et al. 2021): the attention sublayer replaced by a
//! parameter-free 2-D DFT, keeping the real part, `y = Re(FFT_seq(FFT_hidden(x)))`.
//!
//! Differs from dense attention: no parameters, no heads, O(n log n) in the sequence, and it is
//! **bidirectional** — every output position mixes every input position, so it only fits an
//! autoregressive objective in its causal variant. It ignores padding, as the reference
//! implementation does: padded positions take part in the transform, so in a batch of
//! variable-length sequences every output depends on how much padding its row has.
//!
//! Two implementations of the same function:
//! - `fft`: O(s d log(s d)). On flex, one fused backend operation (`ops/fourier.rs`): rustfft
//!   real FFTs along hidden, complex FFTs along the sequence, the other half of the hidden
//!   spectrum from Hermitian symmetry, and a backward that is the same transform (the map is
//!   self-adjoint); any lengths. On the CubeCL backends (GPUs), composed from
//!   `burn::signal::rfft`/`cfft` (with their backward), powers of two only. ndarray has no FFTs.
//!   `auto` uses it on flex always and on GPUs for power-of-two lengths (see
//!   [`FourierMixer::uses_fft`]);
//! - `dft`: the DFT-matrix identity `Re(F_s X F_h) = C_s X C_h − S_s X S_h` with the cosine and
//!   sine matrices `C[j, k] = cos(2π jk / n)`, `S[j, k] = sin(2π jk / n)`; any length, every
//!   backend (the paper's TPU path). Cost O(s² d + s d²).
//!
//! Causal variant (our extension for autoregressive LM): `y = Re((M ∘ F_s) X F_h)` with `M` the
//! lower-triangular mask (diagonal included), i.e. `(M∘C_s) X C_h − (M∘S_s) X S_h`: position
//! `t` mixes positions `<= t` only, each with its full-sequence DFT coefficient. It has no FFT
//! form (the masked matrix is not a DFT), so it always uses the DFT path: O(s² d + s d²).
//!
//! The trigonometric matrices are built in f64 (angles reduced modulo `n` before scaling, so
//! long sequences stay exact) and applied in f32 — also in a half-precision model: the input is
//! cast to f32 for the transform and the result back (a length-n DFT sums n terms, which f16
//! cannot hold at n in the thousands).

use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::context::MixerContext;
use crate::error::ModelError;
use crate::ops::kernel::Memo;

/// Which implementation computes the transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FourierImpl {
    /// FFT where it applies (power-of-two lengths, a backend with FFT ops), else DFT matrices.
    Auto,
    /// FFTs wherever the backend has them (a config error if a length is not a power of two,
    /// which the GPU FFTs need); ndarray, which has none, uses the DFT matrices.
    Fft,
    /// Always DFT matrices.
    Dft,
}

/// Settings of [`FourierMixer`] under `[model.mixer]` with `kind = "fourier"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FourierMixerConfig {
    /// `auto`, `fft` or `dft`.
    pub implementation: FourierImpl,
    /// The causal variant (lower-triangular mask on the sequence DFT).
    pub causal: bool,
}

impl Default for FourierMixerConfig {
    fn default() -> Self {
        Self {
            implementation: FourierImpl::Auto,
            causal: false,
        }
    }
}

impl FourierMixerConfig {
    pub(crate) fn validate(&self, ctx: &MixerContext) -> Result<(), ModelError> {
        if ctx.relative_positions {
            return Err(ModelError::invalid(
                "position",
                "\"relative\"",
                "Fourier mixing has no relative-position term; use \"learned\" or \"none\"",
            ));
        }
        if ctx.rope_theta.is_some() {
            return Err(ModelError::invalid(
                "position",
                "\"rope\"",
                "RoPE rotates attention queries and keys; Fourier mixing has none: use \"learned\"",
            ));
        }
        if self.implementation == FourierImpl::Fft {
            if self.causal {
                return Err(ModelError::invalid(
                    "mixer.implementation",
                    "\"fft\"",
                    "the causal variant has no FFT form; use \"dft\" or \"auto\"",
                ));
            }
            for (what, n) in [("d_model", ctx.d_model), ("seq_len", ctx.max_seq_len)] {
                if !n.is_power_of_two() {
                    return Err(ModelError::invalid(
                        "mixer.implementation",
                        "\"fft\"",
                        format!(
                            "the FFT path needs power-of-two lengths but {what} = {n}; use \"auto\" or \"dft\""
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn init(&self, _ctx: &MixerContext) -> FourierMixer {
        FourierMixer {
            allow_fft: self.implementation != FourierImpl::Dft,
            force_fft: self.implementation == FourierImpl::Fft,
            causal: self.causal,
        }
    }
}

/// Parameter-free Fourier token mixing.
#[derive(Module, Debug)]
pub struct FourierMixer {
    /// The FFT path may be used (`implementation` is `auto` or `fft`).
    pub allow_fft: bool,
    /// The FFT path must be used (`implementation = "fft"`).
    pub force_fft: bool,
    /// The causal variant.
    pub causal: bool,
}

impl FourierMixer {
    /// # Shapes
    /// - `x`: `[batch, seq, d_model]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, seq, d_model] = x.dims();
        match self.path(seq, d_model, &x.device()) {
            FourierPath::Fft => fft_mix(x),
            FourierPath::SeqFft => seq_fft_mix(x),
            FourierPath::Dft => dft_mix(x, self.causal),
        }
    }

    /// How `[.., seq, d_model]` inputs are transformed on `device`.
    ///
    /// `auto` takes the FFTs on flex at every length (the fused rustfft kernel plans any
    /// length, and beat the DFT matrices in whole training steps at batch 16 already at seq
    /// 256: 4,271 vs 3,688 tokens/s, and at 512: 4,617 vs 3,867, `bench train`). On CubeCL
    /// devices (GPUs) burn-signal's FFTs need powers of two: both lengths → FFTs; only `seq`
    /// (the `base` preset's d_model 768) → an FFT along the sequence and the DFT matrices along
    /// the hidden width; otherwise the DFT matrices. The causal variant has no FFT form.
    pub fn path(&self, seq: usize, d_model: usize, device: &Device) -> FourierPath {
        // `fft` where the backend has none (ndarray) falls back to the DFT matrices.
        if self.causal || !(self.allow_fft || self.force_fft) {
            return FourierPath::Dft;
        }
        match fft_backend(device) {
            Some(FftBackend::Flex) => FourierPath::Fft,
            Some(FftBackend::Cube) if seq.is_power_of_two() && d_model.is_power_of_two() => {
                FourierPath::Fft
            }
            Some(FftBackend::Cube) if seq.is_power_of_two() => FourierPath::SeqFft,
            _ => FourierPath::Dft,
        }
    }

    /// Whether `[.., seq, d_model]` inputs on `device` take an FFT (along both axes or along
    /// the sequence only), see [`FourierMixer::path`].
    pub fn uses_fft(&self, seq: usize, d_model: usize, device: &Device) -> bool {
        self.path(seq, d_model, device) != FourierPath::Dft
    }
}

/// The computation [`FourierMixer::forward`] picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FourierPath {
    /// FFTs along both axes ([`fft_mix`]).
    Fft,
    /// An FFT along the sequence, DFT matrices along the hidden width ([`seq_fft_mix`]).
    SeqFft,
    /// DFT matrices along both axes ([`dft_mix`]).
    Dft,
}

enum FftBackend {
    Flex,
    Cube,
}

/// burn-signal's FFT ops exist on flex and the CubeCL backends (wgpu, cuda, ...), not ndarray.
fn fft_backend(device: &Device) -> Option<FftBackend> {
    if crate::ops::device::on_flex(device) {
        Some(FftBackend::Flex)
    } else if crate::ops::device::on_cube(device) {
        Some(FftBackend::Cube)
    } else {
        None
    }
}

/// `Re(FFT_seq(FFT_hidden(x)))` by FFTs, computed in f32 whatever the model's precision. On
/// flex it is one fused operation whose backward is the same transform
/// ([`FourierOps`](crate::ops::fourier::FourierOps)); elsewhere it is composed from
/// `burn::signal` ops ([`fft_mix_composed`]).
///
/// # Shapes
/// - `x`: `[batch, seq, d_model]`; any lengths on flex, powers of two elsewhere
/// - output: `[batch, seq, d_model]`
pub fn fft_mix(x: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let y = match fft_backend(&x.device()) {
        Some(FftBackend::Flex) => Tensor::from_dispatch(
            <burn::backend::Dispatch as crate::ops::fourier::FourierOps>::fourier_mix(
                x.into_dispatch(),
            ),
        ),
        _ => fft_mix_composed(x),
    };
    y.cast(dtype)
}

/// [`fft_mix`] composed from differentiable `burn::signal` ops, for any backend with FFTs (f32
/// input), with half the transform work of two complex FFTs: `x` is real, so a real FFT along hidden gives the `d/2 + 1` non-redundant
/// columns, a complex FFT along the sequence turns them into the 2-D spectrum `X[k_s, k_h]`
/// for `k_h <= d/2`, and Hermitian symmetry gives the rest of the real part:
/// `Re X[k_s, k_h] = Re X[(n - k_s) mod n, d - k_h]` for `k_h > d/2` (reverse the sequence
/// index modulo `n`, mirror the hidden one).
///
/// # Shapes
/// - `x`: `[batch, seq, d_model]`, both lengths powers of two
/// - output: `[batch, seq, d_model]`
pub fn fft_mix_composed(x: Tensor<3>) -> Tensor<3> {
    let [_, seq, d_model] = x.dims();
    let device = x.device();
    let (re, im) = burn::signal::rfft(x, 2, None); // [batch, seq, d/2 + 1]
    let (half, _) = burn::signal::cfft(re, im, 1, None); // real part of X[:, k_h <= d/2]
    let half_d = d_model / 2;
    if half_d < 2 {
        return half; // d_model <= 2: the half spectrum is the whole one.
    }
    // k_s -> (n - k_s) mod n: [0, n-1, n-2, ..., 1].
    let reversed: Vec<i64> = (0..seq as i64)
        .map(|k| (seq as i64 - k) % seq as i64)
        .collect();
    let reversed = Tensor::<1, Int>::from_data(TensorData::new(reversed, [seq]), &device);
    let upper = half
        .clone()
        .narrow(2, 1, half_d - 1) // k_h' = 1 ..= d/2 - 1
        .select(1, reversed)
        .flip([2]); // k_h = d - k_h' = d/2 + 1 ..= d - 1
    Tensor::cat(vec![half, upper], 2)
}

/// `Re(F_s X F_h)` with the hidden transform as DFT matrices and the sequence transform as
/// one complex FFT: `X F_h = X C_h − i X S_h`, then `Re(F_s (X F_h))`. For backends whose FFT
/// needs powers of two when only `seq` is one; composed from differentiable ops (the DFT
/// matrices cached, [`cached_dft_matrices`]).
///
/// # Shapes
/// - `x`: `[batch, seq, d_model]`, `seq` a power of two
/// - output: `[batch, seq, d_model]`
pub fn seq_fft_mix(x: Tensor<3>) -> Tensor<3> {
    let [_, _, d_model] = x.dims();
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let (c_h, s_h) = cached_dft_matrices(d_model, false, &x.device());
    let re = crate::ops::linear::matmul_rows(x.clone(), c_h); // Re(X F_h)
    let im = crate::ops::linear::matmul_rows(x, s_h).neg(); // Im(X F_h)
    let (y, _) = burn::signal::cfft(re, im, 1, None);
    y.cast(dtype)
}

/// `[n, n]` cosine and sine DFT matrices, `cos(2π jk / n)` and `sin(2π jk / n)`, optionally with
/// the upper triangle (k > j) zeroed.
pub fn dft_matrices(n: usize, lower_triangular: bool, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut cos = Vec::with_capacity(n * n);
    let mut sin = Vec::with_capacity(n * n);
    for j in 0..n {
        for k in 0..n {
            if lower_triangular && k > j {
                cos.push(0.0f32);
                sin.push(0.0f32);
            } else {
                // Reduce jk modulo n first: exact integer arithmetic, then one rounding.
                let angle = 2.0 * std::f64::consts::PI * ((j * k) % n) as f64 / n as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, n]), (device, DType::F32)),
        Tensor::from_data(TensorData::new(sin, [n, n]), (device, DType::F32)),
    )
}

/// [`dft_matrices`] built once per (length, causality, device) and kept: building them is
/// `n²` sin/cos pairs in f64 on the CPU and an upload, which every forward paid before (≈ 1.6 M
/// pairs per layer at d 768, seq 1024). The most recent [`DFT_CACHE_ENTRIES`] are kept (a run
/// uses two or three: hidden width, training and evaluation lengths).
pub fn cached_dft_matrices(
    n: usize,
    lower_triangular: bool,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    static CACHE: Memo<(usize, bool, Device), (Tensor<2>, Tensor<2>)> =
        Memo::new(DFT_CACHE_ENTRIES);
    CACHE.get_or_build((n, lower_triangular, device.clone()), || {
        dft_matrices(n, lower_triangular, device)
    })
}

/// How many (length, causality, device) DFT matrix pairs [`cached_dft_matrices`] keeps.
pub const DFT_CACHE_ENTRIES: usize = 8;

/// `Re(F_s X F_h) = C_s X C_h − S_s X S_h` (with `M ∘` on the sequence matrices when causal).
///
/// # Shapes
/// - `x`: `[batch, seq, d_model]`, any lengths
/// - output: `[batch, seq, d_model]`
pub fn dft_mix(x: Tensor<3>, causal: bool) -> Tensor<3> {
    let [_, seq, d_model] = x.dims();
    let device = x.device();
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let (c_h, s_h) = cached_dft_matrices(d_model, false, &device);
    let (c_s, s_s) = cached_dft_matrices(seq, causal, &device);
    let a = x.clone().matmul(c_h.unsqueeze::<3>()); // [batch, seq, d_model]
    let b = x.matmul(s_h.unsqueeze::<3>());
    (c_s.unsqueeze::<3>().matmul(a) - s_s.unsqueeze::<3>().matmul(b)).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{devices, to_vec};
    use burn::tensor::Distribution;

    /// Direct O(s² d²) DFT in f64: Re Σ_{j,k} x[j,k] e^{-2πi (tj/s + uk/d)}, masked to j <= t when
    /// causal.
    fn direct(x: &[f32], seq: usize, d: usize, causal: bool) -> Vec<f64> {
        let mut y = vec![0.0f64; seq * d];
        for t in 0..seq {
            for u in 0..d {
                let mut acc = 0.0;
                for j in 0..seq {
                    if causal && j > t {
                        continue;
                    }
                    for k in 0..d {
                        let phase = 2.0
                            * std::f64::consts::PI
                            * (((t * j) % seq) as f64 / seq as f64
                                + ((u * k) % d) as f64 / d as f64);
                        acc += f64::from(x[j * d + k]) * phase.cos();
                    }
                }
                y[t * d + u] = acc;
            }
        }
        y
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-4 * scale,
                "{what} [{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn dft_path_equals_a_direct_dft_for_any_length() {
        for (name, device) in devices() {
            for (seq, d) in [(12, 24), (100, 24), (128, 64), (16, 8)] {
                for causal in [false, true] {
                    device.seed(1);
                    let x =
                        Tensor::<3>::random([2, seq, d], Distribution::Normal(0.0, 1.0), &device);
                    let xs = to_vec(x.clone());
                    let got = to_vec(dft_mix(x, causal));
                    for b in 0..2 {
                        let want = direct(&xs[b * seq * d..(b + 1) * seq * d], seq, d, causal);
                        close(
                            &got[b * seq * d..(b + 1) * seq * d],
                            &want,
                            &format!("{name} {seq}x{d} causal={causal}"),
                        );
                    }
                }
            }
        }
    }

    /// The flex kernel takes any lengths (rustfft plans mixed radices): odd, even, prime and 1.
    #[test]
    fn flex_kernel_equals_a_direct_dft_for_any_length() {
        for (seq, d) in [
            (12, 24),
            (100, 24),
            (7, 5),
            (3, 1),
            (1, 6),
            (1, 1),
            (2, 3),
            (64, 2),
        ] {
            let batch = 2;
            let x: Vec<f32> = (0..batch * seq * d)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 3.0)
                .collect();
            let got = crate::ops::fourier::transform(&x, batch, seq, d);
            for b in 0..batch {
                let range = b * seq * d..(b + 1) * seq * d;
                let want = direct(&x[range.clone()], seq, d, false);
                close(&got[range], &want, &format!("kernel {seq}x{d}"));
            }
        }
    }

    /// The kernel's bits do not depend on the thread count (fixed pieces).
    #[test]
    fn flex_kernel_is_bit_identical_across_thread_counts() {
        let (batch, seq, d) = (2, 96, 40);
        let x: Vec<f32> = (0..batch * seq * d)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 3.0)
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| crate::ops::fourier::transform(&x, batch, seq, d))
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert!(run(1) == run(3), "results differ between 1 and 3 threads");
    }

    /// On flex, [`fft_mix`] is the fused operation with its own backward (the transform of the
    /// output gradient); [`fft_mix_composed`] is built from `burn::signal` ops as on GPUs. Both
    /// must equal the DFT-matrix path in values and in gradients, with and without autodiff,
    /// including the degenerate lengths 1 and 2 where a half spectrum is the whole one.
    #[test]
    fn fft_paths_equal_dft_path_values_and_gradients_on_flex() {
        let device = Device::flex().autodiff();
        assert!(fft_backend(&device).is_some());
        #[allow(deprecated)]
        let ndarray = Device::ndarray();
        assert!(fft_backend(&ndarray).is_none());
        let shapes = [
            (16, 8),
            (64, 32),
            (256, 64),
            (32, 128),
            (8, 2),
            (4, 4),
            (1, 4),
            (4, 1),
            (2, 2),
            (1, 1),
        ];
        for (seq, d) in shapes {
            device.seed(2);
            let x = Tensor::<3>::random([3, seq, d], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let w = Tensor::<3>::random([3, seq, d], Distribution::Normal(0.0, 1.0), &device);
            let y_dft = dft_mix(x.clone(), false);
            let want = to_vec(y_dft.clone());
            let g_dft = (y_dft * w.clone()).sum().backward();
            let g_want = to_vec(x.grad(&g_dft).unwrap());
            let assert_close = |got: &[f32], want: &[f32], what: &str| {
                let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for (i, (p, q)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * scale,
                        "{seq}x{d} {what} [{i}]: {p} vs dft {q}"
                    );
                }
            };
            let fused_inner = to_vec(fft_mix(x.clone().inner()));
            assert_close(&fused_inner, &want, "fused, no autodiff");
            let mut paths = vec![("fused", fft_mix as fn(Tensor<3>) -> Tensor<3>)];
            // burn-signal's rfft backward cannot take a length-1 axis (irfft infers length 0).
            if seq > 1 && d > 1 {
                paths.push(("composed", fft_mix_composed));
            }
            for (what, f) in paths {
                let y = f(x.clone());
                assert_close(&to_vec(y.clone()), &want, what);
                let g = (y * w.clone()).sum().backward();
                assert_close(
                    &to_vec(x.grad(&g).unwrap()),
                    &g_want,
                    &format!("{what} grad"),
                );
            }
        }
    }

    /// Finite differences of `L = Σ w ∘ y` on the DFT path. The map is linear, so central
    /// differences have no truncation error and a large step keeps f32 rounding small.
    #[test]
    fn dft_path_gradient_matches_finite_differences() {
        for (name, device) in devices() {
            let ad = device.clone().autodiff();
            for causal in [false, true] {
                ad.seed(3);
                let (seq, d) = (6, 5);
                let x = Tensor::<3>::random([1, seq, d], Distribution::Normal(0.0, 1.0), &ad)
                    .require_grad();
                let w = Tensor::<3>::random([1, seq, d], Distribution::Normal(0.0, 1.0), &ad);
                let grads = (dft_mix(x.clone(), causal) * w.clone()).sum().backward();
                let analytic = to_vec(x.grad(&grads).unwrap());
                let loss = |xv: Vec<f32>| {
                    let xt = Tensor::<3>::from_data(TensorData::new(xv, [1, seq, d]), &device);
                    f64::from(
                        (dft_mix(xt, causal) * w.clone().inner())
                            .sum()
                            .into_scalar::<f32>(),
                    )
                };
                let base = to_vec(x.clone().inner());
                let h = 0.5f32;
                for i in 0..seq * d {
                    let mut plus = base.clone();
                    plus[i] += h;
                    let mut minus = base.clone();
                    minus[i] -= h;
                    let fd = (loss(plus) - loss(minus)) / (2.0 * f64::from(h));
                    assert!(
                        (fd - f64::from(analytic[i])).abs() < 2e-3 * (1.0 + fd.abs()),
                        "{name} causal={causal} [{i}]: fd {fd} vs {}",
                        analytic[i]
                    );
                }
            }
        }
    }

    #[test]
    fn causal_variant_is_causal_and_keeps_the_bidirectional_terms() {
        for (name, device) in devices() {
            device.seed(4);
            let (seq, d) = (10, 6);
            let x = Tensor::<3>::random([1, seq, d], Distribution::Normal(0.0, 1.0), &device);
            let xs = to_vec(x.clone());
            let y = to_vec(dft_mix(x, true));
            for t in 0..seq {
                // Outputs <= t do not change when tokens > t do...
                let mut changed = xs.clone();
                for v in changed.iter_mut().skip((t + 1) * d) {
                    *v += 3.0;
                }
                let yc = to_vec(dft_mix(
                    Tensor::from_data(TensorData::new(changed, [1, seq, d]), &device),
                    true,
                ));
                assert_eq!(y[..(t + 1) * d], yc[..(t + 1) * d], "{name}: t={t}");
                // ...and row t equals the bidirectional transform of x with rows > t zeroed.
                let mut truncated = xs.clone();
                for v in truncated.iter_mut().skip((t + 1) * d) {
                    *v = 0.0;
                }
                let yb = to_vec(dft_mix(
                    Tensor::from_data(TensorData::new(truncated, [1, seq, d]), &device),
                    false,
                ));
                for u in 0..d {
                    let (a, b) = (y[t * d + u], yb[t * d + u]);
                    assert!(
                        (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                        "{name}: row {t}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_small_fnet_overfits_one_masked_lm_batch() {
        use crate::loss::cross_entropy_sum;
        use crate::{LmConfig, MixerConfig};
        let device = Device::flex().autodiff();
        device.seed(5);
        let cfg = LmConfig {
            vocab_size: Some(12), // 11 symbols + [MASK] = 11
            d_model: 32,
            n_layers: 2,
            d_ff: 64,
            seq_len: 16,
            mixer: MixerConfig::Fourier(FourierMixerConfig::default()),
            ..LmConfig::default()
        };
        let model = cfg.init(&device).unwrap();
        let (batch, seq) = (4, 16);
        let originals: Vec<i64> = (0..batch * seq)
            .map(|i| ((i * 7 + 3) % 11) as i64)
            .collect();
        // Mask every fourth position.
        let inputs: Vec<i64> = originals
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % 4 == 1 { 11 } else { t })
            .collect();
        let weights: Vec<f32> = (0..batch * seq)
            .map(|i| if i % 4 == 1 { 1.0 } else { 0.0 })
            .collect();
        let int = |v: Vec<i64>| {
            Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(v, [batch, seq]), &device)
        };
        let w = Tensor::<2>::from_data(TensorData::new(weights, [batch, seq]), &device);
        let losses = crate::test_util::overfit(model, |m| {
            cross_entropy_sum(
                m.forward(int(inputs.clone())),
                int(originals.clone()),
                Some(w.clone()),
            )
            .div_scalar(16.0)
        });
        assert!(
            losses[149] < 0.1 * losses[0],
            "masked loss {} -> {}",
            losses[0],
            losses[149]
        );
    }

    fn ctx() -> MixerContext {
        MixerContext {
            d_model: 32,
            n_layers: 1,
            dropout: 0.0,
            max_seq_len: 64,
            rope_theta: None,
            relative_positions: false,
            bias: true,
            layer: 0,
            fused_attention: true,
        }
    }

    /// The sequence-FFT path (what GPUs take at d_model 768) against the DFT matrices, values
    /// and input gradients, at a hidden width that is not a power of two.
    #[test]
    fn sequence_fft_path_equals_dft_path_values_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(8);
        let x = Tensor::<3>::random([2, 16, 12], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let w = Tensor::<3>::random([2, 16, 12], Distribution::Normal(0.0, 1.0), &device);
        let run = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| {
            let y = f(x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            (to_vec(y), to_vec(x.grad(&grads).unwrap()))
        };
        let (y, dx) = run(&seq_fft_mix);
        let (want_y, want_dx) = run(&|x| dft_mix(x, false));
        for (what, got, want) in [("y", y, want_y), ("dx", dx, want_dx)] {
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{what}: {a} vs {b}");
            }
        }
    }

    /// The cache gives what `dft_matrices` builds, per (length, causality, device), including
    /// after evicting older entries.
    #[test]
    fn cached_dft_matrices_equal_fresh_ones() {
        let flex = Device::flex();
        let autodiff = flex.clone().autodiff();
        for round in 0..2 {
            for n in 1..=DFT_CACHE_ENTRIES / 2 + 1 {
                for (causal, device) in [(false, &flex), (true, &autodiff)] {
                    let (c, s) = cached_dft_matrices(n, causal, device);
                    let (want_c, want_s) = dft_matrices(n, causal, device);
                    assert_eq!(
                        to_vec(c),
                        to_vec(want_c),
                        "round {round} n={n} causal={causal}"
                    );
                    assert_eq!(
                        to_vec(s),
                        to_vec(want_s),
                        "round {round} n={n} causal={causal}"
                    );
                }
            }
        }
    }

    #[test]
    fn auto_picks_fft_only_where_it_applies() {
        let flex = Device::flex();
        #[allow(deprecated)]
        let ndarray = Device::ndarray();
        let auto = FourierMixerConfig::default();
        let m = auto.init(&ctx());
        assert!(m.uses_fft(1024, 32, &flex));
        assert!(m.uses_fft(2048, 32, &flex.clone().autodiff()));
        assert!(
            m.uses_fft(128, 32, &flex),
            "the fused kernel wins at every length on flex"
        );
        assert!(m.uses_fft(100, 24, &flex), "rustfft plans any length");
        assert!(!m.uses_fft(1024, 32, &ndarray), "ndarray has no FFT ops");
        let causal = FourierMixerConfig {
            causal: true,
            ..auto
        }
        .init(&ctx());
        assert!(!causal.uses_fft(1024, 32, &flex));
    }

    /// A half-precision model keeps the transform in f32: an f16 input gives an f16 output that
    /// matches the f32 transform to f16 rounding, though a length-512 DFT sums 512 terms whose
    /// partial sums f16 could not hold exactly (transformers#13853).
    #[test]
    fn half_precision_inputs_are_transformed_in_f32() {
        let device = Device::flex();
        let (seq, d) = (512, 64);
        device.seed(4);
        let x = Tensor::<3>::random([1, seq, d], Distribution::Normal(0.0, 1.0), &device);
        let want = to_vec(dft_mix(x.clone(), false));
        let half = x.cast(FloatDType::F16);
        for (name, y) in [
            ("dft", dft_mix(half.clone(), false)),
            ("fft", fft_mix(half)),
        ] {
            assert_eq!(y.dtype(), DType::F16, "{name}");
            let got = to_vec(y);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            // f16 keeps 11 bits: the input's and the output's rounding, nothing accumulated.
            assert!(err <= 4e-3 * scale, "{name}: {err} of {scale}");
        }
    }
}
