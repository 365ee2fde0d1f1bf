//! Hostile sites: headers, reports and registrations no honest site sends, floods of refused
//! uploads, uploads that hog the coordinator, and a batch of one.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use tonic::Code;

use crate::{code, Attack, Footprint};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_headers_and_reports_are_refused_without_a_trace() {
    let _turn = crate::turn().await;
    let Attack {
        fed,
        mut client,
        mut hostile,
        run,
        task,
    } = Attack::beside("beside-an-attack", 3).await;
    assert_eq!(task.kind, v1::TaskKind::Train as i32);
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    let before = Footprint::of(&fed.coordinator);

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
    let report = crate::report_metrics(&mut hostile, &task, 60_000).await;
    assert_eq!(report, Code::InvalidArgument);
    // Registering 4 MB of column names.
    // (3 MB: under the message limit, so the coordinator itself has to refuse it.)
    let registered = crate::register_columns(&mut hostile, 150_000).await;
    assert_eq!(registered, Code::InvalidArgument);
    // More examples than the 10,000 rows the site registered (within the run's max_examples).
    let greedy = hostile.push(&task, &global, 500_000).await;
    let greedy = greedy.expect_err("more examples than rows");
    assert_eq!(greedy.code(), Code::InvalidArgument);
    assert!(
        greedy.message().contains("10000 rows"),
        "{}",
        greedy.message()
    );
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    // Nothing was recorded for a round that is not open, and no counter wrapped.
    let store = fed.coordinator.store();
    assert!(store.site_results(&run, 99).expect("results").is_empty());
    assert_eq!(store.last_attempt(&run, 99).expect("attempts"), 0);

    // From here the hostile site declines whatever it is asked; the honest run completes and
    // every read call still works.
    let detail =
        crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    client
        .list_sites(v1::ListSitesRequest::default())
        .await
        .expect("sites are listed");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_refused_uploads_are_counted_not_stored() {
    let _turn = crate::turn().await;
    let Attack {
        fed,
        mut client,
        mut hostile,
        run,
        task,
    } = Attack::beside("beside-a-spammer", 2).await;
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    let wal_file = fed.coordinator.data_dir.join("state.db-wal");
    let before_main =
        fed.coordinator.footprint() - std::fs::metadata(&wal_file).map_or(0, |m| m.len());
    let before = Footprint::of(&fed.coordinator);

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
    before.assert_grew_less_than(&fed.coordinator, 4608 << 10, 96 << 20);

    let detail =
        crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
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
async fn a_site_without_a_policy_refuses_a_batch_of_one() {
    let _turn = crate::turn().await;
    let fed = Federation::start(1).await;
    let mut client = fed.coordinator.runs().await;
    let before = Footprint::of(&fed.coordinator);
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
    // The same site trains a run with batches of 16.
    let honest = create_run(&mut client, &breast_cancer_spec("batches-of-16", 2, 1, 60)).await;
    wait_for_completion(&mut client, &honest).await;
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
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
    let _turn = crate::turn().await;
    let Attack {
        fed,
        mut client,
        mut hostile,
        run,
        task,
    } = Attack::beside("beside-a-trickle", 1).await;
    let global = hostile.download(&task.global_sha256).await;
    let bytes = medfl_core::safetensors::encode(&global);
    let before = Footprint::of(&fed.coordinator);

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
    let detail =
        crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let accepted = detail.rounds[0]
        .sites
        .iter()
        .filter(|s| s.outcome() == v1::SiteOutcome::Accepted)
        .count();
    assert_eq!(accepted, 2, "{detail:?}");
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_with_a_hundred_thousand_refusals_stays_readable_and_watchable() {
    let _turn = crate::turn().await;
    let Attack {
        fed,
        mut client,
        hostile,
        run,
        task,
    } = Attack::beside("read-after-a-flood", 2).await;
    // 100,000 refusals of the open attempt, each from a site of its own so that none is folded
    // into another's counter: far more stored detail than any reply can carry.
    {
        let store = fed.coordinator.store();
        for i in 0..100_000u64 {
            store
                .add_refusal(
                    &run,
                    task.round,
                    task.attempt,
                    &format!("spammer-{i:06}"),
                    "bad signature",
                    i,
                )
                .expect("refusal stored");
        }
    }
    let before = Footprint::of(&fed.coordinator);
    let detail = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: task.round,
        })
        .await
        .expect("the run is readable")
        .into_inner();
    assert!(prost::Message::encoded_len(&detail) < 4 << 20);
    let mut watch = client
        .watch_run(v1::GetRunRequest {
            run_id: run.clone(),
            ..Default::default()
        })
        .await
        .expect("the run is watchable")
        .into_inner();
    let first = watch
        .message()
        .await
        .expect("a watch update")
        .expect("a detail");
    assert!(prost::Message::encoded_len(&first) < 4 << 20);
    let done = crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
    assert_eq!(done.rounds.len(), 2);
    // The round's 100,002 results are summarised: what fits, and how many were left out.
    let detail = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: 1,
        })
        .await
        .expect("the run is readable")
        .into_inner();
    assert!(prost::Message::encoded_len(&detail) < 4 << 20);
    let first = &detail.rounds[0];
    assert!(first.sites_omitted > 0, "{first:?}");
    assert_eq!(first.sites.len() + first.sites_omitted as usize, 100_003);
    // The hospitals' own outcomes come before the flood of refusals.
    assert!(
        first.sites[..2]
            .iter()
            .all(|s| s.site.starts_with("hospital-") && s.outcome() == v1::SiteOutcome::Accepted),
        "{:?}",
        &first.sites[..3]
    );
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_examples_than_registered_rows_are_refused_after_a_coordinator_restart() {
    let _turn = crate::turn().await;
    let mut fed = Federation::start(2).await;
    let mut hostile = RawSite::register(&fed.coordinator, "hostile").await;
    // The coordinator restarts; the hospitals register again, the hostile site does not, so
    // only the rows it registered before (10,000) stand between its claim and the average.
    fed.coordinator.restart();
    for site in &mut fed.sites {
        site.registered(2).await;
    }
    // It is online again (a heartbeat; its first call may meet the connection the restart
    // cut, as a daemon's would, and is made again), so the run selects it.
    let mut beats = 0;
    while let Err(e) = hostile
        .client
        .heartbeat(hostile.req(v1::HeartbeatRequest::default()))
        .await
    {
        beats += 1;
        assert!(beats < 100, "no heartbeat after a restart: {e:?}");
        tokio::task::yield_now().await;
    }
    let mut client = fed.coordinator.runs().await;
    let run = create_run(
        &mut client,
        &breast_cancer_spec("after-a-restart", 2, 2, 120),
    )
    .await;
    let before = Footprint::of(&fed.coordinator);
    let task = hostile.next_task().await;
    let global = hostile.download(&task.global_sha256).await;
    let greedy = hostile
        .push(&task, &global, 500_000)
        .await
        .expect_err("more examples than rows");
    assert_eq!(greedy.code(), Code::InvalidArgument, "{greedy:?}");
    assert!(
        greedy.message().contains("10000 rows"),
        "{}",
        greedy.message()
    );
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    let detail =
        crate::declined_until_complete(hostile, &task, "giving up", &mut client, &run).await;
    assert_eq!(detail.rounds.len(), 2);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reason_forging_log_lines_reaches_the_log_escaped() {
    let _turn = crate::turn().await;
    let Attack {
        fed,
        mut client,
        hostile,
        run,
        task,
    } = Attack::beside("beside-a-forger", 2).await;
    let before = Footprint::of(&fed.coordinator);
    // A failure reason that would start a line of its own, and clear the operator's screen.
    let reason = format!(
        "out of memory\n2026-12-07T10:00:00Z  INFO run stopped by=admin {}\u{1b}[2J",
        crate::FORGED
    );
    let detail = crate::declined_until_complete(hostile, &task, &reason, &mut client, &run).await;
    assert_eq!(detail.rounds.len(), 2);
    let log = crate::forged_log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(crate::FORGED)).collect();
    assert!(!lines.is_empty(), "the reason was not logged");
    for line in &lines {
        assert!(
            !line.contains("T10:00:00Z") || line.contains("memory"),
            "a forged line of its own: {line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "a terminal escape reached the log: {line}"
        );
    }
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-07T10:00:00Z")),
        "{log}"
    );
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    fed.stop().await;
}
