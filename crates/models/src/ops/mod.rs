//! The fused operations: each a Burn backend extension with its own backward, its flex kernel
//! (and, for attention, CubeCL kernels), a small tensor-level function the modules call and the
//! composed tensor-op reference it is tested against. Nothing here imports a module of the
//! crate (`block`, `lm`, `mlp`, `mixer/`, ...): modules call ops, never the reverse.
//!
//! | op | tensor-level function | composed reference |
//! |---|---|---|
//! | [`attention`] | [`AttentionOps::attention`](attention::AttentionOps::attention) over a [`KeyLayout`](attention::KeyLayout) | the mixers' masked softmax (`masked_dense_attention`, ...) |
//! | [`norm`] | [`norm::layer_norm`] | Burn's `LayerNorm::forward` |
//! | [`gelu`] | [`gelu::linear_gelu`] | `linear` then `gelu_new` |
//! | [`loss`] | [`loss::fused_token_nll`] | `log_softmax` and a gather |
//! | [`fourier`] | [`FourierOps::fourier_mix`](fourier::FourierOps::fourier_mix) | the DFT-matrix and `rfft`/`cfft` paths |
//! | [`linear`] | [`linear::forward`], [`linear::matmul_rows`] | Burn's `Linear::forward` |
//!
//! [`kernel`] holds what the flex kernels share; [`dropout`] the host-side seed stream of the
//! hashed attention-dropout masks.

pub mod attention;
pub mod device;
pub mod dropout;
pub mod fourier;
pub mod gelu;
pub(crate) mod kernel;
pub mod linear;
pub mod loss;
pub mod norm;

pub use device::{on_cube, on_flex};
