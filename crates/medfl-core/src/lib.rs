//! Pure federated-learning logic for medfl: no I/O, no async runtime, no clock (time is passed in).
//!
//! # Layout
//! - [`tensors`]: a model as named `f32` tensors, and its schema (names and shapes).
//! - [`safetensors`]: encoding and a streaming, chunk-at-a-time decoder of the safetensors format.
//! - [`aggregator`]: the one [`aggregator::Aggregator`] behind every strategy: norm bound, folding
//!   or holding each update, and the round's result written block by block.
//! - [`client_dp`]: client-level DP-FedAvg's clipping, noise and adaptive clip for one round.
//! - [`fedavg`]: the running weighted sums that FedAvg-family strategies fold updates into.
//! - [`strategy`]: the block-wise rules the aggregator applies: robust rules, server optimizers.
//! - [`validate`]: checks an incoming update against the global model's schema.
//! - [`run`]: the lifecycle of a run.
//! - [`round`]: one attempt of a round (who was selected, who reported, when it closes).
//! - [`run_machine`]: the run state machine: rounds, retries, stop, resume and the cross-site
//!   evaluation, driven by events with the time passed in, answered with effects.
//! - [`selection`]: deterministic sampling of sites for a round.
//! - [`signing`]: the bytes sites sign for updates and the coordinator signs for tasks.
//! - [`standardize`]: federated standardisation: each site's feature sums and their pooling.
//! - [`spec`]: the run spec researchers write, and its validation.
//! - [`metrics`]: accuracy, AUC and example-weighted means.
//! - [`privacy`]: differential-privacy accounting (RDP for the subsampled Gaussian).

pub mod aggregator;
pub mod client_dp;
pub mod error;
pub mod fedavg;
pub mod metrics;
pub mod privacy;
pub mod round;
pub mod run;
pub mod run_machine;
pub mod safetensors;
pub mod selection;
pub mod signing;
pub mod spec;
pub mod standardize;
pub mod strategy;
pub mod tensors;
pub mod validate;

pub use error::CoreError;
pub use tensors::{ModelParams, ModelSchema, NamedTensor, TensorSpec};
