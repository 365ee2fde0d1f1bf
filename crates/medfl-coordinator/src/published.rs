//! Base models the operator publishes: hashed once at start, so sites can fetch any of their
//! files by SHA-256 and runs can be checked against the weights they pin.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use medfl_model::base::{sha256_file, BASE_FILES};
use medfl_proto::v1;
use tracing::info;

use crate::CoordinatorError;

/// One published model: its weights hash and its files.
#[derive(Debug, Clone)]
pub struct PublishedModel {
    /// SHA-256 of its `model.safetensors`.
    pub weights_sha256: String,
    /// Its files, as sites are told of them.
    pub files: Vec<v1::BaseModelFile>,
}

/// Every published base model, by name, and each of their files by hash.
#[derive(Debug, Default)]
pub struct Published {
    models: BTreeMap<String, PublishedModel>,
    files: HashMap<String, (PathBuf, u64)>,
}

impl Published {
    /// Hashes the files of every model in `dirs`; a missing file is a config error naming it.
    pub fn scan(dirs: &BTreeMap<String, PathBuf>) -> Result<Self, CoordinatorError> {
        let mut out = Self::default();
        for (name, dir) in dirs {
            let mut files = Vec::new();
            for file in BASE_FILES {
                let path = dir.join(file);
                let size = std::fs::metadata(&path)
                    .map_err(|e| {
                        CoordinatorError::Config(format!(
                            "`base_models.{name}`: {}: {e}",
                            path.display()
                        ))
                    })?
                    .len();
                let sha256 = sha256_file(&path)
                    .map_err(|e| CoordinatorError::Config(format!("`base_models.{name}`: {e}")))?;
                out.files.insert(sha256.clone(), (path, size));
                files.push(v1::BaseModelFile {
                    name: file.to_string(),
                    sha256,
                    size,
                });
            }
            let weights_sha256 = files
                .iter()
                .find(|f| f.name == "model.safetensors")
                .map(|f| f.sha256.clone())
                .unwrap_or_default();
            info!(model = %name, dir = %dir.display(), weights_sha256 = %weights_sha256, "base model published");
            out.models.insert(
                name.clone(),
                PublishedModel {
                    weights_sha256,
                    files,
                },
            );
        }
        Ok(out)
    }

    /// The model published as `name` with weights `weights_sha256`.
    pub fn model(&self, name: &str, weights_sha256: &str) -> Option<&PublishedModel> {
        self.models
            .get(name)
            .filter(|m| m.weights_sha256 == weights_sha256)
    }

    /// The path and size of a published file.
    pub fn file(&self, sha256: &str) -> Option<&(PathBuf, u64)> {
        self.files.get(sha256)
    }
}
