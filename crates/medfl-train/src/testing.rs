//! A tiny, randomly initialised BERT in Hugging Face layout (config, weights and a WordPiece
//! tokenizer of letters), for tests and benchmarks that must run without a downloaded model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::bert::{BertConfig, HiddenAct};
use crate::TrainError;

/// Special tokens, then `a`..`z`, then `##a`..`##z`, then `0`..`9`.
fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(('a'..='z').map(String::from));
    v.extend(('a'..='z').map(|c| format!("##{c}")));
    v.extend(('0'..='9').map(String::from));
    v
}

/// A 2-layer BERT of width 32 over the letter vocabulary.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        model_type: "bert".into(),
        vocab_size: vocabulary().len(),
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_act: HiddenAct::Gelu,
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: "absolute".into(),
    }
}

/// Deterministic pseudo-random values `offset + scale · sin(...)`.
pub fn filled(shape: &[usize], seed: f32, scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| offset + scale * ((i as f32 * 0.618_034 + seed) * 12.9898).sin())
        .collect();
    // The length matches the shape by construction.
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap_or_else(|e| panic!("a tensor of shape {shape:?}: {e}"))
}

/// Every tensor a transformers `BertModel` checkpoint of `c` holds (without the pooler);
/// layer-norm weights near 1, everything else small.
pub fn tiny_tensors(c: &BertConfig) -> HashMap<String, Tensor> {
    let mut shapes = c.embedding_tensors();
    for i in 0..c.num_hidden_layers {
        shapes.extend(c.layer_tensors(i));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let t = if name.contains("LayerNorm.weight") {
                filled(&shape, k as f32, 0.1, 1.0)
            } else {
                filled(&shape, k as f32, 0.3, 0.0)
            };
            (name, t)
        })
        .collect()
}

/// A BERT `tokenizer.json` (lower-casing, WordPiece) over the letter vocabulary.
pub fn tiny_tokenizer_json() -> serde_json::Value {
    let vocab = vocabulary();
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<_> = vocab[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids}
    })
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` of a tiny BERT to `dir`
/// (weights varied by `seed`) and returns the SHA-256 of the weights file.
pub fn write_tiny_bert(dir: &Path, seed: f32) -> Result<String, TrainError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = tiny_config();
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| TrainError::Task(format!("config: {e}")))?;
    std::fs::write(&path, text).map_err(io(&path))?;
    let mut tensors = tiny_tensors(&config);
    for t in tensors.values_mut() {
        *t = (&*t + f64::from(seed) * 1e-3)?;
    }
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tiny_tokenizer_json().to_string()).map_err(io(&path))?;
    Ok(crate::base::sha256_file(&weights)?)
}
