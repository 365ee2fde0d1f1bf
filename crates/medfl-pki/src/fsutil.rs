//! File helpers: private files created with mode 0600, atomic replacement, errors naming the path.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::PkiError;

/// Reads a whole file as text.
pub(crate) fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| PkiError::io(path, e))
}

/// Creates `path`, which must not exist, and writes `bytes` to it. A `private` file is created
/// with mode 0600 on Unix, so it is never readable by others, not even while being written.
pub(crate) fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| PkiError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| PkiError::io(path, e))
}

/// Replaces `path` with `bytes` atomically: readers see the old file or the new one, never a
/// half-written one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(PkiError::io(&tmp, e)),
    }
    write_new(&tmp, bytes, false)?;
    fs::rename(&tmp, path).map_err(|e| PkiError::io(path, e))
}

/// Whether `dir` is absent or an empty directory.
pub(crate) fn dir_is_free(dir: &Path) -> Result<bool, PkiError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) => Err(PkiError::io(dir, e)),
    }
}

/// Creates `dir` (and its parents); on Unix `dir` itself gets mode 0700 if it is new.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| PkiError::io(parent, e))?;
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(PkiError::io(dir, e)),
    }
}

/// `t` as RFC 3339 in UTC, to the second (`2026-11-28T13:30:00Z`).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    let t = OffsetDateTime::from_unix_timestamp(t.unix_timestamp()).unwrap_or(t);
    // Formatting fails only for years outside 0..=9999, which no certificate here has.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The current time as RFC 3339.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_refuses_to_overwrite_and_private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_new(&path, b"secret", true).unwrap();
        assert!(matches!(
            write_new(&path, b"other", true),
            Err(PkiError::Io { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"1").unwrap();
        write_atomic(&path, b"22").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"22");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn rfc3339_is_to_the_second() {
        let t = OffsetDateTime::from_unix_timestamp(1_764_336_600).unwrap()
            + time::Duration::milliseconds(250);
        assert_eq!(rfc3339(t), "2025-11-28T13:30:00Z");
    }
}
