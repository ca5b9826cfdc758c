//! The language model: token embedding (a table, or adaptive input clusters), position
//! information (and BERT/FNet's token types, embedding LayerNorm and projection), `n_layers`
//! [`Block`]s (pre- or post-norm), a final LayerNorm (pre-norm only), an MLM head transform
//! (optional) and an output head (a full softmax or an adaptive softmax, tied to the input
//! embedding or not, with or without a bias).
//!
//! `config.rs`: [`LmConfig`] (the `[model]` section) and its validation and `init`;
//! `model.rs`: the [`Lm`] module and its forward passes.

mod config;
mod model;

pub use config::{AttentionLayout, LmConfig, Position, attention_positions};
pub use model::Lm;

#[cfg(test)]
mod tests;
