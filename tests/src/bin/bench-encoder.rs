//! Throughput of the text classifier on a real encoder: a LoRA training step, a forward pass and
//! DP-SGD's clipped per-example gradients (vectorised, and one backward pass per example), in
//! examples per second, at a fixed batch and sequence length, and the size of an update.
//!
//! ```text
//! cargo build --release -p medfl-e2e --bin bench-encoder
//! ./target/release/bench-encoder --model ../shared/models/all-MiniLM-L6-v2 \
//!     --data ../shared/data/icd10cm_chapters.jsonl
//! ./target/release/bench-encoder --smoke     # batch 4, 16 tokens, 2 iterations: seconds (CI)
//! ```
//! Without the model, `--smoke` prints a notice and skips, unless `MEDFL_REQUIRE_ASSETS=1`.
//! `benches/pytorch_throughput.py` measures the same steps with PyTorch for comparison.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use medfl_core::spec::{Adaptation, EncoderSpec, Optimizer, Pooling};
use medfl_train::{BaseModels, Data, LocalModel, TextClassifier, TextTable, TrainOptions};

struct Args {
    smoke: bool,
    model: PathBuf,
    data: PathBuf,
    batch: usize,
    seq: u32,
    iters: usize,
    classes: usize,
}

fn args() -> anyhow::Result<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut a = Args {
        smoke,
        model: "../shared/models/all-MiniLM-L6-v2".into(),
        data: "../shared/data/icd10cm_chapters.jsonl".into(),
        batch: if smoke { 4 } else { 32 },
        seq: if smoke { 16 } else { 64 },
        iters: if smoke { 2 } else { 20 },
        classes: 21,
    };
    let mut it = args.into_iter().filter(|a| a != "--smoke");
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = value.into(),
            "--data" => a.data = value.into(),
            "--batch" => a.batch = value.parse()?,
            "--seq" => a.seq = value.parse()?,
            "--iters" => a.iters = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    if a.smoke && !a.model.join("model.safetensors").is_file() {
        let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
        anyhow::ensure!(
            !required,
            "MEDFL_REQUIRE_ASSETS=1 but there is no model at {}",
            a.model.display()
        );
        println!(
            "skipping the encoder benchmark: no model at {}",
            a.model.display()
        );
        return Ok(());
    }
    let bases = BaseModels::new(BTreeMap::from([("base".into(), a.model.clone())]), None);
    let sha = bases.weights_sha256(&a.model)?;
    let base = bases.resolve("base", &sha)?;
    let spec = EncoderSpec {
        base: "base".into(),
        base_sha256: sha,
        pooling: Pooling::Mean,
        max_seq_len: a.seq,
        adaptation: Adaptation::Lora {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["query".into(), "value".into()],
        },
    };
    let model = TextClassifier::new(base.clone(), spec, a.classes)?;
    // Real descriptions, repeated until every one fills the sequence: each batch is exactly
    // `batch x seq` tokens, as the PyTorch script pads to.
    let table = TextTable::load_jsonl(&a.data)?;
    let texts: Vec<String> = table
        .column("text")
        .into_iter()
        .take(a.batch)
        .map(|t| vec![t; 16].join(" "))
        .collect();
    anyhow::ensure!(texts.len() == a.batch, "fewer than {} texts", a.batch);
    let tokens = base.tokenizer()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = tokens.encode_batch(&refs, a.seq as usize)?;
    anyhow::ensure!(
        batch.seq_len() == a.seq as usize,
        "texts give {} tokens, not {}",
        batch.seq_len(),
        a.seq
    );
    let examples = medfl_train::TextExamples {
        texts: texts.clone(),
        labels: (0..a.batch).map(|i| (i % a.classes) as u32).collect(),
    };
    let data = Data::Text(examples.clone());
    let params = model.init(1)?;
    let opts = TrainOptions {
        epochs: 1,
        steps: 1,
        batch_size: a.batch,
        learning_rate: 1e-3,
        optimizer: Optimizer::Adamw,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 1,
        record_dp: None,
    };
    let cancel = AtomicBool::new(false);
    // One warm-up pass of each, then timed iterations (a train call is one full step,
    // including building the optimiser, as a round's first step does).
    model.train(&params, &data, &opts, &cancel, &mut |_| {})?;
    model.logits(&params, &refs)?;
    let mut train_s = Vec::new();
    let mut forward_s = Vec::new();
    for _ in 0..a.iters {
        let t = Instant::now();
        model.train(&params, &data, &opts, &cancel, &mut |_| {})?;
        train_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        model.logits(&params, &refs)?;
        forward_s.push(t.elapsed().as_secs_f64());
    }
    // DP-SGD's clipped per-example gradients of the same batch (forward, backward, clipping;
    // no optimiser step), vectorised as training computes them and one backward pass per text.
    let rows: Vec<usize> = (0..a.batch).collect();
    let clipped = |vectorised: bool, iters: usize| -> anyhow::Result<Vec<f64>> {
        model.clipped_gradients(&params, &examples, &rows, 1.0, vectorised)?;
        let mut times = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            model.clipped_gradients(&params, &examples, &rows, 1.0, vectorised)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    };
    let private_s = clipped(true, a.iters)?;
    let by_example_s = clipped(false, a.iters.min(3))?;
    let update = medfl_core::safetensors::encode(&params).len() as u64;
    println!(
        "| measurement | batch | seq | examples/s (median) | ms/step (median) |\n|---|---|---|---|---|"
    );
    for (what, times) in [
        ("LoRA train step (r=8, q+v, AdamW)", train_s),
        ("forward only", forward_s),
        ("DP-SGD clipped gradients, vectorised", private_s),
        ("DP-SGD clipped gradients, a pass per example", by_example_s),
    ] {
        let m = median(times);
        println!(
            "| {what} | {} | {} | {:.1} | {:.0} |",
            a.batch,
            a.seq,
            a.batch as f64 / m,
            m * 1e3
        );
    }
    println!(
        "\nupdate: {} tensors, {} parameters, {update} bytes = {:.3}% of the {}-byte base weights",
        params.tensors.len(),
        params.numel(),
        100.0 * update as f64 / base.weights_bytes as f64,
        base.weights_bytes
    );
    Ok(())
}
