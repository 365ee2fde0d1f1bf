//! Fetching a base model the site lacks from the coordinator, by the hash a run pins: every
//! file chunked, resumable and verified, and the model visible only once complete.

use std::path::{Path, PathBuf};

use medfl_proto::v1;
use medfl_train::base::{sha256_file, BASE_FILES};
use tracing::info;

use crate::cache::download;
use crate::client::Client;
use crate::SiteError;

/// Fetches base `name` with weights `weights_sha256` into `dest` (`<root>/<sha256>`), which must
/// not exist yet. Files land in `dest.partial` first, so an interrupted fetch resumes and a
/// half-fetched model is never used. Returns the bytes downloaded.
pub async fn fetch_base_model(
    client: &mut Client,
    name: &str,
    weights_sha256: &str,
    dest: &Path,
) -> Result<u64, SiteError> {
    let manifest = client
        .site
        .get_base_model(client.authed(v1::GetBaseModelRequest {
            name: name.to_string(),
            weights_sha256: weights_sha256.to_string(),
        }))
        .await?
        .into_inner();
    let weights = manifest
        .files
        .iter()
        .find(|f| f.name == "model.safetensors");
    if weights.map(|f| f.sha256.as_str()) != Some(weights_sha256) {
        return Err(SiteError::Corrupt(format!(
            "the coordinator offered base model `{name}` without weights {weights_sha256}"
        )));
    }
    let partial = partial_dir(dest);
    std::fs::create_dir_all(&partial)
        .map_err(|e| SiteError::io(format!("creating {}", partial.display()), e))?;
    let mut received = 0;
    for file in &manifest.files {
        // Only the known file names: a name is joined to a local path.
        if !BASE_FILES.contains(&file.name.as_str()) {
            return Err(SiteError::Corrupt(format!(
                "the coordinator offered an unexpected file `{}` for base model `{name}`",
                file.name
            )));
        }
        let path = partial.join(&file.name);
        if sha256_of(&path).as_deref() == Some(file.sha256.as_str()) {
            continue;
        }
        let part = partial.join(format!("{}.part", file.name));
        received += download(client, &file.sha256, file.size, &part).await?;
        let got = sha256_of(&part).unwrap_or_default();
        if got != file.sha256 {
            // A corrupt partial file must not be resumed.
            let _ = std::fs::remove_file(&part);
            return Err(SiteError::Corrupt(format!(
                "base model `{name}`: {} hashes to {got}, not {}",
                file.name, file.sha256
            )));
        }
        std::fs::rename(&part, &path)
            .map_err(|e| SiteError::io(format!("storing {}", path.display()), e))?;
        info!(model = %name, file = %file.name, bytes = file.size, "base model file fetched");
    }
    std::fs::rename(&partial, dest)
        .map_err(|e| SiteError::io(format!("storing {}", dest.display()), e))?;
    Ok(received)
}

fn partial_dir(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

fn sha256_of(path: &Path) -> Option<String> {
    path.is_file().then(|| sha256_file(path).ok()).flatten()
}
