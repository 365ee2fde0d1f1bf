//! Record-level differential privacy in local training: DP-SGD (Abadi et al. 2016) with
//! Opacus's semantics.
//!
//! Each step takes a Poisson sample of the site's rows (rate q = expected batch / N), computes
//! every sampled row's gradient over all trained tensors, scales each down to L2 norm at most C,
//! sums them, adds N(0, (zC)²) to every coordinate and divides by the expected batch. The
//! optimiser (SGD or AdamW) then steps on that gradient, as Opacus's DP optimiser does.
//!
//! Per-example gradients are vectorised wherever the model allows, with one forward and one
//! backward pass for the whole sample ([`clip_examples`] takes them in whatever form is cheapest):
//! - dense layers on fixed inputs (the MLP, and the classifier head on a frozen encoder), in
//!   [`dense_stack_clipped`]: every layer's output gets a zero-valued probe whose gradient is each
//!   row's output gradient, from which each row's norm and the clipped sum follow in two products
//!   without forming a gradient per row;
//! - LoRA adapters: their fused layers' backward pass leaves each sequence's gradient of `A` and
//!   `B` ([`crate::ops::PerExampleGrads`]), and the head takes a probe as above.
//!
//! Any other model (the encoder's top layers trained in full) uses [`clipped_by_example`], one
//! backward pass per sampled row.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, Var, D};
use medfl_core::privacy::dpsgd::{add_noise, clip_factor, poisson_sample, RandomBits};
use medfl_core::ModelParams;

use crate::fit::{planned_steps, proximal_anchors, Fitted, Stepper};
use crate::model::{TrainOptions, TrainProgress, TrainReport};
use crate::params::from_tensors;
use crate::TrainError;

/// The DP-SGD parameters a site trains with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordDp {
    /// Noise standard deviation over the clipping norm (z).
    pub noise_multiplier: f64,
    /// Per-example clipping norm (C), over all trained tensors together.
    pub max_grad_norm: f64,
}

impl RecordDp {
    /// The sample rate for `expected_batch` rows out of `n`.
    pub fn sample_rate(expected_batch: usize, n: usize) -> f64 {
        (expected_batch as f64 / n.max(1) as f64).min(1.0)
    }
}

/// The clipped per-example gradients of one sample, summed.
#[derive(Debug)]
pub struct ClippedBatch {
    /// One per trained variable, in the variables' order and shapes.
    pub grads: Vec<Tensor>,
    /// Sum of the rows' losses.
    pub loss_sum: f64,
    /// Rows whose gradient was scaled down.
    pub clipped: usize,
}

/// The clipped sum of the sampled rows' gradients: gets their indices and the clipping norm.
pub type ClippedBatchFn<'a> = dyn FnMut(&[usize], f64) -> Result<ClippedBatch, TrainError> + 'a;

/// What a private training loop did, for the site's accountant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivateFit {
    /// Steps and mean loss (over the sampled rows).
    pub fitted: Fitted,
    /// The Poisson sample rate q every step used.
    pub sample_rate: f64,
    /// Rows sampled over all steps (expected: steps · q · N).
    pub rows_sampled: u64,
    /// Of those, rows whose gradient was clipped.
    pub rows_clipped: u64,
}

/// Operating-system randomness (getrandom), buffered: what a site's noise and sampling use.
pub struct SystemBits {
    rng: ring::rand::SystemRandom,
    buffer: [u8; 4096],
    used: usize,
}

impl SystemBits {
    /// A fresh source.
    pub fn new() -> Self {
        Self {
            rng: ring::rand::SystemRandom::new(),
            buffer: [0; 4096],
            used: 4096,
        }
    }
}

impl Default for SystemBits {
    fn default() -> Self {
        Self::new()
    }
}

impl RandomBits for SystemBits {
    fn next_u64(&mut self) -> u64 {
        use ring::rand::SecureRandom as _;
        if self.used + 8 > self.buffer.len() {
            // The system generator does not fail once the kernel's pool is ready (it blocks
            // instead); a failure here means no safe randomness at all, so stop.
            self.rng
                .fill(&mut self.buffer)
                .expect("the operating system's random generator failed");
            self.used = 0;
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.buffer[self.used..self.used + 8]);
        self.used += 8;
        u64::from_le_bytes(word)
    }
}

/// Trains `vars` with DP-SGD for the planned steps (`opts.batch_size` is the expected batch).
/// `clipped_batch` gets the sampled row indices (possibly none) and the clipping norm and
/// returns the clipped sum. Weight decay on the variables at `decay` (SGD; AdamW decays all) and
/// FedProx's term are added after the noise: they do not depend on the data.
#[allow(clippy::too_many_arguments)]
pub fn fit_private(
    vars: &[Var],
    decay: &[usize],
    n: usize,
    opts: &TrainOptions,
    dp: &RecordDp,
    bits: &mut dyn RandomBits,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(TrainProgress),
    clipped_batch: &mut ClippedBatchFn<'_>,
) -> Result<PrivateFit, TrainError> {
    if n == 0 {
        return Err(TrainError::Task("no training examples".into()));
    }
    let expected_batch = opts.batch_size.clamp(1, n);
    let rate = RecordDp::sample_rate(expected_batch, n);
    let total_steps = planned_steps(n, opts);
    let noise_std = dp.noise_multiplier * dp.max_grad_norm;
    let device = vars
        .first()
        .map_or(Device::Cpu, |v| v.as_tensor().device().clone());
    let mut optimizer = Stepper::new(vars, opts)?;
    let anchors = proximal_anchors(vars, opts)?;
    let sgd_decay = opts.optimizer == medfl_core::spec::Optimizer::Sgd && opts.weight_decay > 0.0;
    let (mut loss_sum, mut rows_sampled, mut rows_clipped) = (0.0f64, 0u64, 0u64);
    for step in 0..total_steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        let sample = poisson_sample(bits, n, rate);
        let batch = if sample.is_empty() {
            ClippedBatch {
                grads: vars
                    .iter()
                    .map(|v| v.as_tensor().zeros_like())
                    .collect::<Result<_, _>>()?,
                loss_sum: 0.0,
                clipped: 0,
            }
        } else {
            clipped_batch(&sample, dp.max_grad_norm)?
        };
        let mean = batch.loss_sum / sample.len().max(1) as f64;
        if !mean.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: mean as f32,
            });
        }
        // The store a backward pass would give, holding the private gradients instead.
        let mut grads = Tensor::zeros((), DType::F32, &device)?.backward()?;
        for (i, (var, sum)) in vars.iter().zip(batch.grads).enumerate() {
            let mut noise = vec![0f32; sum.elem_count()];
            add_noise(bits, &mut noise, noise_std);
            let noise = Tensor::from_vec(noise, sum.shape(), &device)?;
            let mut grad = ((sum + noise)? / expected_batch as f64)?;
            if sgd_decay && decay.contains(&i) {
                grad = (grad + (var.as_tensor() * opts.weight_decay)?)?;
            }
            if let Some(anchor) = anchors.get(i) {
                grad = (grad + ((var.as_tensor() - anchor)? * opts.proximal_mu)?)?;
            }
            grads.insert(var.as_tensor(), grad);
        }
        optimizer.step(&grads)?;
        loss_sum += mean;
        rows_sampled += sample.len() as u64;
        rows_clipped += batch.clipped as u64;
        if step % 10 == 9 || step + 1 == total_steps {
            progress(TrainProgress {
                step: step + 1,
                total_steps,
                loss: mean as f32,
            });
        }
    }
    Ok(PrivateFit {
        fitted: Fitted {
            steps: total_steps,
            mean_loss: loss_sum / total_steps.max(1) as f64,
        },
        sample_rate: rate,
        rows_sampled,
        rows_clipped,
    })
}

/// Trains `vars`, which start as `start`, with [`fit_private`] on the operating system's
/// randomness, and reports the trained weights with what DP-SGD did.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    start: &ModelParams,
    vars: &[Var],
    decay: &[usize],
    n: usize,
    opts: &TrainOptions,
    dp: &RecordDp,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(TrainProgress),
    clipped_batch: &mut ClippedBatchFn<'_>,
) -> Result<TrainReport, TrainError> {
    let bits = &mut SystemBits::new();
    let private = fit_private(
        vars,
        decay,
        n,
        opts,
        dp,
        bits,
        cancel,
        progress,
        clipped_batch,
    )?;
    let trained: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
    Ok(TrainReport {
        params: from_tensors(start, &trained)?,
        examples: n as u64,
        steps: private.fitted.steps,
        mean_loss: private.fitted.mean_loss,
        private: Some(private),
    })
}

/// Clipped per-example gradients of `vars`, one backward pass per row: `row_loss` gets one
/// index and returns that row's loss.
pub fn clipped_by_example(
    vars: &[Var],
    rows: &[usize],
    max_norm: f64,
    row_loss: &mut dyn FnMut(&[usize]) -> Result<Tensor, TrainError>,
) -> Result<ClippedBatch, TrainError> {
    let mut sums: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().zeros_like())
        .collect::<Result<_, _>>()?;
    let (mut loss_sum, mut clipped) = (0.0f64, 0usize);
    for &row in rows {
        let loss = row_loss(&[row])?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?);
        let store = loss.backward()?;
        let grads: Vec<Option<&Tensor>> = vars.iter().map(|v| store.get(v.as_tensor())).collect();
        let mut norm2 = 0.0f64;
        for g in grads.iter().flatten() {
            norm2 += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let factor = clip_factor(norm2.sqrt(), max_norm);
        if factor < 1.0 {
            clipped += 1;
        }
        for (sum, g) in sums.iter_mut().zip(grads) {
            if let Some(g) = g {
                *sum = (&*sum + (g * factor)?)?;
            }
        }
    }
    Ok(ClippedBatch {
        grads: sums,
        loss_sum,
        clipped,
    })
}

/// Clipped per-example gradients of dense layers `x → relu(x W₀ᵀ + b₀) → … → x Wₖᵀ + bₖ`
/// under cross-entropy against `labels`, vectorised. Returns the (weight, bias) sums per layer
/// in `ClippedBatch::grads` (weight, bias, weight, bias, ...).
///
/// With `g` a row's gradient at a layer's output and `h` its input there, the row's weight
/// gradient is the outer product `g hᵀ`, of norm ‖g‖·‖h‖, and its bias gradient `g`: so a row's
/// squared norm is Σ ‖g‖²(‖h‖² + 1), and the clipped sums are `(f ⊙ g)ᵀ h` and `Σ f ⊙ g` for the
/// rows' clip factors `f`.
pub fn dense_stack_clipped(
    layers: &[(&Tensor, &Tensor)],
    x: &Tensor,
    labels: &Tensor,
    max_norm: f64,
) -> Result<ClippedBatch, TrainError> {
    let rows = x.dim(0)?;
    let mut inputs = Vec::with_capacity(layers.len());
    let mut probes = Vec::with_capacity(layers.len());
    let mut h = x.detach();
    for (i, (weight, bias)) in layers.iter().enumerate() {
        let (weight, bias) = (weight.detach(), bias.detach());
        let probe = Var::zeros((rows, weight.dim(0)?), DType::F32, x.device())?;
        inputs.push(h.detach());
        let out = (h.matmul(&weight.t()?)?.broadcast_add(&bias)? + probe.as_tensor())?;
        probes.push(probe);
        h = if i + 1 < layers.len() {
            out.relu()?
        } else {
            out
        };
    }
    // Summed, not averaged: each row's gradient is then its own loss's.
    let losses = per_row_cross_entropy(&h, labels)?;
    let loss_sum = f64::from(losses.sum_all()?.to_scalar::<f32>()?);
    let store = losses.sum_all()?.backward()?;
    let outs: Vec<Tensor> = probes
        .iter()
        .map(|p| {
            store
                .get(p.as_tensor())
                .cloned()
                .map_or_else(|| p.as_tensor().zeros_like(), Ok)
        })
        .collect::<Result<_, _>>()?;
    let mut each = Vec::with_capacity(2 * layers.len());
    for (g, h) in outs.into_iter().zip(inputs) {
        each.push(ExampleGrads::Outer { g: g.clone(), h });
        each.push(ExampleGrads::Rows(g));
    }
    let (grads, clipped) = clip_examples(&each, rows, max_norm)?;
    Ok(ClippedBatch {
        grads,
        loss_sum,
        clipped,
    })
}

/// One trained tensor's gradients for each of a batch's examples, in a form whose norms and
/// clipped sum are cheap to compute.
#[derive(Debug, Clone)]
pub enum ExampleGrads {
    /// Formed, `[examples, ..shape]`.
    Stacked(Tensor),
    /// A dense layer's weight: example `i`'s is the outer product `g_iᵀ h_i`, of norm
    /// `‖g_i‖·‖h_i‖`, for its output gradient `g_i` (`g`, `[examples, out]`) and input `h_i`
    /// (`h`, `[examples, in]`).
    Outer {
        /// Output gradients.
        g: Tensor,
        /// Inputs.
        h: Tensor,
    },
    /// A dense layer's bias: example `i`'s is row `i`, `[examples, out]`.
    Rows(Tensor),
}

impl ExampleGrads {
    /// Each example's squared L2 norm, `[examples]`.
    fn norms2(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Stacked(t) => t.flatten_from(1)?.sqr()?.sum(1),
            Self::Outer { g, h } => g.sqr()?.sum(1)? * h.sqr()?.sum(1)?,
            Self::Rows(g) => g.sqr()?.sum(1),
        }
    }

    /// `Σ_i f_i · grad_i` for the factors `f` (`[examples, 1]`).
    fn weighted_sum(&self, f: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Stacked(t) => {
                let mut shape = vec![t.dim(0)?];
                shape.resize(t.rank(), 1);
                t.broadcast_mul(&f.reshape(shape)?)?.sum(0)
            }
            Self::Outer { g, h } => g.broadcast_mul(f)?.t()?.matmul(h),
            Self::Rows(g) => g.broadcast_mul(f)?.sum(0),
        }
    }
}

/// The clipped sum of per-example gradients: each example's gradient over all of `grads`
/// together (a flat L2 norm) scaled to norm at most `max_norm`, then summed. Returns one sum per
/// entry of `grads`, in order, and how many examples were scaled down.
pub fn clip_examples(
    grads: &[ExampleGrads],
    examples: usize,
    max_norm: f64,
) -> Result<(Vec<Tensor>, usize), TrainError> {
    let Some(first) = grads.first() else {
        return Ok((Vec::new(), 0));
    };
    let device = match first {
        ExampleGrads::Stacked(t) | ExampleGrads::Outer { g: t, .. } | ExampleGrads::Rows(t) => {
            t.device().clone()
        }
    };
    let mut norm2 = Tensor::zeros(examples, DType::F32, &device)?;
    for g in grads {
        norm2 = (norm2 + g.norms2()?)?;
    }
    let factors: Vec<f32> = norm2
        .sqrt()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&n| clip_factor(f64::from(n), max_norm) as f32)
        .collect();
    let clipped = factors.iter().filter(|&&f| f < 1.0).count();
    let factors = Tensor::from_vec(factors, (examples, 1), &device)?;
    let sums = grads
        .iter()
        .map(|g| g.weighted_sum(&factors))
        .collect::<Result<_, _>>()?;
    Ok((sums, clipped))
}

/// Each row's cross-entropy, `[rows]`.
pub(crate) fn per_row_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    log_probs
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn tensor(v: &Value) -> Tensor {
        fn flat(v: &Value, out: &mut Vec<f32>, dims: &mut Vec<usize>, depth: usize) {
            match v {
                Value::Array(items) => {
                    if dims.len() == depth {
                        dims.push(items.len());
                    }
                    items.iter().for_each(|i| flat(i, out, dims, depth + 1));
                }
                Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
                _ => panic!("not a number: {v}"),
            }
        }
        let (mut out, mut dims) = (Vec::new(), Vec::new());
        flat(v, &mut out, &mut dims, 0);
        Tensor::from_vec(out, dims, &Device::Cpu).unwrap()
    }

    fn close(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{what}: off by {diff}");
    }

    /// Opacus's per-sample gradients and clipped sum (written by
    /// `benches/opacus_per_sample_grads.py`) for a 5-4-3 MLP on six rows.
    fn reference() -> Value {
        serde_json::from_str(include_str!("../tests/vectors/opacus_mlp_per_sample.json")).unwrap()
    }

    /// The reference batch: features, labels and the clipping norm.
    fn batch(r: &Value) -> (Tensor, Vec<u32>, f64) {
        let labels = r["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_u64().unwrap() as u32)
            .collect();
        (
            tensor(&r["features"]),
            labels,
            r["max_grad_norm"].as_f64().unwrap(),
        )
    }

    /// Every clipped sum matches Opacus's.
    fn matches_clipped_sum(got: &ClippedBatch, r: &Value) {
        let names = [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias",
        ];
        for (k, name) in names.iter().enumerate() {
            close(&got.grads[k], &tensor(&r["clipped_sum"][name]), name);
        }
    }

    fn layers(r: &Value) -> Vec<(Tensor, Tensor)> {
        (0..2)
            .map(|i| {
                (
                    tensor(&r["weights"][format!("layers.{i}.weight")]),
                    tensor(&r["weights"][format!("layers.{i}.bias")]),
                )
            })
            .collect()
    }

    #[test]
    fn vectorised_clipping_matches_opacus() {
        let r = reference();
        let layers = layers(&r);
        let refs: Vec<(&Tensor, &Tensor)> = layers.iter().map(|(w, b)| (w, b)).collect();
        let (x, labels, max_norm) = batch(&r);
        let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let got = dense_stack_clipped(&refs, &x, &y, max_norm).unwrap();
        assert!((got.loss_sum - r["loss_sum"].as_f64().unwrap()).abs() < 1e-5);
        // Three of the six rows have norms above 1.7.
        assert_eq!(got.clipped, 3);
        matches_clipped_sum(&got, &r);
        // With a norm bound no row reaches, the sum is the plain gradient of the summed loss:
        // the sum of Opacus's per-sample gradients.
        let unclipped = dense_stack_clipped(&refs, &x, &y, 1e6).unwrap();
        assert_eq!(unclipped.clipped, 0);
        let sum = tensor(&r["per_sample"]["layers.0.weight"]).sum(0).unwrap();
        close(&unclipped.grads[0], &sum, "unclipped layers.0.weight");
    }

    #[test]
    fn one_row_at_a_time_matches_opacus() {
        let r = reference();
        let layers = layers(&r);
        let vars: Vec<Var> = layers
            .iter()
            .flat_map(|(w, b)| [Var::from_tensor(w).unwrap(), Var::from_tensor(b).unwrap()])
            .collect();
        let (x, labels, max_norm) = batch(&r);
        let got = clipped_by_example(&vars, &[0, 1, 2, 3, 4, 5], max_norm, &mut |idx| {
            let xi = x.narrow(0, idx[0], 1)?;
            let h = xi
                .matmul(&vars[0].as_tensor().t()?)?
                .broadcast_add(vars[1].as_tensor())?
                .relu()?;
            let logits = h
                .matmul(&vars[2].as_tensor().t()?)?
                .broadcast_add(vars[3].as_tensor())?;
            let y = Tensor::new(&[labels[idx[0]]], &Device::Cpu)?;
            Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
        })
        .unwrap();
        assert_eq!(got.clipped, 3);
        matches_clipped_sum(&got, &r);
    }

    #[test]
    fn system_bits_differ_between_draws() {
        let mut bits = SystemBits::new();
        let words: Vec<u64> = (0..1000).map(|_| bits.next_u64()).collect();
        let mut unique = words.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), words.len());
    }

    /// The LoRA path as training runs it (the fused low-rank layer leaving each sequence's
    /// gradients of A and B, the head's from a probe on its output) against Opacus on padded
    /// sequences with mean pooling (`benches/opacus_lora_per_sample_grads.py`).
    #[test]
    fn lora_per_example_gradients_match_opacus() {
        let r: Value =
            serde_json::from_str(include_str!("../tests/vectors/opacus_lora_per_sample.json"))
                .unwrap();
        let x = tensor(&r["x"]);
        let n = x.dim(0).unwrap();
        let mask = tensor(&r["mask"]);
        let (weight, bias) = (tensor(&r["weight"]), tensor(&r["bias"]));
        let a = Var::from_tensor(&tensor(&r["a"])).unwrap();
        let b = Var::from_tensor(&tensor(&r["b"])).unwrap();
        let (head_weight, head_bias) = (tensor(&r["head_weight"]), tensor(&r["head_bias"]));
        let labels: Vec<u32> = r["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_u64().unwrap() as u32)
            .collect();
        let labels = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();

        let collector = crate::ops::PerExampleGrads::new();
        collector.start(n);
        let low_rank = crate::ops::LowRank {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: r["scale"].as_f64().unwrap(),
            keep: None,
            per_example: Some(&collector),
        };
        let h = crate::ops::dense(&x, &weight, Some(&bias), Some(low_rank)).unwrap();
        let pooled = crate::bert::mean_pool(&h, &mask).unwrap();
        let probe = Var::zeros((n, head_weight.dim(0).unwrap()), DType::F32, &Device::Cpu).unwrap();
        let logits = ((pooled.matmul(&head_weight.t().unwrap()).unwrap())
            .broadcast_add(&head_bias)
            .unwrap()
            + probe.as_tensor())
        .unwrap();
        let losses = per_row_cross_entropy(&logits, &labels).unwrap();
        let loss_sum = f64::from(losses.sum_all().unwrap().to_scalar::<f32>().unwrap());
        assert!((loss_sum - r["loss_sum"].as_f64().unwrap()).abs() < 1e-4);
        let store = losses.sum_all().unwrap().backward().unwrap();
        let g = store.get(probe.as_tensor()).unwrap().clone();

        let per_a = collector
            .take(a.as_tensor())
            .expect("A's per-example gradients");
        let per_b = collector
            .take(b.as_tensor())
            .expect("B's per-example gradients");
        close(&per_a, &tensor(&r["per_sample"]["a"]), "A per example");
        close(&per_b, &tensor(&r["per_sample"]["b"]), "B per example");
        let head_each = g
            .unsqueeze(2)
            .unwrap()
            .matmul(&pooled.detach().unsqueeze(1).unwrap())
            .unwrap();
        close(
            &head_each,
            &tensor(&r["per_sample"]["head_weight"]),
            "head weight per example",
        );
        close(
            &g,
            &tensor(&r["per_sample"]["head_bias"]),
            "head bias per example",
        );

        let each = [
            ExampleGrads::Stacked(per_a),
            ExampleGrads::Stacked(per_b),
            ExampleGrads::Outer {
                g: g.clone(),
                h: pooled.detach(),
            },
            ExampleGrads::Rows(g),
        ];
        let max_norm = r["max_grad_norm"].as_f64().unwrap();
        let (sums, clipped) = clip_examples(&each, n, max_norm).unwrap();
        assert_eq!(clipped, 2);
        for (sum, name) in sums.iter().zip(["a", "b", "head_weight", "head_bias"]) {
            close(sum, &tensor(&r["clipped_sum"][name]), name);
        }
    }
}
