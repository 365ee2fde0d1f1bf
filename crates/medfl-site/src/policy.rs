//! The hospital decides what trains on its data: a policy (part of the site config) that every
//! run must satisfy, and a queue of runs awaiting the hospital's approval, kept in
//! `data_dir/approvals.json` so `medfl-site runs approve` works while the daemon runs. Runs can
//! be decided ahead of time by name or by spec SHA-256, and every decision is bound to the spec
//! the run first came with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medfl_core::spec::RunSpec;
use serde::{Deserialize, Serialize};

use crate::SiteError;

/// What runs may train here. Empty lists allow anything. The limits have safe defaults, so a
/// hospital that writes no policy still has them ([`Policy::default`]); a limit set to 0 is
/// lifted.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Base models (SHA-256 of their weights) text runs may adapt.
    pub base_models: Vec<String>,
    /// Task kinds: `tabular_classification`, `text_classification`, `image_classification`.
    pub task_kinds: Vec<String>,
    /// Strategies, by their `[strategy] name`.
    pub strategies: Vec<String>,
    /// Most local epochs a round may ask for.
    pub max_local_epochs: u32,
    /// Most local steps a round may ask for.
    pub max_local_steps: u32,
    /// Smallest batch a round may ask for: a batch of one lets whoever sees two consecutive
    /// global models read a training row straight out of their difference.
    pub min_batch_size: u32,
    /// Largest update this site sends, in bytes (4 per trainable parameter).
    pub max_update_bytes: u64,
    /// Every new run waits in the queue until approved (`medfl-site runs approve RUN`).
    pub require_approval: bool,
    /// Runs on these datasets are approved without waiting.
    pub auto_approve_datasets: Vec<String>,
    /// Record-level privacy budgets by dataset name (`[policy.privacy.NAME]`): only runs with
    /// record-level DP train on such a dataset, and all of them together spend at most its
    /// `max_epsilon`.
    pub privacy: BTreeMap<String, DatasetBudget>,
}

/// A dataset's privacy budget across all runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetBudget {
    /// The most ε all runs together may spend on the dataset (ε's add up across runs).
    pub max_epsilon: f64,
    /// The δ every run's accounting on the dataset uses, in place of the run's (default:
    /// the run's, or 1/N^1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

/// The limits a site has when its policy does not set them.
pub const DEFAULT_MAX_LOCAL_EPOCHS: u32 = 20;
/// See [`DEFAULT_MAX_LOCAL_EPOCHS`].
pub const DEFAULT_MAX_LOCAL_STEPS: u32 = 10_000;
/// See [`DEFAULT_MAX_LOCAL_EPOCHS`].
pub const DEFAULT_MIN_BATCH_SIZE: u32 = 8;
/// See [`DEFAULT_MAX_LOCAL_EPOCHS`] (100 MB).
pub const DEFAULT_MAX_UPDATE_BYTES: u64 = 100_000_000;

impl Default for Policy {
    /// No restriction on models, tasks or strategies; the safe limits on training.
    fn default() -> Self {
        Self {
            base_models: Vec::new(),
            task_kinds: Vec::new(),
            strategies: Vec::new(),
            max_local_epochs: DEFAULT_MAX_LOCAL_EPOCHS,
            max_local_steps: DEFAULT_MAX_LOCAL_STEPS,
            min_batch_size: DEFAULT_MIN_BATCH_SIZE,
            max_update_bytes: DEFAULT_MAX_UPDATE_BYTES,
            require_approval: false,
            auto_approve_datasets: Vec::new(),
            privacy: BTreeMap::new(),
        }
    }
}

impl Policy {
    /// Why `spec` may not train here, if it may not; `update_bytes` is its update's size.
    pub fn violation(&self, spec: &RunSpec, update_bytes: u64) -> Option<String> {
        let kind = spec.task.kind();
        if !self.task_kinds.is_empty() && !self.task_kinds.iter().any(|k| k == kind) {
            return Some(format!(
                "task kind `{kind}` is not one of {:?}",
                self.task_kinds
            ));
        }
        if let Some(e) = spec.encoder() {
            if !self.base_models.is_empty() && !self.base_models.contains(&e.base_sha256) {
                return Some(format!(
                    "base model `{}` ({}) is not allowed here",
                    e.base, e.base_sha256
                ));
            }
        }
        let strategy = spec.strategy.name();
        if !self.strategies.is_empty() && !self.strategies.iter().any(|s| s == strategy) {
            return Some(format!(
                "strategy `{strategy}` is not one of {:?}",
                self.strategies
            ));
        }
        let t = &spec.training;
        if self.max_local_epochs > 0 && t.local_steps == 0 && t.local_epochs > self.max_local_epochs
        {
            return Some(format!(
                "{} local epochs exceed this site's limit of {} (policy.max_local_epochs)",
                t.local_epochs, self.max_local_epochs
            ));
        }
        if self.max_local_steps > 0 && t.local_steps > self.max_local_steps {
            return Some(format!(
                "{} local steps exceed this site's limit of {} (policy.max_local_steps)",
                t.local_steps, self.max_local_steps
            ));
        }
        if t.batch_size < self.min_batch_size {
            return Some(format!(
                "batch size {} is below this site's minimum of {} (policy.min_batch_size)",
                t.batch_size, self.min_batch_size
            ));
        }
        let dataset = &spec.task.dataset;
        if let Some(budget) = self.privacy.get(dataset) {
            if spec.privacy.record.is_none() {
                return Some(format!(
                    "dataset {dataset} has a privacy budget of ε = {} \
                     (policy.privacy.{dataset}.max_epsilon): only runs with record-level DP \
                     ([privacy] level = \"record\") train on it",
                    budget.max_epsilon
                ));
            }
        }
        if self.max_update_bytes > 0 && update_bytes > self.max_update_bytes {
            return Some(format!(
                "updates of {update_bytes} bytes exceed this site's limit of {} \
                 (policy.max_update_bytes)",
                self.max_update_bytes
            ));
        }
        None
    }

    /// Checks the privacy budgets; the error names the key.
    pub fn validate(&self) -> Result<(), SiteError> {
        for (dataset, b) in &self.privacy {
            if !(b.max_epsilon.is_finite() && b.max_epsilon > 0.0) {
                return Err(SiteError::Config(format!(
                    "`policy.privacy.{dataset}.max_epsilon`: must be a finite number > 0, got {}",
                    b.max_epsilon
                )));
            }
            if let Some(d) = b.delta.filter(|d| !(*d > 0.0 && *d < 1.0)) {
                return Err(SiteError::Config(format!(
                    "`policy.privacy.{dataset}.delta`: must be in (0, 1), got {d}"
                )));
            }
        }
        Ok(())
    }

    /// Whether `spec` may start without the hospital's approval.
    pub fn auto_approves(&self, spec: &RunSpec) -> bool {
        !self.require_approval || self.auto_approve_datasets.contains(&spec.task.dataset)
    }
}

/// Where a run stands at this site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Waiting for the hospital.
    Pending,
    /// May train here.
    Approved,
    /// May not train here.
    Rejected,
}

/// One run in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// The run's name.
    pub name: String,
    /// The dataset it asks for.
    pub dataset: String,
    /// Its task kind and model, for the person deciding.
    pub summary: String,
    /// Where it stands.
    pub decision: Decision,
    /// Why it was rejected, or which decision taken ahead of time approved it.
    #[serde(default)]
    pub reason: String,
    /// SHA-256 (lowercase hex) of the run spec as it first reached this site: the decision
    /// holds for that spec only. Empty for runs queued before decisions were bound to specs
    /// (bound at their next task).
    #[serde(default)]
    pub spec_sha256: String,
    /// The run ended at the coordinator (its heartbeat said so): nothing is left to decide.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
}

/// A decision the hospital took before the run reached this site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ahead {
    /// Approved or rejected.
    pub decision: Decision,
    /// Why it was rejected.
    #[serde(default)]
    pub reason: String,
}

/// The approval queue in `data_dir/approvals.json`, by run id, and the decisions taken ahead
/// of time, by run name and by run-spec SHA-256.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Approvals {
    /// Every run the site has seen.
    pub runs: BTreeMap<String, Approval>,
    /// Decisions for any run of a name, taken before it arrived.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_name: BTreeMap<String, Ahead>,
    /// Decisions for the run whose spec has a SHA-256, taken before it arrived.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_spec: BTreeMap<String, Ahead>,
}

/// What `medfl-site approve|reject ARG` decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A run in the queue, by id.
    Run(String),
    /// Any run of this name, ahead of time.
    Name(String),
    /// The run whose spec has this SHA-256, ahead of time.
    Spec(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Run(id) => write!(f, "run {id}"),
            Subject::Name(name) => write!(f, "any run named `{name}`"),
            Subject::Spec(sha) => write!(f, "the run whose spec has SHA-256 {sha}"),
        }
    }
}

/// A decision [`Approvals::decide`] recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided {
    /// On a run in the queue.
    Run {
        /// Its id.
        id: String,
        /// Its entry, as decided.
        approval: Approval,
    },
    /// Ahead of time, by name or spec hash.
    Ahead {
        /// What it applies to.
        subject: Subject,
        /// Queued runs that awaited approval and were decided by it at once.
        applied: Vec<String>,
    },
}

/// A task whose run spec is not the one its run reached this site with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecChanged {
    /// The run's id.
    pub run: String,
    /// Its name.
    pub name: String,
    /// The spec SHA-256 the hospital's decision is bound to.
    pub bound: String,
    /// The task's spec SHA-256.
    pub new: String,
}

impl std::fmt::Display for SpecChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run `{}` ({}) reached this site with spec SHA-256 {}, but this task carries spec \
             SHA-256 {}: the hospital's decision holds for the spec it was taken on only",
            self.name, self.run, self.bound, self.new
        )
    }
}

impl SpecChanged {
    /// The refusal the researcher sees.
    pub fn into_error(self) -> SiteError {
        Declined::Rejected.because(self.to_string())
    }
}

/// Whether `text` is a run-spec SHA-256 as the hospital types it: 64 lowercase hex digits.
pub fn is_spec_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// SHA-256 (lowercase hex) of a run spec's bytes exactly as received.
pub fn spec_sha256(spec_toml: &str) -> String {
    medfl_proto::convert::spec_sha256(spec_toml)
}

/// When and how big the approval queue was last written (`None` while there is none), for a
/// running daemon to notice the hospital's decisions cheaply.
pub fn stamp(data_dir: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(Approvals::path(data_dir)).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Holds the approval queue for one read-modify-write: the daemon and the hospital's commands
/// are separate processes, and neither may lose the other's write. Released on drop.
struct QueueLock(#[allow(dead_code)] std::fs::File);

impl QueueLock {
    fn take(data_dir: &Path) -> Result<Self, SiteError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| SiteError::io(format!("creating {}", data_dir.display()), e))?;
        let path = data_dir.join("approvals.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SiteError::io(format!("opening {}", path.display()), e))?;
        file.lock()
            .map_err(|e| SiteError::io(format!("locking {}", path.display()), e))?;
        Ok(Self(file))
    }
}

impl Approvals {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("approvals.json")
    }

    /// Reads the queue (empty when there is none yet).
    pub fn load(data_dir: &Path) -> Result<Self, SiteError> {
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| SiteError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(SiteError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Writes the queue atomically (creating the data directory, for a decision taken ahead
    /// of time before the daemon first ran).
    pub fn save(&self, data_dir: &Path) -> Result<(), SiteError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| SiteError::io(format!("creating {}", data_dir.display()), e))?;
        let path = Self::path(data_dir);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| SiteError::Config(format!("approvals: {e}")))?;
        medfl_daemon::write_private(&path, text.as_bytes())
            .map_err(|e| SiteError::io(format!("writing {}", path.display()), e))
    }

    /// What `arg` names: a run in the queue by id; else 64 lowercase hex digits name a run
    /// spec by its SHA-256. Anything else is refused, so a mistyped run id never becomes a
    /// standing decision on every run of that name (that takes [`Approvals::decide_name`]).
    pub fn subject(&self, arg: &str) -> Result<Subject, SiteError> {
        if self.runs.contains_key(arg) {
            Ok(Subject::Run(arg.to_string()))
        } else if is_spec_sha256(arg) {
            Ok(Subject::Spec(arg.to_string()))
        } else {
            Err(SiteError::Command(format!(
                "`{arg}` is neither a run that reached this site (see `medfl-site runs \
                 pending --all`) nor a spec SHA-256 (64 lowercase hex digits); to decide ahead \
                 of time on every run of a name, use --name {arg}"
            )))
        }
    }

    /// The decision taken ahead of time for a run named `name` with spec `spec_sha256`, with
    /// what it was taken on: one on the spec's hash, the more specific, before one on the name.
    pub fn ahead_for(&self, name: &str, spec_sha256: &str) -> Option<(Subject, &Ahead)> {
        self.by_spec
            .get(spec_sha256)
            .map(|a| (Subject::Spec(spec_sha256.to_string()), a))
            .or_else(|| {
                self.by_name
                    .get(name)
                    .map(|a| (Subject::Name(name.to_string()), a))
            })
    }

    /// Runs that still await the hospital's decision (not ended).
    pub fn waiting(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter(|(_, a)| a.decision == Decision::Pending && !a.ended)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Marks queued `runs` as ended at the coordinator; returns those newly marked.
    pub fn mark_ended(data_dir: &Path, runs: &[String]) -> Result<Vec<String>, SiteError> {
        // Every heartbeat asks; most have nothing to mark, and need not take the queue's lock.
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = QueueLock::take(data_dir)?;
        let mut queue = Self::load(data_dir)?;
        let mut marked = Vec::new();
        for run in runs {
            if let Some(a) = queue.runs.get_mut(run).filter(|a| !a.ended) {
                a.ended = true;
                marked.push(run.clone());
            }
        }
        if !marked.is_empty() {
            queue.save(data_dir)?;
        }
        Ok(marked)
    }

    /// Whether a task of `run` carries another spec than the one its run is bound to.
    pub fn spec_change(&self, run: &str, spec_sha256: &str) -> Option<SpecChanged> {
        let a = self.runs.get(run)?;
        (!a.spec_sha256.is_empty() && a.spec_sha256 != spec_sha256).then(|| SpecChanged {
            run: run.to_string(),
            name: a.name.clone(),
            bound: a.spec_sha256.clone(),
            new: spec_sha256.to_string(),
        })
    }

    /// Where a task of queued `run` with spec `spec_sha256` stands, without changing anything:
    /// rejected when its spec changed; `None` when the run is not queued.
    pub fn standing(&self, run: &str, spec_sha256: &str) -> Option<Decision> {
        if self.spec_change(run, spec_sha256).is_some() {
            return Some(Decision::Rejected);
        }
        self.runs.get(run).map(|a| a.decision)
    }

    /// Records the hospital's decision on what `arg` names (see [`Approvals::subject`]). A
    /// decision ahead of time also decides the queued runs it matches that await approval.
    pub fn decide(
        data_dir: &Path,
        arg: &str,
        decision: Decision,
        reason: &str,
    ) -> Result<Decided, SiteError> {
        let _lock = QueueLock::take(data_dir)?;
        let queue = Self::load(data_dir)?;
        let subject = queue.subject(arg)?;
        Self::decide_on(queue, data_dir, subject, decision, reason)
    }

    /// Records the hospital's decision, ahead of time, on every run named `name`.
    pub fn decide_name(
        data_dir: &Path,
        name: &str,
        decision: Decision,
        reason: &str,
    ) -> Result<Decided, SiteError> {
        let _lock = QueueLock::take(data_dir)?;
        let queue = Self::load(data_dir)?;
        Self::decide_on(
            queue,
            data_dir,
            Subject::Name(name.to_string()),
            decision,
            reason,
        )
    }

    fn decide_on(
        mut queue: Self,
        data_dir: &Path,
        subject: Subject,
        decision: Decision,
        reason: &str,
    ) -> Result<Decided, SiteError> {
        let decided = match subject {
            Subject::Run(id) => {
                let entry = queue.runs.get_mut(&id).ok_or_else(|| {
                    SiteError::Command(format!("run `{id}` has not reached this site"))
                })?;
                if entry.ended {
                    return Err(SiteError::Command(format!(
                        "run `{id}` ({}) has ended at the coordinator: it will not train \
                         anywhere again, so there is nothing to decide",
                        entry.name
                    )));
                }
                entry.decision = decision;
                entry.reason = reason.to_string();
                Decided::Run {
                    approval: entry.clone(),
                    id,
                }
            }
            Subject::Name(_) | Subject::Spec(_) => {
                let ahead = Ahead {
                    decision,
                    reason: reason.to_string(),
                };
                let (map, key) = match &subject {
                    Subject::Spec(sha) => (&mut queue.by_spec, sha),
                    Subject::Name(name) | Subject::Run(name) => (&mut queue.by_name, name),
                };
                map.insert(key.clone(), ahead);
                let entry_reason = match decision {
                    Decision::Approved => format!("approved ahead of time: {subject}"),
                    _ => reason.to_string(),
                };
                let mut applied = Vec::new();
                for (id, a) in &mut queue.runs {
                    let matches = match &subject {
                        Subject::Spec(sha) => a.spec_sha256 == *sha,
                        Subject::Name(name) | Subject::Run(name) => a.name == *name,
                    };
                    if matches && a.decision == Decision::Pending {
                        a.decision = decision;
                        a.reason = entry_reason.clone();
                        applied.push(id.clone());
                    }
                }
                Decided::Ahead { subject, applied }
            }
        };
        queue.save(data_dir)?;
        Ok(decided)
    }
}

/// Why the hospital keeps a run from training here; the researcher sees it per site and round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declined {
    /// Waiting in the approval queue.
    PendingApproval,
    /// Outside the policy, or rejected by hand.
    Rejected,
    /// The kill switch is thrown.
    Paused,
    /// Training another round would exceed the run's ε target (or the dataset's budget).
    BudgetExhausted,
}

impl Declined {
    /// The error saying so.
    pub fn because(self, reason: String) -> SiteError {
        SiteError::Declined { kind: self, reason }
    }
}

/// The kill switch's file: while it exists the site trains and uploads nothing.
fn pause_file(data_dir: &Path) -> PathBuf {
    data_dir.join("paused")
}

/// Whether the hospital has paused this site (`medfl-site pause`).
pub fn is_paused(data_dir: &Path) -> bool {
    pause_file(data_dir).exists()
}

/// Pauses (with `reason`) or resumes the site; a running daemon notices within a second, stops
/// any training under way and sends nothing until resumed.
pub fn set_paused(data_dir: &Path, paused: Option<&str>) -> Result<(), SiteError> {
    let path = pause_file(data_dir);
    match paused {
        Some(reason) => std::fs::write(&path, format!("{reason}\n"))
            .map_err(|e| SiteError::io(format!("writing {}", path.display()), e)),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SiteError::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        },
    }
}

/// The refusal of a run waiting in the queue.
fn awaiting(name: &str, run: &str) -> SiteError {
    Declined::PendingApproval.because(format!(
        "run `{name}` awaits the hospital's approval (medfl-site runs approve {run})"
    ))
}

/// Whether `run` (spec `spec` whose SHA-256 is `spec_sha256`, update of `update_bytes`) may
/// train at the site in `data_dir` under `policy`: a run outside the policy is rejected for
/// good; one decided ahead of time (by name or spec hash) is decided so; one needing approval
/// is queued and waits. The decision is bound to the spec the run first came with: a task
/// carrying another spec is rejected. Returns the entry to audit when the queue admitted a
/// new run.
pub fn admit(
    policy: &Policy,
    data_dir: &Path,
    run: &str,
    spec: &RunSpec,
    spec_sha256: &str,
    update_bytes: u64,
    privacy: Option<&str>,
) -> Result<Option<Approval>, SiteError> {
    let _lock = QueueLock::take(data_dir)?;
    let mut queue = Approvals::load(data_dir)?;
    if let Some(changed) = queue.spec_change(run, spec_sha256) {
        return Err(changed.into_error());
    }
    if let Some(a) = queue.runs.get_mut(run) {
        let a = if a.spec_sha256.is_empty() {
            // Queued before decisions were bound to specs: bound to this one from now on.
            a.spec_sha256 = spec_sha256.to_string();
            let a = a.clone();
            queue.save(data_dir)?;
            a
        } else {
            a.clone()
        };
        return match a.decision {
            Decision::Approved => Ok(None),
            Decision::Pending => Err(awaiting(&a.name, run)),
            Decision::Rejected => {
                Err(Declined::Rejected.because(format!("rejected by the hospital: {}", a.reason)))
            }
        };
    }
    let violation = policy.violation(spec, update_bytes);
    let ahead = queue
        .ahead_for(&spec.name, spec_sha256)
        .map(|(subject, a)| (subject, a.clone()));
    let (decision, reason) = match (&violation, ahead) {
        (Some(v), _) => (Decision::Rejected, format!("policy: {v}")),
        (None, Some((subject, a))) => match a.decision {
            Decision::Approved => (a.decision, format!("approved ahead of time: {subject}")),
            _ => (a.decision, a.reason),
        },
        (None, None) if policy.auto_approves(spec) => (Decision::Approved, String::new()),
        (None, None) => (Decision::Pending, String::new()),
    };
    let mut summary = format!(
        "{} on `{}` with {}",
        spec.task.kind(),
        spec.task.dataset,
        match spec.encoder() {
            Some(e) => format!("base `{}` ({})", e.base, e.base_sha256),
            None => "a model trained from scratch".into(),
        }
    );
    if let Some(privacy) = privacy {
        summary = format!("{summary}; {privacy}");
    }
    let entry = Approval {
        name: spec.name.clone(),
        dataset: spec.task.dataset.clone(),
        summary,
        decision,
        reason,
        spec_sha256: spec_sha256.to_string(),
        ended: false,
    };
    queue.runs.insert(run.to_string(), entry.clone());
    queue.save(data_dir)?;
    match (decision, violation) {
        (Decision::Approved, _) => Ok(Some(entry)),
        (Decision::Pending, _) => Err(awaiting(&spec.name, run)),
        (Decision::Rejected, Some(v)) => {
            Err(Declined::Rejected.because(format!("rejected by the site's policy: {v}")))
        }
        (Decision::Rejected, None) => {
            Err(Declined::Rejected.because(format!("rejected by the hospital: {}", entry.reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spec_sha256 as sha;
    use super::*;

    #[test]
    fn privacy_budgets_are_checked_and_require_record_level_dp() {
        let budget = |max_epsilon, delta| Policy {
            privacy: BTreeMap::from([("bc".to_string(), DatasetBudget { max_epsilon, delta })]),
            ..Policy::default()
        };
        assert!(budget(8.0, Some(1e-6)).validate().is_ok());
        let err = budget(0.0, None).validate().unwrap_err().to_string();
        assert!(err.contains("policy.privacy.bc.max_epsilon"), "{err}");
        let err = budget(8.0, Some(1.0)).validate().unwrap_err().to_string();
        assert!(err.contains("policy.privacy.bc.delta"), "{err}");
    }

    fn spec_toml(name: &str, extra: &str) -> String {
        format!(
            "name = \"{name}\"\nrounds = 1\n[model]\nkind = \"mlp\"\n[task]\ndataset = \"bc\"\n\
             features = [\"a\"]\nlabel = \"y\"\nlabels = [\"0\", \"1\"]\n{extra}"
        )
    }

    fn spec(extra: &str) -> RunSpec {
        RunSpec::from_toml(&spec_toml("r", extra)).unwrap()
    }

    #[test]
    fn policy_names_what_it_refuses() {
        let p = Policy {
            task_kinds: vec!["text_classification".into()],
            ..Policy::default()
        };
        assert!(p
            .violation(&spec(""), 8)
            .unwrap()
            .contains("tabular_classification"));
        let p = Policy {
            strategies: vec!["fedavg".into()],
            max_local_epochs: 2,
            max_update_bytes: 100,
            ..Policy::default()
        };
        assert_eq!(p.violation(&spec(""), 8), None);
        assert!(p
            .violation(&spec("[strategy]\nname = \"median\"\n"), 8)
            .unwrap()
            .contains("median"));
        assert!(p
            .violation(&spec("[training]\nlocal_epochs = 3\n"), 8)
            .unwrap()
            .contains("3 local epochs"));
        assert!(p.violation(&spec(""), 101).unwrap().contains("101 bytes"));
    }

    #[test]
    fn a_site_without_a_policy_has_safe_limits() {
        let p: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!(p.violation(&spec(""), 1000), None);
        for (extra, says) in [
            ("[training]\nlocal_epochs = 21\n", "policy.max_local_epochs"),
            (
                "[training]\nlocal_steps = 10001\n",
                "policy.max_local_steps",
            ),
            ("[training]\nbatch_size = 1\n", "policy.min_batch_size"),
        ] {
            let why = p.violation(&spec(extra), 1000).expect(extra);
            assert!(why.contains(says), "{extra}: {why}");
        }
        assert!(p
            .violation(&spec(""), 100_000_001)
            .unwrap()
            .contains("policy.max_update_bytes"));
        // A hospital lifts a limit by setting it to 0.
        let lifted: Policy =
            serde_json::from_str(r#"{"max_local_epochs": 0, "min_batch_size": 0}"#).unwrap();
        let greedy = spec("[training]\nlocal_epochs = 100\nbatch_size = 1\n");
        assert_eq!(lifted.violation(&greedy, 8), None);
    }

    fn declined(result: Result<Option<Approval>, SiteError>) -> (Declined, String) {
        match result {
            Err(SiteError::Declined { kind, reason }) => (kind, reason),
            other => panic!("expected a decline, got {other:?}"),
        }
    }

    fn manual() -> Policy {
        Policy {
            require_approval: true,
            ..Policy::default()
        }
    }

    #[test]
    fn runs_wait_for_approval_and_decisions_stick() {
        let dir = tempfile::tempdir().unwrap();
        let manual = manual();
        let s = spec("");
        let h = sha("spec");
        for _ in 0..2 {
            let (kind, reason) = declined(admit(&manual, dir.path(), "run-1", &s, &h, 8, None));
            assert_eq!(kind, Declined::PendingApproval);
            assert!(reason.contains("awaits"), "{reason}");
        }
        let queue = Approvals::load(dir.path()).unwrap();
        assert_eq!(queue.runs["run-1"].spec_sha256, h);
        assert_eq!(queue.standing("run-1", &h), Some(Decision::Pending));
        let decided = Approvals::decide(dir.path(), "run-1", Decision::Approved, "").unwrap();
        assert!(matches!(decided, Decided::Run { id, .. } if id == "run-1"));
        assert!(admit(&manual, dir.path(), "run-1", &s, &h, 8, None)
            .unwrap()
            .is_none());
        let _ = admit(&manual, dir.path(), "run-2", &s, &h, 8, None);
        Approvals::decide(dir.path(), "run-2", Decision::Rejected, "not this study").unwrap();
        let (kind, reason) = declined(admit(&manual, dir.path(), "run-2", &s, &h, 8, None));
        assert_eq!(kind, Declined::Rejected);
        assert!(reason.contains("not this study"), "{reason}");
        let auto = Policy {
            require_approval: true,
            auto_approve_datasets: vec!["bc".into()],
            ..Policy::default()
        };
        assert!(admit(&auto, dir.path(), "run-3", &s, &h, 8, None)
            .unwrap()
            .is_some());
    }

    #[test]
    fn what_the_hospital_names_is_a_run_or_a_spec_hash_and_nothing_else() {
        let mut queue = Approvals::default();
        let h = sha("x");
        assert_eq!(queue.subject(&h).unwrap(), Subject::Spec(h.clone()));
        // A mistyped run id is refused rather than taken for a run name.
        for arg in [h.to_uppercase(), h[1..].to_string(), "sepsis".to_string()] {
            let err = queue.subject(&arg).unwrap_err().to_string();
            assert!(err.contains("--name"), "{err}");
        }
        queue.runs.insert(
            "sepsis".into(),
            Approval {
                name: "other".into(),
                dataset: "bc".into(),
                summary: String::new(),
                decision: Decision::Pending,
                reason: String::new(),
                spec_sha256: h,
                ended: false,
            },
        );
        assert_eq!(
            queue.subject("sepsis").unwrap(),
            Subject::Run("sepsis".into())
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(Approvals::decide(dir.path(), "run-9", Decision::Approved, "").is_err());
        assert!(Approvals::load(dir.path()).unwrap().by_name.is_empty());
    }

    #[test]
    fn a_run_approved_ahead_by_name_is_admitted_and_bound_to_its_spec() {
        let dir = tempfile::tempdir().unwrap();
        let decided = Approvals::decide_name(dir.path(), "r", Decision::Approved, "").unwrap();
        assert_eq!(
            decided,
            Decided::Ahead {
                subject: Subject::Name("r".into()),
                applied: vec![]
            }
        );
        let first = spec_toml("r", "");
        let approved = admit(
            &manual(),
            dir.path(),
            "run-1",
            &spec(""),
            &sha(&first),
            8,
            None,
        )
        .unwrap()
        .expect("approved on arrival");
        assert_eq!(approved.decision, Decision::Approved);
        assert_eq!(approved.spec_sha256, sha(&first));
        assert!(
            approved.reason.contains("any run named `r`"),
            "{approved:?}"
        );
        // The same run later asks with another spec: refused, naming both hashes.
        let changed = spec_toml("r", "[training]\nlocal_epochs = 50\n");
        let (kind, reason) = declined(admit(
            &manual(),
            dir.path(),
            "run-1",
            &spec("[training]\nlocal_epochs = 50\n"),
            &sha(&changed),
            8,
            None,
        ));
        assert_eq!(kind, Declined::Rejected);
        assert!(
            reason.contains("run-1")
                && reason.contains(&sha(&first))
                && reason.contains(&sha(&changed)),
            "{reason}"
        );
        let queue = Approvals::load(dir.path()).unwrap();
        assert_eq!(
            queue.spec_change("run-1", &sha(&changed)),
            Some(SpecChanged {
                run: "run-1".into(),
                name: "r".into(),
                bound: sha(&first),
                new: sha(&changed),
            })
        );
        assert_eq!(
            queue.standing("run-1", &sha(&changed)),
            Some(Decision::Rejected)
        );
        // The approval itself stands for the spec it was bound to.
        assert_eq!(
            queue.standing("run-1", &sha(&first)),
            Some(Decision::Approved)
        );
        assert!(admit(
            &manual(),
            dir.path(),
            "run-1",
            &spec(""),
            &sha(&first),
            8,
            None
        )
        .unwrap()
        .is_none());
        // Another run of that name is approved too (by name), bound to its own spec.
        assert!(admit(
            &manual(),
            dir.path(),
            "run-2",
            &spec(""),
            &sha(&changed),
            8,
            None
        )
        .unwrap()
        .is_some());
    }

    #[test]
    fn a_spec_hash_approves_that_spec_only_and_beats_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let good = sha(&spec_toml("r", ""));
        let other = sha(&spec_toml("r", "seed = 7\n"));
        Approvals::decide_name(dir.path(), "r", Decision::Rejected, "not this study").unwrap();
        let decided = Approvals::decide(dir.path(), &good, Decision::Approved, "").unwrap();
        assert!(matches!(decided, Decided::Ahead { subject: Subject::Spec(h), .. } if h == good));
        assert!(
            admit(&manual(), dir.path(), "run-1", &spec(""), &good, 8, None)
                .unwrap()
                .is_some()
        );
        let (kind, reason) = declined(admit(
            &manual(),
            dir.path(),
            "run-2",
            &spec(""),
            &other,
            8,
            None,
        ));
        assert_eq!(kind, Declined::Rejected);
        assert!(reason.contains("not this study"), "{reason}");
        // A rejection ahead by hash.
        Approvals::decide(dir.path(), &other, Decision::Rejected, "too many epochs").unwrap();
        let (kind, reason) = declined(admit(
            &manual(),
            dir.path(),
            "run-3",
            &spec(""),
            &other,
            8,
            None,
        ));
        assert_eq!(kind, Declined::Rejected);
        assert!(reason.contains("too many epochs"), "{reason}");
        // The policy still applies to runs approved ahead of time.
        let strict = Policy {
            strategies: vec!["median".into()],
            ..manual()
        };
        let (kind, reason) = declined(admit(
            &strict,
            dir.path(),
            "run-4",
            &spec(""),
            &good,
            8,
            None,
        ));
        assert_eq!(kind, Declined::Rejected);
        assert!(reason.contains("policy"), "{reason}");
    }

    #[test]
    fn deciding_ahead_decides_the_runs_already_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let h = sha("spec");
        let _ = admit(&manual(), dir.path(), "run-1", &spec(""), &h, 8, None);
        let _ = admit(
            &manual(),
            dir.path(),
            "run-2",
            &spec(""),
            &sha("other"),
            8,
            None,
        );
        let decided = Approvals::decide(dir.path(), &h, Decision::Approved, "").unwrap();
        assert_eq!(
            decided,
            Decided::Ahead {
                subject: Subject::Spec(h.clone()),
                applied: vec!["run-1".into()]
            }
        );
        let queue = Approvals::load(dir.path()).unwrap();
        assert_eq!(queue.standing("run-1", &h), Some(Decision::Approved));
        assert_eq!(
            queue.standing("run-2", &sha("other")),
            Some(Decision::Pending)
        );
        assert_eq!(queue.standing("run-9", &h), None);
        Approvals::decide_name(dir.path(), "r", Decision::Rejected, "no").unwrap();
        let queue = Approvals::load(dir.path()).unwrap();
        // A decided run keeps its decision; the waiting one gets the rejection.
        assert_eq!(queue.runs["run-1"].decision, Decision::Approved);
        assert_eq!(queue.runs["run-2"].decision, Decision::Rejected);
        assert_eq!(queue.runs["run-2"].reason, "no");
    }

    #[test]
    fn queues_written_before_spec_binding_still_load_and_bind_at_the_next_task() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("approvals.json"),
            r#"{"runs":{"run-1":{"name":"r","dataset":"bc","summary":"s","decision":"approved"}}}"#,
        )
        .unwrap();
        let h = sha("spec");
        assert!(
            admit(&manual(), dir.path(), "run-1", &spec(""), &h, 8, None)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            Approvals::load(dir.path()).unwrap().runs["run-1"].spec_sha256,
            h
        );
        assert!(admit(
            &manual(),
            dir.path(),
            "run-1",
            &spec(""),
            &sha("x"),
            8,
            None
        )
        .is_err());
    }
}
