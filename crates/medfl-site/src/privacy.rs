//! The site's side of record-level differential privacy: before a round trains, what it will
//! cost (from the site's own row count and the run's DP parameters, never from the coordinator)
//! and whether the run's ε target allows it; the ledger entry charged before an update leaves.

use medfl_core::privacy::Mechanism;
use medfl_core::spec::PrivacySpec;
use medfl_train::fit::planned_steps;
use medfl_train::private::RecordDp;
use medfl_train::TrainOptions;

use crate::identity::{PrivacyLedger, SiteState};
use crate::policy::{DatasetBudget, Declined};
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

/// The hospital's budget for a dataset and what the other runs have spent of it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Budget {
    /// The policy's budget.
    pub limit: DatasetBudget,
    /// ε charged to the dataset by every other run.
    pub spent_elsewhere: f64,
    /// Rounds the run asks for (what it would spend at most, unless its target is lower).
    pub rounds: u32,
}

impl Budget {
    /// The budget of `dataset` in the site's policy, with what runs other than `run` spent.
    pub(crate) fn of(
        budgets: &std::collections::BTreeMap<String, DatasetBudget>,
        state: &SiteState,
        dataset: &str,
        run: &str,
        rounds: u32,
    ) -> Option<Self> {
        let limit = budgets.get(dataset)?.clone();
        let spent_elsewhere = spent_on(state, dataset, Some(run));
        Some(Self {
            limit,
            spent_elsewhere,
            rounds,
        })
    }
}

/// ε charged to `dataset` by all runs (but `except`), added up.
pub fn spent_on(state: &SiteState, dataset: &str, except: Option<&str>) -> f64 {
    state
        .runs
        .iter()
        .filter(|(id, _)| Some(id.as_str()) != except)
        .filter_map(|(_, r)| r.privacy.as_ref())
        .filter(|l| l.dataset == dataset)
        .map(|l| l.epsilon)
        .sum()
}

/// The most ε a run of `rounds` rounds would cost a site training on `rows` records (its target,
/// if lower), at the hospital's δ or the run's.
pub(crate) fn run_cost(
    privacy: &PrivacySpec,
    rows: usize,
    opts: &TrainOptions,
    rounds: u32,
    hospital_delta: Option<f64>,
) -> Result<f64, SiteError> {
    let spec = PrivacySpec {
        delta: hospital_delta.or(privacy.delta),
        ..privacy.clone()
    };
    let batch = opts.batch_size;
    let whole = privacy.accountant.accountant().epsilon(&Mechanism {
        sample_rate: RecordDp::sample_rate(batch, rows),
        noise_multiplier: privacy.noise_multiplier,
        steps: u64::from(rounds) * planned_steps(rows, opts),
        delta: spec.delta_for(rows)?,
    })?;
    Ok(whole
        .epsilon
        .min(privacy.target_epsilon.unwrap_or(f64::INFINITY)))
}

/// What the hospital is shown of a run's privacy before it decides: the DP parameters and what
/// the whole run would cost this site.
pub(crate) fn describe(
    privacy: &PrivacySpec,
    rows: usize,
    opts: &TrainOptions,
    rounds: u32,
    hospital_delta: Option<f64>,
) -> String {
    let target = privacy
        .target_epsilon
        .map(|t| format!(", target ε = {t}"))
        .unwrap_or_default();
    let params = format!(
        "record-level DP (z = {}, C = {}{target}, {})",
        privacy.noise_multiplier,
        privacy.max_grad_norm,
        privacy.accountant.accountant().name()
    );
    match run_cost(privacy, rows, opts, rounds, hospital_delta) {
        Ok(cost) => format!("{params}; costs this site at most ε = {cost:.3} over {rounds} rounds"),
        Err(e) => format!("{params}; cannot train here: {e}"),
    }
}

/// The client-level DP of a run as the hospital is shown it before approving: its parameters
/// and the most the whole run can spend on this hospital (any one site), within its target.
pub(crate) fn describe_client(c: &medfl_core::spec::ClientPrivacySpec, rounds: u32) -> String {
    let target = c
        .target_epsilon
        .map(|t| format!(", target ε = {t}"))
        .unwrap_or_default();
    let params = format!(
        "client-level DP (q = {}, z = {}, C = {}{}, δ = {}, {} noise{target}, {})",
        c.sample_rate,
        c.noise_multiplier,
        c.clip_norm,
        if c.adaptive_clipping.is_some() {
            " adaptive"
        } else {
            ""
        },
        c.delta,
        c.noise.name(),
        c.accountant.accountant().name()
    );
    let cost = c
        .rounds_within_target(rounds)
        .and_then(|r| Ok((r, c.epsilon_after(r)?)));
    match cost {
        Ok((r, e)) => format!("{params}; costs this hospital at most ε = {e:.3} over {r} rounds"),
        Err(e) => format!("{params}; cannot run: {e}"),
    }
}

/// Plans one round on `rows` training records of `dataset`, after what `before` spent of the
/// run. Refuses a dataset smaller than the expected batch and a δ not below 1/N (task failures
/// naming the field); declines with `budget_exhausted` a round that would take ε past the run's
/// target or the dataset past the hospital's budget; rejects, before its first round, a run
/// that would spend more of the budget than is left.
pub(crate) fn plan(
    privacy: &PrivacySpec,
    dataset: &str,
    rows: usize,
    opts: &TrainOptions,
    before: Option<&PrivacyLedger>,
    budget: Option<&Budget>,
) -> Result<Charge, SiteError> {
    let batch = opts.batch_size;
    if rows < batch {
        return Err(SiteError::Task(format!(
            "record-level DP: dataset {dataset} has {rows} training records, fewer than the \
             expected batch (training.batch_size = {batch})"
        )));
    }
    // The hospital's δ for the dataset stands in for the run's.
    let hospital = budget.and_then(|b| b.limit.delta).map(|d| PrivacySpec {
        delta: Some(d),
        ..privacy.clone()
    });
    let fresh_delta = hospital.as_ref().unwrap_or(privacy).delta_for(rows)?;
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
    if let Some(b) = budget {
        let (max, elsewhere) = (b.limit.max_epsilon, b.spent_elsewhere);
        if before.is_none() {
            // What the whole run would spend, at most its target.
            let whole = run_cost(privacy, rows, opts, b.rounds, b.limit.delta)?;
            if elsewhere + whole > max {
                return Err(Declined::Rejected.because(format!(
                    "dataset {dataset}: the run's {} rounds would spend ε = {whole:.3} \
                     ({round_steps} steps a round at q = {sample_rate:.4}, z = {}, δ = \
                     {delta:.3e}, {}), more than the {:.3} left of its budget \
                     (policy.privacy.{dataset}.max_epsilon = {max}, {elsewhere:.3} spent by \
                     other runs); set a lower target_epsilon or more noise",
                    b.rounds,
                    privacy.noise_multiplier,
                    accountant.name(),
                    (max - elsewhere).max(0.0),
                )));
            }
        }
        if elsewhere + spent.epsilon > max {
            return Err(Declined::BudgetExhausted.because(format!(
                "dataset {dataset}: another round would bring its ε over all runs to {:.3}, \
                 over its budget (policy.privacy.{dataset}.max_epsilon = {max}; other runs \
                 spent {elsewhere:.3}, this run {spent_before:.3})",
                elsewhere + spent.epsilon
            )));
        }
    }
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

    use crate::policy::DatasetBudget;
    use medfl_core::spec::AccountantSpec;

    fn privacy(target: Option<f64>) -> PrivacySpec {
        PrivacySpec {
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
        let first = plan(&p, "bc", 1000, &opts(10), None, None).unwrap();
        assert_eq!((first.round_steps, first.ledger.steps), (100, 100));
        assert_eq!(first.ledger.delta, 1000f64.powf(-1.1));
        let mut ledger = first.ledger;
        let mut rounds = 1;
        loop {
            match plan(&p, "bc", 1000, &opts(10), Some(&ledger), None) {
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
    fn the_hospitals_budget_spans_runs() {
        let budget = |spent_elsewhere| Budget {
            limit: DatasetBudget {
                max_epsilon: 3.0,
                delta: Some(1e-5),
            },
            spent_elsewhere,
            rounds: 3,
        };
        // At q = 0.01, z = 1, δ = 1e-5 (RDP): one round of 100 steps costs ε = 1.214, three
        // rounds 1.451.
        let p = privacy(None);
        let fits = plan(&p, "bc", 1000, &opts(10), None, Some(&budget(0.0))).unwrap();
        assert_eq!(
            fits.ledger.delta, 1e-5,
            "the hospital's δ stands in for the run's"
        );
        // With most of the budget spent by other runs, the run is refused before it trains.
        match plan(&p, "bc", 1000, &opts(10), None, Some(&budget(2.0))) {
            Err(SiteError::Declined { kind, reason }) => {
                assert_eq!(kind, Declined::Rejected);
                assert!(
                    reason.contains("max_epsilon = 3") && reason.contains("1.000 left"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A target within what is left lets it start; the round that would cross is declined.
        let capped = privacy(Some(0.7));
        match plan(&capped, "bc", 1000, &opts(10), None, Some(&budget(2.2))) {
            Ok(c) => panic!("the first round already costs {}", c.ledger.epsilon),
            Err(SiteError::Declined { kind, .. }) => assert_eq!(kind, Declined::BudgetExhausted),
            Err(e) => panic!("{e}"),
        }
        let ok = plan(
            &privacy(Some(1.3)),
            "bc",
            1000,
            &opts(10),
            None,
            Some(&budget(1.6)),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn the_hospital_is_told_the_parameters_and_the_cost() {
        // Three rounds of 100 steps at q = 0.01, z = 1, δ = 1000^-1.1 (RDP) cost 0.919.
        let text = describe(&privacy(None), 1000, &opts(10), 3, None);
        assert_eq!(
            text,
            "record-level DP (z = 1, C = 1, rdp); costs this site at most ε = 0.919 over 3 rounds"
        );
        // A lower target caps it.
        let text = describe(&privacy(Some(0.5)), 1000, &opts(10), 3, None);
        assert!(
            text.contains("target ε = 0.5") && text.contains("ε = 0.500 over"),
            "{text}"
        );
        let loose = PrivacySpec {
            delta: Some(0.01),
            ..privacy(None)
        };
        let text = describe(&loose, 1000, &opts(10), 3, None);
        assert!(
            text.contains("cannot train here") && text.contains("privacy.delta"),
            "{text}"
        );
    }

    #[test]
    fn the_hospital_is_told_the_client_level_parameters_and_the_cost() {
        let mut c = medfl_core::spec::ClientPrivacySpec {
            noise_multiplier: 1.0,
            clip_norm: 0.5,
            sample_rate: 0.5,
            noise: medfl_core::spec::NoisePlacement::Central,
            adaptive_clipping: None,
            target_epsilon: None,
            delta: 1e-3,
            accountant: AccountantSpec::Rdp,
        };
        let e10 = c.epsilon_after(10).unwrap();
        let text = describe_client(&c, 10);
        assert_eq!(
            text,
            format!(
                "client-level DP (q = 0.5, z = 1, C = 0.5, δ = 0.001, central noise, rdp); costs \
                 this hospital at most ε = {e10:.3} over 10 rounds"
            )
        );
        // A target caps the rounds, and so the cost.
        c.target_epsilon = Some(c.epsilon_after(4).unwrap());
        let text = describe_client(&c, 10);
        assert!(
            text.contains("over 4 rounds") && text.contains("target ε"),
            "{text}"
        );
        c.target_epsilon = Some(1e-6);
        assert!(describe_client(&c, 10).contains("cannot run"));
    }

    #[test]
    fn small_datasets_and_loose_deltas_are_refused() {
        let err = plan(&privacy(None), "bc", 5, &opts(10), None, None).unwrap_err();
        assert!(
            err.to_string().contains("training.batch_size = 10"),
            "{err}"
        );
        let loose = PrivacySpec {
            delta: Some(0.01),
            ..privacy(None)
        };
        let err = plan(&loose, "bc", 1000, &opts(10), None, None).unwrap_err();
        assert!(err.to_string().contains("privacy.delta"), "{err}");
    }
}
