//! The consortium's public-key infrastructure: a certificate authority kept in a directory,
//! certificates that name a participant's role and name, kits ready to hand to each participant,
//! revocation honoured without a restart, and mutual-TLS settings for tonic.
//!
//! ```
//! # fn main() -> Result<(), medfl_pki::PkiError> {
//! # let dir = tempfile::tempdir().map_err(|source| medfl_pki::PkiError::Io {
//! #     path: std::env::temp_dir(), source })?;
//! let kits = dir.path().join("kits");
//! let done = medfl_pki::provision(
//!     None, "Example Consortium", "coordinator.example.org",
//!     &["hospital-a".into()], &["alice".into()], &[], &kits,
//! )?;
//! assert_eq!(done.kits.len(), 3); // coordinator, hospital-a, alice
//! assert!(kits.join("hospital-a/site.toml").exists());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`Role`], [`validate_name`], [`PeerIdentity`]: who a certificate is for; the identity is the
//!   URI SAN `urn:medfl:<role>:<name>`.
//! - [`Ca`]: the consortium CA in a directory (`ca.pem`, `ca.key`, `consortium.json`,
//!   `revoked.json`); issues and revokes certificates. [`Consortium`] is `consortium.json`.
//! - [`Issued`], [`Kit`], [`provision`]: certificates and the per-participant kit directories
//!   with their ready config files (`site.toml`, `coordinator.toml`, `medfl.toml`).
//! - [`RevocationList`], [`WatchedRevocations`]: the revocation list, re-read when it changes.
//! - [`server_tls`], [`tls_incoming`]: the coordinator's mutual-TLS handshake, refusing revoked
//!   participants; [`client_tls`]: tonic client settings from a kit's PEM files.

mod ca;
mod error;
mod fsutil;
mod handshake;
mod identity;
mod kit;
mod revocation;
mod tls;

pub use ca::{
    Ca, Consortium, CoordinatorAddress, Issued, Participant, CA_CERT_FILE, CA_KEY_FILE,
    CONSORTIUM_FILE, DEFAULT_PORT, DEFAULT_VALID_DAYS, MAX_VALID_DAYS, REVOKED_FILE,
};
pub use error::PkiError;
pub use handshake::{
    tls_incoming, tls_incoming_observed, Admitted, ConnectionLimits, RefusedHandshake,
};
pub use identity::{identity_uri, validate_name, PeerIdentity, Role, URI_PREFIX};
pub use kit::{provision, provision_with, IssueOptions, Kit, Provisioned, COORDINATOR_NAME};
pub use revocation::{RevocationList, Revoked, WatchedRevocations};
pub use tls::{certificate_expiry, client_tls, server_tls};
