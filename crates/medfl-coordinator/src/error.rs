//! The coordinator's error type, and the one table that maps it to gRPC status codes.

use medfl_core::round::Refusal;
use medfl_core::CoreError;
use tonic::{Code, Status};

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad configuration; names the key or file.
    #[error("configuration: {0}")]
    Config(String),
    /// Disk I/O on the data directory.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state database.
    #[error("state database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A caller could not be identified.
    #[error("{0}")]
    Unauthenticated(String),
    /// A caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such run, round, site or blob.
    #[error("{0}")]
    NotFound(String),
    /// A request is malformed (bad spec, bad update).
    #[error("{0}")]
    Invalid(String),
    /// Bytes do not match their announced hash or length.
    #[error("{0}")]
    Corrupt(String),
    /// A result the round state machine refused.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Pure logic refused something.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A run's model could not be built (its spec, its base model).
    #[error(transparent)]
    Model(#[from] medfl_model::ModelError),
    /// A limit or quota of the caller's is reached (one upload per site, runs per researcher).
    #[error("{0}")]
    Exhausted(String),
    /// The coordinator is shutting down or a run ended.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected state.
    #[error("internal: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        let code = match &e {
            CoordinatorError::Config(_) | CoordinatorError::Invalid(_) => Code::InvalidArgument,
            CoordinatorError::Core(CoreError::Spec { .. }) => Code::InvalidArgument,
            CoordinatorError::Core(CoreError::Truncated { .. }) => Code::DataLoss,
            CoordinatorError::Core(_) => Code::InvalidArgument,
            CoordinatorError::Corrupt(_) => Code::DataLoss,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::PermissionDenied(_) => Code::PermissionDenied,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::Exhausted(_) => Code::ResourceExhausted,
            CoordinatorError::Refused(r) => match r {
                Refusal::Duplicate { .. } => Code::AlreadyExists,
                Refusal::Late { .. } => Code::DeadlineExceeded,
                Refusal::NotSelected { .. } => Code::PermissionDenied,
                Refusal::NotOpen { .. } | Refusal::WrongPhase { .. } => Code::FailedPrecondition,
            },
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::Model(_) => Code::InvalidArgument,
            CoordinatorError::Io { .. }
            | CoordinatorError::Db(_)
            | CoordinatorError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
