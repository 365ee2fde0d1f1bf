//! `medfl demo --task icd10`: three hospitals adapt a pre-trained text encoder (LoRA) to assign
//! ICD-10-CM chapters to diagnosis descriptions; a cardiology centre and a cancer centre see
//! mostly their own specialties, a general hospital a bit of everything. The federated adapter
//! is compared with each hospital alone and with centralised training on the pooled data.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use medfl_core::safetensors::decode;
use medfl_core::spec::RunSpec;
use medfl_core::ModelParams;
use medfl_site::config::DatasetConfig;
use medfl_train::{
    label_skew_partition, model_for_run, BaseModels, Data, LocalModel, TextExamples, TextTable,
    TrainOptions,
};
use serde::Serialize;

use crate::demo::{
    epochs_text, round_metrics, site_config, write_results, DemoArgs, LocalFederation,
};
use crate::demo::{RoundMetrics, Scores};
use crate::table;

/// The bundled ICD-10-CM descriptions with their chapters (US public domain).
const BUNDLED_DATA: &str = include_str!("../../../data/icd10cm_chapters.jsonl");
/// The base model's name in the demo's configs.
const BASE: &str = "all-MiniLM-L6-v2";
const SEED: u64 = 42;
/// Share of each chapter held out for the final test.
const TEST_SHARE: f64 = 0.0125;
/// Each hospital's share of its own specialties and of every other chapter.
const HOSPITALS: [(&str, &[&str], f64, f64); 3] = [
    (
        "cardiology-centre",
        &["circulatory", "respiratory"],
        0.10,
        0.004,
    ),
    ("cancer-centre", &["neoplasms", "blood_immune"], 0.10, 0.004),
    ("general-hospital", &[], 0.0, 0.012),
];

/// What the demo writes to `metrics.json`.
#[derive(Serialize)]
struct TextDemoMetrics {
    run_id: String,
    base_model_sha256: String,
    rounds: Vec<RoundMetrics>,
    test_examples: usize,
    update_bytes: u64,
    base_model_bytes: u64,
    federated: Scores,
    site_alone: BTreeMap<String, Scores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    centralized: Option<Scores>,
}

/// FedAvg with server momentum 0.5: with label-skewed hospitals each round moves the adapter
/// about a third as far as a centralised epoch does; momentum makes up for it (BENCHMARKS.md:
/// 73.9% after 6 rounds against 69.7% for plain FedAvg and 72.2% centralised).
const DEFAULT_STRATEGY: &str = "[strategy]\nname = \"fedavgm\"\nmomentum = 0.5\n";

/// Local steps a round when the descriptions are split among many sites: an epoch of every
/// site's share would make each round train on all 18,794 descriptions.
const MANY_SITES_LOCAL_STEPS: u32 = 10;

/// The demo's local batch and AdamW learning rate unless `--batch-size` and `--learning-rate`
/// say otherwise.
const BATCH_SIZE: u32 = 16;
const LEARNING_RATE: f64 = 0.003;
/// With record-level DP-SGD (`--privacy`): a batch four times larger quarters the noise on the
/// mean gradient for a noise multiplier about 1.5 times larger, which is what lets ~200
/// descriptions per hospital learn (BENCHMARKS.md: 32% against 13% at ε = 8).
const PRIVATE_BATCH_SIZE: u32 = 64;
const PRIVATE_LEARNING_RATE: f64 = 0.01;

fn spec_text(
    rounds: u32,
    sha: &str,
    labels: &[String],
    sites: u32,
    (batch_size, learning_rate): (u32, f64),
) -> String {
    let labels: Vec<String> = labels.iter().map(|l| format!("\"{l}\"")).collect();
    let steps = if sites > 3 {
        format!("local_steps = {MANY_SITES_LOCAL_STEPS}\n")
    } else {
        String::new()
    };
    format!(
        r#"name = "icd10-lora-demo"
rounds = {rounds}
min_sites = {sites}
round_deadline_secs = 1800
seed = {SEED}

[model]
kind = "bert"
base = "{BASE}"
base_sha256 = "{sha}"
pooling = "mean"
max_seq_len = 48

[model.adaptation]
method = "lora"
rank = 8
alpha = 16.0
target_modules = ["query", "value"]

[task]
dataset = "diagnoses"
text = "text"
label = "label"
labels = [{}]
validation_fraction = 0.1

[training]
local_epochs = 1
batch_size = {batch_size}
learning_rate = {learning_rate:?}
optimizer = "adamw"
{steps}"#,
        labels.join(", ")
    )
}

/// The spec with client-level DP-FedAvg over `sites` sites at ε `epsilon` for the whole run:
/// every site every round (q = 1), δ = 1e-3, the least noise multiplier that meets ε (RDP),
/// and adaptive clipping of the median update norm from C = 0.1 (count noise σ_b = z).
fn with_client_privacy(
    spec_toml: String,
    rounds: u32,
    epsilon: f64,
) -> anyhow::Result<(String, RunSpec, f64)> {
    let mechanism = medfl_core::privacy::Mechanism {
        sample_rate: 1.0,
        noise_multiplier: 1.0,
        steps: u64::from(rounds),
        delta: 1e-3,
    };
    let (z, _) =
        medfl_core::privacy::noise_for(medfl_core::privacy::Accountant::Rdp, &mechanism, epsilon)?;
    let z = (z * 1e4).ceil() / 1e4;
    let text = format!(
        "{spec_toml}\n[privacy]\nlevel = \"client\"\nnoise_multiplier = {z}\nclip_norm = 0.1\n\
         sample_rate = 1.0\ndelta = 1e-3\ntarget_epsilon = {epsilon}\n\n\
         [privacy.adaptive_clipping]\ncount_noise_multiplier = {z}\n"
    );
    let spec = RunSpec::from_toml(&text)?;
    Ok((text, spec, z))
}

/// Runs the ICD-10 demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(6);
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    let model_dir = args.model.clone().context(
        "the icd10 demo needs the all-MiniLM-L6-v2 model: pass its directory with --model DIR \
         (e.g. `git clone https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2`)",
    )?;
    let model_dir = model_dir
        .canonicalize()
        .with_context(|| format!("--model {}", model_dir.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let bases = BaseModels::new(
        BTreeMap::from([(BASE.to_string(), model_dir.clone())]),
        None,
    );
    let sha = bases.weights_sha256(&model_dir)?;
    let table = match &args.data {
        Some(path) => TextTable::load_jsonl(path)?,
        None => TextTable::read_jsonl(
            Path::new("bundled icd10cm_chapters.jsonl"),
            BUNDLED_DATA.as_bytes(),
        )?,
    };
    let label_column = table.column("label");
    let mut labels = label_column.clone();
    labels.sort();
    labels.dedup();
    let strategy = args.strategy.as_deref().unwrap_or(DEFAULT_STRATEGY);
    // Many sites: every description, split evenly; else the three hospitals' case mixes.
    let hospitals: Vec<(String, &[&str], f64, f64)> = match args.sites {
        Some(n) => (1..=n)
            .map(|i| {
                let share = (1.0 - TEST_SHARE) / f64::from(n);
                (format!("site-{i:02}"), &[][..], share, share)
            })
            .collect(),
        None => HOSPITALS
            .iter()
            .map(|&(name, specialties, own, other)| (name.to_string(), specialties, own, other))
            .collect(),
    };
    let many = args.sites.is_some();
    let (spec_toml, spec) = crate::demo::with_strategy(
        spec_text(
            rounds,
            &sha,
            &labels,
            hospitals.len() as u32,
            match args.privacy {
                Some(_) => (
                    args.batch_size.unwrap_or(PRIVATE_BATCH_SIZE),
                    args.learning_rate.unwrap_or(PRIVATE_LEARNING_RATE),
                ),
                None => (
                    args.batch_size.unwrap_or(BATCH_SIZE),
                    args.learning_rate.unwrap_or(LEARNING_RATE),
                ),
            },
        ),
        Some(strategy),
    )?;

    // Split: a held-out test set of every chapter, then the hospitals' case mixes.
    let mut shares = vec![vec![TEST_SHARE; labels.len()]];
    for (_, specialties, own, other) in &hospitals {
        shares.push(
            labels
                .iter()
                .map(|l| {
                    if specialties.contains(&l.as_str()) {
                        *own
                    } else {
                        *other
                    }
                })
                .collect(),
        );
    }
    let refs: Vec<&str> = label_column.iter().map(String::as_str).collect();
    let parts = label_skew_partition(&refs, &labels, &shares, SEED);
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let test_table = table.subset(&parts[0]);
    test_table.write_jsonl(&data_dir.join("test.jsonl"))?;
    medfl_daemon::outln!(
        "medfl demo (icd10): 1 coordinator, {} hospitals, {rounds} rounds of LoRA on {BASE} ({})",
        hospitals.len(),
        spec.strategy.name()
    );
    medfl_daemon::outln!(
        "held-out test split: {} descriptions of {} chapters",
        parts[0].len(),
        labels.len()
    );
    let mut site_data = Vec::new();
    for ((name, specialties, _, _), rows) in hospitals.iter().zip(&parts[1..]) {
        let t = table.subset(rows);
        let own = t
            .column("label")
            .iter()
            .filter(|l| specialties.contains(&l.as_str()))
            .count();
        let mix = if specialties.is_empty() {
            "every chapter alike".to_string()
        } else {
            format!(
                "{:.0}% {}",
                100.0 * own as f64 / t.len().max(1) as f64,
                specialties.join(" + ")
            )
        };
        medfl_daemon::outln!("  {name:<18} {:>4} descriptions, {mix}", t.len());
        let path = data_dir.join(format!("{name}.jsonl"));
        t.write_jsonl(&path)?;
        site_data.push((name.to_string(), path, t));
    }
    let (spec_toml, spec) = match (args.privacy, args.client_privacy) {
        (Some(epsilon), _) => {
            let train_rows = site_data
                .iter()
                .map(|(name, _, t)| {
                    let (examples, _) = t.examples("text", "label", &labels)?;
                    let (train, _) = examples.split(spec.task.validation_fraction, SEED);
                    Ok((name.clone(), train.len()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (text, spec, z) =
                crate::demo::with_privacy(spec_toml, &spec, &train_rows, epsilon)?;
            medfl_daemon::outln!(
                "record-level DP-SGD: noise multiplier {z}, clipping norm 1, at most ε = \
                 {epsilon} per hospital (δ = 1/N^1.1)"
            );
            anyhow::ensure!(
                args.client_privacy.is_none(),
                "--privacy and --client-privacy: the demo takes one level at a time"
            );
            (text, spec)
        }
        (None, Some(epsilon)) => {
            let (text, spec, z) = with_client_privacy(spec_toml, rounds, epsilon)?;
            medfl_daemon::outln!(
                "client-level DP-FedAvg: noise multiplier {z} over {} sites, adaptive clipping \
                 from C = 0.1, at most ε = {epsilon} per site (δ = 1e-3)",
                site_data.len()
            );
            (text, spec)
        }
        (None, None) => (spec_toml, spec),
    };

    let sites = site_data
        .iter()
        .map(|(name, path, _)| {
            site_config(
                &out,
                name,
                [(
                    "diagnoses".to_string(),
                    DatasetConfig {
                        path: path.clone(),
                        format: "jsonl".into(),
                    },
                )]
                .into(),
                BTreeMap::from([(BASE.to_string(), model_dir.clone())]),
            )
        })
        .collect();
    let federation = LocalFederation::start(
        &out,
        BTreeMap::from([(BASE.to_string(), model_dir.clone())]),
        sites,
    )
    .await?;
    let adapter_path = out.join("adapter.safetensors");
    let (run_id, detail, pulled) = federation.run(&spec_toml, &adapter_path).await?;
    crate::pull::write_adapter(&adapter_path, &spec_toml, None)?;
    medfl_daemon::outln!(
        "final adapter: {} ({}, global model sha256 {})",
        adapter_path.display(),
        table::human_bytes(pulled.size),
        table::short_sha(&pulled.sha256)
    );
    federation.stop().await?;

    // Compare on the held-out split with the same budget: `rounds` epochs of local training.
    let global = decode(&std::fs::read(&adapter_path)?)?;
    let model = model_for_run(&spec, &bases)?;
    let test = Data::Text(test_table.examples("text", "label", &labels)?.0);
    let score = |params: &ModelParams, n: usize| -> anyhow::Result<Scores> {
        let m = model.evaluate(params, &test)?.metrics;
        Ok(Scores {
            accuracy: m["accuracy"],
            auc: None,
            macro_f1: m.get("macro_f1").copied(),
            train_examples: n,
        })
    };
    let federated_train = detail.rounds.last().map_or(0, |r| r.num_examples as usize);
    let federated = score(&global, federated_train)?;
    if many {
        // Each site alone, or all data pooled, would train on every description `rounds` times.
        medfl_daemon::outln!(
            "\nheld-out test split ({} descriptions): federated LoRA {:.2}% accuracy, macro-F1 {:.4} \
             (baselines left out with --sites)",
            test.len(),
            100.0 * federated.accuracy,
            federated.macro_f1.unwrap_or(0.0)
        );
        let metrics = TextDemoMetrics {
            run_id,
            base_model_sha256: sha,
            rounds: detail.rounds.iter().map(round_metrics).collect(),
            test_examples: test.len(),
            update_bytes: 0,
            base_model_bytes: detail.full_model_bytes,
            federated,
            site_alone: BTreeMap::new(),
            centralized: None,
        };
        return write_results(
            &out,
            &adapter_path,
            &metrics,
            &detail.rounds,
            ("macro_f1", "macro-F1"),
        );
    }
    let epochs = rounds * spec.training.local_epochs;
    let mut alone = BTreeMap::new();
    let mut pooled = Vec::new();
    for (name, _, t) in &site_data {
        let (examples, _) = t.examples("text", "label", &labels)?;
        let (train, _) = examples.split(spec.task.validation_fraction, SEED);
        medfl_daemon::outln!(
            "training {name} alone ({} descriptions, {})...",
            train.len(),
            epochs_text(epochs)
        );
        let params = train_alone(model.as_ref(), &spec, &train, epochs)?;
        alone.insert(name.clone(), score(&params, train.len())?);
        pooled.push(train);
    }
    let pooled = TextExamples::concat(&pooled.iter().collect::<Vec<_>>());
    medfl_daemon::outln!(
        "training centrally on the pooled {} descriptions...",
        pooled.len()
    );
    let centralized = score(
        &train_alone(model.as_ref(), &spec, &pooled, epochs)?,
        pooled.len(),
    )?;

    medfl_daemon::outln!(
        "\nheld-out test split ({} descriptions), same training budget ({}):",
        test.len(),
        epochs_text(epochs)
    );
    medfl_daemon::outln!(
        "  {:<30} {:>9} {:>9} {:>10}",
        "model",
        "accuracy",
        "macro-F1",
        "trained on"
    );
    let line = |label: &str, s: &Scores| {
        medfl_daemon::outln!(
            "  {label:<30} {:>8.2}% {:>9.4} {:>10}",
            100.0 * s.accuracy,
            s.macro_f1.unwrap_or(0.0),
            s.train_examples
        )
    };
    line("federated LoRA (medfl)", &federated);
    for (name, s) in &alone {
        line(&format!("{name} alone"), s);
    }
    line("centralized (pooled data)", &centralized);
    let last = detail.rounds.last();
    let update_bytes = last.map_or(0, |r| r.bytes_up / u64::from(r.sites_reported.max(1)));
    medfl_daemon::outln!(
        "\neach update: {} = {:.2}% of the {} base model; the base never left a site",
        table::human_bytes(update_bytes),
        100.0 * update_bytes as f64 / detail.full_model_bytes.max(1) as f64,
        table::human_bytes(detail.full_model_bytes)
    );

    let metrics = TextDemoMetrics {
        run_id,
        base_model_sha256: sha,
        rounds: detail.rounds.iter().map(round_metrics).collect(),
        test_examples: test.len(),
        update_bytes,
        base_model_bytes: detail.full_model_bytes,
        federated,
        site_alone: alone,
        centralized: Some(centralized),
    };
    write_results(
        &out,
        &adapter_path,
        &metrics,
        &detail.rounds,
        ("macro_f1", "macro-F1"),
    )?;
    medfl_daemon::outln!(
        "try it: medfl predict --model {} --adapter {} --input {}",
        model_dir.display(),
        adapter_path.display(),
        data_dir.join("test.jsonl").display()
    );
    Ok(())
}

/// Trains from the run's initial adapter for `epochs` epochs on `data` alone.
fn train_alone(
    model: &dyn LocalModel,
    spec: &RunSpec,
    data: &TextExamples,
    epochs: u32,
) -> anyhow::Result<ModelParams> {
    let mut opts = TrainOptions::from_spec(spec, SEED);
    opts.epochs = epochs;
    opts.steps = 0;
    let report = model.train(
        &model.init(spec.seed)?,
        &Data::Text(data.clone()),
        &opts,
        &AtomicBool::new(false),
        &mut |p| {
            if p.step % 50 == 0 || p.step == p.total_steps {
                eprint!(
                    "\r  step {}/{}  loss {:.4}   ",
                    p.step, p.total_steps, p.loss
                );
            }
        },
    )?;
    eprintln!();
    Ok(report.params)
}
