//! Br35H brain MRI for imaging tests: group-aware, label-skewed hospital splits, and the
//! `image_folder` and `image_csv` datasets sites hold them as (images linked or listed, never
//! copied).

use std::path::Path;

use medfl_train::image::{group_aware_parts, ImageSet, LabelledImage};

use crate::{site_config_with, Coordinator, Site};

/// The two classes: no tumour, tumour (Br35H's folder names).
pub const BR35H_LABELS: [&str; 2] = ["no", "yes"];

/// Splits every fifth Br35H image into three hospitals of `per_site` images with tumour
/// shares 3:4, 1:4 and 1:2, and a balanced held-out set of `held_out`, keeping every group of
/// near-duplicates (same coarse hash) on one side.
pub fn hospitals_and_held_out(
    br35h: &Path,
    per_site: usize,
    held_out: usize,
) -> (Vec<Vec<LabelledImage>>, Vec<LabelledImage>) {
    let labels = BR35H_LABELS.map(String::from);
    let all = ImageSet::load_folder(br35h)
        .expect("Br35H folder")
        .labelled("image", "label", &labels)
        .expect("labelled images");
    // Wanted images per part and class: [no, yes].
    let wanted = vec![
        vec![per_site / 4, per_site * 3 / 4],
        vec![per_site * 3 / 4, per_site / 4],
        vec![per_site / 2, per_site / 2],
        vec![held_out / 2, held_out / 2],
    ];
    let every_fifth: Vec<LabelledImage> = all.into_iter().step_by(5).collect();
    let mut parts = group_aware_parts(&every_fifth, &wanted).expect("Br35H images");
    for (p, (part, want)) in parts.iter().zip(&wanted).enumerate() {
        for (class, want) in want.iter().enumerate() {
            let have = part.iter().filter(|i| i.label as usize == class).count();
            assert!(have + 2 >= *want, "part {p} class {class}: {have} images");
        }
    }
    let held_out = parts.pop().expect("held-out part");
    (parts, held_out)
}

/// An `image_csv` list of `images` (absolute paths, Br35H's label names).
pub fn write_image_list(images: &[LabelledImage], path: &Path) {
    let mut text = String::from("image,label\n");
    for image in images {
        let label = BR35H_LABELS[image.label as usize];
        text += &format!("{},{label}\n", image.path.display());
    }
    std::fs::write(path, text).expect("image list");
}

/// An `image_folder` of `images` (one subfolder per class), linked from where they are.
pub fn link_image_folder(images: &[LabelledImage], dir: &Path) {
    for image in images {
        let class = dir.join(BR35H_LABELS[image.label as usize]);
        std::fs::create_dir_all(&class).expect("class folder");
        let name = image.path.file_name().expect("file name");
        std::os::unix::fs::symlink(&image.path, class.join(name)).expect("link");
    }
}

/// Starts one site per part, holding it as dataset `brain_mri` (the first as an
/// `image_folder`, the others as `image_csv` lists) with LiteMedSAM's `weights` as base
/// `lite-medsam`; each named `hospital-a`, `hospital-b`, ...
pub fn start_image_sites(
    coordinator: &Coordinator,
    dir: &Path,
    parts: &[Vec<LabelledImage>],
    weights: &Path,
) -> Vec<Site> {
    let base = format!("\n[base_models]\nlite-medsam = \"{}\"\n", weights.display());
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let name = format!("hospital-{}", (b'a' + i as u8) as char);
            let dataset = if i == 0 {
                let folder = dir.join(format!("{name}-images"));
                link_image_folder(part, &folder);
                format!(
                    "[datasets.brain_mri]\npath = \"{}\"\nformat = \"image_folder\"\n",
                    folder.display()
                )
            } else {
                let list = dir.join(format!("{name}.csv"));
                write_image_list(part, &list);
                format!(
                    "[datasets.brain_mri]\npath = \"{}\"\nformat = \"image_csv\"\n",
                    list.display()
                )
            };
            Site::start(site_config_with(
                &name,
                coordinator,
                &dir.join(&name),
                &(dataset + &base),
            ))
        })
        .collect()
}

/// A head-only run on LiteMedSAM (pinned by `sha`) over dataset `brain_mri`, at
/// `input_size` pixels, for `rounds` rounds with all three hospitals.
pub fn image_spec(name: &str, sha: &str, input_size: u32, rounds: u32) -> String {
    format!(
        r#"
name = "{name}"
rounds = {rounds}
min_sites = 3

[model]
kind = "tinyvit"
base = "lite-medsam"
base_sha256 = "{sha}"
input_size = {input_size}

[task]
dataset = "brain_mri"
image = "image"
label = "label"
labels = ["no", "yes"]

[training]
local_epochs = 10
learning_rate = 0.05
"#
    )
}
