//! Doing one task: prepare the run's data (once per run), fetch the global model, train or
//! evaluate off the async threads, and send the result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use medfl_audit::{AuditLog, Event};
use medfl_core::safetensors::{decode, encode};
use medfl_core::spec::{RunSpec, Standardize};
use medfl_core::standardize::Standardization;
use medfl_proto::v1;
use medfl_train::image::ImageSet;
use medfl_train::{
    model_for_run, BaseModels, Data, Examples, LocalModel, Standardizer, Table, TextTable,
    TrainError, TrainOptions,
};
use serde_json::json;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::cache::ModelCache;
use crate::client::Client;
use crate::config::{DatasetConfig, SiteConfig};
use crate::identity::SiteState;
use crate::policy::{Approvals, Decision, Declined};
use crate::tasks::{CancelReason, CancelToken, TaskKey, Tasks};
use crate::SiteError;

/// What the researcher is told while the kill switch is thrown.
const PAUSED: &str = "paused by the hospital (medfl-site resume to continue)";

/// A run's data at this site, split (and for tables standardised with the federation's
/// statistics or this site's own, as the spec says), and its model.
struct Prepared {
    spec: RunSpec,
    /// SHA-256 of the spec as received: data prepared for one spec never serves another.
    spec_sha256: String,
    /// The federation's statistics (JSON) the table was standardised with, as the task
    /// carried them: prepared with one set, the data never serves another.
    standardization: Option<String>,
    /// A table's per-feature sums over its training rows, before standardisation: what a
    /// statistics task sends.
    sums: Option<medfl_core::standardize::FeatureSums>,
    model: Arc<dyn LocalModel>,
    train: Data,
    validation: Data,
    /// What the hospital is shown of the run's differential privacy: its parameters and what
    /// the whole run would cost this site (computed once, with the data).
    privacy_summary: Option<String>,
}

/// A dataset the site holds.
pub(crate) enum Dataset {
    /// A CSV table.
    Table(Table),
    /// A JSON-lines file of records.
    Text(TextTable),
    /// Images: a folder of class folders, or a CSV list (the files are read when a run needs
    /// them).
    Images(ImageSet),
}

impl Dataset {
    pub(crate) fn load(format: &str, path: &std::path::Path) -> Result<Self, TrainError> {
        Ok(match format {
            "jsonl" => Dataset::Text(TextTable::load_jsonl(path)?),
            "image_folder" => Dataset::Images(ImageSet::load_folder(path)?),
            "image_csv" => Dataset::Images(ImageSet::load_csv(path)?),
            _ => Dataset::Table(Table::load_csv(path)?),
        })
    }

    /// Column headers, or the field names of a JSON-lines file.
    fn columns(&self) -> &[String] {
        match self {
            Dataset::Table(t) => t.columns(),
            Dataset::Text(t) => t.fields(),
            Dataset::Images(i) => i.columns(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Dataset::Table(t) => t.len(),
            Dataset::Text(t) => t.len(),
            Dataset::Images(i) => i.len(),
        }
    }

    /// Images per class of an image dataset with a `label` column (every `image_folder`);
    /// nothing for tables and texts, whose label column only a run names.
    fn class_counts(&self) -> BTreeMap<String, u64> {
        let label = medfl_train::image::FOLDER_COLUMNS[1];
        match self {
            // The column exists, so counting cannot fail.
            Dataset::Images(i) if i.columns().iter().any(|c| c == label) => {
                i.class_counts(label).unwrap_or_default()
            }
            Dataset::Images(_) | Dataset::Table(_) | Dataset::Text(_) => BTreeMap::new(),
        }
    }

    /// What a task of this kind needs, for the error when the dataset is another kind.
    fn kind(&self) -> &'static str {
        match self {
            Dataset::Table(_) => "a CSV table",
            Dataset::Text(_) => "JSON lines",
            Dataset::Images(_) => "images",
        }
    }
}

/// Feature rows (a table's, or image embeddings) split into training and validation, and
/// standardised as the run says: with the federation's statistics the task carries, or this
/// site's own. Also returns the raw sums of the training split, what a statistics task sends.
fn standardized(
    task: &v1::Task,
    spec: &RunSpec,
    examples: &Examples,
    seed: u64,
) -> Result<(Data, Data, medfl_core::standardize::FeatureSums), SiteError> {
    let t = &spec.task;
    let features = t.feature_names();
    let (train, validation) = examples.split(t.validation_fraction, seed);
    let sums = medfl_core::standardize::FeatureSums::of_rows(&train.features, train.n_features);
    let scaler = match (t.standardization(&spec.privacy), &task.standardization) {
        (Some(Standardize::Federated), Some(json)) => Standardizer::from_statistics(
            &Standardization::from_json(json, &features).map_err(|e| {
                SiteError::Corrupt(format!(
                    "the task for run {} round {}: {e}",
                    task.run_id, task.round
                ))
            })?,
        ),
        // Before the statistics are pooled only the statistics task comes, which sends raw
        // sums; `execute` refuses to train or evaluate on this.
        (Some(Standardize::Federated), None) => Standardizer::identity(features.len()),
        _ => Standardizer::fit(&train),
    };
    Ok((
        Data::Table(scaler.apply(&train)),
        Data::Table(scaler.apply(&validation)),
        sums,
    ))
}

/// The site's worker: its data, state and model cache.
pub struct Worker {
    config: SiteConfig,
    datasets: BTreeMap<String, Dataset>,
    /// Where each dataset was loaded from (the config file's and the registry's, together), so
    /// a change to the registry is noticed and only what changed is reloaded.
    sources: BTreeMap<String, DatasetConfig>,
    /// Base models: configured by name, or fetched by hash into `data_dir/base-models`.
    bases: BaseModels,
    state: SiteState,
    cache: ModelCache,
    prepared: HashMap<String, Arc<Prepared>>,
    /// Tasks under way with their cancellation tokens, and the runs worked on: shared with the
    /// heartbeat (runs stopped at the coordinator), the kill switch and shutdown.
    tasks: Tasks,
    /// The latest task of each run declined while the run awaited the hospital's approval: the
    /// coordinator does not hand it out again, so it is done here once the hospital approves.
    held: BTreeMap<String, v1::Task>,
    /// What this site did and sent, hash-chained in `data_dir/audit.jsonl`.
    audit: AuditLog,
    /// Upload chunk size, from the coordinator.
    pub chunk_size: usize,
    /// Signs every update this site sends.
    signer: ring::signature::Ed25519KeyPair,
    /// Runs admitted since this daemon started (each is audited once), with the spec SHA-256
    /// each was admitted with: a later task of the run with another spec is refused.
    admitted: std::collections::HashMap<String, String>,
}

/// Records the policy in force in the audit log at every start, as a change when it differs
/// from the one the site last started with (kept in `data_dir/policy.json`).
fn audit_policy(config: &SiteConfig, audit: &AuditLog) -> Result<(), SiteError> {
    let policy = serde_json::to_value(&config.policy)
        .map_err(|e| SiteError::Config(format!("policy: {e}")))?;
    let path = config.data_dir.join("policy.json");
    let previous: Option<serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let event = match &previous {
        Some(p) if *p == policy => "policy_in_force",
        Some(_) => "policy_changed",
        None => "policy_in_force",
    };
    let data = json!({ "policy": policy, "previous": previous });
    audit
        .append(
            Event::new(event, data).site(config.name.clone()),
            crate::audit::now_ms(),
        )
        .map_err(|e| SiteError::Config(format!("audit log: {e}")))?;
    medfl_daemon::write_private(&path, policy.to_string().as_bytes())
        .map_err(|e| SiteError::io(format!("writing {}", path.display()), e))
}

/// The datasets of the config file and of the registry, by name.
fn dataset_sources(config: &SiteConfig) -> Result<BTreeMap<String, DatasetConfig>, SiteError> {
    let mut sources = crate::registry::load(&config.data_dir)?;
    for (name, ds) in &config.datasets {
        sources.insert(name.clone(), ds.clone());
    }
    Ok(sources)
}

/// FNV-1a, to derive a stable per-site seed from the site's name.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Worker {
    /// Loads the identity and every configured dataset; a bad file stops the site here, with
    /// an error naming file and line.
    pub fn open(config: SiteConfig) -> Result<Self, SiteError> {
        let state = SiteState::load_or_create(&config.data_dir, &config.name)?;
        let signer = state.signer()?;
        let cache = ModelCache::open(&config.data_dir, config.model_cache)?;
        let audit = crate::audit::open(&config)?;
        let mut datasets = BTreeMap::new();
        let sources = dataset_sources(&config)?;
        for (name, ds) in &sources {
            let data = Dataset::load(&ds.format, &ds.path)?;
            info!(site = %config.name, dataset = %name, rows = data.len(), columns = data.columns().len(), "dataset loaded");
            datasets.insert(name.clone(), data);
        }
        let bases = BaseModels::new(
            config.base_models.clone(),
            Some(config.data_dir.join("base-models")),
        );
        audit_policy(&config, &audit)?;
        Ok(Self {
            config,
            datasets,
            sources,
            bases,
            state,
            cache,
            prepared: HashMap::new(),
            tasks: Tasks::default(),
            held: BTreeMap::new(),
            audit,
            chunk_size: 1 << 20,
            signer,
            admitted: Default::default(),
        })
    }

    /// Appends to the site's audit log; a failure is logged loudly but does not stop the site.
    pub fn audit(&self, event: Event) {
        let now = crate::audit::now_ms();
        if let Err(e) = self.audit.append(event.site(self.config.name.clone()), now) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The tasks under way and the runs worked on, shared with the daemon's watchers.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Runs with a task held while they await the hospital's approval.
    pub fn held_runs(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }

    /// The site's secret token.
    pub fn token(&self) -> &str {
        &self.state.token
    }

    /// The public half of the site's signing key.
    pub fn signing_public_key(&self) -> Vec<u8> {
        ring::signature::KeyPair::public_key(&self.signer)
            .as_ref()
            .to_vec()
    }

    /// Pins the coordinator's signing key at the first registration; a coordinator presenting
    /// another key later is refused.
    pub fn pin_coordinator_key(&mut self, key: &[u8]) -> Result<(), SiteError> {
        let key = hex::encode(key);
        if self.state.coordinator_key.is_empty() {
            self.state.coordinator_key = key;
            return self.state.save(&self.config.data_dir);
        }
        if self.state.coordinator_key != key {
            return Err(SiteError::Config(format!(
                "the coordinator signs with another key than the one pinned at this site's first \
                 registration ({}); if the coordinator was re-installed on purpose, clear \
                 `coordinator_key` in {}",
                self.state.coordinator_key,
                self.config.data_dir.join("site.json").display()
            )));
        }
        Ok(())
    }

    /// Refuses to work while the hospital has paused the site.
    fn check_not_paused(&self) -> Result<(), SiteError> {
        if crate::policy::is_paused(&self.config.data_dir) {
            return Err(Declined::Paused.because(PAUSED.into()));
        }
        Ok(())
    }

    /// Refuses a task the pinned coordinator key did not sign.
    fn verify_task(&self, task: &v1::Task) -> Result<(), SiteError> {
        let claim = medfl_proto::convert::task_claim(task);
        let key = hex::decode(&self.state.coordinator_key).unwrap_or_default();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&claim.message(), &task.signature)
            .map_err(|_| {
                SiteError::Corrupt(format!(
                    "the task for run {} round {} is not signed by the coordinator: refusing \
                     its global model {}",
                    task.run_id, task.round, task.global_sha256
                ))
            })
    }

    /// Follows the dataset registry (`medfl-site dataset add|remove` on a running site): loads
    /// what was added, forgets what was removed, and drops what runs had prepared from either.
    /// Returns whether the datasets changed, so the site tells the coordinator. A registered
    /// file that no longer loads is left out with an error in the log, not retried until the
    /// registry changes again; the site keeps serving the others.
    pub fn reload_datasets(&mut self) -> Result<bool, SiteError> {
        let wanted = dataset_sources(&self.config)?;
        if wanted == self.sources {
            return Ok(false);
        }
        let site = self.config.name.clone();
        self.datasets.retain(|name, _| {
            let keep = wanted.get(name) == self.sources.get(name);
            if !keep && !wanted.contains_key(name) {
                info!(site = %site, dataset = %name, "dataset removed from the registry: no longer offered");
            }
            keep
        });
        for (name, ds) in &wanted {
            if self.sources.get(name) == Some(ds) {
                continue;
            }
            match Dataset::load(&ds.format, &ds.path) {
                Ok(data) => {
                    info!(site = %site, dataset = %name, rows = data.len(), columns = data.columns().len(), "dataset loaded");
                    self.datasets.insert(name.clone(), data);
                }
                Err(e) => {
                    tracing::error!(site = %site, dataset = %name, error = %e, "registered dataset does not load; not offered");
                }
            }
        }
        let datasets = &self.datasets;
        let sources = &self.sources;
        self.prepared.retain(|_, p| {
            let name = &p.spec.task.dataset;
            datasets.contains_key(name) && wanted.get(name) == sources.get(name)
        });
        self.sources = wanted;
        Ok(true)
    }

    /// What the coordinator may know of the datasets: names, column headers and row counts.
    pub fn dataset_schemas(&self) -> Vec<v1::DatasetSchema> {
        self.datasets
            .iter()
            .map(|(name, d)| v1::DatasetSchema {
                name: name.clone(),
                columns: d.columns().to_vec(),
                rows: d.len() as u64,
                class_counts: d.class_counts(),
            })
            .collect()
    }

    /// Makes sure the base model a run pins is here, fetching it from the coordinator when the
    /// site has none under that name and the config allows it. A configured directory whose
    /// weights differ is refused (by [`BaseModels::locate`]), never replaced.
    async fn ensure_base(&mut self, client: &mut Client, spec: &RunSpec) -> Result<(), SiteError> {
        let Some(encoder) = spec.encoder() else {
            return Ok(());
        };
        let (name, sha) = (encoder.base.clone(), encoder.base_sha256.clone());
        if self.bases.locate(&name, &sha)?.is_some() {
            return Ok(());
        }
        let Some(dest) = self.bases.fetched_dir(&sha) else {
            return Ok(());
        };
        if !self.config.fetch_base_models {
            return Err(SiteError::Task(format!(
                "no base model `{name}` with weights {sha} at this site, and fetching base \
                 models is off (`fetch_base_models`); list it under [base_models]"
            )));
        }
        info!(site = %self.config.name, model = %name, sha256 = %sha, "fetching base model from the coordinator");
        let bytes = crate::base_fetch::fetch_base_model(client, &name, &sha, &dest).await?;
        self.audit(Event::new(
            "base_model_received",
            json!({
                "from": self.config.coordinator,
                "name": name,
                "weights_sha256": sha,
                "bytes": bytes,
            }),
        ));
        Ok(())
    }

    /// The pooled embeddings of a run's images through its frozen encoder, off the async
    /// threads: batched, cached under `data_dir/embeddings` by (weights, preprocessing, image),
    /// logged as it goes, and stopped by the kill switch or the run's end.
    async fn embed(
        &self,
        task: &v1::Task,
        spec: &RunSpec,
        images: Vec<medfl_train::image::LabelledImage>,
    ) -> Result<Examples, SiteError> {
        let Some(encoder_spec) = spec.image_encoder() else {
            return Err(SiteError::Task(format!(
                "run {}: an image task needs an image model (`kind = \"tinyvit\"`)",
                task.run_id
            )));
        };
        let encoder = self.bases.image_encoder(encoder_spec)?;
        let cache =
            medfl_train::embed::EmbeddingCache::new(&self.config.data_dir.join("embeddings"));
        let guard = self.tasks.begin(TaskKey {
            run: task.run_id.clone(),
            round: task.round,
            attempt: task.attempt,
        });
        let token = guard.token().clone();
        let (run, site) = (task.run_id.clone(), self.config.name.clone());
        let paths: Vec<_> = images.iter().map(|i| i.path.clone()).collect();
        let started = std::time::Instant::now();
        let features = tokio::task::spawn_blocking(move || {
            let mut logged = 0;
            encoder.embed_files(&paths, Some(&cache), token.flag(), &mut |p| {
                // About every tenth of the way, and at the end.
                if p.done == p.total || p.done * 10 / p.total.max(1) > logged {
                    logged = p.done * 10 / p.total.max(1);
                    info!(run = %run, site = %site, done = p.done, total = p.total, cached = p.cached, "embedding images");
                }
            })
        })
        .await
        .map_err(|e| SiteError::Task(format!("embedding task: {e}")))?;
        drop(guard);
        let features = features?;
        info!(run = %task.run_id, site = %self.config.name, images = images.len(), secs = started.elapsed().as_secs_f64(), "images embedded");
        Ok(Examples {
            features,
            labels: images.iter().map(|i| i.label).collect(),
            n_features: medfl_core::spec::IMAGE_EMBEDDING_WIDTH,
        })
    }

    async fn prepare(
        &mut self,
        task: &v1::Task,
        spec: RunSpec,
        spec_sha256: String,
    ) -> Result<Arc<Prepared>, SiteError> {
        let dataset = self.datasets.get(&spec.task.dataset).ok_or_else(|| {
            SiteError::Task(format!(
                "site `{}` has no dataset named `{}`",
                self.config.name, spec.task.dataset
            ))
        })?;
        let seed = spec.seed ^ fnv1a(&self.config.name);
        let t = &spec.task;
        let mut sums = None;
        let (train, validation) = match (dataset, &t.text, &t.image) {
            (Dataset::Text(table), Some(text), None) => {
                let (examples, skipped) = table.examples(text, &t.label, &t.labels)?;
                if skipped.total() > 0 {
                    warn!(run = %task.run_id, site = %self.config.name, file = %table.path().display(), "skipped lines: {skipped}");
                }
                let (train, validation) = examples.split(t.validation_fraction, seed);
                (Data::Text(train), Data::Text(validation))
            }
            (Dataset::Table(table), None, None) => {
                let examples = table.examples(&t.features, &t.label, &t.labels)?;
                let (train, validation, train_sums) = standardized(task, &spec, &examples, seed)?;
                sums = Some(train_sums);
                (train, validation)
            }
            (Dataset::Images(images), None, Some(column)) => {
                let images = images.labelled(column, &t.label, &t.labels)?;
                let examples = self.embed(task, &spec, images).await?;
                let (train, validation, train_sums) = standardized(task, &spec, &examples, seed)?;
                sums = Some(train_sums);
                (train, validation)
            }
            _ => {
                return Err(SiteError::Task(format!(
                    "dataset `{}` holds {}; a {} needs {}",
                    t.dataset,
                    dataset.kind(),
                    t.kind().replace('_', " "),
                    match (&t.text, &t.image) {
                        (Some(_), _) => "a `jsonl` dataset",
                        (_, Some(_)) => "an `image_folder` or `image_csv` dataset",
                        _ => "a `csv` dataset",
                    }
                )))
            }
        };
        let model: Arc<dyn LocalModel> = Arc::from(model_for_run(&spec, &self.bases)?);
        let record = spec.privacy.record.as_ref().map(|p| {
            let budget = self.config.policy.privacy.get(&spec.task.dataset);
            let opts = TrainOptions::from_spec(&spec, spec.seed);
            let delta = budget.and_then(|b| b.delta);
            crate::privacy::describe(p, train.len(), &opts, spec.rounds, delta)
        });
        let client = spec
            .privacy
            .client
            .as_ref()
            .map(|c| crate::privacy::describe_client(c, spec.rounds));
        let privacy_summary = match (record, client) {
            (Some(r), Some(c)) => Some(format!("{r}; {c}")),
            (r, c) => r.or(c),
        };
        let prepared = Arc::new(Prepared {
            model,
            train,
            validation,
            spec,
            spec_sha256,
            standardization: task.standardization.clone(),
            sums,
            privacy_summary,
        });
        info!(
            run = %task.run_id,
            site = %self.config.name,
            train = prepared.train.len(),
            validation = prepared.validation.len(),
            "run data prepared"
        );
        self.prepared.insert(task.run_id.clone(), prepared.clone());
        Ok(prepared)
    }

    /// Forgets what was kept for runs the coordinator said ended: their prepared data and
    /// held tasks.
    fn forget_ended_runs(&mut self) {
        for run in self.tasks.take_ended() {
            self.prepared.remove(&run);
            if self.held.remove(&run).is_some() {
                info!(run = %run, site = %self.config.name, "run ended at the coordinator; its held task is dropped");
            }
        }
    }

    /// Does one task. A task this site will not answer (declined, cancelled, failed, its
    /// result refused) is always reported to the coordinator, so no round waits for it;
    /// connection problems are returned so the caller reconnects.
    pub async fn handle(&mut self, client: &mut Client, task: v1::Task) -> Result<(), SiteError> {
        self.forget_ended_runs();
        // A newer task of a run supersedes the one held for it.
        self.held.remove(&task.run_id);
        self.tasks.work_on(&task.run_id);
        let e = match self.execute(client, &task).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_disconnect() => return Err(e),
            // The kill switch, not a fault, stopped it mid-task.
            Err(SiteError::Cancelled(CancelReason::Paused)) => {
                Declined::Paused.because(PAUSED.into())
            }
            Err(e) => e,
        };
        let (run, round, attempt) = (task.run_id.clone(), task.round, task.attempt);
        // A refused result (late, duplicate, over the norm bound), a task this site cannot do,
        // a run the hospital keeps out, or work cancelled (the run ended, the site stops):
        // either way, tell the coordinator not to wait for it this round.
        let (what, declined) = match &e {
            SiteError::Rpc(_) => ("result refused", v1::Declined::Unspecified),
            SiteError::Declined { kind, .. } => (
                "task declined",
                match kind {
                    Declined::PendingApproval => v1::Declined::PendingApproval,
                    Declined::Rejected => v1::Declined::Rejected,
                    Declined::Paused => v1::Declined::Paused,
                    Declined::BudgetExhausted => v1::Declined::BudgetExhausted,
                },
            ),
            SiteError::Cancelled(_) => ("task cancelled", v1::Declined::Unspecified),
            _ => ("task failed", v1::Declined::Unspecified),
        };
        if declined == v1::Declined::PendingApproval {
            // The coordinator keeps this site's place in the round and does not hand the task
            // out again: it is done from here once the hospital approves.
            self.held.insert(run.clone(), task);
        }
        if matches!(e, SiteError::Cancelled(_)) {
            info!(run = %run, round, site = %self.config.name, reason = %e, "{what}");
        } else {
            warn!(run = %run, round, site = %self.config.name, error = %e, "{what}");
        }
        self.audit(
            Event::new(
                "task_failed",
                json!({ "what": what, "reason": e.to_string() }),
            )
            .run(run.clone())
            .round(round),
        );
        let reply = client
            .site
            .report_task_failure(client.authed(v1::ReportTaskFailureRequest {
                run_id: run,
                round,
                attempt,
                // A decline's kind is shown beside its reason already; a cancellation says so.
                reason: redact_paths(
                    &if declined == v1::Declined::Unspecified
                        && !matches!(e, SiteError::Cancelled(_))
                    {
                        format!("{what}: {e}")
                    } else {
                        e.to_string()
                    },
                    &self.config,
                ),
                declined: declined.into(),
            }))
            .await;
        match reply {
            Err(status) if SiteError::Rpc(status.clone()).is_disconnect() => {
                Err(SiteError::Rpc(status))
            }
            // The run may have ended meanwhile: nothing more to say.
            _ => Ok(()),
        }
    }

    /// Does the tasks held while their runs awaited approval, once the hospital decided: an
    /// approved run's task is trained (or evaluated) and sent now, without waiting for the
    /// coordinator to hand it out again; a rejected one is declined to the coordinator. Held
    /// tasks past their deadline, or of runs that ended, are dropped.
    pub async fn run_held(&mut self, client: &mut Client) -> Result<(), SiteError> {
        self.forget_ended_runs();
        let now = crate::audit::now_ms();
        let site = self.config.name.clone();
        self.held.retain(|run, task| {
            let live = task.deadline_unix_ms > now;
            if !live {
                debug!(run = %run, round = task.round, site = %site, "held task past its deadline; dropped");
            }
            live
        });
        if self.held.is_empty() {
            return Ok(());
        }
        let queue = match Approvals::load(&self.config.data_dir) {
            Ok(queue) => queue,
            Err(e) => {
                warn!(site = %site, error = %e, "approval queue unreadable; held tasks wait");
                return Ok(());
            }
        };
        let decided: Vec<String> = self
            .held
            .iter()
            .filter(|(run, task)| {
                let sha = crate::policy::spec_sha256(&task.spec_toml);
                matches!(
                    queue.standing(run, &sha),
                    Some(Decision::Approved | Decision::Rejected)
                )
            })
            .map(|(run, _)| run.clone())
            .collect();
        for run in decided {
            let Some(task) = self.held.remove(&run) else {
                continue;
            };
            info!(run = %run, round = task.round, site = %site, "the hospital decided; doing the task held for it");
            self.handle(client, task).await?;
        }
        Ok(())
    }

    async fn execute(&mut self, client: &mut Client, task: &v1::Task) -> Result<(), SiteError> {
        self.verify_task(task)?;
        self.check_not_paused()?;
        // The hospital's decision on a run holds for the spec it first came with only.
        let spec_sha256 = crate::policy::spec_sha256(&task.spec_toml);
        let queue = Approvals::load(&self.config.data_dir)?;
        // Bound by the hospital's decision (queued runs) or by the admission this daemon made.
        let changed = queue.spec_change(&task.run_id, &spec_sha256).or_else(|| {
            self.admitted
                .get(&task.run_id)
                .filter(|bound| **bound != spec_sha256)
                .map(|bound| crate::policy::SpecChanged {
                    run: task.run_id.clone(),
                    name: self
                        .prepared
                        .get(&task.run_id)
                        .map(|p| p.spec.name.clone())
                        .unwrap_or_default(),
                    bound: bound.clone(),
                    new: spec_sha256.clone(),
                })
        });
        if let Some(changed) = changed {
            self.audit(
                Event::new(
                    "run_spec_changed",
                    json!({
                        "name": changed.name,
                        "bound_spec_sha256": changed.bound,
                        "spec_sha256": changed.new,
                    }),
                )
                .run(task.run_id.clone())
                .round(task.round),
            );
            return Err(changed.into_error());
        }
        let cached = self
            .prepared
            .get(&task.run_id)
            .filter(|p| p.spec_sha256 == spec_sha256 && p.standardization == task.standardization);
        let prepared = match cached {
            Some(p) => p.clone(),
            None => {
                let spec = RunSpec::from_toml(&task.spec_toml)?;
                // Nothing is fetched or loaded for a run the policy refuses anyway.
                if let Some(why) = self.config.policy.violation(&spec, 0) {
                    return Err(
                        Declined::Rejected.because(format!("rejected by the site's policy: {why}"))
                    );
                }
                self.ensure_base(client, &spec).await?;
                self.prepare(task, spec, spec_sha256.clone()).await?
            }
        };
        // The hospital decides, at every task: its policy, then its approval queue.
        let update_bytes = prepared.model.schema().numel() as u64 * 4;
        let admitted = crate::policy::admit(
            &self.config.policy,
            &self.config.data_dir,
            &task.run_id,
            &prepared.spec,
            &spec_sha256,
            update_bytes,
            prepared.privacy_summary.as_deref(),
        );
        // Audited: every refusal, and the first admission of a run (approved by policy or by the
        // hospital) since this daemon started.
        let first = admitted.is_ok()
            && self
                .admitted
                .insert(task.run_id.clone(), spec_sha256.clone())
                .is_none();
        let event = match &admitted {
            Ok(Some(a)) if a.reason.is_empty() => Some(("run_approved", a.summary.clone())),
            Ok(Some(a)) => Some(("run_approved", format!("{} ({})", a.summary, a.reason))),
            Ok(None) if first => Some(("run_admitted", "approved by the hospital".into())),
            Err(e) => Some(("run_not_admitted", e.to_string())),
            Ok(None) => None,
        };
        if let Some((what, detail)) = event {
            self.audit(
                Event::new(
                    what,
                    json!({
                        "name": prepared.spec.name,
                        "detail": detail,
                        "spec_sha256": spec_sha256,
                    }),
                )
                .run(task.run_id.clone()),
            );
        }
        admitted?;

        let kind = v1::TaskKind::try_from(task.kind);
        let federated = prepared.spec.task.standardization(&prepared.spec.privacy)
            == Some(Standardize::Federated);
        match kind {
            // Only a spec that asks for federated standardisation (which the hospital admitted
            // above) lets any sum leave; a coordinator asking for more is refused.
            Ok(v1::TaskKind::Statistics) if !federated => {
                return Err(SiteError::Task(format!(
                    "run {} standardises locally (or trains with differential privacy): its \
                     feature statistics never leave this site",
                    task.run_id
                )));
            }
            Ok(v1::TaskKind::Statistics) => {
                return self.send_statistics(client, task, &prepared).await
            }
            Ok(v1::TaskKind::Train | v1::TaskKind::Evaluate)
                if federated && task.standardization.is_none() =>
            {
                return Err(SiteError::Task(format!(
                    "run {} standardises with the federation's statistics, but its round {} \
                     task carries none",
                    task.run_id, task.round
                )));
            }
            _ => {}
        }
        // A training task can be cancelled (kill switch, run stopped, shutdown) from here on;
        // an evaluation is short and answers anyway.
        let guard = matches!(kind, Ok(v1::TaskKind::Train)).then(|| {
            self.tasks.begin(TaskKey {
                run: task.run_id.clone(),
                round: task.round,
                attempt: task.attempt,
            })
        });
        // The signed size may not exceed what the spec's model takes: F32 tensors and their
        // header. Nothing larger is downloaded or held.
        let allowed = update_bytes + medfl_core::safetensors::HEADER_ALLOWANCE;
        if task.global_size > allowed {
            return Err(SiteError::Corrupt(format!(
                "the global model {} of run {} round {} is {} bytes, more than the {allowed} \
                 bytes its spec's model takes: refusing to download it",
                task.global_sha256, task.run_id, task.round, task.global_size
            )));
        }
        let (bytes, downloaded) = self
            .cache
            .fetch(client, &task.global_sha256, task.global_size)
            .await?;
        debug!(run = %task.run_id, round = task.round, downloaded, "global model ready");
        self.audit(
            Event::new(
                "model_received",
                json!({
                    "from": self.config.coordinator,
                    "sha256": task.global_sha256,
                    "bytes": task.global_size,
                    "downloaded": downloaded,
                }),
            )
            .run(task.run_id.clone())
            .round(task.round),
        );
        let global = tokio::task::spawn_blocking(move || decode(&bytes))
            .await
            .map_err(|e| SiteError::Task(format!("decoding task: {e}")))??;
        match (kind, &guard) {
            (Ok(v1::TaskKind::Train), Some(guard)) => {
                let token = guard.token().clone();
                token.check()?;
                self.train(client, task, prepared, global, token).await
            }
            (Ok(v1::TaskKind::Evaluate), _) => self.evaluate(client, task, prepared, global).await,
            _ => Err(SiteError::Task(format!("unknown task kind {}", task.kind))),
        }
    }

    async fn train(
        &mut self,
        client: &mut Client,
        task: &v1::Task,
        prepared: Arc<Prepared>,
        global: medfl_core::ModelParams,
        token: Arc<CancelToken>,
    ) -> Result<(), SiteError> {
        // The same for every attempt at a round: a retried or resumed round trains identically.
        let seed = prepared.spec.seed ^ fnv1a(&self.config.name) ^ (u64::from(task.round) << 20);
        let opts = TrainOptions::from_spec(&prepared.spec, seed);
        // Record-level DP: what this round costs, by this site's own count of its records.
        let charge = match &prepared.spec.privacy.record {
            Some(privacy) => {
                let (privacy, dataset) = (privacy.clone(), prepared.spec.task.dataset.clone());
                let (rows, opts) = (prepared.train.len(), opts.clone());
                let before = self
                    .state
                    .runs
                    .get(&task.run_id)
                    .and_then(|r| r.privacy.clone());
                let budget = crate::privacy::Budget::of(
                    &self.config.policy.privacy,
                    &self.state,
                    &dataset,
                    &task.run_id,
                    prepared.spec.rounds,
                );
                let charge = tokio::task::spawn_blocking(move || {
                    crate::privacy::plan(
                        &privacy,
                        &dataset,
                        rows,
                        &opts,
                        before.as_ref(),
                        budget.as_ref(),
                    )
                })
                .await
                .map_err(|e| SiteError::Task(format!("privacy accounting task: {e}")))?;
                if let Err(e @ SiteError::Declined { .. }) = &charge {
                    self.audit(
                        Event::new("privacy_refused", json!({ "detail": e.to_string() }))
                            .run(task.run_id.clone())
                            .round(task.round),
                    );
                }
                Some(charge?)
            }
            None => None,
        };
        // Client-level DP: the round's clipping norm and expected sample, from the signed task.
        let client_dp = match &prepared.spec.privacy.client {
            Some(c) => match (task.clip_norm, task.expected_sites) {
                (Some(clip), Some(expected)) => Some((c.clone(), clip, expected)),
                _ => {
                    return Err(SiteError::Task(
                        "the run has client-level DP but the task carries no clip_norm and \
                         expected_sites"
                            .into(),
                    ))
                }
            },
            None => None,
        };
        let (run, round, site) = (task.run_id.clone(), task.round, self.config.name.clone());
        info!(run = %run, round, site = %site, examples = prepared.train.len(), "training");
        let started = std::time::Instant::now();
        let cancel = token.clone();
        let (report, distance, release) = tokio::task::spawn_blocking(move || {
            let mut report = prepared.model.train(&global, &prepared.train, &opts, cancel.flag(), &mut |p| {
                debug!(run = %run, round, site = %site, step = p.step, of = p.total_steps, loss = p.loss, "training progress");
            })?;
            // Clipped (and with distributed noise, noised) here, so only that leaves.
            let release = client_dp
                .map(|(c, clip, expected)| {
                    let mut bits = medfl_train::private::SystemBits::new();
                    medfl_core::client_dp::release_update(
                        &c,
                        clip,
                        expected,
                        &mut report.params,
                        &global,
                        &mut bits,
                    )
                })
                .transpose()?;
            let distance = l2_distance(&report.params, &global);
            Ok::<_, TrainError>((report, distance, release))
        })
        .await
        .map_err(|e| SiteError::Task(format!("training task: {e}")))?
        .map_err(|e| match e {
            // A flag without a reason was set by a guard dropped as the site stops.
            TrainError::Cancelled => {
                SiteError::Cancelled(token.reason().unwrap_or(CancelReason::ShuttingDown))
            }
            e => SiteError::Train(e),
        })?;
        let bytes = encode(&report.params);
        let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        let size = bytes.len() as u64;
        info!(
            run = %task.run_id,
            round = task.round,
            site = %self.config.name,
            loss = report.mean_loss,
            steps = report.steps,
            seconds = started.elapsed().as_secs_f64(),
            bytes = size,
            "trained; sending update"
        );
        let header = v1::UpdateHeader {
            run_id: task.run_id.clone(),
            round: task.round,
            attempt: task.attempt,
            base_sha256: task.global_sha256.clone(),
            sha256,
            size,
            num_examples: report.examples,
            train_loss: report.mean_loss,
            train_steps: report.steps,
            signature: Vec::new(),
            privacy_epsilon: charge.as_ref().map(|c| c.ledger.epsilon),
            clip_indicator: release.and_then(|r| r.clip_indicator),
        };
        let claim = medfl_proto::convert::update_claim(&header, &self.config.name);
        let signature = self.signer.sign(&claim.message()).as_ref().to_vec();
        let header = v1::UpdateHeader {
            signature,
            ..header
        };
        // What leaves the hospital is on record whether or not the coordinator takes it.
        let mut sent = json!({
            "to": self.config.coordinator,
            "bytes": size,
            "sha256": header.sha256,
            "examples": header.num_examples,
            "tensors": report.params.tensors.iter().map(|t| &t.name).collect::<Vec<_>>(),
            "l2_distance_from_global": distance,
            "client_dp": release.map(|r| json!({
                "trained_l2_distance": r.norm,
                "clipped_by": r.scale,
                "clip_norm": task.clip_norm,
                "expected_sites": task.expected_sites,
            })),
            "signature": hex::encode(&header.signature),
        });
        // The kill switch may have been thrown, the run stopped or the site told to stop while
        // training: then nothing leaves.
        self.check_not_paused()?;
        token.check()?;
        // What DP-SGD spent is charged before the update leaves, whether or not the
        // coordinator then takes it.
        if let Some(charge) = charge {
            let l = &charge.ledger;
            info!(run = %task.run_id, round = task.round, epsilon = l.epsilon, delta = l.delta, steps = l.steps, "record-level privacy spent");
            self.audit(
                Event::new(
                    "privacy_spent",
                    json!({
                        "dataset": l.dataset,
                        "epsilon": l.epsilon,
                        "epsilon_before": charge.spent_before,
                        "delta": l.delta,
                        "accountant": l.accountant,
                        "sample_rate": l.sample_rate,
                        "noise_multiplier": l.noise_multiplier,
                        "max_grad_norm": l.max_grad_norm,
                        "round_steps": charge.round_steps,
                        "steps": l.steps,
                        "rows_clipped": report.private.map(|p| p.rows_clipped),
                        "rows_sampled": report.private.map(|p| p.rows_sampled),
                    }),
                )
                .run(task.run_id.clone())
                .round(task.round),
            );
            let record = self.state.runs.entry(task.run_id.clone()).or_default();
            record.privacy = Some(charge.ledger);
            self.state.save(&self.config.data_dir)?;
        }
        let result = push_update(client, header, bytes, self.chunk_size).await;
        sent["accepted"] = json!(result.is_ok());
        if let Err(e) = &result {
            sent["refusal"] = json!(e.to_string());
        }
        self.audit(
            Event::new("update_sent", sent)
                .run(task.run_id.clone())
                .round(task.round),
        );
        result?;
        let record = self.state.runs.entry(task.run_id.clone()).or_default();
        record.name = prepared_name(&task.spec_toml);
        record.last_round = task.round;
        record.updates_sent += 1;
        record.bytes_sent += size;
        self.state.save(&self.config.data_dir)?;
        Ok(())
    }

    /// Sends the per-feature sums of the training rows (never a row) for federated
    /// standardisation, and audits exactly what left.
    async fn send_statistics(
        &mut self,
        client: &mut Client,
        task: &v1::Task,
        prepared: &Prepared,
    ) -> Result<(), SiteError> {
        let sums = prepared.sums.clone().ok_or_else(|| {
            SiteError::Task(format!(
                "run {} asks for feature statistics, but its task reads no feature columns",
                task.run_id
            ))
        })?;
        info!(run = %task.run_id, round = task.round, site = %self.config.name, rows = sums.count, "sending feature statistics");
        self.audit(
            Event::new(
                "statistics_sent",
                json!({
                    "to": self.config.coordinator,
                    "features": prepared.spec.task.feature_names(),
                    "rows": sums.count,
                    "sum": sums.sum,
                    "sum_sq": sums.sum_sq,
                }),
            )
            .run(task.run_id.clone())
            .round(task.round),
        );
        client
            .site
            .report_statistics(client.authed(v1::ReportStatisticsRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                attempt: task.attempt,
                count: sums.count,
                sum: sums.sum,
                sum_sq: sums.sum_sq,
            }))
            .await?;
        Ok(())
    }

    async fn evaluate(
        &mut self,
        client: &mut Client,
        task: &v1::Task,
        prepared: Arc<Prepared>,
        global: medfl_core::ModelParams,
    ) -> Result<(), SiteError> {
        let report = tokio::task::spawn_blocking(move || {
            prepared.model.evaluate(&global, &prepared.validation)
        })
        .await
        .map_err(|e| SiteError::Task(format!("evaluation task: {e}")))??;
        info!(run = %task.run_id, round = task.round, site = %self.config.name, metrics = ?report.metrics, "evaluated");
        self.audit(
            Event::new(
                "evaluation_sent",
                json!({
                    "to": self.config.coordinator,
                    "examples": report.examples,
                    "metrics": report.metrics,
                    "model_sha256": task.global_sha256,
                }),
            )
            .run(task.run_id.clone())
            .round(task.round),
        );
        client
            .site
            .report_evaluation(client.authed(v1::ReportEvaluationRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                global_sha256: task.global_sha256.clone(),
                num_examples: report.examples,
                metrics: report.metrics,
            }))
            .await?;
        let record = self.state.runs.entry(task.run_id.clone()).or_default();
        // Round 0 is a cross-site evaluation of the final model, not a round.
        record.last_round = record.last_round.max(task.round);
        self.state.save(&self.config.data_dir)?;
        Ok(())
    }
}

/// The L2 distance between two models of the same schema.
fn l2_distance(a: &medfl_core::ModelParams, b: &medfl_core::ModelParams) -> f64 {
    a.tensors
        .iter()
        .zip(&b.tensors)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data))
        .map(|(p, q)| f64::from(p - q).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn prepared_name(spec_toml: &str) -> String {
    RunSpec::from_toml(spec_toml)
        .map(|s| s.name)
        .unwrap_or_default()
}

/// Streams an update: its header, then `chunk`-sized pieces of `bytes`.
pub async fn push_update(
    client: &mut Client,
    header: v1::UpdateHeader,
    bytes: Vec<u8>,
    chunk: usize,
) -> Result<v1::PushUpdateResponse, SiteError> {
    let bytes = Arc::new(bytes);
    let pieces = bytes.len().div_ceil(chunk);
    let data = tokio_stream::iter(0..pieces).map(move |i| v1::UpdateChunk {
        part: Some(v1::update_chunk::Part::Data(
            bytes[i * chunk..((i + 1) * chunk).min(bytes.len())].to_vec(),
        )),
    });
    let stream = tokio_stream::once(v1::UpdateChunk {
        part: Some(v1::update_chunk::Part::Header(header)),
    })
    .chain(data);
    Ok(client
        .site
        .push_update(client.authed(stream))
        .await?
        .into_inner())
}
/// `text` with every local path the site is configured with (its datasets' files, its data
/// directory) cut down to the file's own name: what the hospital stores where stays at the
/// hospital, while `site.csv:4: ...` still tells the researcher which file and line.
fn redact_paths(text: &str, config: &SiteConfig) -> String {
    let mut paths: Vec<std::path::PathBuf> = config
        .datasets
        .values()
        .map(|d| d.path.clone())
        .chain(std::iter::once(config.data_dir.clone()))
        .collect();
    let canonical: Vec<std::path::PathBuf> =
        paths.iter().filter_map(|p| p.canonicalize().ok()).collect();
    paths.extend(canonical);
    // Longest first, so a directory does not cut into a file below it.
    paths.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    let mut out = text.to_string();
    for path in paths {
        let full = path.display().to_string();
        if full.is_empty() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out = out.replace(&full, &name);
    }
    out
}
