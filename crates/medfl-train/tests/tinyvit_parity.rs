//! LiteMedSAM's TinyViT image encoder against the output of the package's own PyTorch code on
//! the same input (`shared/models/lite-medsam/medsam_ref_io.safetensors`: `x`, 1×3×256×256, and
//! `y`, 1×256×64×64), when the shared model is present; CI requires it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use medfl_train::tinyvit::{TinyVit, TinyVitConfig};

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(rel)
}

#[test]
fn tinyvit_matches_litemedsam_pytorch() {
    let weights = shared("models/lite-medsam/lite_medsam.safetensors");
    let reference = shared("models/lite-medsam/medsam_ref_io.safetensors");
    if !weights.exists() || !reference.exists() {
        // CI sets MEDFL_REQUIRE_ASSETS=1: there a missing model fails the test.
        let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MEDFL_REQUIRE_ASSETS=1 but {} or {} is absent",
            weights.display(),
            reference.display()
        );
        eprintln!(
            "skipping TinyViT parity: {} or {} is absent",
            weights.display(),
            reference.display()
        );
        return;
    }
    let dev = Device::Cpu;
    let encoder = TinyVit::load(&weights, TinyVitConfig::lite_medsam(), &dev).unwrap();
    let io = candle_core::safetensors::load(&reference, &dev).unwrap();
    let started = std::time::Instant::now();
    let y = encoder.forward(&io["x"]).unwrap();
    eprintln!("TinyViT forward at 256×256: {:?}", started.elapsed());
    assert_eq!(y.dims(), io["y"].dims());
    let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = io["y"].flatten_all().unwrap().to_vec1().unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |candle - PyTorch| = {worst:e}");
    assert!(worst < 1e-4, "max abs difference {worst}");
    // The pooled embedding a classifier head reads: mean and max of each channel.
    let pooled = encoder.pooled(&io["x"]).unwrap();
    assert_eq!(pooled.dims(), [1, 512]);
}
