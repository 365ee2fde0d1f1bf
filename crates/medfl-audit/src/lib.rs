//! medfl's audit log: append-only JSON lines, each carrying the SHA-256 of the line before it,
//! so that editing, removing or reordering any line breaks the chain at that line.
//!
//! # Layout
//! - [`AuditLog`]: appends events to a log file, continuing an existing chain.
//! - [`Entry`]: one line as written and read back.
//! - [`verify`] and [`read`]: check a log's chain; read its entries.
//!
//! A line looks like
//! `{"seq":3,"at_ms":1764320000000,"prev":"9f2c…","event":"update_sent","run":"r-1","round":2,"site":"hospital-a","details":{…}}`;
//! the first line's `prev` is 64 zeros.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What can go wrong with an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The chain is broken at a line (1-based).
    #[error("{path}:{line}: {reason}")]
    Broken {
        /// The log.
        path: PathBuf,
        /// First line that does not fit the chain.
        line: u64,
        /// Why.
        reason: String,
    },
}

/// One audit line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When it was written, ms since the Unix epoch.
    pub at_ms: u64,
    /// SHA-256 (hex) of the previous line's bytes.
    pub prev: String,
    /// What happened (`site_registered`, `update_sent`, ...).
    pub event: String,
    /// The run it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The round it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The site it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Event-specific facts (bytes, hashes, tensor names, norms, reasons).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// An event to append.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// What happened.
    pub event: &'static str,
    /// The run it concerns.
    pub run: Option<String>,
    /// The round it concerns.
    pub round: Option<u32>,
    /// The site it concerns.
    pub site: Option<String>,
    /// Event-specific facts.
    pub details: serde_json::Value,
}

impl Event {
    /// An event of kind `event` with `details`.
    pub fn new(event: &'static str, details: serde_json::Value) -> Self {
        Self {
            event,
            details,
            ..Self::default()
        }
    }

    /// Names the run.
    pub fn run(mut self, run: impl Into<String>) -> Self {
        self.run = Some(run.into());
        self
    }

    /// Names the round.
    pub fn round(mut self, round: u32) -> Self {
        self.round = Some(round);
        self
    }

    /// Names the site.
    pub fn site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }
}

fn hash_hex(line: &str) -> String {
    hex::encode(digest(&SHA256, line.as_bytes()))
}

struct Tail {
    file: File,
    prev: String,
    seq: u64,
    /// The last entry's event (empty before any).
    last_event: String,
    /// The file's length after this process last read or wrote it: a different length means
    /// another process appended since.
    len: u64,
}

/// An open audit log, appended to by any thread and by other processes (a site daemon and the
/// hospital's `medfl-site` commands share one log): each append holds an exclusive lock on the
/// file and continues the chain from its actual last line.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
    checkpoints: Option<Checkpoints>,
}

/// Signs a checkpoint's message (Ed25519, with the writer's key).
pub type Signer = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// The writer's signed checkpoints: every `every` entries, the head so far, signed.
struct Checkpoints {
    every: u64,
    key_hex: String,
    sign: Signer,
}

/// The event name of a signed checkpoint.
pub const CHECKPOINT: &str = "checkpoint";

/// What a checkpoint signs: the number of entries before it and the SHA-256 (hex) of the last
/// of them.
pub fn checkpoint_message(entries: u64, head: &str) -> Vec<u8> {
    format!("medfl audit checkpoint\n{entries}\n{head}").into_bytes()
}

impl AuditLog {
    /// Opens (creating) the log at `path`, verifying the chain so far; a broken log is not
    /// appended to.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
        // Shared: no other process is half-way through a line while the chain is checked.
        file.lock_shared().map_err(io)?;
        let checked = read(path).and_then(|entries| {
            let (prev, len) = last_line_hash(path)?;
            Ok((prev, entries.last().map_or(0, |e| e.seq), len))
        });
        file.unlock().map_err(io)?;
        let (prev, seq, len) = checked?;
        Ok(Self {
            path: path.to_path_buf(),
            tail: Mutex::new(Tail {
                file,
                prev,
                seq,
                last_event: String::new(),
                len: if seq == 0 { len } else { 0 },
            }),
            checkpoints: None,
        })
    }

    /// The same log, appending a signed checkpoint after every `every` entries: an entry
    /// `checkpoint` whose details hold the entry count, the head (the SHA-256 of the entry before
    /// it), the public key `key_hex` and `sign`'s signature of [`checkpoint_message`]. Anyone with
    /// the public key can then tell that no entry up to the last checkpoint was rewritten, even
    /// by someone who rebuilt the hash chain ([`verify_checkpoints`]).
    pub fn with_checkpoints(mut self, every: u64, key_hex: String, sign: Signer) -> Self {
        self.checkpoints = Some(Checkpoints {
            every: every.max(1),
            key_hex,
            sign,
        });
        self
    }

    /// Appends a signed checkpoint now (at a clean shutdown, say), if the log signs them and the
    /// last entry is not one already.
    pub fn checkpoint(&self, at_ms: u64) -> Result<(), AuditError> {
        self.locked(|tail| match (&self.checkpoints, self.catch_up(tail)?) {
            (Some(_), Some(last)) if last != CHECKPOINT => self.write_checkpoint(tail, at_ms),
            _ => Ok(()),
        })
    }

    /// Runs `f` on the tail with the file locked against other processes.
    fn locked(
        &self,
        f: impl FnOnce(&mut Tail) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let mut tail = match self.tail.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        tail.file.lock().map_err(io)?;
        let done = f(&mut tail);
        tail.file.unlock().map_err(io)?;
        done
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` at time `at_ms`, flushed to disk before returning.
    pub fn append(&self, event: Event, at_ms: u64) -> Result<(), AuditError> {
        self.locked(|tail| self.append_locked(tail, event, at_ms))
    }

    /// Appends under the file lock, first catching up with lines other processes added; then a
    /// checkpoint when one is due.
    fn append_locked(&self, tail: &mut Tail, event: Event, at_ms: u64) -> Result<(), AuditError> {
        self.catch_up(tail)?;
        self.write(tail, event, at_ms)?;
        if let Some(c) = &self.checkpoints {
            if tail.seq % (c.every + 1) == c.every {
                self.write_checkpoint(tail, at_ms)?;
            }
        }
        Ok(())
    }

    /// Reads the chain's tail again if another process appended since; returns the last
    /// entry's event.
    fn catch_up(&self, tail: &mut Tail) -> Result<Option<String>, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let len = tail.file.metadata().map_err(io)?.len();
        if len == tail.len && tail.len > 0 {
            return Ok(Some(tail.last_event.clone()));
        }
        match last_line(&self.path)? {
            Some((n, line)) => {
                let last: Entry = serde_json::from_str(&line).map_err(|e| AuditError::Broken {
                    path: self.path.clone(),
                    line: n,
                    reason: format!("last line is not an audit entry: {e}"),
                })?;
                (tail.prev, tail.seq) = (hash_hex(&line), last.seq);
                tail.last_event = last.event.clone();
                tail.len = len;
                Ok(Some(last.event))
            }
            None => {
                (tail.prev, tail.seq) = (GENESIS.to_string(), 0);
                Ok(None)
            }
        }
    }

    /// A signed checkpoint of the chain so far.
    fn write_checkpoint(&self, tail: &mut Tail, at_ms: u64) -> Result<(), AuditError> {
        let Some(c) = &self.checkpoints else {
            return Ok(());
        };
        let signature = (c.sign)(&checkpoint_message(tail.seq, &tail.prev));
        let details = serde_json::json!({
            "entries": tail.seq,
            "head": tail.prev,
            "key": c.key_hex,
            "signature": hex::encode(signature),
        });
        self.write(tail, Event::new(CHECKPOINT, details), at_ms)
    }

    /// Writes one entry after the tail, flushed to disk.
    fn write(&self, tail: &mut Tail, event: Event, at_ms: u64) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let entry = Entry {
            seq: tail.seq + 1,
            at_ms,
            prev: tail.prev.clone(),
            event: event.event.to_string(),
            run: event.run,
            round: event.round,
            site: event.site,
            details: event.details,
        };
        // Serialising plain data to JSON cannot fail.
        let line = serde_json::to_string(&entry).unwrap_or_default();
        tail.file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| tail.file.sync_data())
            .map_err(io)?;
        tail.len = tail.file.metadata().map_err(io)?.len();
        tail.prev = hash_hex(&line);
        tail.seq = entry.seq;
        tail.last_event = entry.event;
        Ok(())
    }
}

/// The `prev` the next line must carry, and the file's length.
fn last_line_hash(path: &Path) -> Result<(String, u64), AuditError> {
    let len = std::fs::metadata(path)
        .map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let prev = last_line(path)?
        .map(|(_, l)| hash_hex(&l))
        .unwrap_or_else(|| GENESIS.into());
    Ok((prev, len))
}

/// The file's last line and its number (1-based).
fn last_line(path: &Path) -> Result<Option<(u64, String)>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut last = None;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        last = Some((i as u64 + 1, line));
    }
    Ok(last)
}

/// Reads every entry, checking the chain; the error names the first line that breaks it.
pub fn read(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let mut entries = Vec::new();
    walk(path, |_, entry| entries.push(entry))?;
    Ok(entries)
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries (lines).
    pub entries: u64,
    /// SHA-256 (hex) of the last line: what the next entry's `prev` will be. Kept elsewhere, it
    /// shows later whether the log was truncated or its tail rewritten.
    pub head: String,
    /// The entry (1-based) whose line has the hash asked for, if any does.
    pub found: Option<u64>,
}

/// Checks the chain and returns its length and head, and where the line hashing to `find`
/// (an earlier head) is. The error names the first line that breaks the chain.
pub fn verify(path: &Path, find: Option<&str>) -> Result<Verified, AuditError> {
    let mut verified = Verified {
        entries: 0,
        head: GENESIS.to_string(),
        found: None,
    };
    walk(path, |hash, entry| {
        verified.entries = entry.seq;
        if find.is_some_and(|f| f.eq_ignore_ascii_case(hash)) {
            verified.found = Some(entry.seq);
        }
        verified.head = hash.to_string();
    })?;
    Ok(verified)
}

/// What [`verify_checkpoints`] found: every checkpoint's signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    /// Checkpoints in the log.
    pub checkpoints: u64,
    /// The last checkpoint's entry number and time (ms since the epoch).
    pub last: Option<(u64, u64)>,
    /// Entries after the last checkpoint (all of them when there is none): only these could
    /// have been rewritten by someone without the key who rebuilt the chain.
    pub after_last: u64,
}

/// Checks the chain and every checkpoint in it against `public_key` (Ed25519): each must sign
/// the entry count and head just before it. The error names the first line that fails.
pub fn verify_checkpoints(path: &Path, public_key: &[u8]) -> Result<Checkpointed, AuditError> {
    use ring::signature::{UnparsedPublicKey, ED25519};
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let mut found = Checkpointed {
        checkpoints: 0,
        last: None,
        after_last: 0,
    };
    let mut failure: Option<(u64, String)> = None;
    walk(path, |_, entry| {
        if failure.is_some() {
            return;
        }
        if entry.event != CHECKPOINT {
            found.after_last += 1;
            return;
        }
        let d = &entry.details;
        let (entries, head) = (d["entries"].as_u64(), d["head"].as_str());
        let signature = d["signature"].as_str().and_then(|s| hex::decode(s).ok());
        let why = match (entries, head, signature) {
            (Some(n), Some(head), Some(sig))
                if n.checked_add(1) == Some(entry.seq) && head == entry.prev =>
            {
                key.verify(&checkpoint_message(n, head), &sig)
                    .err()
                    .map(|_| "its signature does not verify with the key given".to_string())
            }
            (Some(_), Some(_), Some(_)) => {
                Some("it does not sign the entry count and head just before it".into())
            }
            _ => Some("it lacks its entry count, head or signature".into()),
        };
        match why {
            Some(why) => failure = Some((entry.seq, format!("checkpoint: {why}"))),
            None => {
                found.checkpoints += 1;
                found.last = Some((entry.seq, entry.at_ms));
                found.after_last = 0;
            }
        }
    })?;
    match failure {
        Some((line, reason)) => Err(AuditError::Broken {
            path: path.to_path_buf(),
            line,
            reason,
        }),
        None => Ok(found),
    }
}

/// Walks the log line by line, checking each line's `prev` and sequence number, and hands
/// each entry with its line's hash to `each`.
fn walk(path: &Path, mut each: impl FnMut(&str, Entry)) -> Result<(), AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let broken = |line: u64, reason: String| AuditError::Broken {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut prev = GENESIS.to_string();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| broken(n, format!("unreadable: {e}")))?;
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| broken(n, format!("not an audit entry: {e}")))?;
        if entry.prev != prev {
            return Err(broken(
                n,
                "its `prev` is not the SHA-256 of the line before: that line was changed, \
                 removed or inserted"
                    .into(),
            ));
        }
        if entry.seq != n {
            return Err(broken(
                n,
                format!("sequence number {} where {n} was expected", entry.seq),
            ));
        }
        prev = hash_hex(&line);
        each(&prev, entry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        log.append(
            Event::new("site_registered", json!({"coordinator": "c"})).site("a"),
            1,
        )
        .unwrap();
        log.append(
            Event::new("update_sent", json!({"bytes": 10}))
                .run("r")
                .round(1)
                .site("a"),
            2,
        )
        .unwrap();
        log.append(Event::new("run_stopped", json!({})).run("r"), 3)
            .unwrap();
        path
    }

    #[test]
    fn a_written_log_verifies_and_reopens_to_continue_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let v = verify(&path, None).unwrap();
        assert_eq!((v.entries, v.found), (3, None));
        // The head is the last line's hash, found where it is.
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert_eq!(v.head, hash_hex(last));
        assert_eq!(verify(&path, Some(&v.head)).unwrap().found, Some(3));
        let log = AuditLog::open(&path).unwrap();
        log.append(Event::new("x", json!(null)), 4).unwrap();
        let entries = read(&path).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].run.as_deref(), Some("r"));
        assert_eq!(entries[1].details["bytes"], 10);
        assert_eq!(entries[0].prev, GENESIS);
    }

    #[test]
    fn two_writers_on_one_file_keep_one_chain() {
        // As a site daemon and the hospital's command line do: each handle has its own open
        // file, and neither knows what the other wrote.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let daemon = AuditLog::open(&path).unwrap();
        let command = AuditLog::open(&path).unwrap();
        for i in 0..4 {
            daemon.append(Event::new("d", json!(i)), i).unwrap();
            command.append(Event::new("c", json!(i)), i).unwrap();
            command.append(Event::new("c", json!(i)), i).unwrap();
        }
        let entries = read(&path).unwrap();
        assert_eq!(entries.len(), 12);
        let events: String = entries.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(events, "dccdccdccdcc");
    }

    #[test]
    fn editing_removing_or_inserting_a_line_is_caught_at_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let check = |lines: Vec<String>, want: u64| {
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            match verify(&path, None) {
                Err(AuditError::Broken { line, .. }) => assert_eq!(line, want),
                other => panic!("expected a break at line {want}, got {other:?}"),
            }
        };
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // An edited byte in line 2 breaks line 3's link.
        let mut edited = own(&lines);
        edited[1] = edited[1].replace("\"bytes\":10", "\"bytes\":11");
        check(edited, 3);
        // Removing line 2.
        check(own(&[lines[0], lines[2]]), 2);
        // Swapping lines 2 and 3.
        check(own(&[lines[0], lines[2], lines[1]]), 2);
        // Garbage.
        check(own(&[lines[0], "{not json"]), 2);
        // A broken log is not appended to.
        assert!(AuditLog::open(&path).is_err());
    }

    fn signed(dir: &Path, every: u64) -> (PathBuf, AuditLog, Vec<u8>) {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap().with_checkpoints(
            every,
            hex::encode(&public),
            Box::new(move |m| key.sign(m).as_ref().to_vec()),
        );
        (path, log, public)
    }

    #[test]
    fn signed_checkpoints_catch_a_rebuilt_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log, public) = signed(dir.path(), 3);
        for i in 0..7 {
            log.append(Event::new("update_accepted", json!({ "i": i })), i)
                .unwrap();
        }
        log.checkpoint(99).unwrap();
        log.checkpoint(100).unwrap(); // nothing new: no second checkpoint in a row
        let entries = read(&path).unwrap();
        let events: Vec<&str> = entries.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            events,
            [
                "update_accepted",
                "update_accepted",
                "update_accepted",
                CHECKPOINT,
                "update_accepted",
                "update_accepted",
                "update_accepted",
                CHECKPOINT,
                "update_accepted",
                CHECKPOINT
            ]
        );
        let found = verify_checkpoints(&path, &public).unwrap();
        assert_eq!(
            (found.checkpoints, found.last, found.after_last),
            (3, Some((10, 99)), 0)
        );

        // Someone with write access but not the key edits entry 2 and rebuilds the chain: the
        // hash chain verifies again, the first checkpoint after the edit does not.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev = GENESIS.to_string();
        let mut rebuilt = String::new();
        for line in text.lines() {
            let mut e: Entry = serde_json::from_str(line).unwrap();
            if e.seq == 2 {
                e.details = json!({ "i": 1000 });
            }
            e.prev = prev.clone();
            let line = serde_json::to_string(&e).unwrap();
            prev = hash_hex(&line);
            rebuilt += &format!("{line}\n");
        }
        std::fs::write(&path, rebuilt).unwrap();
        verify(&path, None).unwrap();
        let err = verify_checkpoints(&path, &public).unwrap_err().to_string();
        assert!(err.contains(":4: checkpoint:"), "{err}");
        // Another key does not verify the original either.
        let other = [7u8; 32];
        assert!(verify_checkpoints(&path, &other).is_err());
    }
}
