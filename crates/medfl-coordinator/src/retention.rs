//! What the coordinator keeps of a run: its blobs' references are released as the run goes
//! (each attempt's updates once it ends, superseded optimizer state) and when it ends (models
//! beyond `keep_models`); a file goes when its last reference does.

use std::fmt;
use std::str::FromStr;

use tracing::info;

use medfl_core::run::RunStatus;

use crate::state::Shared;
use crate::store::{BlobRef, BlobRole};
use crate::CoordinatorError;

/// Which global models of an ended run (stopped, failed or completed) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepModels {
    /// Every round's model and the initial one: `model pull --round N` works for any N.
    All,
    /// Only the last committed model (the initial one when no round was committed).
    Final,
    /// The last N models.
    Last(u32),
}

impl KeepModels {
    /// Whether the model of `round` is kept when `last` is the run's last committed round.
    pub fn keeps(self, round: u32, last: u32) -> bool {
        match self {
            KeepModels::All => true,
            KeepModels::Final => round == last,
            KeepModels::Last(n) => round.saturating_add(n) > last,
        }
    }
}

impl FromStr for KeepModels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(KeepModels::All),
            "final" => Ok(KeepModels::Final),
            _ => s
                .strip_prefix("last:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n >= 1)
                .map(KeepModels::Last)
                .ok_or_else(|| {
                    format!("`{s}` is not `all`, `final` or `last:N` with N at least 1")
                }),
        }
    }
}

impl fmt::Display for KeepModels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepModels::All => f.write_str("all"),
            KeepModels::Final => f.write_str("final"),
            KeepModels::Last(n) => write!(f, "last:{n}"),
        }
    }
}

/// Releases `refs` and deletes every blob no reference holds any more (blocking: file
/// removal). Returns how many blobs were deleted and the bytes freed.
pub fn release(shared: &Shared, refs: &[BlobRef]) -> Result<(usize, u64), CoordinatorError> {
    if refs.is_empty() {
        return Ok((0, 0));
    }
    let candidates = shared.db(|s| s.release(refs))?;
    let (gone, bytes) = shared
        .blobs
        .collect(candidates, |sha| shared.db(|s| s.is_owned(sha)))?;
    Ok((gone.len(), bytes))
}

/// The update references of `run_id` in `round` (in `attempt`, or in any attempt), released
/// once that attempt is over unless the operator retains updates.
pub fn release_updates(
    shared: &Shared,
    run_id: &str,
    round: u32,
    attempt: Option<u32>,
) -> Result<(usize, u64), CoordinatorError> {
    if shared.config.retain_updates {
        return Ok((0, 0));
    }
    let refs: Vec<BlobRef> = shared
        .db(|s| s.refs_of_run(run_id))?
        .into_iter()
        .filter(|r| {
            r.role == BlobRole::Update
                && r.round >= round
                && attempt.is_none_or(|a| r.round == round && r.attempt == a)
        })
        .collect();
    release(shared, &refs)
}

/// Ends a run: stores its status and, in the same transaction, lets go of what the retention
/// settings do not keep (optimizer state always, updates unless retained, models beyond
/// `keep_models`); then deletes the files nothing else holds. Logs and audits what it freed.
pub fn end_run(
    shared: &Shared,
    run_id: &str,
    status: RunStatus,
    error: &str,
) -> Result<(), CoordinatorError> {
    let keep = shared.config.keep_models()?;
    let (refs, last) = shared.db(|s| {
        let last = s.rounds(run_id)?.last().map_or(0, |r| r.round);
        Ok((s.refs_of_run(run_id)?, last))
    })?;
    let release_now: Vec<BlobRef> = refs
        .into_iter()
        .filter(|r| match r.role {
            BlobRole::Update => !shared.config.retain_updates,
            BlobRole::OptimizerM | BlobRole::OptimizerV => true,
            BlobRole::Initial | BlobRole::Global => !keep.keeps(r.round, last),
        })
        .collect();
    let references = release_now.len();
    let candidates =
        shared.db(|s| s.end_run(run_id, status, error, &release_now, crate::state::now_ms()))?;
    let (gone, bytes) = shared
        .blobs
        .collect(candidates, |sha| shared.db(|s| s.is_owned(sha)))?;
    let blobs = gone.len();
    info!(run = %run_id, keep_models = %keep, references, blobs, bytes, "ended run collected");
    shared.audit(
        medfl_audit::Event::new(
            "run_collected",
            serde_json::json!({
                "keep_models": keep.to_string(),
                "references_released": references,
                "blobs_deleted": blobs,
                "bytes_freed": bytes,
            }),
        )
        .run(run_id),
    );
    Ok(())
}

/// At start: deletes blobs nothing owns (left by a crash between storing and recording).
pub fn sweep_orphans(shared: &Shared) -> Result<(), CoordinatorError> {
    let ids = shared.blobs.ids()?;
    let (gone, bytes) = shared
        .blobs
        .collect(ids, |sha| shared.db(|s| s.is_owned(sha)))?;
    if !gone.is_empty() {
        info!(blobs = gone.len(), bytes, "deleted blobs no run owns");
        shared.audit(medfl_audit::Event::new(
            "orphans_collected",
            serde_json::json!({ "blobs_deleted": gone.len(), "bytes_freed": bytes }),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_models_parses_and_keeps_what_it_says() {
        assert_eq!("all".parse::<KeepModels>(), Ok(KeepModels::All));
        assert_eq!("last:2".parse::<KeepModels>(), Ok(KeepModels::Last(2)));
        assert!("last:0".parse::<KeepModels>().is_err());
        assert!("some".parse::<KeepModels>().unwrap_err().contains("`some`"));
        let kept = |k: KeepModels| (0..=5).filter(|r| k.keeps(*r, 5)).collect::<Vec<_>>();
        assert_eq!(kept(KeepModels::All), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(kept(KeepModels::Final), vec![5]);
        assert_eq!(kept(KeepModels::Last(2)), vec![4, 5]);
        // A run that committed nothing keeps its initial model.
        assert!(KeepModels::Final.keeps(0, 0));
    }
}
