//! `model pull`: downloads a run's global model, checks it arrived whole and names its SHA-256.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_model::adapter::{
    model_bytes, PRIVACY_METADATA_KEY, PROVENANCE_METADATA_KEY, SPEC_METADATA_KEY,
    STANDARDIZATION_METADATA_KEY,
};
use medfl_proto::v1::{GetRunRequest, PullModelRequest};
use ring::digest;
use tokio::io::AsyncWriteExt;

use crate::client::{unary, RpcResultExt, RunClient};
use crate::table;

/// A model written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// Bytes written.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// `medfl model pull`: the global model as pulled; for a text run, rewritten as an adapter
/// file carrying the run spec, and with `merged`, also merged into the base at `base` in the
/// directory `out`.
pub async fn pull_command(
    client: &mut RunClient,
    run_id: &str,
    round: u32,
    out: &Path,
    merged: bool,
    base: Option<PathBuf>,
) -> anyhow::Result<()> {
    let detail = run_detail(client, run_id).await?;
    let spec = medfl_core::spec::RunSpec::from_toml(&detail.spec_toml)
        .with_context(|| format!("the spec of run {run_id}"))?;
    let text_run = spec.encoder().is_some();
    anyhow::ensure!(
        text_run || !merged,
        "run {run_id} trains no pre-trained base: there is nothing to merge into"
    );
    let file = if merged {
        let created = !out.exists();
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let file = out.join("adapter.pulled.safetensors");
        let result = pull_into(client, run_id, round, &file, &detail, &spec, true, base).await;
        // A directory this command made holds nothing worth keeping after a failure.
        if result.is_err() && created {
            let _ = std::fs::remove_dir_all(out);
        }
        return result;
    } else {
        out.to_path_buf()
    };
    pull_into(client, run_id, round, &file, &detail, &spec, false, base).await
}

/// Pulls into `file` and, for a text run, rewrites it as an adapter (merged into `base` with
/// `merged`).
#[allow(clippy::too_many_arguments)]
async fn pull_into(
    client: &mut RunClient,
    run_id: &str,
    round: u32,
    file: &Path,
    detail: &medfl_proto::v1::RunDetail,
    spec: &medfl_core::spec::RunSpec,
    merged: bool,
    base: Option<PathBuf>,
) -> anyhow::Result<()> {
    let text_run = spec.encoder().is_some();
    let pulled = pull(client, run_id, round, file).await?;
    medfl_daemon::outln!(
        "{}  global model of run {run_id} ({} bytes, {})",
        pulled.sha256,
        pulled.size,
        table::human_bytes(pulled.size)
    );
    let privacy = privacy_metadata(spec, detail, round);
    let provenance = provenance_metadata(run_id, round, detail, &pulled.sha256);
    let sha = write_self_describing(
        file,
        &detail.spec_toml,
        &provenance,
        privacy.as_deref(),
        detail.standardization.as_deref(),
    )?;
    medfl_daemon::outln!(
        "{sha}  {} ({}, with the run spec, run and round{}{} in its metadata)",
        file.display(),
        if text_run {
            "the adapter and head"
        } else {
            "the model"
        },
        if detail.standardization.is_some() {
            ", the federation's feature statistics"
        } else {
            ""
        },
        if privacy.is_some() {
            " and what differential privacy spent"
        } else {
            ""
        }
    );
    #[cfg(feature = "local")]
    if let (true, Some(base)) = (merged, base) {
        let out = file.parent().unwrap_or(Path::new("."));
        crate::adapter::write_merged(file, &base, out)?;
        std::fs::remove_file(file).with_context(|| format!("cannot remove {}", file.display()))?;
    }
    #[cfg(not(feature = "local"))]
    let _ = (merged, base);
    Ok(())
}

/// Where a pulled model comes from, as JSON: the run, the round (the latest committed when
/// `round` is 0), the global model's SHA-256 as served, and the run spec's SHA-256.
pub fn provenance_metadata(
    run_id: &str,
    round: u32,
    detail: &medfl_proto::v1::RunDetail,
    global_sha256: &str,
) -> String {
    let round = match round {
        0 => detail
            .rounds
            .last()
            .map_or(0, |r| r.round)
            .max(detail.summary.as_ref().map_or(0, |s| s.rounds_done)),
        n => n,
    };
    serde_json::json!({
        "run": run_id,
        "round": round,
        "global_sha256": global_sha256,
        "spec_sha256": medfl_proto::convert::spec_sha256(&detail.spec_toml),
    })
    .to_string()
}

/// Rewrites the pulled model at `path` carrying the run spec, where it comes from and what
/// differential privacy spent (if anything) in its metadata. Returns its SHA-256.
pub fn write_self_describing(
    path: &Path,
    spec_toml: &str,
    provenance: &str,
    privacy: Option<&str>,
    standardization: Option<&str>,
) -> anyhow::Result<String> {
    let mut metadata = vec![
        (SPEC_METADATA_KEY, spec_toml),
        (PROVENANCE_METADATA_KEY, provenance),
    ];
    metadata.extend(privacy.map(|p| (PRIVACY_METADATA_KEY, p)));
    metadata.extend(standardization.map(|s| (STANDARDIZATION_METADATA_KEY, s)));
    write_metadata(path, &metadata)
}

/// Rewrites the final model of run `run_id` (`detail`, `spec`), pulled to `path` with hash
/// `pulled_sha256`, as `medfl model pull` writes it. Returns its SHA-256.
pub fn describe_final_model(
    path: &Path,
    run_id: &str,
    detail: &medfl_proto::v1::RunDetail,
    spec: &medfl_core::spec::RunSpec,
    pulled_sha256: &str,
) -> anyhow::Result<String> {
    write_self_describing(
        path,
        &detail.spec_toml,
        &provenance_metadata(run_id, 0, detail, pulled_sha256),
        privacy_metadata(spec, detail, 0).as_deref(),
        detail.standardization.as_deref(),
    )
}

/// Rewrites the pulled global model at `path` as an adapter file carrying `spec_toml` (and
/// what differential privacy spent, if any) in its metadata, so `medfl predict` and `model
/// merge` need nothing else. Returns its SHA-256.
pub fn write_adapter(
    path: &Path,
    spec_toml: &str,
    privacy: Option<&str>,
) -> anyhow::Result<String> {
    let mut metadata = vec![(SPEC_METADATA_KEY, spec_toml)];
    metadata.extend(privacy.map(|p| (PRIVACY_METADATA_KEY, p)));
    write_metadata(path, &metadata)
}

/// Rewrites the model at `path` with these metadata entries. Returns its SHA-256.
fn write_metadata(path: &Path, metadata: &[(&str, &str)]) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let params = medfl_core::safetensors::decode(&bytes)
        .with_context(|| format!("{} is not a safetensors model", path.display()))?;
    let out = model_bytes(&params, metadata)?;
    std::fs::write(path, &out).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(hex::encode(digest::digest(&digest::SHA256, &out)))
}

/// What differential privacy spent on the model of `round` (the latest when 0), for its
/// metadata: per level ε, δ, the accountant, z, C and q, and the rounds behind the model.
/// `None` for a run without differential privacy.
pub fn privacy_metadata(
    spec: &medfl_core::spec::RunSpec,
    detail: &medfl_proto::v1::RunDetail,
    round: u32,
) -> Option<String> {
    if spec.privacy.is_off() {
        return None;
    }
    let upto: Vec<&medfl_proto::v1::RoundSummary> = detail
        .rounds
        .iter()
        .filter(|r| round == 0 || r.round <= round)
        .collect();
    let rounds = upto.last().map_or(0, |r| r.round);
    let mut out = serde_json::json!({ "rounds": rounds });
    if let Some(r) = &spec.privacy.record {
        out["record"] = serde_json::json!({
            "epsilon": upto.iter().filter_map(|x| x.privacy_epsilon).reduce(f64::max),
            "epsilon_is": "the largest any site reported for the run",
            "delta": r.delta.map_or(serde_json::json!("1/N^1.1 at each site of N rows"), |d| d.into()),
            "accountant": r.accountant.accountant().name(),
            "noise_multiplier": r.noise_multiplier,
            "max_grad_norm": r.max_grad_norm,
            "sample_rate": "batch_size/N at each site of N rows",
            "batch_size": spec.training.batch_size,
            "target_epsilon": r.target_epsilon,
        });
    }
    if let Some(c) = &spec.privacy.client {
        out["client"] = serde_json::json!({
            "epsilon": upto.last().and_then(|x| x.client_epsilon),
            "delta": c.delta,
            "accountant": c.accountant.accountant().name(),
            "noise_multiplier": c.noise_multiplier,
            "clip_norm": c.clip_norm,
            "adaptive_clipping": c.adaptive_clipping.is_some(),
            "sample_rate": c.sample_rate,
            "noise": c.noise.name(),
            "target_epsilon": c.target_epsilon,
        });
    }
    Some(out.to_string())
}

/// Pulls the global model of run `run_id` after `round` (the latest when 0) into `out`: the bytes
/// go to `out.part`, which is renamed to `out` once every byte arrived, and removed on failure.
/// When `round` is given and the run lists that round's model hash, the download must match it.
pub async fn pull(
    client: &mut RunClient,
    run_id: &str,
    round: u32,
    out: &Path,
) -> anyhow::Result<Pulled> {
    let part = part_path(out);
    let result = download(client, run_id, round, &part).await;
    let pulled = match result {
        Ok(pulled) => pulled,
        Err(e) => {
            // Best effort: the error that matters is the download's.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    };
    if round > 0 {
        if let Err(e) = check_hash(client, run_id, round, &pulled.sha256).await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    }
    tokio::fs::rename(&part, out)
        .await
        .with_context(|| format!("cannot rename {} to {}", part.display(), out.display()))?;
    Ok(pulled)
}

async fn download(
    client: &mut RunClient,
    run_id: &str,
    round: u32,
    part: &Path,
) -> anyhow::Result<Pulled> {
    let mut stream = client
        .pull_model(PullModelRequest {
            run_id: run_id.to_owned(),
            round,
        })
        .await
        .rpc("PullModel")?
        .into_inner();
    let file = tokio::fs::File::create(part)
        .await
        .with_context(|| format!("cannot create {}", part.display()))?;
    let mut writer = tokio::io::BufWriter::new(file);
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut blob = BlobProgress::default();
    let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "[{bar:32.cyan/blue}] {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}",
    )?);

    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.message().await.rpc("PullModel")? {
            blob.accept(chunk.offset, chunk.data.len() as u64, chunk.total_size)?;
            bar.set_length(blob.total.unwrap_or(0));
            writer
                .write_all(&chunk.data)
                .await
                .with_context(|| format!("cannot write {}", part.display()))?;
            sha.update(&chunk.data);
            bar.set_position(blob.received);
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    result?;
    let size = blob.finish()?;

    writer
        .flush()
        .await
        .with_context(|| format!("cannot write {}", part.display()))?;
    writer
        .into_inner()
        .sync_all()
        .await
        .with_context(|| format!("cannot sync {}", part.display()))?;
    Ok(Pulled {
        size,
        sha256: hex::encode(sha.finish().as_ref()),
    })
}

/// The run's detail, as `GetRun` gives it.
async fn run_detail(
    client: &mut RunClient,
    run_id: &str,
) -> anyhow::Result<medfl_proto::v1::RunDetail> {
    Ok(client
        .get_run(unary(GetRunRequest {
            run_id: run_id.to_owned(),
            ..Default::default()
        }))
        .await
        .rpc("GetRun")?
        .into_inner())
}

/// Compares the download with the model hash the run lists for `round`, when it lists one.
async fn check_hash(
    client: &mut RunClient,
    run_id: &str,
    round: u32,
    sha256: &str,
) -> anyhow::Result<()> {
    let detail = run_detail(client, run_id).await?;
    let listed = detail
        .rounds
        .iter()
        .find(|r| r.round == round)
        .map(|r| r.global_sha256.as_str())
        .filter(|s| !s.is_empty());
    match listed {
        Some(listed) if !listed.eq_ignore_ascii_case(sha256) => anyhow::bail!(
            "the model of run {run_id} round {round} has SHA-256 {sha256}, \
             but the run lists {listed}: not saved"
        ),
        _ => Ok(()),
    }
}

/// `FILE.part` beside `FILE`.
fn part_path(out: &Path) -> PathBuf {
    let mut name = OsString::from(out.as_os_str());
    name.push(".part");
    PathBuf::from(name)
}

/// What has arrived of a chunked blob; checks that chunks are contiguous and stay in size.
#[derive(Debug, Default)]
struct BlobProgress {
    /// Size announced by the first chunk.
    total: Option<u64>,
    /// Bytes received so far.
    received: u64,
}

impl BlobProgress {
    /// Takes a chunk of `len` bytes at `offset`; `total_size` is set on the first chunk only.
    fn accept(&mut self, offset: u64, len: u64, total_size: u64) -> anyhow::Result<()> {
        let total = match self.total {
            Some(total) => {
                if total_size != 0 && total_size != total {
                    anyhow::bail!(
                        "the coordinator changed the model size from {total} to {total_size} bytes \
                         mid-download"
                    );
                }
                total
            }
            None => {
                if total_size == 0 {
                    anyhow::bail!("the first model chunk did not announce the model's size");
                }
                self.total = Some(total_size);
                total_size
            }
        };
        if offset != self.received {
            anyhow::bail!(
                "model chunk at offset {offset}, expected {}: the download is not contiguous",
                self.received
            );
        }
        let end = self
            .received
            .checked_add(len)
            .filter(|&end| end <= total)
            .with_context(|| {
                format!("model chunk at offset {offset} runs past the announced {total} bytes")
            })?;
        self.received = end;
        Ok(())
    }

    /// The blob's size, once every announced byte arrived.
    fn finish(&self) -> anyhow::Result<u64> {
        match self.total {
            None => anyhow::bail!("the coordinator sent no model bytes"),
            Some(total) if total != self.received => anyhow::bail!(
                "the model download stopped after {} of {total} bytes ({} of {})",
                self.received,
                table::human_bytes(self.received),
                table::human_bytes(total)
            ),
            Some(total) => Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_chunks_complete_the_blob() -> anyhow::Result<()> {
        let mut b = BlobProgress::default();
        b.accept(0, 4, 10)?;
        b.accept(4, 0, 0)?;
        b.accept(4, 6, 0)?;
        assert_eq!(b.finish()?, 10);
        Ok(())
    }

    #[test]
    fn broken_streams_are_refused() {
        let mut b = BlobProgress::default();
        assert!(b.accept(0, 4, 0).is_err(), "size must come first");
        assert!(b.finish().is_err(), "nothing arrived");

        let mut b = BlobProgress::default();
        assert!(b.accept(0, 4, 10).is_ok());
        assert!(b.accept(5, 1, 0).is_err(), "gap");
        assert!(b.accept(0, 1, 0).is_err(), "overlap");
        assert!(b.accept(4, 7, 0).is_err(), "past the end");
        assert!(b.accept(4, 1, 11).is_err(), "size changed");
        let err = b.finish().map_or_else(|e| e.to_string(), |_| String::new());
        assert!(err.contains("4 of 10 bytes"), "{err}");
    }

    #[test]
    fn part_file_sits_beside_the_output() {
        assert_eq!(
            part_path(Path::new("out/model.safetensors")),
            PathBuf::from("out/model.safetensors.part")
        );
    }
}
