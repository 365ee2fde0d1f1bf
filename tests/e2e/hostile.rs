//! Clients that send what no honest site or researcher would, on the shipped defaults: each is
//! refused with a clear status, leaves (almost) nothing on disk, and an honest run beside it
//! completes.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use tonic::Code;

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
    let before = fed.coordinator.footprint();

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
    let grown = fed.coordinator.footprint().saturating_sub(before);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_refused_uploads_are_counted_not_stored() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let mut hostile = RawSite::register(&fed.coordinator, "hostile").await;
    let run = create_run(
        &mut client,
        &breast_cancer_spec("beside-a-spammer", 2, 2, 120),
    )
    .await;
    let task = hostile.next_task().await;
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    let wal_file = fed.coordinator.data_dir.join("state.db-wal");
    let before_main =
        fed.coordinator.footprint() - std::fs::metadata(&wal_file).map_or(0, |m| m.len());

    // 5,000 uploads to the open attempt, each signed with a key that is not the site's.
    const SPAM: u64 = 5_000;
    let wrong = medfl_e2e::raw::new_key();
    for _ in 0..SPAM {
        let mut header = hostile.header_for(&task, &bytes, 10);
        hostile.sign_with(&mut header, Some(&wrong));
        let refused = hostile.push_raw(header, bytes.clone(), 0).await;
        assert_eq!(code(refused), Code::PermissionDenied);
    }
    // The database and the audit log grow by a counter and four audit lines; the write-ahead
    // log is checkpointed and reused, so it stays within its ceiling of 1,000 pages.
    let wal =
        |c: &Coordinator| std::fs::metadata(c.data_dir.join("state.db-wal")).map_or(0, |m| m.len());
    let grown = (fed.coordinator.footprint() - wal(&fed.coordinator)).saturating_sub(before_main);
    assert!(grown < 256 << 10, "state and audit grew by {grown} bytes");
    let wal_now = wal(&fed.coordinator);
    assert!(wal_now <= 4200 << 10, "the WAL holds {wal_now} bytes");
    // Logged and audited at 1, 10, 100 and 1,000, not 5,000 times.
    let audit =
        std::fs::read_to_string(fed.coordinator.data_dir.join("audit.jsonl")).expect("audit");
    let audited = audit
        .lines()
        .filter(|l| l.contains("update_refused"))
        .count();
    assert!((1..=8).contains(&audited), "{audited} refusals audited");

    hostile.fail(&task, "giving up").await;
    let declining = tokio::spawn(async move {
        loop {
            let task = hostile.next_task().await;
            hostile.fail(&task, "giving up").await;
        }
    });
    let detail = wait_for_completion(&mut client, &run).await;
    declining.abort();
    // The researcher sees one counted refusal, not 5,000 rows.
    let refused: Vec<_> = detail.rounds[0]
        .sites
        .iter()
        .filter(|s| s.site == "hostile" && s.outcome() == v1::SiteOutcome::Refused)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].count, SPAM);
    assert!(refused[0].reason.contains("signature"), "{refused:?}");
    let fetched = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: 1,
        })
        .await
        .expect("the run is still readable")
        .into_inner();
    assert!(prost::Message::encoded_len(&fetched) < 64 << 10);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_sites_are_listed_a_page_at_a_time() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    // Up (its state created), then down while the sites are written.
    coordinator
        .runs()
        .await
        .list_sites(v1::ListSitesRequest::default())
        .await
        .expect("up");
    coordinator.kill();
    {
        // Sites registered over time (written to the store the coordinator reloads at start),
        // each with 400 long column names: some 100 MB of names in all.
        let store = coordinator.store();
        let columns: Vec<String> = (0..400)
            .map(|i| format!("a-rather-long-column-name-{i:04}"))
            .collect();
        for i in 0..10_000 {
            store
                .upsert_site(&medfl_coordinator::store::SiteRecord {
                    name: format!("hospital-{i:05}"),
                    token_sha256: "00".repeat(32),
                    datasets: vec![medfl_core::spec::DatasetInfo {
                        name: "notes".into(),
                        columns: columns.clone(),
                    }],
                    registered_ms: 1,
                    last_seen_ms: 1,
                    signing_key: vec![7; 32],
                })
                .expect("site stored");
        }
    }
    coordinator.restart();
    let mut client = coordinator.runs().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sites(v1::ListSitesRequest {
                page_size: 0,
                page_token,
            })
            .await
            .expect("a page fits the message limit")
            .into_inner();
        assert!(prost::Message::encoded_len(&page) < 4 << 20);
        assert!(!page.sites.is_empty());
        seen.extend(page.sites.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let want: Vec<String> = (0..10_000).map(|i| format!("hospital-{i:05}")).collect();
    assert_eq!(seen, want);
    // A page token is a name from the network: bounded like one.
    let bad = client
        .list_sites(v1::ListSitesRequest {
            page_size: 0,
            page_token: "x".repeat(1 << 20),
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
    coordinator.stop().await;
}

/// A client of researcher or operator `name`.
async fn client_as(
    c: &Coordinator,
    role: medfl_pki::Role,
    name: &str,
) -> v1::run_service_client::RunServiceClient<tonic::transport::Channel> {
    v1::run_service_client::RunServiceClient::new(c.channel_as(role, name).await)
}

async fn create(
    client: &mut v1::run_service_client::RunServiceClient<tonic::transport::Channel>,
    spec: String,
) -> Result<String, tonic::Status> {
    client
        .create_run(v1::CreateRunRequest { spec_toml: spec })
        .await
        .map(|r| r.into_inner().run_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_belong_to_their_creator_and_quotas_bound_each_researcher() {
    use medfl_pki::Role;
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    // A site that holds the data and never trains: runs wait for it.
    let _site = RawSite::register(&coordinator, "idle").await;
    let mut r1 = coordinator.runs().await;
    let mut r2 = client_as(&coordinator, Role::Researcher, "r2").await;
    let mut ops = client_as(&coordinator, Role::Operator, "ops").await;
    let spec = |name: &str| breast_cancer_spec(name, 3, 1, 600);

    // Four runs at once is the default quota; the fifth is refused, naming the key.
    let mut mine = Vec::new();
    for i in 0..4 {
        mine.push(
            create(&mut r1, spec(&format!("r1-{i}")))
                .await
                .expect("within quota"),
        );
    }
    let err = create(&mut r1, spec("r1-4")).await.expect_err("over quota");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("quota_concurrent_runs"),
        "{}",
        err.message()
    );
    // Runs record their creator.
    let listed = r2
        .list_runs(v1::ListRunsRequest {})
        .await
        .expect("runs")
        .into_inner();
    assert!(listed
        .runs
        .iter()
        .all(|r| r.creator == RESEARCHER && r.creator_role == "researcher"));

    // Another researcher may neither stop nor evaluate them.
    let stop = |id: &str| v1::StopRunRequest { run_id: id.into() };
    let err = r2.stop_run(stop(&mine[0])).await.expect_err("not r2's run");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(RESEARCHER) && err.message().contains("r2"),
        "{}",
        err.message()
    );
    let err = r2
        .evaluate_run(v1::EvaluateRunRequest {
            run_id: mine[0].clone(),
        })
        .await
        .expect_err("not r2's run");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // An operator may, and the creator may; the audit log says who.
    ops.stop_run(stop(&mine[0]))
        .await
        .expect("an operator stops any run");
    r1.stop_run(stop(&mine[1]))
        .await
        .expect("the creator stops its own run");
    let audit = std::fs::read_to_string(coordinator.data_dir.join("audit.jsonl")).expect("audit");
    let stops: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("run_stop_requested"))
        .collect();
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(
        stops[0].contains(&mine[0]) && stops[0].contains("\"by\":\"ops\""),
        "{}",
        stops[0]
    );
    assert!(stops[1].contains(&mine[1]) && stops[1].contains(&format!("\"by\":\"{RESEARCHER}\"")));
    // With two of its runs ended, r1 may start another.
    create(&mut r1, spec("r1-5")).await.expect("room again");

    // Parameters per run: 30 -> 20000 -> 20000 -> 2 is 400 million, over 2^28.
    let huge = spec("huge").replace("hidden = []", "hidden = [20000, 20000]");
    let err = create(&mut r2, huge)
        .await
        .expect_err("too many parameters");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("quota_parameters_per_run"),
        "{}",
        err.message()
    );
    // Model bytes: 68 MB of F32 kept over 2,000 rounds is far past 64 GiB.
    let long =
        breast_cancer_spec("long", 2000, 1, 600).replace("hidden = []", "hidden = [4096, 4096]");
    let err = create(&mut r2, long).await.expect_err("too many bytes");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("quota_blob_bytes"),
        "{}",
        err.message()
    );
    // Each researcher has a quota of their own.
    create(&mut r2, spec("r2-0"))
        .await
        .expect("r2 has its own quota");
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_researchers_open_watch_ends_within_seconds() {
    use medfl_pki::Role;
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let _site = RawSite::register(&coordinator, "idle").await;
    let mut leaver = client_as(&coordinator, Role::Researcher, "leaver").await;
    let run = create(&mut leaver, breast_cancer_spec("watched", 3, 1, 600))
        .await
        .expect("created");
    let mut stream = leaver
        .watch_run(v1::GetRunRequest {
            run_id: run.clone(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    stream
        .message()
        .await
        .expect("first detail")
        .expect("a detail");
    let pki = coordinator.pki.as_ref().expect("TLS");
    medfl_pki::Ca::open(&pki.ca_dir())
        .and_then(|mut ca| ca.revoke("leaver"))
        .expect("revoked");
    let revoked_at = std::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the watch ended within seconds of the revocation");
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("leaver"), "{}", ended.message());
    assert!(revoked_at.elapsed() < std::time::Duration::from_secs(5));
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_without_a_policy_refuses_a_batch_of_one() {
    let fed = Federation::start(1).await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("one-row-batches", 1, 1, 30)
        .replace("batch_size = 16", "batch_size = 1");
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_end(&mut client, &run).await;
    assert_eq!(status(&detail), v1::RunStatus::Failed as i32, "{detail:?}");
    // The hospital's audit log says why, naming the policy key.
    let audit = std::fs::read_to_string(fed.dir.path().join("hospital-0").join("audit.jsonl"))
        .expect("site audit");
    let refused = audit
        .lines()
        .find(|l| l.contains("task_failed") && l.contains(&run))
        .unwrap_or_else(|| panic!("no refusal audited: {audit}"));
    assert!(refused.contains("policy.min_batch_size"), "{refused}");
    fed.stop().await;
}

/// An upload that sends its header and then whatever comes down the returned sender, as
/// slowly as the test likes; its answer comes on `answers`, tagged `tag`.
fn trickle(
    hostile: &RawSite,
    header: v1::UpdateHeader,
    tag: usize,
    answers: tokio::sync::mpsc::UnboundedSender<(
        usize,
        Result<v1::PushUpdateResponse, tonic::Status>,
    )>,
) -> tokio::sync::mpsc::Sender<Vec<u8>> {
    let (body, arriving) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let first = v1::UpdateChunk {
        part: Some(v1::update_chunk::Part::Header(header)),
    };
    let rest = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(arriving),
        |data| v1::UpdateChunk {
            part: Some(v1::update_chunk::Part::Data(data)),
        },
    );
    let messages = tokio_stream::StreamExt::chain(tokio_stream::iter([first]), rest);
    let mut client = hostile.client.clone();
    let request = hostile.req(messages);
    tokio::spawn(async move {
        let answer = client
            .push_update(request)
            .await
            .map(tonic::Response::into_inner);
        let _ = answers.send((tag, answer));
    });
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_uploads_one_at_a_time_and_a_trickle_is_cut_while_honest_sites_upload() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let mut hostile = RawSite::register(&fed.coordinator, "hostile").await;
    let run = create_run(
        &mut client,
        &breast_cancer_spec("beside-a-trickle", 1, 2, 120),
    )
    .await;
    let task = hostile.next_task().await;
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);

    // Eight uploads at once from one site: one is received, seven are refused at once.
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let mut bodies: Vec<Option<_>> = (0..8)
        .map(|i| {
            Some(trickle(
                &hostile,
                hostile.header_for(&task, &bytes, 10),
                i,
                answers.clone(),
            ))
        })
        .collect();
    for _ in 0..7 {
        let (i, answer) = tokio::time::timeout(std::time::Duration::from_secs(20), answered.recv())
            .await
            .expect("refused without delay")
            .expect("an answer");
        let status = answer.expect_err("a second upload of one site");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        bodies[i] = None;
    }
    let body = bodies
        .into_iter()
        .flatten()
        .next()
        .expect("one upload holds the site's slot");

    // The one received sends a byte every 2 s: it is cut when its time runs out (the idle
    // timeout, 30 s, for an update this small), while the honest sites upload beside it.
    let started = std::time::Instant::now();
    let dripping = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
        for b in bytes {
            every.tick().await;
            if body.send(vec![b]).await.is_err() {
                return;
            }
        }
    });
    let (_, cut) = answered.recv().await.expect("the trickle's answer");
    let cut = cut.expect_err("a trickle is cut");
    dripping.abort();
    assert_eq!(cut.code(), Code::InvalidArgument, "{cut:?}");
    assert!(cut.message().contains("too slow"), "{}", cut.message());
    assert!(started.elapsed() < std::time::Duration::from_secs(40));
    // The honest sites' updates were taken meanwhile; once the hostile site gives up, the round
    // closes without waiting out its deadline.
    // (It then declines the final evaluation too, so the run ends without waiting for it.)
    hostile.fail(&task, "giving up").await;
    let declining = tokio::spawn(async move {
        loop {
            let task = hostile.next_task().await;
            hostile.fail(&task, "giving up").await;
        }
    });
    let detail = wait_for_completion(&mut client, &run).await;
    declining.abort();
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let accepted = detail.rounds[0]
        .sites
        .iter()
        .filter(|s| s.outcome() == v1::SiteOutcome::Accepted)
        .count();
    assert_eq!(accepted, 2, "{detail:?}");
    fed.stop().await;
}
