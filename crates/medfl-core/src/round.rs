//! The round state machine: which sites were asked, which answered, and when the round closes.
//!
//! A round has two phases. In `Train`, selected sites push updates; the phase closes when every
//! selected site has answered, or at the deadline if at least `min_sites` reported; with fewer it
//! is retried (a new attempt), and after `max_retries` retries the run fails. In `Evaluate`, the
//! same sites score the new global model; it closes when all answered or at its deadline.
//!
//! A site whose hospital has the run in its approval queue is *awaiting*: it is not handed the
//! task again, but it keeps its place until the deadline, so an approval given meanwhile still
//! counts, and a waiting site never makes the round give up early.

use std::collections::{BTreeMap, BTreeSet};

/// Where a round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before round 1 of a run with federated standardisation: sites send their feature sums.
    Statistics,
    /// Sites train and push updates.
    Train,
    /// Sites evaluate the aggregated model.
    Evaluate,
}

impl Phase {
    /// Lower-case name, as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Statistics => "statistics",
            Phase::Train => "train",
            Phase::Evaluate => "evaluate",
        }
    }
}

/// Why a result was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The result is for another round or attempt than the open one.
    #[error("round {round} attempt {attempt} is not open (open: round {open_round} attempt {open_attempt})")]
    NotOpen {
        /// Round named by the site.
        round: u32,
        /// Attempt named by the site.
        attempt: u32,
        /// Round currently open.
        open_round: u32,
        /// Attempt currently open.
        open_attempt: u32,
    },
    /// The phase that accepts this kind of result is over.
    #[error("round {round} is in its {phase} phase")]
    WrongPhase {
        /// Round.
        round: u32,
        /// Current phase.
        phase: &'static str,
    },
    /// The site was not selected for this round.
    #[error("site `{site}` was not selected for round {round}")]
    NotSelected {
        /// Site.
        site: String,
        /// Round.
        round: u32,
    },
    /// The site already answered.
    #[error("site `{site}` already reported for round {round}")]
    Duplicate {
        /// Site.
        site: String,
        /// Round.
        round: u32,
    },
    /// The deadline has passed.
    #[error("round {round} closed at its deadline; result from `{site}` is late")]
    Late {
        /// Site.
        site: String,
        /// Round.
        round: u32,
    },
}

/// What the engine should do next with a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep waiting until at most this time (ms since the epoch).
    Wait {
        /// Deadline.
        until_ms: u64,
    },
    /// Enough updates: aggregate them (train phase) or finish the round (evaluate phase).
    Close {
        /// Selected sites that did not report.
        missing: Vec<String>,
    },
    /// Too few updates by the deadline: start a new attempt.
    Retry {
        /// Selected sites that did not report.
        missing: Vec<String>,
    },
    /// Too few updates and no retries left.
    Fail {
        /// Selected sites that did not report.
        missing: Vec<String>,
    },
}

/// Limits a round runs under.
#[derive(Debug, Clone, Copy)]
pub struct RoundLimits {
    /// Fewest updates that make a round.
    pub min_sites: usize,
    /// How long each phase may take, in milliseconds.
    pub deadline_ms: u64,
    /// Attempts after the first before the run fails.
    pub max_retries: u32,
}

/// One attempt at one round.
#[derive(Debug, Clone)]
pub struct RoundState {
    /// Round number, from 1.
    pub round: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Current phase.
    pub phase: Phase,
    /// Sites asked to take part.
    pub selected: BTreeSet<String>,
    /// Sites whose update (or, in the statistics phase, statistics) was accepted, with their
    /// example counts.
    pub updates: BTreeMap<String, u64>,
    /// Sites that said they cannot do the train task, with their reasons.
    pub failures: BTreeMap<String, String>,
    /// Sites awaiting their hospital's approval, with the reasons they gave: they hold their
    /// place until the deadline and may still send an update.
    pub awaiting: BTreeMap<String, String>,
    /// Sites that reported an evaluation.
    pub evaluated: BTreeSet<String>,
    /// When the current phase closes (ms since the epoch).
    pub deadline_ms: u64,
    limits: RoundLimits,
}

impl RoundState {
    /// Opens the train phase of an attempt.
    pub fn start(
        round: u32,
        attempt: u32,
        selected: impl IntoIterator<Item = String>,
        now_ms: u64,
        limits: RoundLimits,
    ) -> Self {
        Self {
            round,
            attempt,
            phase: Phase::Train,
            selected: selected.into_iter().collect(),
            updates: BTreeMap::new(),
            failures: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            evaluated: BTreeSet::new(),
            deadline_ms: now_ms.saturating_add(limits.deadline_ms),
            limits,
        }
    }

    /// Checks whether an update from `site` for `round`/`attempt` may be accepted now.
    pub fn admit_update(
        &self,
        site: &str,
        round: u32,
        attempt: u32,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        self.admit_once(site, round, attempt, now_ms, Phase::Train)
    }

    /// Checks whether statistics from `site` for `round`/`attempt` may be accepted now.
    pub fn admit_statistics(
        &self,
        site: &str,
        round: u32,
        attempt: u32,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        self.admit_once(site, round, attempt, now_ms, Phase::Statistics)
    }

    /// [`Self::admit`], and the site has neither answered nor failed in this attempt.
    fn admit_once(
        &self,
        site: &str,
        round: u32,
        attempt: u32,
        now_ms: u64,
        phase: Phase,
    ) -> Result<(), Refusal> {
        self.admit(site, round, attempt, now_ms, phase)?;
        if self.updates.contains_key(site) || self.failures.contains_key(site) {
            return Err(Refusal::Duplicate {
                site: site.into(),
                round,
            });
        }
        Ok(())
    }

    /// Records an accepted update (or statistics). Call [`Self::admit_update`] first.
    pub fn record_update(&mut self, site: &str, examples: u64) {
        self.awaiting.remove(site);
        self.updates.insert(site.into(), examples);
    }

    /// Records that `site` cannot do the train task.
    pub fn record_failure(&mut self, site: &str, reason: String) {
        if self.selected.contains(site) && !self.updates.contains_key(site) {
            self.awaiting.remove(site);
            self.failures.insert(site.into(), reason);
        }
    }

    /// Records that `site` waits for its hospital's approval: it is not handed the task again
    /// in this attempt but keeps its place until the deadline.
    pub fn record_awaiting(&mut self, site: &str, reason: String) {
        if self.is_pending(site) {
            self.awaiting.insert(site.into(), reason);
        }
    }

    /// Whether `site` still owes this phase a result: pending, or awaiting approval.
    pub fn owes(&self, site: &str) -> bool {
        self.is_pending(site) || (self.phase != Phase::Evaluate && self.awaiting.contains_key(site))
    }

    /// Checks whether an evaluation from `site` for `round` may be accepted now.
    pub fn admit_evaluation(&self, site: &str, round: u32, now_ms: u64) -> Result<(), Refusal> {
        self.admit(site, round, self.attempt, now_ms, Phase::Evaluate)?;
        if self.evaluated.contains(site) {
            return Err(Refusal::Duplicate {
                site: site.into(),
                round,
            });
        }
        Ok(())
    }

    /// Records an accepted evaluation.
    pub fn record_evaluation(&mut self, site: &str) {
        self.evaluated.insert(site.into());
    }

    fn admit(
        &self,
        site: &str,
        round: u32,
        attempt: u32,
        now_ms: u64,
        phase: Phase,
    ) -> Result<(), Refusal> {
        if round != self.round || attempt != self.attempt {
            return Err(Refusal::NotOpen {
                round,
                attempt,
                open_round: self.round,
                open_attempt: self.attempt,
            });
        }
        if self.phase != phase {
            return Err(Refusal::WrongPhase {
                round,
                phase: self.phase.as_str(),
            });
        }
        if !self.selected.contains(site) {
            return Err(Refusal::NotSelected {
                site: site.into(),
                round,
            });
        }
        if now_ms >= self.deadline_ms {
            return Err(Refusal::Late {
                site: site.into(),
                round,
            });
        }
        Ok(())
    }

    /// Sites selected but not yet answered in the current phase, and not awaiting approval:
    /// the sites to hand the phase's task.
    pub fn pending(&self) -> Vec<String> {
        self.selected
            .iter()
            .filter(|s| match self.phase {
                Phase::Statistics | Phase::Train => {
                    !self.updates.contains_key(*s)
                        && !self.failures.contains_key(*s)
                        && !self.awaiting.contains_key(*s)
                }
                Phase::Evaluate => !self.evaluated.contains(*s),
            })
            .cloned()
            .collect()
    }

    /// Whether `site` still owes a result in the current phase.
    pub fn is_pending(&self, site: &str) -> bool {
        self.selected.contains(site)
            && match self.phase {
                Phase::Statistics | Phase::Train => {
                    !self.updates.contains_key(site)
                        && !self.failures.contains_key(site)
                        && !self.awaiting.contains_key(site)
                }
                Phase::Evaluate => !self.evaluated.contains(site),
            }
    }

    /// What to do now.
    pub fn decide(&self, now_ms: u64) -> Decision {
        let pending = self.pending();
        let waiting_for_approval = self.phase != Phase::Evaluate && !self.awaiting.is_empty();
        let everyone_answered = pending.is_empty() && !waiting_for_approval;
        if !everyone_answered && now_ms < self.deadline_ms {
            return Decision::Wait {
                until_ms: self.deadline_ms,
            };
        }
        let missing: Vec<String> = self
            .selected
            .iter()
            .filter(|s| !self.updates.contains_key(*s))
            .cloned()
            .collect();
        match self.phase {
            Phase::Evaluate => Decision::Close { missing: pending },
            // `min_sites` 0 (client-level DP's Poisson sampling) commits even without updates.
            Phase::Statistics | Phase::Train if self.updates.len() >= self.limits.min_sites => {
                Decision::Close { missing }
            }
            Phase::Statistics | Phase::Train if self.attempt <= self.limits.max_retries => {
                Decision::Retry { missing }
            }
            Phase::Statistics | Phase::Train => Decision::Fail { missing },
        }
    }

    /// Moves to the evaluate phase after aggregation.
    pub fn begin_evaluation(&mut self, now_ms: u64) {
        self.phase = Phase::Evaluate;
        // Only sites that trained are asked to evaluate: the others may be gone.
        self.selected = self.updates.keys().cloned().collect();
        self.deadline_ms = now_ms.saturating_add(self.limits.deadline_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RoundLimits = RoundLimits {
        min_sites: 2,
        deadline_ms: 1_000,
        max_retries: 1,
    };

    fn round(attempt: u32) -> RoundState {
        RoundState::start(
            3,
            attempt,
            ["a", "b", "c"].map(String::from),
            10_000,
            LIMITS,
        )
    }

    #[test]
    fn closes_early_when_everyone_reported() {
        let mut r = round(1);
        for s in ["a", "b", "c"] {
            r.admit_update(s, 3, 1, 10_100).unwrap();
            r.record_update(s, 10);
        }
        assert_eq!(r.decide(10_200), Decision::Close { missing: vec![] });
    }

    #[test]
    fn waits_then_closes_at_deadline_with_min_sites() {
        let mut r = round(1);
        r.record_update("a", 10);
        r.record_update("c", 5);
        assert_eq!(r.decide(10_500), Decision::Wait { until_ms: 11_000 });
        assert_eq!(
            r.decide(11_000),
            Decision::Close {
                missing: vec!["b".into()]
            }
        );
        assert!(matches!(
            r.admit_update("b", 3, 1, 11_000),
            Err(Refusal::Late { .. })
        ));
    }

    #[test]
    fn retries_then_fails_naming_missing_sites() {
        let mut r = round(1);
        r.record_update("a", 10);
        assert!(matches!(r.decide(11_000), Decision::Retry { .. }));
        let mut r = round(2);
        r.record_update("a", 10);
        assert_eq!(
            r.decide(11_000),
            Decision::Fail {
                missing: vec!["b".into(), "c".into()]
            }
        );
    }

    #[test]
    fn failures_count_as_answers_but_not_updates() {
        let mut r = round(1);
        r.record_update("a", 10);
        r.record_failure("b", "bad data".into());
        r.record_failure("c", "bad data".into());
        // Everyone answered, but only one update: no point waiting for the deadline.
        assert!(matches!(r.decide(10_001), Decision::Retry { .. }));
    }

    #[test]
    fn a_site_awaiting_approval_holds_its_place_until_the_deadline() {
        let mut r = round(1);
        r.record_update("a", 10);
        r.record_failure("c", "bad data".into());
        r.record_awaiting("b", "awaits approval".into());
        // Not handed the task again, but the round waits for it rather than retrying now.
        assert!(r.pending().is_empty() && r.owes("b"));
        assert_eq!(r.decide(10_001), Decision::Wait { until_ms: 11_000 });
        // Approved in time: its update counts and the round closes at once.
        r.admit_update("b", 3, 1, 10_500).unwrap();
        r.record_update("b", 7);
        assert_eq!(
            r.decide(10_501),
            Decision::Close {
                missing: vec!["c".into()]
            }
        );
        // Never approved: at the deadline the round closes with whoever reported, if enough.
        let mut r = round(1);
        r.record_update("a", 10);
        r.record_update("c", 10);
        r.record_awaiting("b", "awaits approval".into());
        assert_eq!(r.decide(10_999), Decision::Wait { until_ms: 11_000 });
        assert_eq!(
            r.decide(11_000),
            Decision::Close {
                missing: vec!["b".into()]
            }
        );
    }

    #[test]
    fn refuses_duplicates_strangers_and_stale_attempts() {
        let mut r = round(2);
        r.admit_update("a", 3, 2, 10_001).unwrap();
        r.record_update("a", 1);
        assert!(matches!(
            r.admit_update("a", 3, 2, 10_002),
            Err(Refusal::Duplicate { .. })
        ));
        assert!(matches!(
            r.admit_update("z", 3, 2, 10_002),
            Err(Refusal::NotSelected { .. })
        ));
        assert!(matches!(
            r.admit_update("b", 3, 1, 10_002),
            Err(Refusal::NotOpen { .. })
        ));
        assert!(matches!(
            r.admit_update("b", 2, 2, 10_002),
            Err(Refusal::NotOpen { .. })
        ));
    }

    #[test]
    fn evaluation_phase_asks_only_sites_that_trained() {
        let mut r = round(1);
        r.record_update("a", 10);
        r.record_update("b", 10);
        assert!(matches!(
            r.admit_evaluation("a", 3, 10_001),
            Err(Refusal::WrongPhase { .. })
        ));
        r.begin_evaluation(20_000);
        assert!(matches!(
            r.admit_update("c", 3, 1, 20_001),
            Err(Refusal::WrongPhase { .. })
        ));
        assert!(matches!(
            r.admit_evaluation("c", 3, 20_001),
            Err(Refusal::NotSelected { .. })
        ));
        r.admit_evaluation("a", 3, 20_001).unwrap();
        r.record_evaluation("a");
        assert_eq!(r.decide(20_002), Decision::Wait { until_ms: 21_000 });
        r.record_evaluation("b");
        assert_eq!(r.decide(20_003), Decision::Close { missing: vec![] });
    }
}
