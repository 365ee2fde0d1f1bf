//! Run schemas and initial weights: the tensors a run trains, their names and shapes, and their
//! seeded starting values, for every model family, plus the registry of pre-trained base
//! models. No candle, no tokenizers: what the coordinator needs to create a run and check the
//! updates it receives. `medfl-train` builds its trainable models on the same definitions.
//!
//! # Layout
//! - [`adapter`]: adapter files, a run's trained tensors with the run spec in their metadata.
//! - [`base`]: base models on disk, found by name and pinned by the SHA-256 of their weights.
//! - [`bert`]: a BERT `config.json` and the names and shapes of its checkpoint's tensors.
//! - [`checkpoint`]: a base checkpoint's tensors, checked against its config and read as f32.
//! - [`classifier`]: the trainable tensors of a text classifier on a base encoder (LoRA, head
//!   or full fine-tuning) and their initial values.
//! - [`error`]: the error type, [`ModelError`].
//! - [`mlp`]: a multi-layer perceptron / logistic regression on tabular features.
//! - [`model`]: [`RunModel`], the model of a run spec, with its schema and initial weights.

pub mod adapter;
pub mod base;
pub mod bert;
pub mod checkpoint;
pub mod classifier;
pub mod error;
pub mod mlp;
pub mod model;
pub mod onnx;

#[cfg(test)]
mod testing;

pub use base::{BaseModel, BaseModels};
pub use classifier::EncoderClassifier;
pub use error::ModelError;
pub use mlp::Mlp;
pub use model::{RunModel, IMAGE_EMBEDDING};
