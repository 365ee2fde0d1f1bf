//! `medfl`: the researcher's command line for a medfl coordinator.

#[cfg(feature = "local")]
mod adapter;
mod aggregate;
mod audit;
mod client;
mod commands;
#[cfg(feature = "local")]
mod demo;
#[cfg(feature = "local")]
mod demo_image;
#[cfg(feature = "local")]
mod demo_text;
#[cfg(test)]
mod mock;
mod privacy;
mod provision;
mod pull;
mod table;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use medfl_core::run::RunStatus;
use medfl_proto::convert::run_status;

#[cfg(feature = "local")]
use adapter::{ExportArgs, MergeArgs, PredictArgs};
#[cfg(feature = "local")]
use demo::DemoArgs;
#[cfg(not(feature = "local"))]
type DemoArgs = NotBuilt;
#[cfg(not(feature = "local"))]
type MergeArgs = NotBuilt;
#[cfg(not(feature = "local"))]
type PredictArgs = NotBuilt;
#[cfg(not(feature = "local"))]
type ExportArgs = NotBuilt;

/// Train models across hospitals without moving their data.
#[derive(Debug, Parser)]
#[command(name = "medfl", version, about)]
struct Cli {
    /// Coordinator URL [default: the kit's, else http://127.0.0.1:7070].
    #[arg(long, global = true, env = "MEDFL_COORDINATOR", value_name = "URL")]
    coordinator: Option<String>,
    /// Your kit's `medfl.toml` (from `medfl provision`): the coordinator's URL and the
    /// certificate and key for mutual TLS.
    #[arg(long, global = true, env = "MEDFL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, follow and stop runs.
    #[command(subcommand)]
    Run(RunCommand),
    /// List the sites the coordinator knows.
    Sites {
        /// Also list each dataset's column names (what a run spec's `features` and `label`
        /// may name), one dataset per line.
        #[arg(long)]
        columns: bool,
        /// Print the sites as JSON, with their datasets' names, columns and row counts.
        #[arg(long)]
        json: bool,
    },
    /// Download global models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run a small federation on this machine and train a model end to end.
    #[cfg_attr(not(feature = "local"), command(hide = true))]
    Demo(DemoArgs),
    /// Classify texts with a base model and an adapter pulled from a text run.
    #[cfg_attr(not(feature = "local"), command(hide = true))]
    Predict(PredictArgs),
    /// Aggregate update files offline with any strategy (reproduce or audit a round).
    Aggregate(aggregate::AggregateArgs),
    /// Check and read audit logs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Create the consortium's CA and kits; add, revoke and list participants.
    Provision(Box<provision::ProvisionArgs>),
    /// Differential privacy: the ε a run spends, the noise a target ε needs.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
}

#[derive(Debug, Subcommand)]
enum RunCommand {
    /// Check a run spec and start the run; prints the run id.
    Create {
        /// The run spec (TOML).
        #[arg(value_name = "SPEC.toml")]
        spec: PathBuf,
    },
    /// List every run.
    List {
        /// Print the runs as JSON (an array of run summaries).
        #[arg(long)]
        json: bool,
    },
    /// Show a run's summary, rounds and per-site results.
    Show {
        /// Run id.
        run: String,
        /// Show the per-site results of this round instead of the last.
        #[arg(long, value_name = "N")]
        round: Option<u32>,
        /// Print the run as JSON: its summary, spec, rounds with their per-site results and
        /// evaluations, as the coordinator sent them.
        #[arg(long)]
        json: bool,
    },
    /// Follow a run live until it ends. Exits 0 when it completed, 1 when it failed, 2 when it
    /// was stopped, 3 when its client-level privacy budget ran out.
    Watch {
        /// Run id.
        run: String,
        /// Print JSON lines instead of the table: `{"round": ...}` as each round completes,
        /// then `{"run": ...}` once the run has ended.
        #[arg(long)]
        json: bool,
    },
    /// Stop a run.
    Stop {
        /// Run id.
        run: String,
    },
    /// Have every online site evaluate the run's latest model on its own validation data.
    Evaluate {
        /// Run id.
        run: String,
        /// Print the sites' evaluations as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Download a run's global model (safetensors) and print its SHA-256.
    Pull {
        /// Run id.
        run: String,
        /// The model after this round (the latest when absent).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        round: Option<u32>,
        /// Where to write the model (a directory with `--merged`).
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
        /// Text runs: also merge the adapter into the base model, written as a Hugging Face
        /// directory at OUT that PyTorch/transformers loads unchanged.
        #[arg(long, requires = "base")]
        #[cfg_attr(not(feature = "local"), arg(hide = true))]
        merged: bool,
        /// The base model directory the run trained on (checked against the run's pinned hash).
        #[arg(long, value_name = "DIR")]
        #[cfg_attr(not(feature = "local"), arg(hide = true))]
        base: Option<PathBuf>,
    },
    /// Merge an adapter pulled earlier into its base model, without the coordinator: writes a
    /// Hugging Face directory at OUT that PyTorch/transformers loads unchanged.
    #[cfg_attr(not(feature = "local"), command(hide = true))]
    Merge(MergeArgs),
    /// Export a tabular run's pulled model to ONNX (standardisation included), for the
    /// hospital's own tools.
    #[cfg_attr(not(feature = "local"), command(hide = true))]
    Export(ExportArgs),
}

/// The arguments of a subcommand this binary was built without, taken as they come so that
/// it can say why it is missing.
#[cfg(not(feature = "local"))]
#[derive(Debug, Clone, clap::Args)]
#[command(disable_help_flag = true)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<std::ffi::OsString>,
}

/// The error of a subcommand that needs training code in a binary built without it.
fn without_local(command: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`medfl {command}` runs models on this machine, and this medfl was built without \
         local training (`--no-default-features`); install it with the default features \
         (`cargo install --path crates/medfl-cli`) to have it"
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: not in a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, without the repeats that transport errors carry.
fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// `run watch`'s exit status for how the run ended: 0 completed, 1 failed, 2 stopped, 3 budget
/// exhausted (so scripts can tell them apart).
fn watch_exit_code(status: Option<RunStatus>) -> u8 {
    match status {
        Some(RunStatus::Completed) => 0,
        Some(RunStatus::Stopped) => 2,
        Some(RunStatus::BudgetExhausted) => 3,
        Some(RunStatus::Failed | RunStatus::Running) | None => 1,
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = client::Target::resolve(cli.coordinator, cli.config.as_deref())?;
    match cli.command {
        #[cfg(feature = "local")]
        Command::Demo(args) => demo::run(args).await?,
        #[cfg(feature = "local")]
        Command::Model(ModelCommand::Merge(args)) => {
            adapter::write_merged(&args.adapter, &args.base, &args.out)?
        }
        #[cfg(feature = "local")]
        Command::Model(ModelCommand::Export(args)) => adapter::export_onnx(&args)?,
        #[cfg(feature = "local")]
        Command::Predict(args) => adapter::predict(&args)?,
        #[cfg(not(feature = "local"))]
        Command::Demo(_) => return Err(without_local("demo")),
        #[cfg(not(feature = "local"))]
        Command::Model(ModelCommand::Merge(_)) => return Err(without_local("model merge")),
        #[cfg(not(feature = "local"))]
        Command::Model(ModelCommand::Export(_)) => return Err(without_local("model export")),
        #[cfg(not(feature = "local"))]
        Command::Predict(_) => return Err(without_local("predict")),
        Command::Aggregate(args) => aggregate::run(args)?,
        Command::Audit(command) => audit::run(command)?,
        Command::Provision(command) => provision::run(*command)?,
        Command::Privacy(command) => privacy::run(command)?,
        Command::Run(RunCommand::Create { spec }) => {
            // Check the spec before dialling, so a typo is reported even with no coordinator.
            commands::read_spec(&spec)?;
            commands::create(&mut target.connect().await?, &spec).await?
        }
        Command::Run(RunCommand::List { json }) => {
            commands::list(&mut target.connect().await?, json).await?
        }
        Command::Run(RunCommand::Show { run, round, json }) => {
            commands::show(&mut target.connect().await?, &run, round, json).await?
        }
        Command::Run(RunCommand::Watch { run, json }) => {
            let detail = watch::watch(&mut target.connect().await?, &run, json).await?;
            let status = detail.summary.and_then(|s| run_status(s.status));
            return Ok(ExitCode::from(watch_exit_code(status)));
        }
        Command::Run(RunCommand::Stop { run }) => {
            commands::stop(&mut target.connect().await?, &run).await?
        }
        Command::Run(RunCommand::Evaluate { run, json }) => {
            commands::evaluate(&mut target.connect().await?, &run, json).await?
        }
        Command::Sites { columns, json } => {
            commands::sites(&mut target.connect().await?, columns, json).await?
        }
        Command::Model(ModelCommand::Pull {
            run,
            round,
            out,
            merged,
            base,
        }) => {
            // Refused before dialling: this build could not merge what it pulled.
            if merged && !cfg!(feature = "local") {
                return Err(without_local("model pull --merged"));
            }
            let mut client = target.connect().await?;
            pull::pull_command(&mut client, &run, round.unwrap_or(0), &out, merged, base).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn watch_exits_by_how_the_run_ended() {
        assert_eq!(watch_exit_code(Some(RunStatus::Completed)), 0);
        assert_eq!(watch_exit_code(Some(RunStatus::Failed)), 1);
        assert_eq!(watch_exit_code(Some(RunStatus::Stopped)), 2);
        assert_eq!(watch_exit_code(Some(RunStatus::BudgetExhausted)), 3);
        assert_eq!(watch_exit_code(None), 1);
    }

    #[test]
    fn error_chain_drops_repeats() {
        let e = anyhow::anyhow!("refused")
            .context("tcp connect error")
            .context("tcp connect error")
            .context("transport error")
            .context("cannot reach the coordinator");
        assert_eq!(
            error_chain(&e),
            "cannot reach the coordinator: transport error: tcp connect error: refused"
        );
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn coordinator_is_global_with_a_default() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["medfl", "run", "show", "r1", "--round", "2"])?;
        assert_eq!(cli.coordinator, None);
        let target = client::Target::resolve(cli.coordinator, None)?;
        assert_eq!(target.url, client::DEFAULT_COORDINATOR);
        let cli = Cli::try_parse_from([
            "medfl",
            "model",
            "pull",
            "r1",
            "-o",
            "m.safetensors",
            "--coordinator",
            "http://c:1",
        ])?;
        assert_eq!(cli.coordinator.as_deref(), Some("http://c:1"));
        assert!(matches!(
            cli.command,
            Command::Model(ModelCommand::Pull { round: None, .. })
        ));
        assert!(
            Cli::try_parse_from(["medfl", "model", "pull", "r1", "--round", "0", "-o", "m"])
                .is_err()
        );
        Ok(())
    }

    #[cfg(feature = "local")]
    #[test]
    fn demo_takes_its_options() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["medfl", "demo"])?;
        assert!(matches!(cli.command, Command::Demo(ref d) if d.rounds.is_none()));
        let cli = Cli::try_parse_from(["medfl", "demo", "--task", "icd10", "--model", "m"])?;
        assert!(matches!(cli.command, Command::Demo(ref d) if d.task == demo::DemoTask::Icd10));
        Ok(())
    }

    #[cfg(not(feature = "local"))]
    #[tokio::test]
    async fn training_commands_say_the_build_lacks_them() -> anyhow::Result<()> {
        for words in [
            "medfl demo --task icd10 --out d",
            "medfl demo --help",
            "medfl predict --model m --adapter a --input i",
            "medfl model merge --adapter a --base b -o o",
            "medfl model pull r1 -o o --merged --base b",
        ] {
            let cli = Cli::try_parse_from(words.split(' '))?;
            let err = dispatch(cli)
                .await
                .map_or_else(|e| e.to_string(), |_| String::new());
            assert!(err.contains("built without local"), "{words}: {err}");
        }
        let shown: Vec<String> = Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_string())
            .collect();
        assert!(
            !shown.iter().any(|c| c == "demo" || c == "predict"),
            "{shown:?}"
        );
        Ok(())
    }

    #[test]
    fn provision_takes_init_with_or_without_the_word() -> anyhow::Result<()> {
        let init = [
            "--consortium",
            "c",
            "--coordinator",
            "h:1",
            "--site",
            "a",
            "-o",
            "k",
        ];
        for words in [&["medfl", "provision"][..], &["medfl", "provision", "init"]] {
            let cli = Cli::try_parse_from(words.iter().chain(&init))?;
            let Command::Provision(args) = cli.command else {
                panic!("{words:?} is not provision");
            };
            assert!(matches!(
                provision::ProvisionArgs::command(*args)?,
                provision::ProvisionCommand::Init(_)
            ));
        }
        // A subcommand's options do not mix with init's.
        let mixed = [
            "medfl",
            "provision",
            "--consortium",
            "c",
            "list",
            "--ca",
            "x",
        ];
        assert!(Cli::try_parse_from(mixed).is_err());
        Ok(())
    }
}
