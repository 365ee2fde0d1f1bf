//! The error type of the model crate.

use std::path::PathBuf;

/// What can go wrong while finding a base model or making a run's schema and initial weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A base model's `config.json` is not valid JSON or describes no supported model.
    #[error("{path}:{line}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// 1-based line of the fault (of the offending key where there is one).
        line: u64,
        /// What is wrong, naming the key.
        message: String,
    },
    /// No base model of that name and weights is here: publish it or configure it.
    #[error(
        "no base model `{name}` with weights SHA-256 {sha256} here: list its directory under \
         [base_models] in the config"
    )]
    BaseMissing {
        /// The name the run gives.
        name: String,
        /// The weights hash the run pins.
        sha256: String,
    },
    /// The directory configured under the run's base name holds other weights.
    #[error(
        "base model `{name}` at {dir} has weights with SHA-256 {actual}, but the run pins \
         {pinned}: refusing to train other weights than the run names"
    )]
    BaseMismatch {
        /// The configured name.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// Hash of the weights found there.
        actual: String,
        /// Hash the run pins.
        pinned: String,
    },
    /// A model fetched by hash holds other weights than its directory's name says.
    #[error("fetched base model at {dir} has weights with SHA-256 {actual}, not {pinned}")]
    FetchedMismatch {
        /// Its directory, `<fetched>/<pinned>`.
        dir: PathBuf,
        /// Hash of the weights found there.
        actual: String,
        /// Hash the directory is named after.
        pinned: String,
    },
    /// A weights file changed on disk after it was checked against the run's pin.
    #[error("{path} changed: its SHA-256 is now {actual}, the run pins {pinned}")]
    BaseChanged {
        /// The weights file.
        path: PathBuf,
        /// Its hash now.
        actual: String,
        /// Hash the run pins.
        pinned: String,
    },
    /// The run spec asks for something the model cannot be (too many layers, too long inputs,
    /// a text model without its base).
    #[error("{0}")]
    Spec(String),
    /// A base model's weights do not fit its config (a missing tensor, another shape, not a
    /// float type) or are not a safetensors file.
    #[error("model weights: {0}")]
    Weights(String),
    /// An error from the core crate.
    #[error(transparent)]
    Core(#[from] medfl_core::CoreError),
}

impl ModelError {
    /// Whether the run's base model is missing here or is not the one it pins: the variants
    /// an operator fixes by publishing the right weights under the right name.
    pub fn is_base_model(&self) -> bool {
        matches!(
            self,
            ModelError::BaseMissing { .. }
                | ModelError::BaseMismatch { .. }
                | ModelError::FetchedMismatch { .. }
                | ModelError::BaseChanged { .. }
        )
    }
}
