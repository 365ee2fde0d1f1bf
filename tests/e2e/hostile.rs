//! Clients that send what no honest site or researcher would, on the shipped defaults: each is
//! refused with a clear status, leaves (almost) nothing on disk, and an honest run beside it
//! completes.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use tonic::Code;

/// Bytes of the coordinator's state database (with its write-ahead log) and audit log.
fn footprint(c: &Coordinator) -> u64 {
    ["state.db", "state.db-wal", "audit.jsonl"]
        .iter()
        .filter_map(|f| std::fs::metadata(c.data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_headers_and_reports_are_refused_without_a_trace() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let mut hostile = RawSite::register(&fed.coordinator, "hostile").await;
    let run = create_run(
        &mut client,
        &breast_cancer_spec("beside-an-attack", 3, 2, 60),
    )
    .await;
    let task = hostile.next_task().await;
    assert_eq!(task.kind, v1::TaskKind::Train as i32);
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    let before = footprint(&fed.coordinator);

    // Twenty uploads each naming a 1 MB run id (and, once, newlines and terminal escapes).
    for i in 0..20 {
        let mut header = hostile.header_for(&task, &bytes, 10);
        header.run_id = if i == 0 {
            format!("{}\n2026-12-02 INFO forged line \u{1b}[31m", task.run_id)
        } else {
            "x".repeat(1 << 20)
        };
        let refused = hostile.push_raw(header, bytes.clone(), 0).await;
        assert_eq!(code(refused), Code::InvalidArgument);
    }
    // A header for a future round with the largest attempt number.
    let mut future = task.clone();
    future.round = 99;
    future.attempt = u32::MAX;
    let header = hostile.header_for(&future, &bytes, 10);
    assert_eq!(
        code(hostile.push_raw(header, bytes.clone(), 0).await),
        Code::FailedPrecondition
    );
    // An evaluation with 60,000 metric names.
    let metrics = (0..60_000).map(|i| (format!("metric-{i}"), 0.5)).collect();
    let report = hostile
        .client
        .report_evaluation(hostile.req(v1::ReportEvaluationRequest {
            run_id: task.run_id.clone(),
            round: task.round,
            global_sha256: task.global_sha256.clone(),
            num_examples: 10,
            metrics,
        }))
        .await;
    assert_eq!(code(report), Code::InvalidArgument);
    // Registering 4 MB of column names.
    // (3 MB: under the message limit, so the coordinator itself has to refuse it.)
    let columns: Vec<String> = (0..150_000).map(|i| format!("column-{i:014}")).collect();
    let registered = hostile
        .client
        .register(v1::RegisterRequest {
            site: "hostile".into(),
            token: "hostile-secret-token-0123456789".into(),
            datasets: vec![v1::DatasetSchema {
                name: "breast_cancer".into(),
                columns,
                rows: 100,
            }],
            version: "test".into(),
            signing_public_key: vec![7; 32],
        })
        .await;
    assert_eq!(code(registered), Code::InvalidArgument);
    // More examples than the 10,000 rows the site registered (within the run's max_examples).
    let greedy = hostile.push(&task, &global, 500_000).await;
    let greedy = greedy.expect_err("more examples than rows");
    assert_eq!(greedy.code(), Code::InvalidArgument);
    assert!(
        greedy.message().contains("10000 rows"),
        "{}",
        greedy.message()
    );
    let grown = footprint(&fed.coordinator).saturating_sub(before);
    assert!(grown < 256 << 10, "state and audit grew by {grown} bytes");
    // Nothing was recorded for a round that is not open, and no counter wrapped.
    let store = fed.coordinator.store();
    assert!(store.site_results(&run, 99).expect("results").is_empty());
    assert_eq!(store.last_attempt(&run, 99).expect("attempts"), 0);

    // From here the hostile site declines whatever it is asked; the honest run completes and
    // every read call still works.
    hostile.fail(&task, "giving up").await;
    let declining = tokio::spawn(async move {
        loop {
            let task = hostile.next_task().await;
            hostile.fail(&task, "giving up").await;
        }
    });
    let detail = wait_for_completion(&mut client, &run).await;
    declining.abort();
    assert_eq!(detail.rounds.len(), 3);
    client
        .list_sites(v1::ListSitesRequest::default())
        .await
        .expect("sites are listed");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_asking_for_absurd_training_is_refused_naming_the_field() {
    let fed = Federation::start(1).await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("absurd", 1, 1, 60)
        .replace("local_epochs = 2", "local_epochs = 4294967295");
    let err = client
        .create_run(v1::CreateRunRequest { spec_toml: spec })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("training.local_epochs"),
        "{}",
        err.message()
    );
    fed.stop().await;
}
