//! The run state machine: one run's rounds, retries, stop, resume and the cross-site evaluation
//! of its final model, driven by events with the time passed in and answered with effects.
//!
//! The machine touches no store, socket or clock. Its shell feeds it what happened
//! ([`RunMachine::handle`], [`RunMachine::handle_timeout`]) and carries out the [`Effect`]s it
//! returns, in order: publishing the open phase, folding and committing, recording site
//! results, releasing update blobs, ending the run. [`RunMachine::next_deadline`] says when to
//! call `handle_timeout` next.
//!
//! ```
//! use medfl_core::round::RoundLimits;
//! use medfl_core::run_machine::{Effect, Event, RunMachine, RunPlan};
//!
//! let plan = RunPlan {
//!     rounds: 1,
//!     limits: RoundLimits { min_sites: 1, deadline_ms: 1_000, max_retries: 0 },
//!     fraction: 1.0,
//!     seed: 7,
//!     sample_rate: None,
//!     privacy_rounds: None,
//!     statistics: false,
//! };
//! let mut run = RunMachine::new(plan, "g0");
//! run.handle(Event::SitesOnline(vec!["a".into()]), 0);
//! let resumed = Event::Resumed {
//!     committed: 0,
//!     global_sha256: "g0".into(),
//!     last_attempt: 0,
//!     evaluation: None,
//! };
//! let effects = run.handle(resumed, 0);
//! assert!(effects.iter().any(|e| matches!(e, Effect::Publish(Some(_)))));
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::metrics::weighted_mean;
use crate::round::{Decision, Phase, Refusal, RoundLimits, RoundState};
use crate::run::{RunStatus, SiteOutcome};
use crate::selection::poisson_sites;
use crate::selection::select_sites_sparing;
use crate::spec::{RunSpec, Standardize};
use crate::standardize::FeatureSums;

/// What a run is asked to do: its length, limits and sampling.
#[derive(Debug, Clone, Copy)]
pub struct RunPlan {
    /// Rounds to commit.
    pub rounds: u32,
    /// Limits of every round.
    pub limits: RoundLimits,
    /// Fraction of eligible sites sampled per attempt.
    pub fraction: f64,
    /// Seed of the sampling.
    pub seed: u64,
    /// Client-level DP: each eligible site takes part in an attempt independently with this
    /// probability (Poisson sampling, as the accountant assumes), and a round commits with
    /// whoever of them answered, even nobody.
    pub sample_rate: Option<f64>,
    /// Client-level DP: the rounds the run's target ε allows; the run ends `budget_exhausted`
    /// before the next.
    pub privacy_rounds: Option<u32>,
    /// Federated standardisation: every eligible site sends its feature sums before round 1
    /// (false once the run's statistics are pooled).
    pub statistics: bool,
}

impl RunPlan {
    /// The plan a run spec describes.
    pub fn of(spec: &RunSpec) -> Self {
        Self {
            rounds: spec.rounds,
            limits: RoundLimits {
                min_sites: (spec.min_sites as usize).max(1),
                deadline_ms: spec.round_deadline_secs * 1000,
                max_retries: spec.max_retries,
            },
            fraction: spec.fraction,
            seed: spec.seed,
            sample_rate: spec.privacy.client.as_ref().map(|c| c.sample_rate),
            privacy_rounds: None,
            statistics: spec.task.standardization(&spec.privacy) == Some(Standardize::Federated),
        }
    }
}

/// What happened, as the shell tells the machine.
#[derive(Debug, Clone)]
pub enum Event {
    /// The run (re)starts from its committed rounds; the first event a running run gets.
    Resumed {
        /// Rounds already committed.
        committed: u32,
        /// The global model after the last committed round (the initial model if none).
        global_sha256: String,
        /// The last attempt stored for the next round (0 if none).
        last_attempt: u32,
        /// The last committed round's evaluation, when it had not finished: it is re-opened
        /// before the next round begins.
        evaluation: Option<UnfinishedEvaluation>,
    },
    /// The online sites that hold the run's dataset, all of them.
    SitesOnline(Vec<String>),
    /// A site's update arrived and verified; answered with [`Effect::Reply`] or [`Effect::Fold`].
    UpdateVerified {
        /// Sender.
        site: String,
        /// Round it was trained for.
        round: u32,
        /// Attempt it was trained for.
        attempt: u32,
        /// The global model it started from.
        base_sha256: String,
        /// Its blob id.
        sha256: String,
        /// Local examples.
        examples: u64,
        /// Local training loss.
        train_loss: f64,
        /// The site's record-level ε for the run so far, if it trains with DP-SGD.
        privacy_epsilon: Option<f64>,
        /// Client-level DP with adaptive clipping: whether the site's update was within the
        /// round's clipping norm (1 or 0, plus its share of the count's noise).
        clip_indicator: Option<f64>,
    },
    /// The aggregator's verdict on the update of the last [`Effect::Fold`].
    UpdateFolded {
        /// Sender.
        site: String,
        /// Verdict.
        outcome: FoldOutcome,
    },
    /// A site's evaluation of the open round's new global model.
    EvaluationReported {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// The model it scored.
        global_sha256: String,
        /// Validation examples.
        examples: u64,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// A site's feature sums for the statistics phase (checked against the task already).
    StatisticsReported {
        /// Sender.
        site: String,
        /// Round (1).
        round: u32,
        /// Attempt.
        attempt: u32,
        /// Its sums.
        sums: FeatureSums,
    },
    /// The shell pooled and stored the statistics of the last [`Effect::CommitStatistics`].
    StatisticsCommitted,
    /// A site cannot do its train task, or its hospital keeps the run out.
    SiteDeclined {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// `Failed`, or `Pending`, `Rejected`, `Paused`.
        outcome: SiteOutcome,
        /// Why.
        reason: String,
    },
    /// The shell committed the round of the last [`Effect::Commit`].
    Committed {
        /// Round.
        round: u32,
        /// The new global model.
        global_sha256: String,
    },
    /// The shell could not carry out an effect (store, disk): the run fails.
    Broken(String),
    /// A researcher stops the run.
    StopRequested,
    /// Score the final model at `sites`; `number` tells this evaluation apart from earlier ones.
    CrossSiteRequested {
        /// Number, distinct from every earlier one of the run.
        number: u32,
        /// Online sites holding the run's dataset.
        sites: Vec<String>,
    },
    /// A site's score of the final model.
    CrossSiteReported {
        /// Sender.
        site: String,
        /// The model it scored.
        global_sha256: String,
        /// Validation examples.
        examples: u64,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// A cross-site evaluation opened by an earlier process, still owed by `sites` until
    /// `deadline_ms` (on this machine's clock); closed at once if that has passed.
    CrossSiteResumed {
        /// Its number.
        number: u32,
        /// Sites that have not answered.
        sites: Vec<String>,
        /// When it gives up.
        deadline_ms: u64,
    },
    /// A site cannot score the final model in evaluation `number`.
    CrossSiteDeclined {
        /// Sender.
        site: String,
        /// The evaluation it answers.
        number: u32,
        /// Why.
        reason: String,
    },
}

/// The evaluate phase of a committed round as an earlier process left it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnfinishedEvaluation {
    /// The attempt the round was committed from.
    pub attempt: u32,
    /// Sites whose update the round folded: those asked to evaluate.
    pub trained: Vec<String>,
    /// Answers already recorded, by site: examples and metrics.
    pub answered: BTreeMap<String, (u64, BTreeMap<String, f64>)>,
}

/// The aggregator's verdict on one update.
#[derive(Debug, Clone, PartialEq)]
pub enum FoldOutcome {
    /// Folded in or held for the close.
    Folded {
        /// Clipping factor towards the global model (1 within the norm bound).
        scale: f32,
        /// Whether the aggregator holds it for the close rather than folded it.
        held: bool,
    },
    /// The update breaks a rule (norm bound, non-finite values).
    Refused(String),
    /// Folding failed part-way: the attempt's sums are unusable.
    Broken(String),
}

/// Why a result was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Not for the open round, phase or attempt.
    #[error(transparent)]
    Round(#[from] Refusal),
    /// It names another model than the one in play.
    #[error("{0}")]
    Invalid(String),
    /// The site was not asked, or already answered.
    #[error("{0}")]
    NotAsked(String),
    /// No cross-site evaluation is open.
    #[error("{0}")]
    NotOpen(String),
}

/// The open phase as handlers see it: who is handed which task.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenPhase {
    /// Round.
    pub round: u32,
    /// Attempt.
    pub attempt: u32,
    /// Phase.
    pub phase: Phase,
    /// Sites to hand the phase's task.
    pub pending: BTreeSet<String>,
    /// Sites awaiting their hospital's approval.
    pub awaiting: BTreeSet<String>,
    /// Sites asked.
    pub selected: BTreeSet<String>,
    /// Sites that answered.
    pub reported: usize,
    /// The model sites start from (train) or score (evaluate).
    pub global_sha256: String,
    /// When the phase closes (ms since the epoch).
    pub deadline_ms: u64,
    /// Client-level DP: the expected number of sampled sites (q times the eligible sites), the
    /// sum's fixed denominator; each site's share of distributed noise is N(0, z²C²/this).
    pub expected_sites: Option<f64>,
}

/// What the machine commits a round from.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitRequest {
    /// Round.
    pub round: u32,
    /// Attempts this round took in this process (from 1).
    pub attempts: u32,
    /// When the round's first attempt began waiting for sites.
    pub started_ms: u64,
    /// The model the round started from.
    pub base_sha256: String,
    /// Updates the aggregator holds for the close, in the order it took them.
    pub held: Vec<String>,
    /// Sites selected.
    pub sites_selected: u32,
    /// Sites whose update was folded, with their examples.
    pub sites: BTreeMap<String, u64>,
    /// Example-weighted mean of the training losses.
    pub train_loss: f64,
    /// The largest record-level ε the counted sites reported for the run so far.
    pub privacy_epsilon: Option<f64>,
}

/// What the machine wants done, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand out the open phase's tasks (`None`: no task).
    Publish(Option<OpenPhase>),
    /// Answer the result just handed in.
    Reply(Result<(), Rejection>),
    /// Offer an update to the round's aggregator; answer with [`Event::UpdateFolded`].
    Fold {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// Its blob.
        sha256: String,
        /// Its weight.
        examples: u64,
        /// The model the round started from (the norm bound's reference).
        global_sha256: String,
    },
    /// A new aggregator for the attempt just opened.
    NewAggregator {
        /// Client-level DP: the expected number of sampled sites, the sum's denominator.
        expected_sites: Option<f64>,
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
    },
    /// Record an accepted update.
    UpdateAccepted {
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// Sender.
        site: String,
        /// Its blob.
        sha256: String,
        /// Examples.
        examples: u64,
        /// Training loss.
        train_loss: f64,
        /// The site's record-level ε for the run so far.
        privacy_epsilon: Option<f64>,
        /// The site's "within the clip" indicator under client-level DP.
        clip_indicator: Option<f64>,
        /// Clipping factor.
        scale: f32,
    },
    /// Record a refused update.
    UpdateRefused {
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// Sender.
        site: String,
        /// Why.
        reason: String,
    },
    /// Record a site's result other than an update (missing, failed, declined).
    SiteResult {
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// Site.
        site: String,
        /// Outcome.
        outcome: SiteOutcome,
        /// Why.
        reason: String,
    },
    /// Aggregate and commit a round; answer with [`Event::Committed`] or [`Event::Broken`].
    Commit(CommitRequest),
    /// Pool and store the feature sums the sites sent; answer with
    /// [`Event::StatisticsCommitted`] or [`Event::Broken`].
    CommitStatistics {
        /// Round the statistics precede.
        round: u32,
        /// Attempt they were sent in.
        attempt: u32,
        /// Each reporting site's sums.
        sums: BTreeMap<String, FeatureSums>,
    },
    /// Record a site's evaluation of a round's model.
    RecordEvaluation {
        /// Round.
        round: u32,
        /// Site.
        site: String,
        /// Examples.
        examples: u64,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// A round's evaluation phase closed with these example-weighted metrics.
    RoundEvaluated {
        /// Round.
        round: u32,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// Release the update blobs of `round` (of `attempt`, or of every attempt).
    ReleaseUpdates {
        /// Round.
        round: u32,
        /// Attempt, or all.
        attempt: Option<u32>,
    },
    /// The final model is to be scored: answer with [`Event::CrossSiteRequested`].
    RequestCrossSite,
    /// A cross-site evaluation opened.
    CrossSiteOpened {
        /// Its number.
        number: u32,
        /// Sites asked.
        sites: usize,
        /// The model scored.
        global_sha256: String,
    },
    /// Record a site's score of the final model.
    RecordCrossSite {
        /// Site.
        site: String,
        /// The model scored.
        global_sha256: String,
        /// Examples.
        examples: u64,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// A cross-site evaluation has every answer.
    CrossSiteComplete,
    /// The run ended: record it (after collecting its blobs), then answer a stop.
    End {
        /// Final status.
        status: RunStatus,
        /// Why, for a failure or stop.
        reason: String,
    },
}

/// A cross-site evaluation collecting answers.
#[derive(Debug, Clone)]
struct CrossSite {
    number: u32,
    pending: BTreeSet<String>,
    deadline_ms: u64,
}

/// The cross-site task for a site.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossSiteTask {
    /// Sent as the task's attempt; echoed in a refusal.
    pub number: u32,
    /// The model to score.
    pub global_sha256: String,
    /// When the evaluation gives up.
    pub deadline_ms: u64,
}

/// An update folded in this attempt.
#[derive(Debug, Clone)]
struct Folded {
    sha256: String,
    held: bool,
}

/// An update being folded.
#[derive(Debug, Clone)]
struct Folding {
    site: String,
    sha256: String,
    examples: u64,
    train_loss: f64,
    privacy_epsilon: Option<f64>,
    clip_indicator: Option<f64>,
}

/// The open attempt of a round.
#[derive(Debug, Clone)]
struct Open {
    state: RoundState,
    global_sha256: String,
    losses: Vec<(u64, f64)>,
    /// The largest record-level ε a folded update reported.
    privacy_epsilon: Option<f64>,
    evaluations: Vec<(u64, BTreeMap<String, f64>)>,
    folded: Vec<Folded>,
    folding: Option<Folding>,
    poisoned: Option<String>,
    /// Client-level DP: the expected number of sampled sites.
    expected_sites: Option<f64>,
    /// The statistics phase: the sums each site sent.
    statistics: BTreeMap<String, FeatureSums>,
}

impl Open {
    /// An attempt with nothing answered yet.
    fn new(state: RoundState, global_sha256: &str, expected_sites: Option<f64>) -> Self {
        Self {
            state,
            global_sha256: global_sha256.into(),
            losses: Vec::new(),
            privacy_epsilon: None,
            evaluations: Vec::new(),
            folded: Vec::new(),
            folding: None,
            poisoned: None,
            expected_sites,
            statistics: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum Stage {
    /// Not resumed yet.
    Idle,
    /// Waiting (until then) for enough sites before selecting.
    WaitingForSites { until_ms: u64 },
    /// An attempt is open.
    Open(Box<Open>),
    /// The round's aggregate is being committed.
    Committing(Box<Open>),
    /// The run ended (a cross-site evaluation may still collect answers).
    Ended,
}

/// One run, from its first round to the cross-site evaluation of its final model.
#[derive(Debug, Clone)]
pub struct RunMachine {
    plan: RunPlan,
    stage: Stage,
    /// The round open or next.
    round: u32,
    /// Last attempt number used for `round`.
    attempt: u32,
    /// Attempts of `round` in this process.
    attempts: u32,
    round_started_ms: u64,
    global_sha256: String,
    candidates: Vec<String>,
    /// Sites whose hospital kept the run out at their last task: asked every round on top of
    /// the sample.
    declining: Vec<String>,
    cross_site: Option<CrossSite>,
    published: bool,
    /// The last stored attempt of the round after a re-opened evaluation.
    next_last_attempt: u32,
    /// Federated standardisation: the statistics phase is still to run before round 1.
    statistics_pending: bool,
}

impl RunMachine {
    /// A run that has not started; feed it [`Event::Resumed`] to begin.
    pub fn new(plan: RunPlan, initial_sha256: &str) -> Self {
        Self {
            plan,
            stage: Stage::Idle,
            round: 0,
            attempt: 0,
            attempts: 0,
            round_started_ms: 0,
            global_sha256: initial_sha256.into(),
            candidates: Vec::new(),
            declining: Vec::new(),
            cross_site: None,
            published: false,
            next_last_attempt: 0,
            statistics_pending: plan.statistics,
        }
    }

    /// An ended run whose final model is `global_sha256`, for a new cross-site evaluation.
    pub fn ended(plan: RunPlan, global_sha256: &str) -> Self {
        Self {
            stage: Stage::Ended,
            ..Self::new(plan, global_sha256)
        }
    }

    /// Whether the run has ended.
    pub fn is_ended(&self) -> bool {
        matches!(self.stage, Stage::Ended)
    }

    /// The current global model.
    pub fn global_sha256(&self) -> &str {
        &self.global_sha256
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn next_deadline(&self) -> Option<u64> {
        match &self.stage {
            Stage::WaitingForSites { until_ms } => Some(*until_ms),
            Stage::Open(o) if o.folding.is_none() => Some(o.state.deadline_ms),
            _ => None,
        }
    }

    /// Time has passed.
    pub fn handle_timeout(&mut self, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        self.advance(now, &mut out);
        out
    }

    /// Feeds one event.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::Resumed {
                committed,
                global_sha256,
                last_attempt,
                evaluation,
            } => {
                if matches!(self.stage, Stage::Idle) {
                    self.global_sha256 = global_sha256;
                    self.round = committed + 1;
                    // Updates of attempts a crash interrupted will never be folded.
                    out.push(Effect::ReleaseUpdates {
                        round: self.round,
                        attempt: None,
                    });
                    match evaluation.filter(|_| committed > 0) {
                        Some(e) => {
                            self.next_last_attempt = last_attempt;
                            self.reopen_evaluation(committed, e, now, &mut out);
                        }
                        None => self.begin_round(now, last_attempt, &mut out),
                    }
                }
            }
            Event::SitesOnline(sites) => self.candidates = sites,
            Event::UpdateVerified {
                site,
                round,
                attempt,
                base_sha256,
                sha256,
                examples,
                train_loss,
                privacy_epsilon,
                clip_indicator,
            } => self.update_verified(
                site,
                round,
                attempt,
                base_sha256,
                sha256,
                (examples, train_loss, privacy_epsilon, clip_indicator),
                now,
                &mut out,
            ),
            Event::UpdateFolded { site, outcome } => self.update_folded(&site, outcome, &mut out),
            Event::EvaluationReported {
                site,
                round,
                global_sha256,
                examples,
                metrics,
            } => {
                let result = match &mut self.stage {
                    Stage::Open(o) => o
                        .state
                        .admit_evaluation(&site, round, now)
                        .map_err(Rejection::from)
                        .and_then(|()| {
                            if global_sha256 == o.global_sha256 {
                                Ok(())
                            } else {
                                Err(Rejection::Invalid(format!(
                                    "evaluation of model {global_sha256}, round {round}'s model is {}",
                                    o.global_sha256
                                )))
                            }
                        })
                        .map(|()| {
                            o.state.record_evaluation(&site);
                            o.evaluations.push((examples, metrics.clone()));
                        }),
                    _ => Err(not_open(round)),
                };
                if result.is_ok() {
                    out.push(Effect::RecordEvaluation {
                        round,
                        site,
                        examples,
                        metrics,
                    });
                    self.publish(&mut out);
                }
                out.push(Effect::Reply(result));
            }
            Event::SiteDeclined {
                site,
                round,
                attempt,
                outcome,
                reason,
            } => {
                if let Stage::Open(o) = &mut self.stage {
                    let s = &mut o.state;
                    if round == s.round
                        && attempt == s.attempt
                        && s.phase != Phase::Evaluate
                        && s.owes(&site)
                    {
                        let declined = outcome.is_declined();
                        if declined && !self.declining.contains(&site) {
                            self.declining.push(site.clone());
                        } else if !declined {
                            self.declining.retain(|d| *d != site);
                        }
                        if outcome == SiteOutcome::Pending {
                            // Holds its place until the deadline: an approval may still come.
                            s.record_awaiting(&site, reason.clone());
                        } else {
                            s.record_failure(&site, reason.clone());
                        }
                        out.push(Effect::SiteResult {
                            round,
                            attempt,
                            site,
                            outcome,
                            reason,
                        });
                        self.publish(&mut out);
                    }
                }
            }
            Event::StatisticsReported {
                site,
                round,
                attempt,
                sums,
            } => {
                let result = match &mut self.stage {
                    Stage::Open(o) => o
                        .state
                        .admit_statistics(&site, round, attempt, now)
                        .map_err(Rejection::from)
                        .map(|()| {
                            o.state.record_update(&site, sums.count);
                            o.statistics.insert(site, sums);
                        }),
                    _ => Err(not_open(round)),
                };
                if result.is_ok() {
                    self.publish(&mut out);
                }
                out.push(Effect::Reply(result));
            }
            Event::StatisticsCommitted => {
                let stage = std::mem::replace(&mut self.stage, Stage::Idle);
                match stage {
                    Stage::Committing(o) if o.state.phase == Phase::Statistics => {
                        self.statistics_pending = false;
                        // Round 1's training attempts follow the statistics attempts.
                        self.begin_round(now, o.state.attempt, &mut out);
                    }
                    other => self.stage = other,
                }
            }
            Event::Committed {
                round,
                global_sha256,
            } => {
                let stage = std::mem::replace(&mut self.stage, Stage::Idle);
                match stage {
                    Stage::Committing(mut o) if o.state.round == round => {
                        out.push(Effect::ReleaseUpdates {
                            round,
                            attempt: Some(o.state.attempt),
                        });
                        self.global_sha256 = global_sha256.clone();
                        o.global_sha256 = global_sha256;
                        o.state.begin_evaluation(now);
                        self.stage = Stage::Open(o);
                        self.publish(&mut out);
                    }
                    other => self.stage = other,
                }
            }
            Event::Broken(reason) => self.end(RunStatus::Failed, reason, &mut out),
            Event::StopRequested => {
                if let Stage::Open(o) = &self.stage {
                    if o.state.phase == Phase::Train {
                        out.push(Effect::ReleaseUpdates {
                            round: o.state.round,
                            attempt: Some(o.state.attempt),
                        });
                    }
                }
                self.end(
                    RunStatus::Stopped,
                    "stopped by a researcher".into(),
                    &mut out,
                );
            }
            Event::CrossSiteRequested { number, sites } => {
                if !sites.is_empty() {
                    self.cross_site = Some(CrossSite {
                        number,
                        pending: sites.iter().cloned().collect(),
                        deadline_ms: now.saturating_add(self.plan.limits.deadline_ms),
                    });
                    out.push(Effect::CrossSiteOpened {
                        number,
                        sites: sites.len(),
                        global_sha256: self.global_sha256.clone(),
                    });
                }
            }
            Event::CrossSiteReported {
                site,
                global_sha256,
                examples,
                metrics,
            } => {
                let result = match &mut self.cross_site {
                    None => Err(Rejection::NotOpen(
                        "no cross-site evaluation of the run is open".into(),
                    )),
                    Some(c) if !c.pending.contains(&site) => Err(Rejection::NotAsked(format!(
                        "site `{site}` was not asked, or already answered, in the evaluation of the run"
                    ))),
                    Some(_) if global_sha256 != self.global_sha256 => {
                        Err(Rejection::Invalid(format!(
                            "evaluation of model {global_sha256}, the run's final model is {}",
                            self.global_sha256
                        )))
                    }
                    Some(c) => {
                        c.pending.remove(&site);
                        Ok(())
                    }
                };
                if result.is_ok() {
                    out.push(Effect::RecordCrossSite {
                        site,
                        global_sha256,
                        examples,
                        metrics,
                    });
                    self.close_cross_site_if_done(&mut out);
                }
                out.push(Effect::Reply(result));
            }
            Event::CrossSiteResumed {
                number,
                sites,
                deadline_ms,
            } => {
                if !sites.is_empty() && now < deadline_ms {
                    self.cross_site = Some(CrossSite {
                        number,
                        pending: sites.into_iter().collect(),
                        deadline_ms,
                    });
                }
            }
            Event::CrossSiteDeclined { site, number, .. } => {
                // A late refusal of an earlier evaluation: the site may well answer this one.
                if let Some(c) = self.cross_site.as_mut().filter(|c| c.number == number) {
                    c.pending.remove(&site);
                    self.close_cross_site_if_done(&mut out);
                }
            }
        }
        self.advance(now, &mut out);
        out
    }

    /// The cross-site task for `site`, if an open evaluation waits for it.
    pub fn cross_site_task(&self, site: &str, now: u64) -> Option<CrossSiteTask> {
        let c = self.cross_site.as_ref()?;
        (now < c.deadline_ms && c.pending.contains(site)).then(|| CrossSiteTask {
            number: c.number,
            global_sha256: self.global_sha256.clone(),
            deadline_ms: c.deadline_ms,
        })
    }

    /// Whether a cross-site evaluation is collecting answers at `now`.
    pub fn cross_site_open(&self, now: u64) -> bool {
        self.cross_site
            .as_ref()
            .is_some_and(|c| now < c.deadline_ms && !c.pending.is_empty())
    }

    /// The open cross-site evaluation: its number, the sites that have not answered, and when
    /// it gives up.
    pub fn cross_site_owed(&self) -> Option<(u32, Vec<String>, u64)> {
        self.cross_site
            .as_ref()
            .map(|c| (c.number, c.pending.iter().cloned().collect(), c.deadline_ms))
    }

    /// When the open cross-site evaluation gives up on the sites that have not answered.
    pub fn cross_site_deadline(&self) -> Option<u64> {
        self.cross_site.as_ref().map(|c| c.deadline_ms)
    }

    fn close_cross_site_if_done(&mut self, out: &mut Vec<Effect>) {
        if self
            .cross_site
            .as_ref()
            .is_some_and(|c| c.pending.is_empty())
        {
            self.cross_site = None;
            out.push(Effect::CrossSiteComplete);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn update_verified(
        &mut self,
        site: String,
        round: u32,
        attempt: u32,
        base_sha256: String,
        sha256: String,
        (examples, train_loss, privacy_epsilon, clip_indicator): (
            u64,
            f64,
            Option<f64>,
            Option<f64>,
        ),
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        let Stage::Open(o) = &mut self.stage else {
            // Results for no open round are answered as such.
            out.push(Effect::Reply(Err(not_open(round))));
            return;
        };
        let admitted = if o.folding.is_some() {
            Err(Rejection::Invalid(format!(
                "another update of round {round} is being folded"
            )))
        } else {
            o.state
                .admit_update(&site, round, attempt, now)
                .map_err(Rejection::from)
                .and_then(|()| {
                    if base_sha256 == o.global_sha256 {
                        Ok(())
                    } else {
                        Err(Rejection::Invalid(format!(
                            "update was trained from model {base_sha256}, round {round} started from {}",
                            o.global_sha256
                        )))
                    }
                })
        };
        match admitted {
            Ok(()) => {
                out.push(Effect::Fold {
                    site: site.clone(),
                    round,
                    sha256: sha256.clone(),
                    examples,
                    global_sha256: o.global_sha256.clone(),
                });
                o.folding = Some(Folding {
                    site,
                    sha256,
                    examples,
                    train_loss,
                    privacy_epsilon,
                    clip_indicator,
                });
            }
            Err(e) => {
                out.push(Effect::UpdateRefused {
                    round,
                    attempt,
                    site,
                    reason: e.to_string(),
                });
                out.push(Effect::Reply(Err(e)));
            }
        }
    }

    fn update_folded(&mut self, site: &str, outcome: FoldOutcome, out: &mut Vec<Effect>) {
        let Stage::Open(o) = &mut self.stage else {
            return;
        };
        let Some(f) = o.folding.take_if(|f| f.site == site) else {
            return;
        };
        let (round, attempt) = (o.state.round, o.state.attempt);
        match outcome {
            FoldOutcome::Folded { scale, held } => {
                o.folded.push(Folded {
                    sha256: f.sha256.clone(),
                    held,
                });
                o.state.record_update(site, f.examples);
                o.losses.push((f.examples, f.train_loss));
                if let Some(e) = f.privacy_epsilon {
                    o.privacy_epsilon = Some(o.privacy_epsilon.map_or(e, |m| m.max(e)));
                }
                self.declining.retain(|d| d != site);
                out.push(Effect::UpdateAccepted {
                    round,
                    attempt,
                    site: site.into(),
                    sha256: f.sha256,
                    examples: f.examples,
                    train_loss: f.train_loss,
                    privacy_epsilon: f.privacy_epsilon,
                    clip_indicator: f.clip_indicator,
                    scale,
                });
                self.publish(out);
            }
            FoldOutcome::Refused(reason) => out.push(Effect::UpdateRefused {
                round,
                attempt,
                site: site.into(),
                reason,
            }),
            FoldOutcome::Broken(reason) => {
                out.push(Effect::UpdateRefused {
                    round,
                    attempt,
                    site: site.into(),
                    reason: reason.clone(),
                });
                o.poisoned = Some(reason);
            }
        }
    }

    /// Re-opens the evaluate phase of committed round `round` for the sites that trained in it
    /// and have not answered, with a fresh deadline.
    fn reopen_evaluation(
        &mut self,
        round: u32,
        e: UnfinishedEvaluation,
        now: u64,
        out: &mut Vec<Effect>,
    ) {
        self.round = round;
        let mut state = RoundState::start(round, e.attempt, [], now, self.plan.limits);
        state.updates = e.trained.into_iter().map(|s| (s, 0)).collect();
        state.begin_evaluation(now);
        let mut evaluations = Vec::new();
        for (site, (examples, metrics)) in e.answered {
            if state.selected.contains(&site) {
                state.record_evaluation(&site);
                evaluations.push((examples, metrics));
            }
        }
        self.attempt = e.attempt;
        self.attempts = 0;
        self.round_started_ms = now;
        self.stage = Stage::Open(Box::new(Open {
            evaluations,
            ..Open::new(state, &self.global_sha256, None)
        }));
        self.publish(out);
    }

    /// Starts round `self.round` (or finishes the run when every round is committed).
    fn begin_round(&mut self, now: u64, last_attempt: u32, out: &mut Vec<Effect>) {
        if self.round > self.plan.rounds {
            self.finish(out);
            return;
        }
        if let Some(allowed) = self.plan.privacy_rounds.filter(|&r| self.round > r) {
            out.push(Effect::RequestCrossSite);
            let reason = format!(
                "round {} would take the run's client-level ε past privacy.target_epsilon; \
                 {allowed} of {} rounds ran",
                self.round, self.plan.rounds
            );
            self.end(RunStatus::BudgetExhausted, reason, out);
            return;
        }
        self.attempt = last_attempt;
        self.attempts = 0;
        self.round_started_ms = now;
        self.wait_for_sites(now);
    }

    /// Before selecting, waits (up to one round deadline) until `min_sites` eligible sites are
    /// online, so a coordinator that just restarted gives its sites time to reconnect.
    fn wait_for_sites(&mut self, now: u64) {
        self.stage = Stage::WaitingForSites {
            until_ms: now.saturating_add(self.plan.limits.deadline_ms),
        };
    }

    fn open_attempt(&mut self, now: u64, out: &mut Vec<Effect>) {
        self.attempt += 1;
        self.attempts += 1;
        if self.statistics_pending {
            // Every eligible site standardises with the pooled statistics: all are asked.
            let mut state = RoundState::start(
                self.round,
                self.attempt,
                self.candidates.iter().cloned(),
                now,
                self.plan.limits,
            );
            state.phase = Phase::Statistics;
            self.stage = Stage::Open(Box::new(Open::new(state, &self.global_sha256, None)));
            self.publish(out);
            return;
        }
        let seed = self.plan.seed ^ (u64::from(self.round) << 32) ^ u64::from(self.attempt);
        let (selected, limits, expected_sites) = match self.plan.sample_rate {
            None => (
                select_sites_sparing(
                    &self.candidates,
                    &self.declining,
                    self.plan.fraction,
                    self.plan.limits.min_sites,
                    seed,
                ),
                self.plan.limits,
                None,
            ),
            // The round commits whoever of the sample answers, even nobody: waiting for more,
            // or drawing again, would change the sampling the accountant assumes.
            Some(q) => (
                poisson_sites(&self.candidates, q, seed),
                RoundLimits {
                    min_sites: 0,
                    ..self.plan.limits
                },
                Some(q * self.candidates.len() as f64),
            ),
        };
        out.push(Effect::NewAggregator {
            expected_sites,
            round: self.round,
            attempt: self.attempt,
        });
        self.stage = Stage::Open(Box::new(Open::new(
            RoundState::start(self.round, self.attempt, selected, now, limits),
            &self.global_sha256,
            expected_sites,
        )));
        self.publish(out);
    }

    /// Runs the decisions that are due.
    fn advance(&mut self, now: u64, out: &mut Vec<Effect>) {
        loop {
            match &mut self.stage {
                Stage::WaitingForSites { until_ms } => {
                    if self.candidates.len() < self.plan.limits.min_sites && now < *until_ms {
                        return;
                    }
                    self.open_attempt(now, out);
                }
                Stage::Open(o) if o.folding.is_some() => return,
                Stage::Open(o) if o.poisoned.is_some() => {
                    let missing = o.state.pending();
                    self.retry(missing, now, out);
                }
                Stage::Open(o) => match (o.state.phase, o.state.decide(now)) {
                    (_, Decision::Wait { .. }) => return,
                    (Phase::Evaluate, Decision::Close { .. }) => {
                        out.push(Effect::RoundEvaluated {
                            round: self.round,
                            metrics: weighted_mean(&o.evaluations),
                        });
                        self.round += 1;
                        let last_attempt = std::mem::take(&mut self.next_last_attempt);
                        self.begin_round(now, last_attempt, out);
                    }
                    (Phase::Statistics, Decision::Close { missing }) => {
                        self.record_missing(&missing, out);
                        let Stage::Open(mut o) = std::mem::replace(&mut self.stage, Stage::Idle)
                        else {
                            unreachable!("matched above");
                        };
                        out.push(Effect::CommitStatistics {
                            round: o.state.round,
                            attempt: o.state.attempt,
                            sums: std::mem::take(&mut o.statistics),
                        });
                        self.stage = Stage::Committing(o);
                        return;
                    }
                    (Phase::Train, Decision::Close { missing }) => {
                        self.record_missing(&missing, out);
                        let Stage::Open(o) = std::mem::replace(&mut self.stage, Stage::Idle) else {
                            unreachable!("matched above");
                        };
                        out.push(Effect::Commit(self.commit_request(&o)));
                        self.stage = Stage::Committing(o);
                        return;
                    }
                    (_, Decision::Retry { missing }) => self.retry(missing, now, out),
                    (_, Decision::Fail { missing }) => {
                        let (reported, attempt) = (o.state.updates.len(), o.state.attempt);
                        let sent = match o.state.phase {
                            Phase::Statistics => "their feature statistics",
                            _ => "an update",
                        };
                        let said = site_reasons(&o.state);
                        out.push(Effect::ReleaseUpdates {
                            round: self.round,
                            attempt: Some(attempt),
                        });
                        self.record_missing(&missing, out);
                        let silent = if missing.is_empty() {
                            "none (too few eligible sites were online)".to_string()
                        } else {
                            missing.join(", ")
                        };
                        let reason = format!(
                            "round {}: {reported} of the required {} sites sent {sent} in each of {} attempts; \
                             selected sites without it in the last: {silent}{}",
                            self.round,
                            self.plan.limits.min_sites,
                            self.attempts,
                            said,
                        );
                        self.end(RunStatus::Failed, reason, out);
                    }
                },
                Stage::Idle | Stage::Committing(_) | Stage::Ended => return,
            }
        }
    }

    fn retry(&mut self, missing: Vec<String>, now: u64, out: &mut Vec<Effect>) {
        let Stage::Open(o) = &self.stage else {
            return;
        };
        out.push(Effect::ReleaseUpdates {
            round: self.round,
            attempt: Some(o.state.attempt),
        });
        self.record_missing(&missing, out);
        self.wait_for_sites(now);
        self.publish(out);
    }

    /// Records the sites that sent nothing; those that failed or await approval have their own
    /// result already.
    fn record_missing(&self, missing: &[String], out: &mut Vec<Effect>) {
        let Stage::Open(o) = &self.stage else {
            return;
        };
        let s = &o.state;
        for site in missing {
            if s.failures.contains_key(site) || s.awaiting.contains_key(site) {
                continue;
            }
            out.push(Effect::SiteResult {
                round: s.round,
                attempt: s.attempt,
                site: site.clone(),
                outcome: SiteOutcome::Missing,
                reason: match s.phase {
                    Phase::Statistics => "no feature statistics before the deadline".into(),
                    _ => "no update before the deadline".into(),
                },
            });
        }
    }

    fn commit_request(&self, o: &Open) -> CommitRequest {
        let loss_weight: f64 = o.losses.iter().map(|(n, _)| *n as f64).sum();
        CommitRequest {
            round: o.state.round,
            attempts: self.attempts,
            started_ms: self.round_started_ms,
            base_sha256: o.global_sha256.clone(),
            held: o
                .folded
                .iter()
                .filter(|f| f.held)
                .map(|f| f.sha256.clone())
                .collect(),
            sites_selected: o.state.selected.len() as u32,
            sites: o.state.updates.clone(),
            train_loss: o.losses.iter().map(|(n, l)| *n as f64 * l).sum::<f64>()
                / loss_weight.max(1.0),
            privacy_epsilon: o.privacy_epsilon,
        }
    }

    /// Every round is committed: the final model is scored across sites, then the run ends.
    fn finish(&mut self, out: &mut Vec<Effect>) {
        out.push(Effect::RequestCrossSite);
        self.end(RunStatus::Completed, String::new(), out);
    }

    fn end(&mut self, status: RunStatus, reason: String, out: &mut Vec<Effect>) {
        if self.is_ended() {
            return;
        }
        self.stage = Stage::Ended;
        self.publish(out);
        out.push(Effect::End { status, reason });
    }

    fn publish(&mut self, out: &mut Vec<Effect>) {
        let phase = match &self.stage {
            Stage::Open(o) => {
                let s = &o.state;
                Some(OpenPhase {
                    round: s.round,
                    attempt: s.attempt,
                    phase: s.phase,
                    pending: s.pending().into_iter().collect(),
                    awaiting: s.awaiting.keys().cloned().collect(),
                    selected: s.selected.clone(),
                    reported: match s.phase {
                        Phase::Statistics | Phase::Train => s.updates.len(),
                        Phase::Evaluate => s.evaluated.len(),
                    },
                    global_sha256: o.global_sha256.clone(),
                    deadline_ms: s.deadline_ms,
                    expected_sites: o.expected_sites,
                })
            }
            _ => None,
        };
        if phase.is_none() && !self.published {
            return;
        }
        self.published = phase.is_some();
        out.push(Effect::Publish(phase));
    }
}

/// Sites shown by name with their reasons when a run fails; the rest are counted.
const REASONS_SHOWN: usize = 5;

/// What the sites that failed or await approval said, for the researcher: `; their reasons:
/// b: unknown label ...`, empty when none said anything.
fn site_reasons(state: &RoundState) -> String {
    let said: Vec<String> = state
        .failures
        .iter()
        .chain(&state.awaiting)
        .map(|(site, reason)| format!("{site}: {reason}"))
        .collect();
    if said.is_empty() {
        return String::new();
    }
    let more = said.len().saturating_sub(REASONS_SHOWN);
    let mut text = format!("; their reasons: {}", said[..said.len() - more].join("; "));
    if more > 0 {
        text += &format!("; and {more} more (run show)");
    }
    text
}

fn not_open(round: u32) -> Rejection {
    Rejection::Round(Refusal::NotOpen {
        round,
        attempt: 0,
        open_round: 0,
        open_attempt: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: u64 = 1_000;

    fn plan(rounds: u32, min_sites: usize, max_retries: u32) -> RunPlan {
        RunPlan {
            rounds,
            limits: RoundLimits {
                min_sites,
                deadline_ms: DEADLINE,
                max_retries,
            },
            fraction: 1.0,
            seed: 42,
            sample_rate: None,
            privacy_rounds: None,
            statistics: false,
        }
    }

    fn sites(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A shell without I/O: carries out effects against in-memory records.
    struct Shell {
        run: RunMachine,
        now: u64,
        /// Committed rounds' global models, in order.
        committed: Vec<String>,
        results: Vec<(u32, u32, String, SiteOutcome)>,
        released: Vec<(u32, Option<u32>)>,
        evaluated: Vec<u32>,
        cross_site: Vec<String>,
        ended: Option<(RunStatus, String)>,
        open: Option<OpenPhase>,
        next_number: u32,
        /// Sites online, handed to the machine before each event.
        online: Vec<String>,
        /// Fold verdict for the next update.
        fold: Option<FoldOutcome>,
        /// Whether to commit when asked (false: a crash before the commit).
        commits: bool,
        replies: Vec<Result<(), Rejection>>,
        /// Sites whose statistics each statistics commit pooled.
        pooled: Vec<Vec<String>>,
    }

    impl Shell {
        fn new(plan: RunPlan, online: &[&str]) -> Self {
            Self::resume(plan, online, Vec::new(), 0, 0)
        }

        fn resume(
            plan: RunPlan,
            online: &[&str],
            committed: Vec<String>,
            last_attempt: u32,
            now: u64,
        ) -> Self {
            Self::resume_evaluating(plan, online, committed, last_attempt, now, None)
        }

        fn resume_evaluating(
            plan: RunPlan,
            online: &[&str],
            committed: Vec<String>,
            last_attempt: u32,
            now: u64,
            evaluation: Option<UnfinishedEvaluation>,
        ) -> Self {
            let mut shell = Self {
                run: RunMachine::new(plan, "g0"),
                now,
                committed,
                results: Vec::new(),
                released: Vec::new(),
                evaluated: Vec::new(),
                cross_site: Vec::new(),
                ended: None,
                open: None,
                next_number: 1,
                online: sites(online),
                fold: None,
                commits: true,
                replies: Vec::new(),
                pooled: Vec::new(),
            };
            shell.feed(Event::SitesOnline(shell.online.clone()));
            let global = shell
                .committed
                .last()
                .cloned()
                .unwrap_or_else(|| "g0".into());
            shell.feed(Event::Resumed {
                committed: shell.committed.len() as u32,
                global_sha256: global,
                last_attempt,
                evaluation,
            });
            shell
        }

        fn feed(&mut self, event: Event) {
            let effects = self.run.handle(event, self.now);
            self.perform(effects);
        }

        fn perform(&mut self, effects: Vec<Effect>) {
            for effect in effects {
                match effect {
                    Effect::Publish(p) => self.open = p,
                    Effect::Reply(r) => self.replies.push(r),
                    Effect::Fold { site, .. } => {
                        let outcome = self.fold.take().unwrap_or(FoldOutcome::Folded {
                            scale: 1.0,
                            held: false,
                        });
                        self.feed(Event::UpdateFolded { site, outcome });
                    }
                    Effect::NewAggregator { .. } | Effect::CrossSiteOpened { .. } => {}
                    Effect::UpdateAccepted {
                        round,
                        attempt,
                        site,
                        ..
                    } => self
                        .results
                        .push((round, attempt, site, SiteOutcome::Accepted)),
                    Effect::UpdateRefused {
                        round,
                        attempt,
                        site,
                        ..
                    } => self
                        .results
                        .push((round, attempt, site, SiteOutcome::Refused)),
                    Effect::SiteResult {
                        round,
                        attempt,
                        site,
                        outcome,
                        ..
                    } => self.results.push((round, attempt, site, outcome)),
                    Effect::Commit(req) => {
                        if self.commits {
                            let global = format!("g{}", req.round);
                            self.committed.push(global.clone());
                            self.feed(Event::Committed {
                                round: req.round,
                                global_sha256: global,
                            });
                        }
                    }
                    Effect::CommitStatistics { sums, .. } => {
                        if self.commits {
                            self.pooled.push(sums.keys().cloned().collect());
                            self.feed(Event::StatisticsCommitted);
                        }
                    }
                    Effect::RecordEvaluation { .. } => {}
                    Effect::RoundEvaluated { round, .. } => self.evaluated.push(round),
                    Effect::ReleaseUpdates { round, attempt } => {
                        self.released.push((round, attempt))
                    }
                    Effect::RequestCrossSite => {
                        let number = self.next_number;
                        self.next_number += 1;
                        let sites = self.online.clone();
                        self.feed(Event::CrossSiteRequested { number, sites });
                    }
                    Effect::RecordCrossSite { site, .. } => self.cross_site.push(site),
                    Effect::CrossSiteComplete => {}
                    Effect::End { status, reason } => {
                        assert!(self.ended.is_none(), "the run ended twice");
                        self.ended = Some((status, reason));
                    }
                }
            }
        }

        fn at(&mut self, now: u64) {
            self.now = now;
            let effects = self.run.handle_timeout(now);
            self.perform(effects);
        }

        /// Passes the next deadline.
        fn expire(&mut self) {
            let at = self.run.next_deadline().expect("a deadline");
            self.at(at);
        }

        fn open(&self) -> &OpenPhase {
            self.open.as_ref().expect("an open phase")
        }

        fn train(&mut self, site: &str) {
            let (round, attempt, global) = {
                let o = self.open();
                (o.round, o.attempt, o.global_sha256.clone())
            };
            self.feed(Event::UpdateVerified {
                site: site.into(),
                round,
                attempt,
                base_sha256: global,
                sha256: format!("u-{site}-{round}-{attempt}"),
                examples: 10,
                train_loss: 0.5,
                privacy_epsilon: None,
                clip_indicator: None,
            });
        }

        fn send_statistics(&mut self, site: &str) {
            let (round, attempt) = (self.open().round, self.open().attempt);
            self.feed(Event::StatisticsReported {
                site: site.into(),
                round,
                attempt,
                sums: FeatureSums::of_rows(&[1.0, 2.0], 1),
            });
        }

        fn evaluate(&mut self, site: &str) {
            let (round, global) = (self.open().round, self.open().global_sha256.clone());
            self.feed(Event::EvaluationReported {
                site: site.into(),
                round,
                global_sha256: global,
                examples: 5,
                metrics: BTreeMap::from([("accuracy".to_string(), 0.9)]),
            });
        }

        fn decline(&mut self, site: &str, outcome: SiteOutcome) {
            let (round, attempt) = (self.open().round, self.open().attempt);
            self.feed(Event::SiteDeclined {
                site: site.into(),
                round,
                attempt,
                outcome,
                reason: "kept out".into(),
            });
        }

        /// Every pending site trains, then evaluates.
        fn full_round(&mut self) {
            for s in self.open().pending.clone() {
                self.train(&s);
            }
            assert_eq!(self.open().phase, Phase::Evaluate);
            for s in self.open().pending.clone() {
                self.evaluate(&s);
            }
        }

        fn outcomes(&self, round: u32, attempt: u32) -> Vec<(String, SiteOutcome)> {
            self.results
                .iter()
                .filter(|r| r.0 == round && r.1 == attempt)
                .map(|r| (r.2.clone(), r.3))
                .collect()
        }
    }

    #[test]
    fn federated_standardisation_gathers_every_sites_sums_before_round_one() {
        let with_statistics = RunPlan {
            statistics: true,
            ..plan(1, 2, 1)
        };
        let mut s = Shell::new(with_statistics, &["a", "b", "c"]);
        let open = s.open().clone();
        // Every eligible site is asked, whatever the sampling, and no update is taken yet.
        assert_eq!(
            (open.round, open.attempt, open.phase),
            (1, 1, Phase::Statistics)
        );
        assert_eq!(open.selected.len(), 3);
        s.train("a");
        assert!(matches!(
            s.replies.pop(),
            Some(Err(Rejection::Round(Refusal::WrongPhase { .. })))
        ));
        s.send_statistics("a");
        s.send_statistics("a");
        assert!(matches!(
            s.replies.pop(),
            Some(Err(Rejection::Round(Refusal::Duplicate { .. })))
        ));
        s.decline("c", SiteOutcome::Failed);
        assert!(s.pooled.is_empty());
        // A failed site leaves too few: the phase retries, then closes with a and b.
        s.expire();
        assert_eq!(s.open().attempt, 2);
        assert_eq!(s.open().phase, Phase::Statistics);
        s.send_statistics("a");
        s.send_statistics("b");
        s.expire();
        assert_eq!(s.pooled, vec![sites(&["a", "b"])]);
        // Round 1 trains in the attempt after the statistics'.
        let open = s.open().clone();
        assert_eq!((open.round, open.attempt, open.phase), (1, 3, Phase::Train));
        s.full_round();
        assert_eq!(s.ended.as_ref().map(|e| e.0), Some(RunStatus::Completed));

        // A run whose sites never send statistics fails, saying so.
        let mut s = Shell::new(with_statistics, &["a", "b"]);
        s.send_statistics("a");
        s.expire();
        s.expire();
        let (status, reason) = s.ended.clone().unwrap();
        assert_eq!(status, RunStatus::Failed);
        assert!(reason.contains("feature statistics"), "{reason}");
        assert!(s
            .outcomes(1, 2)
            .contains(&("b".to_string(), SiteOutcome::Missing)));
    }

    #[test]
    fn client_dp_samples_sites_commits_whoever_answered_and_ends_at_the_budget() {
        let sampled = RunPlan {
            sample_rate: Some(0.5),
            privacy_rounds: Some(3),
            ..plan(10, 2, 0)
        };
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let mut s = Shell::new(sampled, &names);
        let mut sizes = Vec::new();
        for round in 1..=3 {
            let open = s.open().clone();
            assert_eq!((open.round, open.attempt), (round, 1));
            // q·K over the online sites, whoever was drawn.
            assert_eq!(open.expected_sites, Some(4.0));
            sizes.push(open.selected.len());
            // Only the first sampled site answers; the round still commits at the deadline,
            // without a retry, and with nobody sampled it commits at once.
            if let Some(first) = open.pending.iter().next().cloned() {
                s.train(&first);
                s.expire();
            }
            assert_eq!(s.committed.len(), round as usize, "round {round}");
            for p in s.open().pending.clone() {
                s.evaluate(&p);
            }
        }
        // Three rounds are all the target allows: the final model is scored, the run ends.
        let (status, reason) = s.ended.clone().unwrap();
        assert_eq!(status, RunStatus::BudgetExhausted);
        assert!(
            reason.contains("round 4") && reason.contains("3 of 10"),
            "{reason}"
        );
        assert_eq!(
            s.next_number, 2,
            "the final model's cross-site evaluation was requested"
        );
        // Poisson samples vary in size and are drawn from all eight.
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
    }

    #[test]
    fn a_run_trains_evaluates_and_scores_its_final_model_across_sites() {
        let mut s = Shell::new(plan(2, 2, 0), &["a", "b"]);
        assert_eq!(s.open().round, 1);
        s.full_round();
        assert_eq!(s.open().round, 2);
        assert_eq!(s.open().global_sha256, "g1");
        s.full_round();
        assert_eq!(s.committed, ["g1", "g2"]);
        assert_eq!(s.evaluated, [1, 2]);
        assert_eq!(s.ended, Some((RunStatus::Completed, String::new())));
        assert!(s.open.is_none());
        // Each attempt's updates are released after its commit.
        assert!(s.released.contains(&(1, Some(1))) && s.released.contains(&(2, Some(1))));
        // The final model goes out to every online site.
        assert!(s.run.cross_site_open(s.now));
        let task = s.run.cross_site_task("a", s.now).unwrap();
        assert_eq!(task.global_sha256, "g2");
        for site in ["a", "b"] {
            s.feed(Event::CrossSiteReported {
                site: site.into(),
                global_sha256: "g2".into(),
                examples: 3,
                metrics: BTreeMap::new(),
            });
        }
        assert_eq!(s.cross_site, ["a", "b"]);
        assert!(!s.run.cross_site_open(s.now));
    }

    #[test]
    fn waits_for_enough_sites_then_selects_whoever_is_there() {
        let mut s = Shell::new(plan(1, 2, 0), &["a"]);
        assert!(s.open.is_none());
        // A second site comes online: the round opens at once.
        s.online = sites(&["a", "b"]);
        s.feed(Event::SitesOnline(s.online.clone()));
        assert_eq!(s.open().selected.len(), 2);

        // Nobody else comes: at the wait's deadline the round opens with the one site.
        let mut s = Shell::new(plan(1, 2, 1), &["a"]);
        s.at(DEADLINE);
        assert_eq!(s.open().selected, BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn a_failed_run_says_what_its_sites_said() {
        let mut s = Shell::new(plan(1, 2, 0), &["a", "b"]);
        s.train("a");
        let (round, attempt) = (s.open().round, s.open().attempt);
        s.feed(Event::SiteDeclined {
            site: "b".into(),
            round,
            attempt,
            outcome: SiteOutcome::Failed,
            reason: "task failed: b.csv:2: column `y`: unknown label `M`".into(),
        });
        // Everyone selected has answered: the attempt fails at once, without retries left.
        let (status, reason) = s.ended.clone().unwrap();
        assert_eq!(status, RunStatus::Failed);
        assert!(
            reason.ends_with(
                "; their reasons: b: task failed: b.csv:2: column `y`: unknown label `M`"
            ),
            "{reason}"
        );
    }

    #[test]
    fn a_vanished_site_is_missing_and_the_round_retries_then_fails() {
        let mut s = Shell::new(plan(1, 2, 1), &["a", "b"]);
        s.train("a");
        // `b` vanished: the attempt closes at its deadline with one update of two.
        s.expire();
        assert_eq!(
            s.outcomes(1, 1),
            [
                ("a".into(), SiteOutcome::Accepted),
                ("b".into(), SiteOutcome::Missing)
            ]
        );
        assert!(s.released.contains(&(1, Some(1))));
        // `b` is still listed online, so the next attempt opens at once.
        assert_eq!(s.open().attempt, 2);
        s.online = sites(&["a"]);
        s.feed(Event::SitesOnline(s.online.clone()));
        s.train("a");
        s.expire();
        let (status, reason) = s.ended.clone().unwrap();
        assert_eq!(status, RunStatus::Failed);
        assert!(reason.contains("in each of 2 attempts"), "{reason}");
        assert!(s.committed.is_empty());
    }

    #[test]
    fn declines_pending_holds_its_place_rejected_is_asked_on_top_next_round() {
        let mut p = plan(2, 2, 1);
        p.fraction = 0.1;
        let mut s = Shell::new(p, &["a", "b", "c"]);
        let selected = s.open().selected.clone();
        assert_eq!(selected.len(), 2);
        let mut it = selected.iter();
        let (x, y) = (it.next().unwrap().clone(), it.next().unwrap().clone());
        s.train(&x);
        s.decline(&y, SiteOutcome::Pending);
        // Awaiting approval: not handed the task again, but the round waits for it.
        assert!(s.open().pending.is_empty() && s.open().awaiting.contains(&y));
        assert_eq!(s.open().phase, Phase::Train);
        // Approved in time.
        s.train(&y);
        assert_eq!(s.open().phase, Phase::Evaluate);
        s.evaluate(&x);
        s.evaluate(&y);
        // Round 2: `z` rejects; too few updates, and the retry asks it on top of the sample.
        let sampled = s.open().selected.clone();
        let z = sampled.iter().next().unwrap().clone();
        s.decline(&z, SiteOutcome::Rejected);
        assert_eq!(
            s.outcomes(2, 1).last().unwrap(),
            &(z.clone(), SiteOutcome::Rejected)
        );
        let rest: Vec<String> = s.open().pending.iter().cloned().collect();
        for site in rest {
            s.train(&site);
        }
        assert_eq!(s.open().attempt, 2);
        assert!(s.open().selected.contains(&z) && s.open().selected.len() == 3);
        // Still rejecting, and no retries left: the run fails at once, naming who was silent.
        s.decline(&z, SiteOutcome::Rejected);
        s.expire();
        assert_eq!(s.ended.as_ref().unwrap().0, RunStatus::Failed);
    }

    #[test]
    fn a_paused_site_is_not_waited_for_and_a_failure_from_a_stale_attempt_is_ignored() {
        let mut s = Shell::new(plan(1, 1, 0), &["a", "b"]);
        s.feed(Event::SiteDeclined {
            site: "b".into(),
            round: 1,
            attempt: 9,
            outcome: SiteOutcome::Failed,
            reason: "stale".into(),
        });
        assert!(s.outcomes(1, 9).is_empty() && s.open().pending.contains("b"));
        s.train("a");
        assert_eq!(s.open().phase, Phase::Train, "`b` still owes an update");
        s.decline("b", SiteOutcome::Paused);
        // Paused is an answer: the round closes without waiting for the deadline.
        assert_eq!(s.open().phase, Phase::Evaluate);
        assert_eq!(
            s.outcomes(1, 1).last().unwrap(),
            &("b".into(), SiteOutcome::Paused)
        );
    }

    #[test]
    fn stop_mid_round_releases_the_attempt_and_ends_once() {
        let mut s = Shell::new(plan(3, 2, 0), &["a", "b"]);
        s.train("a");
        s.feed(Event::StopRequested);
        assert_eq!(
            s.ended,
            Some((RunStatus::Stopped, "stopped by a researcher".into()))
        );
        assert!(s.released.contains(&(1, Some(1))));
        assert!(s.open.is_none());
        // Results after the end are refused as for no open round.
        s.replies.clear();
        s.feed(Event::UpdateVerified {
            site: "b".into(),
            round: 1,
            attempt: 1,
            base_sha256: "g0".into(),
            sha256: "u".into(),
            examples: 1,
            train_loss: 0.0,
            privacy_epsilon: None,
            clip_indicator: None,
        });
        assert!(matches!(
            s.replies[0],
            Err(Rejection::Round(Refusal::NotOpen { .. }))
        ));
        s.feed(Event::StopRequested);
        assert_eq!(s.run.next_deadline(), None);
    }

    #[test]
    fn refusals_stale_base_late_and_broken_folds() {
        let mut s = Shell::new(plan(1, 1, 0), &["a", "b"]);
        s.feed(Event::UpdateVerified {
            site: "a".into(),
            round: 1,
            attempt: 1,
            base_sha256: "other".into(),
            sha256: "u".into(),
            examples: 1,
            train_loss: 0.0,
            privacy_epsilon: None,
            clip_indicator: None,
        });
        assert!(matches!(s.replies.last(), Some(Err(Rejection::Invalid(_)))));
        s.fold = Some(FoldOutcome::Refused("over the norm bound".into()));
        s.train("a");
        assert_eq!(s.outcomes(1, 1).last().unwrap().1, SiteOutcome::Refused);
        // A broken fold poisons the sums: the attempt is redone.
        s.fold = Some(FoldOutcome::Broken("disk".into()));
        s.train("b");
        assert!(s.released.contains(&(1, Some(1))));
        assert_eq!(s.open().attempt, 2);
        s.train("a");
        s.train("b");
        assert_eq!(s.committed, ["g1"]);
        // Late results are refused.
        let deadline = s.open().deadline_ms;
        s.now = deadline;
        s.replies.clear();
        s.feed(Event::EvaluationReported {
            site: "a".into(),
            round: 1,
            global_sha256: "g1".into(),
            examples: 1,
            metrics: BTreeMap::new(),
        });
        assert!(matches!(
            s.replies[0],
            Err(Rejection::Round(Refusal::Late { .. }))
        ));
        assert_eq!(s.ended.as_ref().unwrap().0, RunStatus::Completed);
    }

    #[test]
    fn restart_at_every_step_resumes_from_the_committed_rounds() {
        // Crash after each number of events: a fresh machine resumes from what was committed.
        for crash_after in 0..12 {
            let mut s = Shell::new(plan(3, 2, 1), &["a", "b"]);
            let mut steps = 0;
            while s.ended.is_none() && steps < crash_after {
                let Some(open) = s.open.clone() else {
                    s.expire();
                    continue;
                };
                let site = open.pending.iter().next().cloned().unwrap();
                match open.phase {
                    Phase::Statistics => s.send_statistics(&site),
                    Phase::Train => s.train(&site),
                    Phase::Evaluate => s.evaluate(&site),
                }
                steps += 1;
            }
            let committed = s.committed.clone();
            let mut r = Shell::resume(plan(3, 2, 1), &["a", "b"], committed.clone(), 1, 50_000);
            assert_eq!(
                r.released.first(),
                Some(&(committed.len() as u32 + 1, None))
            );
            if committed.len() < 3 {
                let o = r.open().clone();
                assert_eq!(
                    o.round,
                    committed.len() as u32 + 1,
                    "crash after {crash_after}"
                );
                // Attempt numbers continue after those stored.
                assert_eq!(o.attempt, 2);
                assert_eq!(
                    o.global_sha256,
                    committed.last().cloned().unwrap_or("g0".into())
                );
            }
            while r.ended.is_none() {
                match r.open.clone() {
                    Some(o) if o.phase == Phase::Train || !o.pending.is_empty() => r.full_round(),
                    _ => r.expire(),
                }
            }
            assert_eq!(r.ended.unwrap().0, RunStatus::Completed);
            assert_eq!(r.committed, ["g1", "g2", "g3"]);
        }
    }

    #[test]
    fn a_crash_before_the_commit_redoes_the_round() {
        let mut s = Shell::new(plan(1, 2, 0), &["a", "b"]);
        s.commits = false;
        s.train("a");
        s.train("b");
        assert!(s.committed.is_empty() && s.run.next_deadline().is_none());
        let r = Shell::resume(plan(1, 2, 0), &["a", "b"], Vec::new(), 1, 10);
        assert_eq!((r.open().round, r.open().attempt), (1, 2));
    }

    #[test]
    fn a_late_refusal_of_an_earlier_cross_site_evaluation_keeps_the_site_in_the_current_one() {
        let mut run = RunMachine::ended(plan(1, 1, 0), "final");
        run.handle(
            Event::CrossSiteRequested {
                number: 7,
                sites: sites(&["a", "b"]),
            },
            0,
        );
        // A second request (another EvaluateRun) replaces the first.
        run.handle(
            Event::CrossSiteRequested {
                number: 8,
                sites: sites(&["a", "b"]),
            },
            10,
        );
        // `a` refuses evaluation 7, late: it is still asked in evaluation 8.
        run.handle(
            Event::CrossSiteDeclined {
                site: "a".into(),
                number: 7,
                reason: "bad data".into(),
            },
            20,
        );
        assert_eq!(run.cross_site_task("a", 20).unwrap().number, 8);
        // Refusing the current one strikes it.
        run.handle(
            Event::CrossSiteDeclined {
                site: "a".into(),
                number: 8,
                reason: "bad data".into(),
            },
            30,
        );
        assert!(run.cross_site_task("a", 30).is_none());
        // Wrong model, then a stranger, then the answer that completes it.
        let report = |site: &str, model: &str| Event::CrossSiteReported {
            site: site.into(),
            global_sha256: model.into(),
            examples: 1,
            metrics: BTreeMap::new(),
        };
        let e = run.handle(report("b", "other"), 40);
        assert!(matches!(e[..], [Effect::Reply(Err(Rejection::Invalid(_)))]));
        let e = run.handle(report("z", "final"), 40);
        assert!(matches!(
            e[..],
            [Effect::Reply(Err(Rejection::NotAsked(_)))]
        ));
        assert!(run.cross_site_open(40));
        let e = run.handle(report("b", "final"), 40);
        assert!(e.contains(&Effect::CrossSiteComplete));
        assert!(!run.cross_site_open(40));
        // An evaluation nobody answers closes at its deadline.
        run.handle(
            Event::CrossSiteRequested {
                number: 9,
                sites: sites(&["b"]),
            },
            100,
        );
        assert_eq!(run.cross_site_deadline(), Some(100 + DEADLINE));
        assert!(!run.cross_site_open(100 + DEADLINE));
        assert!(run.cross_site_task("b", 100 + DEADLINE).is_none());
    }

    fn unfinished(trained: &[&str], answered: &[&str]) -> UnfinishedEvaluation {
        UnfinishedEvaluation {
            attempt: 2,
            trained: sites(trained),
            answered: answered
                .iter()
                .map(|s| {
                    let metrics = BTreeMap::from([("accuracy".to_string(), 0.5)]);
                    (s.to_string(), (5, metrics))
                })
                .collect(),
        }
    }

    #[test]
    fn an_unfinished_round_evaluation_is_reopened_for_the_sites_that_owe_it() {
        let committed = vec!["g1".to_string()];
        let evaluation = unfinished(&["a", "b"], &["a"]);
        let mut s = Shell::resume_evaluating(
            plan(2, 2, 0),
            &["a", "b", "c"],
            committed,
            0,
            7_000,
            Some(evaluation),
        );
        let o = s.open().clone();
        assert_eq!((o.round, o.attempt, o.phase), (1, 2, Phase::Evaluate));
        assert_eq!(o.global_sha256, "g1");
        // Only the site that trained and has not answered is asked, with a fresh deadline.
        assert_eq!(o.pending, BTreeSet::from(["b".to_string()]));
        assert_eq!(o.reported, 1);
        assert_eq!(o.deadline_ms, 7_000 + DEADLINE);
        // `a` answered before the restart: asked no more.
        s.replies.clear();
        s.evaluate("a");
        assert!(matches!(
            s.replies[0],
            Err(Rejection::Round(Refusal::Duplicate { .. }))
        ));
        s.evaluate("b");
        assert_eq!(s.evaluated, [1]);
        // Then the next round, from the committed model.
        let o = s.open().clone();
        assert_eq!((o.round, o.attempt, o.phase), (2, 1, Phase::Train));
        assert_eq!(o.global_sha256, "g1");
    }

    #[test]
    fn a_reopened_round_evaluation_closes_at_its_deadline_with_the_answers_it_has() {
        let committed = vec!["g1".to_string()];
        let mut s = Shell::resume_evaluating(
            plan(1, 1, 0),
            &["a"],
            committed.clone(),
            0,
            100,
            Some(unfinished(&["a", "b"], &["a"])),
        );
        let mut metrics = None;
        let effects = s.run.handle_timeout(100 + DEADLINE);
        for e in &effects {
            if let Effect::RoundEvaluated { round, metrics: m } = e {
                assert_eq!(*round, 1);
                metrics = Some(m.clone());
            }
        }
        assert_eq!(metrics.unwrap().get("accuracy"), Some(&0.5));
        s.perform(effects);
        // The last round was evaluated: the run completes.
        assert_eq!(s.ended.as_ref().unwrap().0, RunStatus::Completed);

        // Every answer in already: it closes at once and the next round opens after the
        // attempts stored for it.
        let s = Shell::resume_evaluating(
            plan(2, 1, 0),
            &["a"],
            committed,
            3,
            100,
            Some(unfinished(&["a"], &["a"])),
        );
        assert_eq!(s.evaluated, [1]);
        let o = s.open();
        assert_eq!((o.round, o.attempt, o.phase), (2, 4, Phase::Train));
    }

    #[test]
    fn a_resumed_cross_site_evaluation_asks_only_the_sites_that_owe_it_until_its_deadline() {
        let mut run = RunMachine::ended(plan(1, 1, 0), "final");
        run.handle(
            Event::CrossSiteResumed {
                number: 4,
                sites: sites(&["b"]),
                deadline_ms: 500,
            },
            100,
        );
        assert!(run.cross_site_open(100));
        assert!(run.cross_site_task("a", 100).is_none());
        let task = run.cross_site_task("b", 100).unwrap();
        assert_eq!((task.number, task.deadline_ms), (4, 500));
        assert_eq!(run.cross_site_owed(), Some((4, sites(&["b"]), 500)));
        let e = run.handle(
            Event::CrossSiteReported {
                site: "b".into(),
                global_sha256: "final".into(),
                examples: 1,
                metrics: BTreeMap::new(),
            },
            200,
        );
        assert!(e.contains(&Effect::CrossSiteComplete));
        assert!(!run.cross_site_open(200));

        // Its deadline passed while the coordinator was down: it stays closed.
        let mut run = RunMachine::ended(plan(1, 1, 0), "final");
        run.handle(
            Event::CrossSiteResumed {
                number: 5,
                sites: sites(&["a"]),
                deadline_ms: 500,
            },
            500,
        );
        assert!(!run.cross_site_open(500) && run.cross_site_owed().is_none());
    }
}
