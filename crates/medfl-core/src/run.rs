//! The lifecycle of a run.

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Rounds are in progress.
    Running,
    /// Every round finished.
    Completed,
    /// The run gave up (too few sites after all retries, a broken model).
    Failed,
    /// A researcher stopped it.
    Stopped,
    /// Its client-level DP target ε allowed no more rounds.
    BudgetExhausted,
}

impl RunStatus {
    /// The lower-case name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
            RunStatus::BudgetExhausted => "budget_exhausted",
        }
    }

    /// Parses [`Self::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "stopped" => RunStatus::Stopped,
            "budget_exhausted" => RunStatus::BudgetExhausted,
            _ => return None,
        })
    }

    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        self != RunStatus::Running
    }
}

/// What came of one site in one attempt of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SiteOutcome {
    /// Its update was folded into the round.
    Accepted,
    /// Its update was refused (late, duplicate, bad signature, over the norm bound).
    Refused,
    /// It was selected but sent nothing before the deadline.
    Missing,
    /// It tried and could not do the task (bad data, a broken model).
    Failed,
    /// Its hospital has the run in the approval queue.
    Pending,
    /// Its hospital's policy or staff rejected the run.
    Rejected,
    /// Its hospital paused the site.
    Paused,
    /// Another round would take the site's ε for the run past the run's target, or one of its
    /// datasets past the hospital's budget.
    BudgetExhausted,
}

impl SiteOutcome {
    /// Every outcome, in order.
    pub const ALL: [SiteOutcome; 8] = [
        SiteOutcome::Accepted,
        SiteOutcome::Refused,
        SiteOutcome::Missing,
        SiteOutcome::Failed,
        SiteOutcome::Pending,
        SiteOutcome::Rejected,
        SiteOutcome::Paused,
        SiteOutcome::BudgetExhausted,
    ];

    /// The lower-case name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteOutcome::Accepted => "accepted",
            SiteOutcome::Refused => "refused",
            SiteOutcome::Missing => "missing",
            SiteOutcome::Failed => "failed",
            SiteOutcome::Pending => "pending",
            SiteOutcome::Rejected => "rejected",
            SiteOutcome::Paused => "paused",
            SiteOutcome::BudgetExhausted => "budget_exhausted",
        }
    }

    /// Parses [`Self::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the site's hospital, not a fault, kept the run out.
    pub fn is_declined(self) -> bool {
        matches!(
            self,
            SiteOutcome::Pending
                | SiteOutcome::Rejected
                | SiteOutcome::Paused
                | SiteOutcome::BudgetExhausted
        )
    }
}

impl std::fmt::Display for SiteOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip() {
        for o in SiteOutcome::ALL {
            assert_eq!(SiteOutcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(SiteOutcome::parse("Accepted"), None);
    }

    #[test]
    fn names_round_trip() {
        for s in [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Stopped,
            RunStatus::BudgetExhausted,
        ] {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(RunStatus::parse("bogus"), None);
    }
}
