//! The model trait the round engine trains through, so new model families (pre-trained encoders
//! with adapters) plug in without touching the engine.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use medfl_core::spec::{ModelSpec, Optimizer, RunSpec};
use medfl_core::{ModelParams, ModelSchema};
use medfl_model::RunModel;

use crate::base::BaseModels;
use crate::classifier::TextClassifier;
use crate::mlp::Mlp;
use crate::private::{PrivateFit, RecordDp};
use crate::text_data::TextExamples;
use crate::{Examples, TrainError};

/// What a site trains and evaluates on: feature rows or labelled texts.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Standardised feature rows, or a frozen image encoder's embeddings.
    Table(Examples),
    /// Labelled texts.
    Text(TextExamples),
}

impl Data {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Data::Table(e) => e.len(),
            Data::Text(e) => e.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The feature rows, or an error for a tabular model given text.
    pub fn table(&self) -> Result<&Examples, TrainError> {
        match self {
            Data::Table(e) => Ok(e),
            Data::Text(_) => Err(TrainError::Task(
                "a tabular model was given text examples".into(),
            )),
        }
    }

    /// The texts, or an error for a text model given feature rows.
    pub fn text(&self) -> Result<&TextExamples, TrainError> {
        match self {
            Data::Text(e) => Ok(e),
            Data::Table(_) => Err(TrainError::Task(
                "a text model was given feature rows".into(),
            )),
        }
    }
}

/// How one site trains for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Passes over the data (used when `steps` is 0).
    pub epochs: u32,
    /// Exact number of steps, or 0.
    pub steps: u32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// FedProx: weight of `(mu / 2) * ||w - w_start||^2` in the local loss (0 for none).
    pub proximal_mu: f64,
    /// Seed for shuffling.
    pub seed: u64,
    /// Record-level DP-SGD (`batch_size` is then the expected batch of a Poisson sample, and
    /// the seed is not used: sampling and noise come from the operating system).
    pub record_dp: Option<RecordDp>,
}

impl TrainOptions {
    /// Options from a run spec, with a seed particular to the site and round.
    pub fn from_spec(spec: &RunSpec, seed: u64) -> Self {
        let t = &spec.training;
        Self {
            epochs: t.local_epochs,
            steps: t.local_steps,
            batch_size: t.batch_size as usize,
            learning_rate: t.learning_rate,
            optimizer: t.optimizer,
            weight_decay: t.weight_decay,
            proximal_mu: spec.strategy.proximal_mu(),
            seed,
            record_dp: spec.privacy.record.as_ref().map(|p| RecordDp {
                noise_multiplier: p.noise_multiplier,
                max_grad_norm: p.max_grad_norm,
            }),
        }
    }
}

/// Reported every few steps while training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    /// Steps done.
    pub step: u64,
    /// Steps planned.
    pub total_steps: u64,
    /// Loss of the last step.
    pub loss: f32,
}

/// What local training produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The locally trained weights.
    pub params: ModelParams,
    /// Training examples (the FedAvg weight).
    pub examples: u64,
    /// Steps taken.
    pub steps: u64,
    /// Mean loss over the steps.
    pub mean_loss: f64,
    /// What record-level DP-SGD did (its sample rate and steps are what the site's accountant
    /// charges), when it was on.
    pub private: Option<PrivateFit>,
}

/// Metrics of a model on some examples.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Examples scored.
    pub examples: u64,
    /// `accuracy`, `loss`, and `auc` for binary tasks.
    pub metrics: BTreeMap<String, f64>,
}

/// A model family: makes initial weights, trains from given weights, evaluates given weights.
/// Implementations hold only the architecture; weights always come in and go out as
/// [`ModelParams`], which is what travels between sites and the coordinator.
pub trait LocalModel: Send + Sync {
    /// Names and shapes of the weights that travel.
    fn schema(&self) -> ModelSchema;
    /// Fresh weights, the same for the same seed.
    fn init(&self, seed: u64) -> Result<ModelParams, TrainError>;
    /// Trains from `start` on `data`; checks `cancel` between steps.
    fn train(
        &self,
        start: &ModelParams,
        data: &Data,
        opts: &TrainOptions,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<TrainReport, TrainError>;
    /// Scores `params` on `data`.
    fn evaluate(&self, params: &ModelParams, data: &Data) -> Result<EvalReport, TrainError>;
}

/// A tabular model of a run spec's family, for `n_features` inputs and `n_classes` outputs.
pub fn build_model(
    spec: &ModelSpec,
    n_features: usize,
    n_classes: usize,
) -> Result<Box<dyn LocalModel>, TrainError> {
    match spec {
        ModelSpec::Mlp { hidden } => Ok(Box::new(Mlp::new(n_features, hidden, n_classes))),
        ModelSpec::Bert(_) | ModelSpec::Tinyvit(_) => Err(TrainError::Task(
            "an encoder model needs its base model: use model_for_run".into(),
        )),
    }
}

/// The model of a whole run spec ([`RunModel::for_run`]); a pre-trained encoder comes from
/// `bases`, checked against the hash the spec pins.
pub fn model_for_run(
    spec: &RunSpec,
    bases: &BaseModels,
) -> Result<Box<dyn LocalModel>, TrainError> {
    Ok(match RunModel::for_run(spec, bases.registry())? {
        RunModel::Mlp(arch) => Box::new(Mlp::from(arch)),
        RunModel::Text(model) => Box::new(TextClassifier::on(
            bases.loading(model.base().clone()),
            model,
        )),
    })
}
