//! Base models for training: the registry of [`medfl_model::BaseModels`] (found by name,
//! pinned by the SHA-256 of their weights), plus each model's weights as candle tensors and
//! its tokenizer, loaded on first use and shared however many runs use them.

use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Device, Tensor};

use medfl_core::spec::ImageEncoderSpec;

use crate::bert::BertModel;
use crate::embed::ImageEncoder;
use crate::image::Preprocess;
use crate::tinyvit::{TinyVit, TinyVitConfig};
use crate::tokenize::TextTokenizer;
use crate::TrainError;

pub use medfl_model::base::{sha256_file, BASE_FILES};

/// Where base models are ([`medfl_model::BaseModels`]), with what training loads of them.
#[derive(Debug, Default)]
pub struct BaseModels {
    registry: medfl_model::BaseModels,
    loaded: Mutex<HashMap<String, Arc<BaseModel>>>,
    /// Image encoders by the SHA-256 of their weights, loaded once.
    encoders: Mutex<HashMap<String, Arc<TinyVit>>>,
}

/// The guarded value; a panic elsewhere while holding the lock leaves only a cache behind,
/// which stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl BaseModels {
    /// Models in `dirs` by name, and those fetched into `fetched` by hash.
    pub fn new(dirs: BTreeMap<String, PathBuf>, fetched: Option<PathBuf>) -> Self {
        Self::from(medfl_model::BaseModels::new(dirs, fetched))
    }

    /// No base models (tabular runs only).
    pub fn none() -> Self {
        Self::default()
    }

    /// The registry without the training side: what [`medfl_model::RunModel`] takes.
    pub fn registry(&self) -> &medfl_model::BaseModels {
        &self.registry
    }

    /// The configured directories by name.
    pub fn dirs(&self) -> &BTreeMap<String, PathBuf> {
        self.registry.dirs()
    }

    /// Where a model fetched by hash lives (whether or not it is there yet).
    pub fn fetched_dir(&self, sha256: &str) -> Option<PathBuf> {
        self.registry.fetched_dir(sha256)
    }

    /// SHA-256 of `dir/model.safetensors`, computed once per file version.
    pub fn weights_sha256(&self, dir: &Path) -> Result<String, TrainError> {
        Ok(self.registry.weights_sha256(dir)?)
    }

    /// The directory holding base `name` with weights `sha256` ([`medfl_model::BaseModels::locate`]).
    pub fn locate(&self, name: &str, sha256: &str) -> Result<Option<PathBuf>, TrainError> {
        Ok(self.registry.locate(name, sha256)?)
    }

    /// Base `name` pinned by `sha256`, opened once and shared.
    pub fn resolve(&self, name: &str, sha256: &str) -> Result<Arc<BaseModel>, TrainError> {
        if let Some(model) = lock(&self.loaded).get(sha256) {
            return Ok(model.clone());
        }
        Ok(self.loading(self.registry.resolve(name, sha256)?))
    }

    /// The image encoder a spec pins, with the preprocessing it declares: its weights file
    /// ([`medfl_model::BaseModels::locate_weights`]) loaded once per hash.
    pub fn image_encoder(&self, spec: &ImageEncoderSpec) -> Result<ImageEncoder, TrainError> {
        let path = self
            .registry
            .locate_weights(&spec.base, &spec.base_sha256)?;
        let cached = lock(&self.encoders).get(&spec.base_sha256).cloned();
        let vit = match cached {
            Some(vit) => vit,
            None => {
                let vit = Arc::new(TinyVit::load(
                    &path,
                    TinyVitConfig::lite_medsam(),
                    &Device::Cpu,
                )?);
                lock(&self.encoders).insert(spec.base_sha256.clone(), vit.clone());
                vit
            }
        };
        Ok(ImageEncoder::new(
            vit,
            &spec.base_sha256,
            Preprocess::of(spec),
        ))
    }

    /// The training side of `model`, one per weights hash.
    pub(crate) fn loading(&self, model: Arc<medfl_model::BaseModel>) -> Arc<BaseModel> {
        lock(&self.loaded)
            .entry(model.sha256.clone())
            .or_insert_with(|| Arc::new(BaseModel::new(model)))
            .clone()
    }
}

impl From<medfl_model::BaseModels> for BaseModels {
    fn from(registry: medfl_model::BaseModels) -> Self {
        Self {
            registry,
            loaded: Mutex::default(),
            encoders: Mutex::default(),
        }
    }
}

/// One base model ([`medfl_model::BaseModel`]: name, directory, pinned hash, config), with its
/// weights and tokenizer read on first use.
#[derive(Debug)]
pub struct BaseModel {
    model: Arc<medfl_model::BaseModel>,
    weights: Mutex<Option<Arc<Weights>>>,
    tokenizer: Mutex<Option<Arc<TextTokenizer>>>,
}

/// Its name, directory, hash, config and weights size.
impl Deref for BaseModel {
    type Target = medfl_model::BaseModel;

    fn deref(&self) -> &Self::Target {
        &self.model
    }
}

/// A base model's tensors as the checkpoint names them, and the encoder built from them (the
/// two share storage).
#[derive(Debug)]
pub struct Weights {
    /// Every tensor, by checkpoint name.
    pub tensors: HashMap<String, Tensor>,
    /// The frozen encoder.
    pub encoder: BertModel,
}

impl BaseModel {
    /// The training side of `model`, nothing loaded yet.
    pub fn new(model: Arc<medfl_model::BaseModel>) -> Self {
        Self {
            model,
            weights: Mutex::new(None),
            tokenizer: Mutex::new(None),
        }
    }

    /// Reads `config.json` of the model in `dir`, whose weights the caller has checked.
    pub fn open(name: &str, dir: &Path, sha256: &str) -> Result<Self, TrainError> {
        let model = medfl_model::BaseModel::open(name, dir, sha256)?;
        Ok(Self::new(Arc::new(model)))
    }

    /// The model without the training side.
    pub fn model(&self) -> &Arc<medfl_model::BaseModel> {
        &self.model
    }

    /// The weights, read on first use. The file is hashed again as it is read, so weights that
    /// changed on disk since the run was checked are refused.
    pub fn weights(&self) -> Result<Arc<Weights>, TrainError> {
        let mut slot = lock(&self.weights);
        if let Some(w) = slot.as_ref() {
            return Ok(w.clone());
        }
        let bytes = self.model.read_weights()?;
        let path = self.model.weights_path();
        let in_file =
            |message: String| TrainError::Weights(format!("{}: {message}", path.display()));
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| in_file(e.to_string()))?;
        drop(bytes);
        let encoder = BertModel::from_tensors(self.config.clone(), &tensors, &Device::Cpu)
            .map_err(|e| match e {
                TrainError::Weights(message) => in_file(message),
                other => other,
            })?;
        let w = Arc::new(Weights { tensors, encoder });
        *slot = Some(w.clone());
        Ok(w)
    }

    /// The tokenizer, read on first use.
    pub fn tokenizer(&self) -> Result<Arc<TextTokenizer>, TrainError> {
        let mut slot = lock(&self.tokenizer);
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(TextTokenizer::from_file(self.dir.join("tokenizer.json"))?);
        *slot = Some(t.clone());
        Ok(t)
    }
}

impl Weights {
    /// The tensor `name` (looked up with or without a `bert.` prefix).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
    }
}
