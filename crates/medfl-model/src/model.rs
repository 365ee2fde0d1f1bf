//! The model of a run spec: the names and shapes every update must have, and the run's seeded
//! initial weights.
//!
//! ```
//! use medfl_core::spec::RunSpec;
//! use medfl_model::{BaseModels, RunModel};
//!
//! let spec = RunSpec::from_toml(
//!     "name = \"bc\"\nrounds = 3\nmin_sites = 2\n[model]\nkind = \"mlp\"\nhidden = [8]\n\
//!      [task]\ndataset = \"bc\"\nfeatures = [\"x1\", \"x2\"]\nlabel = \"y\"\nlabels = [\"B\", \"M\"]\n",
//! )?;
//! let model = RunModel::for_run(&spec, &BaseModels::none())?;
//! assert_eq!(model.schema().numel(), 2 * 8 + 8 + 8 * 2 + 2);
//! assert_eq!(model.init(spec.seed)?, model.init(spec.seed)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use medfl_core::spec::{ModelSpec, RunSpec};
use medfl_core::{ModelParams, ModelSchema};

use crate::base::BaseModels;
use crate::classifier::EncoderClassifier;
use crate::mlp::Mlp;
use crate::ModelError;

pub use medfl_core::spec::IMAGE_EMBEDDING_WIDTH as IMAGE_EMBEDDING;

/// Every model family a run can train.
#[derive(Debug, Clone)]
pub enum RunModel {
    /// A multi-layer perceptron (or logistic regression) on tabular features, or the head on
    /// a frozen image encoder's embeddings.
    Mlp(Mlp),
    /// A text classifier on a pre-trained encoder.
    Text(EncoderClassifier),
}

impl RunModel {
    /// The model of `spec`; a text run's encoder comes from `bases`, checked against the hash
    /// the spec pins (refused with a variant for which [`ModelError::is_base_model`] holds).
    pub fn for_run(spec: &RunSpec, bases: &BaseModels) -> Result<Self, ModelError> {
        let classes = spec.task.labels.len();
        Ok(match &spec.model {
            ModelSpec::Mlp { hidden } => {
                RunModel::Mlp(Mlp::new(spec.task.features.len(), hidden, classes))
            }
            // A frozen image encoder: only the head on its pooled embedding trains.
            ModelSpec::Tinyvit(_) => RunModel::Mlp(Mlp::new(IMAGE_EMBEDDING, &[], classes)),
            ModelSpec::Bert(encoder) => {
                let base = bases.resolve(&encoder.base, &encoder.base_sha256)?;
                RunModel::Text(EncoderClassifier::new(base, encoder.clone(), classes)?)
            }
        })
    }

    /// Names and shapes of the weights that travel.
    pub fn schema(&self) -> ModelSchema {
        match self {
            RunModel::Mlp(m) => m.schema(),
            RunModel::Text(m) => m.schema(),
        }
    }

    /// Fresh weights, the same for the same seed.
    pub fn init(&self, seed: u64) -> Result<ModelParams, ModelError> {
        match self {
            RunModel::Mlp(m) => m.init(seed),
            RunModel::Text(m) => m.init(seed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::testing::write_base;

    fn text_spec(sha: &str) -> RunSpec {
        RunSpec::from_toml(&format!(
            "name = \"t\"\nrounds = 1\nmin_sites = 1\n[model]\nkind = \"bert\"\nbase = \"tiny\"\n\
             base_sha256 = \"{sha}\"\nmax_seq_len = 8\n[task]\ndataset = \"d\"\ntext = \"text\"\n\
             label = \"y\"\nlabels = [\"a\", \"b\"]\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_text_run_needs_its_pinned_base() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_base(dir.path(), 0.0);
        let spec = text_spec(&sha);
        let err = RunModel::for_run(&spec, &BaseModels::none()).unwrap_err();
        assert!(err.is_base_model(), "{err}");
        let bases = BaseModels::new(
            BTreeMap::from([("tiny".into(), dir.path().to_path_buf())]),
            None,
        );
        let model = RunModel::for_run(&spec, &bases).unwrap();
        assert!(matches!(model, RunModel::Text(_)));
        let params = model.init(3).unwrap();
        assert_eq!(params.schema(), model.schema());
        let err = RunModel::for_run(&text_spec(&"0".repeat(64)), &bases).unwrap_err();
        assert!(err.is_base_model(), "{err}");
    }
}
