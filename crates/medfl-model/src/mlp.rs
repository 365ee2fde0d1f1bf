//! A multi-layer perceptron on tabular features; with no hidden layer it is multinomial
//! logistic regression. Weights are `layers.{i}.weight` (`[out, in]`) and `layers.{i}.bias`.
//!
//! ```
//! use medfl_model::mlp::Mlp;
//!
//! let mlp = Mlp::new(30, &[16], 2);
//! let params = mlp.init(42)?;
//! assert_eq!(params.schema(), mlp.schema());
//! assert_eq!(params.get("layers.0.weight").map(|t| t.shape.clone()), Some(vec![16, 30]));
//! # Ok::<(), medfl_model::ModelError>(())
//! ```

use medfl_core::selection::SplitMix64;
use medfl_core::{ModelParams, ModelSchema, NamedTensor, TensorSpec};

use crate::ModelError;

/// The architecture: layer widths from input to classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    dims: Vec<usize>,
}

impl Mlp {
    /// `inputs` features, the given hidden widths, `classes` outputs.
    pub fn new(inputs: usize, hidden: &[usize], classes: usize) -> Self {
        let mut dims = vec![inputs];
        dims.extend_from_slice(hidden);
        dims.push(classes);
        Self { dims }
    }

    /// Widths from the input to the classes.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of linear layers.
    pub fn layers(&self) -> usize {
        self.dims.len() - 1
    }

    /// Names and shapes of the weights.
    pub fn schema(&self) -> ModelSchema {
        let specs = (0..self.layers())
            .flat_map(|i| {
                [
                    TensorSpec {
                        name: format!("layers.{i}.weight"),
                        shape: vec![self.dims[i + 1], self.dims[i]],
                    },
                    TensorSpec {
                        name: format!("layers.{i}.bias"),
                        shape: vec![self.dims[i + 1]],
                    },
                ]
            })
            .collect();
        // Names are unique by construction.
        ModelSchema::new(specs).unwrap_or_default()
    }

    /// PyTorch's `nn.Linear` initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weights and biases,
    /// drawn tensor by tensor in name order, the same for the same seed.
    pub fn init(&self, seed: u64) -> Result<ModelParams, ModelError> {
        let mut rng = SplitMix64::new(seed);
        let tensors = self
            .schema()
            .tensors
            .into_iter()
            .map(|spec| {
                let bound = 1.0 / (self.dims[layer_of(&spec.name)] as f64).sqrt();
                let data = (0..spec.numel())
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    data,
                }
            })
            .collect();
        Ok(ModelParams::new(tensors)?)
    }
}

/// The layer index in `layers.{i}.weight` or `layers.{i}.bias`.
fn layer_of(name: &str) -> usize {
    name.strip_prefix("layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_fits_schema() {
        let m = Mlp::new(3, &[4], 2);
        let a = m.init(7).unwrap();
        assert_eq!(a, m.init(7).unwrap());
        assert_ne!(a, m.init(8).unwrap());
        assert_eq!(a.schema(), m.schema());
        assert_eq!(a.get("layers.0.weight").unwrap().shape, vec![4, 3]);
        assert_eq!(a.get("layers.1.bias").unwrap().shape, vec![2]);
        assert_eq!((m.dims(), m.layers()), (&[3, 4, 2][..], 2));
    }

    #[test]
    fn each_layer_is_bounded_by_its_fan_in() {
        // Eleven layers: `layers.10.*` sorts before `layers.2.*`, and still takes its own bound.
        let m = Mlp::new(100, &[1; 10], 2);
        let p = m.init(3).unwrap();
        let max = |name: &str| {
            p.get(name)
                .unwrap()
                .data
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()))
        };
        assert!(max("layers.0.weight") <= 0.1 && max("layers.0.weight") > 0.05);
        assert!(max("layers.10.weight") > 0.1 && max("layers.10.weight") <= 1.0);
        assert_eq!(layer_of("layers.10.bias"), 10);
    }
}
