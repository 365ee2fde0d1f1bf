//! `medfl-coordinator`: the consortium's coordinator daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use medfl_coordinator::{serve, CoordinatorConfig};

/// The medfl coordinator: sites connect to it, researchers run federated training through it.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `MEDFL_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Serve plaintext gRPC with no certificates or roles (a trial on one machine only).
    #[arg(long)]
    insecure_dev: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = CoordinatorConfig::load(args.config.as_deref())?;
    config.insecure_dev |= args.insecure_dev;
    medfl_daemon::init_logging(&config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    serve(listener, config, medfl_daemon::stop_signal()).await?;
    Ok(())
}
