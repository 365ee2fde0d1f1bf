//! The error type of the core crate.

/// Everything that can go wrong in pure medfl logic. Each variant names what and where.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoreError {
    /// The bytes are not a valid safetensors file.
    #[error("malformed safetensors: {0}")]
    Format(String),
    /// The bytes ended before the file did.
    #[error("truncated safetensors: got {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes the header announced.
        expected: u64,
    },
    /// Tensor names, shapes or dtype differ from the global model.
    #[error("update does not match the global model: {0}")]
    SchemaMismatch(String),
    /// A value is NaN or infinite.
    #[error("tensor `{tensor}` holds a non-finite value at element {index}")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Element index inside the tensor.
        index: usize,
    },
    /// A run spec field is invalid.
    #[error("run spec: {field}: {message}")]
    Spec {
        /// The offending field, dotted (`training.batch_size`).
        field: String,
        /// Why it is invalid.
        message: String,
    },
    /// A differential-privacy parameter is out of range or cannot be met.
    #[error("privacy: {field}: {message}")]
    Privacy {
        /// The offending parameter (`noise_multiplier`, `delta`, ...).
        field: String,
        /// Why.
        message: String,
    },
    /// The accumulator has no update to average.
    #[error("no update to aggregate")]
    Empty,
    /// An update is farther from the global model than the run's norm bound allows.
    #[error("update is {norm:.6} from the global model, over the run's bound of {bound}")]
    NormBound {
        /// L2 norm of `update - global`.
        norm: f64,
        /// The run's bound (`defense.max_update_norm`).
        bound: f64,
    },
    /// An aggregator was given inconsistent inputs (a missing global model, the wrong number of
    /// held updates) or was used after folding broke off.
    #[error("aggregation: {0}")]
    Aggregation(String),
    /// Feature statistics for federated standardisation are malformed or impossible.
    #[error("feature statistics: {0}")]
    Statistics(String),
}

impl CoreError {
    /// A privacy error for `field`.
    pub fn privacy(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Privacy {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A spec error for `field`.
    pub fn spec(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Spec {
            field: field.into(),
            message: message.into(),
        }
    }
}
