//! The exact bytes a site signs for an update and the coordinator signs for a task, so both
//! sides build them the same way. Each names what it is for (a version tag), and every field
//! that gives it meaning: a signature from one run, round or attempt never verifies for another,
//! which is what refuses a replayed update.

/// What a site signs when it sends an update.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateClaim<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The round.
    pub round: u32,
    /// The attempt at the round.
    pub attempt: u32,
    /// SHA-256 of the global model the update was trained from.
    pub base_sha256: &'a str,
    /// SHA-256 of the update's bytes.
    pub update_sha256: &'a str,
    /// Examples claimed (the FedAvg weight).
    pub examples: u64,
    /// The site sending it.
    pub site: &'a str,
    /// The record-level ε the site reports having spent on the run (DP-SGD only).
    pub privacy_epsilon: Option<f64>,
    /// The site's "within the clip" indicator (client-level DP with adaptive clipping only).
    pub clip_indicator: Option<f64>,
}

/// What the coordinator signs when it hands out a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskClaim<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The round (0 for a cross-site evaluation).
    pub round: u32,
    /// The attempt.
    pub attempt: u32,
    /// The task kind's wire number.
    pub kind: i32,
    /// SHA-256 of the global model to train or evaluate.
    pub global_sha256: &'a str,
    /// Its size in bytes: the site never reads more.
    pub global_size: u64,
    /// SHA-256 (hex) of the run spec the task carries: a coordinator cannot change an admitted
    /// or approved run's spec under the same signature.
    pub spec_sha256: String,
    /// When the task's phase closes (ms since the Unix epoch).
    pub deadline_unix_ms: u64,
    /// Client-level DP: the round's clipping norm and expected number of sampled sites, which
    /// set the noise a site adds; signed so that nobody between can shrink it.
    pub client_dp: Option<(f64, f64)>,
    /// Federated standardisation: the federation's feature statistics (JSON) every site
    /// standardises with; signed so that nobody between can shift a site's inputs.
    pub standardization: Option<&'a str>,
}

fn join(tag: &str, fields: &[&str]) -> Vec<u8> {
    // NUL cannot occur in names, ids or hex hashes, so the fields cannot run into each other.
    let mut out = tag.as_bytes().to_vec();
    for f in fields {
        out.push(0);
        out.extend_from_slice(f.as_bytes());
    }
    out
}

impl UpdateClaim<'_> {
    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        let mut fields = vec![
            self.run_id.to_string(),
            self.round.to_string(),
            self.attempt.to_string(),
            self.base_sha256.to_string(),
            self.update_sha256.to_string(),
            self.examples.to_string(),
            self.site.to_string(),
        ];
        // What a site reports about privacy is its word too; tagged, as either may be absent.
        if let Some(e) = self.privacy_epsilon {
            fields.push(format!("privacy_epsilon={:016x}", e.to_bits()));
        }
        if let Some(b) = self.clip_indicator {
            fields.push(format!("clip_indicator={:016x}", b.to_bits()));
        }
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        join("medfl/update/v1", &fields)
    }
}

impl TaskClaim<'_> {
    /// The signed bytes.
    pub fn message(&self) -> Vec<u8> {
        let mut fields = vec![
            self.run_id.to_string(),
            self.round.to_string(),
            self.attempt.to_string(),
            self.kind.to_string(),
            self.global_sha256.to_string(),
            self.global_size.to_string(),
            self.spec_sha256.clone(),
            self.deadline_unix_ms.to_string(),
        ];
        // Exact bits: a decimal rendering could round two different values alike.
        if let Some((clip, expected)) = self.client_dp {
            fields.push(format!("{:016x}", clip.to_bits()));
            fields.push(format!("{:016x}", expected.to_bits()));
        }
        // Tagged: tasks without statistics sign the same bytes as before.
        if let Some(s) = self.standardization {
            fields.push(format!("standardization={s}"));
        }
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        join("medfl/task/v2", &fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_message() {
        let base = UpdateClaim {
            run_id: "r",
            round: 2,
            attempt: 1,
            base_sha256: "aa",
            update_sha256: "bb",
            examples: 10,
            site: "s",
            privacy_epsilon: None,
            clip_indicator: None,
        };
        let m = base.message();
        let variants = [
            UpdateClaim {
                run_id: "r2",
                ..base.clone()
            },
            UpdateClaim {
                round: 1,
                ..base.clone()
            },
            UpdateClaim {
                attempt: 2,
                ..base.clone()
            },
            UpdateClaim {
                base_sha256: "ab",
                ..base.clone()
            },
            UpdateClaim {
                update_sha256: "bc",
                ..base.clone()
            },
            UpdateClaim {
                examples: 11,
                ..base.clone()
            },
            UpdateClaim {
                site: "t",
                ..base.clone()
            },
            UpdateClaim {
                privacy_epsilon: Some(1.5),
                ..base.clone()
            },
            UpdateClaim {
                clip_indicator: Some(1.0),
                ..base.clone()
            },
            // The same number in the other field is another claim.
            UpdateClaim {
                clip_indicator: Some(1.5),
                ..base.clone()
            },
        ];
        for v in &variants {
            assert_ne!(v.message(), m, "{v:?}");
        }
        assert_ne!(variants[7].message(), variants[9].message());
        let task = TaskClaim {
            run_id: "r",
            round: 2,
            attempt: 1,
            kind: 1,
            global_sha256: "aa",
            global_size: 100,
            spec_sha256: "cc".into(),
            deadline_unix_ms: 5,
            client_dp: None,
            standardization: None,
        };
        let tasks = [
            TaskClaim {
                kind: 2,
                ..task.clone()
            },
            TaskClaim {
                global_size: 101,
                ..task.clone()
            },
            TaskClaim {
                spec_sha256: "cd".into(),
                ..task.clone()
            },
            TaskClaim {
                deadline_unix_ms: 6,
                ..task.clone()
            },
            TaskClaim {
                client_dp: Some((0.5, 4.0)),
                ..task.clone()
            },
            TaskClaim {
                standardization: Some("{}"),
                ..task.clone()
            },
        ];
        for t in &tasks {
            assert_ne!(t.message(), task.message(), "{t:?}");
        }
        let private = &tasks[4];
        for other in [(0.5, 4.000_000_001), (0.500_000_000_1, 4.0)] {
            let t = TaskClaim {
                client_dp: Some(other),
                ..private.clone()
            };
            assert_ne!(t.message(), private.message(), "{t:?}");
        }
        assert_ne!(task.message(), m);
    }
}
