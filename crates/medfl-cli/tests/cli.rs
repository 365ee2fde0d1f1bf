//! The `medfl` binary against a real coordinator and real sites: create, watch, list, show,
//! sites, pull, and clear errors for bad input.

use std::process::{Command, Output};

use medfl_e2e::{breast_cancer_spec, Coordinator, Federation};

/// Runs `medfl --config KIT --coordinator URL ARGS...` as the test consortium's researcher, off
/// the async threads.
async fn medfl(coordinator: &Coordinator, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    if let Some(kit) = coordinator.researcher_config() {
        cmd.arg("--config").arg(kit);
    }
    cmd.arg("--coordinator").arg(coordinator.url()).args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run medfl"))
        .await
        .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_researcher_drives_a_run_from_the_cli() {
    let fed = Federation::start(2).await;
    let dir = fed.dir.path();
    let spec = dir.join("run.toml");
    std::fs::write(&spec, breast_cancer_spec("cli-run", 2, 2, 60)).expect("spec");

    let out = medfl(
        &fed.coordinator,
        &["run", "create", spec.to_str().expect("utf-8")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = text(&out.stdout).trim().to_string();
    assert!(run.starts_with("cli-run-"), "{run}");

    let out = medfl(&fed.coordinator, &["run", "watch", &run]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let watched = text(&out.stdout);
    assert!(watched.contains("completed"), "{watched}");
    assert!(
        watched
            .lines()
            .filter(|l| l.trim_start().starts_with('1') || l.trim_start().starts_with('2'))
            .count()
            >= 2,
        "{watched}"
    );

    assert!(
        watched.contains("final model evaluated at each site"),
        "{watched}"
    );
    let out = medfl(&fed.coordinator, &["run", "evaluate", &run]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let evaluated = text(&out.stdout);
    assert!(
        evaluated.contains("hospital-0") && evaluated.contains("hospital-1"),
        "{evaluated}"
    );

    let out = medfl(&fed.coordinator, &["run", "list"]).await;
    assert!(text(&out.stdout).contains(&run), "{}", text(&out.stdout));
    let out = medfl(&fed.coordinator, &["run", "show", &run]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("hospital-0"),
        "{}",
        text(&out.stdout)
    );
    let out = medfl(&fed.coordinator, &["sites"]).await;
    assert!(
        text(&out.stdout).contains("hospital-1"),
        "{}",
        text(&out.stdout)
    );

    let model = dir.join("model.safetensors");
    let out = medfl(
        &fed.coordinator,
        &[
            "model",
            "pull",
            &run,
            "--round",
            "2",
            "-o",
            model.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let params = medfl_core::safetensors::decode(&std::fs::read(&model).expect("model"))
        .expect("safetensors");
    assert!(params.get("layers.0.weight").is_some());

    // Audit logs: what left each hospital, and what the coordinator took, hash-chained.
    let site_log = dir.join("hospital-0").join("audit.jsonl");
    let coordinator_log = fed.coordinator.data_dir.join("audit.jsonl");
    for log in [&site_log, &coordinator_log] {
        let out = medfl(
            &fed.coordinator,
            &["audit", "verify", log.to_str().expect("utf-8")],
        )
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("hash chain intact"));
    }
    let out = medfl(
        &fed.coordinator,
        &[
            "audit",
            "show",
            site_log.to_str().expect("utf-8"),
            "--event",
            "update_sent",
            "--run",
            &run,
        ],
    )
    .await;
    let sent = text(&out.stdout);
    assert_eq!(sent.lines().count(), 2, "one update a round: {sent}");
    assert!(
        sent.contains("\"tensors\"") && sent.contains("\"l2_distance_from_global\""),
        "{sent}"
    );
    let out = medfl(
        &fed.coordinator,
        &[
            "audit",
            "show",
            coordinator_log.to_str().expect("utf-8"),
            "--event",
            "update_accepted",
        ],
    )
    .await;
    assert_eq!(
        text(&out.stdout).lines().count(),
        4,
        "{}",
        text(&out.stdout)
    );
    // Any edit is caught, naming the line after the edited one.
    let tampered = dir.join("tampered.jsonl");
    let original = std::fs::read_to_string(&site_log).expect("log");
    let mut lines: Vec<String> = original.lines().map(String::from).collect();
    lines[1] = lines[1].replacen('{', "{ ", 1);
    std::fs::write(&tampered, lines.join("\n") + "\n").expect("write");
    let out = medfl(
        &fed.coordinator,
        &["audit", "verify", tampered.to_str().expect("utf-8")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("tampered.jsonl:3"),
        "{}",
        text(&out.stderr)
    );

    // Bad input: named field, unknown run, ended run.
    std::fs::write(&spec, breast_cancer_spec("bad", 0, 2, 60)).expect("spec");
    let out = medfl(
        &fed.coordinator,
        &["run", "create", spec.to_str().expect("utf-8")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("rounds"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&spec, breast_cancer_spec("too-many", 1, 5, 60)).expect("spec");
    let out = medfl(
        &fed.coordinator,
        &["run", "create", spec.to_str().expect("utf-8")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("min_sites"),
        "{}",
        text(&out.stderr)
    );
    let huge =
        breast_cancer_spec("huge", 1, 2, 60).replace("hidden = []", "hidden = [1048576, 1048576]");
    std::fs::write(&spec, huge).expect("spec");
    let out = medfl(
        &fed.coordinator,
        &["run", "create", spec.to_str().expect("utf-8")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("parameters exceed"),
        "{}",
        text(&out.stderr)
    );
    let out = medfl(&fed.coordinator, &["run", "show", "no-such-run"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no-such-run"),
        "{}",
        text(&out.stderr)
    );
    let out = medfl(&fed.coordinator, &["run", "stop", &run]).await;
    assert!(!out.status.success(), "stopping an ended run is refused");
    fed.stop().await;
}
