//! Per-researcher quotas, checked when a run is created: runs at once, parameters per run, and
//! model bytes held on the coordinator's disk.

use crate::CoordinatorError;

/// What one creator may hold (keys `quota_*` of the coordinator config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Runs running at once.
    pub concurrent_runs: u32,
    /// Parameters one run's model may have.
    pub parameters_per_run: u64,
    /// Bytes of model blobs the creator's runs may hold.
    pub blob_bytes: u64,
}

/// Rounds' worth of models a run is charged beyond its rounds: the initial model, and a server
/// optimizer's two moments.
const EXTRA_MODELS: u64 = 3;

/// The bytes a run with a global model of `model_bytes` may come to hold over `rounds`
/// rounds: every round's global model (all are kept by default) and the optimizer's moments.
pub fn charge(model_bytes: u64, rounds: u32) -> u64 {
    model_bytes.saturating_mul(u64::from(rounds).saturating_add(EXTRA_MODELS))
}

/// What a creator holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holding {
    /// Runs still running.
    pub running: u32,
    /// The [`charge`] of its running runs plus the blobs its ended runs still keep.
    pub blob_bytes: u64,
}

/// Admits a new run of `parameters` (F32, `model_bytes` on disk) over `rounds` rounds by
/// `creator`, who holds `held`; the error names the quota's key and both numbers.
pub fn admit(
    quotas: &Quotas,
    creator: &str,
    held: Holding,
    parameters: u64,
    model_bytes: u64,
    rounds: u32,
) -> Result<(), CoordinatorError> {
    let who = match creator {
        "" => "the unidentified caller".to_owned(),
        name => format!("`{name}`"),
    };
    if parameters > quotas.parameters_per_run {
        return Err(CoordinatorError::Exhausted(format!(
            "run spec: model: {parameters} parameters exceed the quota of {} per run \
             (quota_parameters_per_run)",
            quotas.parameters_per_run
        )));
    }
    if held.running >= quotas.concurrent_runs {
        return Err(CoordinatorError::Exhausted(format!(
            "{who} has {} runs running, the quota (quota_concurrent_runs); stop or wait for one",
            held.running
        )));
    }
    let wanted = charge(model_bytes, rounds);
    if held.blob_bytes.saturating_add(wanted) > quotas.blob_bytes {
        return Err(CoordinatorError::Exhausted(format!(
            "this run may hold {wanted} bytes of models ({rounds} rounds of {model_bytes} bytes, \
             plus 3); with the {} bytes {who} holds that exceeds the quota of {} \
             (quota_blob_bytes); use fewer rounds, a smaller model, or end older runs \
             (keep_models)",
            held.blob_bytes, quotas.blob_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quotas = Quotas {
        concurrent_runs: 2,
        parameters_per_run: 1000,
        blob_bytes: 100_000,
    };

    #[test]
    fn each_quota_refuses_with_its_key() {
        let none = Holding::default();
        assert!(admit(&Q, "r1", none, 1000, 4000, 10).is_ok());
        let e = admit(&Q, "r1", none, 1001, 4004, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quota_parameters_per_run"), "{e}");
        let two = Holding {
            running: 2,
            blob_bytes: 0,
        };
        let e = admit(&Q, "r1", two, 10, 40, 1).unwrap_err().to_string();
        assert!(
            e.contains("quota_concurrent_runs") && e.contains("`r1`"),
            "{e}"
        );
        // 4000 bytes over 23 rounds is charged 26 models: 104,000 bytes.
        let e = admit(&Q, "r1", none, 1000, 4000, 23)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("quota_blob_bytes") && e.contains("104000"),
            "{e}"
        );
        let half = Holding {
            running: 1,
            blob_bytes: 60_000,
        };
        assert!(admit(&Q, "r1", half, 1000, 4000, 7).is_ok());
        assert!(admit(&Q, "r1", half, 1000, 4000, 8).is_err());
    }

    #[test]
    fn charges_saturate() {
        assert_eq!(charge(u64::MAX, u32::MAX), u64::MAX);
        assert_eq!(charge(10, 1), 40);
    }
}
