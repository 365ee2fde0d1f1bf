//! The site's dataset registry: datasets registered by name with `medfl-site dataset add`, kept
//! in `data_dir/datasets.json` beside those in the config file. Run specs name datasets, never
//! paths; the coordinator only ever learns names and column headers.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::DatasetConfig;
use crate::SiteError;

fn path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("datasets.json")
}

/// When and how big the registry file was last written (`None` while there is none), for a
/// running daemon to notice `medfl-site dataset add|remove` cheaply.
pub fn stamp(data_dir: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path(data_dir)).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The registered datasets (none when nothing was registered).
pub fn load(data_dir: &Path) -> Result<BTreeMap<String, DatasetConfig>, SiteError> {
    let file = path(data_dir);
    match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| SiteError::Config(format!("{}: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(SiteError::io(format!("reading {}", file.display()), e)),
    }
}

fn save(data_dir: &Path, datasets: &BTreeMap<String, DatasetConfig>) -> Result<(), SiteError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| SiteError::io(format!("creating {}", data_dir.display()), e))?;
    let file = path(data_dir);
    let tmp = data_dir.join("datasets.json.tmp");
    let text = serde_json::to_string_pretty(datasets)
        .map_err(|e| SiteError::Config(format!("datasets: {e}")))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| SiteError::io(format!("writing {}", file.display()), e))
}

/// Registers `dataset` as `name` after checking that it loads; the path is stored absolute.
/// Refuses a name the config file or the registry already uses.
pub fn add(
    data_dir: &Path,
    configured: &BTreeMap<String, DatasetConfig>,
    name: &str,
    mut dataset: DatasetConfig,
) -> Result<usize, SiteError> {
    if configured.contains_key(name) {
        return Err(SiteError::Command(format!(
            "dataset `{name}` is already defined in the config file"
        )));
    }
    let mut registry = load(data_dir)?;
    if registry.contains_key(name) {
        return Err(SiteError::Command(format!(
            "dataset `{name}` is already registered (remove it first)"
        )));
    }
    dataset.path = std::path::absolute(&dataset.path)
        .map_err(|e| SiteError::io(format!("resolving {}", dataset.path.display()), e))?;
    let rows = crate::worker::Dataset::load(&dataset.format, &dataset.path)?.len();
    registry.insert(name.to_string(), dataset);
    save(data_dir, &registry)?;
    Ok(rows)
}

/// Forgets dataset `name`.
pub fn remove(data_dir: &Path, name: &str) -> Result<(), SiteError> {
    let mut registry = load(data_dir)?;
    if registry.remove(name).is_none() {
        return Err(SiteError::Command(format!(
            "no registered dataset `{name}`"
        )));
    }
    save(data_dir, &registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets_are_registered_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, "x,y\n1,0\n2,1\n").unwrap();
        let ds = |path: &Path, format: &str| DatasetConfig {
            path: path.to_path_buf(),
            format: format.into(),
        };
        let none = BTreeMap::new();
        assert_eq!(add(dir.path(), &none, "a", ds(&csv, "csv")).unwrap(), 2);
        assert!(add(dir.path(), &none, "a", ds(&csv, "csv")).is_err());
        let bad = dir.path().join("b.jsonl");
        std::fs::write(&bad, "{not json\n").unwrap();
        let err = add(dir.path(), &none, "b", ds(&bad, "jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.jsonl:1"), "{err}");
        let configured = BTreeMap::from([("c".to_string(), ds(&csv, "csv"))]);
        assert!(add(dir.path(), &configured, "c", ds(&csv, "csv")).is_err());
        assert_eq!(load(dir.path()).unwrap().len(), 1);
        remove(dir.path(), "a").unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        assert!(remove(dir.path(), "a").is_err());
    }
}
