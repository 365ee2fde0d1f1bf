//! A BERT encoder (e.g. all-MiniLM-L6-v2) loaded from `config.json` and `model.safetensors`.
//!
//! Every dense layer is a [`Projection`], so an adapter (LoRA) can wrap any of them. Gradients
//! flow through the whole encoder to such adapters: on the CPU the dense layers, attention, layer
//! norms and GELU are fused kernels with hand-derived backward passes ([`crate::ops`]), elsewhere
//! differentiable candle ops (candle's own fused softmax / layer norm have no backward pass).
//! The config and the checkpoint's tensor names and shapes are [`medfl_model::bert`]'s.
//!
//! ```no_run
//! # fn main() -> Result<(), medfl_train::TrainError> {
//! use std::path::Path;
//! use candle_core::Device;
//! use medfl_train::bert::{l2_normalize, mean_pool, BertModel};
//! use medfl_train::tokenize::TextTokenizer;
//!
//! let dir = Path::new("all-MiniLM-L6-v2");
//! let model = BertModel::load(dir, &Device::Cpu)?;
//! let batch = TextTokenizer::from_file(dir.join("tokenizer.json"))?
//!     .encode_batch(&["Acute myocardial infarction"], 128)?;
//! let mask = batch.attention_mask_tensor(&Device::Cpu)?;
//! let hidden = model.forward(&batch.input_ids_tensor(&Device::Cpu)?, &mask)?;
//! let embedding = l2_normalize(&mean_pool(&hidden, &mask)?)?; // [1, 384]
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, D};
use medfl_core::selection::SplitMix64;

use crate::{ops, TrainError};

pub use medfl_model::bert::{lora_target_path, BertConfig, HiddenAct, PROJECTIONS};

/// A dense layer `y = x Wᵀ + b` on the last dimension, with `W` of shape `[out, in]` as in
/// PyTorch's `nn.Linear`. All of the encoder's dense layers are of this type, and any of them
/// can carry a [`LoraAdapter`].
#[derive(Debug, Clone)]
pub struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<LoraAdapter>,
}

/// A low-rank adapter (Hu et al. 2021) on a projection: the layer computes
/// `x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ`, with `A` of shape `[rank, in]` and `B` `[out, rank]`,
/// as PEFT's `lora_A` / `lora_B`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: Option<Arc<Dropout>>,
    per_example: Option<ops::PerExampleGrads>,
}

impl LoraAdapter {
    /// An adapter of `A` and `B` scaled by `scale` (`alpha / rank`), without dropout.
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout: None,
            per_example: None,
        }
    }

    /// The same adapter leaving each example's gradient of `A` and `B` in `collector` on every
    /// backward pass, for DP-SGD ([`ops::PerExampleGrads`]).
    pub fn with_per_example(mut self, collector: ops::PerExampleGrads) -> Self {
        self.per_example = Some(collector);
        self
    }

    /// The same adapter dropping its input with probability `p` (when above 0), with masks drawn
    /// from `seed`, so a retried round trains identically.
    pub fn with_dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = (p > 0.0).then(|| {
            Arc::new(Dropout {
                p,
                rng: Mutex::new(SplitMix64::new(seed)),
            })
        });
        self
    }

    /// `scale · B A`, the adapter's change to the `[out, in]` weight.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// Seeded inverted dropout: zeroes each value with probability `p`, scales the rest by
/// `1 / (1 - p)`.
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: Mutex<SplitMix64>,
}

impl Dropout {
    /// A fresh mask shaped like `x`: 0 for dropped values, `1 / (1 - p)` for kept ones.
    fn mask(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = {
            let mut rng = match self.rng.lock() {
                Ok(rng) => rng,
                Err(poisoned) => poisoned.into_inner(),
            };
            (0..x.elem_count())
                .map(|_| {
                    if (rng.next_f64() as f32) < self.p {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect()
        };
        Tensor::from_vec(mask, x.shape(), x.device())
    }
}

impl Projection {
    /// A projection from a `[out, in]` weight and an optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out, _) = weight.dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                candle_core::bail!("bias of shape {:?} for {out} outputs", b.dims());
            }
        }
        Ok(Self {
            weight,
            bias,
            adapter: None,
        })
    }

    /// Attaches (or with `None` removes) a low-rank adapter; its shapes must fit the weight.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<(), TrainError> {
        if let Some(l) = &adapter {
            let (rank, inp) = l.a.dims2()?;
            let (out, rank_b) = l.b.dims2()?;
            if inp != self.in_features() || out != self.out_features() || rank != rank_b {
                return Err(TrainError::Weights(format!(
                    "adapter A {:?} and B {:?} do not fit a [{}, {}] weight",
                    l.a.dims(),
                    l.b.dims(),
                    self.out_features(),
                    self.in_features()
                )));
            }
        }
        self.adapter = adapter;
        Ok(())
    }

    /// The adapter, if one is attached.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Width of the input.
    pub fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    /// Width of the output.
    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// Errors unless the last dimension of `x` is the input width.
    fn check_input(&self, x: &Tensor) -> candle_core::Result<()> {
        let Some(&width) = x.dims().last() else {
            candle_core::bail!("projection of a scalar");
        };
        if width != self.in_features() {
            candle_core::bail!(
                "input of width {width} for a projection from {}",
                self.in_features()
            );
        }
        Ok(())
    }

    /// The projection of `gelu(x)` (exact GELU). Without an adapter the activation is fused
    /// into the product ([`ops::gelu_dense`]), so training does not keep it: it is the widest
    /// tensor of a layer.
    fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.adapter.is_some() {
            return self.forward(&ops::gelu_erf(x)?);
        }
        self.check_input(x)?;
        ops::gelu_dense(x, &self.weight, self.bias.as_ref())
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.check_input(x)?;
        let keep = match self.adapter.as_ref().and_then(|l| l.dropout.as_ref()) {
            Some(d) => Some(d.mask(x)?),
            None => None,
        };
        let low_rank = self.adapter.as_ref().map(|l| ops::LowRank {
            a: &l.a,
            b: &l.b,
            scale: l.scale,
            keep: keep.as_ref(),
            per_example: l.per_example.as_ref(),
        });
        ops::dense(x, &self.weight, self.bias.as_ref(), low_rank)
    }
}

/// Layer normalisation over the last dimension ([`ops::layer_norm`]).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// The norm of `x + residual`, the residual connection of each encoder block.
    fn forward_sum(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, Some(residual), &self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, None, &self.weight, &self.bias, self.eps)
    }
}

/// Named tensors, looked up with or without a `bert.` prefix and checked against the config.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, TrainError> {
        let t = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
            .ok_or_else(|| TrainError::Weights(format!("missing tensor `{name}`")))?;
        crate::params::checked_f32(t, name, shape, "the config implies", self.device)
    }

    fn norm(&self, prefix: &str, width: usize, eps: f64) -> Result<LayerNorm, TrainError> {
        Ok(LayerNorm {
            weight: self.get(&format!("{prefix}.weight"), &[width])?,
            bias: self.get(&format!("{prefix}.bias"), &[width])?,
            eps,
        })
    }

    fn projection(&self, prefix: &str, out: usize, inp: usize) -> Result<Projection, TrainError> {
        Ok(Projection {
            weight: self.get(&format!("{prefix}.weight"), &[out, inp])?,
            bias: Some(self.get(&format!("{prefix}.bias"), &[out])?),
            adapter: None,
        })
    }
}

/// Word + position + token-type embeddings, then a layer norm.
#[derive(Debug, Clone)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn forward(&self, ids: &Tensor, types: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let width = self.word.dim(1)?;
        let lookup = |table: &Tensor, ids: &Tensor| {
            table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((batch, seq, width))
        };
        let types = match types {
            Some(t) => lookup(&self.token_type, t)?,
            None => self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?,
        };
        let positions = self.position.narrow(0, 0, seq)?.unsqueeze(0)?;
        let x = lookup(&self.word, ids)?
            .broadcast_add(&types)?
            .broadcast_add(&positions)?;
        self.norm.forward(&x)
    }
}

/// One encoder layer: self-attention and a feed-forward block, each with residual + layer norm.
#[derive(Debug, Clone)]
struct EncoderLayer {
    query: Projection,
    key: Projection,
    value: Projection,
    attention_out: Projection,
    attention_norm: LayerNorm,
    intermediate: Projection,
    output: Projection,
    output_norm: LayerNorm,
    heads: usize,
    act: HiddenAct,
}

impl EncoderLayer {
    fn load(w: &Weights<'_>, c: &BertConfig, index: usize) -> Result<Self, TrainError> {
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let p = |suffix: &str| format!("encoder.layer.{index}.{suffix}");
        Ok(Self {
            query: w.projection(&p(PROJECTIONS[0]), h, h)?,
            key: w.projection(&p(PROJECTIONS[1]), h, h)?,
            value: w.projection(&p(PROJECTIONS[2]), h, h)?,
            attention_out: w.projection(&p(PROJECTIONS[3]), h, h)?,
            attention_norm: w.norm(&p("attention.output.LayerNorm"), h, c.layer_norm_eps)?,
            intermediate: w.projection(&p(PROJECTIONS[4]), m, h)?,
            output: w.projection(&p(PROJECTIONS[5]), h, m)?,
            output_norm: w.norm(&p("output.LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// The projections in [`PROJECTIONS`] order.
    fn projections_mut(&mut self) -> [&mut Projection; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_out,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    /// `x` is `[batch, seq, hidden]`; `key_bias` is `[batch, 1, 1, seq]`, added to the scores.
    fn forward(&self, x: &Tensor, key_bias: &Tensor) -> candle_core::Result<Tensor> {
        let context = ops::attention(
            &self.query.forward(x)?,
            &self.key.forward(x)?,
            &self.value.forward(x)?,
            key_bias,
            self.heads,
        )?;
        let attended = self
            .attention_norm
            .forward_sum(&self.attention_out.forward(&context)?, x)?;
        let inner = self.intermediate.forward(&attended)?;
        let output = match self.act {
            HiddenAct::Gelu => self.output.forward_gelu(&inner)?,
            HiddenAct::GeluTanh => self.output.forward(&inner.gelu()?)?,
            HiddenAct::Relu => self.output.forward(&inner.relu()?)?,
        };
        self.output_norm.forward_sum(&output, &attended)
    }
}

/// A BERT encoder without the pooler head, in f32.
#[derive(Debug, Clone)]
pub struct BertModel {
    config: BertConfig,
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    device: Device,
}

impl BertModel {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    ///
    /// The weights file is read, not memory-mapped (see `BaseModel::weights` for why the bytes
    /// parsed must be the bytes hashed). Half-precision weights are widened to f32; tensors the
    /// encoder does not use (the pooler, `position_ids`) are ignored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        crate::params::from_weights_file(&dir.join("model.safetensors"), device, |tensors| {
            Self::from_tensors(config, tensors, device)
        })
    }

    /// Builds the encoder from named tensors as a transformers checkpoint names them
    /// (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, …,
    /// optionally prefixed with `bert.`). Tensors are copied to `device` when elsewhere.
    pub fn from_tensors(
        config: BertConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        config
            .check()
            .map_err(|fault| TrainError::Task(format!("BERT config: {fault}")))?;
        let w = Weights { tensors, device };
        let h = config.hidden_size;
        let embeddings = Embeddings {
            word: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            norm: w.norm("embeddings.LayerNorm", h, config.layer_norm_eps)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w, &config, i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            embeddings,
            layers,
            device: device.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every dense layer with its checkpoint name (`encoder.layer.{i}.attention.self.query`, …),
    /// six per layer, in layer order: the places an adapter can be attached.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        self.layers
            .iter_mut()
            .enumerate()
            .flat_map(|(i, layer)| {
                PROJECTIONS
                    .iter()
                    .zip(layer.projections_mut())
                    .map(move |(suffix, p)| (format!("encoder.layer.{i}.{suffix}"), p))
            })
            .collect()
    }

    /// Last hidden states `[batch, seq, hidden]` for `[batch, seq]` token ids, with all token
    /// types 0. `attention_mask` is 1 for real tokens and 0 for padding (any numeric dtype);
    /// padded keys get no attention, so real positions do not depend on the padding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, TrainError> {
        self.forward_with_token_types(input_ids, None, attention_mask)
    }

    /// [`BertModel::forward`] with explicit `[batch, seq]` token-type (segment) ids.
    pub fn forward_with_token_types(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let (batch, seq) = input_ids.dims2()?;
        let others = [
            Some(("attention mask", attention_mask)),
            token_type_ids.map(|t| ("token type ids", t)),
        ];
        for (what, t) in others.into_iter().flatten() {
            if t.dims() != [batch, seq] {
                return Err(TrainError::Task(format!(
                    "{what} of shape {:?} for input ids of shape [{batch}, {seq}]",
                    t.dims()
                )));
            }
        }
        if seq > self.config.max_position_embeddings {
            return Err(TrainError::Task(format!(
                "{seq} tokens exceed the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let mut x = self.embeddings.forward(input_ids, token_type_ids)?;
        let key_bias = key_bias(attention_mask)?;
        for layer in &self.layers {
            x = layer.forward(&x, &key_bias)?;
        }
        Ok(x)
    }
}

/// `[batch, seq]` mask of 1/0 to `[batch, 1, 1, seq]` scores bias: 0 to keep, `f32::MIN` to drop
/// (as transformers' `finfo.min`; finite, so a row with no real token gives no NaN).
fn key_bias(mask: &Tensor) -> candle_core::Result<Tensor> {
    let (batch, seq) = mask.dims2()?;
    let big = f64::from(f32::MAX);
    mask.to_dtype(DType::F32)?
        .affine(big, -big)?
        .reshape((batch, 1, 1, seq))
}

/// Mean of `[batch, seq, hidden]` states over the positions where the `[batch, seq]` mask is 1
/// (sentence-transformers' mean pooling; the count is clamped to 1e-9). Gives `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
    sum.broadcast_div(&mask.sum(1)?.maximum(1e-9)?)
}

/// The `[batch, hidden]` states at the first position (`[CLS]`).
pub fn cls_pool(hidden: &Tensor) -> candle_core::Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)
}

/// Each vector along the last dimension divided by its L2 norm (at least 1e-12), as
/// `torch.nn.functional.normalize`.
pub fn l2_normalize(t: &Tensor) -> candle_core::Result<Tensor> {
    let norm = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    t.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn a_frozen_projection_passes_the_same_gradient_to_its_input() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let x = candle_core::Var::new(&[[0.5f32, -1.], [2., 0.25]], &dev).unwrap();
        let y = Projection::new(w.clone(), None)
            .unwrap()
            .forward(x.as_tensor())
            .unwrap();
        let direct = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(close(&flat(&y), &flat(&direct)));
        let grad = |t: &Tensor| {
            let g = t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            flat(g.get(&x).unwrap())
        };
        assert!(close(&grad(&y), &grad(&direct)));
    }

    #[test]
    fn projection_is_x_times_w_transposed_plus_b() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let b = Tensor::new(&[0.5f32, 0., -1.], &dev).unwrap();
        let p = Projection::new(w, Some(b)).unwrap();
        assert_eq!((p.in_features(), p.out_features()), (2, 3));
        let x = Tensor::new(&[[[1f32, 1.]], [[0., 2.]]], &dev).unwrap(); // [2, 1, 2]
        let y = p.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 1, 3]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(close(&y, &[3.5, 7., 10., 4.5, 8., 11.]), "{y:?}");
        let bad = Tensor::new(&[1f32], &dev).unwrap();
        assert!(Projection::new(p.weight().clone(), Some(bad)).is_err());
    }

    #[test]
    fn layer_norm_matches_hand_computation() {
        let dev = Device::Cpu;
        let norm = LayerNorm {
            weight: Tensor::new(&[1f32, 2., 1.], &dev).unwrap(),
            bias: Tensor::new(&[0f32, 0., 1.], &dev).unwrap(),
            eps: 0.0,
        };
        let x = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let y = norm.forward(&x).unwrap().flatten_all().unwrap();
        let s = (2.0f32 / 3.0).sqrt();
        assert!(close(&y.to_vec1().unwrap(), &[-1. / s, 0., 1. + 1. / s]));
    }

    #[test]
    fn pooling_ignores_masked_positions_and_normalises() {
        let dev = Device::Cpu;
        let hidden = Tensor::new(&[[[1f32, 0.], [3., 4.], [100., 100.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0]], &dev).unwrap();
        let mean = mean_pool(&hidden, &mask).unwrap();
        assert!(close(
            &mean.flatten_all().unwrap().to_vec1().unwrap(),
            &[2., 2.]
        ));
        let unit = l2_normalize(&mean).unwrap().flatten_all().unwrap();
        let h = 0.5f32.sqrt();
        assert!(close(&unit.to_vec1().unwrap(), &[h, h]));
        let cls = cls_pool(&hidden).unwrap().flatten_all().unwrap();
        assert!(close(&cls.to_vec1().unwrap(), &[1., 0.]));
        let none = Tensor::new(&[[0u32, 0, 0]], &dev).unwrap();
        let zero = mean_pool(&hidden, &none).unwrap().flatten_all().unwrap();
        assert!(close(&zero.to_vec1().unwrap(), &[0., 0.]));
    }

    #[test]
    fn key_bias_keeps_real_tokens_and_drops_padding() {
        let mask = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        let bias = key_bias(&mask).unwrap();
        assert_eq!(bias.dims(), &[1, 1, 1, 2]);
        assert_eq!(
            bias.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., f32::MIN]
        );
    }
}
