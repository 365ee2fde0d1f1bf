//! The coordinator's durable state in SQLite (WAL): sites, runs, committed rounds, per-site
//! results and refusals. Model bytes live in the blob store; rows hold their hashes, and
//! `blob_refs` says who owns each blob (a file goes only when its last reference does).

use std::collections::BTreeMap;
use std::path::Path;

use medfl_core::run::{RunStatus, SiteOutcome};
use medfl_core::run_machine::UnfinishedEvaluation;
use medfl_core::spec::DatasetInfo;
use rusqlite::{params, Connection, OptionalExtension};

use crate::CoordinatorError;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    datasets TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    rounds_total INTEGER NOT NULL,
    initial_sha256 TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    creator TEXT NOT NULL DEFAULT '',
    creator_role TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    sites_selected INTEGER NOT NULL,
    sites_reported INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    eval_metrics TEXT NOT NULL DEFAULT '{}',
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    global_sha256 TEXT NOT NULL,
    opt_state TEXT NOT NULL DEFAULT '',
    evaluated INTEGER NOT NULL DEFAULT 1,
    privacy_epsilon REAL,
    client_epsilon REAL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS site_results (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    site TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    examples INTEGER NOT NULL DEFAULT 0,
    train_loss REAL NOT NULL DEFAULT 0,
    update_sha256 TEXT NOT NULL DEFAULT '',
    eval_examples INTEGER NOT NULL DEFAULT 0,
    eval_metrics TEXT NOT NULL DEFAULT '{}',
    at_ms INTEGER NOT NULL,
    eval_done INTEGER NOT NULL DEFAULT 0,
    privacy_epsilon REAL
);
CREATE INDEX IF NOT EXISTS site_results_by_round ON site_results (run_id, round);
CREATE TABLE IF NOT EXISTS refusals (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, attempt, site, kind)
);
CREATE TABLE IF NOT EXISTS blob_refs (
    sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL,
    role TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sha256, run_id, role, round, site, attempt)
);
CREATE INDEX IF NOT EXISTS blob_refs_by_run ON blob_refs (run_id);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id TEXT NOT NULL,
    global_sha256 TEXT NOT NULL,
    site TEXT NOT NULL,
    examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cross_site (
    run_id TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    global_sha256 TEXT NOT NULL,
    sites TEXT NOT NULL,
    opened_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL
);
"#;

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 8;

/// What a blob is to the run that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlobRole {
    /// The run's initial global model (round 0).
    Initial,
    /// The global model committed by a round.
    Global,
    /// A site's update in one attempt of a round.
    Update,
    /// The server optimizer's first moment after a round.
    OptimizerM,
    /// The server optimizer's second moment after a round.
    OptimizerV,
}

impl BlobRole {
    /// The name stored in `blob_refs.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobRole::Initial => "initial",
            BlobRole::Global => "global",
            BlobRole::Update => "update",
            BlobRole::OptimizerM => "optimizer_m",
            BlobRole::OptimizerV => "optimizer_v",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            BlobRole::Initial,
            BlobRole::Global,
            BlobRole::Update,
            BlobRole::OptimizerM,
            BlobRole::OptimizerV,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// Whether the blob is a global model (initial or committed), which sites and researchers
    /// may download.
    pub fn is_model(self) -> bool {
        matches!(self, BlobRole::Initial | BlobRole::Global)
    }
}

/// One owner of a blob: a run, the blob's role in it, and for updates which site sent it in
/// which attempt.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlobRef {
    /// The blob.
    pub sha256: String,
    /// The run holding it.
    pub run_id: String,
    /// What it is to the run.
    pub role: BlobRole,
    /// The round (0 for the initial model).
    pub round: u32,
    /// The sending site (updates only).
    pub site: String,
    /// The attempt (updates only).
    pub attempt: u32,
}

impl BlobRef {
    /// A model or optimizer state of `run_id` at `round`.
    pub fn of_round(sha256: &str, run_id: &str, role: BlobRole, round: u32) -> Self {
        Self {
            sha256: sha256.to_string(),
            run_id: run_id.to_string(),
            role,
            round,
            site: String::new(),
            attempt: 0,
        }
    }

    /// `site`'s update in `attempt` of `round`.
    pub fn update(sha256: &str, run_id: &str, round: u32, attempt: u32, site: &str) -> Self {
        Self {
            site: site.to_string(),
            attempt,
            ..Self::of_round(sha256, run_id, BlobRole::Update, round)
        }
    }
}

/// A stored value that does not parse: names its table, row and column.
#[derive(Debug)]
struct BadRow(String);

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRow {}

fn bad_row(column: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        Box::new(BadRow(what)),
    )
}

/// A site as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRecord {
    /// Site name.
    pub name: String,
    /// SHA-256 of its secret token.
    pub token_sha256: String,
    /// Datasets it advertised.
    pub datasets: Vec<DatasetInfo>,
    /// First registration.
    pub registered_ms: u64,
    /// Last call.
    pub last_seen_ms: u64,
    /// Its Ed25519 public key, pinned at first registration (empty before signing existed).
    pub signing_key: Vec<u8>,
    /// Rows of each dataset, as it last registered them: kept so that a claimed example count
    /// is checked after a restart too.
    pub rows: BTreeMap<String, u64>,
    /// Images per class of each image dataset, as it last registered them.
    pub classes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Run id.
    pub id: String,
    /// Human name from the spec.
    pub name: String,
    /// The spec as TOML.
    pub spec: String,
    /// Status.
    pub status: RunStatus,
    /// Rounds asked for.
    pub rounds_total: u32,
    /// The initial global model.
    pub initial_sha256: String,
    /// Creation time.
    pub created_ms: u64,
    /// Why it failed, if it did.
    pub error: String,
    /// Who created it: its certificate's name (empty without TLS, or from before owners).
    pub creator: String,
    /// That certificate's role (`researcher`, `operator`).
    pub creator_role: String,
    /// When it ended (`None` while it runs, and for runs that ended before this was kept).
    pub ended_ms: Option<u64>,
    /// Federated standardisation: the pooled feature statistics (JSON), once gathered.
    pub standardization: Option<String>,
}

/// A committed round.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundRecord {
    /// Round number.
    pub round: u32,
    /// Attempts it took.
    pub attempts: u32,
    /// Sites selected in the successful attempt.
    pub sites_selected: u32,
    /// Sites whose update counted.
    pub sites_reported: u32,
    /// Sum of their example counts.
    pub examples: u64,
    /// Example-weighted mean training loss.
    pub train_loss: f64,
    /// Example-weighted mean validation metrics of the new global model.
    pub eval_metrics: BTreeMap<String, f64>,
    /// When the first attempt started.
    pub started_ms: u64,
    /// When the round was committed.
    pub finished_ms: u64,
    /// Global-model bytes sent to sites.
    pub bytes_down: u64,
    /// Update bytes received.
    pub bytes_up: u64,
    /// The new global model.
    pub global_sha256: String,
    /// Server optimizer state (JSON of moment blob ids), empty for stateless strategies.
    pub opt_state: String,
    /// The largest record-level ε a counted site reported for the run so far.
    pub privacy_epsilon: Option<f64>,
    /// Client-level DP: the ε the run has spent on any one site after this round.
    pub client_epsilon: Option<f64>,
}

/// A site's dataset as stored: `[name, columns, rows, classes]`, or `[name, columns, rows]`
/// without class counts (tables, texts, and image datasets stored before they were kept); rows
/// that registered before row counts were kept are `[name, columns]` (rows unknown until the
/// site registers again).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum StoredDataset {
    WithClasses(String, Vec<String>, u64, BTreeMap<String, u64>),
    WithRows(String, Vec<String>, u64),
    Named(String, Vec<String>),
}

/// One site's result in one attempt of a round (accepted, refused, missing, failed).
#[derive(Debug, Clone, PartialEq)]
pub struct SiteResult {
    /// Round.
    pub round: u32,
    /// Attempt.
    pub attempt: u32,
    /// Site.
    pub site: String,
    /// What came of it.
    pub outcome: SiteOutcome,
    /// Why, for anything but `accepted`.
    pub reason: String,
    /// Reported example count.
    pub examples: u64,
    /// Reported training loss.
    pub train_loss: f64,
    /// The site's record-level ε for the run with this update, when it trains with DP-SGD.
    pub privacy_epsilon: Option<f64>,
    /// The update's blob id (accepted updates).
    pub update_sha256: String,
    /// Validation examples of its evaluation.
    pub eval_examples: u64,
    /// Its evaluation of the round's new global model.
    pub eval_metrics: BTreeMap<String, f64>,
    /// Times it happened (refusals of one kind are counted in one result; else 1).
    pub count: u64,
}

impl SiteResult {
    /// A result with no reason, examples or metrics yet.
    pub fn new(round: u32, attempt: u32, site: &str, outcome: SiteOutcome) -> Self {
        Self {
            round,
            attempt,
            site: site.to_string(),
            outcome,
            reason: String::new(),
            examples: 0,
            train_loss: 0.0,
            privacy_epsilon: None,
            update_sha256: String::new(),
            eval_examples: 0,
            eval_metrics: BTreeMap::new(),
            count: 1,
        }
    }
}

/// What refusals of one site are counted under: the reason with its numbers and hashes taken
/// out, so a site that repeats one mistake (each time with another count, size or hash) adds
/// to one counter instead of a row each.
pub fn refusal_kind(reason: &str) -> String {
    let mut kind = String::new();
    let mut chars = reason.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_hexdigit() {
            let mut token = String::from(c);
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_hexdigit()) {
                token.push(d);
                chars.next();
            }
            if token.len() >= 16 {
                kind.push('@');
            } else if token.bytes().all(|b| b.is_ascii_digit()) {
                kind.push('#');
            } else {
                kind.push_str(&token);
            }
        } else {
            kind.push(c);
        }
        if kind.len() >= 160 {
            break;
        }
    }
    kind
}

/// One site's evaluation of a run's final model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    /// The model scored.
    pub global_sha256: String,
    /// Site.
    pub site: String,
    /// Validation examples.
    pub examples: u64,
    /// Metrics.
    pub metrics: BTreeMap<String, f64>,
    /// When it arrived.
    pub at_ms: u64,
}

/// A cross-site evaluation collecting answers, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenCrossSite {
    /// The run whose final model is scored.
    pub run_id: String,
    /// The evaluation's number.
    pub number: u32,
    /// The model scored.
    pub global_sha256: String,
    /// Sites asked that have not answered (answers stored since it opened are left out).
    pub owed: Vec<String>,
    /// When it gives up, wall time.
    pub deadline_ms: u64,
}

/// The state database.
pub struct Store {
    conn: Connection,
}

fn metrics_json(m: &BTreeMap<String, f64>) -> String {
    // Finite f64 values keyed by strings always serialise; non-finite ones are refused on input.
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

/// Metrics stored in column `column` of `row` (named for the error).
fn metrics_from(
    r: &rusqlite::Row<'_>,
    column: usize,
    row: impl Fn() -> String,
) -> rusqlite::Result<BTreeMap<String, f64>> {
    let text: String = r.get(column)?;
    serde_json::from_str(&text)
        .map_err(|e| bad_row(column, format!("{}: metrics do not parse: {e}", row())))
}

impl Store {
    /// Opens (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> Result<Self, CoordinatorError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A burst of writes while a checkpoint could not finish leaves a long WAL behind:
        // truncated back to 4 MiB (about SQLite's checkpoint point) once it is reset.
        conn.pragma_update(None, "journal_size_limit", 4 << 20)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(CoordinatorError::Config(format!(
                "{}: state schema version {version} is newer than this coordinator's \
                 ({SCHEMA_VERSION}); run the newer coordinator",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        // Databases from before update signing lack the sites' keys.
        let has_key: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('sites') WHERE name = 'signing_key'")?
            .exists([])?;
        if !has_key {
            conn.execute_batch(
                "ALTER TABLE sites ADD COLUMN signing_key BLOB NOT NULL DEFAULT x''",
            )?;
        }
        if version < 1 {
            // Version 1 gives blobs owners: every model, optimizer state and accepted update
            // the old tables name becomes a reference.
            conn.execute_batch(
                "BEGIN;
                 INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round)
                     SELECT initial_sha256, id, 'initial', 0 FROM runs;
                 INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round)
                     SELECT global_sha256, run_id, 'global', round FROM rounds;
                 INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round)
                     SELECT json_extract(opt_state, '$.m'), run_id, 'optimizer_m', round
                     FROM rounds WHERE opt_state != '' AND json_extract(opt_state, '$.m') IS NOT NULL;
                 INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round)
                     SELECT json_extract(opt_state, '$.v'), run_id, 'optimizer_v', round
                     FROM rounds WHERE opt_state != '' AND json_extract(opt_state, '$.v') IS NOT NULL;
                 INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round, site, attempt)
                     SELECT update_sha256, run_id, 'update', round, site, attempt
                     FROM site_results WHERE outcome = 'accepted' AND update_sha256 != '';
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if version < 2 {
            // Version 2 keeps evaluations open across restarts: whether each committed round's
            // evaluation finished (rounds before it did), which sites answered it, and the open
            // cross-site evaluations (their table is created above).
            let has = |table: &str, column: &str| -> Result<bool, CoordinatorError> {
                Ok(conn
                    .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
                    .exists(params![table, column])?)
            };
            let mut steps = String::from("BEGIN;\n");
            if !has("rounds", "evaluated")? {
                steps += "ALTER TABLE rounds ADD COLUMN evaluated INTEGER NOT NULL DEFAULT 1;\n";
            }
            if !has("site_results", "eval_done")? {
                steps +=
                    "ALTER TABLE site_results ADD COLUMN eval_done INTEGER NOT NULL DEFAULT 0;\n";
            }
            steps += "PRAGMA user_version = 2;\nCOMMIT;";
            conn.execute_batch(&steps)?;
        }
        if version < 3 {
            // Version 3 gives runs an owner and counts refusals (their table is created
            // above); refusals stored one row each before stay as they are.
            let has: bool = conn
                .prepare("SELECT 1 FROM pragma_table_info('runs') WHERE name = 'creator'")?
                .exists([])?;
            let mut steps = String::from("BEGIN;\n");
            if !has {
                steps += "ALTER TABLE runs ADD COLUMN creator TEXT NOT NULL DEFAULT '';\n\
                          ALTER TABLE runs ADD COLUMN creator_role TEXT NOT NULL DEFAULT '';\n";
            }
            steps += "PRAGMA user_version = 3;\nCOMMIT;";
            conn.execute_batch(&steps)?;
        }
        // Version 4 keeps the record-level ε a site reported with each update, version 5 each
        // round's largest, version 6 each round's client-level ε, version 7 when a run ended,
        // version 8 a run's pooled feature statistics (federated standardisation).
        for (to, table, column, kind) in [
            (4, "site_results", "privacy_epsilon", "REAL"),
            (5, "rounds", "privacy_epsilon", "REAL"),
            (6, "rounds", "client_epsilon", "REAL"),
            (7, "runs", "ended_ms", "INTEGER"),
            (8, "runs", "standardization", "TEXT"),
        ] {
            if version < to {
                let has: bool = conn
                    .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
                    .exists(params![table, column])?;
                let mut steps = String::from("BEGIN;\n");
                if !has {
                    steps += &format!("ALTER TABLE {table} ADD COLUMN {column} {kind};\n");
                }
                steps += &format!("PRAGMA user_version = {to};\nCOMMIT;");
                conn.execute_batch(&steps)?;
            }
        }
        Ok(Self { conn })
    }

    /// Records an owner of a blob (recording it twice is harmless).
    pub fn add_ref(&self, r: &BlobRef) -> Result<(), CoordinatorError> {
        Self::insert_ref(&self.conn, r)
    }

    fn insert_ref(conn: &Connection, r: &BlobRef) -> Result<(), CoordinatorError> {
        conn.execute(
            "INSERT OR IGNORE INTO blob_refs (sha256, run_id, role, round, site, attempt)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                r.sha256,
                r.run_id,
                r.role.as_str(),
                r.round,
                r.site,
                r.attempt
            ],
        )?;
        Ok(())
    }

    /// Drops these references (in one transaction); returns the blobs they named, which the
    /// caller offers to [`crate::blobs::BlobStore::collect`].
    pub fn release(&mut self, refs: &[BlobRef]) -> Result<Vec<String>, CoordinatorError> {
        let tx = self.conn.transaction()?;
        let shas = Self::delete_refs(&tx, refs)?;
        tx.commit()?;
        Ok(shas)
    }

    /// Deletes `refs` inside `tx`; returns the distinct blobs they named.
    fn delete_refs(tx: &Connection, refs: &[BlobRef]) -> Result<Vec<String>, CoordinatorError> {
        for r in refs {
            tx.execute(
                "DELETE FROM blob_refs WHERE sha256 = ?1 AND run_id = ?2 AND role = ?3
                     AND round = ?4 AND site = ?5 AND attempt = ?6",
                params![
                    r.sha256,
                    r.run_id,
                    r.role.as_str(),
                    r.round,
                    r.site,
                    r.attempt
                ],
            )?;
        }
        let mut shas: Vec<String> = refs.iter().map(|r| r.sha256.clone()).collect();
        shas.sort();
        shas.dedup();
        Ok(shas)
    }

    /// Records a run's end and drops the references it lets go of, in one transaction, so a
    /// crash leaves either the running run with its blobs or the ended one without them (files
    /// no reference holds are deleted afterwards, or at the next start). Returns the blobs the
    /// references named.
    pub fn end_run(
        &mut self,
        id: &str,
        status: RunStatus,
        error: &str,
        release: &[BlobRef],
        ended_ms: u64,
    ) -> Result<Vec<String>, CoordinatorError> {
        let tx = self.conn.transaction()?;
        let shas = Self::delete_refs(&tx, release)?;
        tx.execute(
            "UPDATE runs SET status = ?2, error = ?3, ended_ms = ?4 WHERE id = ?1",
            params![id, status.as_str(), error, ended_ms as i64],
        )?;
        tx.commit()?;
        Ok(shas)
    }

    /// Stores run `id`'s pooled feature statistics (JSON), once.
    pub fn set_standardization(&self, id: &str, json: &str) -> Result<(), CoordinatorError> {
        let n = self.conn.execute(
            "UPDATE runs SET standardization = ?2 WHERE id = ?1 AND standardization IS NULL",
            params![id, json],
        )?;
        if n != 1 {
            return Err(CoordinatorError::Internal(format!(
                "run `{id}`: its feature statistics are stored already, or it does not exist"
            )));
        }
        Ok(())
    }

    /// Every reference held by run `run_id`.
    pub fn refs_of_run(&self, run_id: &str) -> Result<Vec<BlobRef>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT sha256, run_id, role, round, site, attempt FROM blob_refs WHERE run_id = ?1
             ORDER BY round, role, site, attempt",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            let role: String = r.get(2)?;
            Ok(BlobRef {
                sha256: r.get(0)?,
                run_id: r.get(1)?,
                role: BlobRole::parse(&role).ok_or_else(|| {
                    bad_row(
                        2,
                        format!("blob_refs of run `{run_id}`: unknown role `{role}`"),
                    )
                })?,
                round: r.get(3)?,
                site: r.get(4)?,
                attempt: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether anything holds blob `sha`.
    pub fn is_owned(&self, sha: &str) -> Result<bool, CoordinatorError> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM blob_refs WHERE sha256 = ?1)",
            [sha],
            |r| r.get(0),
        )?)
    }

    /// Inserts or updates a site.
    pub fn upsert_site(&self, site: &SiteRecord) -> Result<(), CoordinatorError> {
        let datasets: Vec<StoredDataset> = site
            .datasets
            .iter()
            .map(|d| {
                let rows = site.rows.get(&d.name).copied().unwrap_or(0);
                match site.classes.get(&d.name) {
                    Some(classes) if !classes.is_empty() => StoredDataset::WithClasses(
                        d.name.clone(),
                        d.columns.clone(),
                        rows,
                        classes.clone(),
                    ),
                    _ => StoredDataset::WithRows(d.name.clone(), d.columns.clone(), rows),
                }
            })
            .collect();
        let datasets = serde_json::to_string(&datasets).map_err(|e| {
            CoordinatorError::Internal(format!("site `{}`: datasets: {e}", site.name))
        })?;
        self.conn.execute(
            "INSERT INTO sites (name, token_sha256, datasets, registered_ms, last_seen_ms, signing_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET datasets = ?3, last_seen_ms = ?5, signing_key = ?6",
            params![
                site.name,
                site.token_sha256,
                datasets,
                site.registered_ms as i64,
                site.last_seen_ms as i64,
                site.signing_key
            ],
        )?;
        Ok(())
    }

    /// Records when a site was last heard from.
    pub fn touch_site(&self, name: &str, now_ms: u64) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "UPDATE sites SET last_seen_ms = ?2 WHERE name = ?1",
            params![name, now_ms as i64],
        )?;
        Ok(())
    }

    /// Every site, by name.
    pub fn sites(&self) -> Result<Vec<SiteRecord>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, token_sha256, datasets, registered_ms, last_seen_ms, signing_key
             FROM sites ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let name: String = r.get(0)?;
            let datasets: String = r.get(2)?;
            let stored: Vec<StoredDataset> = serde_json::from_str(&datasets)
                .map_err(|e| bad_row(2, format!("sites row `{name}`: datasets: {e}")))?;
            let mut datasets = Vec::with_capacity(stored.len());
            let mut rows = BTreeMap::new();
            let mut classes = BTreeMap::new();
            for d in stored {
                let (dataset, columns, count) = match d {
                    StoredDataset::WithClasses(n, c, r, k) => {
                        classes.insert(n.clone(), k);
                        (n, c, r)
                    }
                    StoredDataset::WithRows(n, c, r) => (n, c, r),
                    StoredDataset::Named(n, c) => (n, c, 0),
                };
                if count > 0 {
                    rows.insert(dataset.clone(), count);
                }
                datasets.push(DatasetInfo {
                    name: dataset,
                    columns,
                });
            }
            Ok(SiteRecord {
                name,
                token_sha256: r.get(1)?,
                datasets,
                rows,
                classes,
                registered_ms: r.get::<_, i64>(3)? as u64,
                last_seen_ms: r.get::<_, i64>(4)? as u64,
                signing_key: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Creates a run, owner of its initial model.
    pub fn insert_run(&mut self, run: &RunRecord) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO runs (id, name, spec, status, rounds_total, initial_sha256, created_ms,
                error, creator, creator_role)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                run.id,
                run.name,
                run.spec,
                run.status.as_str(),
                run.rounds_total,
                run.initial_sha256,
                run.created_ms as i64,
                run.error,
                run.creator,
                run.creator_role
            ],
        )?;
        Self::insert_ref(
            &tx,
            &BlobRef::of_round(&run.initial_sha256, &run.id, BlobRole::Initial, 0),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a run's status and error.
    pub fn set_run_status(
        &self,
        id: &str,
        status: RunStatus,
        error: &str,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "UPDATE runs SET status = ?2, error = ?3 WHERE id = ?1",
            params![id, status.as_str(), error],
        )?;
        Ok(())
    }

    fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
        let status: String = r.get(3)?;
        let id: String = r.get(0)?;
        Ok(RunRecord {
            status: RunStatus::parse(&status)
                .ok_or_else(|| bad_row(3, format!("runs row `{id}`: unknown status `{status}`")))?,
            id,
            name: r.get(1)?,
            spec: r.get(2)?,
            rounds_total: r.get(4)?,
            initial_sha256: r.get(5)?,
            created_ms: r.get::<_, i64>(6)? as u64,
            error: r.get(7)?,
            creator: r.get(8)?,
            creator_role: r.get(9)?,
            ended_ms: r.get::<_, Option<i64>>(10)?.map(|ms| ms as u64),
            standardization: r.get(11)?,
        })
    }

    /// One run.
    pub fn run(&self, id: &str) -> Result<RunRecord, CoordinatorError> {
        self.conn
            .query_row(
                "SELECT id, name, spec, status, rounds_total, initial_sha256, created_ms, error,
                        creator, creator_role, ended_ms, standardization
                 FROM runs WHERE id = ?1",
                [id],
                Self::run_from_row,
            )
            .optional()?
            .ok_or_else(|| CoordinatorError::NotFound(format!("no run `{id}`")))
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, spec, status, rounds_total, initial_sha256, created_ms, error,
                    creator, creator_role, ended_ms, standardization
             FROM runs ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map([], Self::run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Commits a round with the references to what it made (its global model, optimizer
    /// state), in one transaction.
    pub fn commit_round(
        &mut self,
        run_id: &str,
        round: &RoundRecord,
        made: &[BlobRef],
    ) -> Result<(), CoordinatorError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, attempts, sites_selected, sites_reported, examples,
                train_loss, eval_metrics, started_ms, finished_ms, bytes_down, bytes_up, global_sha256,
                opt_state, evaluated, privacy_epsilon, client_epsilon)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, ?15, ?16)",
            params![
                run_id,
                round.round,
                round.attempts,
                round.sites_selected,
                round.sites_reported,
                round.examples as i64,
                round.train_loss,
                metrics_json(&round.eval_metrics),
                round.started_ms as i64,
                round.finished_ms as i64,
                round.bytes_down as i64,
                round.bytes_up as i64,
                round.global_sha256,
                round.opt_state,
                round.privacy_epsilon,
                round.client_epsilon
            ],
        )?;
        for r in made {
            Self::insert_ref(&tx, r)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores a round's aggregated validation metrics and the bytes moved by its evaluation.
    pub fn set_round_evaluation(
        &self,
        run_id: &str,
        round: u32,
        metrics: &BTreeMap<String, f64>,
        extra_bytes_down: u64,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "UPDATE rounds SET eval_metrics = ?3, bytes_down = bytes_down + ?4, evaluated = 1
             WHERE run_id = ?1 AND round = ?2",
            params![
                run_id,
                round,
                metrics_json(metrics),
                extra_bytes_down as i64
            ],
        )?;
        Ok(())
    }

    /// Committed rounds of a run, in order.
    pub fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, attempts, sites_selected, sites_reported, examples, train_loss,
                    eval_metrics, started_ms, finished_ms, bytes_down, bytes_up, global_sha256,
                    opt_state, privacy_epsilon, client_epsilon
             FROM rounds WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            let round: u32 = r.get(0)?;
            Ok(RoundRecord {
                round,
                attempts: r.get(1)?,
                sites_selected: r.get(2)?,
                sites_reported: r.get(3)?,
                examples: r.get::<_, i64>(4)? as u64,
                train_loss: r.get(5)?,
                eval_metrics: metrics_from(r, 6, || format!("run `{run_id}` round {round}"))?,
                started_ms: r.get::<_, i64>(7)? as u64,
                finished_ms: r.get::<_, i64>(8)? as u64,
                bytes_down: r.get::<_, i64>(9)? as u64,
                bytes_up: r.get::<_, i64>(10)? as u64,
                global_sha256: r.get(11)?,
                opt_state: r.get(12)?,
                privacy_epsilon: r.get(13)?,
                client_epsilon: r.get(14)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The highest attempt number recorded for a round (0 when none).
    pub fn last_attempt(&self, run_id: &str, round: u32) -> Result<u32, CoordinatorError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(attempt), 0) FROM (
                 SELECT attempt FROM site_results WHERE run_id = ?1 AND round = ?2
                 UNION ALL SELECT attempt FROM refusals WHERE run_id = ?1 AND round = ?2)",
            params![run_id, round],
            |r| r.get(0),
        )?)
    }

    /// Records one site's result.
    pub fn add_site_result(
        &self,
        run_id: &str,
        result: &SiteResult,
        now_ms: u64,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "INSERT INTO site_results (run_id, round, attempt, site, outcome, reason, examples,
                train_loss, update_sha256, eval_examples, eval_metrics, at_ms, privacy_epsilon)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                run_id,
                result.round,
                result.attempt,
                result.site,
                result.outcome.as_str(),
                result.reason,
                result.examples as i64,
                result.train_loss,
                result.update_sha256,
                result.eval_examples as i64,
                metrics_json(&result.eval_metrics),
                now_ms as i64,
                result.privacy_epsilon
            ],
        )?;
        Ok(())
    }

    /// The blobs that ended runs created by `creator` still keep (each once).
    pub fn ended_run_blobs(&self, creator: &str) -> Result<Vec<String>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT b.sha256 FROM blob_refs b JOIN runs r ON r.id = b.run_id
             WHERE r.creator = ?1 AND r.status != 'running'",
        )?;
        let rows = stmt.query_map([creator], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts a refused update of `site` in an attempt under its [`refusal_kind`], keeping the
    /// latest reason; returns the count so far.
    pub fn add_refusal(
        &self,
        run_id: &str,
        round: u32,
        attempt: u32,
        site: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<u64, CoordinatorError> {
        // Two statements rather than one with RETURNING: a write read back by RETURNING kept
        // SQLite from ever checkpointing its WAL, which then grew by a page per refusal.
        let kind = refusal_kind(reason);
        self.conn.execute(
            "INSERT INTO refusals (run_id, round, attempt, site, kind, count, reason, first_ms,
                last_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?7)
             ON CONFLICT (run_id, round, attempt, site, kind)
             DO UPDATE SET count = count + 1, reason = excluded.reason, last_ms = excluded.last_ms",
            params![run_id, round, attempt, site, kind, reason, now_ms as i64],
        )?;
        let count: i64 = self.conn.query_row(
            "SELECT count FROM refusals
             WHERE run_id = ?1 AND round = ?2 AND attempt = ?3 AND site = ?4 AND kind = ?5",
            params![run_id, round, attempt, site, kind],
            |r| r.get(0),
        )?;
        Ok(count as u64)
    }

    /// Attaches an evaluation to a site's accepted result of a round.
    pub fn set_site_evaluation(
        &self,
        run_id: &str,
        round: u32,
        site: &str,
        examples: u64,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "UPDATE site_results SET eval_examples = ?4, eval_metrics = ?5, eval_done = 1
             WHERE run_id = ?1 AND round = ?2 AND site = ?3 AND outcome = 'accepted'",
            params![run_id, round, site, examples as i64, metrics_json(metrics)],
        )?;
        Ok(())
    }

    /// The evaluate phase of committed round `round`, when it has not finished: the sites that
    /// trained in the committed attempt, and the answers already recorded.
    pub fn unfinished_evaluation(
        &self,
        run_id: &str,
        round: u32,
    ) -> Result<Option<UnfinishedEvaluation>, CoordinatorError> {
        let finished: Option<bool> = self
            .conn
            .query_row(
                "SELECT evaluated FROM rounds WHERE run_id = ?1 AND round = ?2",
                params![run_id, round],
                |r| r.get(0),
            )
            .optional()?;
        if finished != Some(false) {
            return Ok(None);
        }
        let attempt = self.last_attempt(run_id, round)?;
        let mut e = UnfinishedEvaluation {
            attempt,
            ..Default::default()
        };
        for r in self.site_results(run_id, round)? {
            if r.attempt != attempt || r.outcome != SiteOutcome::Accepted {
                continue;
            }
            e.trained.push(r.site.clone());
        }
        let mut stmt = self.conn.prepare(
            "SELECT site, eval_examples, eval_metrics FROM site_results
             WHERE run_id = ?1 AND round = ?2 AND attempt = ?3 AND outcome = 'accepted'
                 AND eval_done = 1",
        )?;
        let rows = stmt.query_map(params![run_id, round, attempt], |r| {
            let site: String = r.get(0)?;
            let metrics = metrics_from(r, 2, || {
                format!("site_results of run `{run_id}` round {round} site `{site}`")
            })?;
            Ok((site, (r.get::<_, i64>(1)? as u64, metrics)))
        })?;
        e.answered = rows.collect::<Result<_, _>>()?;
        Ok(Some(e))
    }

    /// Records the cross-site evaluation `number` of run `run_id` as open, replacing any
    /// earlier one of the run: `owed` still to answer until `deadline_ms` (wall time).
    pub fn open_cross_site(
        &self,
        run_id: &str,
        number: u32,
        global_sha256: &str,
        owed: &[String],
        opened_ms: u64,
        deadline_ms: u64,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO cross_site
                 (run_id, number, global_sha256, sites, opened_ms, deadline_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                run_id,
                number,
                global_sha256,
                serde_json::to_string(owed).unwrap_or_else(|_| "[]".into()),
                opened_ms as i64,
                deadline_ms as i64
            ],
        )?;
        Ok(())
    }

    /// The sites still owing the open cross-site evaluation of run `run_id`; none closes it.
    pub fn set_cross_site_owed(
        &self,
        run_id: &str,
        owed: &[String],
    ) -> Result<(), CoordinatorError> {
        if owed.is_empty() {
            self.conn
                .execute("DELETE FROM cross_site WHERE run_id = ?1", [run_id])?;
        } else {
            self.conn.execute(
                "UPDATE cross_site SET sites = ?2 WHERE run_id = ?1",
                params![
                    run_id,
                    serde_json::to_string(owed).unwrap_or_else(|_| "[]".into())
                ],
            )?;
        }
        Ok(())
    }

    /// Open cross-site evaluations; the sites whose answer is stored are not owed.
    pub fn open_cross_sites(&self) -> Result<Vec<OpenCrossSite>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT run_id, number, global_sha256, sites, opened_ms, deadline_ms FROM cross_site
             ORDER BY run_id",
        )?;
        let rows = stmt.query_map([], |r| {
            let run_id: String = r.get(0)?;
            let sites: String = r.get(3)?;
            let owed: Vec<String> = serde_json::from_str(&sites).map_err(|e| {
                bad_row(
                    3,
                    format!("cross_site of run `{run_id}`: sites do not parse: {e}"),
                )
            })?;
            Ok((
                OpenCrossSite {
                    run_id,
                    number: r.get(1)?,
                    global_sha256: r.get(2)?,
                    owed,
                    deadline_ms: r.get::<_, i64>(5)? as u64,
                },
                r.get::<_, i64>(4)?,
            ))
        })?;
        let open: Vec<(OpenCrossSite, i64)> = rows.collect::<Result<_, _>>()?;
        let mut answered = self.conn.prepare(
            "SELECT EXISTS(SELECT 1 FROM evaluations WHERE run_id = ?1 AND global_sha256 = ?2
                 AND site = ?3 AND at_ms >= ?4)",
        )?;
        let mut out = Vec::with_capacity(open.len());
        for (mut c, opened_ms) in open {
            let mut owed = Vec::new();
            for site in c.owed {
                let done: bool = answered
                    .query_row(params![c.run_id, c.global_sha256, site, opened_ms], |r| {
                        r.get(0)
                    })?;
                if !done {
                    owed.push(site);
                }
            }
            c.owed = owed;
            out.push(c);
        }
        Ok(out)
    }

    /// Every site result of a round, all attempts, in the order they happened.
    pub fn site_results(
        &self,
        run_id: &str,
        round: u32,
    ) -> Result<Vec<SiteResult>, CoordinatorError> {
        self.site_results_limited(run_id, round, false, i64::MAX)
    }

    /// At most `limit` site results of a round for a reader, the sites' own outcomes (accepted,
    /// failed, missing, ...) before refusals, each in the order they happened; and how many
    /// results the round holds in all. Only what is returned is read into memory, however many
    /// refusals a round collected.
    pub fn site_results_first(
        &self,
        run_id: &str,
        round: u32,
        limit: usize,
    ) -> Result<(Vec<SiteResult>, u64), CoordinatorError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let first = self.site_results_limited(run_id, round, true, limit)?;
        let total: i64 = self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM site_results WHERE run_id = ?1 AND round = ?2)
                  + (SELECT COUNT(*) FROM refusals WHERE run_id = ?1 AND round = ?2)",
            params![run_id, round],
            |r| r.get(0),
        )?;
        Ok((first, total as u64))
    }

    fn site_results_limited(
        &self,
        run_id: &str,
        round: u32,
        refusals_last: bool,
        limit: i64,
    ) -> Result<Vec<SiteResult>, CoordinatorError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT * FROM (
                 SELECT round, attempt, site, outcome, reason, examples, train_loss,
                        update_sha256, eval_examples, eval_metrics, 1 AS n, at_ms AS at,
                        rowid AS rid, 0 AS refusal, privacy_epsilon
                 FROM site_results WHERE run_id = ?1 AND round = ?2
                 UNION ALL
                 SELECT round, attempt, site, 'refused', reason, 0, 0.0, '', 0, '{}', count,
                        first_ms, rowid, 1, NULL
                 FROM refusals WHERE run_id = ?1 AND round = ?2)
             ORDER BY CASE WHEN ?3 THEN refusal ELSE 0 END, at, rid
             LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![run_id, round, refusals_last, limit], |r| {
            let site: String = r.get(2)?;
            let outcome: String = r.get(3)?;
            Ok(SiteResult {
                outcome: SiteOutcome::parse(&outcome).ok_or_else(|| {
                    bad_row(3, format!(
                        "site_results of run `{run_id}` round {round} site `{site}`: unknown outcome `{outcome}`"
                    ))
                })?,
                round: r.get(0)?,
                attempt: r.get(1)?,
                eval_metrics: metrics_from(r, 9, || {
                    format!("site_results of run `{run_id}` round {round} site `{site}`")
                })?,
                site,
                reason: r.get(4)?,
                examples: r.get::<_, i64>(5)? as u64,
                train_loss: r.get(6)?,
                update_sha256: r.get(7)?,
                eval_examples: r.get::<_, i64>(8)? as u64,
                count: r.get::<_, i64>(10)? as u64,
                privacy_epsilon: r.get(14)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a cross-site evaluation.
    pub fn add_evaluation(&self, run_id: &str, e: &Evaluation) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "INSERT INTO evaluations (run_id, global_sha256, site, examples, metrics, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                run_id,
                e.global_sha256,
                e.site,
                e.examples as i64,
                metrics_json(&e.metrics),
                e.at_ms as i64
            ],
        )?;
        Ok(())
    }

    /// The latest answer of each site for the most recently evaluated model, by site.
    pub fn evaluations(&self, run_id: &str) -> Result<Vec<Evaluation>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT global_sha256, site, examples, metrics, MAX(at_ms) FROM evaluations
             WHERE run_id = ?1 AND global_sha256 = (
                 SELECT global_sha256 FROM evaluations WHERE run_id = ?1
                 ORDER BY at_ms DESC, rowid DESC LIMIT 1)
             GROUP BY site ORDER BY site",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            let site: String = r.get(1)?;
            Ok(Evaluation {
                global_sha256: r.get(0)?,
                metrics: metrics_from(r, 3, || {
                    format!("evaluations of run `{run_id}` site `{site}`")
                })?,
                site,
                examples: r.get::<_, i64>(2)? as u64,
                at_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `sha` is a kept global model (initial or committed) of any run: only those may
    /// be downloaded by sites or pulled by researchers.
    pub fn is_global_model(&self, sha: &str) -> Result<bool, CoordinatorError> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM blob_refs WHERE sha256 = ?1
                 AND role IN ('initial', 'global'))",
            [sha],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hundred_thousand_refusals_are_a_few_counted_rows_and_the_log_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = Store::open(&path).unwrap();
        s.insert_run(&run("r1", "init")).unwrap();
        let reasons = [
            "bad signature",
            "update of 4096 bytes exceeds the model's 400",
            "global model 0123456789abcdef0123456789abcdef is not the open one",
        ];
        for i in 0..100_000u64 {
            let reason = reasons[i as usize % 3].replace("4096", &i.to_string());
            let reason = reason.replace("0123456789abcdef0123456789abcdef", &format!("{i:032x}"));
            s.add_refusal("r1", 1, 1, "spammer", &reason, i).unwrap();
        }
        let results = s.site_results("r1", 1).unwrap();
        assert_eq!(results.len(), 3, "{results:?}");
        assert_eq!(results.iter().map(|r| r.count).sum::<u64>(), 100_000);
        assert!(results.iter().all(|r| r.outcome == SiteOutcome::Refused));
        assert_eq!(s.last_attempt("r1", 1).unwrap(), 1);
        let on_disk: u64 = ["state.db", "state.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
            .map(|m| m.len())
            .sum();
        // The WAL is checkpointed and reused: at most its 1,000 pages plus the database.
        assert!(on_disk < 6 << 20, "{on_disk} bytes on disk");
    }

    #[test]
    fn a_reader_gets_the_sites_own_outcomes_before_a_flood_of_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("state.db")).unwrap();
        s.insert_run(&run("r1", "init")).unwrap();
        for i in 0..500u64 {
            s.add_refusal("r1", 1, 1, &format!("spammer-{i:03}"), "bad signature", i)
                .unwrap();
        }
        s.add_site_result(
            "r1",
            &SiteResult::new(1, 1, "honest", SiteOutcome::Accepted),
            900,
        )
        .unwrap();
        let (first, total) = s.site_results_first("r1", 1, 10).unwrap();
        assert_eq!(total, 501);
        assert_eq!(first.len(), 10);
        assert_eq!(first[0].site, "honest");
        assert_eq!(first[1].site, "spammer-000");
        // Everything, in the order it happened, for the engine.
        let all = s.site_results("r1", 1).unwrap();
        assert_eq!(all.len(), 501);
        assert_eq!(all[500].site, "honest");
    }

    #[test]
    fn sites_keep_their_row_counts_and_older_rows_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        let site = SiteRecord {
            name: "a".into(),
            token_sha256: "00".into(),
            datasets: vec![DatasetInfo {
                name: "d".into(),
                columns: vec!["x".into()],
            }],
            registered_ms: 1,
            last_seen_ms: 2,
            signing_key: vec![7; 32],
            rows: [("d".to_string(), 189)].into(),
            classes: [(
                "d".to_string(),
                [("no".to_string(), 89), ("yes".to_string(), 100)].into(),
            )]
            .into(),
        };
        s.upsert_site(&site).unwrap();
        // A site stored before row counts were kept.
        s.conn
            .execute(
                "INSERT INTO sites (name, token_sha256, datasets, registered_ms, last_seen_ms,
                    signing_key) VALUES ('b', '00', '[[\"d\",[\"x\"]]]', 1, 2, x'')",
                [],
            )
            .unwrap();
        let sites = s.sites().unwrap();
        assert_eq!(sites[0], site);
        assert_eq!(sites[1].datasets, site.datasets);
        assert!(sites[1].rows.is_empty() && sites[1].classes.is_empty());
    }

    #[test]
    fn runs_rounds_and_results_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.insert_run(&RunRecord {
                id: "r1".into(),
                name: "n".into(),
                spec: "spec".into(),
                status: RunStatus::Running,
                rounds_total: 3,
                initial_sha256: "aa".into(),
                created_ms: 5,
                error: String::new(),
                creator: "r".into(),
                creator_role: "researcher".into(),
                ended_ms: None,
                standardization: None,
            })
            .unwrap();
            s.commit_round(
                "r1",
                &RoundRecord {
                    round: 1,
                    attempts: 1,
                    global_sha256: "bb".into(),
                    ..Default::default()
                },
                &[BlobRef::of_round("bb", "r1", BlobRole::Global, 1)],
            )
            .unwrap();
            let metrics = BTreeMap::from([("accuracy".to_string(), 0.9)]);
            s.set_round_evaluation("r1", 1, &metrics, 10).unwrap();
            s.add_site_result("r1", &SiteResult::new(2, 3, "a", SiteOutcome::Accepted), 1)
                .unwrap();
            s.set_site_evaluation("r1", 2, "a", 7, &metrics).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.run("r1").unwrap().rounds_total, 3);
        let rounds = s.rounds("r1").unwrap();
        assert_eq!(rounds[0].eval_metrics["accuracy"], 0.9);
        assert_eq!(rounds[0].bytes_down, 10);
        assert_eq!(s.last_attempt("r1", 2).unwrap(), 3);
        assert_eq!(s.last_attempt("r1", 1).unwrap(), 0);
        assert_eq!(s.site_results("r1", 2).unwrap()[0].eval_examples, 7);
        assert!(s.is_global_model("aa").unwrap());
        assert!(s.is_global_model("bb").unwrap());
        assert!(!s.is_global_model("cc").unwrap());
        assert!(matches!(s.run("zz"), Err(CoordinatorError::NotFound(_))));
    }

    fn run(id: &str, initial: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            name: "n".into(),
            spec: "spec".into(),
            status: RunStatus::Running,
            rounds_total: 1,
            initial_sha256: initial.into(),
            created_ms: 1,
            error: String::new(),
            creator: String::new(),
            creator_role: String::new(),
            ended_ms: None,
            standardization: None,
        }
    }

    #[test]
    fn a_blob_stays_owned_until_its_last_reference_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("state.db")).unwrap();
        // Two runs with the same initial model, and an update equal to a global model.
        s.insert_run(&run("a", "init")).unwrap();
        s.insert_run(&run("b", "init")).unwrap();
        let update = BlobRef::update("g1", "a", 1, 1, "h1");
        s.add_ref(&update).unwrap();
        s.commit_round(
            "a",
            &RoundRecord {
                round: 1,
                global_sha256: "g1".into(),
                ..Default::default()
            },
            &[BlobRef::of_round("g1", "a", BlobRole::Global, 1)],
        )
        .unwrap();
        assert_eq!(s.release(&[update]).unwrap(), vec!["g1".to_string()]);
        assert!(s.is_owned("g1").unwrap() && s.is_global_model("g1").unwrap());
        let a = s.refs_of_run("a").unwrap();
        assert_eq!(a.len(), 2);
        s.release(&a).unwrap();
        assert!(!s.is_owned("g1").unwrap());
        assert!(s.is_owned("init").unwrap(), "run b still holds it");
    }

    #[test]
    fn an_unknown_status_is_an_error_naming_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("state.db")).unwrap();
        s.insert_run(&run("r9", "x")).unwrap();
        s.conn
            .execute("UPDATE runs SET status = 'exploded'", [])
            .unwrap();
        let err = s.run("r9").unwrap_err().to_string();
        assert!(err.contains("r9") && err.contains("exploded"), "{err}");
    }

    #[test]
    fn open_evaluations_survive_reopening_without_the_answers_already_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.insert_run(&run("r1", "init")).unwrap();
            for site in ["a", "b"] {
                s.add_site_result("r1", &SiteResult::new(1, 2, site, SiteOutcome::Accepted), 1)
                    .unwrap();
            }
            s.add_site_result("r1", &SiteResult::new(1, 1, "c", SiteOutcome::Accepted), 1)
                .unwrap();
            s.commit_round(
                "r1",
                &RoundRecord {
                    round: 1,
                    global_sha256: "g1".into(),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
            let metrics = BTreeMap::from([("accuracy".to_string(), 0.7)]);
            s.set_site_evaluation("r1", 1, "a", 4, &metrics).unwrap();
            s.open_cross_site("r1", 3, "g1", &["a".into(), "b".into()], 100, 900)
                .unwrap();
            s.add_evaluation(
                "r1",
                &Evaluation {
                    global_sha256: "g1".into(),
                    site: "a".into(),
                    at_ms: 150,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let e = s.unfinished_evaluation("r1", 1).unwrap().unwrap();
        assert_eq!(
            (e.attempt, e.trained.clone()),
            (2, vec!["a".into(), "b".into()])
        );
        assert_eq!(e.answered["a"].0, 4);
        assert_eq!(e.answered.len(), 1);
        let open = s.open_cross_sites().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].number, open[0].deadline_ms), (3, 900));
        assert_eq!(open[0].owed, ["b"]);
        s.set_round_evaluation("r1", 1, &BTreeMap::new(), 0)
            .unwrap();
        assert!(s.unfinished_evaluation("r1", 1).unwrap().is_none());
        s.set_cross_site_owed("r1", &[]).unwrap();
        assert!(s.open_cross_sites().unwrap().is_empty());
    }

    #[test]
    fn a_version_1_database_gains_the_evaluation_columns_with_its_rounds_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            // The version 1 tables this test needs, as that version wrote them.
            conn.execute_batch(
                "CREATE TABLE rounds (run_id TEXT NOT NULL, round INTEGER NOT NULL,
                     attempts INTEGER NOT NULL, sites_selected INTEGER NOT NULL,
                     sites_reported INTEGER NOT NULL, examples INTEGER NOT NULL,
                     train_loss REAL NOT NULL, eval_metrics TEXT NOT NULL DEFAULT '{}',
                     started_ms INTEGER NOT NULL, finished_ms INTEGER NOT NULL,
                     bytes_down INTEGER NOT NULL, bytes_up INTEGER NOT NULL,
                     global_sha256 TEXT NOT NULL, opt_state TEXT NOT NULL DEFAULT '',
                     PRIMARY KEY (run_id, round));
                 CREATE TABLE site_results (run_id TEXT NOT NULL, round INTEGER NOT NULL,
                     attempt INTEGER NOT NULL, site TEXT NOT NULL, outcome TEXT NOT NULL,
                     reason TEXT NOT NULL DEFAULT '', examples INTEGER NOT NULL DEFAULT 0,
                     train_loss REAL NOT NULL DEFAULT 0,
                     update_sha256 TEXT NOT NULL DEFAULT '',
                     eval_examples INTEGER NOT NULL DEFAULT 0,
                     eval_metrics TEXT NOT NULL DEFAULT '{}', at_ms INTEGER NOT NULL);
                 INSERT INTO rounds VALUES ('r1', 1, 1, 1, 1, 1, 0.5, '{}', 0, 0, 0, 0, 'g1', '');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.unfinished_evaluation("r1", 1).unwrap().is_none());
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(s);
        Store::open(&path).unwrap();
    }
}
