//! `medfl-site`: the daemon a hospital runs next to its data.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};
use medfl_site::policy::{Approvals, Decision};
use medfl_site::{run, SiteConfig};
use serde_json::json;

/// The medfl site daemon: trains on local data, sends only model updates, dials out only.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `MEDFL_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Talk plaintext gRPC to an `http://` coordinator (a trial on one machine only).
    #[arg(long, global = true)]
    insecure_dev: bool,
    /// Without a command the daemon runs.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The hospital's decisions on the runs that reached this site.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Same as `runs approve`.
    Approve(ApproveArgs),
    /// Same as `runs reject`.
    Reject(RejectArgs),
    /// Kill switch: stop any training now and send nothing until `resume`.
    Pause {
        /// Why, for the log.
        #[arg(long, default_value = "paused by the hospital")]
        reason: String,
    },
    /// Release the kill switch.
    Resume,
    /// The datasets this site holds, by the names run specs use.
    #[command(subcommand)]
    Dataset(DatasetCommand),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Registers a dataset (checked to load); a running daemon offers it within a second.
    Add {
        /// The name run specs will use.
        name: String,
        /// The file (never sent anywhere).
        #[arg(long)]
        path: PathBuf,
        /// `csv` or `jsonl`.
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Lists the datasets of the config file and of the registry.
    List,
    /// Forgets a registered dataset.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs that reached this site and wait for approval (all runs with --all).
    Pending {
        /// Every run with its decision.
        #[arg(long)]
        all: bool,
    },
    /// Lets a run train on this site's data from its next task on.
    Approve(ApproveArgs),
    /// Refuses a run; the researcher sees the reason.
    Reject(RejectArgs),
}

#[derive(ClapArgs)]
struct ApproveArgs {
    /// Run id.
    run: String,
}

#[derive(ClapArgs)]
struct RejectArgs {
    /// Run id.
    run: String,
    /// Why, as the researcher will read it.
    #[arg(long)]
    reason: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = SiteConfig::load_with(args.config.as_deref(), args.insecure_dev)?;
    match args.command {
        Some(Command::Runs(command)) => return runs(&config, command),
        Some(Command::Approve(args)) => return runs(&config, RunsCommand::Approve(args)),
        Some(Command::Reject(args)) => return runs(&config, RunsCommand::Reject(args)),
        Some(Command::Pause { reason }) => {
            medfl_site::policy::set_paused(&config.data_dir, Some(&reason))?;
            record(&config, "site_paused", None, json!({ "reason": reason }))?;
            println!(
                "`{}` paused: training stops within a second, nothing is sent",
                config.name
            );
            return Ok(());
        }
        Some(Command::Resume) => {
            medfl_site::policy::set_paused(&config.data_dir, None)?;
            record(&config, "site_resumed", None, json!({}))?;
            println!("`{}` resumed", config.name);
            return Ok(());
        }
        Some(Command::Dataset(command)) => return datasets(&config, command),
        None => {}
    }
    medfl_daemon::init_logging(&config.log_format);
    run(config, medfl_daemon::stop_signal()).await?;
    Ok(())
}

/// `medfl-site runs ...`: reads and writes the approval queue in the data directory, which the
/// running daemon consults at every task.
fn runs(config: &SiteConfig, command: RunsCommand) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    match command {
        RunsCommand::Pending { all } => {
            let queue = Approvals::load(dir)?;
            let shown: Vec<_> = queue
                .runs
                .iter()
                .filter(|(_, a)| all || a.decision == Decision::Pending)
                .collect();
            if shown.is_empty() {
                println!("no run waits for approval at `{}`", config.name);
            }
            for (id, a) in shown {
                let decision = format!("{:?}", a.decision).to_lowercase();
                println!(
                    "{id}  {decision:<8}  {}: {}  {}",
                    a.name, a.summary, a.reason
                );
            }
        }
        RunsCommand::Approve(ApproveArgs { run }) => {
            let a = Approvals::decide(dir, &run, Decision::Approved, "")?;
            let details = json!({ "name": a.name, "summary": a.summary });
            record(config, "run_approved_by_hospital", Some(&run), details)?;
            println!(
                "approved {run} ({}); it trains here from its next task",
                a.name
            );
        }
        RunsCommand::Reject(RejectArgs { run, reason }) => {
            let a = Approvals::decide(dir, &run, Decision::Rejected, &reason)?;
            let details = json!({ "name": a.name, "summary": a.summary, "reason": reason });
            record(config, "run_rejected_by_hospital", Some(&run), details)?;
            println!("rejected {run} ({}): {reason}", a.name);
        }
    }
    Ok(())
}

/// `medfl-site dataset ...`: the registry in the data directory.
fn datasets(config: &SiteConfig, command: DatasetCommand) -> anyhow::Result<()> {
    use medfl_site::config::DatasetConfig;
    let dir = &config.data_dir;
    match command {
        DatasetCommand::Add { name, path, format } => {
            anyhow::ensure!(
                matches!(format.as_str(), "csv" | "jsonl"),
                "--format must be csv or jsonl"
            );
            let dataset = DatasetConfig {
                path: path.clone(),
                format: format.clone(),
            };
            let rows = medfl_site::registry::add(dir, &config.datasets, &name, dataset)?;
            let details = json!({ "name": name, "path": path, "format": format, "records": rows });
            record(config, "dataset_registered", None, details)?;
            println!(
                "registered `{name}` ({rows} records); a running daemon offers it within a second"
            );
        }
        DatasetCommand::List => {
            let registered = medfl_site::registry::load(dir)?;
            for (origin, map) in [("config", &config.datasets), ("registry", &registered)] {
                for (name, ds) in map {
                    println!("{name}  {}  {}  ({origin})", ds.format, ds.path.display());
                }
            }
        }
        DatasetCommand::Remove { name } => {
            medfl_site::registry::remove(dir, &name)?;
            record(config, "dataset_removed", None, json!({ "name": name }))?;
            println!("removed `{name}`");
        }
    }
    Ok(())
}

/// Records a decision taken here by hand in the site's audit log.
fn record(
    config: &SiteConfig,
    event: &'static str,
    run: Option<&str>,
    details: serde_json::Value,
) -> anyhow::Result<()> {
    medfl_site::audit::record_action(config, event, run, details)
        .map_err(|e| anyhow::anyhow!("done, but not recorded in the audit log: {e}"))
}
