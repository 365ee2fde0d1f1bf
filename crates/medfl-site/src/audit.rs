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

/// The local account running this command: `$USER`, `$LOGNAME`, else the name the password
/// file gives this process's uid, else `uid N`. Never "unknown": a service account or a
/// container without those variables still has a uid.
pub fn local_account() -> String {
    let uid = std::os::unix::fs::MetadataExt::uid;
    let uid = std::fs::metadata("/proc/self").map(|m| uid(&m)).ok();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    account_name(
        std::env::var("USER").ok(),
        std::env::var("LOGNAME").ok(),
        uid,
        &passwd,
    )
}

fn account_name(
    user: Option<String>,
    logname: Option<String>,
    uid: Option<u32>,
    passwd: &str,
) -> String {
    let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    if let Some(name) = set(user).or_else(|| set(logname)) {
        return name;
    }
    let Some(uid) = uid else {
        return "uid unknown".into();
    };
    passwd
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?;
            let entry_uid: u32 = fields.nth(1)?.parse().ok()?;
            (entry_uid == uid && !name.is_empty()).then(|| format!("{name} (uid {uid})"))
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Records a decision taken at the site by hand (approval, rejection, pause, a dataset
/// registered), naming the local account that took it.
pub fn record_action(
    config: &SiteConfig,
    event: &'static str,
    run: Option<&str>,
    mut details: Value,
) -> Result<(), SiteError> {
    let by = local_account();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_is_named_even_without_user_variables() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nmedfl:x:998:998::/var/lib/medfl:/usr/sbin/nologin\n";
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            account_name(some("ana"), some("bob"), Some(0), passwd),
            "ana"
        );
        assert_eq!(account_name(None, some("bob"), Some(0), passwd), "bob");
        assert_eq!(
            account_name(some(""), None, Some(998), passwd),
            "medfl (uid 998)"
        );
        assert_eq!(account_name(None, None, Some(1234), passwd), "uid 1234");
        assert_eq!(account_name(None, None, None, passwd), "uid unknown");
        // This process has a uid, so it is never "unknown".
        assert_ne!(local_account(), "unknown");
    }
}
