//! Bounds on every field that arrives from the network, checked at the edge before anything
//! is stored, logged or echoed: ids, names, hashes, metric maps, dataset schemas, versions and
//! reasons. An error names the field and the bound.

use std::collections::BTreeMap;

use medfl_proto::v1;

use crate::CoordinatorError;

/// Longest run id (ids the coordinator makes are far shorter).
pub const MAX_ID: usize = 128;
/// Longest site, dataset, column or metric name.
pub const MAX_NAME: usize = 128;
/// Most metrics in one evaluation.
pub const MAX_METRICS: usize = 64;
/// Most datasets one site may advertise.
pub const MAX_DATASETS: usize = 256;
/// Most columns of one dataset.
pub const MAX_COLUMNS: usize = 4096;
/// Most bytes of column names one site may advertise in all.
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;
/// Longest version string.
pub const MAX_VERSION: usize = 64;
/// Longest failure reason kept (longer ones are cut).
pub const MAX_REASON: usize = 2000;

fn invalid(field: &str, why: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Invalid(format!("{field}: {why}"))
}

/// A run id: 1 to [`MAX_ID`] letters, digits, `-`, `_` or `.` (so it can reach a log as is).
pub fn run_id(field: &str, id: &str) -> Result<(), CoordinatorError> {
    if id.is_empty() || id.len() > MAX_ID {
        return Err(invalid(field, format!("must be 1 to {MAX_ID} bytes")));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            field,
            "may hold only letters, digits, `-`, `_` and `.`",
        ));
    }
    Ok(())
}

/// A SHA-256 in lowercase hex.
pub fn sha256(field: &str, sha: &str) -> Result<(), CoordinatorError> {
    if crate::blobs::is_blob_id(sha) {
        Ok(())
    } else {
        Err(invalid(field, "must be 64 lowercase hex digits"))
    }
}

/// A printable name of 1 to [`MAX_NAME`] bytes (no control characters).
pub fn name(field: &str, text: &str) -> Result<(), CoordinatorError> {
    if text.is_empty() || text.len() > MAX_NAME {
        return Err(invalid(field, format!("must be 1 to {MAX_NAME} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(field, "must not hold control characters"));
    }
    Ok(())
}

/// At most [`MAX_METRICS`] finite metrics with valid names.
pub fn metrics(field: &str, metrics: &BTreeMap<String, f64>) -> Result<(), CoordinatorError> {
    if metrics.len() > MAX_METRICS {
        return Err(invalid(
            field,
            format!("{} metrics, at most {MAX_METRICS}", metrics.len()),
        ));
    }
    for (key, value) in metrics {
        name(&format!("{field} key"), key)?;
        if !value.is_finite() {
            return Err(invalid(field, "metrics must be finite"));
        }
    }
    Ok(())
}

/// A site's advertised datasets: count, names, columns and their total size bounded.
pub fn datasets(datasets: &[v1::DatasetSchema]) -> Result<(), CoordinatorError> {
    let field = "RegisterRequest.datasets";
    if datasets.len() > MAX_DATASETS {
        return Err(invalid(
            field,
            format!("{} datasets, at most {MAX_DATASETS}", datasets.len()),
        ));
    }
    let mut bytes = 0usize;
    for d in datasets {
        name(&format!("{field}.name"), &d.name)?;
        if d.columns.len() > MAX_COLUMNS {
            return Err(invalid(
                field,
                format!(
                    "dataset `{}` has {} columns, at most {MAX_COLUMNS}",
                    d.name,
                    d.columns.len()
                ),
            ));
        }
        for c in &d.columns {
            name(&format!("{field}.columns"), c)?;
            bytes += c.len();
        }
        if d.class_counts.len() > MAX_COLUMNS {
            return Err(invalid(
                field,
                format!(
                    "dataset `{}` has {} classes, at most {MAX_COLUMNS}",
                    d.name,
                    d.class_counts.len()
                ),
            ));
        }
        for class in d.class_counts.keys() {
            name(&format!("{field}.class_counts"), class)?;
            bytes += class.len();
        }
        let counted = d
            .class_counts
            .values()
            .try_fold(0u64, |sum, n| sum.checked_add(*n));
        if counted.is_none_or(|n| n > d.rows) {
            return Err(invalid(
                field,
                format!(
                    "dataset `{}`: its class counts add up to more than its {} rows",
                    d.name, d.rows
                ),
            ));
        }
    }
    if bytes > MAX_SCHEMA_BYTES {
        return Err(invalid(
            field,
            format!("{bytes} bytes of column and class names, at most {MAX_SCHEMA_BYTES}"),
        ));
    }
    Ok(())
}

/// A version string: at most [`MAX_VERSION`] printable bytes.
pub fn version(text: &str) -> Result<(), CoordinatorError> {
    if text.len() > MAX_VERSION || text.chars().any(char::is_control) {
        return Err(invalid(
            "RegisterRequest.version",
            format!("must be at most {MAX_VERSION} printable bytes"),
        ));
    }
    Ok(())
}

/// A failure reason as kept: cut to [`MAX_REASON`] characters, control characters (newlines,
/// terminal escapes) replaced, so it cannot forge a log line.
pub fn reason(text: &str) -> String {
    text.chars()
        .take(MAX_REASON)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The fields of an update header that are stored or logged before its signature is checked.
pub fn update_header(h: &v1::UpdateHeader) -> Result<(), CoordinatorError> {
    run_id("UpdateHeader.run_id", &h.run_id)?;
    sha256("UpdateHeader.sha256", &h.sha256)?;
    sha256("UpdateHeader.base_sha256", &h.base_sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_maps_are_bounded() {
        assert!(run_id("f", "breast-cancer-3f2a").is_ok());
        for bad in [
            "",
            "a\nforged line",
            "\u{1b}[31mred",
            &"x".repeat(MAX_ID + 1),
        ] {
            let err = run_id("UpdateHeader.run_id", bad).unwrap_err().to_string();
            assert!(err.contains("UpdateHeader.run_id"), "{err}");
        }
        let many: BTreeMap<String, f64> =
            (0..=MAX_METRICS).map(|i| (format!("m{i}"), 1.0)).collect();
        assert!(metrics("m", &many).is_err());
        let nan = BTreeMap::from([("accuracy".to_string(), f64::NAN)]);
        assert!(metrics("m", &nan).is_err());
        let wide = v1::DatasetSchema {
            name: "bc".into(),
            columns: (0..=MAX_COLUMNS).map(|i| format!("c{i}")).collect(),
            rows: 1,
            class_counts: Default::default(),
        };
        assert!(datasets(&[wide])
            .unwrap_err()
            .to_string()
            .contains("columns"));
        // Class counts: named like columns, at most as many images as rows, no overflow.
        let images = |counts: &[(&str, u64)]| v1::DatasetSchema {
            name: "mri".into(),
            columns: vec!["image".into(), "label".into()],
            rows: 10,
            class_counts: counts.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        };
        assert!(datasets(&[images(&[("no", 4), ("yes", 6)])]).is_ok());
        let err = datasets(&[images(&[("no", 4), ("yes", 7)])]).unwrap_err();
        assert!(err.to_string().contains("10 rows"), "{err}");
        assert!(datasets(&[images(&[("no", u64::MAX), ("yes", 2)])]).is_err());
        assert!(datasets(&[images(&[("no\nyes", 1)])]).is_err());
        assert_eq!(reason("a\nb\u{1b}c"), "a b c");
        assert_eq!(reason(&"r".repeat(5000)).len(), MAX_REASON);
    }
}
