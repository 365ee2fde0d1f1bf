//! Adapter files: a run's trained tensors as safetensors, with the run spec in the metadata.

use std::collections::HashMap;
use std::path::Path;

use medfl_core::ModelParams;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::ModelError;

/// Metadata key holding the run spec (TOML) in an adapter file.
pub const SPEC_METADATA_KEY: &str = "medfl.run_spec";
/// Metadata key holding, as JSON, what a pulled model's differential privacy spent.
pub const PRIVACY_METADATA_KEY: &str = "medfl.privacy";
/// Metadata key holding, as JSON, where a pulled model comes from: its run, round, the global
/// model's SHA-256 as the coordinator served it, and the run spec's SHA-256.
pub const PROVENANCE_METADATA_KEY: &str = "medfl.model";
/// Metadata key holding, as JSON, the federation's feature statistics a tabular model's inputs
/// are standardised with ([`medfl_core::standardize::Standardization`]).
pub const STANDARDIZATION_METADATA_KEY: &str = "medfl.standardization";

/// The adapter (or any model) as safetensors, with `spec_toml` in the metadata.
pub fn adapter_bytes(params: &ModelParams, spec_toml: &str) -> Result<Vec<u8>, ModelError> {
    model_bytes(params, &[(SPEC_METADATA_KEY, spec_toml)])
}

/// Any model as safetensors with these `metadata` entries (beside `format`).
pub fn model_bytes(params: &ModelParams, metadata: &[(&str, &str)]) -> Result<Vec<u8>, ModelError> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .tensors
        .iter()
        .map(|t| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (t.name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Weights(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata: HashMap<String, String> = std::iter::once(("format", "pt"))
        .chain(metadata.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| ModelError::Weights(format!("writing the adapter: {e}")))
}

/// Reads an adapter file: its tensors and the run spec in its metadata, if any.
pub fn read_adapter(path: &Path) -> Result<(ModelParams, Option<String>), ModelError> {
    let (params, mut metadata) = read_model_file(path)?;
    Ok((params, metadata.remove(SPEC_METADATA_KEY)))
}

/// Reads a model file: its tensors and every metadata entry.
pub fn read_model_file(path: &Path) -> Result<(ModelParams, HashMap<String, String>), ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |e: String| ModelError::Weights(format!("{}: {e}", path.display()));
    let params = medfl_core::safetensors::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok((params, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_core::NamedTensor;

    #[test]
    fn an_adapter_carries_its_spec() -> Result<(), Box<dyn std::error::Error>> {
        let params = ModelParams::new(vec![NamedTensor {
            name: "head.weight".into(),
            shape: vec![2, 2],
            data: vec![1.0, -2.0, 0.5, 3.25],
        }])?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("adapter.safetensors");
        std::fs::write(&path, adapter_bytes(&params, "name = \"x\"")?)?;
        let (back, spec) = read_adapter(&path)?;
        assert_eq!(back, params);
        assert_eq!(spec.as_deref(), Some("name = \"x\""));
        // A plain model file reads too, without a spec.
        std::fs::write(&path, medfl_core::safetensors::encode(&params))?;
        assert_eq!(read_adapter(&path)?, (params, None));
        Ok(())
    }
}
