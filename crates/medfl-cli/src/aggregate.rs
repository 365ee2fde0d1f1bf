//! `medfl aggregate`: runs any strategy on update files, offline, with the coordinator's own
//! aggregation code, so a researcher can reproduce or audit a round.

use std::path::{Path, PathBuf};

use anyhow::Context;
use medfl_coordinator::aggregate::{self, BlobReader};
use medfl_coordinator::blobs::BlobStore;
use medfl_core::aggregator::{AdmitError, Aggregator, Disposition, RoundStart};
use medfl_core::safetensors::{parse_header, MAX_HEADER_BYTES};
use medfl_core::spec::StrategySpec;
use medfl_core::ModelSchema;

/// Options of `medfl aggregate`.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregateArgs {
    /// Strategy: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed_mean,
    /// krum, multi_krum, bulyan.
    #[arg(long)]
    pub strategy: String,
    /// A strategy parameter as KEY=VALUE, as in a run spec's [strategy] table (f=1, keep=3,
    /// beta=0.2, eta=0.1, ...); repeat for several.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// An update and its example count, as FILE.safetensors:WEIGHT; repeat for each site.
    #[arg(long = "update", value_name = "FILE:WEIGHT", required = true)]
    pub updates: Vec<String>,
    /// The round's starting global model (needed by the server optimizers).
    #[arg(long)]
    pub global: Option<PathBuf>,
    /// Server optimizer state from the previous round: first moment (or momentum).
    #[arg(long)]
    pub state_m: Option<PathBuf>,
    /// Server optimizer state from the previous round: second moment.
    #[arg(long)]
    pub state_v: Option<PathBuf>,
    /// Server step number (the round, from 1), for bias correction.
    #[arg(long, default_value_t = 1)]
    pub step: u64,
    /// Where to write the aggregated model; new optimizer state goes beside it as
    /// `NAME.m.safetensors` / `NAME.v.safetensors`.
    #[arg(short, long)]
    pub out: PathBuf,
}

/// Parses `--strategy` and `--param`s through the run spec's own `[strategy]` rules.
fn strategy(args: &AggregateArgs) -> anyhow::Result<StrategySpec> {
    let mut table = toml::Table::new();
    table.insert("name".into(), toml::Value::String(args.strategy.clone()));
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--param `{p}` is not KEY=VALUE"))?;
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|t| t.get("v").cloned())
            .with_context(|| format!("--param `{p}`: `{v}` is not a number"))?;
        table.insert(k.trim().to_string(), value);
    }
    let spec: StrategySpec = table
        .try_into()
        .with_context(|| format!("strategy `{}` with {:?}", args.strategy, args.params))?;
    Ok(spec)
}

/// The schema of a safetensors file, from its header.
fn schema_of(path: &Path) -> anyhow::Result<ModelSchema> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(
        len > 0 && len <= MAX_HEADER_BYTES,
        "{}: header length {len}",
        path.display()
    );
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .with_context(|| format!("{}: truncated header", path.display()))?;
    parse_header(&json)
        .and_then(|l| l.schema())
        .with_context(|| path.display().to_string())
}

/// Runs the command.
pub fn run(args: AggregateArgs) -> anyhow::Result<()> {
    let strategy = strategy(&args)?;
    let mut inputs = Vec::new();
    for u in &args.updates {
        let (file, weight) = u
            .rsplit_once(':')
            .with_context(|| format!("--update `{u}` is not FILE:WEIGHT"))?;
        let weight: f64 = weight
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w > 0.0)
            .with_context(|| {
                format!("--update `{u}`: weight `{weight}` is not a positive number")
            })?;
        inputs.push((PathBuf::from(file), weight));
    }
    anyhow::ensure!(
        inputs.len() as u32 >= strategy.min_updates(),
        "{} needs at least {} updates, got {}",
        strategy.name(),
        strategy.min_updates(),
        inputs.len()
    );
    let schema = schema_of(&inputs[0].0)?;
    let mut aggregator = Aggregator::new(&strategy, schema.clone())?;
    // Every input must carry exactly the first one's tensors.
    let open = |path: &Path| {
        BlobReader::open(path, &schema)
            .with_context(|| format!("{} differs from {}", path.display(), inputs[0].0.display()))
    };
    let mut held = Vec::new();
    for (path, weight) in &inputs {
        let mut update = open(path)?;
        let admitted = aggregator
            .admit(*weight, &mut update, None)
            .map_err(AdmitError::into_inner)
            .with_context(|| format!("aggregating {}", path.display()))?;
        if admitted.disposition == Disposition::Held {
            held.push(update);
        }
    }
    if aggregator.needs_global() && args.global.is_none() {
        anyhow::bail!(
            "strategy `{}` needs the round's starting global model: pass --global FILE",
            strategy.name()
        );
    }
    let reader = |p: &Path| {
        BlobReader::open(p, &schema)
            .with_context(|| format!("{} differs from the updates", p.display()))
    };
    let mut global = args.global.as_deref().map(reader).transpose()?;
    let mut m = args.state_m.as_deref().map(reader).transpose()?;
    let mut v = args.state_v.as_deref().map(reader).transpose()?;
    let start = RoundStart {
        step: args.step,
        global: global.as_mut(),
        first_moment: m.as_mut(),
        second_moment: v.as_mut(),
    };
    let scratch = tempfile::tempdir()?;
    let blobs = BlobStore::open(scratch.path())?;
    let out = aggregate::finish(aggregator, start, &mut held, &blobs, &schema)?;
    let place = |sha: &str, to: &Path| -> anyhow::Result<()> {
        std::fs::copy(blobs.path(sha)?, to).with_context(|| format!("writing {}", to.display()))?;
        medfl_daemon::outln!("{} sha256 {sha}", to.display());
        Ok(())
    };
    place(&out.global, &args.out)?;
    let beside = |suffix: &str| args.out.with_extension(format!("{suffix}.safetensors"));
    if let Some(m) = &out.m {
        place(m, &beside("m"))?;
    }
    if let Some(v) = &out.v {
        place(v, &beside("v"))?;
    }
    Ok(())
}
