//! Robust aggregation over coordinate blocks: median, trimmed mean, Krum, Multi-Krum, Bulyan.
//!
//! Coordinate-wise rules (`*_block`) see one block of every update at a time. Krum and Bulyan
//! need whole-model distances first: fold every block into a [`PairwiseDistances`], select with
//! [`krum_select`] or [`bulyan_select`], then make a second pass over the selected updates.
//! Values are read as `f32`, computed in `f64` and written as `f32`.

use crate::CoreError;

/// Panics unless there is at least one row and every row has `len` values.
fn check_rows(rows: &[&[f32]], len: usize) {
    assert!(!rows.is_empty(), "no rows to aggregate");
    assert!(
        rows.iter().all(|r| r.len() == len),
        "every row must have {len} values, as many as the output block"
    );
}

/// Writes `reduce(sorted column)` for each coordinate of the block: the one loop behind the
/// coordinate-wise rules. Columns are sorted with `total_cmp`, so NaN never panics.
fn per_sorted_column(rows: &[&[f32]], out: &mut [f32], reduce: impl Fn(&[f64]) -> f64) {
    check_rows(rows, out.len());
    let mut column = vec![0.0; rows.len()];
    for (k, o) in out.iter_mut().enumerate() {
        for (c, row) in column.iter_mut().zip(rows) {
            *c = f64::from(row[k]);
        }
        column.sort_unstable_by(f64::total_cmp);
        *o = reduce(&column) as f32;
    }
}

/// Median of sorted values; the mean of the two middle ones for an even count (as `numpy.median`).
fn median_of_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn mean(s: &[f64]) -> f64 {
    s.iter().sum::<f64>() / s.len() as f64
}

/// Coordinate-wise median of the rows (Flower's `aggregate_median`; for an even count, the mean of
/// the two middle values, as `numpy.median`).
///
/// # Panics
/// If `rows` is empty or a row's length differs from `out.len()`.
pub fn median_block(rows: &[&[f32]], out: &mut [f32]) {
    per_sorted_column(rows, out, median_of_sorted);
}

/// Coordinate-wise trimmed mean (Flower's `aggregate_trimmed_avg`): at each coordinate, drops the
/// `floor(beta * n)` smallest and as many largest values and averages the rest.
///
/// Errors (`strategy.beta`) when `beta` is outside `[0, 0.5)` or nothing would remain.
///
/// # Panics
/// If a row's length differs from `out.len()`.
pub fn trimmed_mean_block(rows: &[&[f32]], beta: f64, out: &mut [f32]) -> Result<(), CoreError> {
    if !(0.0..0.5).contains(&beta) {
        return Err(CoreError::spec(
            "strategy.beta",
            format!("must be in [0, 0.5), got {beta}"),
        ));
    }
    let n = rows.len();
    // Python's `int(proportiontocut * nobs)`: the same IEEE product, truncated.
    let cut = (beta * n as f64).floor() as usize;
    if 2 * cut >= n {
        return Err(CoreError::spec(
            "strategy.beta",
            format!("cutting {cut} of {n} values at each end leaves none"),
        ));
    }
    per_sorted_column(rows, out, |s| mean(&s[cut..n - cut]));
    Ok(())
}

/// Squared Euclidean distances between every pair of `n` updates, accumulated block by block in
/// `f64` (Flower's `_compute_distances`).
#[derive(Debug, Clone, PartialEq)]
pub struct PairwiseDistances {
    n: usize,
    /// Upper triangle, row by row: `(0,1), (0,2), …, (0,n-1), (1,2), …`.
    sums: Vec<f64>,
}

impl PairwiseDistances {
    /// All-zero distances between `n` updates.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            sums: vec![0.0; n * n.saturating_sub(1) / 2],
        }
    }

    /// Adds one block's contribution: `rows[i]` is update `i`'s values for the block.
    ///
    /// # Panics
    /// Unless there are exactly `len()` rows, all of the same length.
    pub fn add_block(&mut self, rows: &[&[f32]]) {
        assert_eq!(rows.len(), self.n, "one row per update");
        let Some(first) = rows.first() else {
            return;
        };
        check_rows(rows, first.len());
        let mut pairs = self.sums.iter_mut();
        for (i, a) in rows.iter().enumerate() {
            for (b, sum) in rows[i + 1..].iter().zip(&mut pairs) {
                *sum += a
                    .iter()
                    .zip(*b)
                    .map(|(x, y)| {
                        let d = f64::from(*x) - f64::from(*y);
                        d * d
                    })
                    .sum::<f64>();
            }
        }
    }

    /// Squared distance between updates `i` and `j` (0 when `i == j`).
    ///
    /// # Panics
    /// If `i` or `j` is not below `len()`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        assert!(i < self.n && j < self.n, "update index out of range");
        let (i, j) = if i < j { (i, j) } else { (j, i) };
        if i == j {
            return 0.0;
        }
        self.sums[i * (2 * self.n - i - 1) / 2 + (j - i - 1)]
    }

    /// Number of updates.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no updates.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Krum score of each of `members`: the sum of its `closest` smallest distances to the other
/// members (all of them when there are fewer). Flower takes `argsort(row)[1 : closest + 1]`, i.e.
/// drops the zero distance to itself, which sums the same values.
fn krum_scores(d: &PairwiseDistances, members: &[usize], closest: usize) -> Vec<f64> {
    let mut others = Vec::with_capacity(members.len());
    members
        .iter()
        .map(|&i| {
            others.clear();
            others.extend(members.iter().filter(|&&j| j != i).map(|&j| d.get(i, j)));
            others.sort_unstable_by(f64::total_cmp);
            others.iter().take(closest).sum()
        })
        .collect()
}

/// Position of the smallest score, the first one on ties (`numpy.argmin`); 0 when empty.
fn argmin(scores: &[f64]) -> usize {
    (0..scores.len()).fold(0, |best, i| {
        if scores[i].total_cmp(&scores[best]).is_lt() {
            i
        } else {
            best
        }
    })
}

/// Krum (`keep == 0`: the single best update) or Multi-Krum (`keep > 0`: the `keep` best, which the
/// caller averages with [`weighted_mean_block`] by example counts), as Flower's `aggregate_krum`.
///
/// An update's score is the sum of its `n - f - 2` smallest squared distances to the others; lower
/// is better. Returns indices sorted by score, then index. Errors (`strategy.f`) when
/// `n < f + 3`, and (`strategy.keep`) when `keep > n`.
pub fn krum_select(d: &PairwiseDistances, f: usize, keep: usize) -> Result<Vec<usize>, CoreError> {
    let n = d.len();
    let need = f.saturating_add(3);
    if n < need {
        return Err(CoreError::spec(
            "strategy.f",
            format!("Krum with f = {f} needs at least f + 3 = {need} updates, got {n}"),
        ));
    }
    if keep > n {
        return Err(CoreError::spec(
            "strategy.keep",
            format!("cannot keep {keep} of {n} updates"),
        ));
    }
    let members: Vec<usize> = (0..n).collect();
    let scores = krum_scores(d, &members, n - f - 2);
    let mut order = members;
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(keep.max(1));
    Ok(order)
}

/// Bulyan's selection, as Flower's `aggregate_bulyan` with `aggregate_krum` (`to_keep = 0`): picks
/// `theta = n - 2f` updates one at a time, each the Krum winner among those not yet picked (scored
/// on `max(1, m - f - 2)` closest others, `m` the number left). Returns the original indices in
/// the order picked; average them with [`bulyan_block`].
///
/// Errors (`strategy.f`) when `n < 4f + 3`.
pub fn bulyan_select(d: &PairwiseDistances, f: usize) -> Result<Vec<usize>, CoreError> {
    let n = d.len();
    let need = f.saturating_mul(4).saturating_add(3);
    if n < need {
        return Err(CoreError::spec(
            "strategy.f",
            format!("Bulyan needs n >= 4f + 3 = {need} updates; got n = {n} with f = {f}"),
        ));
    }
    let theta = n - 2 * f;
    let mut left: Vec<usize> = (0..n).collect();
    let mut picked = Vec::with_capacity(theta);
    for _ in 0..theta {
        let closest = left.len().saturating_sub(f + 2).max(1);
        let best = argmin(&krum_scores(d, &left, closest));
        picked.push(left.remove(best));
    }
    Ok(picked)
}

/// Bulyan's coordinate-wise step over the `theta` rows [`bulyan_select`] picked (Flower's
/// `_aggregate_n_closest_weights` around `aggregate_median`): at each coordinate, the mean of the
/// `theta - 2f` values closest to the median. Flower leaves ties in distance to
/// `numpy.argpartition`; here the smaller value is kept.
///
/// Errors (`strategy.f`) unless `theta >= 2f + 3` (that is, `n >= 4f + 3`).
///
/// # Panics
/// If a row's length differs from `out.len()`.
pub fn bulyan_block(selected_rows: &[&[f32]], f: usize, out: &mut [f32]) -> Result<(), CoreError> {
    let theta = selected_rows.len();
    let need = f.saturating_mul(2).saturating_add(3);
    if theta < need {
        return Err(CoreError::spec(
            "strategy.f",
            format!(
                "Bulyan with f = {f} averages the n - 2f >= 2f + 3 = {need} selected updates, \
                 got {theta}"
            ),
        ));
    }
    let beta = theta - 2 * f;
    per_sorted_column(selected_rows, out, |s| {
        let med = median_of_sorted(s);
        // The values closest to the median form a window of the sorted column: shrink it from
        // whichever end is farther until `beta` values remain.
        let (mut lo, mut hi) = (0, s.len());
        while hi - lo > beta {
            if (s[lo] - med).abs() > (s[hi - 1] - med).abs() {
                lo += 1;
            } else {
                hi -= 1;
            }
        }
        mean(&s[lo..hi])
    });
    Ok(())
}

/// Weighted mean of the rows with `weights` (example counts), normalised here, summed in `f64`:
/// Flower's `aggregate`, which Multi-Krum applies to the updates it keeps. The weights must have a
/// positive, finite sum, as [`crate::fedavg::FedAvg::fold`] requires.
///
/// # Panics
/// If `rows` is empty, `weights` has another length, or a row's length differs from `out.len()`.
pub fn weighted_mean_block(rows: &[&[f32]], weights: &[f64], out: &mut [f32]) {
    check_rows(rows, out.len());
    assert_eq!(weights.len(), rows.len(), "one weight per row");
    let total: f64 = weights.iter().sum();
    let mut sums = vec![0.0_f64; out.len()];
    for (row, w) in rows.iter().zip(weights) {
        for (s, x) in sums.iter_mut().zip(*row) {
            *s += w * f64::from(*x);
        }
    }
    for (o, s) in out.iter_mut().zip(sums) {
        *o = (s / total) as f32;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::selection::SplitMix64;

    /// The inputs of `strategies_reference.json`, each client's layers flattened
    /// (`layer0` [2,2] row-major, then `layer1` [2]), and Flower 1.42's results on them:
    /// ```python
    /// from flwr.server.strategy.aggregate import (
    ///     aggregate_krum, aggregate_median, aggregate_trimmed_avg)
    /// results = [(client_layers, n) for client_layers, n in zip(clients, num_examples)]
    /// aggregate_median(results)
    /// aggregate_trimmed_avg(results, proportiontocut=0.2)
    /// aggregate_krum(results, num_malicious=1, to_keep=0)
    /// aggregate_krum(results, num_malicious=1, to_keep=3)
    /// ```
    pub(crate) const CLIENTS: [[f32; 6]; 5] = [
        [1.0, 2.0, 3.0, 4.0, 0.5, -0.5],
        [1.1, 1.9, 3.2, 3.9, 0.4, -0.6],
        [0.9, 2.1, 2.8, 4.1, 0.6, -0.4],
        [1.05, 2.05, 3.1, 4.2, 0.55, -0.45],
        [10.0, -8.0, 30.0, -40.0, 5.0, 9.0],
    ];
    pub(crate) const EXAMPLES: [f64; 5] = [10.0, 20.0, 30.0, 40.0, 50.0];
    pub(crate) const FLOWER_MEDIAN: [f64; 6] = [1.05, 2.0, 3.1, 4.0, 0.55, -0.45];
    pub(crate) const FLOWER_TRIMMED_MEAN_0_2: [f64; 6] = [
        1.05,
        1.9833333333333332,
        3.1,
        4.0,
        0.5499999999999999,
        -0.45,
    ];
    pub(crate) const FLOWER_KRUM_F1: [f64; 6] = [1.0, 2.0, 3.0, 4.0, 0.5, -0.5];
    pub(crate) const FLOWER_MULTIKRUM_F1_KEEP3: [f64; 6] =
        [0.9875, 2.0625, 2.975, 4.1375, 0.5625, -0.4375];

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            // f32 results against f64 references: 1e-6 relative to the magnitude.
            assert!(
                (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }

    fn refs(rows: &[Vec<f32>]) -> Vec<&[f32]> {
        rows.iter().map(Vec::as_slice).collect()
    }

    fn distances(rows: &[&[f32]]) -> PairwiseDistances {
        let mut d = PairwiseDistances::new(rows.len());
        d.add_block(rows);
        d
    }

    /// Median, trimmed mean, Krum and Multi-Krum of `clients` with their example counts.
    fn all_four(clients: &[Vec<f32>], examples: &[f64]) -> [Vec<f32>; 4] {
        let rows = refs(clients);
        let len = rows[0].len();
        let mut median = vec![0.0; len];
        median_block(&rows, &mut median);
        let mut trimmed = vec![0.0; len];
        trimmed_mean_block(&rows, 0.2, &mut trimmed).unwrap();
        let d = distances(&rows);
        let krum = krum_select(&d, 1, 0).unwrap();
        assert_eq!(krum.len(), 1);
        let multi = krum_select(&d, 1, 3).unwrap();
        let kept: Vec<&[f32]> = multi.iter().map(|&i| rows[i]).collect();
        let weights: Vec<f64> = multi.iter().map(|&i| examples[i]).collect();
        let mut multikrum = vec![0.0; len];
        weighted_mean_block(&kept, &weights, &mut multikrum);
        [median, trimmed, rows[krum[0]].to_vec(), multikrum]
    }

    #[test]
    fn matches_flower_reference() {
        let clients: Vec<Vec<f32>> = CLIENTS.iter().map(|c| c.to_vec()).collect();
        let [median, trimmed, krum, multikrum] = all_four(&clients, &EXAMPLES);
        assert_close(&median, &FLOWER_MEDIAN);
        assert_close(&trimmed, &FLOWER_TRIMMED_MEAN_0_2);
        assert_close(&krum, &FLOWER_KRUM_F1);
        assert_close(&multikrum, &FLOWER_MULTIKRUM_F1_KEEP3);
        let d = distances(&refs(&clients));
        assert_eq!(krum_select(&d, 1, 0).unwrap(), vec![0]);
        assert_eq!(krum_select(&d, 1, 3).unwrap(), vec![0, 3, 2]);
    }

    /// The same check against the shared reference file itself, when it is present.
    #[test]
    fn matches_shared_reference_file_when_present() {
        let Some(text) = crate::fedavg::shared_strategies_reference(
            "robust::matches_shared_reference_file_when_present",
        ) else {
            return;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let clients: Vec<Vec<f32>> = v["inputs"]["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| flat(c).into_iter().map(|x| x as f32).collect())
            .collect();
        let examples = flat(&v["inputs"]["num_examples"]);
        let got = all_four(&clients, &examples);
        let keys = [
            "median",
            "trimmed_mean_beta_0.2",
            "krum_f1_to_keep0",
            "multikrum_f1_to_keep3",
        ];
        for (got, key) in got.iter().zip(keys) {
            assert_close(got, &flat(&v[key]));
        }
    }

    /// Every number in a nested JSON array, depth first.
    fn flat(x: &serde_json::Value) -> Vec<f64> {
        match x {
            serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
            other => vec![other.as_f64().unwrap()],
        }
    }

    fn random_rows(rng: &mut SplitMix64, n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
                    .collect()
            })
            .collect()
    }

    fn shuffled(rng: &mut SplitMix64, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.below(i + 1));
        }
        p
    }

    /// Runs `rule` over `rows` cut into blocks of `size` coordinates and joins the outputs.
    fn blockwise(
        rows: &[&[f32]],
        size: usize,
        mut rule: impl FnMut(&[&[f32]], &mut [f32]),
    ) -> Vec<f32> {
        let len = rows[0].len();
        let mut out = vec![0.0; len];
        for (b, chunk) in out.chunks_mut(size).enumerate() {
            let block: Vec<&[f32]> = rows
                .iter()
                .map(|r| &r[b * size..b * size + chunk.len()])
                .collect();
            rule(&block, chunk);
        }
        out
    }

    #[test]
    fn blocks_of_any_size_give_the_same_result() {
        let mut rng = SplitMix64::new(7);
        let (n, len, f) = (7, 23, 1);
        let rows = random_rows(&mut rng, n, len);
        let rows = refs(&rows);
        let weights: Vec<f64> = (1..=n).map(|i| i as f64 * 3.0).collect();
        let whole = distances(&rows);
        for size in 1..=len {
            for rule in 0..4 {
                let run = |block: &[&[f32]], out: &mut [f32]| match rule {
                    0 => median_block(block, out),
                    1 => trimmed_mean_block(block, 0.2, out).unwrap(),
                    2 => bulyan_block(block, f, out).unwrap(),
                    _ => weighted_mean_block(block, &weights, out),
                };
                assert_eq!(blockwise(&rows, size, run), blockwise(&rows, len, run));
            }
            let mut d = PairwiseDistances::new(n);
            blockwise(&rows, size, |block, _| d.add_block(block));
            for i in 0..n {
                for j in 0..n {
                    let (a, b) = (d.get(i, j), whole.get(i, j));
                    assert!((a - b).abs() <= 1e-12 * b, "{a} vs {b}");
                }
            }
            assert_eq!(krum_select(&d, f, 3), krum_select(&whole, f, 3));
            assert_eq!(bulyan_select(&d, f), bulyan_select(&whole, f));
        }
    }

    #[test]
    fn distances_are_symmetric_squared_euclidean() {
        let rows: [&[f32]; 3] = [&[0.0, 0.0], &[3.0, 4.0], &[1.0, 0.0]];
        let d = distances(&rows);
        assert_eq!((d.len(), d.is_empty()), (3, false));
        assert_eq!(d.get(0, 1), 25.0);
        assert_eq!(d.get(1, 0), 25.0);
        assert_eq!(d.get(1, 2), 20.0);
        assert_eq!(d.get(2, 0), 1.0);
        assert_eq!(d.get(2, 2), 0.0);
        assert!(PairwiseDistances::new(0).is_empty());
    }

    #[test]
    fn permutation_invariance() {
        let mut rng = SplitMix64::new(11);
        for trial in 0..50 {
            // From n = f + 4 on, scores sum at least two distances and do not tie; with a single
            // distance (n = f + 3) two mutual nearest neighbours always tie, and the lower index
            // wins, as `numpy.argmin` does in Flower.
            let n = 5 + trial % 8;
            let rows = random_rows(&mut rng, n, 9);
            let perm = shuffled(&mut rng, n);
            let permuted: Vec<Vec<f32>> = perm.iter().map(|&i| rows[i].clone()).collect();
            let (a, b) = (refs(&rows), refs(&permuted));
            let mut x = vec![0.0; 9];
            let mut y = vec![0.0; 9];
            median_block(&a, &mut x);
            median_block(&b, &mut y);
            assert_eq!(x, y);
            trimmed_mean_block(&a, 0.3, &mut x).unwrap();
            trimmed_mean_block(&b, 0.3, &mut y).unwrap();
            assert_eq!(x, y);
            let (da, db) = (distances(&a), distances(&b));
            for keep in 0..=n {
                let mut want = krum_select(&da, 1, keep).unwrap();
                let mut got: Vec<usize> = krum_select(&db, 1, keep)
                    .unwrap()
                    .iter()
                    .map(|&i| perm[i])
                    .collect();
                want.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, want, "n = {n}, keep = {keep}");
            }
        }
    }

    #[test]
    fn a_single_site_gets_its_own_update_back() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..20 {
            let rows = random_rows(&mut rng, 1, 17);
            let rows = refs(&rows);
            let mut out = vec![0.0; 17];
            median_block(&rows, &mut out);
            assert_eq!(out, rows[0]);
            trimmed_mean_block(&rows, 0.0, &mut out).unwrap();
            assert_eq!(out, rows[0]);
            weighted_mean_block(&rows, &[42.0], &mut out);
            assert_eq!(out, rows[0]);
        }
    }

    #[test]
    fn equal_weights_give_the_plain_mean() {
        let mut rng = SplitMix64::new(5);
        for trial in 0..50 {
            let n = 1 + trial % 9;
            let rows = random_rows(&mut rng, n, 13);
            let rows = refs(&rows);
            let w = 1.0 + rng.next_f64() * 100.0;
            let mut out = vec![0.0; 13];
            weighted_mean_block(&rows, &vec![w; n], &mut out);
            for (k, o) in out.iter().enumerate() {
                let want = rows.iter().map(|r| f64::from(r[k])).sum::<f64>() / n as f64;
                assert!((f64::from(*o) - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn median_ignores_one_huge_outlier() {
        let mut rng = SplitMix64::new(13);
        for trial in 0..50 {
            let n = 3 + trial % 6;
            let mut rows = random_rows(&mut rng, n, 8);
            let bad = rng.below(n);
            let sign = if trial % 2 == 0 { 1.0 } else { -1.0 };
            rows[bad] = vec![sign * 1e30; 8];
            let rows = refs(&rows);
            let mut out = vec![0.0; 8];
            median_block(&rows, &mut out);
            for (k, o) in out.iter().enumerate() {
                let honest = rows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != bad)
                    .map(|(_, r)| r[k]);
                let lo = honest.clone().fold(f32::INFINITY, f32::min);
                let hi = honest.fold(f32::NEG_INFINITY, f32::max);
                assert!((lo..=hi).contains(o), "{o} outside [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn trimmed_mean_refuses_bad_beta() {
        let rows: [&[f32]; 2] = [&[1.0], &[2.0]];
        let mut out = [0.0];
        for beta in [-0.1, 0.5, 0.7, f64::NAN] {
            let err = trimmed_mean_block(&rows, beta, &mut out).unwrap_err();
            assert!(matches!(err, CoreError::Spec { ref field, .. } if field == "strategy.beta"));
        }
        assert!(trimmed_mean_block(&[], 0.0, &mut []).is_err());
        trimmed_mean_block(&rows, 0.49, &mut out).unwrap();
        assert_eq!(out, [1.5]);
    }

    #[test]
    fn krum_refuses_too_few_updates_or_keeping_too_many() {
        let rows: [&[f32]; 4] = [&[1.0], &[2.0], &[3.0], &[4.0]];
        let d = distances(&rows);
        let field = |r: Result<Vec<usize>, CoreError>| match r {
            Err(CoreError::Spec { field, .. }) => field,
            other => panic!("expected a spec error, got {other:?}"),
        };
        assert_eq!(field(krum_select(&d, 2, 0)), "strategy.f");
        assert_eq!(field(krum_select(&d, 1, 5)), "strategy.keep");
        assert_eq!(krum_select(&d, 1, 4).unwrap().len(), 4);
        assert_eq!(field(krum_select(&d, usize::MAX, 0)), "strategy.f");
    }

    #[test]
    fn bulyan_refuses_fewer_than_4f_plus_3() {
        for f in 0..4 {
            let n = 4 * f + 2;
            let err = bulyan_select(&PairwiseDistances::new(n), f).unwrap_err();
            let CoreError::Spec { field, message } = err else {
                panic!("expected a spec error");
            };
            assert_eq!(field, "strategy.f");
            assert!(message.contains(&format!("n = {n}")), "{message}");
            assert!(message.contains(&format!("f = {f}")), "{message}");
            assert_eq!(
                bulyan_select(&PairwiseDistances::new(n + 1), f)
                    .unwrap()
                    .len(),
                n + 1 - 2 * f
            );
            let rows = vec![vec![0.0_f32]; n - 2 * f];
            assert!(bulyan_block(&refs(&rows), f, &mut [0.0]).is_err());
        }
    }

    #[test]
    fn bulyan_tolerates_f_outliers() {
        let mut rng = SplitMix64::new(17);
        for trial in 0..30 {
            let f = 1 + trial % 3;
            let n = 4 * f + 3 + trial % 2;
            let len = 6;
            let mut rows = random_rows(&mut rng, n, len);
            let bad: Vec<usize> = shuffled(&mut rng, n)[..f].to_vec();
            for (j, &b) in bad.iter().enumerate() {
                rows[b] = (0..len).map(|k| 1e30 * (j + k + 1) as f32).collect();
            }
            let rows = refs(&rows);
            let picked = bulyan_select(&distances(&rows), f).unwrap();
            assert_eq!(picked.len(), n - 2 * f);
            assert!(
                picked.iter().all(|i| !bad.contains(i)),
                "{picked:?} {bad:?}"
            );
            let selected: Vec<&[f32]> = picked.iter().map(|&i| rows[i]).collect();
            let mut out = vec![0.0; len];
            bulyan_block(&selected, f, &mut out).unwrap();
            assert!(out.iter().all(|o| (-2.0..=2.0).contains(o)), "{out:?}");
        }
    }

    /// Flower's own `bulyan_test.py`: with `num_malicious_clients=0` Bulyan keeps every update and
    /// averages all of them.
    /// ```python
    /// coordinate = (0.2 + 0.5 + 0.7 + 12.0 + 0.1 + 0.1) / 6
    /// ```
    #[test]
    fn bulyan_with_f0_is_the_mean_as_in_flower_test() {
        let rows: Vec<Vec<f32>> = [0.2, 0.5, 0.7, 12.0, 0.1, 0.1]
            .iter()
            .map(|&x| vec![x; 4])
            .collect();
        let rows = refs(&rows);
        let picked = bulyan_select(&distances(&rows), 0).unwrap();
        assert_eq!(picked.len(), 6);
        let selected: Vec<&[f32]> = picked.iter().map(|&i| rows[i]).collect();
        let mut out = vec![0.0; 4];
        bulyan_block(&selected, 0, &mut out).unwrap();
        assert_close(&out, &[(0.2 + 0.5 + 0.7 + 12.0 + 0.1 + 0.1) / 6.0; 4]);
    }

    #[test]
    fn bulyan_averages_the_values_nearest_the_median() {
        // Five values, f = 1: beta = 3 closest to the median 3.0 are 2.0, 3.0 and 3.5.
        let rows: [&[f32]; 5] = [&[1.0], &[2.0], &[3.0], &[3.5], &[10.0]];
        let mut out = [0.0];
        bulyan_block(&rows, 1, &mut out).unwrap();
        assert_close(&out, &[(2.0 + 3.0 + 3.5) / 3.0]);
    }
}
