//! Pre-trained base models on local disk, found by name and pinned by the SHA-256 of their
//! weights; each is hashed once and loaded once however many runs use it.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use candle_core::{Device, Tensor};

use crate::bert::{BertConfig, BertModel};
use crate::tokenize::TextTokenizer;
use crate::TrainError;

/// The files of a base model directory (Hugging Face layout) that medfl reads and serves.
pub const BASE_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// SHA-256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

/// A file's length, modification time and SHA-256.
type HashStamp = (u64, Option<SystemTime>, String);

/// Where base models are: directories by name, plus a folder of models fetched by hash
/// (`<fetched>/<sha256>/`).
#[derive(Debug, Default)]
pub struct BaseModels {
    dirs: BTreeMap<String, PathBuf>,
    fetched: Option<PathBuf>,
    /// Hash of each weights file, valid while its length and modification time are unchanged.
    hashes: Mutex<HashMap<PathBuf, HashStamp>>,
    loaded: Mutex<HashMap<String, Arc<BaseModel>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl BaseModels {
    /// Models in `dirs` by name, and those fetched into `fetched` by hash.
    pub fn new(dirs: BTreeMap<String, PathBuf>, fetched: Option<PathBuf>) -> Self {
        Self {
            dirs,
            fetched,
            ..Self::default()
        }
    }

    /// No base models (tabular runs only).
    pub fn none() -> Self {
        Self::default()
    }

    /// The configured directories by name.
    pub fn dirs(&self) -> &BTreeMap<String, PathBuf> {
        &self.dirs
    }

    /// Where a model fetched by hash lives (whether or not it is there yet).
    pub fn fetched_dir(&self, sha256: &str) -> Option<PathBuf> {
        self.fetched.as_ref().map(|f| f.join(sha256))
    }

    /// SHA-256 of `dir/model.safetensors`, computed once per file version.
    pub fn weights_sha256(&self, dir: &Path) -> Result<String, TrainError> {
        let path = dir.join("model.safetensors");
        let meta = std::fs::metadata(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let stamp = (meta.len(), meta.modified().ok());
        if let Some((len, modified, sha)) = lock(&self.hashes).get(&path) {
            if (*len, *modified) == stamp {
                return Ok(sha.clone());
            }
        }
        let sha = sha256_file(&path)?;
        lock(&self.hashes).insert(path, (stamp.0, stamp.1, sha.clone()));
        Ok(sha)
    }

    /// The directory holding base `name` with weights `sha256`: the one configured under that
    /// name (refused if its weights differ), else one fetched by hash. `None` when neither exists.
    pub fn locate(&self, name: &str, sha256: &str) -> Result<Option<PathBuf>, TrainError> {
        if let Some(dir) = self.dirs.get(name) {
            let actual = self.weights_sha256(dir)?;
            if actual != sha256 {
                return Err(TrainError::BaseModel(format!(
                    "base model `{name}` at {} has weights with SHA-256 {actual}, but the run pins \
                     {sha256}: refusing to train other weights than the run names",
                    dir.display()
                )));
            }
            return Ok(Some(dir.clone()));
        }
        if let Some(dir) = self.fetched_dir(sha256) {
            if dir.join("model.safetensors").is_file() {
                let actual = self.weights_sha256(&dir)?;
                if actual != sha256 {
                    return Err(TrainError::BaseModel(format!(
                        "fetched base model at {} has weights with SHA-256 {actual}, not {sha256}",
                        dir.display()
                    )));
                }
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    /// Base `name` pinned by `sha256`, loaded once and shared.
    pub fn resolve(&self, name: &str, sha256: &str) -> Result<Arc<BaseModel>, TrainError> {
        if let Some(model) = lock(&self.loaded).get(sha256) {
            return Ok(model.clone());
        }
        let dir = self.locate(name, sha256)?.ok_or_else(|| {
            TrainError::BaseModel(format!(
                "no base model `{name}` with weights SHA-256 {sha256} here: list its directory \
                 under [base_models] in the config"
            ))
        })?;
        let model = Arc::new(BaseModel::open(name, &dir, sha256)?);
        lock(&self.loaded).insert(sha256.to_string(), model.clone());
        Ok(model)
    }
}

/// One base model: its config and tokenizer at once, its weights on first use.
#[derive(Debug)]
pub struct BaseModel {
    /// The name it was found under.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// SHA-256 of its weights file.
    pub sha256: String,
    /// Its architecture.
    pub config: BertConfig,
    /// Size of its weights file in bytes (what an update is compared with).
    pub weights_bytes: u64,
    weights: Mutex<Option<Arc<Weights>>>,
    tokenizer: Mutex<Option<Arc<TextTokenizer>>>,
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
    /// Reads `config.json` of the model in `dir`.
    pub fn open(name: &str, dir: &Path, sha256: &str) -> Result<Self, TrainError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        let weights_bytes = std::fs::metadata(&weights)
            .map_err(|source| TrainError::Io {
                path: weights,
                source,
            })?
            .len();
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            sha256: sha256.to_string(),
            config,
            weights_bytes,
            weights: Mutex::new(None),
            tokenizer: Mutex::new(None),
        })
    }

    /// The weights, read on first use. The file is hashed again as it is read, so weights that
    /// changed on disk since the run was checked are refused.
    pub fn weights(&self) -> Result<Arc<Weights>, TrainError> {
        let mut slot = lock(&self.weights);
        if let Some(w) = slot.as_ref() {
            return Ok(w.clone());
        }
        let path = self.dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        if actual != self.sha256 {
            return Err(TrainError::BaseModel(format!(
                "{} changed: its SHA-256 is now {actual}, the run pins {}",
                path.display(),
                self.sha256
            )));
        }
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
