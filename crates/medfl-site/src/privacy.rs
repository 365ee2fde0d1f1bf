//! The site's side of record-level differential privacy: before a round trains, what it will
//! cost (from the site's own row count and the run's DP parameters, never from the coordinator)
//! and whether the run's ε target allows it; the ledger entry charged before an update leaves.

use medfl_core::privacy::Mechanism;
use medfl_core::spec::PrivacySpec;
use medfl_train::fit::planned_steps;
use medfl_train::private::RecordDp;
use medfl_train::TrainOptions;

use crate::identity::PrivacyLedger;
use crate::policy::Declined;
use crate::SiteError;

/// What one round of DP-SGD will cost the site.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Charge {
    /// The run's ledger once this round's update has left.
    pub ledger: PrivacyLedger,
    /// Steps this round takes.
    pub round_steps: u64,
    /// ε spent before this round.
    pub spent_before: f64,
}

/// Plans one round on `rows` training records of `dataset`, after what `before` spent. Refuses
/// a dataset smaller than the expected batch and a δ not below 1/N (task failures naming the
/// field), and declines with `budget_exhausted` a round that would take ε past the run's
/// target.
pub(crate) fn plan(
    privacy: &PrivacySpec,
    dataset: &str,
    rows: usize,
    opts: &TrainOptions,
    before: Option<&PrivacyLedger>,
) -> Result<Charge, SiteError> {
    let batch = opts.batch_size;
    if rows < batch {
        return Err(SiteError::Task(format!(
            "record-level DP: dataset {dataset} has {rows} training records, fewer than the \
             expected batch (training.batch_size = {batch})"
        )));
    }
    let fresh_delta = privacy.delta_for(rows)?;
    let delta = before.map_or(fresh_delta, |b| b.delta);
    if delta >= 1.0 / rows as f64 {
        return Err(SiteError::Task(format!(
            "record-level DP: privacy.delta {delta} of the earlier rounds is not below 1/N for \
             the {rows} training records dataset {dataset} now has"
        )));
    }
    let rate = RecordDp::sample_rate(batch, rows);
    let sample_rate = before.map_or(rate, |b| b.sample_rate.max(rate));
    let round_steps = planned_steps(rows, opts);
    let steps = before.map_or(0, |b| b.steps) + round_steps;
    let accountant = privacy.accountant.accountant();
    let spent = accountant.epsilon(&Mechanism {
        sample_rate,
        noise_multiplier: privacy.noise_multiplier,
        steps,
        delta,
    })?;
    let spent_before = before.map_or(0.0, |b| b.epsilon);
    if let Some(target) = privacy.target_epsilon {
        if spent.epsilon > target {
            return Err(Declined::BudgetExhausted.because(format!(
                "another round would spend ε = {:.3} on dataset {dataset} ({steps} steps at \
                 q = {sample_rate:.4}, z = {}, δ = {delta:.3e}, {}), over the run's \
                 target_epsilon {target}; spent so far ε = {spent_before:.3}",
                spent.epsilon,
                privacy.noise_multiplier,
                accountant.name()
            )));
        }
    }
    Ok(Charge {
        ledger: PrivacyLedger {
            dataset: dataset.to_string(),
            epsilon: spent.epsilon,
            delta,
            accountant: accountant.name().to_string(),
            sample_rate,
            noise_multiplier: privacy.noise_multiplier,
            max_grad_norm: privacy.max_grad_norm,
            steps,
        },
        round_steps,
        spent_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_core::spec::Optimizer;
    use medfl_core::spec::{AccountantSpec, PrivacyLevel};

    fn privacy(target: Option<f64>) -> PrivacySpec {
        PrivacySpec {
            level: PrivacyLevel::Record,
            noise_multiplier: 1.0,
            max_grad_norm: 1.0,
            target_epsilon: target,
            delta: None,
            accountant: AccountantSpec::Rdp,
        }
    }

    fn opts(batch: usize) -> TrainOptions {
        TrainOptions {
            epochs: 1,
            steps: 0,
            batch_size: batch,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            weight_decay: 0.0,
            proximal_mu: 0.0,
            seed: 0,
            record_dp: None,
        }
    }

    #[test]
    fn rounds_are_charged_until_the_target() {
        // 1,000 rows, batch 10: q = 0.01, 100 steps a round.
        let p = privacy(Some(1.0));
        let first = plan(&p, "bc", 1000, &opts(10), None).unwrap();
        assert_eq!((first.round_steps, first.ledger.steps), (100, 100));
        assert_eq!(first.ledger.delta, 1000f64.powf(-1.1));
        let mut ledger = first.ledger;
        let mut rounds = 1;
        loop {
            match plan(&p, "bc", 1000, &opts(10), Some(&ledger)) {
                Ok(next) => {
                    assert!(next.ledger.epsilon > ledger.epsilon && next.ledger.epsilon <= 1.0);
                    assert_eq!(next.spent_before, ledger.epsilon);
                    ledger = next.ledger;
                    rounds += 1;
                }
                Err(SiteError::Declined { kind, reason }) => {
                    assert_eq!(kind, Declined::BudgetExhausted);
                    assert!(reason.contains("target_epsilon 1"), "{reason}");
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(rounds < 100);
        }
        assert!(rounds >= 2, "{rounds}");
    }

    #[test]
    fn small_datasets_and_loose_deltas_are_refused() {
        let err = plan(&privacy(None), "bc", 5, &opts(10), None).unwrap_err();
        assert!(
            err.to_string().contains("training.batch_size = 10"),
            "{err}"
        );
        let loose = PrivacySpec {
            delta: Some(0.01),
            ..privacy(None)
        };
        let err = plan(&loose, "bc", 1000, &opts(10), None).unwrap_err();
        assert!(err.to_string().contains("privacy.delta"), "{err}");
    }
}
