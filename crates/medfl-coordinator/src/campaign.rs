//! Cross-site evaluation: every online site holding a run's dataset scores the run's final
//! global model on its own validation split, so researchers see where the model underperforms.
//! No site receives anything but the global model.
//!
//! The decisions are the run machine's ([`RunMachine`]): an ended run's machine collects the
//! answers here until every asked site answered or its deadline passed. The sites still owing an
//! answer are stored, so a restarted coordinator asks them again ([`resume`]).

use std::sync::Arc;

use medfl_core::run_machine::{Effect, Event, Rejection, RunMachine, RunPlan};
use medfl_core::spec::RunSpec;
use medfl_proto::v1;
use tracing::{info, warn};

use crate::state::{mono_ms, now_ms, wall_of, Shared};
use crate::store::Evaluation;
use crate::CoordinatorError;

/// An ended run whose final model is being scored across sites.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// The run's machine, in its ended phase.
    machine: RunMachine,
    /// The run spec sent with each task.
    spec_toml: Arc<str>,
    /// Size of the model scored.
    global_size: u64,
    /// Federated standardisation: the run's pooled feature statistics (JSON).
    standardization: Option<Arc<str>>,
}

/// Online sites holding the dataset of the run `spec` describes.
fn eligible(shared: &Shared, spec: &RunSpec) -> Result<Vec<String>, CoordinatorError> {
    let now = now_ms();
    Ok(shared
        .sites()?
        .iter()
        .filter(|(_, s)| shared.is_online(s, now) && s.holds(spec))
        .map(|(name, _)| name.clone())
        .collect())
}

/// Starts a cross-site evaluation of `global_sha256` for `run`; returns how many sites were
/// asked.
pub fn start(
    shared: &Shared,
    run: &crate::store::RunRecord,
    global_sha256: &str,
) -> Result<usize, CoordinatorError> {
    let (run_id, spec_toml) = (run.id.as_str(), run.spec.as_str());
    let spec = RunSpec::from_toml(spec_toml)?;
    let sites = eligible(shared, &spec)?;
    let asked = sites.len();
    if asked == 0 {
        return Ok(0);
    }
    let number = shared
        .campaign_numbers
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut machine = shared
        .campaigns()?
        .get(run_id)
        .map(|c| c.machine.clone())
        .filter(|m| m.global_sha256() == global_sha256)
        .unwrap_or_else(|| RunMachine::ended(RunPlan::of(&spec), global_sha256));
    let effects = machine.handle(Event::CrossSiteRequested { number, sites }, mono_ms());
    let standardization = run.standardization.as_deref().map(Arc::from);
    adopt(
        shared,
        run_id,
        spec_toml,
        standardization,
        &machine,
        effects,
    )?;
    Ok(asked)
}

/// Keeps `machine` (an ended run's, just asked to score its final model) collecting answers,
/// and carries out what asking took.
pub fn adopt(
    shared: &Shared,
    run_id: &str,
    spec_toml: &str,
    standardization: Option<Arc<str>>,
    machine: &RunMachine,
    effects: Vec<Effect>,
) -> Result<(), CoordinatorError> {
    if !machine.cross_site_open(mono_ms()) {
        return Ok(());
    }
    let campaign = Campaign {
        machine: machine.clone(),
        spec_toml: Arc::from(spec_toml),
        global_size: shared.blobs.size(machine.global_sha256())?,
        standardization,
    };
    if let Some((number, owed, deadline_ms)) = machine.cross_site_owed() {
        shared.db(|s| {
            s.open_cross_site(
                run_id,
                number,
                machine.global_sha256(),
                &owed,
                now_ms(),
                wall_of(deadline_ms),
            )
        })?;
    }
    shared.campaigns()?.insert(run_id.to_string(), campaign);
    perform(shared, run_id, effects)?;
    shared.notify_tasks();
    shared.notify_run(run_id);
    Ok(())
}

/// Reloads the cross-site evaluations an earlier process left open, for the sites that still
/// owe an answer and the time they had left; those whose deadline passed are closed. Runs still
/// running are left to their engine, which asks for a new evaluation when they complete.
pub fn resume(shared: &Shared) -> Result<(), CoordinatorError> {
    let open = shared.db(|s| s.open_cross_sites())?;
    for c in open {
        let run = shared.db(|s| s.run(&c.run_id))?;
        if run.status == medfl_core::run::RunStatus::Running {
            continue;
        }
        shared.campaign_numbers.fetch_max(
            c.number.saturating_add(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        let (now, wall) = (mono_ms(), now_ms());
        let deadline_ms = now.saturating_add(c.deadline_ms.saturating_sub(wall));
        let mut machine = match RunSpec::from_toml(&run.spec) {
            Ok(spec) => RunMachine::ended(RunPlan::of(&spec), &c.global_sha256),
            Err(e) => {
                warn!(run = %c.run_id, error = %e, "cannot resume the cross-site evaluation");
                shared.db(|s| s.set_cross_site_owed(&c.run_id, &[]))?;
                continue;
            }
        };
        let effects = machine.handle(
            Event::CrossSiteResumed {
                number: c.number,
                sites: c.owed.clone(),
                deadline_ms,
            },
            now,
        );
        if !machine.cross_site_open(now) {
            shared.db(|s| s.set_cross_site_owed(&c.run_id, &[]))?;
            continue;
        }
        let global_size = match shared.blobs.size(&c.global_sha256) {
            Ok(size) => size,
            Err(e) => {
                warn!(run = %c.run_id, error = %e, "cannot resume the cross-site evaluation");
                shared.db(|s| s.set_cross_site_owed(&c.run_id, &[]))?;
                continue;
            }
        };
        info!(run = %c.run_id, sites = c.owed.len(), "cross-site evaluation resumed");
        shared.campaigns()?.insert(
            c.run_id.clone(),
            Campaign {
                machine,
                spec_toml: Arc::from(run.spec.as_str()),
                global_size,
                standardization: run.standardization.as_deref().map(Arc::from),
            },
        );
        perform(shared, &c.run_id, effects)?;
    }
    Ok(())
}

/// Stores who still owes the run's open cross-site evaluation (nobody once it closed).
fn save(shared: &Shared, run_id: &str, machine: &RunMachine) -> Result<(), CoordinatorError> {
    let owed = match machine.cross_site_owed() {
        Some((_, owed, deadline_ms)) if mono_ms() < deadline_ms => owed,
        _ => Vec::new(),
    };
    shared.db(|s| s.set_cross_site_owed(run_id, &owed))
}

/// Carries out a cross-site evaluation's effects; returns the answer to the site, if any.
fn perform(
    shared: &Shared,
    run_id: &str,
    effects: Vec<Effect>,
) -> Result<Option<Result<(), Rejection>>, CoordinatorError> {
    let mut answer = None;
    for effect in effects {
        match effect {
            Effect::CrossSiteOpened {
                sites,
                global_sha256,
                ..
            } => {
                info!(run = %run_id, sites, model = %global_sha256, "cross-site evaluation started");
                shared.audit(
                    medfl_audit::Event::new(
                        "evaluation_requested",
                        serde_json::json!({ "global_sha256": global_sha256, "sites": sites }),
                    )
                    .run(run_id),
                );
            }
            Effect::RecordCrossSite {
                site,
                global_sha256,
                examples,
                metrics,
            } => shared.db(|s| {
                s.add_evaluation(
                    run_id,
                    &Evaluation {
                        global_sha256,
                        site,
                        examples,
                        metrics,
                        at_ms: now_ms(),
                    },
                )
            })?,
            Effect::CrossSiteComplete => info!(run = %run_id, "cross-site evaluation complete"),
            Effect::Reply(r) => answer = Some(r),
            _ => {}
        }
    }
    Ok(answer)
}

/// The evaluation task for `site`, if a campaign waits for it; drops expired campaigns.
pub fn task_for(shared: &Shared, site: &str) -> Result<Option<v1::Task>, CoordinatorError> {
    let now = mono_ms();
    let mut campaigns = shared.campaigns()?;
    campaigns.retain(|run_id, c| {
        let open = c.machine.cross_site_open(now);
        if !open {
            if let Err(e) = shared.db(|s| s.set_cross_site_owed(run_id, &[])) {
                warn!(run = %run_id, error = %e, "could not record the cross-site evaluation closed");
            }
            shared.notify_run(run_id);
        }
        open
    });
    Ok(campaigns.iter().find_map(|(run_id, c)| {
        let task = c.machine.cross_site_task(site, now)?;
        Some(v1::Task {
            run_id: run_id.clone(),
            round: 0,
            attempt: task.number,
            kind: v1::TaskKind::Evaluate as i32,
            spec_toml: c.spec_toml.to_string(),
            global_sha256: task.global_sha256,
            global_size: c.global_size,
            deadline_unix_ms: wall_of(task.deadline_ms),
            signature: Vec::new(),
            clip_norm: None,
            expected_sites: None,
            standardization: c.standardization.as_deref().map(String::from),
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
    let effects = campaign.machine.handle(
        Event::CrossSiteReported {
            site: site.to_string(),
            global_sha256: req.global_sha256,
            examples: req.num_examples,
            metrics: req.metrics,
        },
        mono_ms(),
    );
    // Stored while the evaluation's lock is held: a reader never sees it closed without the
    // answer that closed it.
    let answer = perform(shared, &req.run_id, effects)?;
    save(shared, &req.run_id, &campaign.machine)?;
    if !campaign.machine.cross_site_open(mono_ms()) {
        campaigns.remove(&req.run_id);
    }
    drop(campaigns);
    shared.notify_run(&req.run_id);
    answer.unwrap_or(Ok(())).map_err(crate::engine::rejected)
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
    let now = mono_ms();
    // A late refusal of an earlier evaluation leaves the site in this one (the machine checks).
    if campaign
        .machine
        .cross_site_task(site, now)
        .is_some_and(|t| t.number == number)
    {
        tracing::warn!(run = %run_id, site = %site, reason = %reason, "site cannot evaluate the final model");
    }
    let effects = campaign.machine.handle(
        Event::CrossSiteDeclined {
            site: site.to_string(),
            number,
            reason: reason.to_string(),
        },
        now,
    );
    perform(shared, run_id, effects)?;
    save(shared, run_id, &campaign.machine)?;
    if campaign.machine.cross_site_deadline().is_none() {
        campaigns.remove(run_id);
    }
    drop(campaigns);
    shared.notify_run(run_id);
    Ok(())
}

/// When the run's open cross-site evaluation gives up on the sites that have not answered, on
/// the monotonic clock ([`crate::state::mono_ms`]).
pub fn deadline(shared: &Shared, run_id: &str) -> Result<Option<u64>, CoordinatorError> {
    Ok(shared
        .campaigns()?
        .get(run_id)
        .and_then(|c| c.machine.cross_site_deadline()))
}

/// Whether a cross-site evaluation of the run is collecting answers.
pub fn active(shared: &Shared, run_id: &str) -> Result<bool, CoordinatorError> {
    let now = mono_ms();
    Ok(shared
        .campaigns()?
        .get(run_id)
        .is_some_and(|c| c.machine.cross_site_open(now)))
}
