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

/// Reads a safetensors weights file into memory and builds something from its named tensors;
/// a [`TrainError::Weights`] from `build` names the file. The file is read rather than
/// memory-mapped: a mapping of a file that another process truncates kills the daemon with
/// SIGBUS, and the bytes parsed must be the bytes hashed against a run's pin. The read copy is
/// dropped once the tensors are built.
pub(crate) fn from_weights_file<T>(
    path: &std::path::Path,
    device: &Device,
    build: impl FnOnce(&std::collections::HashMap<String, Tensor>) -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let in_file = |message: String| TrainError::Weights(format!("{}: {message}", path.display()));
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| in_file(e.to_string()))?;
    drop(bytes);
    build(&tensors).map_err(|e| match e {
        TrainError::Weights(message) => in_file(message),
        other => other,
    })
}

/// Tensor `name` from a weights file, checked to have `shape` (`what` says where that shape
/// comes from, for the error), widened to f32 when stored in another float type, on `device`.
pub(crate) fn checked_f32(
    t: &Tensor,
    name: &str,
    shape: &[usize],
    what: &str,
    device: &Device,
) -> Result<Tensor, TrainError> {
    if t.dims() != shape {
        return Err(TrainError::Weights(format!(
            "tensor `{name}` has shape {:?}, {what} {shape:?}",
            t.dims()
        )));
    }
    let t = match t.dtype() {
        candle_core::DType::F32 => t.clone(),
        candle_core::DType::F16 | candle_core::DType::BF16 | candle_core::DType::F64 => {
            t.to_dtype(candle_core::DType::F32)?
        }
        other => {
            return Err(TrainError::Weights(format!(
                "tensor `{name}` is {other:?}, not a float type"
            )))
        }
    };
    Ok(t.to_device(device)?)
}
