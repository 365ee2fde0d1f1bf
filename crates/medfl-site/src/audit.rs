//! The site's audit log, `data_dir/audit.jsonl`: the daemon records what it received and sent,
//! the hospital's `medfl-site` commands record every decision taken by hand. Both append to
//! the one hash chain.

use std::path::PathBuf;

use medfl_audit::{AuditLog, Event};
use serde_json::{json, Value};

use crate::{SiteConfig, SiteError};

/// Where the site's log lives.
pub fn path(config: &SiteConfig) -> PathBuf {
    config.data_dir.join("audit.jsonl")
}

/// Opens the site's log, verifying the chain so far.
pub fn open(config: &SiteConfig) -> Result<AuditLog, SiteError> {
    AuditLog::open(&path(config)).map_err(|e| SiteError::Config(format!("audit log: {e}")))
}

/// Milliseconds since the Unix epoch, as audit lines carry them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Records a decision taken at the site by hand (approval, rejection, pause, a dataset
/// registered), naming the local account that took it.
pub fn record_action(
    config: &SiteConfig,
    event: &'static str,
    run: Option<&str>,
    mut details: Value,
) -> Result<(), SiteError> {
    let by = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    if let Value::Object(map) = &mut details {
        map.insert("by".into(), json!(by));
    }
    let mut entry = Event::new(event, details).site(config.name.clone());
    if let Some(run) = run {
        entry = entry.run(run);
    }
    open(config)?
        .append(entry, now_ms())
        .map_err(|e| SiteError::Config(format!("audit log: {e}")))
}
