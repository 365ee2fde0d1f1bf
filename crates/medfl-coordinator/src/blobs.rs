//! Content-addressed blob storage on disk: every model and update is a file named by the SHA-256
//! of its bytes, written to a temporary file first and renamed into place once verified.

use std::io::Write;
use std::path::{Path, PathBuf};

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
}

impl BlobStore {
    /// Opens (creating) the store at `root` and clears temporaries left by a crash.
    pub fn open(root: &Path) -> Result<Self, CoordinatorError> {
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| CoordinatorError::io(format!("clearing {}", tmp.display()), e))?;
        }
        std::fs::create_dir_all(&tmp)
            .map_err(|e| CoordinatorError::io(format!("creating {}", tmp.display()), e))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
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

    /// Stores `bytes` and returns their id (blocking: call off the async threads for big blobs).
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

    /// Verifies the hash against `expected` (when given) and moves the blob into place.
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
        self.tmp
            .persist(&dest)
            .map_err(|e| CoordinatorError::io(format!("storing blob {id}"), e.error))?;
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
}
