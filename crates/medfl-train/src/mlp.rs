//! A multi-layer perceptron with ReLU between layers; with no hidden layer it is multinomial
//! logistic regression. Weights are `layers.{i}.weight` (`[out, in]`) and `layers.{i}.bias`;
//! their schema and initial values are [`medfl_model::Mlp`]'s.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor, D};
use medfl_core::metrics;
use medfl_core::{ModelParams, ModelSchema};

use crate::fit::fit;
use crate::model::{Data, EvalReport, LocalModel, TrainOptions, TrainProgress, TrainReport};
use crate::params::{from_tensors, to_vars};
use crate::private::{self, dense_stack_clipped};
use crate::{Examples, TrainError};

/// Rows scored at once during evaluation, to bound memory.
const EVAL_BATCH: usize = 4096;

/// The architecture: layer widths from input to classes.
#[derive(Debug, Clone)]
pub struct Mlp {
    arch: medfl_model::Mlp,
}

impl From<medfl_model::Mlp> for Mlp {
    fn from(arch: medfl_model::Mlp) -> Self {
        Self { arch }
    }
}

impl Mlp {
    /// `inputs` features, the given hidden widths, `classes` outputs.
    pub fn new(inputs: usize, hidden: &[usize], classes: usize) -> Self {
        medfl_model::Mlp::new(inputs, hidden, classes).into()
    }

    /// Widths from the input to the classes.
    fn dims(&self) -> &[usize] {
        self.arch.dims()
    }

    /// Indices of each layer's (weight, bias) in the name-sorted parameter list.
    fn layer_slots(&self) -> Vec<(usize, usize)> {
        let schema = self.schema();
        (0..self.arch.layers())
            .map(|i| {
                let w = schema.index_of(&format!("layers.{i}.weight")).unwrap_or(0);
                let b = schema.index_of(&format!("layers.{i}.bias")).unwrap_or(0);
                (w, b)
            })
            .collect()
    }

    fn check(&self, params: &ModelParams) -> Result<(), TrainError> {
        if params.schema() != self.schema() {
            return Err(TrainError::Weights(format!(
                "weights do not fit an MLP of widths {:?}",
                self.dims()
            )));
        }
        Ok(())
    }

    fn forward(
        &self,
        weights: &[&Tensor],
        slots: &[(usize, usize)],
        x: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let mut h = x.clone();
        for (i, &(w, b)) in slots.iter().enumerate() {
            h = h.matmul(&weights[w].t()?)?.broadcast_add(weights[b])?;
            if i + 1 < slots.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// The model's weights as constants (nothing to differentiate), in name order.
fn constant_tensors(params: &ModelParams, device: &Device) -> Result<Vec<Tensor>, TrainError> {
    Ok(params
        .tensors
        .iter()
        .map(|t| Tensor::from_slice(&t.data, t.shape.as_slice(), device))
        .collect::<Result<_, _>>()?)
}

fn batch_tensors(data: &Examples, device: &Device) -> Result<(Tensor, Tensor), TrainError> {
    let x = Tensor::from_slice(&data.features, (data.len(), data.n_features), device)?;
    let y = Tensor::from_slice(&data.labels, data.len(), device)?;
    Ok((x, y))
}

impl Mlp {
    /// Each row's class probabilities (softmax of the logits), in the classes' order.
    pub fn probabilities(
        &self,
        params: &ModelParams,
        data: &Examples,
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        self.check(params)?;
        if data.n_features != self.dims()[0] {
            return Err(TrainError::Task(format!(
                "{} features per row, the model takes {}",
                data.n_features,
                self.dims()[0]
            )));
        }
        let device = Device::Cpu;
        let tensors = constant_tensors(params, &device)?;
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let slots = self.layer_slots();
        let mut out = Vec::with_capacity(data.len());
        let rows: Vec<usize> = (0..data.len()).collect();
        for chunk in rows.chunks(EVAL_BATCH) {
            let (x, _) = batch_tensors(&data.select(chunk), &device)?;
            let logits = self.forward(&refs, &slots, &x)?;
            let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
            out.extend(p.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

impl LocalModel for Mlp {
    fn schema(&self) -> ModelSchema {
        self.arch.schema()
    }

    /// [`medfl_model::Mlp::init`]: PyTorch's `nn.Linear` initialisation.
    fn init(&self, seed: u64) -> Result<ModelParams, TrainError> {
        Ok(self.arch.init(seed)?)
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
        let data = data.table()?;
        if data.is_empty() {
            return Err(TrainError::Task("no training examples".into()));
        }
        if data.n_features != self.dims()[0] {
            return Err(TrainError::Task(format!(
                "{} features per example, the model takes {}",
                data.n_features,
                self.dims()[0]
            )));
        }
        let device = Device::Cpu;
        let vars = to_vars(start, &device)?;
        let slots = self.layer_slots();
        let weight_slots: Vec<usize> = slots.iter().map(|&(w, _)| w).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let tensor_refs: Vec<&Tensor> = tensors.iter().collect();
        if let Some(dp) = &opts.record_dp {
            return private::train(
                start,
                &vars,
                &weight_slots,
                data.len(),
                opts,
                dp,
                cancel,
                progress,
                &mut |idx, max_norm| {
                    let (x, y) = batch_tensors(&data.select(idx), &device)?;
                    let layers: Vec<(&Tensor, &Tensor)> = slots
                        .iter()
                        .map(|&(w, b)| (tensor_refs[w], tensor_refs[b]))
                        .collect();
                    let mut clipped = dense_stack_clipped(&layers, &x, &y, max_norm)?;
                    // Back from (weight, bias) per layer to the variables' order.
                    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
                    let mut per_layer = clipped.grads.drain(..);
                    for &(w, b) in &slots {
                        grads[w] = per_layer.next();
                        grads[b] = per_layer.next();
                    }
                    drop(per_layer);
                    clipped.grads = grads
                        .into_iter()
                        .map(|g| {
                            g.ok_or_else(|| TrainError::Task("MLP layer without a gradient".into()))
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(clipped)
                },
            );
        }
        let fitted = fit(
            &vars,
            &weight_slots,
            data.len(),
            opts,
            cancel,
            progress,
            &mut |idx| {
                let (x, y) = batch_tensors(&data.select(idx), &device)?;
                let logits = self.forward(&tensor_refs, &slots, &x)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
            },
        )?;
        Ok(TrainReport {
            params: from_tensors(start, &tensor_refs)?,
            examples: data.len() as u64,
            steps: fitted.steps,
            mean_loss: fitted.mean_loss,
            private: None,
        })
    }

    fn evaluate(&self, params: &ModelParams, data: &Data) -> Result<EvalReport, TrainError> {
        self.check(params)?;
        let data = data.table()?;
        let device = Device::Cpu;
        let weights = constant_tensors(params, &device)?;
        let weights: Vec<&Tensor> = weights.iter().collect();
        let slots = self.layer_slots();
        let mut predicted = Vec::with_capacity(data.len());
        let mut positive_scores = Vec::with_capacity(data.len());
        let mut loss_sum = 0.0f64;
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(EVAL_BATCH) {
            let part = data.select(chunk);
            let (x, y) = batch_tensors(&part, &device)?;
            let logits = self.forward(&weights, &slots, &x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
            loss_sum += f64::from(loss) * chunk.len() as f64;
            predicted.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            if self.dims().last() == Some(&2) {
                let probs = candle_nn::ops::softmax_last_dim(&logits)?;
                positive_scores.extend(probs.narrow(1, 1, 1)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let mut out = BTreeMap::new();
        out.insert(
            "accuracy".to_string(),
            metrics::accuracy(&predicted, &data.labels),
        );
        let classes = self.dims().last().copied().unwrap_or(0);
        out.insert(
            "macro_f1".to_string(),
            metrics::macro_f1(&predicted, &data.labels, classes),
        );
        out.insert("loss".to_string(), loss_sum / data.len().max(1) as f64);
        if let Some(auc) = metrics::roc_auc(&positive_scores, &data.labels) {
            out.insert("auc".to_string(), auc);
        }
        Ok(EvalReport {
            examples: data.len() as u64,
            metrics: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_core::selection::SplitMix64;
    use medfl_core::spec::Optimizer;

    use crate::private::RecordDp;

    /// Two Gaussian blobs: class 1 centred at +1, class 0 at -1, in 3 dimensions.
    fn blobs(n: usize, seed: u64) -> Data {
        let mut rng = SplitMix64::new(seed);
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = (i % 2) as u32;
            let centre = if class == 1 { 1.0 } else { -1.0 };
            for _ in 0..3 {
                features.push(centre + (rng.next_f64() as f32 - 0.5));
            }
            labels.push(class);
        }
        Data::Table(Examples {
            features,
            labels,
            n_features: 3,
        })
    }

    fn opts() -> TrainOptions {
        TrainOptions {
            epochs: 5,
            steps: 0,
            batch_size: 16,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            weight_decay: 0.0,
            proximal_mu: 0.0,
            seed: 1,
            record_dp: None,
        }
    }

    #[test]
    fn training_learns_separable_data() {
        for optimizer in [Optimizer::Sgd, Optimizer::Adamw] {
            let m = Mlp::new(3, &[8], 2);
            let data = blobs(200, 3);
            let start = m.init(1).unwrap();
            let before = m.evaluate(&start, &data).unwrap();
            let mut o = opts();
            o.optimizer = optimizer;
            o.learning_rate = if optimizer == Optimizer::Sgd {
                0.1
            } else {
                0.01
            };
            let mut seen = 0;
            let report = m
                .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {
                    seen += 1
                })
                .unwrap();
            assert_eq!(report.steps, 5 * 13);
            assert_eq!(report.examples, 200);
            assert!(seen > 0);
            let after = m.evaluate(&report.params, &data).unwrap();
            assert!(after.metrics["accuracy"] > 0.95, "{optimizer:?}: {after:?}");
            assert!(after.metrics["loss"] < before.metrics["loss"]);
            assert!(after.metrics["auc"] > 0.95);
            // The round table's F1 column has a value for tabular runs too.
            assert!(after.metrics["macro_f1"] > 0.9, "{after:?}");
        }
    }

    #[test]
    fn training_is_deterministic_and_cancellable() {
        let m = Mlp::new(3, &[], 2);
        let data = blobs(50, 4);
        let start = m.init(2).unwrap();
        let run = || m.train(&start, &data, &opts(), &AtomicBool::new(false), &mut |_| {});
        assert_eq!(run().unwrap().params, run().unwrap().params);
        let err = m
            .train(&start, &data, &opts(), &AtomicBool::new(true), &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, TrainError::Cancelled));
    }

    #[test]
    fn proximal_term_keeps_weights_near_the_start() {
        let m = Mlp::new(3, &[8], 2);
        let data = blobs(100, 5);
        let start = m.init(3).unwrap();
        let distance = |p: &ModelParams| -> f64 {
            p.tensors
                .iter()
                .zip(&start.tensors)
                .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum()
        };
        let mut o = opts();
        let free = m
            .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        o.proximal_mu = 0.1;
        let held = m
            .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        assert!(distance(&held.params) < 0.8 * distance(&free.params));
        let acc = m.evaluate(&held.params, &data).unwrap().metrics["accuracy"];
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn private_training_learns_with_moderate_noise() {
        let m = Mlp::new(3, &[8], 2);
        let data = blobs(400, 6);
        let start = m.init(4).unwrap();
        let mut o = opts();
        o.batch_size = 32;
        o.learning_rate = 0.5;
        o.record_dp = Some(RecordDp {
            noise_multiplier: 1.0,
            max_grad_norm: 1.0,
        });
        let report = m
            .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        let private = report.private.expect("DP-SGD ran");
        assert_eq!(report.steps, 5 * 13);
        assert!((private.sample_rate - 0.08).abs() < 1e-12);
        // Poisson samples of expected size 32 over 65 steps: 2,080 rows, sd about 44.
        assert!(private.rows_sampled.abs_diff(2080) < 300, "{private:?}");
        let acc = m.evaluate(&report.params, &data).unwrap().metrics["accuracy"];
        assert!(acc > 0.9, "{acc}");
    }

    /// One SGD step at learning rate 1 moves each weight by −(clipped sum + noise) / batch:
    /// with a tiny clipping norm the move is almost all noise, of standard deviation z·C / batch.
    #[test]
    fn private_noise_has_the_promised_scale() {
        let m = Mlp::new(3, &[256], 2);
        let data = blobs(160, 7);
        let start = m.init(5).unwrap();
        let mut o = opts();
        (o.steps, o.batch_size, o.learning_rate) = (1, 16, 1.0);
        o.record_dp = Some(RecordDp {
            noise_multiplier: 10.0,
            max_grad_norm: 0.01,
        });
        let report = m
            .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        let moves: Vec<f64> = report
            .params
            .tensors
            .iter()
            .zip(&start.tensors)
            .flat_map(|(a, b)| a.data.iter().zip(&b.data))
            .map(|(x, y)| f64::from(x - y))
            .collect();
        let n = moves.len() as f64;
        let sd = (moves.iter().map(|d| d * d).sum::<f64>() / n).sqrt();
        let want = 10.0 * 0.01 / 16.0;
        assert!((sd / want - 1.0).abs() < 0.1, "sd {sd}, want {want}");
        // With no noise and a tiny clipping norm, every sampled row is clipped.
        o.record_dp = Some(RecordDp {
            noise_multiplier: 1e-9,
            max_grad_norm: 1e-6,
        });
        let report = m
            .train(&start, &data, &o, &AtomicBool::new(false), &mut |_| {})
            .unwrap();
        let private = report.private.unwrap();
        assert_eq!(private.rows_clipped, private.rows_sampled);
    }

    #[test]
    fn wrong_weights_are_refused() {
        let m = Mlp::new(3, &[4], 2);
        let other = Mlp::new(3, &[5], 2).init(1).unwrap();
        assert!(m.evaluate(&other, &blobs(4, 1)).is_err());
    }
}
