//! Local training for medfl sites, on candle: data loading, models and the training loop.
//!
//! # Layout
//! - [`bert`]: a BERT text encoder; every dense layer in it is a [`bert::Projection`].
//! - [`data`]: CSV tables, labelled examples, splits and per-site standardisation.
//! - [`model`]: the [`LocalModel`] trait the round engine trains through, and [`build_model`].
//! - [`mlp`]: a multi-layer perceptron / logistic regression on tabular features.
//! - [`params`]: moving weights between [`medfl_core::ModelParams`] and candle tensors.
//! - [`tokenize`]: text to padded token-id batches with a Hugging Face `tokenizer.json`.

pub mod bert;
pub mod data;
pub mod error;
pub mod mlp;
pub mod model;
pub mod params;
pub mod tokenize;

pub use data::{label_skew_partition, Examples, Standardizer, Table};
pub use error::TrainError;
pub use model::{
    build_model, model_for_run, EvalReport, LocalModel, TrainOptions, TrainProgress, TrainReport,
};
