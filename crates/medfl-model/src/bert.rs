//! A BERT encoder's `config.json`, and the names and shapes of the tensors of its checkpoint.
//!
//! ```no_run
//! # fn main() -> Result<(), medfl_model::ModelError> {
//! use medfl_model::bert::BertConfig;
//!
//! let config = BertConfig::from_file("all-MiniLM-L6-v2/config.json".as_ref())?;
//! let [out, inp] = config.projection_shape("intermediate.dense").unwrap_or_default();
//! assert_eq!((out, inp), (config.intermediate_size, config.hidden_size));
//! # Ok(()) }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Activation after the intermediate dense layer (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiddenAct {
    /// Exact GELU with erf, transformers' `"gelu"`.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    /// ReLU.
    #[serde(rename = "relu")]
    Relu,
}

/// The parts of a transformers `BertConfig` the encoder uses; other keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Must be `"bert"`.
    pub model_type: String,
    /// Rows of the word embedding table.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: HiddenAct,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) embedding table.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `"absolute"` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_hidden_act() -> HiddenAct {
    HiddenAct::Gelu
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// A config value the encoder cannot work with, and the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigFault {
    /// The key at fault.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Where each layer's projections live, relative to `encoder.layer.{i}`.
pub const PROJECTIONS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The projection a LoRA target names (`query`, `value`, `attention.output`, ...), relative to
/// `encoder.layer.{i}`.
pub fn lora_target_path(target: &str) -> Option<&'static str> {
    Some(match target {
        "query" => PROJECTIONS[0],
        "key" => PROJECTIONS[1],
        "value" => PROJECTIONS[2],
        "attention.output" => PROJECTIONS[3],
        "intermediate" => PROJECTIONS[4],
        "output" => PROJECTIONS[5],
        _ => return None,
    })
}

impl BertConfig {
    /// `[out, in]` of the projection at `path` (one of [`PROJECTIONS`]).
    pub fn projection_shape(&self, path: &str) -> Option<[usize; 2]> {
        let (h, m) = (self.hidden_size, self.intermediate_size);
        Some(match path {
            p if p == PROJECTIONS[4] => [m, h],
            p if p == PROJECTIONS[5] => [h, m],
            p if PROJECTIONS.contains(&p) => [h, h],
            _ => return None,
        })
    }

    /// Names and shapes of every tensor of layer `i`, in checkpoint naming.
    pub fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let mut out = Vec::new();
        for path in PROJECTIONS {
            let [o, inp] = self.projection_shape(path).unwrap_or([h, h]);
            out.push((format!("encoder.layer.{i}.{path}.weight"), vec![o, inp]));
            out.push((format!("encoder.layer.{i}.{path}.bias"), vec![o]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            for part in ["weight", "bias"] {
                out.push((format!("encoder.layer.{i}.{norm}.{part}"), vec![h]));
            }
        }
        out
    }

    /// Names and shapes of the embedding tensors, in checkpoint naming.
    pub fn embedding_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ]
    }

    /// Names and shapes of every tensor the encoder reads: the embeddings, then each layer's.
    pub fn encoder_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = self.embedding_tensors();
        for i in 0..self.num_hidden_layers {
            out.extend(self.layer_tensors(i));
        }
        out
    }

    /// Reads and checks a `config.json`; errors name the file and the offending key's line.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            line: e.line() as u64,
            message: e.to_string(),
        })?;
        config.check().map_err(|fault| ModelError::Config {
            path: path.to_path_buf(),
            line: line_of(&text, fault.key),
            message: fault.message,
        })?;
        Ok(config)
    }

    /// Checks that the encoder can be built from this config.
    pub fn check(&self) -> Result<(), ConfigFault> {
        let fault = |key: &'static str, message: String| Err(ConfigFault { key, message });
        if self.model_type != "bert" {
            return fault(
                "model_type",
                format!(
                    "model_type is {:?}; this encoder loads \"bert\"",
                    self.model_type
                ),
            );
        }
        if self.position_embedding_type != "absolute" {
            return fault(
                "position_embedding_type",
                format!(
                    "position_embedding_type {:?} is not supported (only \"absolute\")",
                    self.position_embedding_type
                ),
            );
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((key, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return fault(key, format!("{key} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fault(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        Ok(())
    }
}

/// 1-based line of the first `"key"` in a JSON text (1 when absent).
fn line_of(text: &str, key: &str) -> u64 {
    let quoted = format!("\"{key}\"");
    text.lines()
        .position(|l| l.contains(&quoted))
        .map_or(1, |i| i as u64 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_errors_name_the_key_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let text = "{\n  \"model_type\": \"bert\",\n  \"vocab_size\": 10,\n  \"hidden_size\": 8,\n  \"num_hidden_layers\": 1,\n  \"num_attention_heads\": 3,\n  \"intermediate_size\": 16,\n  \"max_position_embeddings\": 4\n}";
        std::fs::write(&path, text).unwrap();
        let err = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json:6:") && err.contains("divisible"),
            "{err}"
        );
        std::fs::write(&path, text.replace("\": 3", "\": 2")).unwrap();
        let config = BertConfig::from_file(&path).unwrap();
        assert_eq!(config.hidden_act, HiddenAct::Gelu);
        assert_eq!((config.type_vocab_size, config.layer_norm_eps), (2, 1e-12));
        std::fs::write(&path, text.replace("\"bert\"", "\"roberta\"")).unwrap();
        let err = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json:2:") && err.contains("roberta"),
            "{err}"
        );
        std::fs::write(&path, "{\"model_type\": \"bert\",\n\"vocab_size\": }").unwrap();
        assert!(matches!(
            BertConfig::from_file(&path),
            Err(ModelError::Config { line: 2, .. })
        ));
        let missing = dir.path().join("absent.json");
        assert!(matches!(
            BertConfig::from_file(&missing),
            Err(ModelError::Io { .. })
        ));
    }

    #[test]
    fn shapes_follow_the_config() {
        let text = "{\"model_type\": \"bert\", \"vocab_size\": 10, \"hidden_size\": 8, \
                    \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \
                    \"intermediate_size\": 16, \"max_position_embeddings\": 4}";
        let c: BertConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.projection_shape("output.dense"), Some([8, 16]));
        assert_eq!(c.projection_shape("attention.self.key"), Some([8, 8]));
        assert_eq!(c.projection_shape("pooler.dense"), None);
        assert_eq!(lora_target_path("intermediate"), Some("intermediate.dense"));
        assert_eq!(lora_target_path("dense"), None);
        let all = c.encoder_tensors();
        assert_eq!(all.len(), 5 + 2 * 16);
        assert_eq!(
            all[5],
            (
                "encoder.layer.0.attention.self.query.weight".into(),
                vec![8, 8]
            )
        );
    }
}
