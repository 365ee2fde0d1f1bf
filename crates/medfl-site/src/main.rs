//! `medfl-site`: the daemon a hospital runs next to its data.

use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, Parser, Subcommand};
use medfl_site::policy::{Approvals, Decided, Decision, Subject};
use medfl_site::{run, SiteConfig};
use serde_json::json;

/// The medfl site daemon: trains on local data, sends only model updates, dials out only.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `MEDFL_*` environment variables override it. Accepted after
    /// the command too (`medfl-site pause --config site.toml`).
    #[arg(long, short, global = true)]
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
    /// Same as `runs approve`: approve a run by id, or ahead of time by name or spec SHA-256.
    Approve(ApproveArgs),
    /// Same as `runs reject`: reject a run by id, or ahead of time by name or spec SHA-256.
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
    /// Record-level privacy spent on each dataset: the policy's budget, what is left, and
    /// every run's charge (ε, δ, steps, sample rate, noise, accountant).
    Privacy {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Registers a dataset (checked to load); a running daemon offers it within a second.
    Add {
        /// The name run specs will use.
        name: String,
        /// The file or image folder (never sent anywhere).
        #[arg(long)]
        path: PathBuf,
        /// `csv`, `jsonl`, `image_folder` (one subfolder of images per class) or `image_csv`
        /// (a CSV of image paths and labels).
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Lists the datasets of the config file and of the registry.
    List {
        /// Print JSON: each dataset's name, format, path and origin (`config` or `registry`).
        #[arg(long)]
        json: bool,
    },
    /// Forgets a registered dataset.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs that reached this site and wait for approval, with the SHA-256 of their spec
    /// (with --all: every run with its decision, and the decisions taken ahead of time).
    Pending {
        /// Every run with its decision, and the decisions taken ahead of time.
        #[arg(long)]
        all: bool,
        /// Print JSON: `runs` by id (and with --all `by_name` and `by_spec`, the decisions
        /// taken ahead of time).
        #[arg(long)]
        json: bool,
    },
    /// Lets a run train on this site's data: a waiting run at once (a task it was holding
    /// starts within a second), or ahead of time any run of a name, or the run whose spec has
    /// a SHA-256. An approval holds for the spec the run first came with only.
    Approve(ApproveArgs),
    /// Refuses a run (a waiting one, or ahead of time by name or spec SHA-256); the researcher
    /// sees the reason.
    Reject(RejectArgs),
}

/// Which runs a decision is about.
#[derive(ClapArgs)]
#[group(required = true, multiple = false)]
struct Target {
    /// The id of a run that reached this site, or 64 lowercase hex digits: the SHA-256 of a
    /// run spec's file as the researcher submits it (`sha256sum spec.toml`), ahead of time.
    #[arg(value_name = "RUN_ID|SPEC_SHA256")]
    run: Option<String>,
    /// Ahead of time, every run of this name (spelled out, so a mistyped run id never
    /// becomes a standing decision).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// What the hospital approves.
#[derive(ClapArgs)]
struct ApproveArgs {
    #[command(flatten)]
    target: Target,
}

/// What the hospital refuses, and why.
#[derive(ClapArgs)]
struct RejectArgs {
    #[command(flatten)]
    target: Target,
    /// Why, as the researcher will read it.
    #[arg(long)]
    reason: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = SiteConfig::load_with(args.config.as_deref(), args.insecure_dev)?;
    if args.command.is_some() {
        daemon_state(&config, args.config.as_deref())?;
    }
    match args.command {
        Some(Command::Runs(command)) => return runs(&config, command),
        Some(Command::Approve(args)) => return runs(&config, RunsCommand::Approve(args)),
        Some(Command::Reject(args)) => return runs(&config, RunsCommand::Reject(args)),
        Some(Command::Pause { reason }) => {
            medfl_site::policy::set_paused(&config.data_dir, Some(&reason))?;
            record(&config, "site_paused", None, json!({ "reason": reason }))?;
            medfl_daemon::outln!(
                "`{}` paused: training stops within a second, nothing is sent",
                config.name
            );
            return Ok(());
        }
        Some(Command::Resume) => {
            medfl_site::policy::set_paused(&config.data_dir, None)?;
            record(&config, "site_resumed", None, json!({}))?;
            medfl_daemon::outln!("`{}` resumed", config.name);
            return Ok(());
        }
        Some(Command::Dataset(command)) => return datasets(&config, command),
        Some(Command::Privacy { json }) => return privacy(&config, json),
        None => {}
    }
    medfl_daemon::init_logging(&config.log_format);
    run(config, medfl_daemon::stop_signal()).await?;
    Ok(())
}

/// The admin commands act on the daemon's state, found through the same config: refuse where no
/// daemon has run (a relative `--config` path, or none, from another directory) rather than
/// start a second, empty state that the daemon never reads.
fn daemon_state(config: &SiteConfig, file: Option<&Path>) -> anyhow::Result<()> {
    let identity = medfl_site::identity::SiteState::path(&config.data_dir);
    if identity.is_file() {
        return Ok(());
    }
    let source = match file {
        Some(file) => format!("the `data_dir` of {}", file.display()),
        None => "the default `data_dir`; no --config given".to_string(),
    };
    anyhow::bail!(
        "no site state at {} ({source}): the daemon has not run with this configuration. \
         Give the daemon's own --config, or start the daemon once first",
        config.data_dir.display()
    )
}

/// `medfl-site privacy`: the ledger the daemon keeps in `site.json`, against the policy's
/// budgets.
fn privacy(config: &SiteConfig, as_json: bool) -> anyhow::Result<()> {
    let state = medfl_site::identity::SiteState::load(&config.data_dir)?;
    let charges: Vec<(&String, &medfl_site::identity::RunRecord)> = state
        .iter()
        .flat_map(|s| s.runs.iter())
        .filter(|(_, r)| r.privacy.is_some())
        .collect();
    let mut datasets: std::collections::BTreeSet<&str> =
        config.policy.privacy.keys().map(String::as_str).collect();
    datasets.extend(
        charges
            .iter()
            .filter_map(|(_, r)| r.privacy.as_ref())
            .map(|l| l.dataset.as_str()),
    );
    let mut out = Vec::new();
    for dataset in datasets {
        let spent = state
            .as_ref()
            .map_or(0.0, |s| medfl_site::privacy::spent_on(s, dataset, None));
        let budget = config.policy.privacy.get(dataset);
        let runs: Vec<serde_json::Value> = charges
            .iter()
            .filter_map(|(id, r)| r.privacy.as_ref().map(|l| (id, r, l)))
            .filter(|(_, _, l)| l.dataset == dataset)
            .map(|(id, r, l)| {
                json!({
                    "run": id,
                    "name": r.name,
                    "epsilon": l.epsilon,
                    "delta": l.delta,
                    "accountant": l.accountant,
                    "steps": l.steps,
                    "sample_rate": l.sample_rate,
                    "noise_multiplier": l.noise_multiplier,
                    "max_grad_norm": l.max_grad_norm,
                })
            })
            .collect();
        out.push(json!({
            "dataset": dataset,
            "max_epsilon": budget.map(|b| b.max_epsilon),
            "delta": budget.and_then(|b| b.delta),
            "spent": spent,
            "left": budget.map(|b| (b.max_epsilon - spent).max(0.0)),
            "runs": runs,
        }));
    }
    if as_json {
        medfl_daemon::outln!("{}", json!({ "site": config.name, "datasets": out }));
        return Ok(());
    }
    if out.is_empty() {
        medfl_daemon::outln!(
            "`{}` has no privacy budget and no run has spent any privacy",
            config.name
        );
        return Ok(());
    }
    let number = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    medfl_daemon::outln!(
        "{:<24} {:>10} {:>10} {:>10}  runs",
        "dataset",
        "budget ε",
        "spent ε",
        "left ε"
    );
    for d in &out {
        let runs = d["runs"].as_array().map_or(0, Vec::len);
        medfl_daemon::outln!(
            "{:<24} {:>10} {:>10} {:>10}  {runs}",
            d["dataset"].as_str().unwrap_or("-"),
            number(&d["max_epsilon"]),
            number(&d["spent"]),
            number(&d["left"]),
        );
        for r in d["runs"].as_array().into_iter().flatten() {
            medfl_daemon::outln!(
                "  {} ({}): ε = {} at δ = {:.3e}, {} steps at q = {:.4}, z = {}, C = {} ({})",
                r["run"].as_str().unwrap_or("-"),
                r["name"].as_str().unwrap_or("-"),
                number(&r["epsilon"]),
                r["delta"].as_f64().unwrap_or(f64::NAN),
                r["steps"],
                r["sample_rate"].as_f64().unwrap_or(f64::NAN),
                r["noise_multiplier"],
                r["max_grad_norm"],
                r["accountant"].as_str().unwrap_or("-"),
            );
        }
    }
    Ok(())
}

/// The short form of a spec SHA-256 in listings.
fn short(sha: &str) -> &str {
    match sha {
        "" => "-",
        sha => sha.get(..12).unwrap_or(sha),
    }
}

/// `medfl-site runs ...`: reads and writes the approval queue in the data directory, which the
/// running daemon consults at every task (and watches, to start tasks it held for approval).
fn runs(config: &SiteConfig, command: RunsCommand) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    match command {
        RunsCommand::Pending { all, json } => {
            let queue = Approvals::load(dir)?;
            let shown: Vec<_> = queue
                .runs
                .iter()
                .filter(|(_, a)| all || (a.decision == Decision::Pending && !a.ended))
                .collect();
            if json {
                let runs: serde_json::Map<String, serde_json::Value> = shown
                    .iter()
                    .map(|(id, a)| Ok(((*id).clone(), serde_json::to_value(a)?)))
                    .collect::<Result<_, serde_json::Error>>()?;
                let mut out = json!({ "runs": runs });
                if all {
                    out["by_name"] = serde_json::to_value(&queue.by_name)?;
                    out["by_spec"] = serde_json::to_value(&queue.by_spec)?;
                }
                medfl_daemon::outln!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            if shown.is_empty() && all {
                medfl_daemon::outln!("no run has reached `{}`", config.name);
            } else if shown.is_empty() {
                medfl_daemon::outln!("no run waits for approval at `{}`", config.name);
            }
            for (id, a) in shown {
                let mut decision = format!("{:?}", a.decision).to_lowercase();
                if a.ended {
                    decision = format!("{decision}, ended");
                }
                medfl_daemon::outln!(
                    "{id}  {decision:<8}  spec {}  {}: {}  {}",
                    short(&a.spec_sha256),
                    a.name,
                    a.summary,
                    a.reason
                );
            }
            if all {
                let ahead = queue
                    .by_name
                    .iter()
                    .map(|(name, a)| (Subject::Name(name.clone()), a))
                    .chain(
                        queue
                            .by_spec
                            .iter()
                            .map(|(sha, a)| (Subject::Spec(sha.clone()), a)),
                    );
                for (subject, a) in ahead {
                    let decision = format!("{:?}", a.decision).to_lowercase();
                    medfl_daemon::outln!("ahead of time  {decision:<8}  {subject}  {}", a.reason);
                }
            }
        }
        RunsCommand::Approve(ApproveArgs { target }) => {
            decide(config, &target, Decision::Approved, "")?;
        }
        RunsCommand::Reject(RejectArgs { target, reason }) => {
            decide(config, &target, Decision::Rejected, &reason)?;
        }
    }
    Ok(())
}

/// Records the hospital's decision on what `target` names, audits it and says what it means.
fn decide(
    config: &SiteConfig,
    target: &Target,
    decision: Decision,
    reason: &str,
) -> anyhow::Result<()> {
    let approved = decision == Decision::Approved;
    let event = if approved {
        "run_approved_by_hospital"
    } else {
        "run_rejected_by_hospital"
    };
    let decided = match (&target.run, &target.name) {
        (_, Some(name)) => Approvals::decide_name(&config.data_dir, name, decision, reason)?,
        (Some(arg), None) => Approvals::decide(&config.data_dir, arg, decision, reason)?,
        (None, None) => anyhow::bail!("name a run id, a spec SHA-256 or --name NAME"),
    };
    match decided {
        Decided::Run { id, approval: a } => {
            let mut details = json!({
                "name": a.name,
                "summary": a.summary,
                "spec_sha256": a.spec_sha256,
            });
            if !approved {
                details["reason"] = json!(reason);
            }
            record(config, event, Some(&id), details)?;
            if approved {
                medfl_daemon::outln!(
                    "approved {id} ({}, spec {}); it trains here from its next task",
                    a.name,
                    short(&a.spec_sha256)
                );
            } else {
                medfl_daemon::outln!("rejected {id} ({}): {reason}", a.name);
            }
        }
        Decided::Ahead { subject, applied } => {
            let mut details = json!({ "ahead": true, "applied_to": applied });
            match &subject {
                Subject::Spec(sha) => details["spec_sha256"] = json!(sha),
                Subject::Name(name) | Subject::Run(name) => details["name"] = json!(name),
            }
            if !approved {
                details["reason"] = json!(reason);
            }
            record(config, event, None, details)?;
            let verb = if approved { "approved" } else { "rejected" };
            medfl_daemon::outln!("{verb} ahead of time at `{}`: {subject}", config.name);
            if !applied.is_empty() {
                medfl_daemon::outln!("also {verb}, as it waited: {}", applied.join(", "));
            }
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
                medfl_site::config::DATASET_FORMATS.contains(&format.as_str()),
                "--format must be one of {:?}",
                medfl_site::config::DATASET_FORMATS
            );
            let dataset = DatasetConfig {
                path: path.clone(),
                format: format.clone(),
            };
            let rows = medfl_site::registry::add(dir, &config.datasets, &name, dataset)?;
            let details = json!({ "name": name, "path": path, "format": format, "records": rows });
            record(config, "dataset_registered", None, details)?;
            medfl_daemon::outln!(
                "registered `{name}` ({rows} records); a running daemon offers it within a second"
            );
        }
        DatasetCommand::List { json } => {
            let registered = medfl_site::registry::load(dir)?;
            if json {
                let all: Vec<serde_json::Value> =
                    [("config", &config.datasets), ("registry", &registered)]
                        .into_iter()
                        .flat_map(|(origin, map)| {
                            map.iter().map(move |(name, ds)| {
                                json!({
                                    "name": name,
                                    "format": ds.format,
                                    "path": ds.path.display().to_string(),
                                    "origin": origin,
                                })
                            })
                        })
                        .collect();
                medfl_daemon::outln!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            for (origin, map) in [("config", &config.datasets), ("registry", &registered)] {
                for (name, ds) in map {
                    medfl_daemon::outln!(
                        "{name}  {}  {}  ({origin})",
                        ds.format,
                        ds.path.display()
                    );
                }
            }
        }
        DatasetCommand::Remove { name } => {
            medfl_site::registry::remove(dir, &name)?;
            record(config, "dataset_removed", None, json!({ "name": name }))?;
            medfl_daemon::outln!("removed `{name}`");
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_takes_the_config_file() {
        Args::command().debug_assert();
        for argv in [
            &["medfl-site", "pause", "--config", "site.toml"][..],
            &["medfl-site", "runs", "pending", "-c", "site.toml"],
            &["medfl-site", "--config", "site.toml", "resume"],
        ] {
            let args = Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(args.config, Some(PathBuf::from("site.toml")), "{argv:?}");
        }
        // As `medfl-site pause --help` shows it: global options propagated.
        let mut command = Args::command();
        command.build();
        let help = command
            .find_subcommand_mut("pause")
            .expect("pause")
            .render_help()
            .to_string();
        assert!(help.contains("--config"), "{help}");
    }
}
