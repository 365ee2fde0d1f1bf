//! The local training loop every model family shares: shuffled mini-batches, the optimiser,
//! FedProx's proximal term, cancellation, divergence and progress.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW, SGD};
use medfl_core::selection::SplitMix64;
use medfl_core::spec::Optimizer;

use crate::data::permutation;
use crate::model::{TrainOptions, TrainProgress};
use crate::TrainError;

/// The run's optimiser over the trained variables.
pub(crate) enum Stepper {
    Sgd(SGD),
    Adamw(AdamW),
}

impl Stepper {
    pub(crate) fn new(vars: &[Var], opts: &TrainOptions) -> candle_core::Result<Self> {
        Ok(match opts.optimizer {
            Optimizer::Sgd => Self::Sgd(SGD::new(vars.to_vec(), opts.learning_rate)?),
            Optimizer::Adamw => Self::Adamw(AdamW::new(
                vars.to_vec(),
                ParamsAdamW {
                    lr: opts.learning_rate,
                    weight_decay: opts.weight_decay,
                    ..Default::default()
                },
            )?),
        })
    }

    /// One step on the gradients of `loss`.
    pub(crate) fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        match self {
            Self::Sgd(o) => o.backward_step(loss),
            Self::Adamw(o) => o.backward_step(loss),
        }
    }

    /// One step on given gradients.
    pub(crate) fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        match self {
            Self::Sgd(o) => o.step(grads),
            Self::Adamw(o) => o.step(grads),
        }
    }
}

/// What a training loop did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fitted {
    /// Steps taken.
    pub steps: u64,
    /// Mean data loss over the steps.
    pub mean_loss: f64,
}

/// FedProx anchors: the weights this round started from, held constant (detached, so no
/// gradient flows back through the copy); none without a proximal term.
pub(crate) fn proximal_anchors(
    vars: &[Var],
    opts: &TrainOptions,
) -> candle_core::Result<Vec<Tensor>> {
    if opts.proximal_mu <= 0.0 {
        return Ok(Vec::new());
    }
    vars.iter()
        .map(|v| v.as_tensor().copy().map(|t| t.detach()))
        .collect()
}

/// Steps a round takes over `n` examples: `opts.steps`, or `opts.epochs` passes.
pub fn planned_steps(n: usize, opts: &TrainOptions) -> u64 {
    let batch = opts.batch_size.clamp(1, n.max(1));
    if opts.steps > 0 {
        u64::from(opts.steps)
    } else {
        u64::from(opts.epochs.max(1)) * n.div_ceil(batch) as u64
    }
}

/// Trains `vars` for the planned steps. `batch_loss` gets the indices of one shuffled
/// mini-batch of the `n` examples and returns its mean data loss. Weight decay applies to the
/// variables at `decay` (AdamW decays all of them, as candle's does). With `proximal_mu`, the
/// loss gains `(mu / 2) * ||w - w_start||^2`.
pub fn fit(
    vars: &[Var],
    decay: &[usize],
    n: usize,
    opts: &TrainOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(TrainProgress),
    batch_loss: &mut dyn FnMut(&[usize]) -> Result<Tensor, TrainError>,
) -> Result<Fitted, TrainError> {
    if n == 0 {
        return Err(TrainError::Task("no training examples".into()));
    }
    let device = vars
        .first()
        .map_or(Device::Cpu, |v| v.as_tensor().device().clone());
    let batch = opts.batch_size.clamp(1, n);
    let steps_per_epoch = n.div_ceil(batch) as u64;
    let total_steps = planned_steps(n, opts);
    let mut optimizer = Stepper::new(vars, opts)?;
    let anchors = proximal_anchors(vars, opts)?;
    let mut loss_sum = 0.0f64;
    let mut order = Vec::new();
    let mut rng = SplitMix64::new(opts.seed);
    for step in 0..total_steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled);
        }
        let pos = (step % steps_per_epoch) as usize * batch;
        if pos == 0 {
            order = permutation(n, rng.next_u64());
        }
        let loss = batch_loss(&order[pos..(pos + batch).min(n)])?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: loss_value,
            });
        }
        let mut objective = loss;
        if opts.optimizer == Optimizer::Sgd && opts.weight_decay > 0.0 && !decay.is_empty() {
            let mut l2 = Tensor::zeros((), DType::F32, &device)?;
            for &w in decay {
                l2 = (l2 + vars[w].as_tensor().sqr()?.sum_all()?)?;
            }
            objective = (objective + (l2 * (opts.weight_decay / 2.0))?)?;
        }
        if !anchors.is_empty() {
            let mut prox = Tensor::zeros((), DType::F32, &device)?;
            for (w, a) in vars.iter().zip(&anchors) {
                prox = (prox + (w.as_tensor() - a)?.sqr()?.sum_all()?)?;
            }
            objective = (objective + (prox * (opts.proximal_mu / 2.0))?)?;
        }
        optimizer.backward_step(&objective)?;
        loss_sum += f64::from(loss_value);
        if step % 10 == 9 || step + 1 == total_steps {
            progress(TrainProgress {
                step: step + 1,
                total_steps,
                loss: loss_value,
            });
        }
    }
    Ok(Fitted {
        steps: total_steps,
        mean_loss: loss_sum / total_steps.max(1) as f64,
    })
}
