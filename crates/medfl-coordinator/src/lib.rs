//! The medfl coordinator: accepts sites' outbound connections, drives runs round by round,
//! aggregates updates as they stream in and keeps its state in SQLite so it survives restarts.
//!
//! # Layout
//! - [`config`]: layered configuration.
//! - [`server`]: [`serve`] on a bound listener with a shutdown future.
//! - [`site_service`] / [`run_service`]: the two gRPC services (thin handlers).
//! - [`engine`]: one task per run, the shell of the core `RunMachine`: it feeds events in and
//!   carries out the effects (store, audit, aggregation, blob references).
//! - [`auth`]: identities from client certificates, and what each role may call.
//! - [`edge`]: bounds on every field from the network, checked before anything is kept.
//! - [`aggregate`]: the blob store as block sources and sinks of the core `Aggregator`.
//! - [`campaign`]: cross-site evaluation of an ended run (a phase of its `RunMachine`).
//! - [`published`]: base models the operator publishes for sites to fetch.
//! - [`signing`]: the coordinator's signing key; site update signatures.
//! - [`state`]: what handlers and engines share.
//! - [`store`]: SQLite state and who owns each blob; [`blobs`]: content-addressed model files;
//!   [`retention`]: releasing blobs as runs go and end; [`stream`]: chunked reads.
//! - [`fit`]: replies trimmed or paged to fit the message limit; [`quota`]: what one
//!   researcher may hold.
//! - [`error`]: the error type and its mapping to gRPC status codes.

pub mod aggregate;
pub mod auth;
pub mod blobs;
pub mod campaign;
pub mod config;
pub mod edge;
pub mod engine;
pub mod error;
pub mod fit;
pub mod open_files;
pub mod published;
pub mod quota;
pub mod refusals;
pub mod retention;
pub mod run_service;
pub mod server;
pub mod signing;
pub mod site_service;
pub mod state;
pub mod store;
pub mod stream;

pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
pub use server::serve;
