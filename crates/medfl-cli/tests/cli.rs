//! The `medfl` binary against a real coordinator and real sites: create, watch, list, show,
//! sites, pull, and clear errors for bad input.

mod common;

use std::process::{Command, Output};

use common::{medfl, text};
use medfl_e2e::{breast_cancer_spec, Coordinator, Federation};

/// `medfl run create FILE` with `spec` written to `file`.
async fn create(coordinator: &Coordinator, file: &std::path::Path, spec: &str) -> Output {
    std::fs::write(file, spec).expect("spec");
    medfl(
        coordinator,
        &["run", "create", file.to_str().expect("utf-8")],
    )
    .await
}

/// A run created from `spec`, which must succeed: its id.
async fn created(coordinator: &Coordinator, file: &std::path::Path, spec: &str) -> String {
    let out = create(coordinator, file, spec).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_researcher_drives_a_run_from_the_cli() {
    let fed = Federation::start(2).await;
    let dir = fed.dir.path();
    let spec = dir.join("run.toml");
    let run = created(
        &fed.coordinator,
        &spec,
        &breast_cancer_spec("cli-run", 2, 2, 60),
    )
    .await;
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
    // With --columns, the names a spec may use.
    let out = medfl(&fed.coordinator, &["sites", "--columns"]).await;
    let listed = text(&out.stdout);
    assert!(
        listed.contains("hospital-1 / breast_cancer: ") && listed.contains("mean_radius"),
        "{listed}"
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
    // Self-describing: the spec (features, labels) and where the model comes from.
    let bytes = std::fs::read(&model).expect("model");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
    let meta = meta.metadata().clone().expect("metadata");
    let carried = medfl_core::spec::RunSpec::from_toml(&meta["medfl.run_spec"]).expect("spec");
    assert_eq!(carried.task.features.len(), 30);
    let origin: serde_json::Value = serde_json::from_str(&meta["medfl.model"]).expect("JSON");
    assert_eq!(origin["run"], run.as_str(), "{origin}");
    assert_eq!(origin["round"], 2, "{origin}");
    let served = text(&out.stdout);
    let global = origin["global_sha256"].as_str().expect("a hash");
    assert!(served.starts_with(global), "{served} / {origin}");

    // Federated standardisation, the default: the model carries the federation's statistics,
    // pooled from exactly the sums each hospital's audit log says it sent (never a row).
    let pooled = medfl_core::standardize::Standardization::from_json(
        &meta["medfl.standardization"],
        &carried.task.features,
    )
    .expect("statistics");
    let mut sent = Vec::new();
    for site in ["hospital-0", "hospital-1"] {
        let log = std::fs::read_to_string(dir.join(site).join("audit.jsonl")).expect("log");
        let event: serde_json::Value = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
            .find(|e| e["event"] == "statistics_sent")
            .unwrap_or_else(|| panic!("{site} audited no statistics_sent"));
        let floats = |key: &str| -> Vec<f64> {
            event["details"][key]
                .as_array()
                .expect("sums")
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect()
        };
        sent.push(medfl_core::standardize::FeatureSums {
            count: event["details"]["rows"].as_u64().expect("rows"),
            sum: floats("sum"),
            sum_sq: floats("sum_sq"),
        });
    }
    let expected = medfl_core::standardize::Standardization::pool(&carried.task.features, &sent)
        .expect("pool");
    assert_eq!(pooled.rows, expected.rows);
    assert_eq!(pooled.sites, 2);
    for j in 0..carried.task.features.len() {
        assert!((pooled.mean[j] - expected.mean[j]).abs() < 1e-9 * expected.mean[j].abs().max(1.0));
        assert!((pooled.std[j] - expected.std[j]).abs() < 1e-9 * expected.std[j].max(1.0));
    }
    // Sums over the training rows only: each site keeps its validation split out.
    let site_rows = std::fs::read_to_string(dir.join("data").join("site-0.csv"))
        .expect("site data")
        .lines()
        .count() as u64
        - 1;
    assert!(
        sent[0].count < site_rows,
        "{} of {site_rows}",
        sent[0].count
    );

    // `medfl predict` runs the pulled model on a CSV with nothing else.
    let predictions = dir.join("predictions.csv");
    let out = medfl(
        &fed.coordinator,
        &[
            "predict",
            "--pulled",
            model.to_str().expect("utf-8"),
            "--input",
            fed.test_csv.to_str().expect("utf-8"),
            "-o",
            predictions.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&predictions).expect("predictions");
    let test_rows = std::fs::read_to_string(&fed.test_csv)
        .expect("test data")
        .lines()
        .count()
        - 1;
    assert_eq!(written.lines().count(), test_rows + 1, "{written}");
    assert!(
        written.starts_with("row,prediction,confidence,p_B,p_M\n"),
        "{written}"
    );
    let said = text(&out.stderr);
    let accuracy: f64 = said
        .split("accuracy ")
        .nth(1)
        .and_then(|a| a.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {said}"));
    assert!(accuracy > 0.85, "{said}");
    // ONNX for the hospital's own tools (checked against onnxruntime in CI).
    let onnx = dir.join("model.onnx");
    let out = medfl(
        &fed.coordinator,
        &[
            "model",
            "export",
            "--pulled",
            model.to_str().expect("utf-8"),
            "-o",
            onnx.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::metadata(&onnx).expect("onnx").len() > 30 * 4);
    // Without the federation's statistics, prediction needs the hospital's own rows.
    let bare = dir.join("bare.safetensors");
    std::fs::write(
        &bare,
        medfl_model::adapter::model_bytes(&params, &[("medfl.run_spec", &meta["medfl.run_spec"])])
            .expect("bytes"),
    )
    .expect("write");
    let out = medfl(
        &fed.coordinator,
        &[
            "predict",
            "--pulled",
            bare.to_str().expect("utf-8"),
            "--input",
            fed.test_csv.to_str().expect("utf-8"),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--standardize-on"),
        "{}",
        text(&out.stderr)
    );

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
    // The head printed now still verifies after the log grows; a log cut back before it fails,
    // though what is left of its chain is intact.
    let copy = dir.join("audit-copy.jsonl");
    std::fs::copy(&site_log, &copy).expect("copy");
    let verify = |extra: Vec<String>| {
        let mut args = vec![
            "audit".to_string(),
            "verify".into(),
            copy.display().to_string(),
        ];
        args.extend(extra);
        args
    };
    let out = medfl(
        &fed.coordinator,
        &verify(vec![])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let head = text(&out.stdout)
        .split("head ")
        .nth(1)
        .map(|h| h.trim().to_string())
        .expect("a head");
    assert_eq!(head.len(), 64, "{head}");
    let expect = verify(vec!["--expect-head".into(), head.clone()]);
    let out = medfl(
        &fed.coordinator,
        &expect.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(&copy).expect("log");
    let kept: Vec<&str> = log.lines().collect();
    std::fs::write(&copy, kept[..kept.len() - 1].join("\n") + "\n").expect("truncate");
    let out = medfl(
        &fed.coordinator,
        &expect.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("truncated"),
        "{}",
        text(&out.stderr)
    );
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
    let out = create(
        &fed.coordinator,
        &spec,
        &breast_cancer_spec("bad", 0, 2, 60),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("rounds"),
        "{}",
        text(&out.stderr)
    );
    let out = create(
        &fed.coordinator,
        &spec,
        &breast_cancer_spec("too-many", 1, 5, 60),
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
    let out = create(&fed.coordinator, &spec, &huge).await;
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

/// A run with both privacy levels: `run watch` and `run show` give what each level spent and
/// what its target leaves, and the pulled model's metadata records ε, δ, the accountant, z, C
/// and q per level, and the rounds behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_runs_watch_show_and_pulled_model_state_what_it_spent() {
    let fed = Federation::start(3).await;
    let dir = fed.dir.path();
    let spec = dir.join("private.toml");
    let text_spec = breast_cancer_spec("private", 2, 3, 60)
        + "\n[[privacy]]\nlevel = \"record\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n\
           target_epsilon = 50.0\n\
           \n[[privacy]]\nlevel = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 0.5\n\
           sample_rate = 1.0\ndelta = 0.01\ntarget_epsilon = 30.0\n";
    let run = created(&fed.coordinator, &spec, &text_spec).await;

    let out = medfl(&fed.coordinator, &["run", "watch", &run]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let watched = text(&out.stdout);
    assert!(watched.contains("CLIENT_EPS"), "{watched}");
    let client = medfl_core::spec::RunSpec::from_toml(&text_spec)
        .expect("spec")
        .privacy
        .client
        .expect("client level");
    let two = client.epsilon_after(2).expect("ε");
    let line = watched
        .lines()
        .find(|l| l.starts_with("privacy, client level"))
        .unwrap_or_else(|| panic!("no client-level line: {watched}"));
    assert!(
        line.contains(&format!("ε {two:.3} at δ = 0.01 after 2 rounds"))
            && line.contains(&format!("target ε 30, {:.3} left", 30.0 - two)),
        "{line}"
    );
    assert!(watched.contains("privacy, record level"), "{watched}");
    let out = medfl(&fed.coordinator, &["run", "show", &run]).await;
    assert!(
        text(&out.stdout).contains("privacy, client level"),
        "{}",
        text(&out.stdout)
    );

    let model = dir.join("private.safetensors");
    let out = medfl(
        &fed.coordinator,
        &["model", "pull", &run, "-o", model.to_str().expect("utf-8")],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&model).expect("model");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
    let privacy: serde_json::Value = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("medfl.privacy"))
            .expect("privacy metadata"),
    )
    .expect("JSON");
    assert_eq!(privacy["rounds"], 2, "{privacy}");
    let c = &privacy["client"];
    assert_eq!(c["epsilon"].as_f64(), Some(two), "{privacy}");
    assert_eq!(
        (
            c["delta"].as_f64(),
            c["noise_multiplier"].as_f64(),
            c["clip_norm"].as_f64(),
            c["sample_rate"].as_f64()
        ),
        (Some(0.01), Some(1.0), Some(0.5), Some(1.0)),
        "{privacy}"
    );
    assert_eq!(c["accountant"], "rdp");
    let r = &privacy["record"];
    assert!(r["epsilon"].as_f64().is_some_and(|e| e > 0.0), "{privacy}");
    assert_eq!(
        (r["noise_multiplier"].as_f64(), r["max_grad_norm"].as_f64()),
        (Some(1.0), Some(1.0))
    );
    // The tensors are the pulled model's.
    assert!(medfl_core::safetensors::decode(&bytes).is_ok());
    fed.stop().await;
}

/// `run watch` follows a run across a coordinator restart (the run resumes; so does the watch)
/// and exits with the run's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_watch_follows_the_run_across_a_coordinator_restart() {
    use std::io::BufRead;
    let mut fed = Federation::start(3).await;
    // The third hospital goes away: the run, which needs all three, waits for it.
    let third = fed.sites.pop().expect("a third site");
    third.stop().await;
    let dir = fed.dir.path().to_path_buf();
    let spec = dir.join("across.toml");
    let run = created(
        &fed.coordinator,
        &spec,
        &breast_cancer_spec("across", 2, 3, 60),
    )
    .await;

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    cmd.arg("--config")
        .arg(
            fed.coordinator
                .researcher_config()
                .expect("a TLS coordinator"),
        )
        .arg("--coordinator")
        .arg(fed.coordinator.url())
        .args(["run", "watch", &run])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run watch");
    let stderr = child.stderr.take().expect("stderr");
    // Once the watch follows the run, the coordinator restarts under it.
    let (following, followed) = tokio::sync::oneshot::channel();
    let stderr = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut following = Some(following);
        let mut rest = Vec::new();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.starts_with("following run") {
                if let Some(tx) = following.take() {
                    let _ = tx.send(());
                }
            }
            rest.push(line);
        }
        rest
    });
    followed.await.expect("the watch follows the run");
    fed.coordinator.restart();
    let name = "hospital-2";
    let csv = dir.join("data").join("site-2.csv");
    let mut back = medfl_e2e::Site::start(medfl_e2e::site_config(
        name,
        &fed.coordinator,
        &dir.join(name),
        &csv,
    ));
    back.registered(1).await;
    fed.sites.push(back);

    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("watch ends"))
        .await
        .expect("join");
    let rest = stderr.await.expect("stderr").join("\n");
    assert_eq!(out.status.code(), Some(0), "{}\n{rest}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("completed after 2/2 rounds"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        rest.contains("again"),
        "the watch never reconnected: {rest}"
    );
    fed.stop().await;
}

/// Stdout of a command that must succeed, parsed as JSON.
async fn json(coordinator: &Coordinator, args: &[&str]) -> serde_json::Value {
    let out = medfl(coordinator, args).await;
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_read_command_prints_json_with_json() {
    let fed = Federation::start(2).await;
    let dir = fed.dir.path();
    let run = created(
        &fed.coordinator,
        &dir.join("run.toml"),
        &breast_cancer_spec("json-run", 2, 2, 60),
    )
    .await;

    // One JSON object a line: each round as it completes, then the ended run.
    let out = medfl(&fed.coordinator, &["run", "watch", &run, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let rounds: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["round"]["round"].as_u64())
        .collect();
    assert_eq!(rounds, [1, 2], "{lines:?}");
    let last = lines.last().expect("a line");
    assert_eq!(last["run"]["summary"]["status"], "completed", "{last}");

    let runs = json(&fed.coordinator, &["run", "list", "--json"]).await;
    let listed = runs
        .as_array()
        .and_then(|r| r.iter().find(|r| r["run_id"] == run.as_str()))
        .unwrap_or_else(|| panic!("{run} in {runs}"));
    assert_eq!(listed["status"], "completed");
    assert_eq!(listed["rounds_done"], 2);

    let shown = json(&fed.coordinator, &["run", "show", &run, "--json"]).await;
    assert_eq!(shown["summary"]["run_id"], run.as_str());
    assert!(shown["spec_toml"]
        .as_str()
        .is_some_and(|s| s.contains("json-run")));
    assert_eq!(shown["rounds"].as_array().map(Vec::len), Some(2));
    let (created, ended) = (
        shown["summary"]["created_unix_ms"].as_u64().unwrap_or(0),
        shown["summary"]["ended_unix_ms"].as_u64().unwrap_or(0),
    );
    assert!(created > 0 && ended >= created, "{shown}");
    let out = medfl(&fed.coordinator, &["run", "show", &run]).await;
    assert!(
        text(&out.stdout).contains("ended "),
        "{}",
        text(&out.stdout)
    );
    let round = json(
        &fed.coordinator,
        &["run", "show", &run, "--round", "1", "--json"],
    )
    .await;
    assert_eq!(round["round"], 1);
    let sites = round["sites"].as_array().expect("per-site results");
    assert_eq!(sites.len(), 2, "{round}");
    assert!(sites.iter().all(|s| s["outcome"] == "accepted"), "{round}");

    let evaluated = json(&fed.coordinator, &["run", "evaluate", &run, "--json"]).await;
    assert_eq!(evaluated.as_array().map(Vec::len), Some(2), "{evaluated}");
    assert!(
        evaluated[0]["metrics"]["accuracy"].as_f64().is_some(),
        "{evaluated}"
    );

    let sites = json(&fed.coordinator, &["sites", "--json"]).await;
    let names: Vec<&str> = sites
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["hospital-0", "hospital-1"]);
    assert!(sites[0]["datasets"][0]["columns"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c == "mean_radius")));

    // The audit trail as stored, one entry a line, filtered.
    let log = dir.join("hospital-0").join("audit.jsonl");
    let args = [
        "audit",
        "show",
        log.to_str().expect("utf-8"),
        "--event",
        "update_sent",
        "--json",
    ];
    let out = medfl(&fed.coordinator, &args).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sent: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent
        .iter()
        .all(|e| e["event"] == "update_sent" && e["run"] == run.as_str()));
}

/// The coordinator signs checkpoints of its audit log (at least at a clean stop) with the key
/// in its `signing.pub`: `medfl audit verify --key` checks them, and catches an entry rewritten
/// with the hash chain rebuilt around it, which the chain alone cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_audit_log_carries_signed_checkpoints() {
    let fed = Federation::start(1).await;
    let dir = fed.dir.path().to_path_buf();
    let data_dir = fed.coordinator.data_dir.clone();
    let run = created(
        &fed.coordinator,
        &dir.join("run.toml"),
        &breast_cancer_spec("signed-log", 1, 1, 60),
    )
    .await;
    let out = medfl(&fed.coordinator, &["run", "watch", &run]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let Federation {
        coordinator,
        sites,
        dir: keep,
        ..
    } = fed;
    for site in sites {
        site.stop().await;
    }
    coordinator.stop().await;

    let log = data_dir.join("audit.jsonl");
    let key = data_dir.join("signing.pub");
    let verify = |log: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_medfl"))
            .args(["audit", "verify"])
            .arg(log)
            .arg("--key")
            .arg(&key)
            .output()
            .expect("run medfl")
    };
    let out = verify(&log);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("signed checkpoints verify with the key"),
        "{said}"
    );
    assert!(said.contains(", 0 entries after it"), "{said}");

    // Rewrite the run's creation and rebuild the hash chain: the chain verifies, the signed
    // checkpoint after it does not.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("entry"))
        .collect();
    let mut prev = medfl_audit::GENESIS.to_string();
    let mut rebuilt = String::new();
    for mut e in lines {
        if e["event"] == "run_created" {
            e["details"]["name"] = "someone-else".into();
        }
        e["prev"] = prev.clone().into();
        let entry: medfl_audit::Entry = serde_json::from_value(e).expect("entry");
        let line = serde_json::to_string(&entry).expect("json");
        prev = hex::encode(ring::digest::digest(&ring::digest::SHA256, line.as_bytes()));
        rebuilt += &format!("{line}\n");
    }
    let forged = dir.join("forged.jsonl");
    std::fs::write(&forged, rebuilt).expect("write");
    let chain_only = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["audit", "verify"])
        .arg(&forged)
        .output()
        .expect("run medfl");
    assert!(chain_only.status.success(), "{}", text(&chain_only.stderr));
    let out = verify(&forged);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("checkpoint"),
        "{}",
        text(&out.stderr)
    );
    drop(keep);
}
