//! Classification metrics and their example-weighted means across sites.

use std::collections::BTreeMap;

/// Fraction of `predicted == actual`.
pub fn accuracy(predicted: &[u32], actual: &[u32]) -> f64 {
    if actual.is_empty() {
        return 0.0;
    }
    let hits = predicted.iter().zip(actual).filter(|(p, a)| p == a).count();
    hits as f64 / actual.len() as f64
}

/// Unweighted mean over classes `0..n_classes` of each class's F1 score; a class that is neither
/// predicted nor present scores 0, as scikit-learn's `f1_score(average="macro")` with labels.
pub fn macro_f1(predicted: &[u32], actual: &[u32], n_classes: usize) -> f64 {
    if n_classes == 0 {
        return 0.0;
    }
    let mut tp = vec![0u64; n_classes];
    let mut fp = vec![0u64; n_classes];
    let mut fn_ = vec![0u64; n_classes];
    for (&p, &a) in predicted.iter().zip(actual) {
        let (p, a) = (p as usize, a as usize);
        if p == a {
            if let Some(t) = tp.get_mut(a) {
                *t += 1;
            }
        } else {
            if let Some(f) = fp.get_mut(p) {
                *f += 1;
            }
            if let Some(f) = fn_.get_mut(a) {
                *f += 1;
            }
        }
    }
    let f1 = |c: usize| {
        let denominator = 2 * tp[c] + fp[c] + fn_[c];
        if denominator == 0 {
            0.0
        } else {
            2.0 * tp[c] as f64 / denominator as f64
        }
    };
    (0..n_classes).map(f1).sum::<f64>() / n_classes as f64
}

/// Area under the ROC curve for binary labels (1 = positive), from positive-class scores.
/// Ties count one half (the Mann-Whitney U statistic). `None` when a class is absent.
pub fn roc_auc(scores: &[f32], labels: &[u32]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&l| l == 1).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Average ranks over ties, then sum the ranks of positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&k| labels[k] == 1).count() as f64 * avg_rank;
        i = j + 1;
    }
    let u = rank_sum - (positives * (positives + 1)) as f64 / 2.0;
    Some(u / (positives * negatives) as f64)
}

/// Example-weighted mean of each metric over `(examples, metrics)` pairs; a metric missing at a
/// site is averaged over the sites that have it.
pub fn weighted_mean(reports: &[(u64, BTreeMap<String, f64>)]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (n, metrics) in reports {
        for (k, v) in metrics {
            if v.is_finite() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += *n as f64 * v;
                e.1 += *n as f64;
            }
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_hits() {
        assert_eq!(accuracy(&[1, 0, 1, 1], &[1, 0, 0, 1]), 0.75);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn auc_matches_hand_computed_values() {
        // sklearn.metrics.roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), Some(0.75));
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]), Some(1.0));
        // All tied: 0.5.
        assert_eq!(roc_auc(&[0.5; 4], &[0, 1, 0, 1]), Some(0.5));
        assert_eq!(roc_auc(&[0.5, 0.6], &[1, 1]), None);
    }

    #[test]
    fn weighted_mean_weights_by_examples() {
        let a = BTreeMap::from([("acc".to_string(), 1.0), ("auc".to_string(), 0.5)]);
        let b = BTreeMap::from([("acc".to_string(), 0.0)]);
        let m = weighted_mean(&[(30, a), (10, b)]);
        assert_eq!(m["acc"], 0.75);
        assert_eq!(m["auc"], 0.5);
    }

    #[test]
    fn macro_f1_matches_scikit_learn() {
        // sklearn.metrics.f1_score([0,1,2,0,1,2], [0,2,1,0,0,1], average="macro",
        //                          labels=[0,1,2,3]) == 0.2
        let f1 = macro_f1(&[0, 2, 1, 0, 0, 1], &[0, 1, 2, 0, 1, 2], 4);
        assert!((f1 - 0.2).abs() < 1e-12, "{f1}");
        assert_eq!(macro_f1(&[1, 1], &[1, 1], 2), 0.5);
    }
}
