//! Mixlab's models: one pre-norm transformer [`Block`] with a pluggable token [`Mixer`], stacked
//! into a language model [`Lm`].
//!
//! Everything here is a backend-generic Burn 0.22 module: tensors carry no backend type, modules
//! take a `&Device`, and the caller decides which backend (and whether autodiff) by the device it
//! passes. This crate knows nothing of files, TOML, corpora or training loops.
//!
//! Shapes are documented as `[batch, seq, d_model]`; losses live in [`loss`], apart from the
//! modules that produce logits.
#![warn(missing_docs)]

pub mod adaptive;
pub mod block;
pub mod cache;
pub mod gelu_op;
pub mod head;
pub mod init;
pub mod linear;
pub mod lm;
pub mod loss;
pub mod loss_op;
pub mod mixer;
pub mod mlp;
pub mod norm_op;
pub mod pattern;

pub use block::{Block, BlockConfig, NormPlacement};
pub use cache::{CacheConfig, CacheStart, CacheView, LmCache, Window};
pub use head::HeadTransform;
pub use lm::{AttentionLayout, Lm, LmConfig, Position, attention_positions};
pub use mixer::{
    AttentionImpl, DenseAttention, DenseAttentionConfig, Mixer, MixerConfig, PersistentAttention,
    PersistentAttentionConfig, SparseAttention, SparseAttentionConfig, seed_dropout,
};
pub use mlp::{Activation, Mlp, MlpConfig};

/// The optimisation level (`opt-level`: `0`–`3`, `s`, `z`) this crate was compiled at, as
/// its build script saw it. The mixers and their fused kernels are where training spends its
/// time, so this is what decides whether a binary trains at full speed.
pub const BUILD_OPT_LEVEL: &str = env!("MIXLAB_MODELS_OPT_LEVEL");

/// The warning to print at start when the models were compiled without optimisation (some
/// profile a user picked): such a build trains about fifty times slower.
pub fn unoptimised_build_warning(opt_level: &str) -> Option<String> {
    (opt_level == "0").then(|| {
        "warning: this is an unoptimised build (mixlab-models at opt-level 0): it trains about \
         50x slower; add --release (cargo run --release --bin ...) or use the dev profile of \
         the workspace Cargo.toml, which optimises the models and their dependencies"
            .to_string()
    })
}

/// A model configuration that cannot be built, with the field at fault and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field has a value the model cannot use.
    #[error("model.{field} = {value}: {fix}")]
    Invalid {
        /// Dotted path of the field inside `[model]`, e.g. `mixer.n_heads`.
        field: String,
        /// The offending value, as text.
        value: String,
        /// What to change.
        fix: String,
    },
}

impl ModelError {
    pub(crate) fn invalid(
        field: impl Into<String>,
        value: impl ToString,
        fix: impl Into<String>,
    ) -> Self {
        ModelError::Invalid {
            field: field.into(),
            value: value.to_string(),
            fix: fix.into(),
        }
    }
}

#[cfg(test)]
mod build_tests {
    /// The warning fires for opt-level 0 only, and the test build itself (release in CI) is
    /// optimised, so a plain run prints nothing.
    #[test]
    fn unoptimised_warning_keys_on_the_opt_level() {
        let warning = super::unoptimised_build_warning("0").expect("opt-level 0 warns");
        assert!(warning.contains("--release"), "{warning}");
        for level in ["1", "2", "3", "s", "z"] {
            assert_eq!(
                super::unoptimised_build_warning(level),
                None,
                "opt-level {level}"
            );
        }
        assert!(
            ["0", "1", "2", "3", "s", "z"].contains(&super::BUILD_OPT_LEVEL),
            "build script saw opt-level {:?}",
            super::BUILD_OPT_LEVEL
        );
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the unit tests: every tensor test runs on each CPU backend.
    use burn::tensor::{Device, Int, Tensor, TensorData};

    /// Held by tests that draw fused attention dropout on flex: every `Device::flex().autodiff()`
    /// shares one host-side seed stream (`mixer::seed_dropout`), so such tests must not
    /// interleave.
    pub(crate) static FUSED_DROPOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// wgpu's adapter (Mesa's llvmpipe in CI), started once per test binary (wgpu's runtime
    /// registers once), or `None` with the reason printed — unless `MIXLAB_REQUIRE_WGPU` is set,
    /// when a missing adapter fails the test.
    pub fn wgpu() -> Option<Device> {
        static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
        let device = DEVICE.get_or_init(|| {
            if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
                // SAFETY: before wgpu starts; Mesa only reads it.
                unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
            }
            Device::wgpu_options().init().map_err(|e| e.to_string())
        });
        match device {
            Ok(device) => Some(device.clone()),
            Err(e) => {
                assert!(
                    std::env::var_os("MIXLAB_REQUIRE_WGPU").is_none(),
                    "MIXLAB_REQUIRE_WGPU is set but wgpu has no adapter: {e}"
                );
                eprintln!("skipped: no wgpu adapter ({e})");
                None
            }
        }
    }

    /// The CPU backends every tensor test runs on.
    #[allow(deprecated)] // ndarray is deprecated upstream; we keep testing it.
    pub fn devices() -> Vec<(&'static str, Device)> {
        vec![("flex", Device::flex()), ("ndarray", Device::ndarray())]
    }

    pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Every `got[i]` within `rel` of `want[i]`, relative to the largest `|want|`; the message
    /// names `what` and the first index that is not.
    /// `len` deterministic values in `[-scale/2, scale/2)`, a different pattern per `salt`:
    /// kernel inputs for the thread-count tests.
    pub fn pattern(len: usize, salt: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5) * scale)
            .collect()
    }

    /// Whether `kernels` gives the same bits run in a pool of 1 thread and of 3.
    pub fn same_bits_on_1_and_3_threads<const N: usize>(
        kernels: impl Fn() -> [Vec<f32>; N] + Send + Sync,
    ) -> bool {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| kernels().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
        };
        run(1) == run(3)
    }

    pub fn assert_all_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!((x - y).abs() <= rel * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Train `model` for 150 AdamW steps (lr 1e-2, no decay) on `loss`, returning the losses.
    pub fn overfit(mut model: crate::Lm, loss: impl Fn(&crate::Lm) -> Tensor<1>) -> Vec<f32> {
        use burn::optim::{AdamWConfig, GradientsParams};
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let mut losses = vec![];
        for _ in 0..150 {
            let l = loss(&model);
            losses.push(l.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(l.backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        losses
    }

    /// Deterministic pseudo-random token ids `[batch, seq]` in `0..vocab`.
    pub fn tokens(
        batch: usize,
        seq: usize,
        vocab: usize,
        salt: u64,
        device: &Device,
    ) -> Tensor<2, Int> {
        let ids: Vec<i64> = (0..batch * seq)
            .map(|i| ((i as u64 * 2654435761 + salt * 97 + 13) % vocab as u64) as i64)
            .collect();
        Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
    }
}
