//! Local training for medfl sites, on candle: data loading, models and the training loop.
//! What a model's weights are called, their shapes and their initial values come from
//! [`medfl_model`], which needs no candle.
//!
//! # Layout
//! - [`base`]: pre-trained base models ([`medfl_model::BaseModels`]) with their weights as
//!   candle tensors and their tokenizers.
//! - [`bert`]: a BERT text encoder; every dense layer in it is a [`bert::Projection`] that can
//!   carry a LoRA adapter.
//! - [`classifier`]: a text classifier on a base encoder (LoRA, head or full fine-tuning).
//! - [`data`]: CSV tables, labelled examples, splits and per-site standardisation.
//! - [`export`]: adapter files with their run spec, and adapters merged into the base.
//! - [`fit`]: the training loop every model shares.
//! - [`image`]: image datasets (folders, CSV lists), decoding and the encoder's preprocessing.
//! - [`embed`]: image embeddings from a frozen encoder, in batches, cached on disk.
//! - [`model`]: the [`LocalModel`] trait the round engine trains through, and [`model_for_run`].
//! - [`mlp`]: a multi-layer perceptron / logistic regression on tabular features.
//! - [`ops`]: fused CPU kernels with hand-derived gradients for the encoder's hot spots.
//! - [`params`]: moving weights between [`medfl_core::ModelParams`] and candle tensors.
//! - [`private`]: record-level DP-SGD: per-example clipped gradients, noise, the private loop.
//! - [`testing`]: a tiny random BERT on disk, for tests and benchmarks.
//! - [`text_data`]: JSON-lines text datasets and labelled texts.
//! - [`tinyvit`]: LiteMedSAM's TinyViT image encoder, loaded from its own weights.
//! - [`tokenize`]: text to padded token-id batches with a Hugging Face `tokenizer.json`.

pub mod base;
pub mod bert;
pub mod classifier;
pub mod data;
pub mod embed;
pub mod error;
pub mod export;
pub mod fit;
pub mod image;
pub mod mlp;
pub mod model;
pub mod ops;
pub mod params;
pub mod private;
pub mod testing;
pub mod text_data;
pub mod tinyvit;
pub mod tokenize;

pub use base::{BaseModel, BaseModels};
pub use classifier::TextClassifier;
pub use data::{label_skew_partition, Examples, Standardizer, Table};
pub use error::TrainError;
pub use model::{
    build_model, model_for_run, Data, EvalReport, LocalModel, TrainOptions, TrainProgress,
    TrainReport,
};
pub use text_data::{TextExamples, TextTable};
