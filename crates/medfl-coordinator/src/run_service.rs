//! `RunService`: what researchers call to create, follow and stop runs and to pull models.

use std::pin::Pin;
use std::sync::Arc;

use medfl_core::run::RunStatus;
use medfl_core::safetensors::encode_params_chunks;
use medfl_core::spec::RunSpec;
use medfl_proto::v1::{self, run_service_server::RunService};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::auth::{Caller, Standing};
use crate::engine;
use crate::state::{now_ms, EngineMsg, Shared};
use crate::store::RunRecord;
use crate::stream::blob_stream;
use crate::CoordinatorError;

/// Rounds whose per-site results every run detail carries.
pub const SITE_ROUNDS: usize = 50;

/// The researcher-facing service.
pub struct RunApi {
    shared: Arc<Shared>,
    engines: Arc<tokio::sync::Mutex<tokio::task::JoinSet<()>>>,
    creating: tokio::sync::Mutex<()>,
}

impl RunApi {
    /// The service over shared state; new engines join `engines`.
    pub fn new(
        shared: Arc<Shared>,
        engines: Arc<tokio::sync::Mutex<tokio::task::JoinSet<()>>>,
    ) -> Self {
        Self {
            shared,
            engines,
            creating: tokio::sync::Mutex::new(()),
        }
    }

    /// What runs created by `creator` hold against the quotas: the running ones, charged what
    /// they may come to hold, and the models ended ones still keep.
    fn holding(&self, creator: &str) -> Result<crate::quota::Holding, CoordinatorError> {
        let (runs, kept) = self.shared.db(|s| {
            let runs: Vec<RunRecord> = s
                .runs()?
                .into_iter()
                .filter(|r| r.creator == creator)
                .collect();
            Ok((runs, s.ended_run_blobs(creator)?))
        })?;
        let mut held = crate::quota::Holding::default();
        for run in runs.iter().filter(|r| !r.status.is_terminal()) {
            held.running += 1;
            let size = self.shared.blobs.size(&run.initial_sha256).map_err(|e| {
                CoordinatorError::Internal(format!("run `{}`: initial model: {e}", run.id))
            })?;
            held.blob_bytes = held
                .blob_bytes
                .saturating_add(crate::quota::charge(size, run.rounds_total));
        }
        for sha in kept {
            let size = self
                .shared
                .blobs
                .size(&sha)
                .map_err(|e| CoordinatorError::Internal(format!("a kept model: {e}")))?;
            held.blob_bytes = held.blob_bytes.saturating_add(size);
        }
        Ok(held)
    }

    /// Refuses a run that could not start now: fewer than `min_sites` of the sites holding its
    /// dataset are online. Names the offline ones, so the researcher knows whom to call.
    fn enough_online(&self, spec: &RunSpec) -> Result<(), CoordinatorError> {
        let now = crate::state::now_ms();
        let sites = self.shared.sites()?;
        let holders: Vec<_> = sites.iter().filter(|(_, s)| s.holds(spec)).collect();
        let (online, offline): (Vec<_>, Vec<_>) = holders
            .into_iter()
            .partition(|(_, s)| self.shared.is_online(s, now));
        if online.len() as u32 >= spec.min_sites {
            return Ok(());
        }
        let shown: Vec<String> = offline
            .iter()
            .take(5)
            .map(|(name, s)| {
                format!(
                    "{name} (last seen {} s ago)",
                    now.saturating_sub(s.last_seen_ms) / 1000
                )
            })
            .collect();
        let more = offline.len().saturating_sub(shown.len());
        Err(CoordinatorError::Invalid(format!(
            "run spec: min_sites: {} sites required but only {} of the {} sites holding `{}` \
             with every column are online; offline: {}{}",
            spec.min_sites,
            online.len(),
            online.len() + offline.len(),
            spec.task.dataset,
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )))
    }

    async fn create(&self, spec_toml: String, caller: &Caller) -> Result<String, CoordinatorError> {
        let spec = RunSpec::from_toml(&spec_toml)?;
        // Checked under the lock rather than on a copy: with thousands of sites a copy of every
        // site's columns would cost hundreds of megabytes per run created.
        spec.validate_against(self.shared.sites()?.values().map(|s| s.datasets.as_slice()))?;
        self.enough_online(&spec)?;
        if let Some(c) = spec.privacy.client.clone() {
            // δ must be below one over the sites that could take part, and the target ε must
            // allow at least one round (planned off the async threads: PLD takes a while).
            let holders = self
                .shared
                .sites()?
                .values()
                .filter(|s| s.datasets.iter().any(|d| spec.fits(d)))
                .count();
            c.check_delta(holders)?;
            let rounds = spec.rounds;
            tokio::task::spawn_blocking(move || c.rounds_within_target(rounds))
                .await
                .map_err(|e| CoordinatorError::Internal(format!("privacy planning: {e}")))??;
        }
        let model = medfl_model::RunModel::for_run(&spec, &self.shared.bases).map_err(|e| {
            CoordinatorError::Invalid(if e.is_base_model() {
                format!(
                    "run spec: model.base_sha256: {e} (a text run's base must be published \
                     at the coordinator, under [base_models])"
                )
            } else {
                format!("run spec: model: {e}")
            })
        })?;
        let params = model.schema().numel() as u64;
        // One creation at a time, so two of one researcher's cannot both pass the quota.
        let _one_at_a_time = self.creating.lock().await;
        let held = self.holding(&caller.name)?;
        // Charged as F32, the widest a global model is stored in.
        let model_bytes = params.saturating_mul(4);
        crate::quota::admit(
            &self.shared.config.quotas(),
            &caller.name,
            held,
            params,
            model_bytes,
            spec.rounds,
        )?;
        let shared = self.shared.clone();
        let seed = spec.seed;
        // Initial weights can be large: build and store them off the async threads.
        let initial = tokio::task::spawn_blocking(move || -> Result<String, CoordinatorError> {
            let params = model.init(seed)?;
            let mut incoming = shared.blobs.incoming()?;
            encode_params_chunks(&params, |bytes| incoming.write(bytes))?;
            incoming.finish(None)
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("model initialisation: {e}")))??;
        let created_ms = now_ms();
        let id = format!("{}-{}", slug(&spec.name), random_suffix()?);
        let record = RunRecord {
            id: id.clone(),
            name: spec.name.clone(),
            spec: spec_toml,
            status: RunStatus::Running,
            rounds_total: spec.rounds,
            initial_sha256: initial,
            created_ms,
            error: String::new(),
            creator: caller.name.clone(),
            creator_role: caller.role.clone(),
            ended_ms: None,
            standardization: None,
        };
        // Pinned since it was stored; let go once the run owns it (or the insert failed).
        let pinned = self.shared.blobs.pinned(&record.initial_sha256);
        self.shared.db(|s| s.insert_run(&record))?;
        drop(pinned);
        engine::spawn(&self.shared, &record, &mut *self.engines.lock().await)?;
        info!(run = %id, name = %spec.name, rounds = spec.rounds, "run created");
        self.shared.audit(
            medfl_audit::Event::new(
                "run_created",
                serde_json::json!({
                    "name": spec.name,
                    "rounds": spec.rounds,
                    "dataset": spec.task.dataset,
                    "strategy": format!("{:?}", spec.strategy),
                    "initial_sha256": record.initial_sha256,
                    "by": caller.name,
                    "role": caller.role,
                }),
            )
            .run(id.clone()),
        );
        Ok(id)
    }

    /// The full picture of a run: stored rounds and the open round.
    /// Per-site results are included for the latest [`SITE_ROUNDS`] rounds and for
    /// `sites_of_round`, so the message stays small however long the run.
    pub fn detail(
        shared: &Shared,
        id: &str,
        sites_of_round: u32,
    ) -> Result<v1::RunDetail, CoordinatorError> {
        // Read in the order the engine writes, so one detail never shows an ended run without
        // its final evaluation: the engine opens the evaluation before storing the run's end,
        // and stores each answer before the evaluation closes. So the run first, then whether
        // the evaluation is open, then its answers. (Locks are not nested: answering holds the
        // evaluation's lock while storing.)
        let run = shared.db(|s| s.run(id))?;
        let evaluating = crate::campaign::active(shared, id)?;
        // The rounds, and the sites of the recent ones (and of the round asked for).
        let (rounds, results) = shared.db(|s| {
            let rounds = s.rounds(id)?;
            let recent = rounds.len().saturating_sub(SITE_ROUNDS) as u32;
            let results = rounds
                .iter()
                .map(|r| match r.round > recent || r.round == sites_of_round {
                    true => s.site_results_first(id, r.round, crate::fit::SITES_PER_ROUND),
                    false => Ok((Vec::new(), 0)),
                })
                .collect::<Result<Vec<_>, CoordinatorError>>()?;
            Ok((rounds, results))
        })?;
        let mut out = Vec::with_capacity(rounds.len());
        for (r, (sites, total)) in rounds.iter().zip(results) {
            let sites_omitted =
                u32::try_from(total.saturating_sub(sites.len() as u64)).unwrap_or(u32::MAX);
            let sites = sites
                .into_iter()
                .map(|s| v1::SiteRoundResult {
                    site: s.site,
                    outcome: v1::SiteOutcome::from(s.outcome) as i32,
                    reason: s.reason,
                    num_examples: s.examples,
                    train_loss: s.train_loss,
                    eval_metrics: s.eval_metrics,
                    eval_examples: s.eval_examples,
                    count: s.count,
                    privacy_epsilon: s.privacy_epsilon,
                })
                .collect();
            out.push(v1::RoundSummary {
                round: r.round,
                attempts: r.attempts,
                sites_selected: r.sites_selected,
                sites_reported: r.sites_reported,
                num_examples: r.examples,
                train_loss: r.train_loss,
                eval_metrics: r.eval_metrics.clone(),
                duration_ms: r.finished_ms.saturating_sub(r.started_ms),
                bytes_down: r.bytes_down,
                bytes_up: r.bytes_up,
                global_sha256: r.global_sha256.clone(),
                sites,
                sites_omitted,
                privacy_epsilon: r.privacy_epsilon,
                client_epsilon: r.client_epsilon,
            });
        }
        let snapshot = shared
            .runs()?
            .get(id)
            .and_then(|h| h.snapshot.borrow().clone());
        let mut detail = v1::RunDetail {
            summary: Some(summary(&run, rounds.len() as u32)),
            spec_toml: run.spec,
            rounds: out,
            ..Default::default()
        };
        detail.final_evaluation = shared
            .db(|s| s.evaluations(id))?
            .into_iter()
            .map(|e| v1::SiteEvaluation {
                site: e.site,
                num_examples: e.examples,
                metrics: e.metrics,
                at_unix_ms: e.at_ms,
                global_sha256: e.global_sha256,
            })
            .collect();
        detail.evaluating = evaluating;
        detail.full_model_bytes = full_model_bytes(shared, &detail.spec_toml, &run.initial_sha256);
        detail.standardization = run.standardization;
        if let Some(s) = snapshot {
            detail.current_round = s.round;
            detail.current_phase = s.phase.as_str().into();
            detail.current_reported = s.reported as u32;
            detail.current_selected = s.selected.len() as u32;
        }
        crate::fit::run_detail(&mut detail, crate::fit::REPLY_BUDGET);
        Ok(detail)
    }

    /// The kept global model of `round` of a run (0: its latest).
    fn model_sha(&self, run_id: &str, round: u32) -> Result<String, CoordinatorError> {
        let (run, rounds, refs) = self
            .shared
            .db(|s| Ok((s.run(run_id)?, s.rounds(run_id)?, s.refs_of_run(run_id)?)))?;
        let (round, sha) = match round {
            0 => rounds
                .last()
                .map(|r| (r.round, r.global_sha256.clone()))
                .unwrap_or((0, run.initial_sha256)),
            n => rounds
                .into_iter()
                .find(|r| r.round == n)
                .map(|r| (n, r.global_sha256))
                .ok_or_else(|| {
                    CoordinatorError::NotFound(format!("run `{run_id}` has no committed round {n}"))
                })?,
        };
        let kept = refs
            .iter()
            .any(|r| r.role.is_model() && r.round == round && r.sha256 == sha);
        if !kept {
            return Err(CoordinatorError::NotFound(format!(
                "the model of round {round} of run `{run_id}` was not kept when the run ended \
                 (the coordinator keeps `keep_models = \"{}\"`)",
                self.shared.config.keep_models
            )));
        }
        Ok(sha)
    }
}

fn summary(run: &RunRecord, rounds_done: u32) -> v1::RunSummary {
    v1::RunSummary {
        run_id: run.id.clone(),
        name: run.name.clone(),
        status: v1::RunStatus::from(run.status) as i32,
        rounds_done,
        rounds_total: run.rounds_total,
        created_unix_ms: run.created_ms,
        error: run.error.clone(),
        creator: run.creator.clone(),
        creator_role: run.creator_role.clone(),
        ended_unix_ms: run.ended_ms.unwrap_or(0),
    }
}

/// A lowercase, dash-separated form of a run name for its id.
fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    let s = if s.is_empty() { "run" } else { s };
    s.chars().take(32).collect()
}

fn random_suffix() -> Result<String, CoordinatorError> {
    let mut bytes = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CoordinatorError::Internal("no system randomness".into()))?;
    Ok(hex::encode(bytes))
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RunService for RunApi {
    #[instrument(skip_all)]
    async fn create_run(
        &self,
        req: Request<v1::CreateRunRequest>,
    ) -> Result<Response<v1::CreateRunResponse>, Status> {
        let caller = Caller::of(&req);
        let run_id = self.create(req.into_inner().spec_toml, &caller).await?;
        Ok(Response::new(v1::CreateRunResponse { run_id }))
    }

    async fn list_runs(
        &self,
        _req: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let runs = self.shared.db(|s| {
            s.runs()?
                .iter()
                .map(|r| Ok(summary(r, s.rounds(&r.id)?.len() as u32)))
                .collect::<Result<_, CoordinatorError>>()
        })?;
        Ok(Response::new(v1::ListRunsResponse { runs }))
    }

    async fn get_run(
        &self,
        req: Request<v1::GetRunRequest>,
    ) -> Result<Response<v1::RunDetail>, Status> {
        let req = req.into_inner();
        crate::edge::run_id("GetRunRequest.run_id", &req.run_id)?;
        Ok(Response::new(Self::detail(
            &self.shared,
            &req.run_id,
            req.sites_of_round,
        )?))
    }

    type WatchRunStream = Boxed<v1::RunDetail>;

    async fn watch_run(
        &self,
        req: Request<v1::GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let standing = Standing::of(&req);
        let id = req.into_inner().run_id;
        crate::edge::run_id("GetRunRequest.run_id", &id)?;
        // Subscribe before the first read, and mark each change seen before reading again: a
        // change between a read and the wait (a short run ending, the last site answering the
        // final evaluation) then wakes the wait instead of being lost.
        // Only runs that exist get a change counter (one per run, kept for its watchers).
        self.shared.db(|s| s.run(&id))?;
        let mut changed = self.shared.watch_run(&id)?;
        changed.borrow_and_update();
        // Fail now on an unknown run rather than inside the stream.
        let first = Self::detail(&self.shared, &id, 0)?;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut shutdown = shared.shutdown.clone();
            let mut detail = Ok(first);
            loop {
                // A run is over for its watchers once it ended and its final evaluation is in.
                let ended = match &detail {
                    Ok(d) => {
                        !d.evaluating
                            && d.summary
                                .as_ref()
                                .is_some_and(|s| s.status != v1::RunStatus::Running as i32)
                    }
                    Err(_) => true,
                };
                if tx.send(detail.map_err(Status::from)).await.is_err() || ended {
                    return;
                }
                // An evaluation nobody answers ends at its deadline without any change to wake
                // on, so its watchers wake then too.
                let wake = crate::campaign::deadline(&shared, &id)
                    .ok()
                    .flatten()
                    .map(|at| {
                        let left = at.saturating_sub(crate::state::mono_ms()) + 1;
                        tokio::time::Instant::now() + std::time::Duration::from_millis(left)
                    });
                loop {
                    tokio::select! {
                        r = changed.changed() => if r.is_err() { return } else { break },
                        _ = async { match wake {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        } } => break,
                        // A revoked watcher's stream ends within a second of the revocation.
                        _ = tokio::time::sleep(Standing::RECHECK), if standing.is_some() => {
                            if let Some(Err(e)) = standing.as_ref().map(Standing::check) {
                                info!(run = %id, caller = standing.as_ref().map_or("", Standing::name), "run watch ended: {}", e.message());
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                        _ = crate::state::stopping(&mut shutdown) => return,
                    }
                }
                changed.borrow_and_update();
                detail = Self::detail(&shared, &id, 0);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn stop_run(
        &self,
        req: Request<v1::StopRunRequest>,
    ) -> Result<Response<v1::StopRunResponse>, Status> {
        let caller = Caller::of(&req);
        let id = req.into_inner().run_id;
        crate::edge::run_id("StopRunRequest.run_id", &id)?;
        let run = self.shared.db(|s| s.run(&id))?;
        caller.may_act_on("stop", &id, &run.creator)?;
        if run.status.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "run `{id}` already ended ({})",
                run.status.as_str()
            )));
        }
        let handle = self.shared.run_handle(&id)?;
        let (reply, done) = oneshot::channel();
        if handle.tx.send(EngineMsg::Stop { reply }).await.is_ok() {
            let _ = done.await;
        }
        info!(run = %id, by = %caller.name, role = %caller.role, "run stopped");
        self.shared
            .audit(medfl_audit::Event::new("run_stop_requested", caller.audit()).run(id.clone()));
        Ok(Response::new(v1::StopRunResponse {}))
    }

    async fn list_sites(
        &self,
        req: Request<v1::ListSitesRequest>,
    ) -> Result<Response<v1::ListSitesResponse>, Status> {
        let req = req.into_inner();
        if !req.page_token.is_empty() {
            crate::edge::name("ListSitesRequest.page_token", &req.page_token)?;
        }
        let now = now_ms();
        // Only the page is copied out: with thousands of sites, copying every site's columns
        // for each page cost gigabytes of allocations per listing.
        let sites = self.shared.sites()?;
        let after = (
            std::ops::Bound::Excluded(req.page_token.clone()),
            std::ops::Bound::Unbounded,
        );
        let all = sites.range(after).map(|(name, s)| v1::SiteInfo {
            name: name.clone(),
            online: self.shared.is_online(s, now),
            last_seen_unix_ms: s.last_seen_ms,
            datasets: s
                .datasets
                .iter()
                .map(|d| v1::DatasetSchema {
                    name: d.name.clone(),
                    columns: d.columns.clone(),
                    rows: s.rows.get(&d.name).copied().unwrap_or(0),
                    class_counts: s.classes.get(&d.name).cloned().unwrap_or_default(),
                })
                .collect(),
            registered_unix_ms: s.registered_ms,
        });
        Ok(Response::new(crate::fit::sites_page(
            all,
            &req.page_token,
            req.page_size,
            crate::fit::REPLY_BUDGET,
        )))
    }

    async fn evaluate_run(
        &self,
        req: Request<v1::EvaluateRunRequest>,
    ) -> Result<Response<v1::EvaluateRunResponse>, Status> {
        let caller = Caller::of(&req);
        let run_id = req.into_inner().run_id;
        crate::edge::run_id("EvaluateRunRequest.run_id", &run_id)?;
        let run = self.shared.db(|s| s.run(&run_id))?;
        caller.may_act_on("evaluate", &run_id, &run.creator)?;
        let global = self.model_sha(&run_id, 0)?;
        let sites_asked = crate::campaign::start(&self.shared, &run, &global)?;
        if sites_asked == 0 {
            return Err(Status::failed_precondition(format!(
                "no online site holds the dataset of run `{run_id}`"
            )));
        }
        let mut details = caller.audit();
        details["sites_asked"] = sites_asked.into();
        details["global_sha256"] = global.clone().into();
        self.shared.audit(
            medfl_audit::Event::new("run_evaluation_requested", details).run(run_id.clone()),
        );
        Ok(Response::new(v1::EvaluateRunResponse {
            sites_asked: sites_asked as u32,
            global_sha256: global,
        }))
    }

    type PullModelStream = Boxed<v1::BlobChunk>;

    async fn pull_model(
        &self,
        req: Request<v1::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let req = req.into_inner();
        crate::edge::run_id("PullModelRequest.run_id", &req.run_id)?;
        let sha = self.model_sha(&req.run_id, req.round)?;
        Ok(Response::new(Box::pin(blob_stream(
            &self.shared,
            &sha,
            0,
            None,
        )?)))
    }
}

/// The size of the whole model a run trains: the base's weights for a text run (0 when the
/// base is no longer published), else the run's initial global model.
fn full_model_bytes(shared: &Shared, spec_toml: &str, initial_sha256: &str) -> u64 {
    let spec = RunSpec::from_toml(spec_toml).ok();
    match spec.as_ref().and_then(RunSpec::encoder) {
        Some(e) => shared
            .bases
            .resolve(&e.base, &e.base_sha256)
            .map_or(0, |b| b.weights_bytes),
        None => shared.blobs.size(initial_sha256).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::slug;

    #[test]
    fn slugs_are_safe() {
        assert_eq!(slug("Breast Cancer / FedAvg"), "breast-cancer---fedavg");
        assert_eq!(slug("***"), "run");
    }
}
