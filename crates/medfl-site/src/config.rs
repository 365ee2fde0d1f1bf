//! Site daemon configuration: embedded defaults, then a TOML file, then `MEDFL_*` variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::SiteError;

/// Defaults, embedded so a config file needs only the site's own values.
pub const DEFAULTS: &str = r#"
coordinator = "http://127.0.0.1:7070"
data_dir = "site-data"
reconnect_min_ms = 500
reconnect_max_secs = 30
model_cache = 2
log_format = "text"
fetch_base_models = true
insecure_dev = false
"#;

/// One dataset the site holds.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The file; relative paths are relative to the config file's directory.
    pub path: PathBuf,
    /// Format: `csv` (a header row, comma-separated), `jsonl` (one JSON object a line),
    /// `image_folder` (a folder with one subfolder of images per class) or `image_csv` (a CSV
    /// of image paths, relative to its folder, and labels).
    #[serde(default = "csv")]
    pub format: String,
}

/// The dataset formats a site reads.
pub const DATASET_FORMATS: &[&str] = &["csv", "jsonl", "image_folder", "image_csv"];

fn csv() -> String {
    "csv".into()
}

/// The keys `MEDFL_<KEY>` environment variables may set (datasets only come from the file).
const KEYS: &[&str] = &[
    "name",
    "coordinator",
    "data_dir",
    "reconnect_min_ms",
    "reconnect_max_secs",
    "model_cache",
    "log_format",
    "fetch_base_models",
    "insecure_dev",
    "tls_ca",
    "tls_cert",
    "tls_key",
];

/// Everything the site daemon reads at start.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's name in the consortium.
    pub name: String,
    /// The coordinator's URL (`http://host:port`).
    pub coordinator: String,
    /// Where the site keeps its identity, state and model cache.
    pub data_dir: PathBuf,
    /// First reconnection delay.
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay.
    pub reconnect_max_secs: u64,
    /// Global models kept in the cache.
    pub model_cache: usize,
    /// `text` or `json` logs.
    pub log_format: String,
    /// Datasets by the name run specs use. Only names and column headers ever leave the site.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Pre-trained base models by the name run specs use (Hugging Face layout directories).
    /// A run's pinned weights hash is checked against the directory before any training.
    #[serde(default)]
    pub base_models: BTreeMap<String, PathBuf>,
    /// Fetch a base model this site lacks from the coordinator, verified by hash.
    pub fetch_base_models: bool,
    /// The consortium CA certificate the coordinator's certificate must chain to.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// This site's certificate (from its `medfl provision` kit).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// This site's private key.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Talk plaintext gRPC to an `http://` coordinator: for a trial on one machine only.
    pub insecure_dev: bool,
    /// What runs may train here, and whether they wait for approval.
    #[serde(default)]
    pub policy: crate::policy::Policy,
}

impl SiteConfig {
    /// Loads defaults, then `file`, then `MEDFL_*` variables (`MEDFL_NAME`, `MEDFL_COORDINATOR`,
    /// ...), and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, SiteError> {
        Self::load_with(file, false)
    }

    /// [`SiteConfig::load`], with plaintext allowed when `insecure_dev` (the command-line flag).
    pub fn load_with(file: Option<&Path>, insecure_dev: bool) -> Result<Self, SiteError> {
        let mut cfg: Self =
            medfl_daemon::load_config(DEFAULTS, file, KEYS).map_err(SiteError::Config)?;
        cfg.insecure_dev |= insecure_dev;
        if let Some(base) = file.and_then(Path::parent) {
            let tls = [&mut cfg.tls_ca, &mut cfg.tls_cert, &mut cfg.tls_key];
            medfl_daemon::resolve_relative(
                base,
                tls.into_iter()
                    .flatten()
                    .chain([&mut cfg.data_dir])
                    .chain(cfg.base_models.values_mut())
                    .chain(cfg.datasets.values_mut().map(|d| &mut d.path)),
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> Result<(), SiteError> {
        self.policy.validate()?;
        let bad = |key: &str, why: String| Err(SiteError::Config(format!("`{key}`: {why}")));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return bad(
                "name",
                "must be 1-64 letters, digits, `-`, `_` or `.`".into(),
            );
        }
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            return bad(
                "coordinator",
                format!("`{}` is not an http(s) URL", self.coordinator),
            );
        }
        let tls = [&self.tls_ca, &self.tls_cert, &self.tls_key];
        if self.coordinator.starts_with("https://") && !tls.iter().all(|p| p.is_some()) {
            return bad(
                "tls_cert",
                "an https coordinator needs tls_ca, tls_cert and tls_key (the site's kit)".into(),
            );
        }
        if self.coordinator.starts_with("http://") && !self.insecure_dev {
            return bad(
                "coordinator",
                format!(
                    "`{}` is plaintext: use the https URL of the site's kit, or insecure_dev = \
                     true (--insecure-dev) for a trial on one machine",
                    self.coordinator
                ),
            );
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_secs == 0 {
            return bad(
                "reconnect_min_ms",
                "reconnection delays must be positive".into(),
            );
        }
        if self.model_cache == 0 {
            return bad("model_cache", "keep at least one model".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format", "must be `text` or `json`".into());
        }
        for (name, ds) in &self.datasets {
            if !DATASET_FORMATS.contains(&ds.format.as_str()) {
                return bad(
                    &format!("datasets.{name}.format"),
                    format!("`{}` is not one of {DATASET_FORMATS:?}", ds.format),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_datasets_and_data_dir_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(
            &path,
            "name = \"hospital-a\"\ninsecure_dev = true\n[datasets.bc]\npath = \"bc.csv\"\n",
        )
        .unwrap();
        let cfg = SiteConfig::load(Some(&path)).unwrap();
        assert_eq!(cfg.datasets["bc"].path, dir.path().join("bc.csv"));
        // The default too: three kits started from one directory keep three states.
        assert_eq!(cfg.data_dir, dir.path().join("site-data"));
        assert_eq!(cfg.model_cache, 2);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(&path, "name = \"bad name\"\n").unwrap();
        let err = SiteConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("`name`"), "{err}");
        std::fs::write(
            &path,
            "name = \"a\"\ninsecure_dev = true\n[datasets.bc]\npath = \"x\"\nformat = \"xls\"\n",
        )
        .unwrap();
        let err = SiteConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("datasets.bc.format"), "{err}");
        std::fs::write(&path, "nmae = \"a\"\n").unwrap();
        let err = SiteConfig::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("site.toml"), "{err}");
    }
}
