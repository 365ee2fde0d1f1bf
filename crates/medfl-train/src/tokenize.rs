//! Text to token ids with a Hugging Face `tokenizer.json`, padded and truncated per batch.
//!
//! ```no_run
//! # fn main() -> Result<(), medfl_train::TrainError> {
//! use medfl_train::tokenize::TextTokenizer;
//! let tokenizer = TextTokenizer::from_file("all-MiniLM-L6-v2/tokenizer.json")?;
//! let batch = tokenizer.encode_batch(&["Acute myocardial infarction", "a"], 128)?;
//! assert_eq!(batch.input_ids[1][..3], [101, 1037, 102]); // then padding ids (0)
//! assert_eq!(batch.attention_mask[1].iter().sum::<u32>(), 3);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{Encoding, PostProcessor as _, Tokenizer, TruncationDirection};

use crate::TrainError;

/// A tokenizer loaded from a `tokenizer.json`, with its own padding and truncation turned off:
/// [`TextTokenizer::encode_batch`] pads and truncates per call instead.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    pad_id: u32,
    pad_type_id: u32,
    truncation_direction: TruncationDirection,
}

/// Token rows of one batch, right-padded to its longest row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, one row per text.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// Segment ids (all 0 for single texts).
    pub token_type_ids: Vec<Vec<u32>>,
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Length of every row (the longest text's token count).
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// `input_ids` as a `[batch, seq]` u32 tensor.
    pub fn input_ids_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        rows_tensor(&self.input_ids, device)
    }

    /// `attention_mask` as a `[batch, seq]` u32 tensor.
    pub fn attention_mask_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        rows_tensor(&self.attention_mask, device)
    }

    /// `token_type_ids` as a `[batch, seq]` u32 tensor.
    pub fn token_type_ids_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        rows_tensor(&self.token_type_ids, device)
    }
}

fn rows_tensor(rows: &[Vec<u32>], device: &Device) -> candle_core::Result<Tensor> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.concat();
    Tensor::from_vec(flat, (rows.len(), width), device)
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`. Its padding id and truncation direction are kept; its own padding
    /// and truncation are switched off.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| {
            TrainError::Task(format!("{}: not a usable tokenizer: {e}", path.display()))
        })?;
        let (pad_id, pad_type_id) = inner
            .get_padding()
            .map_or((0, 0), |p| (p.pad_id, p.pad_type_id));
        let truncation_direction = inner
            .get_truncation()
            .map_or(TruncationDirection::Right, |t| t.direction);
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| {
            TrainError::Task(format!(
                "{}: cannot disable truncation: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            pad_id,
            pad_type_id,
            truncation_direction,
        })
    }

    /// The id of a token in the vocabulary, if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes each text with its special tokens, truncates it to `max_len` tokens the way the
    /// tokenizer's own truncation would (the text is cut, `[CLS]`/`[SEP]` stay), and right-pads
    /// every row to the longest one.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<Batch, TrainError> {
        let special = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_len <= special {
            return Err(TrainError::Task(format!(
                "max_len {max_len} leaves no room for text beside {special} special tokens"
            )));
        }
        let encodings = texts
            .iter()
            .enumerate()
            .map(|(i, text)| self.encode_one(i, text, max_len - special))
            .collect::<Result<Vec<_>, _>>()?;
        let width = encodings.iter().map(Encoding::len).max().unwrap_or(0);
        let pad = |values: &[u32], fill: u32| {
            let mut row = values.to_vec();
            row.resize(width, fill);
            row
        };
        let mut batch = Batch::default();
        for e in &encodings {
            batch.input_ids.push(pad(e.get_ids(), self.pad_id));
            batch.attention_mask.push(pad(e.get_attention_mask(), 0));
            batch
                .token_type_ids
                .push(pad(e.get_type_ids(), self.pad_type_id));
        }
        Ok(batch)
    }

    /// Text `index` of a batch: tokens, cut to `text_len`, then the special tokens.
    fn encode_one(
        &self,
        index: usize,
        text: &str,
        text_len: usize,
    ) -> Result<Encoding, TrainError> {
        let fail = |e: tokenizers::Error| {
            TrainError::Task(format!(
                "{}: encoding text {index}: {e}",
                self.path.display()
            ))
        };
        let mut encoding = self.inner.encode(text, false).map_err(fail)?;
        if encoding.len() > text_len {
            encoding.truncate(text_len, 0, self.truncation_direction);
        }
        self.inner.post_process(encoding, None, true).map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WordPiece tokenizer shaped like BERT's, whose own truncation (4) and padding (fixed 8)
    /// must be ignored.
    const TINY: &str = r###"{
      "version": "1.0",
      "truncation": {"max_length": 4, "strategy": "LongestFirst", "stride": 0},
      "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [
        {"id": 0, "special": true, "content": "[PAD]", "single_word": false, "lstrip": false,
         "rstrip": false, "normalized": false},
        {"id": 2, "special": true, "content": "[CLS]", "single_word": false, "lstrip": false,
         "rstrip": false, "normalized": false},
        {"id": 3, "special": true, "content": "[SEP]", "single_word": false, "lstrip": false,
         "rstrip": false, "normalized": false}
      ],
      "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                     "strip_accents": null, "lowercase": true},
      "pre_tokenizer": {"type": "BertPreTokenizer"},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
      "decoder": null,
      "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100,
                "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "acute": 4, "my": 5,
                          "##oca": 6, "##rdial": 7, "in": 8, "##far": 9, "##ction": 10, ",": 11}}
    }"###;

    fn tiny() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, TINY).unwrap();
        TextTokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn pads_to_the_longest_row_and_ignores_the_files_own_settings() {
        let batch = tiny()
            .encode_batch(&["Acute myocardial", "in, zzz"], 64)
            .unwrap();
        assert_eq!(batch.input_ids[0], [2, 4, 5, 6, 7, 3]);
        assert_eq!(batch.input_ids[1], [2, 8, 11, 1, 3, 0]);
        assert_eq!(batch.attention_mask[1], [1, 1, 1, 1, 1, 0]);
        assert_eq!(batch.token_type_ids[1], [0; 6]);
        assert_eq!((batch.len(), batch.seq_len()), (2, 6));
    }

    #[test]
    fn truncation_cuts_the_text_and_keeps_sep() {
        let t = tiny();
        let batch = t
            .encode_batch(&["acute myocardial infarction", "my"], 5)
            .unwrap();
        assert_eq!(batch.input_ids, [vec![2, 4, 5, 6, 3], vec![2, 5, 3, 0, 0]]);
        assert!(t.encode_batch(&["my"], 2).is_err());
        assert!(t.encode_batch(&[], 8).unwrap().is_empty());
    }

    #[test]
    fn missing_file_is_named() {
        let err = TextTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn rows_tensor_has_batch_by_seq_shape() {
        let t = rows_tensor(&[vec![1, 2, 3], vec![4, 0, 0]], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.to_vec2::<u32>().unwrap()[1], [4, 0, 0]);
    }
}
