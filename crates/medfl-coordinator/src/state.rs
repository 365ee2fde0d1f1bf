//! State shared by the gRPC handlers and the run engines.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use medfl_core::round::Phase;
use medfl_core::spec::{DatasetInfo, RunSpec};
use medfl_core::ModelSchema;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::blobs::BlobStore;
use crate::config::CoordinatorConfig;
use crate::store::Store;
use crate::CoordinatorError;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on the coordinator's monotonic clock (from its first reading): run machines
/// measure deadlines with it, so a wall-clock step (NTP, an operator) cannot close or stretch a
/// round. Converted to wall time only for the wire and the store ([`wall_of`]).
pub fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The wall time (ms since the Unix epoch) of monotonic instant `at` (from [`mono_ms`]).
pub fn wall_of(at: u64) -> u64 {
    let (mono, wall) = (mono_ms(), now_ms());
    wall.saturating_add(at).saturating_sub(mono)
}

/// A registered site as the coordinator keeps it in memory.
#[derive(Debug, Clone)]
pub struct SiteLive {
    /// SHA-256 of the site's secret token.
    pub token_sha256: String,
    /// Datasets it advertised.
    pub datasets: Vec<DatasetInfo>,
    /// Last call, ms since the epoch.
    pub last_seen_ms: u64,
    /// First registration, ms since the epoch.
    pub registered_ms: u64,
    /// Its pinned Ed25519 public key.
    pub signing_key: Vec<u8>,
    /// Rows of each dataset, as it registered them this session (empty until it registers):
    /// no update may claim more examples than its dataset has rows.
    pub rows: BTreeMap<String, u64>,
    /// Images per class of each image dataset, as it registered them.
    pub classes: BTreeMap<String, BTreeMap<String, u64>>,
}

impl SiteLive {
    /// Whether the site holds the run's dataset with every column the run names.
    pub fn holds(&self, spec: &RunSpec) -> bool {
        self.datasets.iter().any(|d| spec.fits(d))
    }
}

/// What handlers may see of a run's open round.
#[derive(Debug, Clone)]
pub struct RoundSnapshot {
    /// Round number.
    pub round: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Phase.
    pub phase: Phase,
    /// Sites that still owe a result in this phase and are to be handed its task.
    pub pending: BTreeSet<String>,
    /// Sites awaiting their hospital's approval: not handed the task again, but their update
    /// is still welcome until the deadline.
    pub awaiting: BTreeSet<String>,
    /// Sites asked.
    pub selected: BTreeSet<String>,
    /// Sites that answered.
    pub reported: usize,
    /// The global model sites start from (train) or score (evaluate).
    pub global_sha256: String,
    /// Its size in bytes.
    pub global_size: u64,
    /// When the phase closes.
    pub deadline_ms: u64,
    /// Client-level DP: the round's clipping norm and expected number of sampled sites, for
    /// the train task.
    pub client_dp: Option<(f64, f64)>,
    /// Federated standardisation: the pooled feature statistics (JSON) train and evaluate
    /// tasks carry, once gathered.
    pub standardization: Option<Arc<str>>,
}

/// A message to a run's engine. Every result goes through the engine, so one task decides.
#[derive(Debug)]
pub enum EngineMsg {
    /// A verified update blob, ready to fold.
    Update {
        /// Sender.
        site: String,
        /// Round it was trained for.
        round: u32,
        /// Attempt it was trained for.
        attempt: u32,
        /// The global model it started from.
        base_sha256: String,
        /// Its blob id.
        sha256: String,
        /// Local examples.
        examples: u64,
        /// Local training loss.
        train_loss: f64,
        /// The site's record-level ε for the run so far.
        privacy_epsilon: Option<f64>,
        /// Client-level DP: the site's "within the clip" indicator.
        clip_indicator: Option<f64>,
        /// Answer to the uploader.
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    /// A site's evaluation of the round's new global model.
    Evaluation {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// The model it scored.
        global_sha256: String,
        /// Validation examples.
        examples: u64,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
        /// Answer to the site.
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    /// A site's feature sums for the statistics phase, checked against the task.
    Statistics {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// The sums.
        sums: medfl_core::standardize::FeatureSums,
        /// Answer to the site.
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    /// A site cannot do its task.
    Failure {
        /// Sender.
        site: String,
        /// Round.
        round: u32,
        /// Attempt.
        attempt: u32,
        /// Why.
        reason: String,
        /// `Failed`, or `Pending`, `Rejected` or `Paused` when the site's hospital keeps the run
        /// out.
        outcome: medfl_core::run::SiteOutcome,
    },
    /// A researcher stops the run.
    Stop {
        /// Answer once stopped.
        reply: oneshot::Sender<()>,
    },
}

/// Byte counters of a run's open round, added to by handlers and taken by the engine.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Global-model bytes sent.
    pub down: AtomicU64,
    /// Update bytes received.
    pub up: AtomicU64,
}

impl Traffic {
    /// Takes and resets both counters.
    pub fn take(&self) -> (u64, u64) {
        (
            self.down.swap(0, Ordering::Relaxed),
            self.up.swap(0, Ordering::Relaxed),
        )
    }
}

/// A running run's engine, as handlers reach it.
#[derive(Debug, Clone)]
pub struct RunHandle {
    /// Messages to the engine (bounded).
    pub tx: mpsc::Sender<EngineMsg>,
    /// The open round, if any.
    pub snapshot: watch::Receiver<Option<RoundSnapshot>>,
    /// The parsed spec.
    pub spec: Arc<RunSpec>,
    /// The spec as sent to sites.
    pub spec_toml: Arc<str>,
    /// Names and shapes every update must have.
    pub schema: Arc<ModelSchema>,
    /// Bytes moved in the open round.
    pub traffic: Arc<Traffic>,
}

/// A site's upload under way ([`Shared::begin_upload`]); dropping it ends it.
#[derive(Debug)]
pub struct UploadGuard {
    uploading: Arc<Mutex<BTreeSet<String>>>,
    site: String,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        // The set stays consistent even if a holder panicked: each change is one statement.
        self.uploading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.site);
    }
}

/// Everything the coordinator's tasks share.
pub struct Shared {
    /// Configuration.
    pub config: CoordinatorConfig,
    store: Mutex<Store>,
    /// Model and update blobs.
    pub blobs: BlobStore,
    runs: Mutex<BTreeMap<String, RunHandle>>,
    sites: Mutex<BTreeMap<String, SiteLive>>,
    campaigns: Mutex<BTreeMap<String, crate::campaign::Campaign>>,
    /// Numbers cross-site evaluations, so an answer to an earlier one of the same run is told apart.
    pub campaign_numbers: std::sync::atomic::AtomicU32,
    /// Bumped whenever a task may have appeared; task polls wait on it.
    pub tasks_changed: watch::Sender<u64>,
    /// One counter per run, bumped whenever that run changed; its watchers wait on it alone.
    run_changes: Mutex<BTreeMap<String, watch::Sender<u64>>>,
    /// Limits concurrent uploads.
    pub uploads: Semaphore,
    /// Sites with an upload under way: each sends one at a time.
    uploading: Arc<Mutex<BTreeSet<String>>>,
    /// Becomes true when the coordinator shuts down.
    pub shutdown: watch::Receiver<bool>,
    audit: medfl_audit::AuditLog,
    /// Base models text runs adapt (their architecture shapes the trainable tensors).
    pub bases: medfl_model::BaseModels,
    /// The same models' files, which sites may fetch by hash.
    pub published: crate::published::Published,
    /// Signs every task handed out.
    pub signer: Arc<ring::signature::Ed25519KeyPair>,
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> CoordinatorError {
    CoordinatorError::Internal("a lock was poisoned by a panicked task".into())
}

impl Shared {
    /// Shared state over an opened store.
    pub fn new(
        config: CoordinatorConfig,
        store: Store,
        blobs: BlobStore,
        audit: medfl_audit::AuditLog,
        shutdown: watch::Receiver<bool>,
        published: crate::published::Published,
        signer: Arc<ring::signature::Ed25519KeyPair>,
    ) -> Result<Self, CoordinatorError> {
        let bases = medfl_model::BaseModels::new(config.base_models.clone(), None);
        let sites = store
            .sites()?
            .into_iter()
            .map(|s| {
                (
                    s.name,
                    SiteLive {
                        token_sha256: s.token_sha256,
                        datasets: s.datasets,
                        // Nobody is online until they call again.
                        last_seen_ms: 0,
                        registered_ms: s.registered_ms,
                        signing_key: s.signing_key,
                        rows: s.rows,
                        classes: s.classes,
                    },
                )
            })
            .collect();
        let uploads = Semaphore::new(config.max_concurrent_uploads as usize);
        Ok(Self {
            config,
            store: Mutex::new(store),
            blobs,
            runs: Mutex::new(BTreeMap::new()),
            sites: Mutex::new(sites),
            campaigns: Mutex::new(BTreeMap::new()),
            campaign_numbers: std::sync::atomic::AtomicU32::new(1),
            tasks_changed: watch::Sender::new(0),
            run_changes: Mutex::new(BTreeMap::new()),
            uploads,
            uploading: Arc::default(),
            shutdown,
            audit,
            bases,
            published,
            signer,
        })
    }

    /// Runs `f` on the state database. SQLite blocks (disk reads, WAL writes, fsync), so the
    /// call runs as [`blocking`] work: waiting for the lock included, it never stalls an async
    /// worker. Keep `f` short: every statement is small and nothing else waits inside it.
    pub fn db<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, CoordinatorError>,
    ) -> Result<T, CoordinatorError> {
        blocking(|| f(&mut *self.store.lock().map_err(poisoned)?))
    }

    /// Registered sites.
    pub fn sites(&self) -> Result<MutexGuard<'_, BTreeMap<String, SiteLive>>, CoordinatorError> {
        self.sites.lock().map_err(poisoned)
    }

    /// Open cross-site evaluations, by run.
    pub fn campaigns(
        &self,
    ) -> Result<MutexGuard<'_, BTreeMap<String, crate::campaign::Campaign>>, CoordinatorError> {
        self.campaigns.lock().map_err(poisoned)
    }

    /// Active runs.
    pub fn runs(&self) -> Result<MutexGuard<'_, BTreeMap<String, RunHandle>>, CoordinatorError> {
        self.runs.lock().map_err(poisoned)
    }

    /// The handle of active run `id`.
    pub fn run_handle(&self, id: &str) -> Result<RunHandle, CoordinatorError> {
        self.runs()?
            .get(id)
            .cloned()
            .ok_or_else(|| CoordinatorError::NotFound(format!("run `{id}` is not running")))
    }

    /// Marks `site` as uploading until the guard drops; refused while its previous upload is
    /// under way, so one site cannot hold more than one of the shared upload slots.
    pub fn begin_upload(&self, site: &str) -> Result<UploadGuard, CoordinatorError> {
        if !self
            .uploading
            .lock()
            .map_err(poisoned)?
            .insert(site.to_string())
        {
            return Err(CoordinatorError::Exhausted(format!(
                "site `{site}` already has an upload under way: one at a time"
            )));
        }
        Ok(UploadGuard {
            uploading: self.uploading.clone(),
            site: site.to_string(),
        })
    }

    /// Whether a site counts as online at `now_ms`.
    pub fn is_online(&self, site: &SiteLive, now_ms: u64) -> bool {
        now_ms.saturating_sub(site.last_seen_ms) < self.config.site_offline_after_secs * 1000
    }

    /// Appends to the audit log (an fsync: [`blocking`] work). A failure is logged loudly but
    /// does not stop the federation.
    pub fn audit(&self, event: medfl_audit::Event) {
        if let Err(e) = blocking(|| self.audit.append(event, now_ms())) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }

    /// Appends a signed checkpoint of the audit log (at a clean stop), unless the last entry is
    /// one.
    pub fn audit_checkpoint(&self) {
        if let Err(e) = blocking(|| self.audit.checkpoint(now_ms())) {
            tracing::error!(error = %e, "could not write the audit log's checkpoint");
        }
    }

    /// Wakes task polls.
    pub fn notify_tasks(&self) {
        self.tasks_changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn run_changes_of(&self, run_id: &str) -> Result<watch::Sender<u64>, CoordinatorError> {
        Ok(self
            .run_changes
            .lock()
            .map_err(poisoned)?
            .entry(run_id.to_string())
            .or_insert_with(|| watch::Sender::new(0))
            .clone())
    }

    /// Wakes the watchers of run `run_id` (and only them).
    pub fn notify_run(&self, run_id: &str) {
        if let Ok(changes) = self.run_changes_of(run_id) {
            changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Changes to run `run_id`, for a watcher.
    pub fn watch_run(&self, run_id: &str) -> Result<watch::Receiver<u64>, CoordinatorError> {
        Ok(self.run_changes_of(run_id)?.subscribe())
    }
}

/// Runs `f`, which blocks on the disk (SQLite, fsync), without stalling the runtime: on a
/// worker of the coordinator's multi-threaded runtime, the worker first hands its other tasks to
/// another thread (`block_in_place`); on a blocking thread, or outside such a runtime (unit tests
/// on a current-thread runtime), `f` simply runs. Unlike `spawn_blocking` it borrows, so a caller
/// that holds a lock while it stores keeps its ordering.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Completes once `shutdown` turns true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
