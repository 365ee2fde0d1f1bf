//! The revocation list (`revoked.json`) and [`WatchedRevocations`], which re-reads it when it
//! changes so that a coordinator honours a revocation without a restart.
//!
//! A missing file means nothing is revoked; a malformed one is an error on every check until it
//! is fixed, so a coordinator fails closed.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

use crate::identity::validate_name;
use crate::{PeerIdentity, PkiError, Role};

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// The participant.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex: the stable key checked.
    pub sha256: String,
    /// When it was revoked (RFC 3339).
    pub revoked_at: String,
}

/// `revoked.json`: every revoked certificate of a consortium.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    /// The consortium's name (empty for a missing file).
    pub consortium: String,
    /// The revoked certificates.
    pub revoked: Vec<Revoked>,
}

impl RevocationList {
    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_json(path, &bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(PkiError::io(path, e)),
        }
    }

    /// Parses and checks the JSON read from `path`.
    pub fn from_json(path: &Path, bytes: &[u8]) -> Result<Self, PkiError> {
        Self::parse(bytes).map_err(|reason| PkiError::malformed(path, reason))
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let list: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a revocation list: {e}"))?;
        for (i, r) in list.revoked.iter().enumerate() {
            let at = |field: &str, why: String| format!("revoked[{i}].{field}: {why}");
            validate_name(&r.name).map_err(|e| at("name", e.to_string()))?;
            if r.serial.is_empty() || hex::decode(&r.serial).is_err() {
                return Err(at("serial", format!("{:?} is not hex", r.serial)));
            }
            if r.sha256.len() != 64 || hex::decode(&r.sha256).is_err() {
                return Err(at(
                    "sha256",
                    format!("{:?} is not a SHA-256 in hex", r.sha256),
                ));
            }
        }
        Ok(list)
    }

    /// The list as pretty JSON, ending in a newline.
    pub fn to_json(&self) -> String {
        crate::ca::to_json(self)
    }

    /// Whether the certificate with this DER is revoked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        let sha256 = hex::encode(digest(&SHA256, cert_der));
        self.revoked
            .iter()
            .any(|r| r.sha256.eq_ignore_ascii_case(&sha256))
    }

    /// Whether `name`'s certificate with this serial number (hex) is revoked.
    pub fn is_revoked_serial(&self, name: &str, serial_hex: &str) -> bool {
        self.revoked
            .iter()
            .any(|r| r.name == name && r.serial.eq_ignore_ascii_case(serial_hex))
    }

    /// The entry that revokes `peer`'s certificate (by SHA-256, or by name and serial).
    pub fn find(&self, peer: &PeerIdentity) -> Option<&Revoked> {
        self.revoked.iter().find(|r| {
            r.sha256.eq_ignore_ascii_case(&peer.sha256_hex)
                || (r.name == peer.name && r.serial.eq_ignore_ascii_case(&peer.serial_hex))
        })
    }

    /// `Ok` unless `peer`'s certificate is revoked.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), PkiError> {
        match self.find(peer) {
            None => Ok(()),
            Some(r) => Err(PkiError::Revoked {
                role: peer.role,
                name: peer.name.clone(),
                serial_hex: peer.serial_hex.clone(),
                revoked_at: r.revoked_at.clone(),
            }),
        }
    }
}

/// A file written this recently may change again without its modification time changing (file
/// systems keep coarse times), so it is re-read (and its content hash compared) until it is older.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What `stat` says about the file; any change means it must be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Inode and change time on Unix: an atomic replace always changes the inode.
    inode: u64,
    changed: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Result<Option<Self>, PkiError> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(PkiError::io(path, e)),
        };
        #[cfg(unix)]
        let (inode, changed) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (inode, changed) = (0, (0, 0));
        Ok(Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
            changed,
        }))
    }

    fn is_racy(&self, now: SystemTime) -> bool {
        match self.modified {
            Some(modified) => modified + RACY_WINDOW > now,
            None => true,
        }
    }
}

struct Watch {
    /// The stamp when last read; `None` before the first read.
    seen: Option<Option<Stamp>>,
    /// The last read was too close to the file's modification to trust the stamp.
    racy: bool,
    /// SHA-256 of the bytes last read (`None`: the file was missing).
    digest: Option<[u8; 32]>,
    /// The list, or why the file is malformed.
    loaded: Result<Arc<RevocationList>, String>,
}

/// A revocation list file, re-read whenever it changes.
///
/// Each call costs one `stat`; the file is read again when its length, modification time,
/// inode or change time differ, and parsed again when its content hash differs. A malformed file
/// makes every call fail, naming the file, until it is fixed: callers must refuse the peer then.
pub struct WatchedRevocations {
    path: PathBuf,
    watch: Mutex<Watch>,
}

impl std::fmt::Debug for WatchedRevocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedRevocations")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WatchedRevocations {
    /// Watches `path` and reads it now; an error if it is malformed (a missing file is fine).
    pub fn open(path: &Path) -> Result<Self, PkiError> {
        let watched = Self {
            path: path.to_path_buf(),
            watch: Mutex::new(Watch {
                seen: None,
                racy: true,
                digest: None,
                loaded: Ok(Arc::default()),
            }),
        };
        watched.current()?;
        Ok(watched)
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The list as the file holds it now.
    pub fn current(&self) -> Result<Arc<RevocationList>, PkiError> {
        let stamp = Stamp::of(&self.path)?;
        // Every update below leaves the state whole, so a poisoned lock is still usable.
        let mut watch = match self.watch.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if watch.seen != Some(stamp) || watch.racy {
            let bytes = match std::fs::read(&self.path) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(PkiError::io(&self.path, e)),
            };
            let new_digest = bytes.as_deref().map(sha256);
            if watch.seen.is_none() || new_digest != watch.digest {
                watch.loaded = match bytes {
                    None => Ok(Arc::default()),
                    Some(bytes) => RevocationList::parse(&bytes).map(Arc::new),
                };
                watch.digest = new_digest;
            }
            watch.seen = Some(stamp);
            watch.racy = stamp.is_none_or(|s| s.is_racy(SystemTime::now()));
        }
        watch
            .loaded
            .clone()
            .map_err(|reason| PkiError::malformed(&self.path, reason))
    }

    /// `Ok` unless `peer`'s certificate is revoked or the list cannot be read.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), PkiError> {
        self.current()?.check(peer)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, serial: &str, sha: char) -> PeerIdentity {
        PeerIdentity {
            role: Role::Site,
            name: name.into(),
            serial_hex: serial.into(),
            sha256_hex: sha.to_string().repeat(64),
        }
    }

    fn list_with(name: &str, serial: &str, sha: char) -> RevocationList {
        RevocationList {
            consortium: "Net".into(),
            revoked: vec![Revoked {
                name: name.into(),
                role: Role::Site,
                serial: serial.into(),
                sha256: sha.to_string().repeat(64),
                revoked_at: "2026-11-28T13:00:00Z".into(),
            }],
        }
    }

    #[test]
    fn matches_by_hash_or_by_name_and_serial() {
        let list = list_with("a", "0a0b", 'c');
        assert!(list.find(&peer("x", "ff", 'c')).is_some());
        assert!(list.find(&peer("a", "0A0B", 'd')).is_some());
        assert!(list.find(&peer("b", "0a0b", 'd')).is_none());
        assert!(list.is_revoked_serial("a", "0a0b"));
        let err = list.check(&peer("a", "0a0b", 'd')).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("revoked"), "{err}");
        assert!(!list.is_revoked(b"some other certificate"));
    }

    #[test]
    fn a_missing_file_revokes_nothing_and_a_malformed_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        assert_eq!(
            RevocationList::load(&path).unwrap(),
            RevocationList::default()
        );
        std::fs::write(&path, "{\"consortium\":\"n\",\"revoked\":[{}]}").unwrap();
        let err = RevocationList::load(&path).unwrap_err().to_string();
        assert!(err.contains("revoked.json"), "{err}");
        let mut bad = list_with("a", "zz", 'c');
        std::fs::write(&path, bad.to_json()).unwrap();
        let err = RevocationList::load(&path).unwrap_err().to_string();
        assert!(err.contains("revoked[0].serial"), "{err}");
        bad.revoked[0].serial = "0a".into();
        bad.revoked[0].name = "a b".into();
        std::fs::write(&path, bad.to_json()).unwrap();
        let err = RevocationList::load(&path).unwrap_err().to_string();
        assert!(err.contains("revoked[0].name"), "{err}");
    }

    #[test]
    fn watching_sees_every_change_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let watched = WatchedRevocations::open(&path).unwrap();
        let a = peer("a", "0a", 'c');
        watched.check(&a).unwrap();

        // Written in place, right after the last read: same second, maybe same mtime.
        std::fs::write(&path, list_with("a", "0a", 'c').to_json()).unwrap();
        assert!(matches!(watched.check(&a), Err(PkiError::Revoked { .. })));

        // Same length, different content, in place.
        std::fs::write(&path, list_with("b", "0a", 'e').to_json()).unwrap();
        watched.check(&a).unwrap();

        // Malformed: every check fails, naming the file, until it is fixed.
        std::fs::write(&path, "{ not json").unwrap();
        for _ in 0..2 {
            let err = watched.check(&a).unwrap_err();
            assert!(matches!(err, PkiError::Malformed { .. }), "{err}");
            assert!(err.to_string().contains("revoked.json"), "{err}");
        }
        std::fs::write(&path, list_with("a", "0a", 'c').to_json()).unwrap();
        assert!(matches!(watched.check(&a), Err(PkiError::Revoked { .. })));

        // Removed: nothing is revoked.
        std::fs::remove_file(&path).unwrap();
        watched.check(&a).unwrap();
    }

    #[test]
    fn an_unchanged_file_is_not_parsed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        std::fs::write(&path, list_with("a", "0a", 'c').to_json()).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let watched = WatchedRevocations::open(&path).unwrap();
        let first = watched.current().unwrap();
        let second = watched.current().unwrap();
        assert!(Arc::ptr_eq(&first, &second));
    }
}
