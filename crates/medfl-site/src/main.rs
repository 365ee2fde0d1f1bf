//! `medfl-site`: the daemon a hospital runs next to its data.

use std::path::PathBuf;

use clap::Parser;
use medfl_site::{run, SiteConfig};

/// The medfl site daemon: trains on local data, sends only model updates, dials out only.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); `MEDFL_*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Talk plaintext gRPC to an `http://` coordinator (a trial on one machine only).
    #[arg(long)]
    insecure_dev: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = SiteConfig::load_with(args.config.as_deref(), args.insecure_dev)?;
    medfl_daemon::init_logging(&config.log_format);
    run(config, medfl_daemon::stop_signal()).await?;
    Ok(())
}
