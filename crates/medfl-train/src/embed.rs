//! Image embeddings from a frozen encoder: images are preprocessed as the run declares, run
//! through the encoder in batches on all cores, and pooled; each embedding is kept on disk under
//! the hash of (encoder weights, preprocessing, image bytes), so only the first round of the
//! first run on an image pays for the encoder.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};
use medfl_model::IMAGE_EMBEDDING;

use crate::image::{Pixels, Preprocess};
use crate::tinyvit::TinyVit;
use crate::TrainError;

/// Images per encoder batch: enough to keep the matrix products busy, few enough that a
/// 256×256 batch's activations stay within a few hundred MiB.
pub const BATCH: usize = 8;

/// A frozen image encoder with the preprocessing its run declares.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    vit: std::sync::Arc<TinyVit>,
    /// SHA-256 of the weights file it was loaded from.
    weights_sha256: String,
    preprocess: Preprocess,
}

/// Where each image's embedding is kept: `<dir>/<key[..2]>/<key>.f32`, the key being the
/// SHA-256 of the encoder's weights hash, the preprocessing and the image bytes.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
}

/// How far embedding has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedProgress {
    /// Images done (cached ones included).
    pub done: usize,
    /// Images in all.
    pub total: usize,
    /// Of those done, how many came from the cache.
    pub cached: usize,
}

impl ImageEncoder {
    /// `vit` (loaded from weights hashing to `weights_sha256`) with `preprocess`.
    pub fn new(vit: std::sync::Arc<TinyVit>, weights_sha256: &str, preprocess: Preprocess) -> Self {
        Self {
            vit,
            weights_sha256: weights_sha256.to_string(),
            preprocess,
        }
    }

    /// The preprocessing every image gets.
    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    /// The cache key of an image's bytes.
    fn key(&self, bytes: &[u8]) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.weights_sha256.as_bytes());
        ctx.update(b"\n");
        ctx.update(self.preprocess.describe().as_bytes());
        ctx.update(b"\n");
        ctx.update(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        ctx.finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Embeddings of preprocessed images (`3 × S × S` values each), `IMAGE_EMBEDDING` per image.
    pub fn embed_inputs(&self, inputs: &[Vec<f32>]) -> Result<Vec<f32>, TrainError> {
        let s = self.preprocess.size;
        let flat: Vec<f32> = inputs.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (inputs.len(), 3, s, s), &Device::Cpu)?;
        Ok(self.vit.pooled(&x)?.flatten_all()?.to_vec1()?)
    }

    /// The embedding of every file in `paths`, `IMAGE_EMBEDDING` values each in order, from
    /// `cache` where it has them (and kept there once computed). `cancel` is checked between
    /// batches; `progress` hears after each.
    pub fn embed_files(
        &self,
        paths: &[PathBuf],
        cache: Option<&EmbeddingCache>,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(EmbedProgress),
    ) -> Result<Vec<f32>, TrainError> {
        let mut out = vec![0f32; paths.len() * IMAGE_EMBEDDING];
        let mut state = EmbedProgress {
            done: 0,
            total: paths.len(),
            cached: 0,
        };
        // Images still to encode: their index, cache key and preprocessed input.
        let mut pending: Vec<(usize, String, Vec<f32>)> = Vec::with_capacity(BATCH);
        let flush = |pending: &mut Vec<(usize, String, Vec<f32>)>,
                     out: &mut [f32]|
         -> Result<usize, TrainError> {
            if pending.is_empty() {
                return Ok(0);
            }
            let inputs: Vec<Vec<f32>> = pending
                .iter_mut()
                .map(|p| std::mem::take(&mut p.2))
                .collect();
            let embeddings = self.embed_inputs(&inputs)?;
            for ((i, key, _), e) in pending.iter().zip(embeddings.chunks(IMAGE_EMBEDDING)) {
                out[i * IMAGE_EMBEDDING..(i + 1) * IMAGE_EMBEDDING].copy_from_slice(e);
                if let Some(cache) = cache {
                    cache.put(key, e)?;
                }
            }
            let n = pending.len();
            pending.clear();
            Ok(n)
        };
        for (i, path) in paths.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
            let key = self.key(&bytes);
            if let Some(e) = cache.and_then(|c| c.get(&key)) {
                out[i * IMAGE_EMBEDDING..(i + 1) * IMAGE_EMBEDDING].copy_from_slice(&e);
                state.done += 1;
                state.cached += 1;
                continue;
            }
            let pixels = Pixels::decode(path, &bytes)?;
            pending.push((i, key, self.preprocess.apply(&pixels)));
            if pending.len() == BATCH {
                state.done += flush(&mut pending, &mut out)?;
                progress(state);
            }
        }
        state.done += flush(&mut pending, &mut out)?;
        progress(state);
        Ok(out)
    }
}

impl EmbeddingCache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.f32"))
    }

    /// The embedding kept under `key`; a missing, short or unreadable file is a miss (the
    /// embedding is then computed again and the file replaced).
    pub fn get(&self, key: &str) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        (bytes.len() == IMAGE_EMBEDDING * 4).then(|| {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    /// Keeps `embedding` under `key`, written whole or not at all.
    pub fn put(&self, key: &str, embedding: &[f32]) -> Result<(), TrainError> {
        let path = self.path(key);
        let io = |source| TrainError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let bytes: Vec<u8> = embedding.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tmp = path.with_extension("f32.tmp");
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}
