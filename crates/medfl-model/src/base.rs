//! Pre-trained base models on local disk, found by name and pinned by the SHA-256 of their
//! weights; each weights file is hashed once per version and each config read once however
//! many runs use it.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::bert::BertConfig;
use crate::ModelError;

/// The files of a base model directory (Hugging Face layout) that medfl reads and serves.
pub const BASE_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// The weights file of a base model directory.
const WEIGHTS_FILE: &str = "model.safetensors";

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// SHA-256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let io = |source| ModelError::Io {
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
    Ok(hex(ctx.finish().as_ref()))
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
    resolved: Mutex<HashMap<String, Arc<BaseModel>>>,
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
    pub fn weights_sha256(&self, dir: &Path) -> Result<String, ModelError> {
        self.file_sha256(&dir.join(WEIGHTS_FILE))
    }

    /// The weights file of base `name`, which must hash to `sha256`: the configured path when
    /// it is a file, else its `model.safetensors` (an image encoder's whole checkpoint, such as
    /// LiteMedSAM's, is one file). Refused when absent or when its weights differ.
    pub fn locate_weights(&self, name: &str, sha256: &str) -> Result<PathBuf, ModelError> {
        let missing = || ModelError::BaseMissing {
            name: name.to_string(),
            sha256: sha256.to_string(),
        };
        let configured = self.dirs.get(name).ok_or_else(missing)?;
        let path = if configured.is_file() {
            configured.clone()
        } else {
            configured.join(WEIGHTS_FILE)
        };
        let actual = self.file_sha256(&path)?;
        if actual != sha256 {
            return Err(ModelError::BaseMismatch {
                name: name.to_string(),
                dir: configured.clone(),
                actual,
                pinned: sha256.to_string(),
            });
        }
        Ok(path)
    }

    /// SHA-256 of a file, computed once per file version (length and modification time).
    pub fn file_sha256(&self, path: &Path) -> Result<String, ModelError> {
        let path = path.to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|source| ModelError::Io {
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
    pub fn locate(&self, name: &str, sha256: &str) -> Result<Option<PathBuf>, ModelError> {
        if let Some(dir) = self.dirs.get(name) {
            let actual = self.weights_sha256(dir)?;
            if actual != sha256 {
                return Err(ModelError::BaseMismatch {
                    name: name.to_string(),
                    dir: dir.clone(),
                    actual,
                    pinned: sha256.to_string(),
                });
            }
            return Ok(Some(dir.clone()));
        }
        if let Some(dir) = self.fetched_dir(sha256) {
            if dir.join(WEIGHTS_FILE).is_file() {
                let actual = self.weights_sha256(&dir)?;
                if actual != sha256 {
                    return Err(ModelError::FetchedMismatch {
                        dir,
                        actual,
                        pinned: sha256.to_string(),
                    });
                }
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    /// Base `name` pinned by `sha256`, opened once and shared.
    pub fn resolve(&self, name: &str, sha256: &str) -> Result<Arc<BaseModel>, ModelError> {
        if let Some(model) = lock(&self.resolved).get(sha256) {
            return Ok(model.clone());
        }
        let dir = self
            .locate(name, sha256)?
            .ok_or_else(|| ModelError::BaseMissing {
                name: name.to_string(),
                sha256: sha256.to_string(),
            })?;
        let model = Arc::new(BaseModel::open(name, &dir, sha256)?);
        lock(&self.resolved).insert(sha256.to_string(), model.clone());
        Ok(model)
    }
}

/// One base model: where it is, which weights it pins, and its architecture.
#[derive(Debug, Clone, PartialEq)]
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
}

impl BaseModel {
    /// Reads `config.json` of the model in `dir`, whose weights the caller has checked to be
    /// `sha256`.
    pub fn open(name: &str, dir: &Path, sha256: &str) -> Result<Self, ModelError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join(WEIGHTS_FILE);
        let weights_bytes = std::fs::metadata(&weights)
            .map_err(|source| ModelError::Io {
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
        })
    }

    /// Its weights file, `model.safetensors`.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// The bytes of the weights file, hashed again as they are read: weights that changed on
    /// disk since the run was checked are refused. Parse them with
    /// [`Checkpoint::parse`](crate::checkpoint::Checkpoint::parse).
    pub fn read_weights(&self) -> Result<Vec<u8>, ModelError> {
        let path = self.weights_path();
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = sha256_hex(&bytes);
        if actual != self.sha256 {
            return Err(ModelError::BaseChanged {
                path,
                actual,
                pinned: self.sha256.clone(),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::write_base;

    #[test]
    fn bases_are_found_by_name_or_hash_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_base(dir.path(), 0.0);
        assert_eq!(sha, sha256_file(&dir.path().join(WEIGHTS_FILE)).unwrap());
        let other = tempfile::tempdir().unwrap();
        let other_sha = write_base(other.path(), 1.0);
        assert_ne!(sha, other_sha);

        let bases = BaseModels::new(
            BTreeMap::from([("tiny".into(), dir.path().to_path_buf())]),
            None,
        );
        assert_eq!(bases.weights_sha256(dir.path()).unwrap(), sha);
        let base = bases.resolve("tiny", &sha).unwrap();
        assert_eq!((base.name.as_str(), base.sha256.as_str()), ("tiny", &*sha));
        assert_eq!(base.config.hidden_size, 8);
        assert!(Arc::ptr_eq(&base, &bases.resolve("tiny", &sha).unwrap()));
        assert_eq!(
            base.read_weights().unwrap().len() as u64,
            base.weights_bytes
        );

        let err = bases.resolve("tiny", &other_sha).unwrap_err();
        assert!(matches!(err, ModelError::BaseMismatch { .. }) && err.is_base_model());
        let err = err.to_string();
        assert!(err.contains(&sha) && err.contains(&other_sha), "{err}");
        assert!(err.contains("refusing"), "{err}");
        let err = bases.resolve("absent", &other_sha).unwrap_err();
        assert!(matches!(err, ModelError::BaseMissing { .. }), "{err}");
        assert!(err.to_string().contains("no base model `absent`"), "{err}");
        assert!(bases.fetched_dir(&sha).is_none());

        // A model fetched by hash is found under its hash, and refused under another.
        let fetched = tempfile::tempdir().unwrap();
        write_base(&fetched.path().join(&other_sha), 1.0);
        write_base(&fetched.path().join(&sha), 1.0);
        let bases = BaseModels::new(BTreeMap::new(), Some(fetched.path().to_path_buf()));
        let base = bases.resolve("any", &other_sha).unwrap();
        assert_eq!(base.dir, fetched.path().join(&other_sha));
        let err = bases.locate("any", &sha).unwrap_err();
        assert!(matches!(err, ModelError::FetchedMismatch { .. }), "{err}");
        assert!(bases.locate("any", "0000").unwrap().is_none());
    }

    #[test]
    fn weights_that_change_after_the_check_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sha = write_base(dir.path(), 0.0);
        let base = BaseModel::open("tiny", dir.path(), &sha).unwrap();
        write_base(dir.path(), 2.0);
        let err = base.read_weights().unwrap_err();
        assert!(matches!(err, ModelError::BaseChanged { .. }) && err.is_base_model());
        assert!(err.to_string().contains("changed"), "{err}");
    }
}
