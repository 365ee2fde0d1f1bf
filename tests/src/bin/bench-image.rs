//! Speed of the imaging path: LiteMedSAM's TinyViT encoder per image at several input sizes
//! (a batch through the encoder and the pooling), and a head-only round once the embeddings are
//! kept (the local training a site does every round after the first).
//!
//! ```text
//! cargo build --release -p medfl-e2e --bin bench-image
//! ./target/release/bench-image --model ../shared/models/lite-medsam/lite_medsam.safetensors
//! ./target/release/bench-image --smoke     # 32×32, batch 2, 1 iteration: seconds (CI)
//! ```
//! Without the model, `--smoke` prints a notice and skips, unless `MEDFL_REQUIRE_ASSETS=1`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use medfl_core::spec::Optimizer;
use medfl_train::tinyvit::{TinyVit, TinyVitConfig};
use medfl_train::{Data, Examples, LocalModel, TrainOptions};

struct Args {
    smoke: bool,
    model: PathBuf,
    sizes: Vec<usize>,
    batch: usize,
    iters: usize,
}

fn args() -> anyhow::Result<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut a = Args {
        smoke,
        model: "../shared/models/lite-medsam/lite_medsam.safetensors".into(),
        sizes: if smoke { vec![32] } else { vec![64, 128, 256] },
        batch: if smoke { 2 } else { 8 },
        iters: if smoke { 1 } else { 3 },
    };
    let mut it = args.into_iter().filter(|a| a != "--smoke");
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = value.into(),
            "--sizes" => {
                a.sizes = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--sizes: comma-separated numbers")?
            }
            "--batch" => a.batch = value.parse()?,
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
    if !a.model.is_file() {
        let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
        anyhow::ensure!(
            a.smoke && !required,
            "there is no LiteMedSAM model at {}",
            a.model.display()
        );
        println!(
            "skipping the image benchmark: no LiteMedSAM model at {}",
            a.model.display()
        );
        return Ok(());
    }
    let dev = Device::Cpu;
    let encoder = TinyVit::load(&a.model, TinyVitConfig::lite_medsam(), &dev)?;
    println!(
        "TinyViT (LiteMedSAM) encoder and pooling, batch {}, {} threads, median of {}:",
        a.batch,
        candle_core::utils::get_num_threads(),
        a.iters
    );
    println!("| input | s per batch | s per image | images per minute |");
    println!("|---|---|---|---|");
    for &size in &a.sizes {
        let x = Tensor::randn(0f32, 1., (a.batch, 3, size, size), &dev)?;
        // One pass to warm the allocator.
        encoder.pooled(&x)?;
        let times: Vec<f64> = (0..a.iters)
            .map(|_| {
                let started = Instant::now();
                encoder.pooled(&x).map(|_| started.elapsed().as_secs_f64())
            })
            .collect::<Result<_, _>>()?;
        let batch = median(times);
        let per = batch / a.batch as f64;
        println!(
            "| {size}×{size} | {batch:.2} | {per:.3} | {:.0} |",
            60.0 / per
        );
    }

    // A head-only round: 10 epochs of the logistic head on 160 kept embeddings (a site of 200
    // scans with a fifth kept for validation), batch 32, as the brain-mri demo's sites train.
    let rows = if a.smoke { 16 } else { 160 };
    let width = medfl_core::spec::IMAGE_EMBEDDING_WIDTH;
    let data = Data::Table(Examples {
        features: (0..rows * width)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
        labels: (0..rows).map(|i| (i % 2) as u32).collect(),
        n_features: width,
    });
    let head = medfl_train::mlp::Mlp::from(medfl_model::Mlp::new(width, &[], 2));
    let opts = TrainOptions {
        epochs: 10,
        steps: 0,
        batch_size: 32,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 1,
        record_dp: None,
    };
    let start = head.init(1)?;
    let times: Vec<f64> = (0..a.iters.max(3))
        .map(|_| {
            let started = Instant::now();
            head.train(&start, &data, &opts, &AtomicBool::new(false), &mut |_| {})
                .map(|_| started.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    println!(
        "\nhead-only local training with kept embeddings ({rows} embeddings, 10 epochs): {:.1} ms",
        1000.0 * median(times)
    );
    Ok(())
}
