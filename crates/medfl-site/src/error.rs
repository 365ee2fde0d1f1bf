//! The site daemon's error type.

/// What can go wrong in the site daemon.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// Bad configuration; names the key or file.
    #[error("configuration: {0}")]
    Config(String),
    /// Disk I/O in the data directory.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Loading data or training.
    #[error(transparent)]
    Train(#[from] medfl_train::TrainError),
    /// Pure logic refused something (a bad spec, a bad model file).
    #[error(transparent)]
    Core(#[from] medfl_core::CoreError),
    /// The coordinator answered with an error.
    #[error("coordinator: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The coordinator cannot be reached.
    #[error("cannot reach the coordinator at {url}: {message}")]
    Connect {
        /// Its address.
        url: String,
        /// Why.
        message: String,
    },
    /// A downloaded model does not match its hash or length.
    #[error("{0}")]
    Corrupt(String),
    /// The task cannot be done here (missing dataset, bad spec).
    #[error("{0}")]
    Task(String),
    /// The hospital keeps the run from training here (approval pending, rejected, paused).
    #[error("{reason}")]
    Declined {
        /// Which of those.
        kind: crate::policy::Declined,
        /// What the researcher is told.
        reason: String,
    },
    /// A hospital's command cannot be done as asked (a run that never arrived or has ended, a
    /// mistyped argument); says what to do instead.
    #[error("{0}")]
    Command(String),
    /// The task was cancelled (site paused, run stopped, site shutting down).
    #[error("cancelled: {0}")]
    Cancelled(crate::tasks::CancelReason),
}

impl SiteError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the error means the connection to the coordinator is gone or broken (reconnect),
    /// as opposed to the coordinator refusing one result (go on with the next task).
    pub fn is_disconnect(&self) -> bool {
        use tonic::Code;
        match self {
            SiteError::Connect { .. } => true,
            SiteError::Rpc(s) => !matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::AlreadyExists
                    | Code::DeadlineExceeded
                    | Code::DataLoss
                    | Code::PermissionDenied
                    | Code::NotFound
                    | Code::OutOfRange
            ),
            _ => false,
        }
    }
}
