//! `medfl-site`: the daemon a hospital runs next to its data.

use std::path::PathBuf;

use clap::Parser;
use medfl_site::{run, SiteConfig};
use tracing_subscriber::EnvFilter;

/// The medfl site daemon: trains on local data, sends only model updates, dials out only.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `MEDFL_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = SiteConfig::load(args.config.as_deref())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    run(config, stop_requested()).await?;
    Ok(())
}

/// Completes on SIGINT, or on SIGTERM where there is one (containers stop with SIGTERM).
async fn stop_requested() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
