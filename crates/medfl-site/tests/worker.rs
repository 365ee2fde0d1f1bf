//! A site against a scripted coordinator on an ephemeral port. A task cancelled by the kill
//! switch, by the end of its run or by the site stopping is reported (no round waits for it)
//! and the run's next task trains; a task declined while its run awaits approval is held and
//! done once the hospital approves, also by a running daemon; a task whose run spec changed is
//! refused and audited.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medfl_core::spec::RunSpec;
use medfl_proto::v1;
use medfl_proto::v1::site_service_server::{SiteService, SiteServiceServer};
use medfl_site::client::Client;
use medfl_site::policy::{spec_sha256, Approvals, Decision};
use medfl_site::tasks::{CancelReason, Tasks};
use medfl_site::worker::Worker;
use medfl_site::SiteConfig;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::sync::{watch, Notify};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const CSV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/breast_cancer_wisconsin.csv"
);

/// What the worker does when the global model has been sent, before it trains: stands in for
/// the kill switch watcher or the heartbeat, at a point the test chooses.
type Hook = Box<dyn FnOnce() + Send>;

/// The coordinator's side of the conversation: hands out tasks and global models, keeps what
/// the site sends, and counts it in `events` for the test to wait on.
struct Script {
    key: Ed25519KeyPair,
    /// Global models by SHA-256.
    models: Mutex<BTreeMap<String, Arc<Vec<u8>>>>,
    /// Tasks for the next polls.
    tasks: Mutex<VecDeque<v1::Task>>,
    task_added: Notify,
    reports: Mutex<Vec<v1::ReportTaskFailureRequest>>,
    updates: Mutex<Vec<v1::UpdateHeader>>,
    statistics: Mutex<Vec<v1::ReportStatisticsRequest>>,
    after_download: Mutex<Option<Hook>>,
    events: watch::Sender<usize>,
}

impl Script {
    /// A signed training task of `run`, with a global model of its own (none comes from the
    /// site's cache).
    fn task(&self, run: &str, round: u32, attempt: u32, spec: &str, deadline_ms: u64) -> v1::Task {
        let parsed = RunSpec::from_toml(spec).expect("spec");
        let bases = medfl_train::BaseModels::new(BTreeMap::new(), None);
        let params = medfl_train::model_for_run(&parsed, &bases)
            .and_then(|m| m.init(u64::from(round) << 8 | u64::from(attempt)))
            .expect("a global model");
        let model = medfl_core::safetensors::encode(&params);
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &model));
        let size = model.len() as u64;
        let mut models = self.models.lock().expect("models");
        models.insert(sha.clone(), Arc::new(model));
        let mut task = v1::Task {
            run_id: run.into(),
            round,
            attempt,
            kind: v1::TaskKind::Train as i32,
            spec_toml: spec.into(),
            global_sha256: sha,
            global_size: size,
            deadline_unix_ms: deadline_ms,
            signature: Vec::new(),
            clip_norm: None,
            expected_sites: None,
            // A tabular run standardising federally: tasks carry the pooled statistics (unit
            // ones here; this script gathers none).
            standardization: (parsed.task.standardization(&parsed.privacy)
                == Some(medfl_core::spec::Standardize::Federated))
            .then(|| {
                let d = parsed.task.features.len();
                medfl_core::standardize::Standardization {
                    features: parsed.task.features.clone(),
                    mean: vec![0.0; d],
                    std: vec![1.0; d],
                    rows: 1,
                    sites: 1,
                }
                .to_json()
            }),
        };
        let claim = medfl_proto::convert::task_claim(&task);
        task.signature = self.key.sign(&claim.message()).as_ref().to_vec();
        task
    }

    /// Hands `task` to the site's next poll.
    fn offer(&self, task: v1::Task) {
        self.tasks.lock().expect("tasks").push_back(task);
        self.task_added.notify_one();
    }

    fn reports(&self) -> Vec<v1::ReportTaskFailureRequest> {
        self.reports.lock().expect("reports").clone()
    }

    fn updates(&self) -> Vec<(String, u32, u32)> {
        let updates = self.updates.lock().expect("updates");
        updates
            .iter()
            .map(|h| (h.run_id.clone(), h.round, h.attempt))
            .collect()
    }

    /// Waits until the site has sent `n` reports and updates in all.
    async fn sent(&self, n: usize) {
        let mut events = self.events.subscribe();
        tokio::time::timeout(Duration::from_secs(30), events.wait_for(|e| *e >= n))
            .await
            .expect("the site answered in time")
            .expect("script running");
    }
}

#[derive(Clone)]
struct Coordinator(Arc<Script>);

type Blobs = Pin<Box<dyn Stream<Item = Result<v1::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl SiteService for Coordinator {
    async fn register(
        &self,
        _: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(v1::RegisterResponse {
            chunk_size: 1 << 20,
            heartbeat_interval_secs: 1,
            coordinator_public_key: self.0.key.public_key().as_ref().to_vec(),
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        Ok(Response::new(v1::HeartbeatResponse::default()))
    }

    async fn poll_task(
        &self,
        _: Request<v1::PollTaskRequest>,
    ) -> Result<Response<v1::PollTaskResponse>, Status> {
        let added = self.0.task_added.notified();
        let task = self.0.tasks.lock().expect("tasks").pop_front();
        if task.is_none() {
            // A long poll, cut short to keep the test quick.
            let _ = tokio::time::timeout(Duration::from_secs(1), added).await;
        }
        Ok(Response::new(v1::PollTaskResponse { task }))
    }

    type DownloadBlobStream = Blobs;

    async fn download_blob(
        &self,
        req: Request<v1::DownloadBlobRequest>,
    ) -> Result<Response<Blobs>, Status> {
        let req = req.into_inner();
        let model = self
            .0
            .models
            .lock()
            .expect("models")
            .get(&req.sha256)
            .cloned();
        let model = model.ok_or_else(|| Status::not_found(req.sha256.clone()))?;
        let offset = (req.offset as usize).min(model.len());
        let chunk = v1::BlobChunk {
            offset: offset as u64,
            data: model[offset..].to_vec(),
            total_size: model.len() as u64,
        };
        if let Some(hook) = self.0.after_download.lock().expect("hook").take() {
            hook();
        }
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(chunk)))))
    }

    async fn report_statistics(
        &self,
        req: Request<v1::ReportStatisticsRequest>,
    ) -> Result<Response<v1::ReportStatisticsResponse>, Status> {
        self.0
            .statistics
            .lock()
            .expect("statistics")
            .push(req.into_inner());
        self.0.events.send_modify(|e| *e += 1);
        Ok(Response::new(v1::ReportStatisticsResponse {}))
    }

    async fn get_base_model(
        &self,
        _: Request<v1::GetBaseModelRequest>,
    ) -> Result<Response<v1::GetBaseModelResponse>, Status> {
        Err(Status::unimplemented("not in this script"))
    }

    async fn push_update(
        &self,
        req: Request<Streaming<v1::UpdateChunk>>,
    ) -> Result<Response<v1::PushUpdateResponse>, Status> {
        let mut stream = req.into_inner();
        let mut header = None;
        while let Some(chunk) = stream.next().await {
            if let Some(v1::update_chunk::Part::Header(h)) = chunk?.part {
                header = Some(h);
            }
        }
        let header = header.ok_or_else(|| Status::invalid_argument("no header"))?;
        self.0.updates.lock().expect("updates").push(header);
        self.0.events.send_modify(|e| *e += 1);
        Ok(Response::new(v1::PushUpdateResponse {
            accepted: true,
            message: String::new(),
        }))
    }

    async fn report_evaluation(
        &self,
        _: Request<v1::ReportEvaluationRequest>,
    ) -> Result<Response<v1::ReportEvaluationResponse>, Status> {
        Ok(Response::new(v1::ReportEvaluationResponse {}))
    }

    async fn report_task_failure(
        &self,
        req: Request<v1::ReportTaskFailureRequest>,
    ) -> Result<Response<v1::ReportTaskFailureResponse>, Status> {
        self.0
            .reports
            .lock()
            .expect("reports")
            .push(req.into_inner());
        self.0.events.send_modify(|e| *e += 1);
        Ok(Response::new(v1::ReportTaskFailureResponse {}))
    }
}

/// A breast cancer run spec; `seed` tells two specs of the same run apart.
fn spec_toml(seed: u64) -> String {
    let header = std::fs::read_to_string(CSV).expect("the breast cancer data");
    let features: Vec<String> = header
        .lines()
        .next()
        .expect("a header")
        .split(',')
        .filter(|c| *c != "diagnosis")
        .map(|c| format!("\"{c}\""))
        .collect();
    format!(
        "name = \"sepsis\"\nrounds = 3\nseed = {seed}\n[model]\nkind = \"mlp\"\nhidden = []\n\
         [task]\ndataset = \"bc\"\nlabel = \"diagnosis\"\nlabels = [\"B\", \"M\"]\n\
         features = [{}]\n[training]\nlocal_epochs = 1\nbatch_size = 32\n",
        features.join(", ")
    )
}

fn now_ms() -> u64 {
    medfl_site::audit::now_ms()
}

/// Starts a scripted coordinator on an ephemeral port; it ends with the test's runtime.
async fn scripted() -> (Arc<Script>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let script = Arc::new(Script {
        key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key"),
        models: Mutex::default(),
        tasks: Mutex::default(),
        task_added: Notify::new(),
        reports: Mutex::default(),
        updates: Mutex::default(),
        statistics: Mutex::default(),
        after_download: Mutex::default(),
        events: watch::Sender::new(0),
    });
    let service = SiteServiceServer::new(Coordinator(script.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("scripted coordinator");
    });
    (script, addr)
}

/// The config of site `st-marys` holding the breast cancer data as `bc`, under `policy`.
fn site_config(dir: &Path, addr: SocketAddr, policy: &str) -> SiteConfig {
    let config_file = dir.join("site.toml");
    std::fs::write(
        &config_file,
        format!(
            "name = \"st-marys\"\ncoordinator = \"http://{addr}\"\ninsecure_dev = true\n\
             data_dir = \"{}\"\nreconnect_min_ms = 50\n[datasets.bc]\npath = \"{CSV}\"\n\
             {policy}\n",
            dir.join("data").display()
        ),
    )
    .expect("site config");
    SiteConfig::load(Some(&config_file)).expect("config")
}

/// A site worker connected to a scripted coordinator.
struct Harness {
    script: Arc<Script>,
    worker: Worker,
    client: Client,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(policy: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, addr) = scripted().await;
        let config = site_config(dir.path(), addr, policy);
        let mut worker = Worker::open(config.clone()).expect("worker");
        worker
            .pin_coordinator_key(script.key.public_key().as_ref())
            .expect("pin");
        let client = Client::connect(&config, worker.token())
            .await
            .expect("connect");
        Self {
            script,
            worker,
            client,
            data_dir: config.data_dir,
            _dir: dir,
        }
    }

    fn task(&self, run: &str, round: u32, attempt: u32, spec: &str, deadline_ms: u64) -> v1::Task {
        self.script.task(run, round, attempt, spec, deadline_ms)
    }

    async fn handle(&mut self, task: v1::Task) {
        self.worker
            .handle(&mut self.client, task)
            .await
            .expect("handled without losing the coordinator");
    }

    /// Runs `hook` with the site's tasks once the next global model is sent.
    fn after_download(&self, hook: impl FnOnce(&Tasks) + Send + 'static) {
        let tasks = self.worker.tasks().clone();
        *self.script.after_download.lock().expect("hook") = Some(Box::new(move || hook(&tasks)));
    }

    fn reports(&self) -> Vec<v1::ReportTaskFailureRequest> {
        self.script.reports()
    }

    fn updates(&self) -> Vec<(String, u32, u32)> {
        self.script.updates()
    }
}

fn later() -> u64 {
    now_ms() + 60_000
}

#[tokio::test]
async fn a_task_cancelled_by_the_kill_switch_is_reported_and_the_next_one_trains_insecure_dev_scripted_coordinator(
) {
    let mut site = Harness::start("").await;
    let spec = spec_toml(1);
    site.handle(site.task("run-1", 1, 0, &spec, later())).await;
    assert_eq!(site.updates(), [("run-1".to_string(), 1, 0)]);

    // The hospital throws the kill switch while round 2's model comes in.
    let data_dir = site.data_dir.clone();
    site.after_download(move |tasks| {
        medfl_site::policy::set_paused(&data_dir, Some("scanner upgrade")).expect("pause");
        assert_eq!(tasks.cancel_all(CancelReason::Paused), 1);
    });
    site.handle(site.task("run-1", 2, 0, &spec, later())).await;
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].declined(), v1::Declined::Paused);
    assert_eq!((reports[0].round, reports[0].attempt), (2, 0));
    assert!(
        reports[0].reason.contains("paused by the hospital"),
        "{reports:?}"
    );
    assert_eq!(site.updates().len(), 1);

    // Resumed: the round's retry trains at once, nothing stays cancelled.
    medfl_site::policy::set_paused(&site.data_dir, None).expect("resume");
    site.handle(site.task("run-1", 2, 1, &spec, later())).await;
    assert_eq!(site.updates()[1], ("run-1".to_string(), 2, 1));
    assert_eq!(site.reports().len(), 1);
    assert!(!site.worker.tasks().busy());
}

#[tokio::test]
async fn a_task_of_a_run_that_ended_is_reported_cancelled_insecure_dev_scripted_coordinator() {
    let mut site = Harness::start("").await;
    let spec = spec_toml(1);
    site.after_download(|tasks| {
        assert_eq!(tasks.run_stopped("run-1"), 1);
    });
    site.handle(site.task("run-1", 1, 0, &spec, later())).await;
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].declined(), v1::Declined::Unspecified);
    assert!(
        reports[0]
            .reason
            .starts_with("cancelled: the run ended at the coordinator"),
        "{reports:?}"
    );
    assert!(site.updates().is_empty());
    assert!(site.worker.tasks().active_runs().is_empty());
    // Should the run go on after all (resumed at the coordinator), its next task trains.
    site.handle(site.task("run-1", 2, 0, &spec, later())).await;
    assert_eq!(site.updates(), [("run-1".to_string(), 2, 0)]);
    assert_eq!(site.worker.tasks().active_runs(), ["run-1"]);
}

#[tokio::test]
async fn a_task_held_for_approval_trains_once_the_hospital_approves_insecure_dev_scripted_coordinator(
) {
    let mut site = Harness::start("[policy]\nrequire_approval = true\n").await;
    let spec = spec_toml(1);
    site.handle(site.task("run-1", 3, 1, &spec, later())).await;
    // Another run whose round is already over when the hospital gets to it.
    site.handle(site.task("run-2", 1, 0, &spec_toml(2), now_ms() - 1))
        .await;
    let reports = site.reports();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports
        .iter()
        .all(|r| r.declined() == v1::Declined::PendingApproval));
    assert_eq!(site.worker.held_runs(), ["run-1", "run-2"]);

    // Nothing decided yet: the tasks stay held and nothing is reported again.
    site.worker
        .run_held(&mut site.client)
        .await
        .expect("held tasks");
    assert_eq!(site.worker.held_runs(), ["run-1"]);
    assert_eq!(site.reports().len(), 2);

    // Approved by the spec's hash: the held task trains, for its own round and attempt.
    Approvals::decide(&site.data_dir, &spec_sha256(&spec), Decision::Approved, "")
        .expect("approve");
    Approvals::decide(&site.data_dir, "run-2", Decision::Approved, "").expect("approve");
    site.worker
        .run_held(&mut site.client)
        .await
        .expect("held tasks");
    assert_eq!(site.updates(), [("run-1".to_string(), 3, 1)]);
    assert!(site.worker.held_runs().is_empty());
    assert_eq!(site.reports().len(), 2);
}

#[tokio::test]
async fn a_task_whose_spec_changed_is_refused_and_audited_insecure_dev_scripted_coordinator() {
    let mut site = Harness::start("").await;
    let first = spec_toml(1);
    site.handle(site.task("run-1", 1, 0, &first, later())).await;
    let changed = spec_toml(99);
    site.handle(site.task("run-1", 2, 0, &changed, later()))
        .await;
    assert_eq!(site.updates(), [("run-1".to_string(), 1, 0)]);
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].declined(), v1::Declined::Rejected);
    for needle in ["run-1", &spec_sha256(&first), &spec_sha256(&changed)] {
        assert!(reports[0].reason.contains(needle), "{needle}: {reports:?}");
    }
    let audit = medfl_audit::read(&site.data_dir.join("audit.jsonl")).expect("the chain verifies");
    let entry = audit
        .iter()
        .find(|e| e.event == "run_spec_changed")
        .expect("audited");
    assert_eq!(entry.details["bound_spec_sha256"], spec_sha256(&first));
    assert_eq!(entry.details["spec_sha256"], spec_sha256(&changed));
}

#[tokio::test]
async fn a_task_announcing_a_model_larger_than_its_spec_is_refused_before_download_insecure_dev_scripted_coordinator(
) {
    let mut site = Harness::start("").await;
    let mut task = site.task("run-1", 1, 0, &spec_toml(1), later());
    // A compromised coordinator signs a 16 GiB "model" for a spec whose model is 400 bytes.
    task.global_size = 16 << 30;
    let claim = medfl_proto::convert::task_claim(&task);
    task.signature = site.script.key.sign(&claim.message()).as_ref().to_vec();
    site.handle(task).await;
    assert!(site.updates().is_empty());
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].reason.contains("refusing to download"),
        "{reports:?}"
    );
    // Nothing was fetched: the model cache holds no file of that size.
    let cached: u64 = std::fs::read_dir(site.data_dir.join("models"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    assert!(cached < 1 << 20, "{cached} bytes cached");
}

/// A site daemon running against the script until `stop` fires.
fn run_daemon(
    config: SiteConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), medfl_site::SiteError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(medfl_site::run(config, async {
        let _ = stopped.await;
    }));
    (stop, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_stopping_mid_task_tells_the_coordinator_insecure_dev_scripted_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, addr) = scripted().await;
    let (stop, daemon) = run_daemon(site_config(dir.path(), addr, ""));
    // The site is told to stop while the task's model comes in.
    *script.after_download.lock().expect("hook") = Some(Box::new(move || {
        let _ = stop.send(());
    }));
    script.offer(script.task("run-1", 1, 0, &spec_toml(1), later()));
    tokio::time::timeout(Duration::from_secs(30), daemon)
        .await
        .expect("stopped in time")
        .expect("join")
        .expect("stopped cleanly");
    let reports = script.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(
        reports[0].reason, "cancelled: the site is shutting down",
        "{reports:?}"
    );
    assert!(script.updates().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_site_trains_the_held_task_as_soon_as_the_hospital_approves_insecure_dev_scripted_coordinator(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, addr) = scripted().await;
    let config = site_config(dir.path(), addr, "[policy]\nrequire_approval = true\n");
    let data_dir = config.data_dir.clone();
    let (stop, daemon) = run_daemon(config);
    script.offer(script.task("run-1", 2, 1, &spec_toml(1), later()));
    script.sent(1).await;
    assert_eq!(
        script.reports()[0].declined(),
        v1::Declined::PendingApproval
    );

    // `medfl-site approve sepsis`: nothing is handed out again, yet the site trains the task.
    Approvals::decide_name(&data_dir, "sepsis", Decision::Approved, "").expect("approve");
    script.sent(2).await;
    assert_eq!(script.updates(), [("run-1".to_string(), 2, 1)]);
    assert_eq!(script.reports().len(), 1);
    let _ = stop.send(());
    daemon.await.expect("join").expect("stopped cleanly");
}

/// A coordinator that lowers a record-level DP run's noise after the hospital admitted it gets
/// the task refused and audited, and nothing more is charged or sent.
#[tokio::test]
async fn a_task_whose_dp_parameters_changed_is_refused_and_audited_insecure_dev_scripted_coordinator(
) {
    let mut site = Harness::start("").await;
    let dp = |z: f64| {
        format!(
            "{}[privacy]\nlevel = \"record\"\nnoise_multiplier = {z:?}\nmax_grad_norm = 1.0\n",
            spec_toml(1)
        )
    };
    let (admitted, weaker) = (dp(1.0), dp(0.1));
    site.handle(site.task("run-1", 1, 0, &admitted, later()))
        .await;
    site.handle(site.task("run-1", 2, 0, &weaker, later()))
        .await;
    assert_eq!(site.updates(), [("run-1".to_string(), 1, 0)]);
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].declined(), v1::Declined::Rejected);
    let audit = medfl_audit::read(&site.data_dir.join("audit.jsonl")).expect("the chain verifies");
    let changed = audit
        .iter()
        .find(|e| e.event == "run_spec_changed")
        .expect("audited");
    assert_eq!(changed.details["spec_sha256"], spec_sha256(&weaker));
    let charges: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "privacy_spent")
        .collect();
    assert_eq!(charges.len(), 1, "only the admitted round is charged");
    assert_eq!(charges[0].details["noise_multiplier"], 1.0);
}

#[tokio::test]
async fn a_statistics_task_sends_sums_only_for_a_federated_spec_insecure_dev_scripted_coordinator()
{
    let mut site = Harness::start("").await;
    let statistics_task = |site: &Harness, run: &str, spec: &str| {
        let mut task = site.task(run, 1, 1, spec, later());
        task.kind = v1::TaskKind::Statistics as i32;
        task.standardization = None;
        let claim = medfl_proto::convert::task_claim(&task);
        task.signature = site.script.key.sign(&claim.message()).as_ref().to_vec();
        task
    };
    let federated = spec_toml(1);
    site.handle(statistics_task(&site, "run-1", &federated))
        .await;
    let sent = site.script.statistics.lock().expect("statistics").clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let rows = std::fs::read_to_string(CSV).expect("data").lines().count() as u64 - 1;
    // The training split's sums only: the validation rows stay out.
    assert!(sent[0].count > rows / 2 && sent[0].count < rows, "{sent:?}");
    assert_eq!((sent[0].sum.len(), sent[0].sum_sq.len()), (30, 30));
    assert!(site.updates().is_empty() && site.reports().is_empty());
    // A spec that standardises locally never lets a sum leave, whatever the coordinator asks.
    let local = spec_toml(2).replace("[training]", "standardize = \"local\"\n[training]");
    site.handle(statistics_task(&site, "run-2", &local)).await;
    assert_eq!(site.script.statistics.lock().expect("statistics").len(), 1);
    let reports = site.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].reason.contains("never leave this site"),
        "{reports:?}"
    );
    let audit = medfl_audit::read(&site.data_dir.join("audit.jsonl")).expect("the chain verifies");
    let sent_entry = audit
        .iter()
        .find(|e| e.event == "statistics_sent")
        .expect("audited");
    assert_eq!(sent_entry.details["rows"], sent[0].count);
}
