//! The run engine: one task per running run, the shell around the core run machine
//! ([`medfl_core::run_machine::RunMachine`]). It feeds the machine what happened (results,
//! sites coming online, deadlines, stop) and carries out its effects: publishing tasks,
//! folding and committing on blocking threads, recording results, releasing blobs, ending.
//!
//! All results reach the engine as messages, so the machine sees them one at a time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use medfl_core::aggregator::{AdmitError, Admitted, Aggregator, Disposition, RoundStart};
use medfl_core::client_dp::ClientDp;
use medfl_core::run::{RunStatus, SiteOutcome};
use medfl_core::run_machine::{
    CommitRequest, Effect, Event, FoldOutcome, OpenPhase, Rejection, RunMachine, RunPlan,
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::aggregate::{self, BlobSource};
use crate::state::{
    mono_ms, now_ms, wall_of, EngineMsg, RoundSnapshot, RunHandle, Shared, Traffic,
};
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
    let spec = Arc::new(medfl_core::spec::RunSpec::from_toml(&run.spec)?);
    let model = medfl_model::RunModel::for_run(&spec, &shared.bases)?;
    let (tx, rx) = mpsc::channel(ENGINE_QUEUE);
    let (snap_tx, snap_rx) = watch::channel(None);
    let mut plan = plan(&spec)?;
    // Statistics pooled before a restart are not gathered again.
    plan.statistics &= run.standardization.is_none();
    let machine = RunMachine::new(plan, &run.initial_sha256);
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
        machine,
        acc: None,
        opt_state: OptState::default(),
        global_size: None,
        answer: None,
        stop_reply: None,
        standardization: run.standardization.as_deref().map(Arc::from),
    };
    tasks.spawn(engine.run());
    Ok(())
}

/// The run machine's plan for `spec`. Under client-level DP: the rounds its target ε allows,
/// and a sampling seed drawn from the operating system, so that nobody can tell from the spec
/// which sites a round sampled.
fn plan(spec: &medfl_core::spec::RunSpec) -> Result<RunPlan, CoordinatorError> {
    let mut plan = RunPlan::of(spec);
    if let Some(c) = &spec.privacy.client {
        // The PLD accountant's bisection can take seconds: off the async workers' hands.
        plan.privacy_rounds = Some(crate::state::blocking(|| {
            c.rounds_within_target(spec.rounds)
        })?);
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| CoordinatorError::Internal("no system randomness".into()))?;
        plan.seed = u64::from_le_bytes(seed);
    }
    Ok(plan)
}

/// The operating system's generator, for client-level DP's noise.
struct SystemBits(ring::rand::SystemRandom);

impl medfl_core::privacy::dpsgd::RandomBits for SystemBits {
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        // Without the operating system's generator there is no private noise: stopping the
        // coordinator beats publishing a model with predictable noise.
        ring::rand::SecureRandom::fill(&self.0, &mut b)
            .expect("the operating system's random number generator failed");
        u64::from_le_bytes(b)
    }
}

/// A server optimizer's state between rounds: blob ids of its moments, and client-level DP's
/// clipping norm for the next round (which adaptive clipping moves).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
struct OptState {
    m: Option<String>,
    v: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clip_norm: Option<f64>,
}

struct Engine {
    shared: Arc<Shared>,
    run_id: String,
    handle: RunHandle,
    rx: mpsc::Receiver<EngineMsg>,
    snap_tx: watch::Sender<Option<RoundSnapshot>>,
    /// Every decision about the run.
    machine: RunMachine,
    /// The open attempt's aggregator; out while an update is being folded.
    acc: Option<Aggregator>,
    /// Server optimizer state after the last committed round.
    opt_state: OptState,
    /// Size of the model in play, by id.
    global_size: Option<(String, u64)>,
    /// The answer to the result being handled.
    answer: Option<Result<(), CoordinatorError>>,
    /// The researcher who stopped the run, answered once the end is recorded.
    stop_reply: Option<tokio::sync::oneshot::Sender<()>>,
    /// Federated standardisation: the pooled feature statistics (JSON), once gathered.
    standardization: Option<Arc<str>>,
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
    /// Client-level DP's clipping norm for the round in play: the last committed round's
    /// adapted one, or the spec's.
    fn clip_norm(&self) -> f64 {
        let spec = &self.handle.spec;
        self.opt_state
            .clip_norm
            .unwrap_or_else(|| spec.privacy.client.as_ref().map_or(0.0, |c| c.clip_norm))
    }
}

/// The error a handler answers for a result the run machine did not take.
pub fn rejected(r: Rejection) -> CoordinatorError {
    match r {
        Rejection::Round(r) => CoordinatorError::Refused(r),
        Rejection::Invalid(m) => CoordinatorError::Invalid(m),
        Rejection::NotAsked(m) => CoordinatorError::PermissionDenied(m),
        Rejection::NotOpen(m) => CoordinatorError::NotFound(m),
    }
}

impl Engine {
    async fn run(mut self) {
        let id = self.run_id.clone();
        if let Err(e) = self.drive().await {
            // Whatever could not be carried out fails the run.
            let effects = self.machine.handle(Event::Broken(e.to_string()), mono_ms());
            if let Err(e) = self.perform(effects).await {
                warn!(run = %id, error = %e, "could not end the run");
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

    /// Feeds the machine until the run ends; returns early when the coordinator shuts down.
    async fn drive(&mut self) -> Result<(), CoordinatorError> {
        let done = self.shared.db(|s| s.rounds(&self.run_id))?;
        // A resumed run continues with the optimizer state committed with its last round.
        self.opt_state = match done.last() {
            Some(r) if !r.opt_state.is_empty() => {
                serde_json::from_str(&r.opt_state).map_err(|e| {
                    CoordinatorError::Corrupt(format!(
                        "run `{}` round {}: stored optimizer state does not parse: {e}",
                        self.run_id, r.round
                    ))
                })?
            }
            _ => OptState::default(),
        };
        let committed = done.len() as u32;
        if committed > 0 {
            info!(run = %self.run_id, round = committed + 1, "resuming run");
        }
        let last_attempt = self
            .shared
            .db(|s| s.last_attempt(&self.run_id, committed + 1))?;
        let global_sha256 = done
            .last()
            .map(|r| r.global_sha256.clone())
            .unwrap_or_else(|| self.machine.global_sha256().to_string());
        // The last committed round's evaluation, if the earlier process did not finish it.
        let evaluation = match committed {
            0 => None,
            n => self
                .shared
                .db(|s| s.unfinished_evaluation(&self.run_id, n))?,
        };
        if let Some(e) = &evaluation {
            info!(run = %self.run_id, round = committed, sites = e.trained.len().saturating_sub(e.answered.len()), "resuming the round's evaluation");
        }
        let mut changed = self.shared.tasks_changed.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        self.sites_online().await?;
        self.feed(Event::Resumed {
            committed,
            global_sha256,
            last_attempt,
            evaluation,
        })
        .await?;
        while !self.machine.is_ended() {
            changed.borrow_and_update();
            let deadline = self.machine.next_deadline();
            let wait = Duration::from_millis(deadline.map_or(0, |at| at.saturating_sub(mono_ms())));
            tokio::select! {
                _ = changed.changed() => self.sites_online().await?,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.on_msg(msg).await?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(wait), if deadline.is_some() => {
                    self.sites_online().await?;
                    let effects = self.machine.handle_timeout(mono_ms());
                    self.perform(effects).await?;
                }
                _ = crate::state::stopping(&mut shutdown) => return Ok(()),
            }
        }
        Ok(())
    }

    async fn feed(&mut self, event: Event) -> Result<(), CoordinatorError> {
        let effects = self.machine.handle(event, mono_ms());
        self.perform(effects).await
    }

    /// Tells the machine which eligible sites are online.
    async fn sites_online(&mut self) -> Result<(), CoordinatorError> {
        let sites = self.candidates()?;
        self.feed(Event::SitesOnline(sites)).await
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

    async fn on_msg(&mut self, msg: EngineMsg) -> Result<(), CoordinatorError> {
        match msg {
            EngineMsg::Update {
                site,
                round,
                attempt,
                base_sha256,
                sha256,
                examples,
                train_loss,
                privacy_epsilon,
                clip_indicator,
                reply,
            } => {
                self.answer = None;
                self.feed(Event::UpdateVerified {
                    site,
                    round,
                    attempt,
                    base_sha256,
                    sha256,
                    examples,
                    train_loss,
                    privacy_epsilon,
                    clip_indicator,
                })
                .await?;
                // An accepted update's reference goes when the attempt ends.
                let _ = reply.send(self.answer.take().unwrap_or(Ok(())));
            }
            EngineMsg::Evaluation {
                site,
                round,
                global_sha256,
                examples,
                metrics,
                reply,
            } => {
                self.answer = None;
                self.feed(Event::EvaluationReported {
                    site,
                    round,
                    global_sha256,
                    examples,
                    metrics,
                })
                .await?;
                let _ = reply.send(self.answer.take().unwrap_or(Ok(())));
            }
            EngineMsg::Statistics {
                site,
                round,
                attempt,
                sums,
                reply,
            } => {
                self.answer = None;
                self.feed(Event::StatisticsReported {
                    site: site.clone(),
                    round,
                    attempt,
                    sums,
                })
                .await?;
                // No answer from the machine is an internal error, never "accepted".
                let answer = self.answer.take().unwrap_or_else(|| {
                    warn!(run = %self.run_id, round, site = %site, "the run machine did not answer the statistics");
                    Err(CoordinatorError::Internal(format!(
                        "run `{}` round {round}: the statistics of `{site}` were not answered",
                        self.run_id
                    )))
                });
                let _ = reply.send(answer);
            }
            EngineMsg::Failure {
                site,
                round,
                attempt,
                reason,
                outcome,
            } => {
                self.feed(Event::SiteDeclined {
                    site,
                    round,
                    attempt,
                    outcome,
                    reason,
                })
                .await?
            }
            EngineMsg::Stop { reply } => {
                self.stop_reply = Some(reply);
                self.feed(Event::StopRequested).await?;
            }
        }
        Ok(())
    }

    /// Carries out effects in order; an effect that answers the machine queues the answer's
    /// effects before the rest.
    async fn perform(&mut self, effects: Vec<Effect>) -> Result<(), CoordinatorError> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let next = self.perform_one(effect).await?;
            for e in next.into_iter().rev() {
                queue.push_front(e);
            }
        }
        Ok(())
    }

    async fn perform_one(&mut self, effect: Effect) -> Result<Vec<Effect>, CoordinatorError> {
        // The machine's clock; what is stored carries wall time.
        let now = mono_ms();
        match effect {
            Effect::Publish(phase) => self.publish(phase)?,
            Effect::Reply(r) => self.answer = Some(r.map_err(rejected)),
            Effect::NewAggregator {
                round,
                attempt,
                expected_sites,
            } => {
                let spec = &self.handle.spec;
                let mut acc = Aggregator::new(&spec.strategy, (*self.handle.schema).clone())?
                    .with_defense(&spec.defense);
                if let (Some(c), Some(expected)) = (&spec.privacy.client, expected_sites) {
                    let bits = Box::new(SystemBits(ring::rand::SystemRandom::new()));
                    let dp = ClientDp::new(c, self.clip_norm(), expected, bits)?;
                    acc = acc.with_client_dp(dp)?;
                }
                self.acc = Some(acc);
                info!(run = %self.run_id, round, attempt, "round started");
            }
            Effect::Fold {
                site,
                round,
                sha256,
                examples,
                global_sha256,
            } => {
                let (outcome, answer) = self
                    .fold(&site, round, &sha256, &global_sha256, examples)
                    .await?;
                self.answer = Some(answer);
                return Ok(self
                    .machine
                    .handle(Event::UpdateFolded { site, outcome }, now));
            }
            Effect::UpdateAccepted {
                round,
                attempt,
                site,
                sha256,
                examples,
                train_loss,
                privacy_epsilon,
                clip_indicator,
                scale,
            } => {
                if let (Some(v), Some(dp)) = (
                    clip_indicator,
                    self.acc.as_mut().and_then(Aggregator::client_dp_mut),
                ) {
                    dp.count_indicator(v);
                }
                if scale < 1.0 {
                    info!(run = %self.run_id, round, site = %site, scale, "update clipped to the norm bound");
                }
                info!(run = %self.run_id, round, attempt, site = %site, examples, train_loss, "update accepted");
                self.shared.audit(
                    medfl_audit::Event::new(
                        "update_accepted",
                        serde_json::json!({
                            "attempt": attempt,
                            "sha256": sha256,
                            "bytes": self.shared.blobs.size(&sha256).unwrap_or(0),
                            "examples": examples,
                            "clipped_to": scale,
                        }),
                    )
                    .run(self.run_id.clone())
                    .round(round)
                    .site(site.clone()),
                );
                // Owned by this site's update in this attempt until the attempt ends; the
                // uploader keeps the file pinned until this is recorded.
                let owner = BlobRef::update(&sha256, &self.run_id, round, attempt, &site);
                let result = SiteResult {
                    examples,
                    train_loss,
                    privacy_epsilon,
                    update_sha256: sha256,
                    ..SiteResult::new(round, attempt, &site, SiteOutcome::Accepted)
                };
                self.shared.db(|s| {
                    s.add_ref(&owner)?;
                    s.add_site_result(&self.run_id, &result, now_ms())
                })?;
            }
            Effect::UpdateRefused {
                round,
                attempt,
                site,
                reason,
            } => record_refusal(&self.shared, &self.run_id, round, attempt, &site, &reason),
            Effect::SiteResult {
                round,
                attempt,
                site,
                outcome,
                reason,
            } => {
                if outcome != SiteOutcome::Missing {
                    warn!(run = %self.run_id, round, attempt, site = %site, outcome = %outcome, reason = %reason, "site cannot train");
                }
                self.shared.db(|s| {
                    s.add_site_result(
                        &self.run_id,
                        &SiteResult {
                            reason,
                            ..SiteResult::new(round, attempt, &site, outcome)
                        },
                        now_ms(),
                    )
                })?;
            }
            Effect::Commit(req) => {
                let round = req.round;
                let global_sha256 = self.commit(req).await?;
                // The machine's clock, read after the aggregation.
                return Ok(self.machine.handle(
                    Event::Committed {
                        round,
                        global_sha256,
                    },
                    mono_ms(),
                ));
            }
            Effect::CommitStatistics {
                round,
                attempt,
                sums,
            } => {
                self.commit_statistics(round, attempt, &sums)?;
                return Ok(self.machine.handle(Event::StatisticsCommitted, mono_ms()));
            }
            Effect::RecordEvaluation {
                round,
                site,
                examples,
                metrics,
            } => self
                .shared
                .db(|s| s.set_site_evaluation(&self.run_id, round, &site, examples, &metrics))?,
            Effect::RoundEvaluated { round, metrics } => {
                let (down, _) = self.handle.traffic.take();
                self.shared
                    .db(|s| s.set_round_evaluation(&self.run_id, round, &metrics, down))?;
                info!(run = %self.run_id, round, metrics = ?metrics, "round evaluated");
                self.shared.notify_run(&self.run_id);
            }
            Effect::ReleaseUpdates { round, attempt } => self.release_updates(round, attempt).await,
            Effect::RequestCrossSite => {
                // Every eligible site scores the final model on its own validation split. The
                // run is complete either way; a failure here only costs the cross-site table.
                let number = self
                    .shared
                    .campaign_numbers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sites = self.candidates()?;
                let effects = self
                    .machine
                    .handle(Event::CrossSiteRequested { number, sites }, now);
                if let Err(e) = crate::campaign::adopt(
                    &self.shared,
                    &self.run_id,
                    &self.handle.spec_toml,
                    self.standardization.clone(),
                    &self.machine,
                    effects,
                ) {
                    warn!(run = %self.run_id, error = %e, "could not start the cross-site evaluation");
                }
            }
            Effect::CrossSiteOpened { .. }
            | Effect::RecordCrossSite { .. }
            | Effect::CrossSiteComplete => {
                // The cross-site evaluation of an ended run is carried out by `campaign`.
            }
            Effect::End { status, reason } => self.end(status, reason).await,
        }
        Ok(Vec::new())
    }

    fn publish(&mut self, phase: Option<OpenPhase>) -> Result<(), CoordinatorError> {
        let snapshot = match phase {
            Some(p) => {
                let global_size = match &self.global_size {
                    Some((sha, size)) if *sha == p.global_sha256 => *size,
                    _ => {
                        let size = self.shared.blobs.size(&p.global_sha256)?;
                        self.global_size = Some((p.global_sha256.clone(), size));
                        size
                    }
                };
                let client_dp = p.expected_sites.map(|m| (self.clip_norm(), m));
                Some(RoundSnapshot {
                    client_dp,
                    round: p.round,
                    attempt: p.attempt,
                    phase: p.phase,
                    pending: p.pending,
                    awaiting: p.awaiting,
                    selected: p.selected,
                    reported: p.reported,
                    global_sha256: p.global_sha256,
                    global_size,
                    deadline_ms: wall_of(p.deadline_ms),
                    standardization: self.standardization.clone(),
                })
            }
            None => None,
        };
        self.snap_tx.send_replace(snapshot);
        self.shared.notify_tasks();
        self.shared.notify_run(&self.run_id);
        Ok(())
    }

    /// Pools the feature sums the sites sent, stores the statistics with the run and audits
    /// what was pooled; every later task of the run carries them.
    fn commit_statistics(
        &mut self,
        round: u32,
        attempt: u32,
        sums: &BTreeMap<String, medfl_core::standardize::FeatureSums>,
    ) -> Result<(), CoordinatorError> {
        let spec = &self.handle.spec;
        let all: Vec<_> = sums.values().cloned().collect();
        // A run that guards its updates against hostile sites guards its statistics too.
        let pool = if spec.strategy.needs_all_updates() || spec.defense.max_update_norm.is_some() {
            medfl_core::standardize::Standardization::pool_robust
        } else {
            medfl_core::standardize::Standardization::pool
        };
        let pooled = pool(&spec.task.feature_names(), &all)
            .map_err(|e| CoordinatorError::Invalid(format!("run `{}`: {e}", self.run_id)))?;
        let json = pooled.to_json();
        self.shared
            .db(|s| s.set_standardization(&self.run_id, &json))?;
        info!(run = %self.run_id, round, attempt, sites = pooled.sites, rows = pooled.rows, "feature statistics pooled");
        self.shared.audit(
            medfl_audit::Event::new(
                "statistics_pooled",
                serde_json::json!({
                    "attempt": attempt,
                    "sites": sums.iter().map(|(s, v)| (s.clone(), v.count)).collect::<BTreeMap<_, _>>(),
                    "rows": pooled.rows,
                }),
            )
            .run(self.run_id.clone())
            .round(round),
        );
        self.standardization = Some(Arc::from(json));
        Ok(())
    }

    /// Folds one update off the async threads; returns the machine's verdict and the answer
    /// to the uploader.
    async fn fold(
        &mut self,
        site: &str,
        round: u32,
        sha256: &str,
        global_sha256: &str,
        examples: u64,
    ) -> Result<(FoldOutcome, Result<(), CoordinatorError>), CoordinatorError> {
        let path = self.shared.blobs.path(sha256)?;
        let global_path = self.shared.blobs.path(global_sha256)?;
        let schema = self.handle.schema.clone();
        let mut acc = self
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
        self.acc = Some(acc);
        Ok(match outcome {
            Ok(Admitted { scale, disposition }) => (
                FoldOutcome::Folded {
                    scale,
                    held: disposition == Disposition::Held,
                },
                Ok(()),
            ),
            Err(AdmitError::Refused(e)) => (FoldOutcome::Refused(e.to_string()), Err(e)),
            Err(AdmitError::Broken(e)) => {
                // The update was validated on arrival, so a failure here is the disk's; the
                // partial sums cannot be trusted, so the attempt is redone.
                let why = format!("folding update {sha256} from `{site}`: {e}");
                warn!(run = %self.run_id, round, error = %why, "aggregation broken; redoing the round");
                let err = CoordinatorError::Internal(why);
                (FoldOutcome::Broken(err.to_string()), Err(err))
            }
        })
    }

    /// Records the run's end: audit, collection of its blobs, then its status.
    async fn end(&mut self, status: RunStatus, error: String) {
        let id = self.run_id.clone();
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
        // The end and the references it lets go of are stored together, so whoever sees the
        // run ended sees it collected, and a stop is never lost to a crash.
        let shared = self.shared.clone();
        let run = id.clone();
        let ended = tokio::task::spawn_blocking(move || {
            crate::retention::end_run(&shared, &run, status, &error)
        })
        .await;
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(run = %id, error = %e, "could not record the run's end"),
            Err(e) => warn!(run = %id, error = %e, "the task recording the run's end failed"),
        }
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
            Ok(Err(e)) => {
                warn!(run = %self.run_id, round, error = %e, "could not release update blobs")
            }
            Err(e) => warn!(run = %self.run_id, round, error = %e, "update release task failed"),
        }
    }

    /// Averages the attempt's updates, stores the new global model and commits the round.
    async fn commit(&mut self, req: CommitRequest) -> Result<String, CoordinatorError> {
        let mut acc = self
            .acc
            .take()
            .ok_or_else(|| CoordinatorError::Internal("aggregator missing".into()))?;
        // Adaptive clipping's next C, from this round's noised count; kept with the round.
        let clip_norm = acc.client_dp_mut().map(|dp| dp.next_clip_norm());
        let shared = self.shared.clone();
        let schema = self.handle.schema.clone();
        let global_path = shared.blobs.path(&req.base_sha256)?;
        // The updates the aggregator holds, in the order it took them.
        let held: Vec<std::path::PathBuf> = req
            .held
            .iter()
            .map(|sha| shared.blobs.path(sha))
            .collect::<Result<_, CoordinatorError>>()?;
        let state_path =
            |sha: &Option<String>| sha.as_ref().map(|s| shared.blobs.path(s)).transpose();
        let (m_path, v_path) = (
            state_path(&self.opt_state.m)?,
            state_path(&self.opt_state.v)?,
        );
        let step = u64::from(req.round);
        let client = self.handle.spec.privacy.client.clone();
        let round = req.round;
        // Aggregation reads updates and sums block by block and streams the result to disk.
        let (sha, opt_state, client_epsilon) = tokio::task::spawn_blocking(
            move || -> Result<(String, OptState, Option<f64>), CoordinatorError> {
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
                // What client-level DP has spent on any one site once this round is out.
                let client_epsilon = client.map(|c| c.epsilon_after(round)).transpose()?;
                Ok((
                    out.global,
                    OptState {
                        m: out.m,
                        v: out.v,
                        clip_norm,
                    },
                    client_epsilon,
                ))
            },
        )
        .await
        .map_err(|e| CoordinatorError::Internal(format!("aggregation task: {e}")))??;
        // Stored pinned; let go once their owners are recorded, or on any failure before.
        let pins: Vec<crate::blobs::Pinned> = std::iter::once(&sha)
            .chain(opt_state.m.iter())
            .chain(opt_state.v.iter())
            .map(|id| self.shared.blobs.pinned(id))
            .collect();
        let (down, up) = self.handle.traffic.take();
        let examples: u64 = req.sites.values().sum();
        let record = RoundRecord {
            round: req.round,
            attempts: req.attempts,
            sites_selected: req.sites_selected,
            sites_reported: req.sites.len() as u32,
            examples,
            train_loss: req.train_loss,
            privacy_epsilon: req.privacy_epsilon,
            client_epsilon,
            eval_metrics: BTreeMap::new(),
            started_ms: wall_of(req.started_ms),
            finished_ms: now_ms(),
            bytes_down: down,
            bytes_up: up,
            global_sha256: sha.clone(),
            opt_state: serde_json::to_string(&opt_state).map_err(|e| {
                CoordinatorError::Internal(format!("optimizer state of round {}: {e}", req.round))
            })?,
        };
        let round = record.round;
        let made: Vec<BlobRef> = std::iter::once(BlobRef::of_round(
            &sha,
            &self.run_id,
            BlobRole::Global,
            round,
        ))
        .chain(
            opt_state
                .m
                .iter()
                .map(|m| BlobRef::of_round(m, &self.run_id, BlobRole::OptimizerM, round)),
        )
        .chain(
            opt_state
                .v
                .iter()
                .map(|v| BlobRef::of_round(v, &self.run_id, BlobRole::OptimizerV, round)),
        )
        .collect();
        self.shared
            .db(|s| s.commit_round(&self.run_id, &record, &made))?;
        drop(pins);
        // The previous round's optimizer state is superseded.
        let superseded: Vec<BlobRef> = self
            .shared
            .db(|s| s.refs_of_run(&self.run_id))?
            .into_iter()
            .filter(|r| {
                matches!(r.role, BlobRole::OptimizerM | BlobRole::OptimizerV) && r.round < round
            })
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
                    "sites": req.sites.keys().collect::<Vec<_>>(),
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
            train_loss = record.train_loss,
            global = %sha,
            "round committed"
        );
        Ok(sha)
    }
}

/// Counts a refused update (per site, attempt and kind of reason, with the latest reason), and
/// logs and audits the first of each kind and then every tenfold count, so a site that repeats
/// a refused upload grows neither the database nor the logs by a row each.
pub fn record_refusal(
    shared: &Shared,
    run_id: &str,
    round: u32,
    attempt: u32,
    site: &str,
    reason: &str,
) {
    let count = match shared.db(|s| s.add_refusal(run_id, round, attempt, site, reason, now_ms())) {
        Ok(n) => n,
        Err(e) => {
            warn!(run = %run_id, error = %e, "could not record a refusal");
            1
        }
    };
    if is_milestone(count) {
        warn!(run = %run_id, round, attempt, site = %site, reason = %reason, count, "update refused");
        shared.audit(
            medfl_audit::Event::new(
                "update_refused",
                serde_json::json!({ "attempt": attempt, "reason": reason, "count": count }),
            )
            .run(run_id)
            .round(round)
            .site(site),
        );
    }
    shared.notify_run(run_id);
}

/// 1, 10, 100, ...: the counts at which a repeated refusal is logged again.
fn is_milestone(count: u64) -> bool {
    let mut n = count;
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}
