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
mod error;
pub mod head;
pub mod init;
pub mod lm;
pub mod loss;
pub mod mixer;
pub mod mlp;
pub mod ops;
pub mod pattern;

pub use block::{Block, BlockConfig, NormPlacement};
pub use cache::{CacheConfig, CacheStart, CacheView, LmCache, Window};
pub use error::ModelError;
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
mod layering;
#[cfg(test)]
pub(crate) mod test_util;
