//! Conversions between wire types and domain types, and the metadata that carries identity.

use medfl_core::run::RunStatus;
use medfl_core::spec::DatasetInfo;

use crate::v1;

/// Metadata key carrying the calling site's name.
pub const SITE_METADATA: &str = "x-medfl-site";
/// Metadata key carrying the calling site's secret token.
pub const TOKEN_METADATA: &str = "x-medfl-token";

impl From<DatasetInfo> for v1::DatasetSchema {
    fn from(d: DatasetInfo) -> Self {
        Self {
            name: d.name,
            columns: d.columns,
            rows: 0,
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

impl From<RunStatus> for v1::RunStatus {
    fn from(s: RunStatus) -> Self {
        match s {
            RunStatus::Running => v1::RunStatus::Running,
            RunStatus::Completed => v1::RunStatus::Completed,
            RunStatus::Failed => v1::RunStatus::Failed,
            RunStatus::Stopped => v1::RunStatus::Stopped,
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
        ] {
            assert_eq!(run_status(v1::RunStatus::from(s) as i32), Some(s));
        }
        assert_eq!(run_status(0), None);
        assert_eq!(run_status(99), None);
    }
}
