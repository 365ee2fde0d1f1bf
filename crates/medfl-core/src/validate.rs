//! Checks that an incoming update fits the global model: same tensor names and shapes, F32 (the
//! decoder refuses other dtypes), and only finite values.

use crate::safetensors::{Layout, TensorSink};
use crate::{CoreError, ModelSchema};

/// Maps each tensor of `layout` to its index in `schema`, refusing any difference in names or shapes.
pub fn match_layout(schema: &ModelSchema, layout: &Layout) -> Result<Vec<usize>, CoreError> {
    if layout.tensors.len() != schema.tensors.len() {
        let got = layout.schema()?;
        let missing: Vec<&str> = schema
            .tensors
            .iter()
            .filter(|t| got.index_of(&t.name).is_none())
            .map(|t| t.name.as_str())
            .collect();
        let extra: Vec<&str> = got
            .tensors
            .iter()
            .filter(|t| schema.index_of(&t.name).is_none())
            .map(|t| t.name.as_str())
            .collect();
        return Err(CoreError::SchemaMismatch(format!(
            "{} tensors instead of {} (missing {missing:?}, unexpected {extra:?})",
            layout.tensors.len(),
            schema.tensors.len()
        )));
    }
    layout
        .tensors
        .iter()
        .map(|entry| {
            let idx = schema.index_of(&entry.spec.name).ok_or_else(|| {
                CoreError::SchemaMismatch(format!("unexpected tensor `{}`", entry.spec.name))
            })?;
            let want = &schema.tensors[idx].shape;
            if *want != entry.spec.shape {
                return Err(CoreError::SchemaMismatch(format!(
                    "tensor `{}` has shape {:?}, the global model has {want:?}",
                    entry.spec.name, entry.spec.shape
                )));
            }
            Ok(idx)
        })
        .collect()
}

/// A [`TensorSink`] that validates an update as it streams past, keeping nothing but counters.
pub struct UpdateValidator<'a> {
    schema: &'a ModelSchema,
    names: Vec<String>,
    /// Sum of squared values, for reporting the update's L2 norm.
    pub sum_squares: f64,
}

impl<'a> UpdateValidator<'a> {
    /// A validator against the global model's schema.
    pub fn new(schema: &'a ModelSchema) -> Self {
        Self {
            schema,
            names: Vec::new(),
            sum_squares: 0.0,
        }
    }
}

impl TensorSink for UpdateValidator<'_> {
    fn header(&mut self, layout: &Layout) -> Result<(), CoreError> {
        match_layout(self.schema, layout)?;
        self.names = layout.tensors.iter().map(|t| t.spec.name.clone()).collect();
        Ok(())
    }

    fn values(&mut self, tensor: usize, offset: usize, values: &[f32]) -> Result<(), CoreError> {
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                return Err(CoreError::NonFinite {
                    tensor: self.names[tensor].clone(),
                    index: offset + i,
                });
            }
            self.sum_squares += f64::from(*v) * f64::from(*v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::{encode, StreamDecoder};
    use crate::{ModelParams, NamedTensor};

    fn model(name: &str, shape: Vec<usize>, data: Vec<f32>) -> ModelParams {
        ModelParams::new(vec![NamedTensor {
            name: name.into(),
            shape,
            data,
        }])
        .unwrap()
    }

    fn check(schema: &ModelSchema, update: &ModelParams) -> Result<(), CoreError> {
        let bytes = encode(update);
        let mut v = UpdateValidator::new(schema);
        let mut d = StreamDecoder::new(Some(bytes.len() as u64));
        d.push(&bytes, &mut v)?;
        d.finish()
    }

    #[test]
    fn accepts_matching_update() {
        let g = model("w", vec![2], vec![1.0, 2.0]);
        check(&g.schema(), &model("w", vec![2], vec![3.0, 4.0])).unwrap();
    }

    #[test]
    fn refuses_wrong_name_shape_and_nan() {
        let schema = model("w", vec![2], vec![1.0, 2.0]).schema();
        let err = check(&schema, &model("v", vec![2], vec![1.0, 2.0])).unwrap_err();
        assert!(err.to_string().contains("`v`"), "{err}");
        let err = check(&schema, &model("w", vec![1, 2], vec![1.0, 2.0])).unwrap_err();
        assert!(err.to_string().contains("shape [1, 2]"), "{err}");
        let err = check(&schema, &model("w", vec![2], vec![1.0, f32::NAN])).unwrap_err();
        assert_eq!(
            err,
            CoreError::NonFinite {
                tensor: "w".into(),
                index: 1
            }
        );
        let err = check(&schema, &model("w", vec![2], vec![f32::INFINITY, 0.0])).unwrap_err();
        assert!(matches!(err, CoreError::NonFinite { index: 0, .. }));
    }
}
