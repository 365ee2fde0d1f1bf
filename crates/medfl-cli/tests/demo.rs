//! `medfl demo` as a user runs it: a consortium provisioned on the fly, a coordinator and three
//! hospitals over mutual TLS, and a federated model that beats every hospital alone.

use std::process::Command;

#[test]
fn the_demo_federates_over_mutual_tls_and_beats_every_site_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["demo", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run medfl demo");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
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
