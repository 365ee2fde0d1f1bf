//! Hostile or careless researchers: absurd specs, other researchers' runs, quotas, watching
//! after revocation, and reading a federation of 10,000 sites.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use tonic::Code;

use crate::{code, Footprint};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_asking_for_absurd_training_is_refused_naming_the_field() {
    let _turn = crate::turn().await;
    let fed = Federation::start(1).await;
    let mut client = fed.coordinator.runs().await;
    let before = Footprint::of(&fed.coordinator);
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
    // Nothing of it was kept, and a sane spec runs to completion.
    let runs = client
        .list_runs(v1::ListRunsRequest {})
        .await
        .expect("runs");
    assert!(runs.into_inner().runs.is_empty());
    let honest = create_run(&mut client, &breast_cancer_spec("sane", 2, 1, 60)).await;
    wait_for_completion(&mut client, &honest).await;
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_sites_are_listed_a_page_at_a_time() {
    let _turn = crate::turn().await;
    let mut fed = Federation::start(2).await;
    // Down while 10,000 more sites are written to the store it reloads at start, each with 400
    // long column names: some 100 MB of names in all.
    fed.coordinator.kill();
    {
        let store = fed.coordinator.store();
        let columns: Vec<String> = (0..400)
            .map(|i| format!("a-rather-long-column-name-{i:04}"))
            .collect();
        for i in 0..10_000 {
            store
                .upsert_site(&medfl_coordinator::store::SiteRecord {
                    name: format!("stored-{i:05}"),
                    token_sha256: "00".repeat(32),
                    datasets: vec![medfl_core::spec::DatasetInfo {
                        name: "notes".into(),
                        columns: columns.clone(),
                    }],
                    registered_ms: 1,
                    last_seen_ms: 1,
                    signing_key: vec![7; 32],
                    rows: Default::default(),
                    classes: Default::default(),
                })
                .expect("site stored");
        }
    }
    fed.coordinator.restart();
    let mut client = fed.coordinator.runs().await;
    let before = Footprint::of(&fed.coordinator);
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
    let want: Vec<String> = ["hospital-0".to_string(), "hospital-1".to_string()]
        .into_iter()
        .chain((0..10_000).map(|i| format!("stored-{i:05}")))
        .collect();
    assert_eq!(seen, want);
    // A page token is a name from the network: bounded like one.
    let bad = client
        .list_sites(v1::ListSitesRequest {
            page_size: 0,
            page_token: "x".repeat(1 << 20),
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
    // The two hospitals online among 10,000 offline sites run a federation as before.
    let honest = create_run(&mut client, &breast_cancer_spec("among-many", 2, 2, 60)).await;
    let detail = wait_for_completion(&mut client, &honest).await;
    assert!(detail.rounds.iter().all(|r| r.sites_reported == 2));
    before.assert_grew_less_than(&fed.coordinator, 256 << 10, 96 << 20);
    fed.stop().await;
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
    let _turn = crate::turn().await;
    let fed = Federation::start(1).await;
    let coordinator = &fed.coordinator;
    let before = Footprint::of(coordinator);
    // A site that holds the data and never trains: runs wait for it.
    let site = RawSite::register(coordinator, "idle").await;
    let mut r1 = coordinator.runs().await;
    let mut r2 = client_as(coordinator, Role::Researcher, "r2").await;
    let mut ops = client_as(coordinator, Role::Operator, "ops").await;
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
    let honest = create(&mut r2, spec("r2-0"))
        .await
        .expect("r2 has its own quota");
    before.assert_grew_less_than(coordinator, 256 << 10, 96 << 20);
    // Once the idle site declines, r2's run (and r1's) complete.
    let declining = crate::declining(site);
    wait_for_completion(&mut r2, &honest).await;
    declining.abort();
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_researchers_open_watch_ends_within_seconds() {
    use medfl_pki::Role;
    let _turn = crate::turn().await;
    let fed = Federation::start(1).await;
    let coordinator = &fed.coordinator;
    let before = Footprint::of(coordinator);
    let site = RawSite::register(coordinator, "idle").await;
    let mut leaver = client_as(coordinator, Role::Researcher, "leaver").await;
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
    before.assert_grew_less_than(coordinator, 256 << 10, 96 << 20);
    // Another researcher's run completes once the idle site declines.
    let declining = crate::declining(site);
    let mut client = coordinator.runs().await;
    let honest = create_run(
        &mut client,
        &breast_cancer_spec("beside-a-revocation", 2, 1, 60),
    )
    .await;
    wait_for_completion(&mut client, &honest).await;
    declining.abort();
    fed.stop().await;
}
