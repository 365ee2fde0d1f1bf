//! The run engine: one task per running run that drives its rounds through the core state
//! machine, folds verified updates into the running average and commits each round.
//!
//! All results reach the engine as messages, so admission, folding and closing a round are
//! decided by one task in one order; handlers only stream bytes and verify them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use medfl_core::aggregator::{AdmitError, Admitted, Aggregator, Disposition, RoundStart};
use medfl_core::metrics::weighted_mean;
use medfl_core::round::{Decision, Phase, RoundLimits, RoundState};
use medfl_core::run::{RunStatus, SiteOutcome};
use medfl_core::selection::select_sites_sparing;
use medfl_core::spec::RunSpec;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::aggregate::{self, BlobSource};
use crate::state::{now_ms, EngineMsg, RoundSnapshot, RunHandle, Shared, Traffic};
use crate::store::{BlobRef, BlobRole, RoundRecord, RunRecord, SiteResult};
use crate::CoordinatorError;

/// Messages queued per run before senders wait.
const ENGINE_QUEUE: usize = 64;

/// Starts the engine of `run`, registering its handle. The task ends when the run ends or the
/// coordinator shuts down (leaving the run `running`, to be resumed on the next start).
pub fn spawn(
    shared: &Arc<Shared>,
    run: &RunRecord,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), CoordinatorError> {
    let spec = Arc::new(RunSpec::from_toml(&run.spec)?);
    let model = medfl_model::RunModel::for_run(&spec, &shared.bases)?;
    let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
    let (snap_tx, snap_rx) = watch::channel(None);
    let handle = RunHandle {
        tx,
        snapshot: snap_rx,
        spec_toml: Arc::from(run.spec.as_str()),
        schema: Arc::new(model.schema()),
        spec,
        traffic: Arc::new(Traffic::default()),
    };
    shared.runs()?.insert(run.id.clone(), handle.clone());
    let engine = Engine {
        shared: shared.clone(),
        run_id: run.id.clone(),
        handle,
        rx,
        snap_tx,
        initial_sha256: run.initial_sha256.clone(),
        opt_state: OptState::default(),
        declining: Vec::new(),
        stop_reply: None,
    };
    tasks.spawn(engine.run());
    Ok(())
}

/// A server optimizer's state between rounds: blob ids of its moments.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
struct OptState {
    m: Option<String>,
    v: Option<String>,
}

struct Engine {
    shared: Arc<Shared>,
    run_id: String,
    handle: RunHandle,
    rx: mpsc::Receiver<EngineMsg>,
    snap_tx: watch::Sender<Option<RoundSnapshot>>,
    initial_sha256: String,
    /// Server optimizer state after the last committed round.
    opt_state: OptState,
    /// Sites whose hospital kept the run out at their last task (awaiting approval, rejected,
    /// paused): still asked every round, but they take no sampled slot.
    declining: Vec<String>,
    /// The researcher who stopped the run, answered once the end is recorded.
    stop_reply: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How a phase ended.
enum Flow {
    /// Enough results: go on (the sites listed did not answer).
    Close(Vec<String>),
    /// Too few updates: try the round again.
    Retry(Vec<String>),
    /// Too few updates and no retries left.
    Fail(Vec<String>),
    /// A researcher stopped the run.
    Stopped(Option<tokio::sync::oneshot::Sender<()>>),
    /// The coordinator is shutting down.
    Shutdown,
}

/// The open attempt of a round.
struct Attempt {
    state: RoundState,
    /// The round's aggregator; out while an update is being folded.
    acc: Option<Aggregator>,
    global_sha256: String,
    global_size: u64,
    losses: Vec<(u64, f64)>,
    evaluations: Vec<(u64, BTreeMap<String, f64>)>,
    /// Set when folding failed part-way: the sums are unusable and the attempt must be redone.
    poisoned: Option<String>,
    /// Accepted updates, in order; those the aggregator holds are handed back at the close.
    held: Vec<HeldUpdate>,
}

/// An accepted update, kept on disk until the round closes.
struct HeldUpdate {
    sha256: String,
    /// Clipping factor towards the global model (1 when within the norm bound).
    scale: f32,
    /// Whether the aggregator holds it for the close (robust strategies) rather than folded it.
    held: bool,
}

/// Offers the update at `path` to the round's aggregator, which applies the run's norm bound
/// (measured against the global model at `global_path`) and folds the update in or holds it.
fn check_and_fold(
    acc: &mut Aggregator,
    path: std::path::PathBuf,
    global_path: std::path::PathBuf,
    schema: &Arc<medfl_core::ModelSchema>,
    weight: f64,
) -> Result<Admitted, AdmitError<CoordinatorError>> {
    let mut update = BlobSource::new(path, schema.clone());
    let mut global = BlobSource::new(global_path, schema.clone());
    acc.admit(weight, &mut update, Some(&mut global))
}

impl Engine {
    async fn run(mut self) {
        let id = self.run_id.clone();
        let end = match self.drive().await {
            Ok(Some((status, error))) => Some((status, error)),
            Ok(None) => None,
            Err(e) => Some((RunStatus::Failed, e.to_string())),
        };
        if let Some((status, error)) = end {
            self.shared.audit(
                medfl_audit::Event::new(
                    "run_ended",
                    serde_json::json!({ "status": status.as_str(), "error": error }),
                )
                .run(id.clone()),
            );
            if status == RunStatus::Failed {
                warn!(run = %id, error = %error, "run failed");
            } else {
                info!(run = %id, status = status.as_str(), "run ended");
            }
            // Collected before its end is stored: whoever sees the run ended sees it collected,
            // and a crash in between resumes the run, which ends (and collects) again.
            let shared = self.shared.clone();
            let run = id.clone();
            let collected = tokio::task::spawn_blocking(move || {
                crate::retention::collect_ended_run(&shared, &run)
            })
            .await;
            match collected {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(run = %id, error = %e, "could not collect the ended run's blobs"),
                Err(e) => warn!(run = %id, error = %e, "collection task failed"),
            }
            if let Err(e) = self
                .shared
                .store()
                .and_then(|s| s.set_run_status(&id, status, &error))
            {
                warn!(run = %id, error = %e, "could not record the run's end");
            }
        }
        if let Some(reply) = self.stop_reply.take() {
            let _ = reply.send(());
        }
        self.snap_tx.send_replace(None);
        if let Ok(mut runs) = self.shared.runs() {
            runs.remove(&id);
        }
        self.shared.notify_run(&id);
        self.shared.notify_tasks();
    }

    /// Runs the remaining rounds. `Ok(None)` means the coordinator is shutting down.
    async fn drive(&mut self) -> Result<Option<(RunStatus, String)>, CoordinatorError> {
        let spec = self.handle.spec.clone();
        let done = self.shared.store()?.rounds(&self.run_id)?;
        let mut global = done
            .last()
            .map(|r| r.global_sha256.clone())
            .unwrap_or_else(|| self.initial_sha256.clone());
        // A resumed run continues with the optimizer state committed with its last round.
        self.opt_state = match done.last() {
            Some(r) if !r.opt_state.is_empty() => serde_json::from_str(&r.opt_state).map_err(|e| {
                CoordinatorError::Corrupt(format!(
                    "run `{}` round {}: stored optimizer state does not parse: {e}",
                    self.run_id, r.round
                ))
            })?,
            _ => OptState::default(),
        };
        let first = done.len() as u32 + 1;
        if first > 1 {
            info!(run = %self.run_id, round = first, "resuming run");
        }
        // Updates of attempts a crash interrupted will never be folded.
        self.release_updates(first, None).await;
        let limits = RoundLimits {
            min_sites: spec.min_sites as usize,
            deadline_ms: spec.round_deadline_secs * 1000,
            max_retries: spec.max_retries,
        };
        for round in first..=spec.rounds {
            let started_ms = now_ms();
            let mut attempt = self.shared.store()?.last_attempt(&self.run_id, round)?;
            let mut attempts = 0;
            let mut open = loop {
                attempt += 1;
                attempts += 1;
                match self.wait_for_sites(limits).await? {
                    Flow::Stopped(reply) => return self.stopped(reply),
                    Flow::Shutdown => return Ok(None),
                    _ => {}
                }
                let selected = self.select(round, attempt)?;
                info!(run = %self.run_id, round, attempt, sites = ?selected, "round started");
                let mut open = Attempt {
                    state: RoundState::start(round, attempt, selected, now_ms(), limits),
                    acc: Some(
                        Aggregator::new(&spec.strategy, (*self.handle.schema).clone())?
                            .with_defense(&spec.defense),
                    ),
                    global_size: self.shared.blobs.size(&global)?,
                    global_sha256: global.clone(),
                    losses: Vec::new(),
                    evaluations: Vec::new(),
                    poisoned: None,
                    held: Vec::new(),
                };
                let flow = self.wait_phase(&mut open).await?;
                if !matches!(flow, Flow::Close(_)) {
                    self.release_updates(round, Some(attempt)).await;
                }
                let missing = match flow {
                    Flow::Close(missing) => {
                        self.record_missing(&open, &missing)?;
                        break open;
                    }
                    Flow::Retry(missing) => missing,
                    Flow::Fail(missing) => {
                        self.record_missing(&open, &missing)?;
                        let silent = if missing.is_empty() {
                            "none (too few eligible sites were online)".to_string()
                        } else {
                            missing.join(", ")
                        };
                        return Ok(Some((
                            RunStatus::Failed,
                            format!(
                                "round {round}: {} of the required {} sites sent an update in each of {attempts} attempts; \
                                 selected sites without an update in the last: {silent}",
                                open.state.updates.len(),
                                spec.min_sites,
                            ),
                        )));
                    }
                    Flow::Stopped(reply) => return self.stopped(reply),
                    Flow::Shutdown => return Ok(None),
                };
                self.record_missing(&open, &missing)?;
                warn!(run = %self.run_id, round, attempt, missing = ?missing, "too few updates; retrying the round");
            };
            global = self.commit(&mut open, attempts, started_ms).await?;
            self.release_updates(round, Some(open.state.attempt)).await;
            open.state.begin_evaluation(now_ms());
            open.global_sha256 = global.clone();
            open.global_size = self.shared.blobs.size(&global)?;
            match self.wait_phase(&mut open).await? {
                Flow::Stopped(reply) => return self.stopped(reply),
                Flow::Shutdown => return Ok(None),
                Flow::Close(_) | Flow::Retry(_) | Flow::Fail(_) => {}
            }
            let metrics = weighted_mean(&open.evaluations);
            let (down, _) = self.handle.traffic.take();
            self.shared
                .store()?
                .set_round_evaluation(&self.run_id, round, &metrics, down)?;
            info!(run = %self.run_id, round, metrics = ?metrics, "round evaluated");
            self.shared.notify_run(&self.run_id);
        }
        // Every eligible site scores the final model on its own validation split. The run is
        // complete either way; a failure here only costs the cross-site table.
        if let Err(e) =
            crate::campaign::start(&self.shared, &self.run_id, &self.handle.spec_toml, &global)
        {
            warn!(run = %self.run_id, error = %e, "could not start the cross-site evaluation");
        }
        Ok(Some((RunStatus::Completed, String::new())))
    }

    /// Ends the run as stopped; the researcher is answered once its end is recorded.
    fn stopped(
        &mut self,
        reply: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<Option<(RunStatus, String)>, CoordinatorError> {
        self.stop_reply = reply;
        Ok(Some((RunStatus::Stopped, "stopped by a researcher".into())))
    }

    /// Before selecting, waits (up to one round deadline) until `min_sites` eligible sites are
    /// online, so a coordinator that just restarted gives its sites time to reconnect.
    async fn wait_for_sites(&mut self, limits: RoundLimits) -> Result<Flow, CoordinatorError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(limits.deadline_ms);
        let mut changed = self.shared.tasks_changed.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            changed.borrow_and_update();
            if self.candidates()?.len() >= limits.min_sites {
                return Ok(Flow::Close(Vec::new()));
            }
            tokio::select! {
                _ = changed.changed() => {}
                msg = self.rx.recv() => match msg {
                    Some(EngineMsg::Stop { reply }) => return Ok(Flow::Stopped(Some(reply))),
                    // Results for no open round: answer them as such.
                    Some(msg) => refuse_idle(msg),
                    None => return Ok(Flow::Shutdown),
                },
                _ = tokio::time::sleep_until(deadline) => return Ok(Flow::Close(Vec::new())),
                _ = crate::state::stopping(&mut shutdown) => return Ok(Flow::Shutdown),
            }
        }
    }

    /// Online sites holding the run's dataset with every column.
    fn candidates(&self) -> Result<Vec<String>, CoordinatorError> {
        let spec = &self.handle.spec;
        let now = now_ms();
        Ok(self
            .shared
            .sites()?
            .iter()
            .filter(|(_, s)| self.shared.is_online(s, now) && s.holds(spec))
            .map(|(name, _)| name.clone())
            .collect())
    }

    /// The eligible sites sampled for this attempt, plus every eligible site that declined last.
    fn select(&self, round: u32, attempt: u32) -> Result<Vec<String>, CoordinatorError> {
        let spec = &self.handle.spec;
        let candidates = self.candidates()?;
        let seed = spec.seed ^ (u64::from(round) << 32) ^ u64::from(attempt);
        Ok(select_sites_sparing(
            &candidates,
            &self.declining,
            spec.fraction,
            spec.min_sites as usize,
            seed,
        ))
    }

    fn publish(&self, open: &Attempt) {
        let s = &open.state;
        let reported = match s.phase {
            Phase::Train => s.updates.len(),
            Phase::Evaluate => s.evaluated.len(),
        };
        self.snap_tx.send_replace(Some(RoundSnapshot {
            round: s.round,
            attempt: s.attempt,
            phase: s.phase,
            pending: s.pending().into_iter().collect(),
            awaiting: s.awaiting.keys().cloned().collect(),
            selected: s.selected.clone(),
            reported,
            global_sha256: open.global_sha256.clone(),
            global_size: open.global_size,
            deadline_ms: s.deadline_ms,
        }));
        self.shared.notify_tasks();
        self.shared.notify_run(&self.run_id);
    }

    /// Handles messages until the state machine decides, the run is stopped or we shut down.
    async fn wait_phase(&mut self, open: &mut Attempt) -> Result<Flow, CoordinatorError> {
        let mut shutdown = self.shared.shutdown.clone();
        self.publish(open);
        loop {
            let until_ms = match open.state.decide(now_ms()) {
                Decision::Wait { until_ms } => until_ms,
                Decision::Close { missing } => return Ok(Flow::Close(missing)),
                Decision::Retry { missing } => return Ok(Flow::Retry(missing)),
                Decision::Fail { missing } => return Ok(Flow::Fail(missing)),
            };
            let wait = Duration::from_millis(until_ms.saturating_sub(now_ms()));
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(EngineMsg::Stop { reply }) => return Ok(Flow::Stopped(Some(reply))),
                    Some(msg) => {
                        self.handle_msg(open, msg).await?;
                        if let Some(why) = &open.poisoned {
                            warn!(run = %self.run_id, round = open.state.round, error = %why, "aggregation broken; redoing the round");
                            return Ok(Flow::Retry(open.state.pending()));
                        }
                        self.publish(open);
                    }
                    None => return Ok(Flow::Shutdown),
                },
                _ = tokio::time::sleep(wait) => {}
                _ = crate::state::stopping(&mut shutdown) => return Ok(Flow::Shutdown),
            }
        }
    }

    async fn handle_msg(
        &mut self,
        open: &mut Attempt,
        msg: EngineMsg,
    ) -> Result<(), CoordinatorError> {
        match msg {
            EngineMsg::Update {
                site,
                round,
                attempt,
                base_sha256,
                sha256,
                examples,
                train_loss,
                reply,
            } => {
                let result = self
                    .accept_update(
                        open,
                        &site,
                        round,
                        attempt,
                        &base_sha256,
                        &sha256,
                        examples,
                        train_loss,
                    )
                    .await;
                let now = now_ms();
                match &result {
                    Ok(()) => {
                        info!(run = %self.run_id, round, attempt, site = %site, examples, train_loss, "update accepted");
                        self.declining.retain(|d| *d != site);
                        self.shared.audit(
                            medfl_audit::Event::new(
                                "update_accepted",
                                serde_json::json!({
                                    "attempt": attempt,
                                    "sha256": sha256,
                                    "bytes": self.shared.blobs.size(&sha256).unwrap_or(0),
                                    "examples": examples,
                                    "clipped_to": open.held.last().map(|h| h.scale),
                                }),
                            )
                            .run(self.run_id.clone())
                            .round(round)
                            .site(site.clone()),
                        );
                        self.shared.store()?.add_site_result(
                            &self.run_id,
                            &SiteResult {
                                examples,
                                train_loss,
                                update_sha256: sha256.clone(),
                                ..SiteResult::new(round, attempt, &site, SiteOutcome::Accepted)
                            },
                            now,
                        )?;
                    }
                    Err(e) => {
                        record_refusal(
                            &self.shared,
                            &self.run_id,
                            round,
                            attempt,
                            &site,
                            &e.to_string(),
                        );
                    }
                }
                // The update's reference (taken on arrival) goes when the attempt ends.
                let _ = reply.send(result);
            }
            EngineMsg::Evaluation {
                site,
                round,
                global_sha256,
                examples,
                metrics,
                reply,
            } => {
                let result = open
                    .state
                    .admit_evaluation(&site, round, now_ms())
                    .map_err(CoordinatorError::from)
                    .and_then(|()| {
                        if global_sha256 != open.global_sha256 {
                            return Err(CoordinatorError::Invalid(format!(
                                "evaluation of model {global_sha256}, round {round}'s model is {}",
                                open.global_sha256
                            )));
                        }
                        Ok(())
                    });
                if result.is_ok() {
                    open.state.record_evaluation(&site);
                    self.shared.store()?.set_site_evaluation(
                        &self.run_id,
                        round,
                        &site,
                        examples,
                        &metrics,
                    )?;
                    open.evaluations.push((examples, metrics));
                }
                let _ = reply.send(result);
            }
            EngineMsg::Failure {
                site,
                round,
                attempt,
                reason,
                outcome,
            } => {
                if round == open.state.round
                    && attempt == open.state.attempt
                    && open.state.phase == Phase::Train
                    && open.state.owes(&site)
                {
                    warn!(run = %self.run_id, round, attempt, site = %site, outcome = %outcome, reason = %reason, "site cannot train");
                    let declined = outcome.is_declined();
                    if declined && !self.declining.contains(&site) {
                        self.declining.push(site.clone());
                    } else if !declined {
                        self.declining.retain(|d| *d != site);
                    }
                    if outcome == SiteOutcome::Pending {
                        // Holds its place until the deadline: an approval may still come.
                        open.state.record_awaiting(&site, reason.clone());
                    } else {
                        open.state.record_failure(&site, reason.clone());
                    }
                    self.shared.store()?.add_site_result(
                        &self.run_id,
                        &SiteResult {
                            reason,
                            ..SiteResult::new(round, attempt, &site, outcome)
                        },
                        now_ms(),
                    )?;
                }
            }
            EngineMsg::Stop { reply } => {
                // Handled by the caller; answered here only if it slips through.
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn accept_update(
        &self,
        open: &mut Attempt,
        site: &str,
        round: u32,
        attempt: u32,
        base_sha256: &str,
        sha256: &str,
        examples: u64,
        train_loss: f64,
    ) -> Result<(), CoordinatorError> {
        open.state.admit_update(site, round, attempt, now_ms())?;
        if base_sha256 != open.global_sha256 {
            return Err(CoordinatorError::Invalid(format!(
                "update was trained from model {base_sha256}, round {round} started from {}",
                open.global_sha256
            )));
        }
        let path = self.shared.blobs.path(sha256)?;
        let global_path = self.shared.blobs.path(&open.global_sha256)?;
        let schema = self.handle.schema.clone();
        let mut acc = open
            .acc
            .take()
            .ok_or_else(|| CoordinatorError::Internal("aggregator missing".into()))?;
        // Norm checks and folding read the update from disk: CPU and I/O, off the async threads.
        let (acc, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = check_and_fold(&mut acc, path, global_path, &schema, examples as f64);
            (acc, outcome)
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("fold task: {e}")))?;
        open.acc = Some(acc);
        let Admitted { scale, disposition } = match outcome {
            Ok(admitted) => admitted,
            Err(AdmitError::Refused(e)) => return Err(e),
            Err(AdmitError::Broken(e)) => {
                // The update was validated on arrival, so a failure here is the disk's; the
                // partial sums cannot be trusted, so the attempt is redone.
                let why = format!("folding update {sha256} from `{site}`: {e}");
                open.poisoned = Some(why.clone());
                return Err(CoordinatorError::Internal(why));
            }
        };
        if scale < 1.0 {
            info!(run = %self.run_id, round, site = %site, scale, "update clipped to the norm bound");
        }
        open.held.push(HeldUpdate {
            sha256: sha256.to_string(),
            scale,
            held: disposition == Disposition::Held,
        });
        open.state.record_update(site, examples);
        open.losses.push((examples, train_loss));
        Ok(())
    }

    /// Releases the updates of `round` (of `attempt`, or of every attempt) unless the operator
    /// retains them; a blob another reference holds (a global model equal to an update, the
    /// same update in another run) stays.
    async fn release_updates(&self, round: u32, attempt: Option<u32>) {
        let shared = self.shared.clone();
        let run_id = self.run_id.clone();
        let released = tokio::task::spawn_blocking(move || {
            crate::retention::release_updates(&shared, &run_id, round, attempt)
        })
        .await;
        match released {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(run = %self.run_id, round, error = %e, "could not release update blobs"),
            Err(e) => warn!(run = %self.run_id, round, error = %e, "update release task failed"),
        }
    }

    fn record_missing(&self, open: &Attempt, missing: &[String]) -> Result<(), CoordinatorError> {
        let store = self.shared.store()?;
        for site in missing {
            let reason = open
                .state
                .failures
                .get(site)
                .map(|r| format!("site failed: {r}"))
                .unwrap_or_else(|| "no update before the deadline".into());
            // Sites that failed or await approval have their own result already.
            if open.state.failures.contains_key(site) || open.state.awaiting.contains_key(site) {
                continue;
            }
            store.add_site_result(
                &self.run_id,
                &SiteResult {
                    reason,
                    ..SiteResult::new(
                        open.state.round,
                        open.state.attempt,
                        site,
                        SiteOutcome::Missing,
                    )
                },
                now_ms(),
            )?;
        }
        Ok(())
    }

    /// Averages the attempt's updates, stores the new global model and commits the round.
    async fn commit(
        &mut self,
        open: &mut Attempt,
        attempts: u32,
        started_ms: u64,
    ) -> Result<String, CoordinatorError> {
        let acc = open
            .acc
            .take()
            .ok_or_else(|| CoordinatorError::Internal("aggregator missing".into()))?;
        let shared = self.shared.clone();
        let schema = self.handle.schema.clone();
        let global_path = shared.blobs.path(&open.global_sha256)?;
        // The updates the aggregator holds, in the order it took them.
        let held: Vec<std::path::PathBuf> = open
            .held
            .iter()
            .filter(|h| h.held)
            .map(|h| shared.blobs.path(&h.sha256))
            .collect::<Result<_, CoordinatorError>>()?;
        let state_path =
            |sha: &Option<String>| sha.as_ref().map(|s| shared.blobs.path(s)).transpose();
        let (m_path, v_path) = (
            state_path(&self.opt_state.m)?,
            state_path(&self.opt_state.v)?,
        );
        let step = u64::from(open.state.round);
        // Aggregation reads updates and sums block by block and streams the result to disk.
        let (sha, opt_state) =
            tokio::task::spawn_blocking(move || -> Result<(String, OptState), CoordinatorError> {
                let source = |path: std::path::PathBuf| BlobSource::new(path, schema.clone());
                let mut global = source(global_path);
                let (mut m, mut v) = (m_path.map(source), v_path.map(source));
                let mut held: Vec<BlobSource> = held.into_iter().map(source).collect();
                let start = RoundStart {
                    step,
                    global: Some(&mut global),
                    first_moment: m.as_mut(),
                    second_moment: v.as_mut(),
                };
                let out = aggregate::finish(acc, start, &mut held, &shared.blobs, &schema)?;
                Ok((out.global, OptState { m: out.m, v: out.v }))
            })
            .await
            .map_err(|e| CoordinatorError::Internal(format!("aggregation task: {e}")))??;
        let (down, up) = self.handle.traffic.take();
        let examples: u64 = open.state.updates.values().sum();
        let loss_weight: f64 = open.losses.iter().map(|(n, _)| *n as f64).sum();
        let train_loss =
            open.losses.iter().map(|(n, l)| *n as f64 * l).sum::<f64>() / loss_weight.max(1.0);
        let record = RoundRecord {
            round: open.state.round,
            attempts,
            sites_selected: open.state.selected.len() as u32,
            sites_reported: open.state.updates.len() as u32,
            examples,
            train_loss,
            eval_metrics: BTreeMap::new(),
            started_ms,
            finished_ms: now_ms(),
            bytes_down: down,
            bytes_up: up,
            global_sha256: sha.clone(),
            opt_state: serde_json::to_string(&opt_state).map_err(|e| {
                CoordinatorError::Internal(format!("optimizer state of round {}: {e}", open.state.round))
            })?,
        };
        let round = record.round;
        let made: Vec<BlobRef> = std::iter::once(BlobRef::of_round(&sha, &self.run_id, BlobRole::Global, round))
            .chain(opt_state.m.iter().map(|m| BlobRef::of_round(m, &self.run_id, BlobRole::OptimizerM, round)))
            .chain(opt_state.v.iter().map(|v| BlobRef::of_round(v, &self.run_id, BlobRole::OptimizerV, round)))
            .collect();
        self.shared.store()?.commit_round(&self.run_id, &record, &made)?;
        for r in &made {
            self.shared.blobs.unpin(&r.sha256);
        }
        // The previous round's optimizer state is superseded.
        let superseded: Vec<BlobRef> = self
            .shared
            .store()?
            .refs_of_run(&self.run_id)?
            .into_iter()
            .filter(|r| matches!(r.role, BlobRole::OptimizerM | BlobRole::OptimizerV) && r.round < round)
            .collect();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || crate::retention::release(&shared, &superseded))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("release task: {e}")))??;
        self.shared.audit(
            medfl_audit::Event::new(
                "round_committed",
                serde_json::json!({
                    "global_sha256": sha,
                    "sites": open.state.updates.keys().collect::<Vec<_>>(),
                    "examples": examples,
                }),
            )
            .run(self.run_id.clone())
            .round(record.round),
        );
        self.opt_state = opt_state;
        info!(
            run = %self.run_id,
            round = record.round,
            sites = record.sites_reported,
            examples,
            train_loss,
            global = %sha,
            "round committed"
        );
        Ok(sha)
    }
}

/// Answers a result that arrived while no round is open.
fn refuse_idle(msg: EngineMsg) {
    let refusal = |round| {
        Err(CoordinatorError::Refused(
            medfl_core::round::Refusal::NotOpen {
                round,
                attempt: 0,
                open_round: 0,
                open_attempt: 0,
            },
        ))
    };
    match msg {
        EngineMsg::Update { round, reply, .. } | EngineMsg::Evaluation { round, reply, .. } => {
            let _ = reply.send(refusal(round));
        }
        EngineMsg::Stop { reply } => {
            let _ = reply.send(());
        }
        EngineMsg::Failure { .. } => {}
    }
}

/// Logs, audits and records a refused update (the store keeps every refusal per site and round).
pub fn record_refusal(
    shared: &Shared,
    run_id: &str,
    round: u32,
    attempt: u32,
    site: &str,
    reason: &str,
) {
    warn!(run = %run_id, round, attempt, site = %site, reason = %reason, "update refused");
    shared.audit(
        medfl_audit::Event::new(
            "update_refused",
            serde_json::json!({ "attempt": attempt, "reason": reason }),
        )
        .run(run_id)
        .round(round)
        .site(site),
    );
    let result = SiteResult {
        reason: reason.into(),
        ..SiteResult::new(round, attempt, site, SiteOutcome::Refused)
    };
    if let Err(e) = shared
        .store()
        .and_then(|s| s.add_site_result(run_id, &result, now_ms()))
    {
        warn!(run = %run_id, error = %e, "could not record a refusal");
    }
    shared.notify_run(run_id);
}
