//! A tiny BERT checkpoint written without candle, for this crate's tests.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::bert::{BertConfig, HiddenAct};

/// A 2-layer BERT of width 8.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        model_type: "bert".into(),
        vocab_size: 10,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        hidden_act: HiddenAct::Gelu,
        max_position_embeddings: 12,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: "absolute".into(),
    }
}

/// Every tensor the encoder of `c` reads, with values that use all of an f32's mantissa.
pub fn tiny_tensors(c: &BertConfig) -> HashMap<String, Vec<f32>> {
    c.encoder_tensors()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|i| ((i as f64 * 0.618_034 + k as f64) * 12.9898).sin() as f32 * 0.3)
                .collect();
            (name, data)
        })
        .collect()
}

/// How a test stores the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    F32,
    F16,
    Bf16,
    /// f64, every value divided by 3 (so that narrowing rounds).
    F64,
    /// f32, every name prefixed with `bert.`.
    Prefixed,
    /// i64: not a float type.
    I64,
}

/// Writes `tensors` (named as `c` names them) to `path`.
pub fn write_checkpoint(
    path: &Path,
    c: &BertConfig,
    tensors: &HashMap<String, Vec<f32>>,
    stored: Stored,
) {
    let shapes: HashMap<String, Vec<usize>> = c.encoder_tensors().into_iter().collect();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, data)| {
            let shape = shapes[name].clone();
            let bytes: Vec<u8> = match stored {
                Stored::F32 | Stored::Prefixed => {
                    data.iter().flat_map(|v| v.to_le_bytes()).collect()
                }
                Stored::F16 => data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Stored::Bf16 => data
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                Stored::F64 => data
                    .iter()
                    .flat_map(|v| (f64::from(*v) / 3.0).to_le_bytes())
                    .collect(),
                Stored::I64 => data
                    .iter()
                    .flat_map(|v| (*v as i64).to_le_bytes())
                    .collect(),
            };
            let name = match stored {
                Stored::Prefixed => format!("bert.{name}"),
                _ => name.clone(),
            };
            (name, shape, bytes)
        })
        .collect();
    let dtype = match stored {
        Stored::F32 | Stored::Prefixed => Dtype::F32,
        Stored::F16 => Dtype::F16,
        Stored::Bf16 => Dtype::BF16,
        Stored::F64 => Dtype::F64,
        Stored::I64 => Dtype::I64,
    };
    let views = encoded.iter().map(|(name, shape, bytes)| {
        (
            name.as_str(),
            TensorView::new(dtype, shape.clone(), bytes).unwrap(),
        )
    });
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes `config.json` and f32 `model.safetensors` of the tiny BERT to `dir`, every weight
/// shifted by `shift`; returns the SHA-256 of the weights.
pub fn write_base(dir: &Path, shift: f32) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let c = tiny_config();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&c).unwrap(),
    )
    .unwrap();
    let mut tensors = tiny_tensors(&c);
    for v in tensors.values_mut().flatten() {
        *v += shift;
    }
    let path = dir.join("model.safetensors");
    write_checkpoint(&path, &c, &tensors, Stored::F32);
    crate::base::sha256_file(&path).unwrap()
}
