//! A text classifier on a frozen pre-trained encoder: LoRA adapters, the top layers or only a
//! linear head train, and only those tensors travel.
//!
//! Trainable tensors are named as the base checkpoint names its weights, so they can be merged
//! back into it: `encoder.layer.{i}.attention.self.query.lora_A.weight` (`[rank, in]`) and
//! `...lora_B.weight` (`[out, rank]`) for LoRA, the base's own names for `full`, and
//! `classifier.weight` (`[classes, hidden]`) and `classifier.bias` for the head.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var, D};
use medfl_core::metrics;
use medfl_core::spec::{Adaptation, EncoderSpec, Pooling};
use medfl_core::{ModelParams, ModelSchema};
use medfl_model::EncoderClassifier;

use crate::base::{BaseModel, Weights};
use crate::bert::{cls_pool, mean_pool, BertModel, LoraAdapter};
use crate::fit::fit;
use crate::model::{Data, EvalReport, LocalModel, TrainOptions, TrainProgress, TrainReport};
use crate::ops::PerExampleGrads;
use crate::params::{from_tensors, to_vars};
use crate::private::{
    self, clip_examples, clipped_by_example, dense_stack_clipped, ClippedBatch, ExampleGrads,
};
use crate::text_data::TextExamples;
use crate::TrainError;

/// Texts encoded at once when no gradient is needed.
const EVAL_BATCH: usize = 64;

pub use medfl_model::classifier::{HEAD_BIAS, HEAD_WEIGHT};

/// A classifier of `n_classes` on a base encoder, adapted as an [`EncoderSpec`] says: the
/// tensors of [`EncoderClassifier`], trained on candle.
#[derive(Debug, Clone)]
pub struct TextClassifier {
    base: Arc<BaseModel>,
    model: EncoderClassifier,
}

/// The encoder with this round's trainable tensors in place, and the head.
struct Assembled {
    encoder: BertModel,
    head_weight: Tensor,
    head_bias: Tensor,
}

impl TextClassifier {
    /// A classifier on `base`; fails if the spec's adaptation does not fit the architecture.
    pub fn new(
        base: Arc<BaseModel>,
        spec: EncoderSpec,
        n_classes: usize,
    ) -> Result<Self, TrainError> {
        let model = EncoderClassifier::new(base.model().clone(), spec, n_classes)?;
        Ok(Self::on(base, model))
    }

    /// The classifier `model` describes, trained on `base` (the same model with its weights
    /// and tokenizer).
    pub(crate) fn on(base: Arc<BaseModel>, model: EncoderClassifier) -> Self {
        Self { base, model }
    }

    /// The base model.
    pub fn base(&self) -> &Arc<BaseModel> {
        &self.base
    }

    /// `alpha / rank` for LoRA, else 0.
    pub fn lora_scale(&self) -> f64 {
        self.model.lora_scale()
    }

    /// Builds the encoder with `tensors` (named as the schema) in place of or beside the base's.
    fn assemble(
        &self,
        weights: &Weights,
        tensors: &HashMap<&str, Tensor>,
        dropout_seed: Option<u64>,
        per_example: Option<&PerExampleGrads>,
    ) -> Result<Assembled, TrainError> {
        let get = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| TrainError::Weights(format!("missing tensor `{name}`")))
        };
        let mut encoder = match self.model.spec().adaptation {
            Adaptation::Full { .. } => {
                let mut all = weights.tensors.clone();
                for (name, t) in tensors {
                    all.insert((*name).to_string(), t.clone());
                    // A checkpoint that prefixes its names with `bert.` wins the lookup.
                    all.remove(&format!("bert.{name}"));
                }
                BertModel::from_tensors(self.base.config.clone(), &all, &Device::Cpu)?
            }
            _ => weights.encoder.clone(),
        };
        if let Adaptation::Lora { dropout, .. } = self.model.spec().adaptation {
            let scale = self.lora_scale();
            let wanted = self.model.lora_projections();
            for (index, (name, projection)) in encoder
                .projections_mut()
                .into_iter()
                .filter(|(name, _)| wanted.contains(name))
                .enumerate()
            {
                let mut adapter = LoraAdapter::new(
                    get(&format!("{name}.lora_A.weight"))?,
                    get(&format!("{name}.lora_B.weight"))?,
                    scale,
                );
                if let Some(seed) = dropout_seed {
                    adapter = adapter.with_dropout(dropout as f32, seed ^ (index as u64) << 32);
                }
                if let Some(collector) = per_example {
                    adapter = adapter.with_per_example(collector.clone());
                }
                projection.set_adapter(Some(adapter))?;
            }
        }
        Ok(Assembled {
            encoder,
            head_weight: get(HEAD_WEIGHT)?,
            head_bias: get(HEAD_BIAS)?,
        })
    }

    /// Pooled `[batch, hidden]` encodings of `texts`.
    fn encode(&self, encoder: &BertModel, texts: &[&str]) -> Result<Tensor, TrainError> {
        let tokenizer = self.base.tokenizer()?;
        let batch = tokenizer.encode_batch(texts, self.model.spec().max_seq_len as usize)?;
        let device = encoder.device();
        let mask = batch.attention_mask_tensor(device)?;
        let ids = batch.input_ids_tensor(device)?;
        let types = batch.token_type_ids_tensor(device)?;
        let hidden = encoder.forward_with_token_types(&ids, Some(&types), &mask)?;
        Ok(match self.model.spec().pooling {
            Pooling::Mean => mean_pool(&hidden, &mask)?,
            Pooling::Cls => cls_pool(&hidden)?,
        })
    }

    fn head(a: &Assembled, pooled: &Tensor) -> candle_core::Result<Tensor> {
        pooled
            .matmul(&a.head_weight.t()?)?
            .broadcast_add(&a.head_bias)
    }

    /// Class scores `[n, classes]` of `texts` under `params`, encoded in batches from the
    /// shortest text up (less padding), returned in the order given.
    pub fn logits(&self, params: &ModelParams, texts: &[&str]) -> Result<Tensor, TrainError> {
        self.check(params)?;
        let weights = self.base.weights()?;
        let tensors = named_tensors(params)?;
        let a = self.assemble(&weights, &tensors, None, None)?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut parts = Vec::new();
        for chunk in order.chunks(EVAL_BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            parts.push(Self::head(&a, &self.encode(&a.encoder, &batch)?)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.model.n_classes()),
                candle_core::DType::F32,
                &Device::Cpu,
            )?);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        let mut inverse = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as u32;
        }
        let inverse = Tensor::from_vec(inverse, order.len(), &Device::Cpu)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// Class probabilities of each of `texts` under `params`, in the order given.
    pub fn probabilities(
        &self,
        params: &ModelParams,
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        let logits = self.logits(params, texts)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?)
    }

    fn check(&self, params: &ModelParams) -> Result<(), TrainError> {
        let want = self.schema();
        let got = params.schema();
        if got != want {
            let detail = want
                .tensors
                .iter()
                .find(|w| got.tensors.iter().all(|g| g != *w))
                .map_or_else(
                    || {
                        format!(
                            "{} tensors, the model has {}",
                            got.tensors.len(),
                            want.tensors.len()
                        )
                    },
                    |w| {
                        format!(
                            "tensor `{}` {:?} is missing or of another shape",
                            w.name, w.shape
                        )
                    },
                );
            return Err(TrainError::Weights(detail));
        }
        Ok(())
    }
}

/// `idx` as a `[len]` index tensor.
fn row_indices(idx: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        idx.len(),
        &Device::Cpu,
    )
}

/// Tensors of `params` by name, on the CPU.
fn named_tensors(params: &ModelParams) -> Result<HashMap<&str, Tensor>, TrainError> {
    params
        .tensors
        .iter()
        .map(|t| {
            Ok((
                t.name.as_str(),
                Tensor::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu)?,
            ))
        })
        .collect()
}

impl LocalModel for TextClassifier {
    fn schema(&self) -> ModelSchema {
        self.model.schema()
    }

    /// [`EncoderClassifier::init`].
    fn init(&self, seed: u64) -> Result<ModelParams, TrainError> {
        Ok(self.model.init(seed)?)
    }

    fn train(
        &self,
        start: &ModelParams,
        data: &Data,
        opts: &TrainOptions,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<TrainReport, TrainError> {
        self.check(start)?;
        let data = data.text()?;
        let weights = self.base.weights()?;
        let dp = opts.record_dp.is_some();
        let t = self.training(&weights, start, data, Some(opts.seed), dp)?;
        if let Some(dp) = &opts.record_dp {
            return private::train(
                start,
                &t.vars,
                &[],
                data.len(),
                opts,
                dp,
                cancel,
                progress,
                &mut |idx, max_norm| self.clipped(&t, start, data, idx, max_norm),
            );
        }
        let fitted = fit(
            &t.vars,
            &[],
            data.len(),
            opts,
            cancel,
            progress,
            &mut |idx| self.batch_loss(&t, data, idx),
        )?;
        let trained: Vec<&Tensor> = t.vars.iter().map(|v| v.as_tensor()).collect();
        Ok(TrainReport {
            params: from_tensors(start, &trained)?,
            examples: data.len() as u64,
            steps: fitted.steps,
            mean_loss: fitted.mean_loss,
            private: None,
        })
    }

    fn evaluate(&self, params: &ModelParams, data: &Data) -> Result<EvalReport, TrainError> {
        let data = data.text()?;
        let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
        let logits = self.logits(params, &texts)?;
        let mut out = BTreeMap::new();
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        out.insert(
            "accuracy".to_string(),
            metrics::accuracy(&predicted, &data.labels),
        );
        out.insert(
            "macro_f1".to_string(),
            metrics::macro_f1(&predicted, &data.labels, self.model.n_classes()),
        );
        if !data.is_empty() {
            let y = Tensor::from_slice(&data.labels, data.len(), &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
            out.insert("loss".to_string(), f64::from(loss));
        }
        if self.model.n_classes() == 2 {
            let probs = candle_nn::ops::softmax_last_dim(&logits)?;
            let scores = probs.narrow(1, 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(auc) = metrics::roc_auc(&scores, &data.labels) {
                out.insert("auc".to_string(), auc);
            }
        }
        Ok(EvalReport {
            examples: data.len() as u64,
            metrics: out,
        })
    }
}

/// What training on one site's texts keeps from step to step.
struct Training {
    /// The trained tensors, in the order of the start's.
    vars: Vec<Var>,
    /// The encoder with `vars` in place, and the head.
    a: Assembled,
    /// The texts' labels, `[n]`.
    labels: Tensor,
    /// Every text's pooled encoding, when only the head trains (the encoder is then frozen, so
    /// each text is encoded once rather than once per epoch).
    frozen: Option<Tensor>,
    /// Where the adapters leave per-example gradients, for DP-SGD on LoRA.
    per_example: Option<PerExampleGrads>,
}

impl TextClassifier {
    /// The clipped per-example gradients of the texts at `rows` of `data` under `params`, with
    /// the clipping norm `max_norm`: what one step of DP-SGD sums before adding noise. With
    /// `vectorised`, as training computes them (one backward pass for all of `rows` with LoRA,
    /// none through the encoder for the head); otherwise one backward pass per text, the
    /// reference.
    pub fn clipped_gradients(
        &self,
        params: &ModelParams,
        data: &TextExamples,
        rows: &[usize],
        max_norm: f64,
        vectorised: bool,
    ) -> Result<ClippedBatch, TrainError> {
        self.check(params)?;
        let weights = self.base.weights()?;
        let t = self.training(&weights, params, data, None, vectorised)?;
        if vectorised {
            self.clipped(&t, params, data, rows, max_norm)
        } else {
            clipped_by_example(&t.vars, rows, max_norm, &mut |row| {
                self.batch_loss(&t, data, row)
            })
        }
    }

    /// Variables for `start`'s tensors and the model around them; `private` readies the
    /// vectorised per-example gradients DP-SGD uses.
    fn training(
        &self,
        weights: &Weights,
        start: &ModelParams,
        data: &TextExamples,
        dropout_seed: Option<u64>,
        private: bool,
    ) -> Result<Training, TrainError> {
        let vars = to_vars(start, &Device::Cpu)?;
        let tensors: HashMap<&str, Tensor> = start
            .tensors
            .iter()
            .zip(&vars)
            .map(|(t, v)| (t.name.as_str(), v.as_tensor().clone()))
            .collect();
        let adaptation = &self.model.spec().adaptation;
        let per_example =
            (private && matches!(adaptation, Adaptation::Lora { .. })).then(PerExampleGrads::new);
        let a = self.assemble(weights, &tensors, dropout_seed, per_example.as_ref())?;
        let frozen = match adaptation {
            Adaptation::Head => Some(self.encode_all(&a.encoder, data)?),
            _ => None,
        };
        Ok(Training {
            labels: Tensor::from_slice(&data.labels, data.len(), &Device::Cpu)?,
            vars,
            a,
            frozen,
            per_example,
        })
    }

    /// The mean loss of the texts at `idx`.
    fn batch_loss(
        &self,
        t: &Training,
        data: &TextExamples,
        idx: &[usize],
    ) -> Result<Tensor, TrainError> {
        let rows = row_indices(idx)?;
        let pooled = match &t.frozen {
            Some(all) => all.index_select(&rows, 0)?,
            None => {
                let texts: Vec<&str> = idx.iter().map(|&i| data.texts[i].as_str()).collect();
                self.encode(&t.a.encoder, &texts)?
            }
        };
        let logits = Self::head(&t.a, &pooled)?;
        let y = t.labels.index_select(&rows, 0)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
    }

    /// The clipped sum of the per-example gradients of the texts at `idx`, vectorised where the
    /// adaptation allows (the head, LoRA) and one backward pass per text otherwise.
    fn clipped(
        &self,
        t: &Training,
        start: &ModelParams,
        data: &TextExamples,
        idx: &[usize],
        max_norm: f64,
    ) -> Result<ClippedBatch, TrainError> {
        match (&t.frozen, &t.per_example) {
            (Some(all), _) => self.head_clipped(start, &t.a, all, &t.labels, idx, max_norm),
            (None, Some(collector)) => self.lora_clipped(t, collector, data, idx, max_norm),
            (None, None) => clipped_by_example(&t.vars, idx, max_norm, &mut |row| {
                self.batch_loss(t, data, row)
            }),
        }
    }

    /// [`Self::clipped`] for LoRA: one forward and one backward pass over the whole sample. The
    /// adapters' layers leave each text's gradient of `A` and `B` in `collector`; the head's
    /// come from a zero probe on its output, whose gradient is each text's output gradient.
    fn lora_clipped(
        &self,
        t: &Training,
        collector: &PerExampleGrads,
        data: &TextExamples,
        idx: &[usize],
        max_norm: f64,
    ) -> Result<ClippedBatch, TrainError> {
        let n = idx.len();
        collector.start(n);
        let texts: Vec<&str> = idx.iter().map(|&i| data.texts[i].as_str()).collect();
        let pooled = self.encode(&t.a.encoder, &texts)?;
        let probe = Var::zeros(
            (n, self.model.n_classes()),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        let logits = (Self::head(&t.a, &pooled)? + probe.as_tensor())?;
        let y = t.labels.index_select(&row_indices(idx)?, 0)?;
        // Summed, not averaged: each text's gradient is then its own loss's.
        let losses = private::per_row_cross_entropy(&logits, &y)?;
        let loss_sum = f64::from(losses.sum_all()?.to_scalar::<f32>()?);
        let store = losses.sum_all()?.backward()?;
        let g = store
            .get(probe.as_tensor())
            .cloned()
            .map_or_else(|| probe.as_tensor().zeros_like(), Ok)?;
        let pooled = pooled.detach();
        let (head_weight, head_bias) = (t.a.head_weight.id(), t.a.head_bias.id());
        let each = t
            .vars
            .iter()
            .map(|v| {
                let id = v.as_tensor().id();
                if id == head_weight {
                    Ok(ExampleGrads::Outer {
                        g: g.clone(),
                        h: pooled.clone(),
                    })
                } else if id == head_bias {
                    Ok(ExampleGrads::Rows(g.clone()))
                } else {
                    collector
                        .take(v.as_tensor())
                        .map(ExampleGrads::Stacked)
                        .ok_or_else(|| {
                            TrainError::Task(format!(
                                "no per-example gradient for a trained tensor of shape {:?}",
                                v.as_tensor().dims()
                            ))
                        })
                }
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let (grads, clipped) = clip_examples(&each, n, max_norm)?;
        Ok(ClippedBatch {
            grads,
            loss_sum,
            clipped,
        })
    }

    /// The clipped per-example gradients of the head alone on frozen encodings `all`, in the
    /// order of `start`'s tensors (the head's weight and bias are all that train).
    fn head_clipped(
        &self,
        start: &ModelParams,
        a: &Assembled,
        all: &Tensor,
        labels: &Tensor,
        idx: &[usize],
        max_norm: f64,
    ) -> Result<ClippedBatch, TrainError> {
        let rows = row_indices(idx)?;
        let (pooled, y) = (all.index_select(&rows, 0)?, labels.index_select(&rows, 0)?);
        let mut clipped =
            dense_stack_clipped(&[(&a.head_weight, &a.head_bias)], &pooled, &y, max_norm)?;
        let (weight, bias) = (clipped.grads[0].clone(), clipped.grads[1].clone());
        clipped.grads = start
            .tensors
            .iter()
            .map(|t| match t.name.as_str() {
                HEAD_WEIGHT => Ok(weight.clone()),
                HEAD_BIAS => Ok(bias.clone()),
                other => Err(TrainError::Task(format!(
                    "head-only training with another trained tensor, {other}"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(clipped)
    }

    /// Pooled encodings of every text, without gradients, in the data's order.
    fn encode_all(&self, encoder: &BertModel, data: &TextExamples) -> Result<Tensor, TrainError> {
        let mut parts = Vec::new();
        for chunk in data.texts.chunks(EVAL_BATCH) {
            let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
            parts.push(self.encode(encoder, &texts)?.detach());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
