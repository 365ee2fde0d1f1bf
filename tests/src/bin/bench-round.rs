//! Measures one round of several sites with a large model over mutual TLS, as medfl ships: wall
//! time and the coordinator's peak resident memory (VmHWM from /proc, Linux), with the
//! coordinator in its own process started from its `medfl provision` kit.
//!
//! ```text
//! cargo build --release -p medfl-coordinator -p medfl-e2e --bin bench-round --bin medfl-coordinator
//! ./target/release/bench-round                       # 3 sites, 276 MiB model, FedAvg
//! ./target/release/bench-round --sites 20 --hidden 4096,4096 --strategy median
//! ./target/release/bench-round --smoke               # 2 sites, a tiny model: seconds (CI)
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use medfl_e2e::{
    breast_cancer_spec, create_run, site_config_at, split_breast_cancer_with, status, wait_for_end,
    Site,
};
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;
use tonic::transport::{Channel, Endpoint};

/// How long the coordinator may take to report its address, and then to accept a connection.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of the coordinator's log kept to explain a failure.
const LOG_TAIL: usize = 40;

/// The researcher whose kit creates the run.
const RESEARCHER: &str = "researcher";

/// Command-line options: `--sites N`, `--hidden A,B,...`, `--strategy NAME`, `--smoke`.
struct Options {
    sites: usize,
    hidden: String,
    strategy: String,
}

fn options() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut o = Options {
        sites: if smoke { 2 } else { 3 },
        hidden: if smoke { "32" } else { "9000, 8000" }.into(),
        strategy: "fedavg".into(),
    };
    let mut args = args.into_iter().filter(|a| a != "--smoke");
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sites" => o.sites = value.parse()?,
            "--hidden" => o.hidden = value.replace(',', ", "),
            "--strategy" => o.strategy = value,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(o.sites > 0, "--sites must be at least 1");
    Ok(o)
}

/// The last lines of the coordinator's log (stderr), kept by the thread that drains it.
#[derive(Clone, Default)]
struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() == LOG_TAIL {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// The coordinator process, killed when the bench ends, however it ends.
struct Coordinator {
    child: Child,
    log: LogTail,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the log reader saw: the address the coordinator serves on, or the end of its stderr.
enum Started {
    Serving(SocketAddr),
    Closed,
}

/// Removes terminal colour sequences (`ESC [ ... m`) from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The address in the coordinator's `coordinator serving addr=...` log line.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("coordinator serving") {
        return None;
    }
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .and_then(|a| a.parse().ok())
}

impl Coordinator {
    /// Starts `bin` with the kit's `config` on an ephemeral port and data directory `data_dir`,
    /// everything else at the shipped defaults; returns once it logs the address it serves on.
    async fn start(
        bin: &Path,
        config: &Path,
        data_dir: &Path,
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let mut cmd = Command::new(bin);
        // Only the port and the data directory differ from what the kit ships.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("MEDFL_")) {
            cmd.env_remove(key);
        }
        cmd.arg("--config")
            .arg(config)
            .env("MEDFL_LISTEN", "127.0.0.1:0")
            .env("MEDFL_DATA_DIR", data_dir)
            .env("RUST_LOG", "warn,medfl_coordinator::server=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("coordinator stderr")?;
        let log = LogTail::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let tail = log.clone();
        // Drains stderr for the whole run, so the coordinator never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut reported = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = plain(&line);
                if !reported {
                    if let Some(addr) = serving_addr(&line) {
                        reported = tx.blocking_send(Started::Serving(addr)).is_ok();
                    }
                }
                tail.push(line);
            }
            let _ = tx.blocking_send(Started::Closed);
        });
        let mut coordinator = Self { child, log };
        match tokio::time::timeout(START_TIMEOUT, rx.recv()).await {
            Ok(Some(Started::Serving(addr))) => Ok((coordinator, addr)),
            Ok(_) => {
                let exit = coordinator.child.wait()?;
                anyhow::bail!(
                    "the coordinator exited ({exit}) before serving; its log:\n{}",
                    coordinator.log.text()
                )
            }
            Err(_) => anyhow::bail!(
                "the coordinator did not report serving within {START_TIMEOUT:?}; its log:\n{}",
                coordinator.log.text()
            ),
        }
    }

    /// Its peak resident memory so far (KiB).
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// Connects over mutual TLS with `kit`, retrying until [`START_TIMEOUT`] has passed.
async fn connect(url: &str, kit: &medfl_pki::Kit) -> anyhow::Result<Channel> {
    let tls = medfl_pki::client_tls(&kit.ca, &kit.cert, &kit.key, "localhost")?;
    let endpoint = Endpoint::from_shared(url.to_string())?.tls_config(tls)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {url}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `bytes` in MiB, or in KiB below one MiB (smoke runs).
fn size(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    }
}

/// `medfl-coordinator` beside this binary (same profile).
fn coordinator_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory for {}", exe.display()))?;
    let bin = dir.join("medfl-coordinator");
    let release = if dir.ends_with("release") {
        " --release"
    } else {
        ""
    };
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build{release} -p medfl-coordinator` first",
        bin.display()
    );
    Ok(bin)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = options()?;
    let bin = coordinator_bin()?;
    let dir = tempfile::tempdir()?;
    let site_names: Vec<String> = (0..opts.sites).map(|i| format!("hospital-{i}")).collect();
    let consortium = medfl_pki::provision(
        Some(&dir.path().join("ca")),
        "bench",
        "localhost",
        &site_names,
        &[RESEARCHER.into()],
        &[],
        &dir.path().join("kits"),
    )?;
    let kit = |name: &str| {
        consortium
            .kits
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| anyhow::anyhow!("no kit for {name}"))
    };
    let (coordinator, addr) = Coordinator::start(
        &bin,
        &kit(medfl_pki::COORDINATOR_NAME)?.config,
        &dir.path().join("coordinator-data"),
    )
    .await?;
    let url = format!("https://localhost:{}", addr.port());
    let mut client = RunServiceClient::new(connect(&url, kit(RESEARCHER)?).await?);
    let (csvs, _) = split_breast_cancer_with(&dir.path().join("data"), opts.sites, false);
    let mut sites = Vec::new();
    for (name, csv) in site_names.iter().zip(&csvs) {
        let mut config = site_config_at(
            name,
            &url,
            &dir.path().join("sites").join(name),
            Some(kit(name)?),
            &format!("[datasets.breast_cancer]\npath = \"{}\"\n", csv.display()),
        );
        // The bench's models run past a site's default 100 MB update limit.
        config.policy.max_update_bytes = 0;
        let mut site = Site::start(config);
        site.registered(1).await;
        sites.push(site);
    }
    let spec = format!(
        "{}\n[strategy]\nname = \"{}\"\n",
        breast_cancer_spec("bench", 1, opts.sites as u32, 600)
            .replace("hidden = []", &format!("hidden = [{}]", opts.hidden))
            .replace("local_epochs = 2", "local_steps = 1")
            .replace("learning_rate = 0.1", "learning_rate = 0.001"),
        opts.strategy
    );
    let rss_before = coordinator.peak_rss_kib().unwrap_or(0);
    let started = Instant::now();
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_end(&mut client, &run).await;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        status(&detail) == v1::RunStatus::Completed as i32,
        "run did not complete: {detail:?}\ncoordinator log:\n{}",
        coordinator.log.text()
    );
    let round = detail.rounds.first().context("the run has no round")?;
    let model_bytes = round.bytes_up / opts.sites as u64;
    let peak = coordinator.peak_rss_kib().unwrap_or(0);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| transport | gRPC over mutual TLS (each site and the researcher with its kit) |");
    println!("| model size | {} |", size(model_bytes));
    println!("| sites | {} |", opts.sites);
    println!("| strategy | {} |", opts.strategy);
    println!("| run wall time (create to completed, 1 round incl. init, train, evaluate) | {seconds:.1} s |");
    println!(
        "| round train phase (coordinator's record) | {:.1} s |",
        round.duration_ms as f64 / 1000.0
    );
    println!(
        "| bytes down / up | {} / {} |",
        size(round.bytes_down),
        size(round.bytes_up)
    );
    println!(
        "| coordinator peak RSS before the run | {:.1} MiB |",
        rss_before as f64 / 1024.0
    );
    println!(
        "| coordinator peak RSS | {:.1} MiB ({:.2}x the model) |",
        peak as f64 / 1024.0,
        peak as f64 * 1024.0 / model_bytes.max(1) as f64
    );
    for site in sites {
        site.stop().await;
    }
    Ok(())
}
