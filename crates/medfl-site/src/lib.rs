//! The medfl site daemon: runs inside a hospital, connects out to the coordinator only, trains
//! on local data that never leaves, and sends back model updates.
//!
//! # Layout
//! - [`config`]: layered configuration, datasets by name.
//! - [`daemon`]: [`run`], the connect / register / poll loop with backoff.
//! - [`worker`]: doing a train or evaluate task.
//! - [`tasks`]: the tasks under way, each with its own cancellation token.
//! - [`cache`]: verified, resumable downloads of global models.
//! - [`base_fetch`]: fetching a pinned base model from the coordinator.
//! - [`policy`]: the hospital's policy and the per-run approval queue.
//! - [`privacy`]: what a round of record-level DP-SGD costs, against the run's ε target.
//! - [`registry`]: datasets registered by name with `medfl-site dataset add`.
//! - [`audit`]: the site's audit log, shared by the daemon and the hospital's commands.
//! - [`client`]: the identified gRPC client; [`identity`]: the site's token and run history.

pub mod audit;
pub mod base_fetch;
pub mod cache;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod identity;
pub mod policy;
pub mod privacy;
pub mod registry;
pub mod tasks;
pub mod worker;

pub use config::SiteConfig;
pub use daemon::{run, run_observed};
pub use error::SiteError;
