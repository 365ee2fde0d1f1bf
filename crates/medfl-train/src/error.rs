//! The error type of the training crate.

use std::path::PathBuf;

use medfl_model::ModelError;

/// What can go wrong while loading data or training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A data file has a problem at a given place.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the header is line 1).
        line: u64,
        /// What is wrong, naming the column where there is one.
        message: String,
    },
    /// The data cannot serve the task (too few rows, a missing column).
    #[error("{0}")]
    Task(String),
    /// A base model is missing here or is not the one a run pins.
    #[error("{0}")]
    BaseModel(String),
    /// The weights do not fit the model.
    #[error("model weights: {0}")]
    Weights(String),
    /// Training stopped because its run was stopped.
    #[error("training cancelled")]
    Cancelled,
    /// Training diverged.
    #[error("training diverged: loss is {loss} at step {step}")]
    Diverged {
        /// Step at which the loss stopped being finite.
        step: u64,
        /// The loss.
        loss: f32,
    },
    /// An error inside candle.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    /// An error from the core crate.
    #[error(transparent)]
    Core(#[from] medfl_core::CoreError),
}

/// Each model error as the training variant of the same meaning, with the same message.
impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Io { path, source } => TrainError::Io { path, source },
            ModelError::Config {
                path,
                line,
                message,
            } => TrainError::Data {
                path,
                line,
                message,
            },
            e @ (ModelError::BaseMissing { .. }
            | ModelError::BaseMismatch { .. }
            | ModelError::FetchedMismatch { .. }
            | ModelError::BaseChanged { .. }) => TrainError::BaseModel(e.to_string()),
            ModelError::Spec(message) => TrainError::Task(message),
            ModelError::Weights(message) => TrainError::Weights(message),
            ModelError::Core(e) => TrainError::Core(e),
        }
    }
}
