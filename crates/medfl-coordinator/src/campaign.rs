//! Cross-site evaluation: every online site holding a run's dataset scores the run's final
//! global model on its own validation split, so researchers see where the model underperforms.
//! No site receives anything but the global model.

use std::collections::BTreeSet;
use std::sync::Arc;

use medfl_core::spec::RunSpec;
use medfl_proto::v1;
use tracing::info;

use crate::state::{now_ms, Shared};
use crate::store::Evaluation;
use crate::CoordinatorError;

/// A cross-site evaluation collecting answers.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Sent as the task's attempt and echoed in a site's failure report: a refusal of an earlier
    /// evaluation of the same run must not strike the site from this one.
    pub number: u32,
    /// The run spec sent with each task.
    pub spec_toml: Arc<str>,
    /// The model to score.
    pub global_sha256: String,
    /// Its size.
    pub global_size: u64,
    /// Sites that have not answered yet.
    pub pending: BTreeSet<String>,
    /// When unanswered sites are given up on.
    pub deadline_ms: u64,
}

/// Starts a cross-site evaluation of `global_sha256` for run `run_id`; returns how many sites
/// were asked.
pub fn start(
    shared: &Shared,
    run_id: &str,
    spec_toml: &str,
    global_sha256: &str,
) -> Result<usize, CoordinatorError> {
    let spec = RunSpec::from_toml(spec_toml)?;
    let now = now_ms();
    let pending: BTreeSet<String> = shared
        .sites()?
        .iter()
        .filter(|(_, s)| shared.is_online(s, now) && s.holds(&spec))
        .map(|(name, _)| name.clone())
        .collect();
    let asked = pending.len();
    if asked > 0 {
        let number = shared
            .campaign_numbers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let campaign = Campaign {
            number,
            spec_toml: Arc::from(spec_toml),
            global_sha256: global_sha256.to_string(),
            global_size: shared.blobs.size(global_sha256)?,
            pending,
            deadline_ms: now + spec.round_deadline_secs * 1000,
        };
        shared.campaigns()?.insert(run_id.to_string(), campaign);
        info!(run = %run_id, sites = asked, model = %global_sha256, "cross-site evaluation started");
        shared.audit(
            medfl_audit::Event::new(
                "evaluation_requested",
                serde_json::json!({ "global_sha256": global_sha256, "sites": asked }),
            )
            .run(run_id),
        );
        shared.notify_tasks();
        shared.notify_run(run_id);
    }
    Ok(asked)
}

/// The evaluation task for `site`, if a campaign waits for it; drops expired campaigns.
pub fn task_for(shared: &Shared, site: &str) -> Result<Option<v1::Task>, CoordinatorError> {
    let now = now_ms();
    let mut campaigns = shared.campaigns()?;
    campaigns.retain(|run_id, c| {
        let open = now < c.deadline_ms && !c.pending.is_empty();
        if !open {
            shared.notify_run(run_id);
        }
        open
    });
    Ok(campaigns.iter().find_map(|(run_id, c)| {
        c.pending.contains(site).then(|| v1::Task {
            run_id: run_id.clone(),
            round: 0,
            attempt: c.number,
            kind: v1::TaskKind::Evaluate as i32,
            spec_toml: c.spec_toml.to_string(),
            global_sha256: c.global_sha256.clone(),
            global_size: c.global_size,
            deadline_unix_ms: c.deadline_ms,
            signature: Vec::new(),
        })
    }))
}

/// Records a site's answer to a cross-site evaluation.
pub fn report(
    shared: &Shared,
    site: &str,
    req: v1::ReportEvaluationRequest,
) -> Result<(), CoordinatorError> {
    let mut campaigns = shared.campaigns()?;
    let campaign = campaigns.get_mut(&req.run_id).ok_or_else(|| {
        CoordinatorError::NotFound(format!(
            "no cross-site evaluation of run `{}` is open",
            req.run_id
        ))
    })?;
    if !campaign.pending.contains(site) {
        return Err(CoordinatorError::PermissionDenied(format!(
            "site `{site}` was not asked, or already answered, in the evaluation of run `{}`",
            req.run_id
        )));
    }
    if req.global_sha256 != campaign.global_sha256 {
        return Err(CoordinatorError::Invalid(format!(
            "evaluation of model {}, the run's final model is {}",
            req.global_sha256, campaign.global_sha256
        )));
    }
    shared.store()?.add_evaluation(
        &req.run_id,
        &Evaluation {
            global_sha256: req.global_sha256,
            site: site.to_string(),
            examples: req.num_examples,
            metrics: req.metrics,
            at_ms: now_ms(),
        },
    )?;
    campaign.pending.remove(site);
    if campaign.pending.is_empty() {
        campaigns.remove(&req.run_id);
        info!(run = %req.run_id, "cross-site evaluation complete");
    }
    drop(campaigns);
    shared.notify_run(&req.run_id);
    Ok(())
}

/// A site that cannot evaluate (its data does not fit the run) is no longer waited for.
pub fn fail(
    shared: &Shared,
    site: &str,
    run_id: &str,
    number: u32,
    reason: &str,
) -> Result<(), CoordinatorError> {
    let mut campaigns = shared.campaigns()?;
    let Some(campaign) = campaigns.get_mut(run_id) else {
        return Ok(());
    };
    if campaign.number != number {
        // A late refusal of an earlier evaluation: the site may well answer this one.
        return Ok(());
    }
    if campaign.pending.remove(site) {
        tracing::warn!(run = %run_id, site = %site, reason = %reason, "site cannot evaluate the final model");
    }
    if campaign.pending.is_empty() {
        campaigns.remove(run_id);
    }
    drop(campaigns);
    shared.notify_run(run_id);
    Ok(())
}

/// When the run's open cross-site evaluation gives up on the sites that have not answered.
pub fn deadline(shared: &Shared, run_id: &str) -> Result<Option<u64>, CoordinatorError> {
    Ok(shared.campaigns()?.get(run_id).map(|c| c.deadline_ms))
}

/// Whether a cross-site evaluation of the run is collecting answers.
pub fn active(shared: &Shared, run_id: &str) -> Result<bool, CoordinatorError> {
    let now = now_ms();
    Ok(shared
        .campaigns()?
        .get(run_id)
        .is_some_and(|c| now < c.deadline_ms && !c.pending.is_empty()))
}
