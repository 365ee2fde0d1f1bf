//! The hospital decides what trains on its data: a policy (part of the site config) that every
//! run must satisfy, and a queue of runs awaiting the hospital's approval, kept in
//! `data_dir/approvals.json` so `medfl-site runs approve` works while the daemon runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medfl_core::spec::RunSpec;
use serde::{Deserialize, Serialize};

use crate::SiteError;

/// What runs may train here. Empty lists and zero limits allow anything.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Base models (SHA-256 of their weights) text runs may adapt.
    pub base_models: Vec<String>,
    /// Task kinds: `tabular_classification`, `text_classification`.
    pub task_kinds: Vec<String>,
    /// Strategies, by their `[strategy] name`.
    pub strategies: Vec<String>,
    /// Most local epochs a round may ask for.
    pub max_local_epochs: u32,
    /// Most local steps a round may ask for.
    pub max_local_steps: u32,
    /// Largest update this site sends, in bytes (4 per trainable parameter).
    pub max_update_bytes: u64,
    /// Every new run waits in the queue until approved (`medfl-site runs approve RUN`).
    pub require_approval: bool,
    /// Runs on these datasets are approved without waiting.
    pub auto_approve_datasets: Vec<String>,
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
                "{} local epochs exceed this site's limit of {}",
                t.local_epochs, self.max_local_epochs
            ));
        }
        if self.max_local_steps > 0 && t.local_steps > self.max_local_steps {
            return Some(format!(
                "{} local steps exceed this site's limit of {}",
                t.local_steps, self.max_local_steps
            ));
        }
        if self.max_update_bytes > 0 && update_bytes > self.max_update_bytes {
            return Some(format!(
                "updates of {update_bytes} bytes exceed this site's limit of {}",
                self.max_update_bytes
            ));
        }
        None
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
    /// Why it was rejected.
    #[serde(default)]
    pub reason: String,
}

/// The approval queue in `data_dir/approvals.json`, by run id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Approvals {
    /// Every run the site has seen.
    pub runs: BTreeMap<String, Approval>,
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

    /// Writes the queue atomically.
    pub fn save(&self, data_dir: &Path) -> Result<(), SiteError> {
        let path = Self::path(data_dir);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| SiteError::Config(format!("approvals: {e}")))?;
        medfl_daemon::write_private(&path, text.as_bytes())
            .map_err(|e| SiteError::io(format!("writing {}", path.display()), e))
    }

    /// Records the hospital's decision on `run`.
    pub fn decide(
        data_dir: &Path,
        run: &str,
        decision: Decision,
        reason: &str,
    ) -> Result<Approval, SiteError> {
        let mut queue = Self::load(data_dir)?;
        let entry = queue.runs.get_mut(run).ok_or_else(|| {
            SiteError::Config(format!(
                "run `{run}` has not reached this site (see `medfl-site runs pending`)"
            ))
        })?;
        entry.decision = decision;
        entry.reason = reason.to_string();
        let entry = entry.clone();
        queue.save(data_dir)?;
        Ok(entry)
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

/// Whether `run` (spec `spec`, update of `update_bytes`) may train at the site in `data_dir`
/// under `policy`: a run outside the policy is rejected for good; one needing approval is queued
/// and waits. Returns the event to audit when the queue changed.
pub fn admit(
    policy: &Policy,
    data_dir: &Path,
    run: &str,
    spec: &RunSpec,
    update_bytes: u64,
) -> Result<Option<Approval>, SiteError> {
    let mut queue = Approvals::load(data_dir)?;
    if let Some(a) = queue.runs.get(run) {
        return match a.decision {
            Decision::Approved => Ok(None),
            Decision::Pending => Err(Declined::PendingApproval.because(format!(
                "run `{}` awaits the hospital's approval (medfl-site runs approve {run})",
                a.name
            ))),
            Decision::Rejected => {
                Err(Declined::Rejected.because(format!("rejected by the hospital: {}", a.reason)))
            }
        };
    }
    let violation = policy.violation(spec, update_bytes);
    let decision = match (&violation, policy.auto_approves(spec)) {
        (Some(_), _) => Decision::Rejected,
        (None, true) => Decision::Approved,
        (None, false) => Decision::Pending,
    };
    let summary = format!(
        "{} on `{}` with {}",
        spec.task.kind(),
        spec.task.dataset,
        match spec.encoder() {
            Some(e) => format!("base `{}` ({})", e.base, e.base_sha256),
            None => "a model trained from scratch".into(),
        }
    );
    let entry = Approval {
        name: spec.name.clone(),
        dataset: spec.task.dataset.clone(),
        summary,
        decision,
        reason: violation
            .as_ref()
            .map(|v| format!("policy: {v}"))
            .unwrap_or_default(),
    };
    queue.runs.insert(run.to_string(), entry.clone());
    queue.save(data_dir)?;
    match decision {
        Decision::Approved => Ok(Some(entry)),
        Decision::Pending => Err(Declined::PendingApproval.because(format!(
            "run `{}` awaits the hospital's approval (medfl-site runs approve {run})",
            spec.name
        ))),
        Decision::Rejected => Err(Declined::Rejected.because(format!(
            "rejected by the site's policy: {}",
            violation.unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> RunSpec {
        RunSpec::from_toml(&format!(
            "name = \"r\"\nrounds = 1\n[model]\nkind = \"mlp\"\n[task]\ndataset = \"bc\"\n\
             features = [\"a\"]\nlabel = \"y\"\nlabels = [\"0\", \"1\"]\n{extra}"
        ))
        .unwrap()
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
    fn runs_wait_for_approval_and_decisions_stick() {
        let dir = tempfile::tempdir().unwrap();
        let manual = Policy {
            require_approval: true,
            ..Policy::default()
        };
        let s = spec("");
        let err = admit(&manual, dir.path(), "run-1", &s, 8).unwrap_err();
        assert!(
            matches!(&err, SiteError::Declined { kind: Declined::PendingApproval, reason }
                if reason.contains("awaits")),
            "{err}"
        );
        let err = admit(&manual, dir.path(), "run-1", &s, 8).unwrap_err();
        assert!(
            matches!(&err, SiteError::Declined { kind: Declined::PendingApproval, reason }
                if reason.contains("awaits")),
            "{err}"
        );
        Approvals::decide(dir.path(), "run-1", Decision::Approved, "").unwrap();
        assert!(admit(&manual, dir.path(), "run-1", &s, 8)
            .unwrap()
            .is_none());
        let _ = admit(&manual, dir.path(), "run-2", &s, 8);
        Approvals::decide(dir.path(), "run-2", Decision::Rejected, "not this study").unwrap();
        let err = admit(&manual, dir.path(), "run-2", &s, 8).unwrap_err();
        assert!(
            matches!(&err, SiteError::Declined { kind: Declined::Rejected, reason }
                if reason.contains("not this study")),
            "{err}"
        );
        assert!(Approvals::decide(dir.path(), "run-9", Decision::Approved, "").is_err());
        let auto = Policy {
            require_approval: true,
            auto_approve_datasets: vec!["bc".into()],
            ..Policy::default()
        };
        assert!(admit(&auto, dir.path(), "run-3", &s, 8).unwrap().is_some());
    }
}
