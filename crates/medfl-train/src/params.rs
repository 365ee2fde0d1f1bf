//! Moving weights between [`ModelParams`] (what travels) and candle tensors (what trains).

use candle_core::{Device, Tensor, Var};
use medfl_core::{ModelParams, NamedTensor};

use crate::TrainError;

/// Trainable variables initialised from `params`, in the same (name) order.
pub fn to_vars(params: &ModelParams, device: &Device) -> Result<Vec<Var>, TrainError> {
    params
        .tensors
        .iter()
        .map(|t| {
            Ok(Var::from_tensor(&Tensor::from_slice(
                &t.data,
                t.shape.as_slice(),
                device,
            )?)?)
        })
        .collect()
}

/// Reads variables back into named tensors, with the names and shapes of `like`.
pub fn from_tensors(like: &ModelParams, tensors: &[&Tensor]) -> Result<ModelParams, TrainError> {
    if like.tensors.len() != tensors.len() {
        return Err(TrainError::Weights(format!(
            "{} tensors for {} names",
            tensors.len(),
            like.tensors.len()
        )));
    }
    let tensors = like
        .tensors
        .iter()
        .zip(tensors)
        .map(|(t, v)| {
            Ok(NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: v.flatten_all()?.to_vec1::<f32>()?,
            })
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    Ok(ModelParams::new(tensors)?)
}
