//! The coordinator's durable state in SQLite (WAL): sites, runs, committed rounds, per-site
//! results and refusals. Model bytes live in the blob store; rows hold their hashes.

use std::collections::BTreeMap;
use std::path::Path;

use medfl_core::run::RunStatus;
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
    error TEXT NOT NULL DEFAULT ''
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
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS site_results_by_round ON site_results (run_id, round);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id TEXT NOT NULL,
    global_sha256 TEXT NOT NULL,
    site TEXT NOT NULL,
    examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
"#;

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
}

/// One site's result in one attempt of a round (accepted, refused, missing, failed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SiteResult {
    /// Round.
    pub round: u32,
    /// Attempt.
    pub attempt: u32,
    /// Site.
    pub site: String,
    /// `accepted`, `refused`, `missing` or `failed`.
    pub outcome: String,
    /// Why, for anything but `accepted`.
    pub reason: String,
    /// Reported example count.
    pub examples: u64,
    /// Reported training loss.
    pub train_loss: f64,
    /// The update's blob id (accepted updates).
    pub update_sha256: String,
    /// Validation examples of its evaluation.
    pub eval_examples: u64,
    /// Its evaluation of the round's new global model.
    pub eval_metrics: BTreeMap<String, f64>,
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

/// The state database.
pub struct Store {
    conn: Connection,
}

fn metrics_json(m: &BTreeMap<String, f64>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

fn metrics_from(s: &str) -> BTreeMap<String, f64> {
    serde_json::from_str(s).unwrap_or_default()
}

impl Store {
    /// Opens (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> Result<Self, CoordinatorError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        Ok(Self { conn })
    }

    /// Inserts or updates a site.
    pub fn upsert_site(&self, site: &SiteRecord) -> Result<(), CoordinatorError> {
        let datasets: Vec<(String, Vec<String>)> = site
            .datasets
            .iter()
            .map(|d| (d.name.clone(), d.columns.clone()))
            .collect();
        self.conn.execute(
            "INSERT INTO sites (name, token_sha256, datasets, registered_ms, last_seen_ms, signing_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET datasets = ?3, last_seen_ms = ?5, signing_key = ?6",
            params![
                site.name,
                site.token_sha256,
                serde_json::to_string(&datasets).unwrap_or_default(),
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
            let datasets: String = r.get(2)?;
            let datasets: Vec<(String, Vec<String>)> =
                serde_json::from_str(&datasets).unwrap_or_default();
            Ok(SiteRecord {
                name: r.get(0)?,
                token_sha256: r.get(1)?,
                datasets: datasets
                    .into_iter()
                    .map(|(name, columns)| DatasetInfo { name, columns })
                    .collect(),
                registered_ms: r.get::<_, i64>(3)? as u64,
                last_seen_ms: r.get::<_, i64>(4)? as u64,
                signing_key: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Creates a run.
    pub fn insert_run(&self, run: &RunRecord) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "INSERT INTO runs (id, name, spec, status, rounds_total, initial_sha256, created_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                run.id,
                run.name,
                run.spec,
                run.status.as_str(),
                run.rounds_total,
                run.initial_sha256,
                run.created_ms as i64,
                run.error
            ],
        )?;
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
        Ok(RunRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            spec: r.get(2)?,
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
            rounds_total: r.get(4)?,
            initial_sha256: r.get(5)?,
            created_ms: r.get::<_, i64>(6)? as u64,
            error: r.get(7)?,
        })
    }

    /// One run.
    pub fn run(&self, id: &str) -> Result<RunRecord, CoordinatorError> {
        self.conn
            .query_row(
                "SELECT id, name, spec, status, rounds_total, initial_sha256, created_ms, error
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
            "SELECT id, name, spec, status, rounds_total, initial_sha256, created_ms, error
             FROM runs ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map([], Self::run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Commits a round and its accepted updates' results in one transaction.
    pub fn commit_round(
        &mut self,
        run_id: &str,
        round: &RoundRecord,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute(
            "INSERT INTO rounds (run_id, round, attempts, sites_selected, sites_reported, examples,
                train_loss, eval_metrics, started_ms, finished_ms, bytes_down, bytes_up, global_sha256,
                opt_state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
                round.opt_state
            ],
        )?;
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
            "UPDATE rounds SET eval_metrics = ?3, bytes_down = bytes_down + ?4
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
                    opt_state
             FROM rounds WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok(RoundRecord {
                round: r.get(0)?,
                attempts: r.get(1)?,
                sites_selected: r.get(2)?,
                sites_reported: r.get(3)?,
                examples: r.get::<_, i64>(4)? as u64,
                train_loss: r.get(5)?,
                eval_metrics: metrics_from(&r.get::<_, String>(6)?),
                started_ms: r.get::<_, i64>(7)? as u64,
                finished_ms: r.get::<_, i64>(8)? as u64,
                bytes_down: r.get::<_, i64>(9)? as u64,
                bytes_up: r.get::<_, i64>(10)? as u64,
                global_sha256: r.get(11)?,
                opt_state: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The highest attempt number recorded for a round (0 when none).
    pub fn last_attempt(&self, run_id: &str, round: u32) -> Result<u32, CoordinatorError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(attempt), 0) FROM site_results WHERE run_id = ?1 AND round = ?2",
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
                train_loss, update_sha256, eval_examples, eval_metrics, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                run_id,
                result.round,
                result.attempt,
                result.site,
                result.outcome,
                result.reason,
                result.examples as i64,
                result.train_loss,
                result.update_sha256,
                result.eval_examples as i64,
                metrics_json(&result.eval_metrics),
                now_ms as i64
            ],
        )?;
        Ok(())
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
            "UPDATE site_results SET eval_examples = ?4, eval_metrics = ?5
             WHERE run_id = ?1 AND round = ?2 AND site = ?3 AND outcome = 'accepted'",
            params![run_id, round, site, examples as i64, metrics_json(metrics)],
        )?;
        Ok(())
    }

    /// Every site result of a round, all attempts, in the order they happened.
    pub fn site_results(
        &self,
        run_id: &str,
        round: u32,
    ) -> Result<Vec<SiteResult>, CoordinatorError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, attempt, site, outcome, reason, examples, train_loss, update_sha256,
                    eval_examples, eval_metrics
             FROM site_results WHERE run_id = ?1 AND round = ?2 ORDER BY rowid",
        )?;
        let rows = stmt.query_map(params![run_id, round], |r| {
            Ok(SiteResult {
                round: r.get(0)?,
                attempt: r.get(1)?,
                site: r.get(2)?,
                outcome: r.get(3)?,
                reason: r.get(4)?,
                examples: r.get::<_, i64>(5)? as u64,
                train_loss: r.get(6)?,
                update_sha256: r.get(7)?,
                eval_examples: r.get::<_, i64>(8)? as u64,
                eval_metrics: metrics_from(&r.get::<_, String>(9)?),
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
            Ok(Evaluation {
                global_sha256: r.get(0)?,
                site: r.get(1)?,
                examples: r.get::<_, i64>(2)? as u64,
                metrics: metrics_from(&r.get::<_, String>(3)?),
                at_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `sha` is a global model (initial or committed) of any run: only those may be
    /// downloaded by sites or pulled by researchers.
    pub fn is_global_model(&self, sha: &str) -> Result<bool, CoordinatorError> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM runs WHERE initial_sha256 = ?1)
                 OR EXISTS(SELECT 1 FROM rounds WHERE global_sha256 = ?1)",
            [sha],
            |r| r.get(0),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            )
            .unwrap();
            let metrics = BTreeMap::from([("accuracy".to_string(), 0.9)]);
            s.set_round_evaluation("r1", 1, &metrics, 10).unwrap();
            s.add_site_result(
                "r1",
                &SiteResult {
                    round: 2,
                    attempt: 3,
                    site: "a".into(),
                    outcome: "accepted".into(),
                    ..Default::default()
                },
                1,
            )
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
}
