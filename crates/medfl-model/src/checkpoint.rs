//! A base model's `model.safetensors` read without candle: the tensors its config implies,
//! checked, and widened to f32 exactly as candle's `to_dtype(F32)` widens them.
//!
//! ```no_run
//! # fn main() -> Result<(), medfl_model::ModelError> {
//! use std::collections::BTreeMap;
//! use medfl_model::base::BaseModels;
//! use medfl_model::checkpoint::Checkpoint;
//!
//! let dir = std::path::PathBuf::from("all-MiniLM-L6-v2");
//! let bases = BaseModels::new(BTreeMap::from([("minilm".into(), dir.clone())]), None);
//! let base = bases.resolve("minilm", &bases.weights_sha256(&dir)?)?;
//! let bytes = base.read_weights()?;
//! let checkpoint = Checkpoint::parse(&bytes, &base.weights_path())?;
//! checkpoint.check(&base.config)?;
//! let h = base.config.hidden_size;
//! let norm = checkpoint.f32("embeddings.LayerNorm.weight", &[h])?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::bert::BertConfig;
use crate::ModelError;

/// The tensors of a safetensors file in memory, as a transformers checkpoint names them
/// (optionally prefixed with `bert.`).
pub struct Checkpoint<'a> {
    tensors: SafeTensors<'a>,
    path: PathBuf,
}

impl std::fmt::Debug for Checkpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl<'a> Checkpoint<'a> {
    /// Parses the header of `bytes`, read from `path` (which errors name).
    pub fn parse(bytes: &'a [u8], path: &Path) -> Result<Self, ModelError> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))?;
        Ok(Self {
            tensors,
            path: path.to_path_buf(),
        })
    }

    fn fault(&self, message: String) -> ModelError {
        ModelError::Weights(format!("{}: {message}", self.path.display()))
    }

    /// The tensor `name`, or else `bert.{name}`.
    fn view(&self, name: &str) -> Option<TensorView<'a>> {
        self.tensors
            .tensor(name)
            .or_else(|_| self.tensors.tensor(&format!("bert.{name}")))
            .ok()
    }

    /// The tensor `name`, checked to be of `shape` and of a float type.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<TensorView<'a>, ModelError> {
        let view = self
            .view(name)
            .ok_or_else(|| self.fault(format!("missing tensor `{name}`")))?;
        if view.shape() != shape {
            return Err(self.fault(format!(
                "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                view.shape()
            )));
        }
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(self.fault(format!(
                "tensor `{name}` is {:?}, not a float type",
                view.dtype()
            )));
        }
        Ok(view)
    }

    /// Checks every tensor the encoder of `config` reads: there, of the shape the config
    /// implies, of a float type. The encoder that trains refuses the checkpoint otherwise.
    pub fn check(&self, config: &BertConfig) -> Result<(), ModelError> {
        for (name, shape) in config.encoder_tensors() {
            self.checked(&name, &shape)?;
        }
        Ok(())
    }

    /// The tensor `name` of `shape` as f32, row-major.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let view = self.checked(name, shape)?;
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F16 => values(data, |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => values(data, |b| half::bf16::from_le_bytes(b).to_f32()),
            // Rounded to nearest, ties to even, as candle's `v as f32`.
            Dtype::F64 => values(data, |b| f64::from_le_bytes(b) as f32),
            // `checked` lets only float types through.
            _ => values(data, f32::from_le_bytes),
        })
    }
}

/// The little-endian values of `N` bytes each in `data` (whose length safetensors has checked
/// against the shape), converted by `f`.
fn values<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    data.chunks_exact(N)
        .map(|chunk| {
            let mut bytes = [0u8; N];
            bytes.copy_from_slice(chunk);
            f(bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_config, tiny_tensors, write_checkpoint, Stored};

    #[test]
    fn stored_floats_widen_exactly() {
        let c = tiny_config();
        let name = "encoder.layer.1.output.dense.weight";
        let shape = [c.hidden_size, c.intermediate_size];
        let want = &tiny_tensors(&c)[name];
        let dir = tempfile::tempdir().unwrap();
        for stored in [
            Stored::F32,
            Stored::F16,
            Stored::Bf16,
            Stored::F64,
            Stored::Prefixed,
        ] {
            let path = dir.path().join("model.safetensors");
            write_checkpoint(&path, &c, &tiny_tensors(&c), stored);
            let bytes = std::fs::read(&path).unwrap();
            let checkpoint = Checkpoint::parse(&bytes, &path).unwrap();
            checkpoint.check(&c).unwrap();
            let got = checkpoint.f32(name, &shape).unwrap();
            let expected: Vec<f32> = match stored {
                Stored::F32 | Stored::Prefixed => want.clone(),
                Stored::F16 => want
                    .iter()
                    .map(|v| half::f16::from_f32(*v).to_f32())
                    .collect(),
                Stored::Bf16 => want
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect(),
                Stored::F64 => want.iter().map(|v| (f64::from(*v) / 3.0) as f32).collect(),
                Stored::I64 => unreachable!("not among the stored types tried"),
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&expected), "{stored:?}");
        }
    }

    #[test]
    fn checkpoints_that_do_not_fit_the_config_name_the_tensor() {
        let c = tiny_config();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let missing = "encoder.layer.0.attention.self.value.bias";
        let mut tensors = tiny_tensors(&c);
        tensors.remove(missing);
        write_checkpoint(&path, &c, &tensors, Stored::F32);
        let bytes = std::fs::read(&path).unwrap();
        let err = Checkpoint::parse(&bytes, &path)
            .unwrap()
            .check(&c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains(missing),
            "{err}"
        );

        let mut wider = c.clone();
        wider.intermediate_size += 1;
        write_checkpoint(&path, &c, &tiny_tensors(&c), Stored::F32);
        let bytes = std::fs::read(&path).unwrap();
        let checkpoint = Checkpoint::parse(&bytes, &path).unwrap();
        let err = checkpoint.check(&wider).unwrap_err().to_string();
        assert!(
            err.contains("encoder.layer.0.intermediate.dense.weight"),
            "{err}"
        );
        assert!(err.contains("[17, 8]"), "{err}");

        write_checkpoint(&path, &c, &tiny_tensors(&c), Stored::I64);
        let bytes = std::fs::read(&path).unwrap();
        let err = Checkpoint::parse(&bytes, &path)
            .unwrap()
            .check(&c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("I64") && err.contains("not a float type"),
            "{err}"
        );

        let err = Checkpoint::parse(b"not safetensors", &path).unwrap_err();
        assert!(matches!(err, ModelError::Weights(_)), "{err}");
    }
}
