//! Federated standardisation: what each site sends before a tabular run's first round
//! (per-feature counts, sums and sums of squares of its training rows, never the rows), and the
//! federation's means and deviations pooled from them, which every site then standardises with
//! and which travel with the run's models.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Variances below this are treated as a constant feature (unit deviation, so it maps to 0).
const CONSTANT_VARIANCE: f64 = 1e-12;

/// One site's per-feature sums over its training rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureSums {
    /// Rows summed.
    pub count: u64,
    /// Sum of each feature.
    pub sum: Vec<f64>,
    /// Sum of each feature's square.
    pub sum_sq: Vec<f64>,
}

impl FeatureSums {
    /// Sums `rows` (each `n_features` wide, row after row).
    pub fn of_rows(values: &[f32], n_features: usize) -> Self {
        let mut sums = Self {
            count: 0,
            sum: vec![0.0; n_features],
            sum_sq: vec![0.0; n_features],
        };
        if n_features == 0 {
            return sums;
        }
        for row in values.chunks_exact(n_features) {
            sums.count += 1;
            for (j, v) in row.iter().enumerate() {
                let v = f64::from(*v);
                sums.sum[j] += v;
                sums.sum_sq[j] += v * v;
            }
        }
        sums
    }

    /// Checks sums a site sent for a task with `n_features` features and at most `max_rows`
    /// rows; `who` names the sender in the error.
    pub fn check(&self, n_features: usize, max_rows: u64, who: &str) -> Result<(), CoreError> {
        let bad = |m: String| CoreError::Statistics(format!("{who}: {m}"));
        if self.sum.len() != n_features || self.sum_sq.len() != n_features {
            return Err(bad(format!(
                "{} sums and {} sums of squares for the task's {n_features} features",
                self.sum.len(),
                self.sum_sq.len()
            )));
        }
        if self.count == 0 {
            return Err(bad("statistics over no rows".into()));
        }
        if self.count > max_rows {
            return Err(bad(format!(
                "statistics over {} rows, more than the {max_rows} the site registered",
                self.count
            )));
        }
        let n = self.count as f64;
        for (j, (s, q)) in self.sum.iter().zip(&self.sum_sq).enumerate() {
            if !s.is_finite() || !q.is_finite() {
                return Err(bad(format!("feature {j}: a sum is not finite")));
            }
            // Cauchy–Schwarz: sum² ≤ n · sum of squares; anything else is not from real rows.
            if *q < 0.0 || s * s > n * q * (1.0 + 1e-9) + 1e-9 {
                return Err(bad(format!(
                    "feature {j}: the sum of squares {q} cannot come from {} rows summing to {s}",
                    self.count
                )));
            }
        }
        Ok(())
    }
}

/// The federation's statistics of a tabular task's features, as they travel (JSON) in tasks,
/// run details and the metadata of pulled models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standardization {
    /// Feature columns, in the model's order.
    pub features: Vec<String>,
    /// Mean of each feature.
    pub mean: Vec<f64>,
    /// Standard deviation of each feature (1 for a constant one).
    pub std: Vec<f64>,
    /// Training rows the statistics pool.
    pub rows: u64,
    /// Sites whose sums were pooled.
    pub sites: u32,
}

impl Standardization {
    /// Pools the sums of every site that sent them (already [`FeatureSums::check`]ed).
    pub fn pool(features: &[String], sums: &[FeatureSums]) -> Result<Self, CoreError> {
        let d = features.len();
        if sums.is_empty() {
            return Err(CoreError::Statistics("no site sent statistics".into()));
        }
        let mut count = 0u64;
        let mut sum = vec![0f64; d];
        let mut sum_sq = vec![0f64; d];
        for s in sums {
            if s.sum.len() != d || s.sum_sq.len() != d {
                return Err(CoreError::Statistics(format!(
                    "sums for {} features, the task has {d}",
                    s.sum.len()
                )));
            }
            count = count.saturating_add(s.count);
            for j in 0..d {
                sum[j] += s.sum[j];
                sum_sq[j] += s.sum_sq[j];
            }
        }
        if count == 0 {
            return Err(CoreError::Statistics("statistics over no rows".into()));
        }
        let n = count as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let var = (q / n - m * m).max(0.0);
                if var > CONSTANT_VARIANCE {
                    var.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        Ok(Self {
            features: features.to_vec(),
            mean,
            std,
            rows: count,
            sites: sums.len() as u32,
        })
    }

    /// Pools so that no one site moves the statistics far (runs with a robust strategy): per
    /// feature, the centre is the median of the sites' means, and the deviation the square
    /// root of the median over sites of each site's mean squared distance from that centre.
    pub fn pool_robust(features: &[String], sums: &[FeatureSums]) -> Result<Self, CoreError> {
        // The exact pooling checks the shapes and gives the row count.
        let mut pooled = Self::pool(features, sums)?;
        let sites: Vec<&FeatureSums> = sums.iter().filter(|s| s.count > 0).collect();
        for j in 0..features.len() {
            let means: Vec<f64> = sites.iter().map(|s| s.sum[j] / s.count as f64).collect();
            let centre = median(means.clone());
            let spreads: Vec<f64> = sites
                .iter()
                .zip(&means)
                .map(|(s, m)| {
                    // E[(x - c)²] = E[x²] - 2cE[x] + c².
                    let q = s.sum_sq[j] / s.count as f64;
                    (q - 2.0 * centre * m + centre * centre).max(0.0)
                })
                .collect();
            let var = median(spreads);
            pooled.mean[j] = centre;
            pooled.std[j] = if var > CONSTANT_VARIANCE {
                var.sqrt()
            } else {
                1.0
            };
        }
        Ok(pooled)
    }

    /// Parses the JSON form and checks it describes exactly `features`.
    pub fn from_json(text: &str, features: &[String]) -> Result<Self, CoreError> {
        let s: Self = serde_json::from_str(text)
            .map_err(|e| CoreError::Statistics(format!("standardisation does not parse: {e}")))?;
        if s.features != features {
            return Err(CoreError::Statistics(format!(
                "standardisation for features {:?}, the model reads {:?}",
                s.features, features
            )));
        }
        if s.mean.len() != features.len() || s.std.len() != features.len() {
            return Err(CoreError::Statistics(format!(
                "standardisation has {} means and {} deviations for {} features",
                s.mean.len(),
                s.std.len(),
                features.len()
            )));
        }
        if let Some(j) = (0..features.len())
            .find(|&j| !(s.mean[j].is_finite() && s.std[j].is_finite() && s.std[j] > 0.0))
        {
            return Err(CoreError::Statistics(format!(
                "standardisation of `{}`: mean {} and deviation {} are not usable",
                features[j], s.mean[j], s.std[j]
            )));
        }
        Ok(s)
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        // Plain numbers and strings: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("f{i}")).collect()
    }

    #[test]
    fn pooled_statistics_equal_those_of_all_rows_together() {
        let a = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0];
        let b = [100.0f32, 7.0];
        let pooled = Standardization::pool(
            &names(2),
            &[FeatureSums::of_rows(&a, 2), FeatureSums::of_rows(&b, 2)],
        )
        .unwrap();
        let all: Vec<f32> = a.iter().chain(&b).copied().collect();
        let whole = Standardization::pool(&names(2), &[FeatureSums::of_rows(&all, 2)]).unwrap();
        assert_eq!(pooled.rows, 4);
        assert_eq!(pooled.sites, 2);
        for j in 0..2 {
            assert!((pooled.mean[j] - whole.mean[j]).abs() < 1e-9);
            assert!((pooled.std[j] - whole.std[j]).abs() < 1e-9);
        }
        assert!((pooled.mean[0] - 26.5).abs() < 1e-9);
        let var0 = [1.0f64, 2.0, 3.0, 100.0]
            .iter()
            .map(|v| (v - 26.5) * (v - 26.5))
            .sum::<f64>()
            / 4.0;
        assert!((pooled.std[0] - var0.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn one_site_cannot_move_robustly_pooled_statistics_far() {
        // Three honest sites around 100 (deviation about 10), one claiming 10,000 rows at 0.
        let honest = |base: f32| {
            let rows: Vec<f32> = (0..50)
                .map(|i| base + (i % 5) as f32 * 7.0 - 14.0)
                .collect();
            FeatureSums::of_rows(&rows, 1)
        };
        let attacker = FeatureSums {
            count: 10_000,
            sum: vec![0.0],
            sum_sq: vec![0.0],
        };
        let sums = [honest(98.0), honest(100.0), honest(102.0), attacker];
        let exact = Standardization::pool(&names(1), &sums).unwrap();
        let robust = Standardization::pool_robust(&names(1), &sums).unwrap();
        assert!(exact.mean[0] < 5.0, "{exact:?}");
        assert!((robust.mean[0] - 100.0).abs() < 2.5, "{robust:?}");
        assert!(robust.std[0] > 5.0 && robust.std[0] < 20.0, "{robust:?}");
        assert_eq!((robust.rows, robust.sites), (10_150, 4));
        // Honest sites alike: the robust pooling is close to the exact one.
        let alike = [honest(100.0), honest(100.0), honest(100.0)];
        let (e, r) = (
            Standardization::pool(&names(1), &alike).unwrap(),
            Standardization::pool_robust(&names(1), &alike).unwrap(),
        );
        assert!((e.mean[0] - r.mean[0]).abs() < 1e-9 && (e.std[0] - r.std[0]).abs() < 1e-9);
    }

    #[test]
    fn constant_features_get_a_unit_deviation() {
        let s =
            Standardization::pool(&names(1), &[FeatureSums::of_rows(&[5.0, 5.0, 5.0], 1)]).unwrap();
        assert_eq!((s.mean[0], s.std[0]), (5.0, 1.0));
    }

    #[test]
    fn impossible_sums_are_refused_by_name() {
        let good = FeatureSums::of_rows(&[1.0, 2.0, 3.0, 4.0], 2);
        good.check(2, 2, "site `a`").unwrap();
        let err = good.check(3, 2, "site `a`").unwrap_err().to_string();
        assert!(
            err.contains("site `a`") && err.contains("3 features"),
            "{err}"
        );
        let err = good.check(2, 1, "site `a`").unwrap_err().to_string();
        assert!(err.contains("more than the 1"), "{err}");
        let mut forged = good.clone();
        forged.sum_sq[1] = 0.5;
        assert!(forged.check(2, 2, "site `a`").is_err());
        let mut nan = good.clone();
        nan.sum[0] = f64::NAN;
        assert!(nan.check(2, 2, "site `a`").is_err());
        let empty = FeatureSums {
            count: 0,
            ..good.clone()
        };
        assert!(empty.check(2, 2, "site `a`").is_err());
    }

    #[test]
    fn json_round_trips_and_names_a_mismatch() {
        let s = Standardization::pool(&names(2), &[FeatureSums::of_rows(&[1.0, 2.0, 3.0, 5.0], 2)])
            .unwrap();
        assert_eq!(
            Standardization::from_json(&s.to_json(), &names(2)).unwrap(),
            s
        );
        let err = Standardization::from_json(&s.to_json(), &names(3)).unwrap_err();
        assert!(err.to_string().contains("the model reads"), "{err}");
        let mut zero = s.clone();
        zero.std[1] = 0.0;
        assert!(Standardization::from_json(&zero.to_json(), &names(2)).is_err());
        assert!(Standardization::from_json("{", &names(2)).is_err());
    }
}
