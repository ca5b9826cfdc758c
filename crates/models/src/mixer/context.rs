//! What every mixer is told about the model it sits in.

/// What every mixer is told about the model it sits in (the `[model]` settings it shares).
#[derive(Debug, Clone, PartialEq)]
pub struct MixerContext {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks, for the residual-projection initialisation.
    pub n_layers: usize,
    /// Dropout probability (attention weights and sublayer output).
    pub dropout: f64,
    /// Longest sequence the model accepts.
    pub max_seq_len: usize,
    /// Rotary position embedding inside the mixer (`Some(theta)`), or none.
    pub rope_theta: Option<f32>,
    /// The model passes a relative-position key embedding (`position = "relative"`).
    pub relative_positions: bool,
    /// Biases in the attention projections (`model.attention_bias`).
    pub bias: bool,
    /// Index of this block, input first (sparse patterns alternate with the layer).
    pub layer: usize,
    /// Whether attention may use the fused operations (`model.attention_impl = "fused"`).
    pub fused_attention: bool,
}
