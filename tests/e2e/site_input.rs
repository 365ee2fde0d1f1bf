//! A site's own bad data: unreadable files stop the site at start, naming file and line; data
//! that does not fit a run is reported to the coordinator as the site's failure, and the run
//! goes on with the others.

use medfl_e2e::*;

#[tokio::test]
async fn a_malformed_csv_stops_the_site_at_start_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("broken.csv");
    std::fs::write(&csv, "a,b,diagnosis\n1,2,M\n3,4\n5,6,B\n").expect("csv");
    // No coordinator at all: the data is checked before the site dials out.
    let config = site_config_at(
        "broken",
        "http://127.0.0.1:9",
        &dir.path().join("site"),
        None,
        &format!("[datasets.breast_cancer]\npath = \"{}\"\n", csv.display()),
    );
    let err = medfl_site::run(config, std::future::pending())
        .await
        .expect_err("a broken CSV must stop the site");
    let msg = err.to_string();
    assert!(msg.contains("broken.csv:3"), "{msg}");

    let config = site_config_at(
        "missing",
        "http://127.0.0.1:9",
        &dir.path().join("site2"),
        None,
        &format!(
            "[datasets.breast_cancer]\npath = \"{}\"\n",
            dir.path().join("nowhere.csv").display()
        ),
    );
    let msg = medfl_site::run(config, std::future::pending())
        .await
        .expect_err("a missing file must stop the site")
        .to_string();
    assert!(msg.contains("nowhere.csv"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_with_an_unknown_label_fails_its_task_and_the_run_goes_on() {
    let mut fed = Federation::start(2).await;
    // A third hospital whose file has a label the run does not know, on line 4.
    let csv = fed.dir.path().join("odd.csv");
    let text = std::fs::read_to_string(breast_cancer_csv()).expect("data");
    let mut lines: Vec<String> = text.lines().take(40).map(String::from).collect();
    lines[3] = lines[3].replace(",M", ",X").replace(",B", ",X");
    std::fs::write(&csv, lines.join("\n") + "\n").expect("csv");
    let mut odd = Site::start(site_config(
        "odd",
        &fed.coordinator,
        &fed.dir.path().join("odd"),
        &csv,
    ));
    odd.registered(1).await;
    fed.sites.push(odd);

    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("odd-site", 2, 2, 60)).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let first = &detail.rounds[0];
    assert_eq!(first.sites_reported, 2);
    let failed = first
        .sites
        .iter()
        .find(|s| s.site == "odd")
        .expect("the odd site's result");
    assert_eq!(failed.outcome(), medfl_proto::v1::SiteOutcome::Failed);
    assert!(
        failed.reason.contains("odd.csv:4") && failed.reason.contains("unknown label `X`"),
        "{}",
        failed.reason
    );
    // Only the file's name leaves the hospital, never where it keeps it.
    let dir = fed.dir.path().to_str().expect("utf-8");
    assert!(!failed.reason.contains(dir), "{}", failed.reason);

    // The coordinator also answers the standard gRPC health check.
    let channel = fed
        .coordinator
        .channel_as(medfl_pki::Role::Researcher, RESEARCHER)
        .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "medfl.v1.SiteService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    fed.stop().await;
}
