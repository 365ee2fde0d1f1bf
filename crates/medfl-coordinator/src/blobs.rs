//! Content-addressed blob storage on disk: every model and update is a file named by the SHA-256
//! of its bytes, written to a temporary file first and renamed into place once verified.
//!
//! Files have owners (references in the state database, see `store::BlobRef`); this module only
//! keeps a file from being collected between the moment it is stored and the moment its writer
//! records its owner: [`Incoming::finish`] pins the id, [`BlobStore::unpin`] lets it go, and
//! [`BlobStore::collect`] skips pinned ids. Two runs, an update and a model may share one file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest::{Context, SHA256};

use crate::CoordinatorError;

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&SHA256, bytes))
}

/// Whether `id` looks like a blob id (64 lowercase hex digits).
pub fn is_blob_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Blobs under one directory: `root/ab/abcdef...`, temporary files under `root/tmp`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Ids stored but not yet owned, with how many writers hold each. Held while a file is put
    /// in place and while collection decides, so the two never interleave.
    pins: Arc<Mutex<HashMap<String, usize>>>,
}

impl BlobStore {
    /// Opens (creating) the store at `root` and clears temporaries left by a crash.
    pub fn open(root: &Path) -> Result<Self, CoordinatorError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| CoordinatorError::io(format!("clearing {}", tmp.display()), e))?;
        }
        medfl_daemon::create_private_dir(&tmp)
            .and_then(|()| medfl_daemon::create_private_dir(root))
            .map_err(|e| CoordinatorError::io(format!("creating {}", tmp.display()), e))?;
        Ok(Self {
            root: root.to_path_buf(),
            pins: Arc::default(),
        })
    }

    fn pins(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // The map stays consistent even if a holder panicked: each update is one statement.
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes over the pin [`Incoming::finish`] took on `id`: it is let go when the guard drops,
    /// however its holder's work ends (refused, failed, cancelled).
    pub fn pinned(&self, id: &str) -> Pinned {
        Pinned {
            store: self.clone(),
            id: id.to_string(),
        }
    }

    /// Lets go of a pin taken by [`Incoming::finish`], once the blob's owner is recorded.
    pub fn unpin(&self, id: &str) {
        let mut pins = self.pins();
        if let Some(n) = pins.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(id);
            }
        }
    }

    /// Deletes each of `ids` that is neither pinned nor, by `owned`, referenced; returns the
    /// ids deleted and the bytes freed. `owned` is asked while new blobs are kept from landing.
    pub fn collect(
        &self,
        ids: impl IntoIterator<Item = String>,
        owned: impl Fn(&str) -> Result<bool, CoordinatorError>,
    ) -> Result<(Vec<String>, u64), CoordinatorError> {
        let pins = self.pins();
        let mut freed = (Vec::new(), 0);
        for id in ids {
            if pins.contains_key(&id) || owned(&id)? {
                continue;
            }
            let size = self.size(&id).unwrap_or(0);
            self.remove(&id)?;
            freed.0.push(id);
            freed.1 += size;
        }
        Ok(freed)
    }

    /// Every blob id on disk (temporary files excluded).
    pub fn ids(&self) -> Result<Vec<String>, CoordinatorError> {
        let read = |dir: &Path| {
            std::fs::read_dir(dir)
                .map_err(|e| CoordinatorError::io(format!("listing {}", dir.display()), e))
        };
        let mut ids = Vec::new();
        for shard in read(&self.root)? {
            let shard = shard.map_err(|e| CoordinatorError::io("listing blobs", e))?;
            let name = shard.file_name();
            if name.len() != 2 || !shard.path().is_dir() {
                continue;
            }
            for file in read(&shard.path())? {
                let file = file.map_err(|e| CoordinatorError::io("listing blobs", e))?;
                if let Some(id) = file.file_name().to_str().filter(|id| is_blob_id(id)) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The file holding blob `id`.
    pub fn path(&self, id: &str) -> Result<PathBuf, CoordinatorError> {
        if !is_blob_id(id) {
            return Err(CoordinatorError::Invalid(format!(
                "`{id}` is not a SHA-256 in lowercase hex"
            )));
        }
        Ok(self.root.join(&id[..2]).join(id))
    }

    /// Size of blob `id`, or `NotFound`.
    pub fn size(&self, id: &str) -> Result<u64, CoordinatorError> {
        let path = self.path(id)?;
        std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|_| CoordinatorError::NotFound(format!("no blob {id}")))
    }

    /// Stores `bytes` and returns their id, pinned (blocking: call off the async threads for big
    /// blobs).
    pub fn put(&self, bytes: &[u8]) -> Result<String, CoordinatorError> {
        let mut incoming = self.incoming()?;
        incoming.write(bytes)?;
        incoming.finish(None)
    }

    /// Starts a streamed write.
    pub fn incoming(&self) -> Result<Incoming, CoordinatorError> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .map_err(|e| CoordinatorError::io("creating a temporary blob", e))?;
        Ok(Incoming {
            store: self.clone(),
            tmp,
            hasher: Context::new(&SHA256),
            len: 0,
        })
    }

    /// Deletes blob `id` (missing is fine).
    pub fn remove(&self, id: &str) -> Result<(), CoordinatorError> {
        match std::fs::remove_file(self.path(id)?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CoordinatorError::io(format!("removing blob {id}"), e))
            }
            _ => Ok(()),
        }
    }
}

/// A stored blob kept from collection until dropped (see [`BlobStore::pinned`]).
#[derive(Debug)]
pub struct Pinned {
    store: BlobStore,
    id: String,
}

impl Pinned {
    /// The blob's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.store.unpin(&self.id);
    }
}

/// A blob being written; dropped unfinished, its temporary file is deleted.
pub struct Incoming {
    store: BlobStore,
    tmp: tempfile::NamedTempFile,
    hasher: Context,
    len: u64,
}

impl Incoming {
    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), CoordinatorError> {
        self.tmp
            .write_all(bytes)
            .map_err(|e| CoordinatorError::io("writing a temporary blob", e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The temporary file, for reading back before the blob is committed.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Verifies the hash against `expected` (when given) and moves the blob into place, pinned
    /// until its writer records an owner and calls [`BlobStore::unpin`].
    pub fn finish(self, expected: Option<&str>) -> Result<String, CoordinatorError> {
        let id = hex::encode(self.hasher.finish());
        if let Some(expected) = expected {
            if expected != id {
                return Err(CoordinatorError::Corrupt(format!(
                    "SHA-256 mismatch: announced {expected}, bytes hash to {id}"
                )));
            }
        }
        let dest = self.store.path(&id)?;
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CoordinatorError::io(format!("creating {}", dir.display()), e))?;
        }
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| CoordinatorError::io("syncing a blob", e))?;
        let mut pins = self.store.pins();
        self.tmp
            .persist(&dest)
            .map_err(|e| CoordinatorError::io(format!("storing blob {id}"), e.error))?;
        *pins.entry(id.clone()).or_default() += 1;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let id = store.put(b"hello").unwrap();
        assert_eq!(id, sha256_hex(b"hello"));
        assert_eq!(std::fs::read(store.path(&id).unwrap()).unwrap(), b"hello");
        assert_eq!(store.size(&id).unwrap(), 5);
        let mut inc = store.incoming().unwrap();
        inc.write(b"hel").unwrap();
        inc.write(b"lo!").unwrap();
        let err = inc.finish(Some(&id)).unwrap_err();
        assert!(matches!(err, CoordinatorError::Corrupt(_)));
        assert!(store.path("../../etc/passwd").is_err());
        store.remove(&id).unwrap();
        assert!(store.size(&id).is_err());
    }

    #[test]
    fn collection_spares_pinned_and_owned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = store.put(b"a").unwrap();
        let b = store.put(b"b").unwrap();
        let c = store.put(b"c").unwrap();
        let owned = |id: &str| Ok(id == b);
        // Still pinned by their writers: nothing goes.
        let (gone, _) = store.collect([a.clone(), b.clone()], owned).unwrap();
        assert!(gone.is_empty());
        store.unpin(&a);
        store.unpin(&b);
        let (gone, bytes) = store.collect([a.clone(), b.clone()], owned).unwrap();
        assert_eq!((gone, bytes), (vec![a.clone()], 1));
        assert_eq!(store.ids().unwrap(), {
            let mut ids = vec![b, c];
            ids.sort();
            ids
        });
    }
}
