//! `medfl demo` as a user runs it: a consortium provisioned on the fly, a coordinator and three
//! hospitals over mutual TLS, and a federated model that beats every hospital alone.

use std::path::Path;
use std::process::Command;

/// Runs `medfl demo ARGS --out OUT`, which must succeed; its stdout and stderr.
fn demo(args: &[&str], out: &Path) -> (String, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .arg("demo")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run medfl demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout).into_owned(),
        String::from_utf8_lossy(&run.stderr).into_owned(),
    );
    assert!(run.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// `medfl demo --task icd10 ARGS` on a tiny BERT written under `dir`: its stdout and output
/// directory.
fn tiny_text_demo(dir: &Path, args: &[&str]) -> (String, std::path::PathBuf) {
    let base = dir.join("tiny");
    medfl_train::testing::write_tiny_bert(&base, 0.0).expect("tiny model");
    let out_dir = dir.join("demo");
    let mut all = vec!["--task", "icd10", "--model", base.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    let (stdout, _) = demo(&all, &out_dir);
    (stdout, out_dir)
}

#[test]
fn the_demo_federates_over_mutual_tls_and_beats_every_site_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("demo");
    let (stdout, stderr) = demo(&[], &out_dir);
    assert!(stdout.contains("mutual TLS"), "{stdout}");
    assert!(!stderr.contains("without TLS"), "{stderr}");

    // The kits it made: a 0600 key per participant.
    for who in ["coordinator", "general-hospital", "demo-researcher"] {
        let key = std::fs::read_dir(out_dir.join("kits").join(who))
            .expect("a kit")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|e| e == "key"))
            .unwrap_or_else(|| panic!("no key in {who}'s kit"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).expect("key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }

    // What it wrote, and what it measured on the held-out split.
    let model = std::fs::read(out_dir.join("global_model.safetensors")).expect("model");
    medfl_core::safetensors::decode(&model).expect("a safetensors model");
    let svg = std::fs::read_to_string(out_dir.join("training_curve.svg")).expect("curve");
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("metrics.json")).expect("metrics"),
    )
    .expect("json");
    assert_eq!(metrics["rounds"].as_array().expect("rounds").len(), 12);
    let federated = metrics["federated"]["accuracy"].as_f64().expect("accuracy");
    assert!(federated >= 0.95, "{metrics}");
    for (site, alone) in metrics["site_alone"].as_object().expect("sites") {
        let alone = alone["accuracy"].as_f64().expect("accuracy");
        assert!(
            federated > alone,
            "{site} alone {alone} >= federated {federated}"
        );
    }

    // The coordinator's audit trail of the run verifies.
    let entries = medfl_audit::read(&out_dir.join("coordinator/audit.jsonl")).expect("audit");
    assert!(entries.iter().any(|e| e.event == "run_created"));
}

/// `medfl demo --privacy 3`: record-level DP-SGD with the least noise that keeps every hospital
/// within ε = 3, which each hospital's own ledger confirms, and a model that still learns.
#[test]
fn the_demo_with_record_level_privacy_keeps_every_hospital_within_its_epsilon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("demo");
    let (stdout, _) = demo(&["--privacy", "3", "--rounds", "6"], &out_dir);
    assert!(stdout.contains("record-level DP-SGD"), "{stdout}");
    let spent: Vec<f64> = stdout
        .lines()
        .filter(|l| l.contains("steps at q ="))
        .filter_map(|l| l.split("ε = ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(spent.len(), 3, "one charge per hospital: {stdout}");
    assert!(spent.iter().all(|&e| e > 0.0 && e <= 3.0), "{spent:?}");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("metrics.json")).expect("metrics"),
    )
    .expect("json");
    // DP-SGD's noise comes from the operating system, so each run differs. The model ranks
    // the held-out rows well every time; its accuracy also depends on where each hospital's
    // own standardisation puts the threshold (seen from 0.80 to 0.97), so it gets a wider bound.
    let federated = &metrics["federated"];
    let auc = federated["auc"].as_f64().expect("auc");
    let accuracy = federated["accuracy"].as_f64().expect("accuracy");
    assert!(auc > 0.95 && accuracy > 0.7, "{metrics}");
    let out = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["demo", "--privacy", "0", "--out"])
        .arg(dir.path().join("none"))
        .output()
        .expect("run medfl demo");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ε > 0"));
}

/// `medfl demo --task icd10 --sites 4 --client-privacy 8` (on a tiny BERT): every description
/// split evenly among four sites, client-level DP-FedAvg with the least noise that keeps the run
/// within ε = 8 per site, each round's ε in the table, and no baselines.
#[test]
fn the_text_demo_splits_among_many_sites_with_client_level_privacy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stdout, out_dir) = tiny_text_demo(
        dir.path(),
        &["--sites", "4", "--rounds", "2", "--client-privacy", "8"],
    );
    assert!(stdout.contains("4 hospitals"), "{stdout}");
    assert!(stdout.contains("client-level DP-FedAvg"), "{stdout}");
    assert!(stdout.contains("site-04"), "{stdout}");
    assert!(stdout.contains("baselines left out"), "{stdout}");
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("metrics.json")).expect("metrics"),
    )
    .expect("json");
    assert_eq!(
        metrics["rounds"].as_array().expect("rounds").len(),
        2,
        "{metrics}"
    );
    assert!(metrics.get("centralized").is_none(), "{metrics}");
    // The table's client-level ε after the last round is the target's, at most.
    let last = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("2 "))
        .unwrap_or_else(|| panic!("no round 2 line: {stdout}"));
    let eps: f64 = last
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no CLIENT_EPS in {last}"));
    assert!(eps > 7.9 && eps <= 8.0, "{last}");
}

/// `medfl demo --task icd10 --privacy 8` (on a tiny BERT): record-level DP-SGD on LoRA at the
/// three hospitals, with the batch and learning rate DP needs on ~200 descriptions (64, 0.01),
/// each hospital within ε; the adapter carries the spec it trained with.
#[test]
fn the_text_demo_trains_with_record_level_privacy_at_a_larger_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stdout, out_dir) = tiny_text_demo(dir.path(), &["--rounds", "1", "--privacy", "8"]);
    assert!(stdout.contains("record-level DP-SGD"), "{stdout}");
    assert!(stdout.contains("at most ε = 8 per hospital"), "{stdout}");
    let bytes = std::fs::read(out_dir.join("adapter.safetensors")).expect("adapter");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
    let spec = medfl_core::spec::RunSpec::from_toml(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("medfl.run_spec"))
            .expect("the spec in the adapter"),
    )
    .expect("spec");
    assert_eq!(spec.training.batch_size, 64);
    assert!((spec.training.learning_rate - 0.01).abs() < 1e-12);
    assert!(spec.privacy.record.is_some());
}

/// The many-sites and client-level options are the text demo's.
#[test]
fn the_tabular_demo_refuses_the_text_demos_options() {
    let run = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["demo", "--sites", "5"])
        .output()
        .expect("run medfl demo");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--sites"), "{stderr}");
}

/// Logs written to a file or a pipe carry no terminal colour codes.
#[test]
fn logs_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["demo", "--rounds", "1", "--out"])
        .arg(dir.path().join("demo"))
        .env("RUST_LOG", "info")
        .output()
        .expect("run medfl demo");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("INFO"), "no logs to check: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}
