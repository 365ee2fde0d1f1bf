//! The `medfl` binary on a text run (a tiny BERT): the round table shows each update's share of
//! the model, `model pull` gives the adapter and `--merged` (or later `model merge`) the base with
//! it merged in, and `predict` classifies a file; and `medfl provision` kits drive a coordinator
//! over mutual TLS.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use medfl_e2e::{icd10_jsonl, test_config, text_site, text_spec, write_parts, Coordinator};
use medfl_train::testing::write_tiny_bert;
use medfl_train::{label_skew_partition, TextTable};

/// Runs `medfl ARGS...` off the async threads.
async fn medfl(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    cmd.args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run medfl"))
        .await
        .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Tensor names and shapes of a safetensors file.
fn layout(path: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).expect("a model file");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec()))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_text_run_gives_an_adapter_a_merged_model_and_predictions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("tiny");
    let sha = write_tiny_bert(&base, 0.0).expect("tiny model");
    let mut cfg = test_config(&d.join("coordinator"));
    cfg.base_models = BTreeMap::from([("tiny".to_string(), base.clone())]);
    let coordinator = Coordinator::start(cfg).await;
    let url = coordinator.url();
    let kit = coordinator.researcher_config().expect("a TLS coordinator");
    let kit = kit.to_str().expect("utf-8");

    let table = TextTable::load_jsonl(&icd10_jsonl()).expect("ICD-10 data");
    let mut labels = table.column("label");
    labels.sort();
    labels.dedup();
    let column = table.column("label");
    let refs: Vec<&str> = column.iter().map(String::as_str).collect();
    let parts = write_parts(
        &table,
        &label_skew_partition(&refs, &labels, &vec![vec![0.005; labels.len()]; 3], 9),
        d,
    );
    let mut sites = Vec::new();
    for (i, part) in parts[..2].iter().enumerate() {
        let mut s = text_site(
            &format!("h{i}"),
            &coordinator,
            d,
            part,
            Some(("tiny", &base)),
        );
        s.registered(1).await;
        sites.push(s);
    }
    let spec = d.join("run.toml");
    std::fs::write(&spec, text_spec("tiny-cli", "tiny", &sha, &labels, 1, "")).expect("spec");
    let out = medfl(&[
        "--config",
        kit,
        "--coordinator",
        &url,
        "run",
        "create",
        spec.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = text(&out.stdout).trim().to_string();
    let out = medfl(&["--config", kit, "--coordinator", &url, "run", "watch", &run]).await;
    let watched = text(&out.stdout);
    assert!(
        out.status.success() && watched.contains("PER_UPDATE"),
        "{watched}"
    );
    assert!(
        watched.contains('%'),
        "each update's share of the model: {watched}"
    );

    // The adapter, with its spec inside.
    let adapter = d.join("adapter.safetensors");
    let out = medfl(&[
        "--config",
        kit,
        "--coordinator",
        &url,
        "model",
        "pull",
        &run,
        "-o",
        adapter.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (params, carried) = medfl_train::export::read_adapter(&adapter).expect("adapter");
    assert!(carried.expect("spec in the metadata").contains("tiny-cli"));
    assert!(params
        .tensors
        .iter()
        .all(|t| t.name.contains("lora_") || t.name.starts_with("classifier.")));

    // The base with the adapter merged: the base's names and shapes, and its other files.
    let merged = d.join("merged");
    let out = medfl(&[
        "--config",
        kit,
        "--coordinator",
        &url,
        "model",
        "pull",
        &run,
        "--merged",
        "--base",
        base.to_str().expect("utf-8"),
        "-o",
        merged.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        layout(&merged.join("model.safetensors")),
        layout(&base.join("model.safetensors"))
    );
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    assert!(merged.join("adapter.safetensors").is_file());
    // Later, without the coordinator, the pulled adapter merges into the same weights.
    let offline = d.join("merged-offline");
    let out = medfl(&[
        "model",
        "merge",
        "--adapter",
        adapter.to_str().expect("utf-8"),
        "--base",
        base.to_str().expect("utf-8"),
        "-o",
        offline.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read(offline.join("model.safetensors")).expect("merged offline")
            == std::fs::read(merged.join("model.safetensors")).expect("merged"),
        "an offline merge differs from `pull --merged`"
    );
    // Merging into other weights than the run pinned is refused.
    let other = d.join("other");
    write_tiny_bert(&other, 1.0).expect("tiny model");
    let out = medfl(&[
        "--config",
        kit,
        "--coordinator",
        &url,
        "model",
        "pull",
        &run,
        "--merged",
        "--base",
        other.to_str().expect("utf-8"),
        "-o",
        d.join("m2").to_str().expect("utf-8"),
    ])
    .await;
    assert!(
        !out.status.success() && text(&out.stderr).contains(&sha),
        "{}",
        text(&out.stderr)
    );
    // The directory the failed pull made is gone again.
    assert!(!d.join("m2").exists());

    // Predictions on a researcher's own file, with accuracy where labels are known.
    let predictions = d.join("predictions.jsonl");
    let out = medfl(&[
        "predict",
        "--model",
        base.to_str().expect("utf-8"),
        "--adapter",
        adapter.to_str().expect("utf-8"),
        "--input",
        parts[2].to_str().expect("utf-8"),
        "-o",
        predictions.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = std::fs::read_to_string(&predictions).expect("predictions");
    let n_input = TextTable::load_jsonl(&parts[2]).expect("input").len();
    assert_eq!(lines.lines().count(), n_input);
    let first: serde_json::Value =
        serde_json::from_str(lines.lines().next().expect("a line")).expect("json");
    assert!(labels.contains(&first["prediction"].as_str().expect("label").to_string()));
    assert!(
        text(&out.stderr).contains("accuracy"),
        "{}",
        text(&out.stderr)
    );

    for s in sites {
        s.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_kits_drive_the_cli_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kits = dir.path().join("kits");
    // Written as the operator may type it, without `init`.
    let out = medfl(&[
        "provision",
        "--consortium",
        "test",
        "--coordinator",
        "localhost",
        "--site",
        "h1",
        "--researcher",
        "alice",
        "-o",
        kits.to_str().expect("utf-8"),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = kits.join("h1/h1.key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).expect("key").permissions()
        ) & 0o777,
        0o600
    );
    let mut cfg = test_config(&dir.path().join("coordinator"));
    cfg.insecure_dev = false;
    cfg.tls_ca = Some(kits.join("coordinator/ca.pem"));
    cfg.tls_cert = Some(kits.join("coordinator/coordinator.pem"));
    cfg.tls_key = Some(kits.join("coordinator/coordinator.key"));
    cfg.revocation_list = None;
    let coordinator = Coordinator::start(cfg).await;
    let url = format!("https://localhost:{}", coordinator.addr.port());
    let alice = kits.join("alice/medfl.toml");
    let out = medfl(&[
        "--config",
        alice.to_str().expect("utf-8"),
        "--coordinator",
        &url,
        "run",
        "list",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Without the kit, an https coordinator is refused before dialling.
    let out = medfl(&["--coordinator", &url, "run", "list"]).await;
    assert!(
        !out.status.success() && text(&out.stderr).contains("--config"),
        "{}",
        text(&out.stderr)
    );
    // A site's kit may not use the researcher's service.
    let site = kits.join("h1/site.toml");
    let site_kit = format!(
        "coordinator = \"{url}\"\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        kits.join("h1/ca.pem").display(),
        kits.join("h1/h1.pem").display(),
        key.display()
    );
    assert!(site.is_file());
    let as_site = dir.path().join("as-site.toml");
    std::fs::write(&as_site, site_kit).expect("config");
    let out = medfl(&["--config", as_site.to_str().expect("utf-8"), "run", "list"]).await;
    assert!(
        !out.status.success() && text(&out.stderr).contains("may not call RunService"),
        "{}",
        text(&out.stderr)
    );
    coordinator.stop().await;
}
