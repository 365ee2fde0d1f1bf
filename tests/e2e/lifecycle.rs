//! A run's whole life on the shipped defaults (TLS, `retain_updates = false`, `keep_models =
//! "all"`): rounds whose global model is byte-identical to an update (one site, Krum, a site that
//! echoes the global model) keep their model through the round, the run's end and a restart,
//! and a stopped run's collection spares what another run shares with it.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;
use tonic::transport::Channel;

/// The bytes of the model of `round` of `run` (0: the latest), as `medfl model pull` gets them.
async fn pull(
    client: &mut RunServiceClient<Channel>,
    run: &str,
    round: u32,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .pull_model(v1::PullModelRequest {
            run_id: run.into(),
            round,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

/// Pulls every committed round's model and checks it hashes to what the round committed.
async fn assert_every_round_pullable(
    client: &mut RunServiceClient<Channel>,
    detail: &v1::RunDetail,
) {
    let run = &detail.summary.as_ref().expect("summary").run_id;
    for r in &detail.rounds {
        let bytes = pull(client, run, r.round)
            .await
            .unwrap_or_else(|e| panic!("model pull {run} --round {}: {e}", r.round));
        let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
        assert_eq!(sha, r.global_sha256, "round {}", r.round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_site_runs_three_rounds_and_keeps_every_model_across_a_restart() {
    let mut fed = Federation::start(1).await;
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("pilot", 3, 1, 60)).await;
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    assert!(detail.rounds.iter().all(|r| r.sites_reported == 1));
    assert_every_round_pullable(&mut client, &detail).await;
    // What the coordinator and the site keep is their owner's alone.
    let mode = |p: std::path::PathBuf| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&p).expect("exists").permissions(),
        ) & 0o777
    };
    let data = &fed.coordinator.data_dir;
    assert_eq!(mode(data.clone()), 0o700);
    assert_eq!(mode(data.join("blobs")), 0o700);
    for file in ["state.db", "state.db-wal", "state.db-shm"] {
        assert_eq!(mode(data.join(file)), 0o600, "{file}");
    }
    let site = fed.dir.path().join("hospital-0");
    assert_eq!(mode(site.clone()), 0o700);
    assert_eq!(mode(site.join("models")), 0o700);

    fed.coordinator.restart();
    let mut client = fed.coordinator.runs().await;
    let after = watch_until(&mut client, &run, |_| true).await;
    assert_eq!(status(&after), v1::RunStatus::Completed as i32);
    assert_every_round_pullable(&mut client, &after).await;
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_krum_run_completes_and_keeps_its_models() {
    let fed = Federation::start_with(5, false).await;
    let spec = format!(
        "{}\n[strategy]\nname = \"krum\"\nf = 1\n",
        breast_cancer_spec("krum-defaults", 3, 5, 60)
    );
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    assert_every_round_pullable(&mut client, &detail).await;
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_that_echoes_the_global_model_does_not_make_it_vanish() {
    let mut fed = Federation::start(1).await;
    let mut echo = RawSite::register(&fed.coordinator, "echo").await;
    let mut client = fed.coordinator.runs().await;
    // The echo's update is byte for byte the model its round started from.
    let run = create_run(&mut client, &breast_cancer_spec("echoed", 2, 2, 60)).await;
    let echoing = tokio::spawn(async move {
        for _ in 0..2 {
            let task = echo.next_task().await;
            assert_eq!(task.kind, v1::TaskKind::Train as i32);
            let global = echo.download(&task.global_sha256).await;
            echo.push(&task, &global, 50)
                .await
                .expect("the echo is accepted");
            let eval = echo.next_task().await;
            echo.evaluate(&eval, 0.5).await.expect("evaluation");
        }
        // The final model's cross-site evaluation.
        let last = echo.next_task().await;
        echo.evaluate(&last, 0.5).await.expect("final evaluation");
        echo
    });
    let detail = wait_for_end(&mut client, &run).await;
    let echo = echoing.await.expect("echo site");
    assert_eq!(
        status(&detail),
        v1::RunStatus::Completed as i32,
        "{detail:?}"
    );
    assert_every_round_pullable(&mut client, &detail).await;
    // The initial model, which round 1's echo equalled, is still on disk.
    let initial = fed
        .coordinator
        .store()
        .run(&run)
        .expect("run")
        .initial_sha256;
    assert!(fed.coordinator.blob_path(&initial).is_file());
    assert!(fed.coordinator.unowned_blobs().is_empty());
    drop(echo);

    fed.coordinator.restart();
    let mut client = fed.coordinator.runs().await;
    assert_every_round_pullable(&mut client, &detail).await;
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_run_is_collected_without_touching_a_twin_that_finishes() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    // The same spec and seed: both runs start from one initial model, one file on disk.
    let spec = breast_cancer_spec("twin", 3, 2, 60);
    let doomed = create_run(&mut client, &spec).await;
    let twin = create_run(&mut client, &spec).await;
    watch_until(&mut client, &doomed, |d| !d.rounds.is_empty()).await;
    client
        .stop_run(v1::StopRunRequest {
            run_id: doomed.clone(),
        })
        .await
        .expect("stop");
    let stopped = wait_for_end(&mut client, &doomed).await;
    assert_eq!(status(&stopped), v1::RunStatus::Stopped as i32);
    let detail = wait_for_completion(&mut client, &twin).await;
    assert_every_round_pullable(&mut client, &detail).await;
    // keep_models = "all": the stopped run keeps its models too, and only those.
    assert_every_round_pullable(&mut client, &stopped).await;
    let audit =
        std::fs::read_to_string(fed.coordinator.data_dir.join("audit.jsonl")).expect("audit log");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("run_collected") && l.contains(&doomed)),
        "the collection is audited"
    );
    // No update outlives its round; every file on disk has an owner.
    let store = fed.coordinator.store();
    for run in [&doomed, &twin] {
        let refs = store.refs_of_run(run).expect("refs");
        assert!(refs
            .iter()
            .all(|r| r.role != medfl_coordinator::store::BlobRole::Update));
    }
    assert_eq!(fed.coordinator.unowned_blobs(), Vec::<String>::new());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_models_final_non_default_collects_all_but_the_final_model() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(&dir.path().join("coordinator"));
    cfg.keep_models = "final".into();
    let coordinator = Coordinator::start(cfg).await;
    let (csvs, _) = split_breast_cancer(&dir.path().join("data"), 1);
    let mut site = Site::start(site_config(
        "solo",
        &coordinator,
        &dir.path().join("solo"),
        &csvs[0],
    ));
    site.registered(1).await;
    let mut client = coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("final-only", 3, 1, 60)).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let last = detail.rounds.last().expect("rounds");
    let bytes = pull(&mut client, &run, last.round)
        .await
        .expect("final model");
    assert!(!bytes.is_empty());
    let gone = pull(&mut client, &run, 1)
        .await
        .expect_err("round 1 was collected");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(gone.message().contains("keep_models"), "{}", gone.message());
    assert!(!coordinator
        .blob_path(&detail.rounds[0].global_sha256)
        .exists());
    assert_eq!(coordinator.unowned_blobs(), Vec::<String>::new());
    site.stop().await;
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_server_optimizer_runs_on_defaults_and_keeps_its_models() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    for (strategy, settings) in [
        ("fedavgm", ""),
        ("fedadam", ""),
        ("fedyogi", ""),
        ("fedadagrad", ""),
        ("fedprox", "mu = 0.1"),
    ] {
        let spec = format!(
            "{}\n[strategy]\nname = \"{strategy}\"\n{settings}\n",
            breast_cancer_spec("server-opt", 3, 2, 60)
        );
        let run = create_run(&mut client, &spec).await;
        let detail = wait_for_completion(&mut client, &run).await;
        assert_eq!(detail.rounds.len(), 3, "{strategy}");
        assert_every_round_pullable(&mut client, &detail).await;
        // Only the models stay once the run ended: no update, no optimizer state.
        let refs = fed.coordinator.store().refs_of_run(&run).expect("refs");
        assert!(
            refs.iter().all(|r| r.role.is_model()),
            "{strategy}: {refs:?}"
        );
    }
    fed.stop().await;
}
