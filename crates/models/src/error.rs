//! The one error a model configuration gives: the field at fault and how to fix it.

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
