//! The hospital's commands (`medfl-site runs approve|reject` or `approve|reject`, `pause`, `resume`,
//! `dataset add|remove`), run as the real binary: each takes effect and is recorded, with the
//! account that took it, in the site's audit log, whose chain still verifies. Runs are decided
//! by id once they reached the site, or ahead of time by name or by spec SHA-256.

use std::path::{Path, PathBuf};
use std::process::Command;

use medfl_core::spec::RunSpec;
use medfl_site::policy::{spec_sha256, Approvals, Decision, Policy};
use medfl_site::SiteError;

/// A site's config in `dir` whose `data_dir` is `data` (relative to the file, so found from any
/// working directory), and the state its daemon made on first start.
fn site(dir: &Path) -> PathBuf {
    let config = dir.join("site.toml");
    let text = "name = \"st-marys\"\ncoordinator = \"http://127.0.0.1:9\"\ninsecure_dev = true\n\
                data_dir = \"data\"\n[policy]\nrequire_approval = true\n";
    std::fs::write(&config, text).expect("writing the site config");
    medfl_site::identity::SiteState::load_or_create(&dir.join("data"), "st-marys")
        .expect("the daemon's first start");
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

/// The spec of a run named `name`, as the coordinator sends it.
fn spec_toml(name: &str, seed: u64) -> String {
    format!(
        "name = \"{name}\"\nrounds = 1\nseed = {seed}\n[model]\nkind = \"mlp\"\n[task]\n\
         dataset = \"bc\"\nfeatures = [\"a\"]\nlabel = \"y\"\nlabels = [\"0\", \"1\"]\n"
    )
}

/// A run with spec `toml` reaching a site that requires approval: what the site decides.
fn arrive(data: &Path, run: &str, toml: &str) -> Result<(), SiteError> {
    let spec = RunSpec::from_toml(toml).expect("spec");
    let policy = Policy {
        require_approval: true,
        ..Policy::default()
    };
    medfl_site::policy::admit(&policy, data, run, &spec, &spec_sha256(toml), 8, None).map(|_| ())
}

/// A run as it reaches a site that requires approval: queued as pending.
fn queue_run(data: &Path, run: &str) {
    match arrive(data, run, &spec_toml("sepsis", 1)) {
        Err(e) => assert!(e.to_string().contains("awaits"), "{e}"),
        Ok(()) => panic!("{run} was admitted without approval"),
    }
}

#[test]
fn every_decision_taken_by_hand_is_audited_insecure_dev_offline() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    queue_run(&data, "run-a");
    queue_run(&data, "run-b");

    assert!(medfl_site(&config, &["runs", "pending"]).contains("run-a"));
    let pending: serde_json::Value =
        serde_json::from_str(&medfl_site(&config, &["runs", "pending", "--json"])).unwrap();
    let waiting: Vec<&String> = pending["runs"].as_object().unwrap().keys().collect();
    assert_eq!(waiting, ["run-a", "run-b"], "{pending}");
    assert_eq!(pending["runs"]["run-a"]["name"], "sepsis", "{pending}");
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
    let listed: serde_json::Value =
        serde_json::from_str(&medfl_site(&config, &["dataset", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], "bc", "{listed}");
    assert_eq!(listed[0]["origin"], "registry", "{listed}");
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
fn runs_are_decided_ahead_of_time_by_name_or_spec_hash_insecure_dev_offline() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let data = dir.path().join("data");
    let approved_spec = spec_toml("stroke", 2);
    let approved_sha = spec_sha256(&approved_spec);
    let rejected_sha = spec_sha256(&spec_toml("stroke", 3));

    // A bare word is a run id: one that never arrived is refused, not taken for a name.
    let typo = Command::new(env!("CARGO_BIN_EXE_medfl-site"))
        .arg("--config")
        .arg(&config)
        .args(["approve", "sepsis"])
        .output()
        .expect("running medfl-site");
    assert!(!typo.status.success());
    let said = String::from_utf8_lossy(&typo.stderr);
    // Not a configuration error: the command names what to type instead.
    assert!(
        said.contains("--name sepsis") && !said.contains("configuration:"),
        "{said}"
    );
    let out = medfl_site(&config, &["runs", "approve", "--name", "sepsis"]);
    assert!(
        out.contains("ahead of time") && out.contains("named `sepsis`"),
        "{out}"
    );
    let out = medfl_site(&config, &["approve", &approved_sha]);
    assert!(out.contains(&approved_sha), "{out}");
    medfl_site(
        &config,
        &[
            "runs",
            "reject",
            &rejected_sha,
            "--reason",
            "too many epochs",
        ],
    );

    // The runs reach the site later: decided as the hospital said, bound to their spec.
    arrive(&data, "run-a", &spec_toml("sepsis", 1)).expect("approved by name");
    arrive(&data, "run-b", &approved_spec).expect("approved by spec hash");
    let refused = arrive(&data, "run-c", &spec_toml("stroke", 3)).unwrap_err();
    assert!(refused.to_string().contains("too many epochs"), "{refused}");
    let waits = arrive(&data, "run-d", &spec_toml("stroke", 4)).unwrap_err();
    assert!(waits.to_string().contains("awaits"), "{waits}");
    let changed = arrive(&data, "run-b", &spec_toml("stroke", 5)).unwrap_err();
    assert!(
        changed.to_string().contains(&approved_sha),
        "a changed spec is refused: {changed}"
    );

    let listed = medfl_site(&config, &["runs", "pending", "--all"]);
    assert!(listed.contains(&approved_sha[..12]), "{listed}");
    assert!(listed.contains("ahead of time"), "{listed}");
    let queue = Approvals::load(&data).unwrap();
    assert_eq!(queue.runs["run-a"].decision, Decision::Approved);
    assert_eq!(queue.runs["run-b"].spec_sha256, approved_sha);
    assert_eq!(queue.runs["run-c"].decision, Decision::Rejected);

    // Approving the waiting run by its name decides it at once.
    let out = medfl_site(&config, &["approve", "--name", "stroke"]);
    assert!(out.contains("run-d"), "{out}");
    arrive(&data, "run-d", &spec_toml("stroke", 4)).expect("approved while it waited");

    let entries = medfl_audit::read(&data.join("audit.jsonl")).expect("the chain verifies");
    let events: Vec<&str> = entries.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "run_approved_by_hospital",
            "run_approved_by_hospital",
            "run_rejected_by_hospital",
            "run_approved_by_hospital",
        ]
    );
    assert_eq!(entries[0].details["name"], "sepsis");
    assert_eq!(entries[1].details["spec_sha256"], approved_sha.as_str());
    assert_eq!(entries[2].details["reason"], "too many epochs");
    assert_eq!(entries[3].details["applied_to"][0], "run-d");
    assert!(entries
        .iter()
        .all(|e| e.details["ahead"] == true && e.details["by"] == "it-on-call"));
}

/// `medfl-site privacy` shows each budgeted dataset's budget, what runs spent and what is left,
/// from the ledger the daemon keeps in `site.json`.
#[test]
fn the_privacy_ledger_is_shown_against_the_budget_insecure_dev_offline() {
    use medfl_site::identity::{PrivacyLedger, RunRecord, SiteState};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"st-marys\"\ncoordinator = \"http://127.0.0.1:9\"\ninsecure_dev = true\n\
             data_dir = \"{}\"\n[policy.privacy.bc]\nmax_epsilon = 3.0\ndelta = 1e-6\n",
            data.display()
        ),
    )
    .unwrap();
    SiteState::load_or_create(&data, "st-marys").unwrap();
    let empty = medfl_site(&config, &["privacy", "--json"]);
    let empty: serde_json::Value = serde_json::from_str(&empty).unwrap();
    assert_eq!(empty["datasets"][0]["left"], 3.0, "{empty}");
    let mut state = SiteState::load_or_create(&data, "st-marys").unwrap();
    for (run, epsilon) in [("run-a", 1.25), ("run-b", 0.5)] {
        state.runs.insert(
            run.into(),
            RunRecord {
                name: format!("{run}-name"),
                privacy: Some(PrivacyLedger {
                    dataset: "bc".into(),
                    epsilon,
                    delta: 1e-6,
                    accountant: "rdp".into(),
                    sample_rate: 0.02,
                    noise_multiplier: 1.1,
                    max_grad_norm: 1.0,
                    steps: 300,
                }),
                ..RunRecord::default()
            },
        );
    }
    state.save(&data).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&medfl_site(&config, &["privacy", "--json"])).unwrap();
    let bc = &got["datasets"][0];
    assert_eq!(bc["dataset"], "bc");
    assert_eq!(bc["spent"], 1.75);
    assert_eq!(bc["left"], 1.25);
    assert_eq!(bc["runs"].as_array().map(Vec::len), Some(2));
    let text = medfl_site(&config, &["privacy"]);
    assert!(
        text.contains("bc") && text.contains("1.750") && text.contains("run-a (run-a-name)"),
        "{text}"
    );
}

/// The admin commands find the daemon's state through its config from any working directory;
/// pointed where no daemon has run, they refuse and create nothing.
#[test]
fn admin_commands_find_the_state_from_any_directory_or_refuse_insecure_dev_offline() {
    let dir = tempfile::tempdir().unwrap();
    let config = site(dir.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[&str], config: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_medfl-site"));
        match config {
            Some(config) => command.arg("--config").arg(config),
            // The site's name from the environment, as a container would set it.
            None => command
                .env("MEDFL_NAME", "st-marys")
                .env("MEDFL_INSECURE_DEV", "true"),
        };
        command
            .args(args)
            .current_dir(elsewhere.path())
            .env("USER", "it-on-call")
            .output()
            .expect("running medfl-site")
    };
    let paused = run(&["pause"], Some(&config));
    assert!(paused.status.success(), "{paused:?}");
    assert!(dir.path().join("data").join("paused").is_file());
    let resumed = run(&["resume"], Some(&config));
    assert!(resumed.status.success(), "{resumed:?}");
    assert!(!dir.path().join("data").join("paused").exists());
    let audit = medfl_audit::read(&dir.path().join("data").join("audit.jsonl")).unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");

    // Without the daemon's config file: the default data_dir here has no state.
    for args in [&["resume"][..], &["runs", "pending", "--all"], &["privacy"]] {
        let out = run(args, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("no site state at")
                && err.contains("site-data")
                && err.contains("--config"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}
