//! `medfl demo`: a whole federation on this machine (placeholder until the lead writes it).

use std::path::PathBuf;

/// Options of `medfl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of federated rounds.
    #[arg(long, default_value_t = 12)]
    pub rounds: u32,
    /// Directory for the demo's coordinator, sites and models.
    #[arg(long, default_value = "medfl-demo")]
    pub out: PathBuf,
    /// CSV to split between the demo sites (a bundled dataset when absent).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs { rounds, out, data } = args;
    let _ = (rounds, out, data);
    anyhow::bail!("demo: not built yet")
}
