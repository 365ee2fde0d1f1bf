//! Conversions between wire types and domain types, and the metadata that carries identity.

use medfl_core::run::{RunStatus, SiteOutcome};
use medfl_core::signing::{TaskClaim, UpdateClaim};
use medfl_core::spec::DatasetInfo;

use crate::v1;

/// Metadata key carrying the calling site's name.
pub const SITE_METADATA: &str = "x-medfl-site";
/// Metadata key carrying the calling site's secret token.
pub const TOKEN_METADATA: &str = "x-medfl-token";

/// What `site` signs for the update `header` describes.
pub fn update_claim<'a>(header: &'a v1::UpdateHeader, site: &'a str) -> UpdateClaim<'a> {
    UpdateClaim {
        run_id: &header.run_id,
        round: header.round,
        attempt: header.attempt,
        base_sha256: &header.base_sha256,
        update_sha256: &header.sha256,
        examples: header.num_examples,
        site,
        privacy_epsilon: header.privacy_epsilon,
        clip_indicator: header.clip_indicator,
    }
}

/// What the coordinator signs for `task`.
pub fn task_claim(task: &v1::Task) -> TaskClaim<'_> {
    TaskClaim {
        run_id: &task.run_id,
        round: task.round,
        attempt: task.attempt,
        kind: task.kind,
        global_sha256: &task.global_sha256,
        global_size: task.global_size,
        spec_sha256: spec_sha256(&task.spec_toml),
        deadline_unix_ms: task.deadline_unix_ms,
        client_dp: task.clip_norm.zip(task.expected_sites),
        standardization: task.standardization.as_deref(),
    }
}

/// Lowercase hex SHA-256 of a run spec's text, as tasks sign it and sites bind approvals to it.
pub fn spec_sha256(spec_toml: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spec_toml.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl From<DatasetInfo> for v1::DatasetSchema {
    fn from(d: DatasetInfo) -> Self {
        Self {
            name: d.name,
            columns: d.columns,
            rows: 0,
            class_counts: Default::default(),
        }
    }
}

impl From<v1::DatasetSchema> for DatasetInfo {
    fn from(d: v1::DatasetSchema) -> Self {
        Self {
            name: d.name,
            columns: d.columns,
        }
    }
}

impl From<SiteOutcome> for v1::SiteOutcome {
    fn from(o: SiteOutcome) -> Self {
        match o {
            SiteOutcome::Accepted => v1::SiteOutcome::Accepted,
            SiteOutcome::Refused => v1::SiteOutcome::Refused,
            SiteOutcome::Missing => v1::SiteOutcome::Missing,
            SiteOutcome::Failed => v1::SiteOutcome::Failed,
            SiteOutcome::Pending => v1::SiteOutcome::Pending,
            SiteOutcome::Rejected => v1::SiteOutcome::Rejected,
            SiteOutcome::Paused => v1::SiteOutcome::Paused,
            SiteOutcome::BudgetExhausted => v1::SiteOutcome::BudgetExhausted,
        }
    }
}

/// The core outcome of a wire code; `None` for unspecified or unknown codes.
pub fn site_outcome(code: i32) -> Option<SiteOutcome> {
    Some(match v1::SiteOutcome::try_from(code).ok()? {
        v1::SiteOutcome::Unspecified => return None,
        v1::SiteOutcome::Accepted => SiteOutcome::Accepted,
        v1::SiteOutcome::Refused => SiteOutcome::Refused,
        v1::SiteOutcome::Missing => SiteOutcome::Missing,
        v1::SiteOutcome::Failed => SiteOutcome::Failed,
        v1::SiteOutcome::Pending => SiteOutcome::Pending,
        v1::SiteOutcome::Rejected => SiteOutcome::Rejected,
        v1::SiteOutcome::Paused => SiteOutcome::Paused,
        v1::SiteOutcome::BudgetExhausted => SiteOutcome::BudgetExhausted,
    })
}

/// The outcome a site's failure report stands for.
pub fn declined_outcome(code: i32) -> SiteOutcome {
    match v1::Declined::try_from(code) {
        Ok(v1::Declined::PendingApproval) => SiteOutcome::Pending,
        Ok(v1::Declined::Rejected) => SiteOutcome::Rejected,
        Ok(v1::Declined::Paused) => SiteOutcome::Paused,
        Ok(v1::Declined::BudgetExhausted) => SiteOutcome::BudgetExhausted,
        _ => SiteOutcome::Failed,
    }
}

impl From<RunStatus> for v1::RunStatus {
    fn from(s: RunStatus) -> Self {
        match s {
            RunStatus::Running => v1::RunStatus::Running,
            RunStatus::Completed => v1::RunStatus::Completed,
            RunStatus::Failed => v1::RunStatus::Failed,
            RunStatus::Stopped => v1::RunStatus::Stopped,
            RunStatus::BudgetExhausted => v1::RunStatus::BudgetExhausted,
        }
    }
}

/// The domain status of a wire status code; `None` for unknown or unspecified codes.
pub fn run_status(code: i32) -> Option<RunStatus> {
    match v1::RunStatus::try_from(code).ok()? {
        v1::RunStatus::Running => Some(RunStatus::Running),
        v1::RunStatus::Completed => Some(RunStatus::Completed),
        v1::RunStatus::Failed => Some(RunStatus::Failed),
        v1::RunStatus::Stopped => Some(RunStatus::Stopped),
        v1::RunStatus::BudgetExhausted => Some(RunStatus::BudgetExhausted),
        v1::RunStatus::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        for s in [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Stopped,
            RunStatus::BudgetExhausted,
        ] {
            assert_eq!(run_status(v1::RunStatus::from(s) as i32), Some(s));
        }
        assert_eq!(run_status(0), None);
        assert_eq!(run_status(99), None);
    }
}
