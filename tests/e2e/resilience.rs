//! Sites that vanish and a coordinator that crashes do not stop a run.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_killed_mid_round_is_left_behind_at_the_deadline_and_offline_after_3s() {
    // Offline after 3 s of silence (default 30 s), so the run sees the site go within a few rounds.
    let fed = Federation::start_configured(2, true, |c| {
        c.heartbeat_interval_secs = 1;
        c.site_offline_after_secs = 3;
    })
    .await;
    let mut client = fed.coordinator.runs().await;
    let mut doomed = RawSite::register(&fed.coordinator, "doomed").await;
    let spec = breast_cancer_spec("site-dies", 3, 2, 4);
    let run = create_run(&mut client, &spec).await;
    // The doomed site takes its round-1 task and dies without answering.
    let task = doomed.next_task().await;
    assert_eq!(task.round, 1);
    drop(doomed);

    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    let first = &detail.rounds[0];
    assert_eq!((first.sites_selected, first.sites_reported), (3, 2));
    assert_eq!(first.attempts, 1);
    let missing: Vec<_> = first
        .sites
        .iter()
        .filter(|s| s.outcome() == medfl_proto::v1::SiteOutcome::Missing)
        .map(|s| s.site.as_str())
        .collect();
    assert_eq!(missing, vec!["doomed"]);
    // Once offline, it is no longer selected.
    let last = &detail.rounds[2];
    assert_eq!((last.sites_selected, last.sites_reported), (2, 2));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_killed_between_rounds_resumes_the_run() {
    let mut fed = Federation::start(3).await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("coordinator-dies", 4, 3, 10);
    let run = create_run(&mut client, &spec).await;
    let before = watch_until(&mut client, &run, |d| d.rounds.len() >= 2).await;
    let committed: Vec<String> = before
        .rounds
        .iter()
        .map(|r| r.global_sha256.clone())
        .collect();

    fed.coordinator.restart();
    // The sites reconnect on their own; the run resumes after its last committed round.
    let mut client = fed.coordinator.runs().await;
    let detail = wait_for_completion(&mut client, &run).await;
    let rounds: Vec<u32> = detail.rounds.iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![1, 2, 3, 4]);
    for (r, sha) in detail.rounds.iter().zip(&committed) {
        assert_eq!(&r.global_sha256, sha, "round {} was not redone", r.round);
    }
    assert!(detail.rounds.iter().all(|r| r.sites_reported == 3));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_needing_more_sites_than_are_online_is_refused_naming_the_offline_ones_after_2s() {
    // Offline after 2 s of silence (default 30 s), so a silent raw site goes offline quickly.
    let fed = Federation::start_configured(1, false, |c| {
        c.heartbeat_interval_secs = 1;
        c.site_offline_after_secs = 2;
    })
    .await;
    let mut client = fed.coordinator.runs().await;
    let silent = RawSite::register(&fed.coordinator, "silent").await;
    // Registered, then silent: poll until the coordinator lists it offline.
    let since = std::time::Instant::now();
    loop {
        let sites = client
            .list_sites(medfl_proto::v1::ListSitesRequest::default())
            .await
            .expect("sites")
            .into_inner()
            .sites;
        if sites.iter().any(|s| s.name == "silent" && !s.online) {
            break;
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(30),
            "the silent site never went offline"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let refused = client
        .create_run(medfl_proto::v1::CreateRunRequest {
            spec_toml: breast_cancer_spec("too-few-online", 1, 2, 60),
        })
        .await
        .expect_err("two sites required, one online");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let said = refused.message();
    assert!(
        said.contains("min_sites") && said.contains("only 1 of the 2") && said.contains("silent"),
        "{said}"
    );
    // With the one online site enough, the run goes ahead.
    let run = create_run(&mut client, &breast_cancer_spec("one-online", 1, 1, 60)).await;
    wait_for_completion(&mut client, &run).await;
    drop(silent);
    fed.stop().await;
}
