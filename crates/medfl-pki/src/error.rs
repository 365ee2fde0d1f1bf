//! The crate's one error type.

use std::path::PathBuf;

use crate::Role;

/// What can go wrong with the consortium PKI. Every variant names the file, field or participant
/// involved.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file exists but does not hold what it should (bad JSON, no certificate, wrong key...).
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A participant name breaks the naming rule.
    #[error("invalid participant name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A role that is not `site`, `researcher`, `operator` or `coordinator`.
    #[error("unknown role {0:?}: expected site, researcher, operator or coordinator")]
    UnknownRole(String),
    /// A consortium name that is empty, too long or holds control characters.
    #[error("invalid consortium name {name:?}: {reason}")]
    InvalidConsortium {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// A coordinator host (or `host:port`) that cannot be parsed.
    #[error("invalid coordinator address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The name was already issued a certificate; names are never reused, even after revocation.
    #[error(
        "participant {name:?} already has a certificate (issued as {role}, recorded in {path})"
    )]
    Duplicate {
        /// The name asked for.
        name: String,
        /// The role it was issued with.
        role: Role,
        /// The consortium file that records it.
        path: PathBuf,
    },
    /// No participant of that name was ever issued a certificate.
    #[error("no participant {name:?} in {path}")]
    UnknownParticipant {
        /// The name asked for.
        name: String,
        /// The consortium file searched.
        path: PathBuf,
    },
    /// The participant's certificate is already revoked.
    #[error("participant {name:?} was already revoked at {revoked_at}")]
    AlreadyRevoked {
        /// The participant.
        name: String,
        /// When it was revoked (RFC 3339).
        revoked_at: String,
    },
    /// A peer presented a certificate that is on the revocation list.
    #[error("{role} {name:?} presented a revoked certificate (serial {serial_hex}, revoked at {revoked_at})")]
    Revoked {
        /// The peer's role.
        role: Role,
        /// The peer's name.
        name: String,
        /// The certificate's serial number (hex).
        serial_hex: String,
        /// When it was revoked (RFC 3339).
        revoked_at: String,
    },
    /// The directory already holds a CA; it is never overwritten.
    #[error("{path} already exists: refusing to overwrite a consortium CA")]
    CaExists {
        /// The existing CA file.
        path: PathBuf,
    },
    /// The kit directory already exists and is not empty.
    #[error("kit directory {path} already exists and is not empty")]
    KitExists {
        /// The kit directory.
        path: PathBuf,
    },
    /// Generating a key or signing a certificate failed.
    #[error("issuing a certificate for {name:?}: {reason}")]
    Certificate {
        /// The participant (or CA) being issued.
        name: String,
        /// What failed.
        reason: String,
    },
    /// A peer's certificate does not carry a usable medfl identity.
    #[error("peer certificate: {0}")]
    Identity(String),
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
