//! The hospital's commands (`medfl-site runs approve|reject` or `approve|reject`, `pause`, `resume`,
//! `dataset add|remove`), run as the real binary: each takes effect and is recorded, with the
//! account that took it, in the site's audit log, whose chain still verifies.

use std::path::{Path, PathBuf};
use std::process::Command;

use medfl_core::spec::RunSpec;
use medfl_site::policy::{Approvals, Decision, Policy};

fn site(dir: &Path) -> PathBuf {
    let config = dir.join("site.toml");
    let text = format!(
        "name = \"st-marys\"\ncoordinator = \"http://127.0.0.1:9\"\ninsecure_dev = true\n\
         data_dir = \"{}\"\n[policy]\nrequire_approval = true\n",
        dir.join("data").display()
    );
    std::fs::write(&config, text).expect("writing the site config");
    config
}

fn medfl_site(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_medfl-site"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("USER", "it-on-call")
        .output()
        .expect("running medfl-site");
    assert!(
        out.status.success(),
        "medfl-site {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A run as it reaches a site that requires approval: queued as pending.
fn queue_run(data: &Path, run: &str) {
    let spec = RunSpec::from_toml(
        "name = \"sepsis\"\nrounds = 1\n[model]\nkind = \"mlp\"\n[task]\ndataset = \"bc\"\n\
         features = [\"a\"]\nlabel = \"y\"\nlabels = [\"0\", \"1\"]\n",
    )
    .expect("spec");
    let policy = Policy {
        require_approval: true,
        ..Policy::default()
    };
    match medfl_site::policy::admit(&policy, data, run, &spec, 8) {
        Err(e) => assert!(e.to_string().contains("awaits"), "{e}"),
        Ok(_) => panic!("{run} was admitted without approval"),
    }
}

#[test]
fn every_decision_taken_by_hand_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    queue_run(&data, "run-a");
    queue_run(&data, "run-b");

    assert!(medfl_site(&config, &["runs", "pending"]).contains("run-a"));
    medfl_site(&config, &["runs", "approve", "run-a"]);
    // The short form the hospital may type instead.
    medfl_site(
        &config,
        &["reject", "run-b", "--reason", "no ethics approval"],
    );
    medfl_site(&config, &["pause", "--reason", "scanner upgrade"]);
    assert!(medfl_site::policy::is_paused(&data));
    medfl_site(&config, &["resume"]);
    assert!(!medfl_site::policy::is_paused(&data));
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/breast_cancer_wisconsin.csv"
    );
    medfl_site(
        &config,
        &["dataset", "add", "bc", "--path", csv, "--format", "csv"],
    );
    medfl_site(&config, &["dataset", "remove", "bc"]);

    let queue = Approvals::load(&data).unwrap();
    assert_eq!(queue.runs["run-a"].decision, Decision::Approved);
    assert_eq!(queue.runs["run-b"].decision, Decision::Rejected);

    let entries = medfl_audit::read(&data.join("audit.jsonl")).expect("the chain verifies");
    let events: Vec<&str> = entries.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "run_approved_by_hospital",
            "run_rejected_by_hospital",
            "site_paused",
            "site_resumed",
            "dataset_registered",
            "dataset_removed",
        ]
    );
    assert!(entries
        .iter()
        .all(|e| e.details["by"] == "it-on-call" && e.site.as_deref() == Some("st-marys")));
    assert_eq!(entries[0].run.as_deref(), Some("run-a"));
    assert_eq!(entries[1].details["reason"], "no ethics approval");
    assert_eq!(entries[2].details["reason"], "scanner upgrade");
    assert_eq!(entries[4].details["records"], 569);
}

#[test]
fn deciding_on_a_run_that_never_arrived_fails_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_medfl-site"))
        .args(["--config"])
        .arg(&config)
        .args(["runs", "approve", "run-z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("run-z") && err.contains("runs pending"),
        "{err}"
    );
    assert!(!dir.path().join("data/audit.jsonl").exists());
}
