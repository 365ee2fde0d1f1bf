//! How the read messages' enum fields appear in JSON: by name (`"completed"`, `"refused"`)
//! rather than by wire number. A number this build does not know stays a number.

use serde::Serializer;

use crate::v1::{RunStatus, SiteOutcome};

/// `RUN_STATUS_COMPLETED` as `completed`.
pub fn run_status<S: Serializer>(value: &i32, out: S) -> Result<S::Ok, S::Error> {
    match RunStatus::try_from(*value) {
        Ok(status) => out.serialize_str(&short(status.as_str_name(), "RUN_STATUS_")),
        Err(_) => out.serialize_i32(*value),
    }
}

/// `SITE_OUTCOME_REFUSED` as `refused`.
pub fn site_outcome<S: Serializer>(value: &i32, out: S) -> Result<S::Ok, S::Error> {
    match SiteOutcome::try_from(*value) {
        Ok(outcome) => out.serialize_str(&short(outcome.as_str_name(), "SITE_OUTCOME_")),
        Err(_) => out.serialize_i32(*value),
    }
}

fn short(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

#[cfg(test)]
mod tests {
    use crate::v1::{RunSummary, SiteRoundResult};

    #[test]
    fn enums_are_written_by_name() {
        let run = RunSummary {
            status: crate::v1::RunStatus::BudgetExhausted as i32,
            ..RunSummary::default()
        };
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(json["status"], "budget_exhausted");
        let site = SiteRoundResult {
            outcome: 99,
            ..SiteRoundResult::default()
        };
        assert_eq!(serde_json::to_value(&site).unwrap()["outcome"], 99);
    }
}
