//! Files a researcher takes away: the adapter with its run spec in the safetensors metadata,
//! and the base with the adapter merged into its weights (same names, shapes and dtypes, so
//! PyTorch/transformers loads it unchanged).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use medfl_core::ModelParams;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::classifier::{HEAD_BIAS, HEAD_WEIGHT};
use crate::TrainError;

/// Adapter files need no candle: they live in [`medfl_model::adapter`].
pub use medfl_model::adapter::{adapter_bytes, read_adapter, SPEC_METADATA_KEY};

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`merge_into_base`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Base weights changed by a LoRA pair.
    pub lora_merged: usize,
    /// Base weights replaced by trained ones (`full` adaptation).
    pub replaced: usize,
    /// Adapter tensors with no place in the base (the classifier head), left out.
    pub left_out: Vec<String>,
}

/// Writes the base weights file at `base` to `out` with every LoRA pair of `adapter` merged as
/// `W + scale · B A` and every other base-named tensor of `adapter` in place of the base's, in
/// the base's dtype. Names, shapes, dtypes and metadata are the base's; the head is left out
/// (it has no place in an encoder checkpoint).
pub fn merge_into_base(
    base: &Path,
    adapter: &ModelParams,
    scale: f64,
    out: &Path,
) -> Result<Merged, TrainError> {
    let bytes = std::fs::read(base).map_err(io(base))?;
    let bad = |e: String| TrainError::Weights(format!("{}: {e}", base.display()));
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let find = |name: &str| -> Option<String> {
        [name.to_string(), format!("bert.{name}")]
            .into_iter()
            .find(|n| file.tensor(n).is_ok())
    };
    let adapter_tensor = |name: &str| -> Result<Tensor, TrainError> {
        let t = adapter
            .get(name)
            .ok_or_else(|| TrainError::Weights(format!("adapter has no tensor `{name}`")))?;
        Ok(Tensor::from_slice(
            &t.data,
            t.shape.as_slice(),
            &Device::Cpu,
        )?)
    };
    // New values of base tensors, in f32, by base name.
    let mut changed: HashMap<String, Tensor> = HashMap::new();
    let mut report = Merged::default();
    for t in &adapter.tensors {
        if let Some(prefix) = t.name.strip_suffix(".lora_A.weight") {
            let target = format!("{prefix}.weight");
            let name = find(&target)
                .ok_or_else(|| bad(format!("no tensor `{target}` to merge the adapter into")))?;
            let a = adapter_tensor(&t.name)?;
            let b = adapter_tensor(&format!("{prefix}.lora_B.weight"))?;
            let w = base_tensor(&file, &name)?;
            let delta = (b.matmul(&a)? * scale)?;
            if delta.dims() != w.dims() {
                return Err(bad(format!(
                    "adapter for `{name}` gives {:?}, the weight is {:?}",
                    delta.dims(),
                    w.dims()
                )));
            }
            changed.insert(name, (w + delta)?);
            report.lora_merged += 1;
        } else if t.name.ends_with(".lora_B.weight") {
            // Taken with its A.
        } else if t.name == HEAD_WEIGHT || t.name == HEAD_BIAS {
            report.left_out.push(t.name.clone());
        } else {
            let name =
                find(&t.name).ok_or_else(|| bad(format!("no tensor `{}` to replace", t.name)))?;
            let new = adapter_tensor(&t.name)?;
            let old = file.tensor(&name).map_err(|e| bad(e.to_string()))?;
            if new.dims() != old.shape() {
                return Err(bad(format!(
                    "trained `{name}` is {:?}, the base's is {:?}",
                    new.dims(),
                    old.shape()
                )));
            }
            changed.insert(name, new);
            report.replaced += 1;
        }
    }
    let mut raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let data = match changed.get(&name) {
            Some(t) => {
                to_bytes(t, view.dtype()).map_err(|e| bad(format!("tensor `{name}`: {e}")))?
            }
            None => view.data().to_vec(),
        };
        raw.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views = raw
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = out.with_extension("partial");
    safetensors::serialize_to_file(views, meta.metadata().clone(), &tmp)
        .map_err(|e| TrainError::Weights(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(report)
}

/// A float tensor of the base file, widened to f32.
fn base_tensor(file: &SafeTensors<'_>, name: &str) -> Result<Tensor, TrainError> {
    let view = file
        .tensor(name)
        .map_err(|e| TrainError::Weights(format!("tensor `{name}`: {e}")))?;
    let dtype = candle_dtype(view.dtype())
        .ok_or_else(|| TrainError::Weights(format!("tensor `{name}` is {:?}", view.dtype())))?;
    Ok(
        Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
            .to_dtype(DType::F32)?,
    )
}

fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

/// The little-endian bytes of `t` converted to `dtype`.
fn to_bytes(t: &Tensor, dtype: Dtype) -> Result<Vec<u8>, TrainError> {
    let target = candle_dtype(dtype)
        .ok_or_else(|| TrainError::Weights(format!("cannot write a {dtype:?} tensor")))?;
    let flat = t.to_dtype(target)?.flatten_all()?;
    Ok(match target {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => return Err(TrainError::Weights(format!("cannot write {other:?}"))),
    })
}
