//! Aggregation beyond FedAvg: robust rules over coordinate blocks, and server-side optimisers.
//! These are the kernels; [`crate::aggregator::Aggregator`] picks and drives them for a run spec.
//!
//! Everything here works on *blocks*: `rows[i]` holds update `i`'s values for one contiguous range
//! of coordinates, the same range for every row, so the coordinator can stream updates from disk a
//! block at a time and never hold whole models. Semantics follow Flower 1.42 (`aggregate.py`,
//! `fedavgm.py`, `fedadam.py`, `fedyogi.py`, `fedadagrad.py` in `flwr/server/strategy/`).

pub mod robust;
pub mod server_opt;

pub use robust::{
    bulyan_block, bulyan_select, krum_select, median_block, trimmed_mean_block,
    weighted_mean_block, PairwiseDistances,
};
pub use server_opt::ServerOptimizer;
