//! Measures one round of several sites with a large model: wall time and the coordinator's peak
//! resident memory (VmHWM from /proc, Linux), with the coordinator in its own process.
//!
//! ```text
//! cargo build --release -p medfl-coordinator -p medfl-e2e --bin bench-round --bin medfl-coordinator
//! ./target/release/bench-round                       # 3 sites, 276 MiB model, FedAvg
//! ./target/release/bench-round --sites 20 --hidden 4096,4096 --strategy median
//! ```

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use medfl_e2e::{
    breast_cancer_spec, create_run, site_config, split_breast_cancer_with, status, wait_for_end,
    Site,
};
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;

/// Kills the coordinator process when the bench ends, however it ends.
struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Command-line options: `--sites N`, `--hidden A,B,...`, `--strategy NAME`.
struct Options {
    sites: usize,
    hidden: String,
    strategy: String,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        sites: 3,
        hidden: "9000, 8000".into(),
        strategy: "fedavg".into(),
    };
    let mut args = std::env::args().skip(1);
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
    Ok(o)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = options()?;
    let exe = std::env::current_exe()?;
    let coordinator_bin: PathBuf = exe
        .parent()
        .map(|d| d.join("medfl-coordinator"))
        .ok_or_else(|| anyhow::anyhow!("no directory for {}", exe.display()))?;
    anyhow::ensure!(
        coordinator_bin.exists(),
        "{} is missing: run `cargo build --release -p medfl-coordinator` first",
        coordinator_bin.display()
    );
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nlog_format = \"text\"\n",
            dir.path().join("coordinator").display()
        ),
    )?;
    let child = Command::new(&coordinator_bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let pid = child.id();
    let _coordinator = Coordinator(child);
    let url = format!("http://127.0.0.1:{port}");
    let mut client = loop {
        // The coordinator process binds its port at start; connect once it does.
        match RunServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (csvs, _) = split_breast_cancer_with(&dir.path().join("data"), opts.sites, false);
    let mut sites = Vec::new();
    for (i, csv) in csvs.iter().enumerate() {
        let name = format!("hospital-{i}");
        let mut site = Site::start(site_config(&name, &url, &dir.path().join(&name), csv));
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
    let rss_before = peak_rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_end(&mut client, &run).await;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        status(&detail) == v1::RunStatus::Completed as i32,
        "run did not complete: {detail:?}"
    );
    let round = &detail.rounds[0];
    let model_bytes = round.bytes_up / opts.sites as u64;
    let peak = peak_rss_kib(pid).unwrap_or(0);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| model size | {:.1} MiB |", model_bytes as f64 / 1048576.0);
    println!("| sites | {} |", opts.sites);
    println!("| strategy | {} |", opts.strategy);
    println!("| run wall time (create to completed, 1 round incl. init, train, evaluate) | {seconds:.1} s |");
    println!(
        "| round train phase (coordinator's record) | {:.1} s |",
        round.duration_ms as f64 / 1000.0
    );
    println!(
        "| bytes down / up | {:.1} / {:.1} MiB |",
        round.bytes_down as f64 / 1048576.0,
        round.bytes_up as f64 / 1048576.0
    );
    println!(
        "| coordinator peak RSS before the run | {:.1} MiB |",
        rss_before as f64 / 1024.0
    );
    println!(
        "| coordinator peak RSS | {:.1} MiB ({:.2}x the model) |",
        peak as f64 / 1024.0,
        peak as f64 * 1024.0 / model_bytes as f64
    );
    for site in sites {
        site.stop().await;
    }
    Ok(())
}
