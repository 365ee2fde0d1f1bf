//! Imaging end to end: three hospitals hold real brain MRI (Br35H) as an image folder or a CSV
//! list, a researcher runs a head on LiteMedSAM's frozen encoder from the `medfl` binary over
//! mutual TLS with the shipped defaults, pulls the model, and `medfl predict` scores a held-out
//! folder no site saw.

mod common;

use common::{medfl, text};
use medfl_e2e::images::{hospitals_and_held_out, image_spec, link_image_folder, start_image_sites};
use medfl_e2e::{br35h_images, init_logs, shared_litemedsam, test_config, Coordinator};

/// Files under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        files_under(&p)
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hospitals_train_a_head_on_frozen_litemedsam_and_predict_scores_held_out_mri_at_64_pixels()
{
    const TEST: &str = "image_cli";
    let (Some(weights), Some(br35h)) = (shared_litemedsam(TEST), br35h_images(TEST)) else {
        return;
    };
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (parts, held_out) = hospitals_and_held_out(&br35h, 60, 80);
    let sha = medfl_train::base::sha256_file(&weights).expect("weights hash");
    let coordinator = Coordinator::start(test_config(&dir.join("coordinator"))).await;
    let mut sites = start_image_sites(&coordinator, dir, &parts, &weights);
    for s in &mut sites {
        s.registered(1).await;
    }

    // What the coordinator knows of each hospital's images: a name, two columns, a count and
    // the images per class.
    let out = medfl(&coordinator, &["sites", "--columns"]).await;
    let listed = text(&out.stdout);
    for (i, part) in parts.iter().enumerate() {
        let count = |class: u32| part.iter().filter(|p| p.label == class).count();
        let line = format!(
            "hospital-{} / brain_mri: image, label ({} images: no {}, yes {})",
            (b'a' + i as u8) as char,
            part.len(),
            count(0),
            count(1)
        );
        assert!(listed.contains(&line), "{line} in {listed}");
    }
    for site in coordinator.store().sites().expect("sites") {
        let held = format!("{site:?}");
        assert!(
            !held.contains(".jpg") && !held.contains(&*br35h.to_string_lossy()),
            "the coordinator holds an image path: {held}"
        );
    }

    let spec = dir.join("run.toml");
    std::fs::write(&spec, image_spec("brain-mri", &sha, 64, 3)).expect("spec");
    let out = medfl(
        &coordinator,
        &["run", "create", spec.to_str().expect("utf-8")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = text(&out.stdout).trim().to_string();
    // The sites embed their images once (a minute or two on two cores), then rounds take
    // seconds; the watch ends with the run.
    let out = medfl(&coordinator, &["run", "watch", &run]).await;
    let watched = text(&out.stdout);
    assert!(
        out.status.success() && watched.contains("completed"),
        "{watched}\n{}",
        text(&out.stderr)
    );

    let model = dir.join("model.safetensors");
    let out = medfl(
        &coordinator,
        &["model", "pull", &run, "-o", model.to_str().expect("utf-8")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Only the head travelled: 2 × 512 weights and 2 biases.
    let params = medfl_core::safetensors::decode(&std::fs::read(&model).expect("model"))
        .expect("safetensors");
    assert_eq!(params.numel(), 2 * 512 + 2);

    // `medfl predict` on a held-out folder (class subfolders give the known labels).
    let held = dir.join("held-out");
    link_image_folder(&held_out, &held);
    let predictions = dir.join("predictions.csv");
    let out = medfl(
        &coordinator,
        &[
            "predict",
            "--pulled",
            model.to_str().expect("utf-8"),
            "--model",
            weights.to_str().expect("utf-8"),
            "--input",
            held.to_str().expect("utf-8"),
            "-o",
            predictions.to_str().expect("utf-8"),
        ],
    )
    .await;
    let said = text(&out.stderr);
    assert!(out.status.success(), "{said}");
    let written = std::fs::read_to_string(&predictions).expect("predictions");
    assert!(
        written.starts_with("image,prediction,confidence,p_no,p_yes\n"),
        "{written}"
    );
    assert_eq!(written.lines().count(), held_out.len() + 1, "{written}");
    let accuracy: f64 = said
        .split("accuracy ")
        .nth(1)
        .and_then(|a| a.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {said}"));
    println!("held-out accuracy of the federated head at 64×64: {accuracy:.4}");
    assert!(accuracy >= 0.8, "{said}");

    // Another encoder than the run pinned is refused, naming both hashes.
    let other = dir.join("other.safetensors");
    std::fs::write(&other, b"not LiteMedSAM").expect("file");
    let out = medfl(
        &coordinator,
        &[
            "predict",
            "--pulled",
            model.to_str().expect("utf-8"),
            "--model",
            other.to_str().expect("utf-8"),
            "--input",
            held.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&sha), "{}", text(&out.stderr));

    // Every hospital kept its embeddings: another run on the same images pays no encoder time.
    for (i, part) in parts.iter().enumerate() {
        let name = format!("hospital-{}", (b'a' + i as u8) as char);
        let kept = files_under(&dir.join(&name).join("embeddings"));
        assert!(kept >= part.len(), "{name} keeps {kept} embeddings");
    }
    for s in sites {
        s.stop().await;
    }
    coordinator.stop().await;
}
