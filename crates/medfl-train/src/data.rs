//! Tabular data: CSV tables as a site holds them, the labelled examples a task draws from them,
//! deterministic train/validation splits and per-site feature standardisation.

use std::path::{Path, PathBuf};

use medfl_core::selection::SplitMix64;

use crate::TrainError;

/// A CSV file read whole: a header row and string cells, each row remembering its line.
#[derive(Debug, Clone)]
pub struct Table {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<(u64, Vec<String>)>,
}

impl Table {
    /// Reads a CSV file with a header row. Every row must have as many cells as the header.
    pub fn load_csv(path: &Path) -> Result<Self, TrainError> {
        let file = std::fs::File::open(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read_csv(path, file)
    }

    /// Reads CSV from any reader; `path` names it in errors.
    pub fn read_csv(path: &Path, reader: impl std::io::Read) -> Result<Self, TrainError> {
        let data_err = |line: u64, message: String| TrainError::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(reader);
        let columns: Vec<String> = csv
            .headers()
            .map_err(|e| data_err(1, format!("unreadable header: {e}")))?
            .iter()
            .map(|c| c.trim().to_string())
            .collect();
        if columns.is_empty() || columns.iter().all(String::is_empty) {
            return Err(data_err(1, "the header row is empty".into()));
        }
        let mut rows = Vec::new();
        for record in csv.records() {
            let record = record.map_err(|e| {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                data_err(line, format!("unparsable row: {e}"))
            })?;
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            rows.push((line, record.iter().map(|c| c.trim().to_string()).collect()));
        }
        if rows.is_empty() {
            return Err(data_err(2, "no data rows after the header".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            columns,
            rows,
        })
    }

    /// A table of `rows` under `columns` that came from no file lines (a listing of `path`).
    pub fn from_rows(path: &Path, columns: Vec<String>, rows: Vec<Vec<String>>) -> Self {
        Self {
            path: path.to_path_buf(),
            columns,
            rows: rows.into_iter().map(|r| (0, r)).collect(),
        }
    }

    /// Each row's line and its cells of `names`, in that order; an unknown name is an error
    /// listing the columns.
    pub fn cells(&self, names: &[&str]) -> Result<Vec<(u64, Vec<&str>)>, TrainError> {
        let cols = names
            .iter()
            .map(|n| self.col(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .rows
            .iter()
            .map(|(line, row)| (*line, cols.iter().map(|&c| row[c].as_str()).collect()))
            .collect())
    }

    /// Column names, in file order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Number of data rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows (never true for a loaded table).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The file this table came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A table of the rows at `rows` (indices into this table), in that order.
    pub fn subset(&self, rows: &[usize]) -> Table {
        Table {
            path: self.path.clone(),
            columns: self.columns.clone(),
            rows: rows.iter().map(|&i| self.rows[i].clone()).collect(),
        }
    }

    /// Writes the table as CSV with its header.
    pub fn write_csv(&self, path: &Path) -> Result<(), TrainError> {
        let io = |e: std::io::Error| TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut w = csv::Writer::from_path(path).map_err(|e| io(e.into()))?;
        w.write_record(&self.columns).map_err(|e| io(e.into()))?;
        for (_, row) in &self.rows {
            w.write_record(row).map_err(|e| io(e.into()))?;
        }
        w.flush().map_err(io)
    }

    /// The cells of column `name`, one per row.
    pub fn column(&self, name: &str) -> Option<Vec<&str>> {
        let c = self.columns.iter().position(|col| col == name)?;
        Some(self.rows.iter().map(|(_, r)| r[c].as_str()).collect())
    }

    /// Draws labelled examples: `features` parsed as numbers, `label` mapped to its index in
    /// `labels`. Errors name the file, line and column.
    pub fn examples(
        &self,
        features: &[String],
        label: &str,
        labels: &[String],
    ) -> Result<Examples, TrainError> {
        let label_col = self.col(label)?;
        let mut examples = self.feature_rows(features)?;
        for (i, (line, row)) in self.rows.iter().enumerate() {
            let cell = &row[label_col];
            let class = labels
                .iter()
                .position(|l| l == cell)
                .ok_or_else(|| TrainError::Data {
                    path: self.path.clone(),
                    line: *line,
                    message: format!(
                        "column `{label}`: unknown label `{cell}` (the run expects {labels:?})"
                    ),
                })?;
            examples.labels[i] = class as u32;
        }
        Ok(examples)
    }

    /// The rows' `features`, in that order, without labels (each labelled class 0): what a
    /// model scores.
    pub fn feature_rows(&self, features: &[String]) -> Result<Examples, TrainError> {
        let feature_cols = features
            .iter()
            .map(|f| self.col(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut x = Vec::with_capacity(self.rows.len() * features.len());
        for (line, row) in &self.rows {
            let data_err = |message: String| TrainError::Data {
                path: self.path.clone(),
                line: *line,
                message,
            };
            for (&c, name) in feature_cols.iter().zip(features) {
                let cell = &row[c];
                let v: f32 = cell
                    .parse()
                    .map_err(|_| data_err(format!("column `{name}`: `{cell}` is not a number")))?;
                if !v.is_finite() {
                    return Err(data_err(format!("column `{name}`: `{cell}` is not finite")));
                }
                x.push(v);
            }
        }
        Ok(Examples {
            features: x,
            labels: vec![0; self.rows.len()],
            n_features: features.len(),
        })
    }

    /// The index of column `name`, or an error listing the columns.
    fn col(&self, name: &str) -> Result<usize, TrainError> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| TrainError::Data {
                path: self.path.clone(),
                line: 1,
                message: format!("no column `{name}` (columns: {})", self.columns.join(", ")),
            })
    }
}

/// Labelled examples: a row-major feature matrix and class indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    /// `len() * n_features` values, row-major.
    pub features: Vec<f32>,
    /// Class index of each row.
    pub labels: Vec<u32>,
    /// Features per row.
    pub n_features: usize,
}

impl Examples {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Feature values of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Examples {
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        for &i in indices {
            features.extend_from_slice(self.row(i));
        }
        Examples {
            features,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            n_features: self.n_features,
        }
    }

    /// Appends the rows of `other` (same feature count).
    pub fn concat(parts: &[&Examples]) -> Examples {
        let n_features = parts.first().map_or(0, |p| p.n_features);
        Examples {
            features: parts
                .iter()
                .flat_map(|p| p.features.iter().copied())
                .collect(),
            labels: parts
                .iter()
                .flat_map(|p| p.labels.iter().copied())
                .collect(),
            n_features,
        }
    }

    /// Splits off a shuffled `fraction` as validation; the same seed gives the same split.
    /// Returns `(train, validation)`.
    pub fn split(&self, fraction: f64, seed: u64) -> (Examples, Examples) {
        let order = permutation(self.len(), seed);
        let n_val = (self.len() as f64 * fraction).round() as usize;
        let n_val = n_val.min(self.len().saturating_sub(1));
        (self.select(&order[n_val..]), self.select(&order[..n_val]))
    }
}

/// Splits row indices by label skew: `shares[p][c]` is the fraction of class `classes[c]`'s
/// rows (shuffled with `seed`) that part `p` receives; rows left over go to no part. Parts see
/// different class ratios and sizes, as hospitals with different specialities would.
pub fn label_skew_partition(
    labels: &[&str],
    classes: &[String],
    shares: &[Vec<f64>],
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut parts = vec![Vec::new(); shares.len()];
    for (c, class) in classes.iter().enumerate() {
        let rows: Vec<usize> = permutation(labels.len(), seed ^ c as u64)
            .into_iter()
            .filter(|&i| labels[i] == class)
            .collect();
        let mut start = 0;
        for (p, share) in shares.iter().enumerate() {
            let take = (share.get(c).copied().unwrap_or(0.0) * rows.len() as f64).round() as usize;
            let end = (start + take).min(rows.len());
            parts[p].extend_from_slice(&rows[start..end]);
            start = end;
        }
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    parts
}

/// A seeded random permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Per-feature mean and standard deviation, fitted on one site's training rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Standardizer {
    /// Fits on `data`; constant features get a unit deviation so they map to zero.
    pub fn fit(data: &Examples) -> Self {
        let d = data.n_features;
        let n = data.len().max(1) as f64;
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for i in 0..data.len() {
            for (j, v) in data.row(i).iter().enumerate() {
                mean[j] += f64::from(*v);
                sq[j] += f64::from(*v) * f64::from(*v);
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                if var > 1e-12 {
                    var.sqrt() as f32
                } else {
                    1.0
                }
            })
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    /// Leaves `n_features` features as they are.
    pub fn identity(n_features: usize) -> Self {
        Self {
            mean: vec![0.0; n_features],
            std: vec![1.0; n_features],
        }
    }

    /// The federation's statistics, pooled from every site's sums (federated standardisation).
    pub fn from_statistics(s: &medfl_core::standardize::Standardization) -> Self {
        Self {
            mean: s.mean.iter().map(|m| *m as f32).collect(),
            std: s.std.iter().map(|d| *d as f32).collect(),
        }
    }

    /// Each feature's mean.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// Each feature's deviation (1 for a constant one).
    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// A standardised copy of `data`.
    pub fn apply(&self, data: &Examples) -> Examples {
        let d = data.n_features;
        let features = data
            .features
            .iter()
            .enumerate()
            .map(|(k, v)| (v - self.mean[k % d]) / self.std[k % d])
            .collect();
        Examples {
            features,
            labels: data.labels.clone(),
            n_features: d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Result<Table, TrainError> {
        Table::read_csv(Path::new("site.csv"), text.as_bytes())
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn loads_and_maps_labels() {
        let t = table("a,b,y\n1,2,M\n3,4,B\n").unwrap();
        let ex = t
            .examples(&strings(&["b", "a"]), "y", &strings(&["B", "M"]))
            .unwrap();
        assert_eq!(ex.features, vec![2.0, 1.0, 4.0, 3.0]);
        assert_eq!(ex.labels, vec![1, 0]);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let t = table("a,b,y\n1,2,M\n3,x,B\n").unwrap();
        let err = t
            .examples(&strings(&["a", "b"]), "y", &strings(&["B", "M"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "site.csv:3: column `b`: `x` is not a number"
        );
        let t = table("a,b,y\n1,2,M\n3,4,Q\n").unwrap();
        let err = t
            .examples(&strings(&["a"]), "y", &strings(&["B", "M"]))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("site.csv:3: column `y`: unknown label `Q`"),
            "{err}"
        );
        let err = t
            .examples(&strings(&["zz"]), "y", &strings(&["B", "M"]))
            .unwrap_err();
        assert!(err.to_string().contains("no column `zz`"), "{err}");
        let err = table("a,b,y\n1,2,M\n3,4\n").unwrap_err();
        assert!(err.to_string().starts_with("site.csv:3:"), "{err}");
        assert!(table("a,b\n").is_err());
    }

    #[test]
    fn split_is_deterministic_and_complete() {
        let ex = Examples {
            features: (0..20).map(|v| v as f32).collect(),
            labels: vec![0; 20],
            n_features: 1,
        };
        let (tr, va) = ex.split(0.25, 3);
        assert_eq!((tr.len(), va.len()), (15, 5));
        assert_eq!(ex.split(0.25, 3), (tr.clone(), va.clone()));
        let mut all: Vec<f32> = tr.features.iter().chain(&va.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, ex.features);
    }

    #[test]
    fn label_skew_gives_each_part_its_share() {
        let labels: Vec<&str> = (0..100).map(|i| if i < 60 { "B" } else { "M" }).collect();
        let classes = strings(&["B", "M"]);
        let parts = label_skew_partition(&labels, &classes, &[vec![0.5, 0.1], vec![0.5, 0.9]], 1);
        let count = |p: &Vec<usize>, l: &str| p.iter().filter(|&&i| labels[i] == l).count();
        assert_eq!((count(&parts[0], "B"), count(&parts[0], "M")), (30, 4));
        assert_eq!((count(&parts[1], "B"), count(&parts[1], "M")), (30, 36));
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn subset_round_trips_through_csv() {
        let t = table("a,y\n1,M\n2,B\n3,M\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        t.subset(&[2, 0]).write_csv(&path).unwrap();
        let back = Table::load_csv(&path).unwrap();
        assert_eq!(back.column("a").unwrap(), vec!["3", "1"]);
    }

    #[test]
    fn standardizer_centres_and_scales() {
        let ex = Examples {
            features: vec![1.0, 5.0, 3.0, 5.0],
            labels: vec![0, 1],
            n_features: 2,
        };
        let s = Standardizer::fit(&ex);
        assert_eq!(s.apply(&ex).features, vec![-1.0, 0.0, 1.0, 0.0]);
    }
}
