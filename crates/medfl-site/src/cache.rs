//! The site's cache of global models: downloaded in chunks (resuming a partial download),
//! verified against their SHA-256, and pruned to the most recent few.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use medfl_proto::v1;
use ring::digest::{Context, SHA256};

use crate::client::Client;
use crate::SiteError;

/// Global models on disk under `data_dir/models`.
pub struct ModelCache {
    dir: PathBuf,
    keep: usize,
}

impl ModelCache {
    /// Opens (creating) the cache.
    pub fn open(data_dir: &Path, keep: usize) -> Result<Self, SiteError> {
        let dir = data_dir.join("models");
        // Global models are derived from every hospital's data: the owner's alone.
        medfl_daemon::create_private_dir(&dir)
            .map_err(|e| SiteError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { dir, keep })
    }

    /// The bytes of model `sha256`, downloading it if needed. Returns `(bytes, downloaded)`.
    pub async fn fetch(
        &self,
        client: &mut Client,
        sha256: &str,
        size: u64,
    ) -> Result<(Vec<u8>, u64), SiteError> {
        if !(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(SiteError::Corrupt(format!("`{sha256}` is not a SHA-256")));
        }
        let done = self.dir.join(sha256);
        if let Ok(bytes) = read_verified(&done, sha256) {
            return Ok((bytes, 0));
        }
        let part = self.dir.join(format!("{sha256}.part"));
        let received = download(client, sha256, size, &part).await?;
        let bytes = match read_verified(&part, sha256) {
            Ok(bytes) => bytes,
            Err(e) => {
                // A corrupt partial file must not be resumed.
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        std::fs::rename(&part, &done)
            .map_err(|e| SiteError::io(format!("storing {}", done.display()), e))?;
        self.prune();
        Ok((bytes, received))
    }

    /// Keeps the `keep` most recently written models.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".part"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        files.sort();
        let excess = files.len().saturating_sub(self.keep);
        for (_, path) in files.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Downloads blob `sha256` of `size` bytes into `part`, resuming after the bytes already
/// there. Returns the bytes received; the caller verifies the hash.
pub async fn download(
    client: &mut Client,
    sha256: &str,
    size: u64,
    part: &Path,
) -> Result<u64, SiteError> {
    let mut offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if offset > size {
        offset = 0;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(offset > 0)
        .write(true)
        .truncate(offset == 0)
        .open(part)
        .map_err(|e| SiteError::io(format!("opening {}", part.display()), e))?;
    let mut stream = client
        .site
        .download_blob(client.authed(v1::DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset,
        }))
        .await?
        .into_inner();
    let mut pos = offset;
    let mut received = 0;
    while let Some(chunk) = stream.message().await? {
        if chunk.offset != pos {
            return Err(SiteError::Corrupt(format!(
                "blob {sha256}: chunk at offset {} where {pos} was expected",
                chunk.offset
            )));
        }
        pos += chunk.data.len() as u64;
        if pos > size {
            return Err(SiteError::Corrupt(format!(
                "blob {sha256}: more than the announced {size} bytes"
            )));
        }
        file.write_all(&chunk.data)
            .map_err(|e| SiteError::io(format!("writing {}", part.display()), e))?;
        received += chunk.data.len() as u64;
    }
    file.sync_all()
        .map_err(|e| SiteError::io(format!("writing {}", part.display()), e))?;
    if pos != size {
        return Err(SiteError::Corrupt(format!(
            "blob {sha256}: download ended at {pos} of {size} bytes"
        )));
    }
    Ok(received)
}

/// Reads `path` and checks its SHA-256.
fn read_verified(path: &Path, sha256: &str) -> Result<Vec<u8>, SiteError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| SiteError::io(format!("reading {}", path.display()), e))?;
    let mut ctx = Context::new(&SHA256);
    ctx.update(&bytes);
    let got = hex::encode(ctx.finish());
    if got != sha256 {
        return Err(SiteError::Corrupt(format!(
            "model {sha256}: the downloaded bytes hash to {got}"
        )));
    }
    Ok(bytes)
}
