//! The run spec: what a researcher asks the federation to train, written as TOML.
//!
//! ```toml
//! name = "breast-cancer"
//! rounds = 10
//! min_sites = 2
//!
//! [model]
//! kind = "mlp"
//! hidden = [16]
//!
//! [task]
//! dataset = "breast_cancer"
//! label = "diagnosis"
//! labels = ["B", "M"]
//! features = ["mean_radius", "mean_texture"]
//!
//! [training]
//! learning_rate = 0.05
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::strategy::server_opt::ServerOptimizer;
use crate::CoreError;

mod privacy;
pub use privacy::{
    AccountantSpec, AdaptiveClipping, ClientPrivacySpec, NoisePlacement, Privacy, PrivacySpec,
};

/// Most rounds a run may ask for (keeps a run's history within one gRPC message).
pub const MAX_ROUNDS: u32 = 10_000;
/// Most local epochs a round may ask of a site: beyond this a spec is a mistake or an attack
/// on the sites' machines (each site may set a lower limit in its policy).
pub const MAX_LOCAL_EPOCHS: u32 = 1_000;
/// Width of an image encoder's pooled embedding: the mean and the max of each of TinyViT's 256
/// output channels.
pub const IMAGE_EMBEDDING_WIDTH: usize = 512;
/// Most local steps a round may ask of a site.
pub const MAX_LOCAL_STEPS: u32 = 1_000_000;

/// Everything a run needs to know, as the researcher wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// A human name for the run.
    pub name: String,
    /// Number of rounds.
    pub rounds: u32,
    /// Fewest sites whose updates make a round.
    #[serde(default = "one")]
    pub min_sites: u32,
    /// Share of online sites sampled each round, in (0, 1].
    #[serde(default = "fraction_all")]
    pub fraction: f64,
    /// Seconds each round phase may take before it closes with whoever reported.
    #[serde(default = "default_deadline")]
    pub round_deadline_secs: u64,
    /// Attempts after the first when a round gets fewer than `min_sites` updates.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Seed for model initialisation, site sampling and local shuffling.
    #[serde(default)]
    pub seed: u64,
    /// The model to train.
    pub model: ModelSpec,
    /// What to learn from which data.
    pub task: TaskSpec,
    /// Local training at each site.
    #[serde(default)]
    pub training: TrainingSpec,
    /// How the coordinator combines updates.
    #[serde(default)]
    pub strategy: StrategySpec,
    /// Checks on every update.
    #[serde(default)]
    pub defense: DefenseSpec,
    /// Differential privacy, when the run asks for it: `[privacy]` for one level, `[[privacy]]`
    /// twice for both.
    #[serde(default, skip_serializing_if = "Privacy::is_off")]
    pub privacy: Privacy,
}

fn one() -> u32 {
    1
}
fn fraction_all() -> f64 {
    1.0
}
fn default_deadline() -> u64 {
    600
}
fn default_retries() -> u32 {
    3
}

/// The model family and its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// A multi-layer perceptron on tabular features (no hidden layer: logistic regression).
    Mlp {
        /// Widths of the hidden layers, input side first.
        #[serde(default)]
        hidden: Vec<usize>,
    },
    /// A pre-trained BERT-family text encoder every site holds, adapted with a classifier head.
    Bert(EncoderSpec),
    /// LiteMedSAM's TinyViT image encoder every site holds, with a classifier head on its
    /// pooled embedding (mean and max of each output channel).
    Tinyvit(ImageEncoderSpec),
}

/// A pre-trained image encoder, pinned by the hash of its weights file, the preprocessing every
/// image gets before it (at training and at prediction alike), and how sites adapt it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEncoderSpec {
    /// The base model's name, as sites list it under `[base_models]`.
    pub base: String,
    /// SHA-256 (hex) of the base's weights file: sites refuse other weights.
    pub base_sha256: String,
    /// Side of the square the encoder sees, in pixels (a multiple of 16). The encoder's cost
    /// grows with its square: 128 costs a fifth of LiteMedSAM's native 256.
    #[serde(default = "default_input_size")]
    pub input_size: u32,
    /// How an image becomes a square.
    #[serde(default)]
    pub resize: Resize,
    /// What is trained; the encoder stays frozen and never travels.
    #[serde(default)]
    pub adaptation: ImageAdaptation,
}

fn default_input_size() -> u32 {
    128
}

/// How an image of any shape becomes the encoder's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Both sides scaled to the square, the aspect ratio given up: every image then fills the
    /// same square, so its original shape cannot stand in for its label.
    #[default]
    Stretch,
    /// LiteMedSAM's own: the longest side scaled to the square, the rest padded with zeros at
    /// the bottom and right. Keeps the aspect ratio, and with it the original shape, visible
    /// in the padding.
    Pad,
}

impl Resize {
    /// Lower-case name, as written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Resize::Stretch => "stretch",
            Resize::Pad => "pad",
        }
    }
}

/// Which weights a site trains on an image encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageAdaptation {
    /// The encoder frozen; only the classifier head trains. Each site computes an image's
    /// embedding once and keeps it, so later rounds train the head in seconds.
    #[default]
    Head,
}

/// A pre-trained encoder, pinned by the hash of its weights, and how sites adapt it. The same
/// shape serves every encoder family (`kind = "bert"` today; an image encoder next).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// The base model's name, as sites and the coordinator list it under `[base_models]`.
    pub base: String,
    /// SHA-256 (hex) of the base's `model.safetensors`: sites refuse other weights.
    pub base_sha256: String,
    /// How token states become one vector.
    #[serde(default)]
    pub pooling: Pooling,
    /// Longest input in tokens; longer texts are truncated.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: u32,
    /// What is trained; the rest of the base stays frozen and never travels.
    #[serde(default)]
    pub adaptation: Adaptation,
}

fn default_max_seq_len() -> u32 {
    64
}

/// Pooling of the encoder's last hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over real (unpadded) tokens.
    #[default]
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
}

/// Which weights a site trains. A classifier head is always trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Adaptation {
    /// Low-rank adapters `W + (alpha / rank) B A` on the named projections of every layer.
    Lora {
        /// Rank of `A` and `B`.
        #[serde(default = "default_rank")]
        rank: u32,
        /// Scale numerator: the update is `alpha / rank` times `B A`.
        #[serde(default = "default_alpha")]
        alpha: f64,
        /// Dropout on the adapter's input while training.
        #[serde(default)]
        dropout: f64,
        /// Projections adapted, by their last name part: `query`, `key`, `value`,
        /// `attention.output`, `intermediate`, `output`.
        #[serde(default = "default_targets")]
        target_modules: Vec<String>,
    },
    /// The encoder frozen; only the classifier head trains.
    Head,
    /// Every weight of the last `last_layers` layers (all layers when 0) and the head.
    Full {
        /// Layers trained, counted from the top; 0 for all of them and the embeddings.
        #[serde(default)]
        last_layers: u32,
    },
}

fn default_rank() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["query".into(), "value".into()]
}

impl Default for Adaptation {
    fn default() -> Self {
        Adaptation::Lora {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
        }
    }
}

/// Projection names an adapter may target, as the last parts of a BERT layer's weight names.
pub const LORA_TARGETS: &[&str] = &[
    "query",
    "key",
    "value",
    "attention.output",
    "intermediate",
    "output",
];

/// A base model's name and pinned hash, checked.
fn validate_base(base: &str, sha256: &str) -> Result<(), CoreError> {
    if base.trim().is_empty() {
        return Err(CoreError::spec("model.base", "name the base model"));
    }
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CoreError::spec(
            "model.base_sha256",
            "must be the 64 hex digits of the SHA-256 of the base's weights file",
        ));
    }
    Ok(())
}

impl ImageEncoderSpec {
    fn validate(&self) -> Result<(), CoreError> {
        validate_base(&self.base, &self.base_sha256)?;
        if !(32..=1024).contains(&self.input_size) || !self.input_size.is_multiple_of(16) {
            return Err(CoreError::spec(
                "model.input_size",
                format!(
                    "must be a multiple of 16 in 32..=1024, got {}",
                    self.input_size
                ),
            ));
        }
        Ok(())
    }
}

impl EncoderSpec {
    fn validate(&self) -> Result<(), CoreError> {
        validate_base(&self.base, &self.base_sha256)?;
        if !(1..=4096).contains(&self.max_seq_len) {
            return Err(CoreError::spec("model.max_seq_len", "must be 1..=4096"));
        }
        if let Adaptation::Lora {
            rank,
            alpha,
            dropout,
            target_modules,
        } = &self.adaptation
        {
            if !(1..=1024).contains(rank) {
                return Err(CoreError::spec("model.adaptation.rank", "must be 1..=1024"));
            }
            if !(alpha.is_finite() && *alpha > 0.0) {
                return Err(CoreError::spec(
                    "model.adaptation.alpha",
                    "must be positive",
                ));
            }
            if !(0.0..1.0).contains(dropout) {
                return Err(CoreError::spec(
                    "model.adaptation.dropout",
                    "must be in [0, 1)",
                ));
            }
            if target_modules.is_empty() {
                return Err(CoreError::spec(
                    "model.adaptation.target_modules",
                    "name at least one projection",
                ));
            }
            if let Some(bad) = target_modules
                .iter()
                .find(|t| !LORA_TARGETS.contains(&t.as_str()))
            {
                return Err(CoreError::spec(
                    "model.adaptation.target_modules",
                    format!("`{bad}` is not one of {LORA_TARGETS:?}"),
                ));
            }
            if let Some(dup) = first_duplicate(target_modules) {
                return Err(CoreError::spec(
                    "model.adaptation.target_modules",
                    format!("`{dup}` is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// A classification task: on tabular `features`, or on one `text` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Name of the dataset as each site registered it (never a path).
    pub dataset: String,
    /// Feature columns, in the order the model sees them (tabular tasks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The field holding the text (text tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The column holding each image (image tasks): `image` for an `image_folder` dataset,
    /// the path column's name for an `image_csv` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The label column or field.
    pub label: String,
    /// Class labels; class `i` is `labels[i]` at every site.
    pub labels: Vec<String>,
    /// Share of each site's rows kept aside for federated validation.
    #[serde(default = "default_validation")]
    pub validation_fraction: f64,
    /// How a tabular task's features are standardised: with the whole federation's means and
    /// deviations (`federated`, the default without differential privacy) or with each site's
    /// own (`local`, the default with it). Absent means the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<Standardize>,
}

/// How a tabular task's features are standardised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standardize {
    /// Before round 1 every site sends per-feature counts, sums and sums of squares of its
    /// training rows (never the rows); all sites then standardise with the pooled statistics,
    /// which travel with the run's models.
    Federated,
    /// Every site standardises with its own training rows' statistics; nothing leaves the site.
    Local,
}

impl Standardize {
    /// Lower-case name, as written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Standardize::Federated => "federated",
            Standardize::Local => "local",
        }
    }
}

fn default_validation() -> f64 {
    0.2
}

impl TaskSpec {
    /// How this task standardises its features (an image task's are its embeddings): `None`
    /// for a text task.
    pub fn standardization(&self, privacy: &Privacy) -> Option<Standardize> {
        if self.text.is_some() {
            return None;
        }
        // Exact sums are not covered by the run's privacy accounting: a private run keeps
        // them at the site unless its spec says otherwise (which validation refuses).
        Some(self.standardize.unwrap_or(if privacy.is_off() {
            Standardize::Federated
        } else {
            Standardize::Local
        }))
    }

    /// `tabular_classification`, `text_classification` or `image_classification` (what a
    /// site policy allows).
    pub fn kind(&self) -> &'static str {
        if self.text.is_some() {
            "text_classification"
        } else if self.image.is_some() {
            "image_classification"
        } else {
            "tabular_classification"
        }
    }

    /// The names of the features a model reads: the feature columns of a tabular task,
    /// `embedding_0` to `embedding_511` for an image task (the pooled embedding), none for text.
    pub fn feature_names(&self) -> Vec<String> {
        if self.image.is_some() {
            (0..IMAGE_EMBEDDING_WIDTH)
                .map(|i| format!("embedding_{i}"))
                .collect()
        } else {
            self.features.clone()
        }
    }

    /// How many features a model reads: `feature_names().len()` without naming them.
    pub fn feature_count(&self) -> usize {
        if self.image.is_some() {
            IMAGE_EMBEDDING_WIDTH
        } else {
            self.features.len()
        }
    }

    /// Every column or field the task reads, with the spec field that names it.
    pub fn columns(&self) -> impl Iterator<Item = (&'static str, &String)> {
        self.features
            .iter()
            .map(|c| ("task.features", c))
            .chain(self.text.iter().map(|c| ("task.text", c)))
            .chain(self.image.iter().map(|c| ("task.image", c)))
            .chain(std::iter::once(("task.label", &self.label)))
    }
}

/// Local optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Plain stochastic gradient descent.
    #[default]
    Sgd,
    /// AdamW (state is reset every round).
    Adamw,
}

/// How each site trains in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSpec {
    /// Passes over the local training split per round (ignored when `local_steps` > 0).
    pub local_epochs: u32,
    /// Exact number of mini-batch steps per round; 0 means use `local_epochs`.
    pub local_steps: u32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// L2 weight decay.
    pub weight_decay: f64,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            local_epochs: 1,
            local_steps: 0,
            batch_size: 32,
            learning_rate: 0.05,
            optimizer: Optimizer::Sgd,
            weight_decay: 0.0,
        }
    }
}

/// Aggregation strategy, selected by `name` in the `[strategy]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategySpec {
    /// Example-weighted federated averaging.
    #[default]
    Fedavg,
    /// FedAvg aggregation; sites add `(mu / 2) * ||w - w_global||^2` to their local loss.
    Fedprox {
        /// Proximal weight.
        mu: f64,
    },
    /// FedAvg with server momentum.
    Fedavgm {
        /// Server learning rate.
        #[serde(default = "one_f64")]
        server_learning_rate: f64,
        /// Momentum.
        #[serde(default = "default_momentum")]
        momentum: f64,
    },
    /// Adam on the server over the FedAvg pseudo-gradient.
    Fedadam(AdaptiveParams),
    /// Yogi on the server.
    Fedyogi(AdaptiveParams),
    /// Adagrad on the server.
    Fedadagrad {
        /// Server learning rate.
        #[serde(default = "default_eta")]
        eta: f64,
        /// Adaptivity.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean, cutting `beta` of the values at each end.
    TrimmedMean {
        /// Share cut at each end, in [0, 0.5).
        beta: f64,
    },
    /// Krum: the one update closest to its `n - f - 2` nearest others.
    Krum {
        /// Malicious sites tolerated.
        f: u32,
    },
    /// Multi-Krum: the example-weighted mean of the `keep` best Krum updates.
    MultiKrum {
        /// Malicious sites tolerated.
        f: u32,
        /// Updates averaged.
        keep: u32,
    },
    /// Bulyan: Krum selection, then a coordinate-wise trimmed mean around the median.
    Bulyan {
        /// Malicious sites tolerated; needs at least `4f + 3` sites.
        f: u32,
    },
}

/// Hyper-parameters of FedAdam and FedYogi (Reddi et al. 2021; defaults as Flower's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveParams {
    /// Server learning rate.
    #[serde(default = "default_eta")]
    pub eta: f64,
    /// First-moment decay.
    #[serde(default = "default_beta_1")]
    pub beta_1: f64,
    /// Second-moment decay.
    #[serde(default = "default_beta_2")]
    pub beta_2: f64,
    /// Adaptivity.
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn one_f64() -> f64 {
    1.0
}
fn default_momentum() -> f64 {
    0.9
}
fn default_eta() -> f64 {
    0.1
}
fn default_beta_1() -> f64 {
    0.9
}
fn default_beta_2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-9
}

impl StrategySpec {
    /// The strategy's `name` in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            StrategySpec::Fedavg => "fedavg",
            StrategySpec::Fedprox { .. } => "fedprox",
            StrategySpec::Fedavgm { .. } => "fedavgm",
            StrategySpec::Fedadam(_) => "fedadam",
            StrategySpec::Fedyogi(_) => "fedyogi",
            StrategySpec::Fedadagrad { .. } => "fedadagrad",
            StrategySpec::Median => "median",
            StrategySpec::TrimmedMean { .. } => "trimmed_mean",
            StrategySpec::Krum { .. } => "krum",
            StrategySpec::MultiKrum { .. } => "multi_krum",
            StrategySpec::Bulyan { .. } => "bulyan",
        }
    }

    /// The proximal weight sites use (FedProx), or 0.
    pub fn proximal_mu(&self) -> f64 {
        match self {
            StrategySpec::Fedprox { mu } => *mu,
            _ => 0.0,
        }
    }

    /// The server optimizer applied to the FedAvg pseudo-gradient, for FedAvgM, FedAdam,
    /// FedYogi and FedAdagrad.
    pub fn server_optimizer(&self) -> Option<ServerOptimizer> {
        Some(match *self {
            StrategySpec::Fedavgm {
                server_learning_rate,
                momentum,
            } => ServerOptimizer::FedAvgM {
                server_learning_rate,
                momentum,
            },
            StrategySpec::Fedadam(p) => ServerOptimizer::FedAdam {
                eta: p.eta,
                beta_1: p.beta_1,
                beta_2: p.beta_2,
                tau: p.tau,
            },
            StrategySpec::Fedyogi(p) => ServerOptimizer::FedYogi {
                eta: p.eta,
                beta_1: p.beta_1,
                beta_2: p.beta_2,
                tau: p.tau,
            },
            StrategySpec::Fedadagrad { eta, tau } => ServerOptimizer::FedAdagrad { eta, tau },
            _ => return None,
        })
    }

    /// Whether the strategy needs every update of a round at once (robust aggregation), rather
    /// than a running sum.
    pub fn needs_all_updates(&self) -> bool {
        matches!(
            self,
            StrategySpec::Median
                | StrategySpec::TrimmedMean { .. }
                | StrategySpec::Krum { .. }
                | StrategySpec::MultiKrum { .. }
                | StrategySpec::Bulyan { .. }
        )
    }

    /// Fewest updates the strategy can work with.
    pub fn min_updates(&self) -> u32 {
        match self {
            StrategySpec::Krum { f } | StrategySpec::MultiKrum { f, .. } => f + 3,
            StrategySpec::Bulyan { f } => 4 * f + 3,
            _ => 1,
        }
    }

    fn validate(&self, min_sites: u32) -> Result<(), CoreError> {
        // The server optimizers check their own hyper-parameters.
        if let Some(opt) = self.server_optimizer() {
            opt.validate()?;
        }
        match self {
            StrategySpec::Fedprox { mu } if !(mu.is_finite() && *mu >= 0.0) => {
                return Err(CoreError::spec(
                    "strategy.mu",
                    format!("must be zero or positive, got {mu}"),
                ));
            }
            StrategySpec::TrimmedMean { beta } if !(0.0..0.5).contains(beta) => {
                return Err(CoreError::spec(
                    "strategy.beta",
                    format!("must be in [0, 0.5), got {beta}"),
                ));
            }
            StrategySpec::MultiKrum { keep, .. } if *keep == 0 || *keep > min_sites => {
                return Err(CoreError::spec(
                    "strategy.keep",
                    format!("must be 1..=min_sites ({min_sites}), got {keep}"),
                ));
            }
            _ => {}
        }
        let need = self.min_updates();
        if min_sites < need {
            return Err(CoreError::spec(
                "min_sites",
                format!(
                    "{} needs at least {need} updates a round; min_sites is {min_sites}",
                    self.name()
                ),
            ));
        }
        Ok(())
    }
}

/// What the coordinator checks of every update before it counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseSpec {
    /// Bound on the L2 norm of `update - global`; none when absent.
    pub max_update_norm: Option<f64>,
    /// What to do with an update over the bound.
    pub norm_action: NormAction,
    /// Largest example count a site may claim (its FedAvg weight).
    pub max_examples: u64,
}

impl Default for DefenseSpec {
    fn default() -> Self {
        Self {
            max_update_norm: None,
            norm_action: NormAction::Reject,
            max_examples: 1_000_000,
        }
    }
}

/// What happens to an update whose distance to the global model exceeds the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormAction {
    /// Refuse it.
    #[default]
    Reject,
    /// Scale `update - global` down to the bound.
    Clip,
}

/// What a site says it holds: a dataset name and its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetInfo {
    /// Dataset name.
    pub name: String,
    /// Column names.
    pub columns: Vec<String>,
}

impl RunSpec {
    /// Parses and validates a spec; errors name the line or field.
    pub fn from_toml(text: &str) -> Result<Self, CoreError> {
        let spec: RunSpec = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!("line {line}")
                })
                .unwrap_or_else(|| "spec".into());
            CoreError::spec(field, e.message().to_string())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every value on its own.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.name.trim().is_empty() {
            return Err(CoreError::spec("name", "must not be empty"));
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(CoreError::spec(
                "rounds",
                format!("must be 1..={MAX_ROUNDS}, got {}", self.rounds),
            ));
        }
        if self.min_sites == 0 {
            return Err(CoreError::spec("min_sites", "must be at least 1"));
        }
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(CoreError::spec(
                "fraction",
                format!("must be in (0, 1], got {}", self.fraction),
            ));
        }
        if self.round_deadline_secs == 0 || self.round_deadline_secs > 7 * 24 * 3600 {
            return Err(CoreError::spec(
                "round_deadline_secs",
                "must be 1 second to 7 days",
            ));
        }
        let t = &self.task;
        match &self.model {
            ModelSpec::Mlp { hidden } => {
                if hidden.iter().any(|&h| h == 0 || h > 1 << 20) {
                    return Err(CoreError::spec(
                        "model.hidden",
                        "layer widths must be 1..=1048576",
                    ));
                }
                if t.features.is_empty() {
                    return Err(CoreError::spec(
                        "task.features",
                        "name at least one feature column",
                    ));
                }
                if t.text.is_some() || t.image.is_some() {
                    return Err(CoreError::spec(
                        if t.text.is_some() {
                            "task.text"
                        } else {
                            "task.image"
                        },
                        "an `mlp` model reads `features`, not text or images",
                    ));
                }
            }
            ModelSpec::Tinyvit(encoder) => {
                encoder.validate()?;
                match &t.image {
                    None => {
                        return Err(CoreError::spec(
                            "task.image",
                            "an image model needs the column holding the images (`image` \
                             for an image_folder dataset)",
                        ))
                    }
                    Some(column) if column == &t.label => {
                        return Err(CoreError::spec(
                            "task.image",
                            "the image column cannot be the label column",
                        ))
                    }
                    Some(_) => {}
                }
                if !t.features.is_empty() || t.text.is_some() {
                    return Err(CoreError::spec(
                        if t.text.is_some() {
                            "task.text"
                        } else {
                            "task.features"
                        },
                        "an image model reads `image`, not feature columns or text",
                    ));
                }
            }
            ModelSpec::Bert(encoder) => {
                encoder.validate()?;
                match &t.text {
                    None => {
                        return Err(CoreError::spec(
                            "task.text",
                            "a text model needs the field holding the text",
                        ))
                    }
                    Some(field) if field == &t.label => {
                        return Err(CoreError::spec(
                            "task.text",
                            "the text field cannot be the label field",
                        ))
                    }
                    Some(_) => {}
                }
                if !t.features.is_empty() || t.image.is_some() {
                    return Err(CoreError::spec(
                        if t.image.is_some() {
                            "task.image"
                        } else {
                            "task.features"
                        },
                        "a text model reads `text`, not feature columns or images",
                    ));
                }
            }
        }
        if t.dataset.trim().is_empty() {
            return Err(CoreError::spec("task.dataset", "must not be empty"));
        }
        if let Some(dup) = first_duplicate(&t.features) {
            return Err(CoreError::spec(
                "task.features",
                format!("`{dup}` is listed twice"),
            ));
        }
        if t.features.contains(&t.label) {
            return Err(CoreError::spec(
                "task.features",
                format!("the label column `{}` cannot be a feature", t.label),
            ));
        }
        if t.labels.len() < 2 {
            return Err(CoreError::spec("task.labels", "name at least two classes"));
        }
        if let Some(dup) = first_duplicate(&t.labels) {
            return Err(CoreError::spec(
                "task.labels",
                format!("`{dup}` is listed twice"),
            ));
        }
        if t.standardize.is_some() && t.text.is_some() {
            return Err(CoreError::spec(
                "task.standardize",
                "standardisation applies to feature columns; a text task has none",
            ));
        }
        if t.standardize == Some(Standardize::Federated) && !self.privacy.is_off() {
            return Err(CoreError::spec(
                "task.standardize",
                "`federated` sends each site's exact per-feature sums, which differential \
                 privacy does not account for; use `local` with `[privacy]`",
            ));
        }
        if !(0.0..=0.9).contains(&t.validation_fraction) {
            return Err(CoreError::spec(
                "task.validation_fraction",
                "must be in [0, 0.9]",
            ));
        }
        let tr = &self.training;
        if tr.local_epochs == 0 && tr.local_steps == 0 {
            return Err(CoreError::spec(
                "training.local_epochs",
                "set local_epochs or local_steps above 0",
            ));
        }
        if tr.local_epochs > MAX_LOCAL_EPOCHS {
            return Err(CoreError::spec(
                "training.local_epochs",
                format!(
                    "must be at most {MAX_LOCAL_EPOCHS}, got {}",
                    tr.local_epochs
                ),
            ));
        }
        if tr.local_steps > MAX_LOCAL_STEPS {
            return Err(CoreError::spec(
                "training.local_steps",
                format!("must be at most {MAX_LOCAL_STEPS}, got {}", tr.local_steps),
            ));
        }
        if tr.batch_size == 0 || tr.batch_size > 1 << 16 {
            return Err(CoreError::spec("training.batch_size", "must be 1..=65536"));
        }
        if !(tr.learning_rate.is_finite() && tr.learning_rate > 0.0) {
            return Err(CoreError::spec(
                "training.learning_rate",
                "must be a positive number",
            ));
        }
        if !(tr.weight_decay.is_finite() && tr.weight_decay >= 0.0) {
            return Err(CoreError::spec(
                "training.weight_decay",
                "must be zero or positive",
            ));
        }
        self.strategy.validate(self.min_sites)?;
        let d = &self.defense;
        if let Some(bound) = d.max_update_norm {
            if !(bound.is_finite() && bound > 0.0) {
                return Err(CoreError::spec(
                    "defense.max_update_norm",
                    format!("must be positive, got {bound}"),
                ));
            }
        }
        if d.max_examples == 0 {
            return Err(CoreError::spec(
                "defense.max_examples",
                "must be at least 1",
            ));
        }
        self.privacy.validate(self)?;
        Ok(())
    }

    /// Whether `dataset` is the run's dataset with every column the run names.
    pub fn fits(&self, dataset: &DatasetInfo) -> bool {
        dataset.name == self.task.dataset
            && self
                .task
                .columns()
                .all(|(_, c)| dataset.columns.iter().any(|d| d == c))
    }

    /// The pre-trained encoder the run adapts, if any.
    pub fn encoder(&self) -> Option<&EncoderSpec> {
        match &self.model {
            ModelSpec::Bert(e) => Some(e),
            ModelSpec::Mlp { .. } | ModelSpec::Tinyvit(_) => None,
        }
    }

    /// The pre-trained image encoder the run adapts, if any.
    pub fn image_encoder(&self) -> Option<&ImageEncoderSpec> {
        match &self.model {
            ModelSpec::Tinyvit(e) => Some(e),
            ModelSpec::Mlp { .. } | ModelSpec::Bert(_) => None,
        }
    }

    /// Checks the spec against the sites the coordinator knows: enough of them must hold the
    /// dataset with every named column.
    pub fn validate_against<'a>(
        &self,
        sites: impl IntoIterator<Item = &'a [DatasetInfo]>,
    ) -> Result<(), CoreError> {
        let t = &self.task;
        let mut known = 0usize;
        let holders: Vec<&DatasetInfo> = sites
            .into_iter()
            .inspect(|_| known += 1)
            .filter_map(|ds| ds.iter().find(|d| d.name == t.dataset))
            .collect();
        if holders.is_empty() {
            return Err(CoreError::spec(
                "task.dataset",
                format!(
                    "no registered site holds a dataset named `{}` ({} sites known)",
                    t.dataset, known
                ),
            ));
        }
        for (field, column) in t.columns() {
            if !holders.iter().any(|d| d.columns.contains(column)) {
                return Err(CoreError::spec(
                    field,
                    format!("no site's `{}` has a column `{column}`", t.dataset),
                ));
            }
        }
        let complete = holders.iter().filter(|d| self.fits(d)).count();
        if (complete as u32) < self.min_sites {
            return Err(CoreError::spec(
                "min_sites",
                format!(
                    "{} sites required but only {complete} registered sites hold `{}` with every column",
                    self.min_sites, t.dataset
                ),
            ));
        }
        Ok(())
    }
}

fn first_duplicate(items: &[String]) -> Option<&str> {
    let mut seen = BTreeSet::new();
    items
        .iter()
        .find(|i| !seen.insert(i.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SPEC: &str = r#"
name = "bc"
rounds = 3
min_sites = 2

[model]
kind = "mlp"
hidden = [8]

[task]
dataset = "bc"
features = ["x1", "x2"]
label = "y"
labels = ["B", "M"]
"#;

    fn site(name: &str, cols: &[&str]) -> (String, Vec<DatasetInfo>) {
        (
            name.into(),
            vec![DatasetInfo {
                name: "bc".into(),
                columns: cols.iter().map(|c| c.to_string()).collect(),
            }],
        )
    }

    #[test]
    fn parses_with_defaults() {
        let s = RunSpec::from_toml(SPEC).unwrap();
        assert_eq!(s.training, TrainingSpec::default());
        assert_eq!(s.strategy, StrategySpec::Fedavg);
        assert_eq!(s.fraction, 1.0);
        assert_eq!(RunSpec::from_toml(&s.to_toml()).unwrap(), s);
    }

    #[test]
    fn image_specs_read_an_image_column_through_a_pinned_encoder() {
        let sha = "a".repeat(64);
        let image = |model: &str, task: &str| {
            RunSpec::from_toml(&format!(
                "name = \"mri\"\nrounds = 2\n[model]\nkind = \"tinyvit\"\nbase = \"lite-medsam\"\n\
                 base_sha256 = \"{sha}\"\n{model}\n[task]\ndataset = \"mri\"\nlabel = \"label\"\n\
                 labels = [\"no\", \"yes\"]\n{task}\n"
            ))
        };
        let s = image("", "image = \"image\"").unwrap();
        let e = s.image_encoder().unwrap();
        assert_eq!(
            (e.input_size, e.resize, e.adaptation),
            (128, Resize::Stretch, ImageAdaptation::Head)
        );
        assert_eq!(s.task.kind(), "image_classification");
        assert_eq!(
            s.task.standardization(&s.privacy),
            Some(Standardize::Federated)
        );
        assert_eq!(s.task.feature_names().len(), IMAGE_EMBEDDING_WIDTH);
        assert_eq!(s.task.feature_count(), IMAGE_EMBEDDING_WIDTH);
        assert_eq!(s.task.feature_names()[511], "embedding_511");
        assert_eq!(RunSpec::from_toml(&s.to_toml()).unwrap(), s);
        let pad = image("input_size = 256\nresize = \"pad\"", "image = \"path\"").unwrap();
        assert_eq!(pad.image_encoder().unwrap().resize, Resize::Pad);
        for (model, task, field) in [
            ("", "", "task.image"),
            ("", "image = \"label\"", "task.image"),
            ("", "image = \"image\"\nfeatures = [\"x\"]", "task.features"),
            ("input_size = 100", "image = \"image\"", "model.input_size"),
            ("input_size = 16", "image = \"image\"", "model.input_size"),
        ] {
            let err = image(model, task).unwrap_err().to_string();
            assert!(err.contains(field), "{model} {task}: {err}");
        }
        let err = image("[model.adaptation]\nmethod = \"lora\"", "image = \"image\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora"), "{err}");
        // A tabular model given an image column is refused.
        let err = RunSpec::from_toml(&format!("{SPEC}image = \"image\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("task.image"), "{err}");
    }

    #[test]
    fn impossible_values_name_the_field() {
        let cases = [
            ("rounds = 3", "rounds = 0", "rounds"),
            ("min_sites = 2", "min_sites = 0", "min_sites"),
            ("labels = [\"B\", \"M\"]", "labels = [\"B\"]", "task.labels"),
            (
                "features = [\"x1\", \"x2\"]",
                "features = [\"x1\", \"x1\"]",
                "task.features",
            ),
            (
                "features = [\"x1\", \"x2\"]",
                "features = [\"x1\", \"y\"]",
                "task.features",
            ),
        ];
        for (from, to, field) in cases {
            let err = RunSpec::from_toml(&SPEC.replace(from, to)).unwrap_err();
            assert!(
                matches!(&err, CoreError::Spec { field: f, .. } if f == field),
                "{to}: {err}"
            );
        }
        let err = RunSpec::from_toml(&SPEC.replace("rounds = 3", "rounds = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        let err = RunSpec::from_toml(&format!("{SPEC}\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn absurd_training_lengths_are_refused() {
        for (table, field) in [
            ("local_epochs = 4294967295", "training.local_epochs"),
            ("local_steps = 4294967295", "training.local_steps"),
        ] {
            let err = RunSpec::from_toml(&format!("{SPEC}\n[training]\n{table}\n")).unwrap_err();
            assert!(
                matches!(&err, CoreError::Spec { field: f, .. } if f == field),
                "{table}: {err}"
            );
        }
    }

    #[test]
    fn strategies_parse_with_defaults_and_are_checked() {
        let with = |table: &str| RunSpec::from_toml(&format!("{SPEC}\n[strategy]\n{table}\n"));
        let s = with("name = \"fedadam\"").unwrap();
        assert_eq!(
            s.strategy,
            StrategySpec::Fedadam(AdaptiveParams {
                eta: 0.1,
                beta_1: 0.9,
                beta_2: 0.99,
                tau: 1e-9
            })
        );
        assert_eq!(
            with("name = \"fedprox\"\nmu = 0.5")
                .unwrap()
                .strategy
                .proximal_mu(),
            0.5
        );
        assert!(with("name = \"median\"")
            .unwrap()
            .strategy
            .needs_all_updates());
        let err = with("name = \"trimmed_mean\"\nbeta = 0.5").unwrap_err();
        assert!(err.to_string().contains("strategy.beta"), "{err}");
        // Bulyan with f = 1 needs 7 sites; the spec asks for 2.
        let err = with("name = \"bulyan\"\nf = 1").unwrap_err();
        assert!(err.to_string().contains("at least 7"), "{err}");
        let err = with("name = \"fedadam\"\nbeta_1 = 1.5").unwrap_err();
        assert!(err.to_string().contains("strategy.beta_1"), "{err}");
        let err = with("name = \"nope\"").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err =
            RunSpec::from_toml(&format!("{SPEC}\n[defense]\nmax_update_norm = -1\n")).unwrap_err();
        assert!(err.to_string().contains("defense.max_update_norm"), "{err}");
    }

    #[test]
    fn a_strategy_needing_more_sites_is_named_not_dumped() {
        let text = format!("{SPEC}\n[strategy]\nname = \"krum\"\nf = 1\n");
        let err = RunSpec::from_toml(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "run spec: min_sites: krum needs at least 4 updates a round; min_sites is 2"
        );
    }

    #[test]
    fn checked_against_registered_sites() {
        let s = RunSpec::from_toml(SPEC).unwrap();
        let good = [site("a", &["x1", "x2", "y"]), site("b", &["x1", "x2", "y"])];
        fn of(sites: &[(String, Vec<DatasetInfo>)]) -> Vec<&[DatasetInfo]> {
            sites.iter().map(|(_, d)| d.as_slice()).collect()
        }
        s.validate_against(of(&good)).unwrap();
        let err = s.validate_against(of(&good[..1])).unwrap_err();
        assert!(matches!(&err, CoreError::Spec { field, .. } if field == "min_sites"));
        let err = s
            .validate_against(of(&[site("a", &["x1", "y"]), site("b", &["x1", "y"])]))
            .unwrap_err();
        assert!(err.to_string().contains("`x2`"), "{err}");
        assert!(s.fits(&good[0].1[0]));
        assert!(!s.fits(&site("a", &["x1", "y"]).1[0]));
        let err = s.validate_against(of(&[])).unwrap_err();
        assert!(matches!(&err, CoreError::Spec { field, .. } if field == "task.dataset"));
    }
}
