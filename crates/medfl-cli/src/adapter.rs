//! What a researcher does on this machine with a pulled model: for a text run's adapter, the
//! base with the adapter merged in (`model merge`, `model pull --merged`); for any run,
//! `medfl predict` on their own texts or CSV rows. Needs the `local` feature.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_core::spec::{Adaptation, ModelSpec, RunSpec};
use medfl_core::standardize::Standardization;
use medfl_core::ModelParams;
use medfl_model::adapter::{
    read_model_file, PROVENANCE_METADATA_KEY, SPEC_METADATA_KEY, STANDARDIZATION_METADATA_KEY,
};
use medfl_train::export::{merge_into_base, read_adapter};
use medfl_train::mlp::Mlp;
use medfl_train::{BaseModels, Standardizer, Table, TextClassifier, TextTable};

/// Texts scored per progress step.
const PREDICT_BATCH: usize = 256;

/// Reads an adapter and the run spec inside it.
fn open_adapter(path: &Path) -> anyhow::Result<(ModelParams, RunSpec)> {
    let (params, spec) = read_adapter(path)?;
    let spec = spec.with_context(|| {
        format!(
            "{} carries no run spec: pull it with `medfl model pull` from a text run",
            path.display()
        )
    })?;
    let spec = RunSpec::from_toml(&spec)
        .with_context(|| format!("the run spec inside {}", path.display()))?;
    anyhow::ensure!(
        spec.encoder().is_some(),
        "{} is not from a text run",
        path.display()
    );
    Ok((params, spec))
}

/// The classifier of `spec` on the base model in `dir`, whose weights must be the ones the
/// run pinned.
fn classifier(spec: &RunSpec, dir: &Path) -> anyhow::Result<TextClassifier> {
    let encoder = spec.encoder().context("not a text run")?;
    let bases = BaseModels::new(
        BTreeMap::from([(encoder.base.clone(), dir.to_path_buf())]),
        None,
    );
    let base = bases.resolve(&encoder.base, &encoder.base_sha256)?;
    Ok(TextClassifier::new(
        base,
        encoder.clone(),
        spec.task.labels.len(),
    )?)
}

/// Writes `out/` as a copy of the base model directory `base` with the adapter at `adapter`
/// merged into `model.safetensors`, and the adapter itself (head included) beside it.
pub fn write_merged(adapter: &Path, base: &Path, out: &Path) -> anyhow::Result<()> {
    let (params, spec) = open_adapter(adapter)?;
    let encoder = spec.encoder().context("not a text run")?;
    anyhow::ensure!(
        !matches!(encoder.adaptation, Adaptation::Head),
        "run `{}` trained only a head: the base is unchanged, use it with the adapter file",
        spec.name
    );
    // Checks the weights are the pinned ones before anything is written.
    let bases = BaseModels::new(BTreeMap::new(), None);
    let actual = bases.weights_sha256(base)?;
    anyhow::ensure!(
        actual == encoder.base_sha256,
        "{} holds weights with SHA-256 {actual}, but run `{}` trained on {}",
        base.display(),
        spec.name,
        encoder.base_sha256
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for entry in
        std::fs::read_dir(base).with_context(|| format!("cannot list {}", base.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && name != "model.safetensors" {
            std::fs::copy(entry.path(), out.join(&name))
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    let scale = match &encoder.adaptation {
        Adaptation::Lora { rank, alpha, .. } => alpha / f64::from(*rank),
        _ => 0.0,
    };
    let merged = merge_into_base(
        &base.join("model.safetensors"),
        &params,
        scale,
        &out.join("model.safetensors"),
    )?;
    std::fs::copy(adapter, out.join("adapter.safetensors"))
        .with_context(|| format!("cannot copy {}", adapter.display()))?;
    medfl_daemon::outln!(
        "merged {} LoRA pairs and replaced {} tensors into {}/model.safetensors \
         (the base's names, shapes and dtypes); the classifier head stays in {}/adapter.safetensors",
        merged.lora_merged,
        merged.replaced,
        out.display(),
        out.display()
    );
    Ok(())
}

/// Options of `medfl model merge`.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// The adapter, as `medfl model pull` wrote it (it carries the run spec).
    #[arg(long, value_name = "FILE")]
    pub adapter: PathBuf,
    /// The base model directory the run trained on (checked against the run's pinned hash).
    #[arg(long, value_name = "DIR")]
    pub base: PathBuf,
    /// The directory to write.
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Options of `medfl predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictArgs {
    /// The run's base model: a text run's directory (config.json, model.safetensors,
    /// tokenizer.json), an image run's encoder weights file.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The file `medfl model pull` wrote: a text run's adapter, or a tabular run's model.
    #[arg(long, visible_alias = "pulled", value_name = "FILE")]
    pub adapter: PathBuf,
    /// What to classify: JSON lines for a text run, CSV for a tabular one; for an image run an
    /// image, a folder of images (class subfolders give known labels) or a CSV list.
    #[arg(long, value_name = "PATH")]
    pub input: PathBuf,
    /// A run with local standardisation: your training data, whose feature (or image
    /// embedding) means and deviations the inputs are standardised with.
    #[arg(long, value_name = "FILE.csv")]
    pub standardize_on: Option<PathBuf>,
    /// Field holding the text (the run's `task.text` when absent).
    #[arg(long)]
    pub text_field: Option<String>,
    /// Field holding a known label, to report accuracy (the run's `task.label` when absent).
    #[arg(long)]
    pub label_field: Option<String>,
    /// Where to write the predictions (standard output when absent): JSON lines for texts, CSV
    /// for rows.
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Runs `medfl predict`.
pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    let (params, metadata, spec) = open_pulled(&args.adapter)?;
    if spec.image_encoder().is_some() {
        return predict_images(args, &params, &spec, &metadata);
    }
    if spec.encoder().is_none() {
        return predict_rows(args, &params, &spec, &metadata);
    }
    anyhow::ensure!(
        args.standardize_on.is_none(),
        "--standardize-on is for tabular runs; {} is from a text run",
        args.adapter.display()
    );
    let base = args
        .model
        .as_deref()
        .context("a text run's adapter needs its base model: pass --model DIR")?;
    let classifier = classifier(&spec, base)?;
    let table = TextTable::load_jsonl(&args.input)?;
    let text_field = args
        .text_field
        .clone()
        .or_else(|| spec.task.text.clone())
        .context("name the text field with --text-field")?;
    let label_field = args
        .label_field
        .clone()
        .unwrap_or_else(|| spec.task.label.clone());
    let texts = table.column(&text_field);
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        anyhow::bail!(
            "{}: record {} has no text in field `{text_field}`",
            args.input.display(),
            i + 1
        );
    }
    let bar = ProgressBar::new(texts.len() as u64).with_style(ProgressStyle::with_template(
        "[{bar:32.cyan/blue}] {pos}/{len} texts  {per_sec}  eta {eta}",
    )?);
    let labels = &spec.task.labels;
    let mut lines = String::new();
    let mut predicted = Vec::new();
    for chunk in texts.chunks(PREDICT_BATCH) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let probs = classifier.probabilities(&params, &refs)?;
        for (text, p) in refs.iter().zip(probs) {
            let (best, confidence) = most_probable(&p);
            predicted.push(best as u32);
            let line = serde_json::json!({
                "text": text,
                "prediction": labels[best],
                "confidence": confidence,
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    write_out(args.out.as_deref(), &lines)?;
    let known = table.column(&label_field);
    report_known(
        known.iter().map(String::as_str),
        &predicted,
        labels,
        ("texts", &label_field),
    );
    Ok(())
}

/// A pulled model: its tensors, metadata, and the run spec it carries.
fn open_pulled(
    path: &Path,
) -> anyhow::Result<(
    ModelParams,
    std::collections::HashMap<String, String>,
    RunSpec,
)> {
    let (params, metadata) = read_model_file(path)?;
    let spec_toml = metadata.get(SPEC_METADATA_KEY).with_context(|| {
        format!(
            "{} carries no run spec: pull it with `medfl model pull`",
            path.display()
        )
    })?;
    let spec = RunSpec::from_toml(spec_toml)
        .with_context(|| format!("the run spec inside {}", path.display()))?;
    Ok((params, metadata, spec))
}

/// The most probable class and its probability.
fn most_probable(p: &[f32]) -> (usize, f32) {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or((0, 0.0), |(i, v)| (i, *v))
}

/// Writes `text` to `out`, or to standard output.
fn write_out(out: Option<&Path>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            medfl_daemon::out!("{text}");
            Ok(())
        }
    }
}

/// With known labels (`known`, one per prediction; anything not among `labels` is unknown),
/// says how well the model did on them: `(what, field)` name the rows and the label field.
fn report_known<'a>(
    known: impl Iterator<Item = &'a str>,
    predicted: &[u32],
    labels: &[String],
    (what, field): (&str, &str),
) {
    let pairs: Vec<(u32, u32)> = known
        .zip(predicted)
        .filter_map(|(k, p)| labels.iter().position(|x| x == k).map(|k| (*p, k as u32)))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let (p, a): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
    eprintln!(
        "{} of {} {what} carry a known `{field}`: accuracy {:.4}, macro-F1 {:.4}",
        a.len(),
        predicted.len(),
        medfl_core::metrics::accuracy(&p, &a),
        medfl_core::metrics::macro_f1(&p, &a, labels.len())
    );
}

/// The standardisation a tabular model's inputs need: the federation's statistics carried in
/// its metadata, or (local standardisation) those of the hospital's own training CSV.
fn input_standardizer(
    model: &Path,
    standardize_on: Option<&Path>,
    spec: &RunSpec,
    metadata: &std::collections::HashMap<String, String>,
) -> anyhow::Result<Standardizer> {
    let features = &spec.task.feature_names();
    match (metadata.get(STANDARDIZATION_METADATA_KEY), standardize_on) {
        (Some(_), Some(_)) => anyhow::bail!(
            "{} carries the federation's statistics, which the model was trained with: drop \
             --standardize-on",
            model.display()
        ),
        (Some(json), None) => Ok(Standardizer::from_statistics(
            &Standardization::from_json(json, features)
                .with_context(|| format!("the metadata of {}", model.display()))?,
        )),
        (None, Some(path)) => {
            let rows = Table::load_csv(path)?.feature_rows(features)?;
            anyhow::ensure!(!rows.is_empty(), "{} has no rows", path.display());
            Ok(Standardizer::fit(&rows))
        }
        (None, None) => anyhow::bail!(
            "{} was trained with each site standardising its own features (`standardize = \
             \"local\"`): pass --standardize-on with your training CSV",
            model.display()
        ),
    }
}

/// `medfl predict` for a tabular run: one CSV line per input row with the predicted label,
/// its probability, and every class's probability.
fn predict_rows(
    args: &PredictArgs,
    params: &ModelParams,
    spec: &RunSpec,
    metadata: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.model.is_none(),
        "--model names a text run's base model; {} is from a tabular run",
        args.adapter.display()
    );
    let ModelSpec::Mlp { hidden } = &spec.model else {
        anyhow::bail!("{} is not from a tabular run", args.adapter.display());
    };
    let scaler = input_standardizer(
        &args.adapter,
        args.standardize_on.as_deref(),
        spec,
        metadata,
    )?;
    let table = Table::load_csv(&args.input)?;
    let rows = scaler.apply(&table.feature_rows(&spec.task.features)?);
    let labels = &spec.task.labels;
    let model = Mlp::new(spec.task.features.len(), hidden, labels.len());
    let probs = model.probabilities(params, &rows)?;
    let ids = (1..=probs.len()).map(|i| i.to_string());
    let (out, predicted) = prediction_csv("row", ids, &probs, labels);
    write_out(args.out.as_deref(), &out)?;
    let label_field = args.label_field.as_deref().unwrap_or(&spec.task.label);
    if let Some(known) = table.column(label_field) {
        report_known(known.into_iter(), &predicted, labels, ("rows", label_field));
    }
    Ok(())
}

/// The images `medfl predict` scores: one image file, a folder (searched in depth; an image in
/// a folder named after one of the run's labels has that label as known), or an `image_csv`
/// list with the run's image column (and its label column, where present). Each with its known
/// label, if any.
fn images_to_score(input: &Path, spec: &RunSpec) -> anyhow::Result<Vec<(PathBuf, Option<String>)>> {
    let labels = &spec.task.labels;
    if input.is_dir() {
        let mut found = Vec::new();
        let mut dirs = vec![input.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            let mut entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()
                .with_context(|| format!("cannot read {}", dir.display()))?;
            entries.sort();
            for path in entries {
                if path.is_dir() {
                    dirs.push(path);
                } else if medfl_train::image::is_image(&path) {
                    let known = path
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| labels.contains(n));
                    found.push((path, known));
                }
            }
        }
        found.sort();
        anyhow::ensure!(
            !found.is_empty(),
            "{} holds no images ({})",
            input.display(),
            medfl_train::image::IMAGE_EXTENSIONS.join(", ")
        );
        return Ok(found);
    }
    if medfl_train::image::is_image(input) {
        return Ok(vec![(input.to_path_buf(), None)]);
    }
    let column = spec.task.image.as_deref().unwrap_or("image");
    let set = medfl_train::image::ImageSet::load_csv(input)?;
    let label = &spec.task.label;
    if set.columns().contains(label) {
        // Unknown labels are allowed here (they are not scored), so read the cells directly.
        let list = set.labelled_any(column, label)?;
        return Ok(list.into_iter().map(|(p, l)| (p, Some(l))).collect());
    }
    Ok(set.paths(column)?.into_iter().map(|p| (p, None)).collect())
}

/// `medfl predict` for an image run: the images through the base encoder the run pins
/// (`--model`, checked against its hash), preprocessed and standardised as the sites did, then
/// the head; one CSV line per image.
fn predict_images(
    args: &PredictArgs,
    params: &ModelParams,
    spec: &RunSpec,
    metadata: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    let encoder_spec = spec
        .image_encoder()
        .context("an image run's spec names its encoder")?;
    let weights = args.model.as_deref().with_context(|| {
        format!(
            "an image run's model needs its base encoder: pass --model with the `{}` weights \
             file (SHA-256 {})",
            encoder_spec.base, encoder_spec.base_sha256
        )
    })?;
    let bases = BaseModels::new(
        BTreeMap::from([(encoder_spec.base.clone(), weights.to_path_buf())]),
        None,
    );
    let encoder = bases.image_encoder(encoder_spec)?;
    let embed = |paths: &[PathBuf], what: &str| -> anyhow::Result<medfl_train::Examples> {
        let bar = ProgressBar::new(paths.len() as u64).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images ({eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        let features = encoder.embed_files(
            paths,
            None,
            &std::sync::atomic::AtomicBool::new(false),
            &mut |p| bar.set_position(p.done as u64),
        )?;
        bar.finish_and_clear();
        Ok(medfl_train::Examples {
            labels: vec![0; paths.len()],
            n_features: medfl_core::spec::IMAGE_EMBEDDING_WIDTH,
            features,
        })
    };
    let scaler = match (
        metadata.get(STANDARDIZATION_METADATA_KEY),
        &args.standardize_on,
    ) {
        (None, Some(train)) => {
            let own: Vec<PathBuf> = images_to_score(train, spec)?
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            Standardizer::fit(&embed(&own, "embedding your training images")?)
        }
        _ => input_standardizer(
            &args.adapter,
            args.standardize_on.as_deref(),
            spec,
            metadata,
        )?,
    };
    let images = images_to_score(&args.input, spec)?;
    let paths: Vec<PathBuf> = images.iter().map(|(p, _)| p.clone()).collect();
    let rows = scaler.apply(&embed(&paths, "embedding")?);
    let labels = &spec.task.labels;
    let model = Mlp::new(rows.n_features, &[], labels.len());
    let probs = model.probabilities(params, &rows)?;
    let ids = paths.iter().map(|p| p.display().to_string());
    let (out, predicted) = prediction_csv("image", ids, &probs, labels);
    write_out(args.out.as_deref(), &out)?;
    report_known(
        images.iter().map(|(_, k)| k.as_deref().unwrap_or("")),
        &predicted,
        labels,
        ("images", "label"),
    );
    Ok(())
}

/// Predictions as CSV, `ID,prediction,confidence,p_LABEL...` with `id` naming the first
/// column, one line per row of `probs`; and the predicted class of each.
fn prediction_csv(
    id: &str,
    ids: impl Iterator<Item = String>,
    probs: &[Vec<f32>],
    labels: &[String],
) -> (String, Vec<u32>) {
    let mut out = format!("{id},prediction,confidence");
    for l in labels {
        out.push(',');
        out.push_str(&csv_field(&format!("p_{l}")));
    }
    out.push('\n');
    let mut predicted = Vec::with_capacity(probs.len());
    for (id, p) in ids.zip(probs) {
        let (best, confidence) = most_probable(p);
        predicted.push(best as u32);
        out.push_str(&format!(
            "{},{},{confidence:.6}",
            csv_field(&id),
            csv_field(&labels[best])
        ));
        for v in p {
            out.push_str(&format!(",{v:.6}"));
        }
        out.push('\n');
    }
    (out, predicted)
}

/// `value` as one CSV field, quoted when it must be.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Options of `medfl model export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A tabular run's model, as `medfl model pull` wrote it.
    #[arg(long, value_name = "FILE")]
    pub pulled: PathBuf,
    /// A run with local standardisation: the CSV (your training data) whose feature means and
    /// deviations the graph standardises with.
    #[arg(long, value_name = "FILE.csv")]
    pub standardize_on: Option<PathBuf>,
    /// The ONNX file to write.
    #[arg(short, long, value_name = "FILE.onnx")]
    pub out: PathBuf,
}

/// `medfl model export`: a tabular model as ONNX, standardisation included, for the
/// hospital's own tools.
pub fn export_onnx(args: &ExportArgs) -> anyhow::Result<()> {
    let (params, metadata, spec) = open_pulled(&args.pulled)?;
    let ModelSpec::Mlp { hidden } = &spec.model else {
        anyhow::bail!(
            "{} is not from a tabular run: ONNX export covers tabular models (merge a text \
             run's adapter with `medfl model merge` for PyTorch/transformers)",
            args.pulled.display()
        );
    };
    let scaler = input_standardizer(
        &args.pulled,
        args.standardize_on.as_deref(),
        &spec,
        &metadata,
    )?;
    let carried: Vec<(&str, &str)> = [SPEC_METADATA_KEY, PROVENANCE_METADATA_KEY]
        .into_iter()
        .filter_map(|k| metadata.get(k).map(|v| (k, v.as_str())))
        .collect();
    let bytes = medfl_model::onnx::mlp_onnx(&medfl_model::onnx::MlpExport {
        params: &params,
        layers: hidden.len() + 1,
        features: &spec.task.features,
        labels: &spec.task.labels,
        mean: scaler.mean(),
        std: scaler.std(),
        metadata: &carried,
    })
    .with_context(|| format!("exporting {}", args.pulled.display()))?;
    std::fs::write(&args.out, &bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    medfl_daemon::outln!(
        "{}  {} (ONNX, opset 13: input `features` [rows, {}] raw values; outputs \
         `probabilities` [rows, {}] and `class` [rows]; labels and features in its metadata)",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes)),
        args.out.display(),
        spec.task.features.len(),
        spec.task.labels.len()
    );
    Ok(())
}
