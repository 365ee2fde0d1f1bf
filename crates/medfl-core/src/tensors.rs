//! A model as an ordered list of named `f32` tensors, and the schema that two models must share.

use crate::CoreError;

/// The name and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name, e.g. `layers.0.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Names and shapes of every tensor of a model, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelSchema {
    /// Tensors sorted by name.
    pub tensors: Vec<TensorSpec>,
}

impl ModelSchema {
    /// Builds a schema, sorting by name and refusing duplicate names.
    pub fn new(mut tensors: Vec<TensorSpec>) -> Result<Self, CoreError> {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(CoreError::Format(format!(
                "duplicate tensor `{}`",
                w[0].name
            )));
        }
        Ok(Self { tensors })
    }

    /// Index of the tensor called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }
}

/// One named tensor with its values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Tensor name.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` equals the product of `shape`.
    pub data: Vec<f32>,
}

/// A whole model (or update): tensors sorted by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelParams {
    /// Tensors sorted by name.
    pub tensors: Vec<NamedTensor>,
}

impl ModelParams {
    /// Builds a model, sorting by name and checking every tensor's length against its shape.
    pub fn new(mut tensors: Vec<NamedTensor>) -> Result<Self, CoreError> {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        for t in &tensors {
            let numel: usize = t.shape.iter().product();
            if numel != t.data.len() {
                return Err(CoreError::Format(format!(
                    "tensor `{}` has shape {:?} ({numel} elements) but {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                )));
            }
        }
        if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(CoreError::Format(format!(
                "duplicate tensor `{}`",
                w[0].name
            )));
        }
        Ok(Self { tensors })
    }

    /// The schema (names and shapes) of this model.
    pub fn schema(&self) -> ModelSchema {
        ModelSchema {
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}
