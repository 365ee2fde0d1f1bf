//! What a researcher does on this machine with a text run's adapter file: the base with the
//! adapter merged in (`model merge`, `model pull --merged`), and `medfl predict` on their own
//! texts. Needs the `local` feature.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_core::spec::{Adaptation, RunSpec};
use medfl_core::ModelParams;
use medfl_train::export::{merge_into_base, read_adapter};
use medfl_train::{BaseModels, TextClassifier, TextTable};

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
    /// The base model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The adapter, as `medfl model pull` wrote it.
    #[arg(long, value_name = "FILE")]
    pub adapter: PathBuf,
    /// JSON lines to classify.
    #[arg(long, value_name = "FILE.jsonl")]
    pub input: PathBuf,
    /// Field holding the text (the run's `task.text` when absent).
    #[arg(long)]
    pub text_field: Option<String>,
    /// Field holding a known label, to report accuracy (the run's `task.label` when absent).
    #[arg(long)]
    pub label_field: Option<String>,
    /// Where to write one prediction per line (standard output when absent).
    #[arg(short, long, value_name = "FILE.jsonl")]
    pub out: Option<PathBuf>,
}

/// Runs `medfl predict`.
pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    let (params, spec) = open_adapter(&args.adapter)?;
    let classifier = classifier(&spec, &args.model)?;
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
            let (best, confidence) = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or((0, 0.0), |(i, v)| (i, *v));
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
    match &args.out {
        Some(path) => std::fs::write(path, &lines)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => medfl_daemon::out!("{lines}"),
    }
    // With known labels, say how well the model did on them.
    let known: Vec<Option<u32>> = table
        .column(&label_field)
        .iter()
        .map(|l| labels.iter().position(|x| x == l).map(|i| i as u32))
        .collect();
    let pairs: Vec<(u32, u32)> = known
        .iter()
        .zip(&predicted)
        .filter_map(|(k, p)| k.map(|k| (*p, k)))
        .collect();
    if !pairs.is_empty() {
        let (p, a): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
        eprintln!(
            "{} of {} texts carry a known `{label_field}`: accuracy {:.4}, macro-F1 {:.4}",
            a.len(),
            texts.len(),
            medfl_core::metrics::accuracy(&p, &a),
            medfl_core::metrics::macro_f1(&p, &a, labels.len())
        );
    }
    Ok(())
}
