//! Coordinator configuration: embedded defaults, then a TOML file, then `MEDFL_*` variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::CoordinatorError;

/// Defaults, embedded so an empty config file is a valid one.
pub const DEFAULTS: &str = r#"
listen = "127.0.0.1:7070"
data_dir = "coordinator-data"
chunk_size = 1048576
max_message_bytes = 4194304
poll_timeout_secs = 20
heartbeat_interval_secs = 5
site_offline_after_secs = 30
max_concurrent_uploads = 8
upload_slot_timeout_secs = 30
upload_idle_timeout_secs = 30
min_upload_bytes_per_sec = 65536
max_connections = 4096
max_handshakes = 128
quota_concurrent_runs = 4
quota_parameters_per_run = 268435456
quota_blob_bytes = 68719476736
retain_updates = false
keep_models = "all"
log_format = "text"
insecure_dev = false
"#;

/// The largest model any run may have, whatever the quota (4 GiB of F32).
pub const MAX_PARAMETERS: u64 = 1 << 30;

/// The keys, as `MEDFL_<KEY>` environment variables may set them.
const KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "chunk_size",
    "max_message_bytes",
    "poll_timeout_secs",
    "heartbeat_interval_secs",
    "site_offline_after_secs",
    "max_concurrent_uploads",
    "upload_slot_timeout_secs",
    "upload_idle_timeout_secs",
    "min_upload_bytes_per_sec",
    "max_connections",
    "max_handshakes",
    "quota_concurrent_runs",
    "quota_parameters_per_run",
    "quota_blob_bytes",
    "retain_updates",
    "keep_models",
    "log_format",
    "insecure_dev",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "revocation_list",
    "health_listen",
];

/// Everything the coordinator reads at start.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address the gRPC server binds.
    pub listen: SocketAddr,
    /// Where the state database and model blobs live.
    pub data_dir: PathBuf,
    /// Bytes per model chunk on the wire.
    pub chunk_size: u32,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: u32,
    /// How long a site's task poll waits for work before answering "no task".
    pub poll_timeout_secs: u64,
    /// How often sites are asked to send heartbeats.
    pub heartbeat_interval_secs: u32,
    /// A site not heard from for this long is offline and not selected.
    pub site_offline_after_secs: u64,
    /// Updates received at once, across all sites (each site sends one at a time); more wait.
    pub max_concurrent_uploads: u32,
    /// How long an upload waits for one of those slots before it is refused (UNAVAILABLE).
    pub upload_slot_timeout_secs: u64,
    /// The longest wait for an upload's next message: a stalled upload gives its slot back.
    pub upload_idle_timeout_secs: u64,
    /// The slowest transfer an upload may keep: it has `size / rate` seconds (at least the idle
    /// timeout) and never past its round's deadline.
    pub min_upload_bytes_per_sec: u64,
    /// Open connections at once; at the cap, new ones wait in the listen backlog.
    pub max_connections: u32,
    /// TLS handshakes at once (a connection takes a slot once its first bytes arrive).
    pub max_handshakes: u32,
    /// Runs one researcher (one certificate name) may have running at once.
    pub quota_concurrent_runs: u32,
    /// Parameters one run's model may have (the default, 2^28, is 1 GiB of F32: what one
    /// machine aggregates comfortably beside its sites' uploads).
    pub quota_parameters_per_run: u64,
    /// Bytes of models one researcher's runs may hold: a running run is charged its model's
    /// size times (rounds + 3), an ended run what it still keeps.
    pub quota_blob_bytes: u64,
    /// Keep each site's update blob after aggregation (for audit and reproduction).
    pub retain_updates: bool,
    /// Global models kept of an ended run: `all`, `final` or `last:N`.
    pub keep_models: String,
    /// `text` or `json` logs.
    pub log_format: String,
    /// The consortium CA certificate: clients must present a certificate it issued.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The coordinator's certificate (from its `medfl provision` kit).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The coordinator's private key.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The CA's `revoked.json`, re-read when it changes: revoked participants are refused.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
    /// Serve plaintext gRPC without TLS, identities or roles: for a trial on one machine only.
    pub insecure_dev: bool,
    /// A second, plaintext address that serves only the standard gRPC health service, for
    /// probes that cannot present a consortium certificate (Kubernetes' `grpc` probe). It
    /// answers SERVING or NOT_SERVING and nothing else.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Base models the operator publishes, by the name run specs use: text runs need their base
    /// here (to shape the adapters), and sites without it fetch it from here by hash.
    #[serde(default)]
    pub base_models: std::collections::BTreeMap<String, PathBuf>,
}

impl CoordinatorConfig {
    /// Loads defaults, then `file` if given, then `MEDFL_*` environment variables
    /// (`MEDFL_LISTEN`, `MEDFL_DATA_DIR`, ...), and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, CoordinatorError> {
        let mut cfg: Self =
            medfl_daemon::load_config(DEFAULTS, file, KEYS).map_err(CoordinatorError::Config)?;
        if let Some(base) = file.and_then(Path::parent) {
            let tls = [
                &mut cfg.tls_ca,
                &mut cfg.tls_cert,
                &mut cfg.tls_key,
                &mut cfg.revocation_list,
            ];
            medfl_daemon::resolve_relative(
                base,
                tls.into_iter()
                    .flatten()
                    .chain([&mut cfg.data_dir])
                    .chain(cfg.base_models.values_mut()),
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The parsed `keep_models` (checked by [`Self::validate`]).
    pub fn keep_models(&self) -> Result<crate::retention::KeepModels, CoordinatorError> {
        self.keep_models
            .parse()
            .map_err(|e| CoordinatorError::Config(format!("`keep_models`: {e}")))
    }

    /// The per-researcher quotas.
    pub fn quotas(&self) -> crate::quota::Quotas {
        crate::quota::Quotas {
            concurrent_runs: self.quota_concurrent_runs,
            parameters_per_run: self.quota_parameters_per_run,
            blob_bytes: self.quota_blob_bytes,
        }
    }

    /// Whether clients are identified by certificates.
    pub fn tls(&self) -> bool {
        self.tls_ca.is_some() && self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// The defaults alone (tests and the demo start from these).
    pub fn defaults() -> Self {
        // The embedded defaults are checked by a unit test.
        Self::load(None).unwrap_or_else(|e| panic!("embedded defaults are invalid: {e}"))
    }

    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |key: &str, why: &str| Err(CoordinatorError::Config(format!("`{key}`: {why}")));
        if !(4096..=16 << 20).contains(&self.chunk_size) {
            return bad("chunk_size", "must be 4 KiB to 16 MiB");
        }
        if self.max_message_bytes < self.chunk_size + 64 * 1024 {
            return bad(
                "max_message_bytes",
                "must exceed chunk_size by at least 64 KiB",
            );
        }
        if self.poll_timeout_secs == 0 || self.poll_timeout_secs > 300 {
            return bad("poll_timeout_secs", "must be 1..=300");
        }
        if self.heartbeat_interval_secs == 0 {
            return bad("heartbeat_interval_secs", "must be at least 1");
        }
        if self.site_offline_after_secs <= u64::from(self.heartbeat_interval_secs) {
            return bad(
                "site_offline_after_secs",
                "must exceed heartbeat_interval_secs",
            );
        }
        if self.max_concurrent_uploads == 0 || self.max_concurrent_uploads > 1024 {
            return bad("max_concurrent_uploads", "must be 1..=1024");
        }
        if !(1..=3600).contains(&self.upload_slot_timeout_secs) {
            return bad("upload_slot_timeout_secs", "must be 1..=3600");
        }
        if !(1..=3600).contains(&self.upload_idle_timeout_secs) {
            return bad("upload_idle_timeout_secs", "must be 1..=3600");
        }
        if self.min_upload_bytes_per_sec < 1024 {
            return bad("min_upload_bytes_per_sec", "must be at least 1024");
        }
        if !(16..=1_000_000).contains(&self.max_connections) {
            return bad("max_connections", "must be 16..=1000000");
        }
        if self.max_handshakes == 0 || self.max_handshakes > self.max_connections {
            return bad("max_handshakes", "must be 1..=max_connections");
        }
        if self.quota_concurrent_runs == 0 {
            return bad("quota_concurrent_runs", "must be at least 1");
        }
        if !(1..=MAX_PARAMETERS).contains(&self.quota_parameters_per_run) {
            return bad(
                "quota_parameters_per_run",
                "must be 1..=1073741824 (2^30, 4 GiB of F32)",
            );
        }
        if self.quota_blob_bytes == 0 {
            return bad("quota_blob_bytes", "must be at least 1");
        }
        self.keep_models()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format", "must be `text` or `json`");
        }
        let tls = [&self.tls_ca, &self.tls_cert, &self.tls_key];
        if tls.iter().any(|p| p.is_some()) && !tls.iter().all(|p| p.is_some()) {
            return bad(
                "tls_cert",
                "set all of tls_ca, tls_cert and tls_key, or none",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let cfg = CoordinatorConfig::defaults();
        assert_eq!(cfg.chunk_size, 1 << 20);
        assert_eq!(cfg.listen.port(), 7070);
    }

    #[test]
    fn file_overrides_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "chunk_size = 65536\ndata_dir = \"/tmp/x\"\n").unwrap();
        let cfg = CoordinatorConfig::load(Some(&path)).unwrap();
        assert_eq!(cfg.chunk_size, 65536);
        std::fs::write(&path, "chunk_size = 10\n").unwrap();
        let err = CoordinatorConfig::load(Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`chunk_size`"), "{err}");
        std::fs::write(&path, "chunk_sise = 65536\n").unwrap();
        let err = CoordinatorConfig::load(Some(&path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk_sise") && err.contains("c.toml"),
            "{err}"
        );
        // Relative paths, the default data_dir included, are relative to the file.
        std::fs::write(&path, "insecure_dev = true\n").unwrap();
        let cfg = CoordinatorConfig::load(Some(&path)).unwrap();
        assert_eq!(cfg.data_dir, dir.path().join("coordinator-data"));
        let err = CoordinatorConfig::load(Some(&dir.path().join("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }
}
