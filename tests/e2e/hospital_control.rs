//! What hospitals do in the middle of a run, on the shipped defaults: pause a site while it
//! trains and resume it, and approve a run that is already waiting for their site.

use std::path::Path;
use std::time::Duration;

use medfl_e2e::*;
use medfl_proto::v1;
use medfl_site::policy::{Approvals, Decision};

/// Waits (bounded by [`RUN_TIMEOUT`]) until `check` holds for the file state at `dir`; the
/// site daemon writes these files, and the test has no other signal to follow.
async fn until_site_state(dir: &Path, what: &str, check: impl Fn(&Path) -> bool) {
    let mut every = tokio::time::interval(Duration::from_millis(20));
    tokio::time::timeout(RUN_TIMEOUT, async {
        loop {
            every.tick().await;
            if check(dir) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not seen in time"));
}

fn audit_lines(site_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(site_dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// A wide network, so a round's training lasts long enough to be paused in the middle.
fn slow_spec(name: &str, rounds: u32) -> String {
    breast_cancer_spec(name, rounds, 1, 120)
        .replace("hidden = []", "hidden = [768, 768]")
        .replace("local_epochs = 2", "local_epochs = 12")
}

/// Two sites holding `csvs`: `open`, and `careful`, whose hospital approves every new run.
async fn open_and_careful_sites(
    coordinator: &Coordinator,
    dir: &Path,
    csvs: &[std::path::PathBuf],
) -> Vec<Site> {
    let mut sites = Vec::new();
    for (name, (csv, policy)) in ["open", "careful"]
        .iter()
        .zip(csvs.iter().zip(["", "[policy]\nrequire_approval = true\n"]))
    {
        let tables = format!(
            "{policy}\n[datasets.breast_cancer]\npath = \"{}\"\n",
            csv.display()
        );
        let mut site = Site::start(site_config_with(
            name,
            coordinator,
            &dir.join(name),
            &tables,
        ));
        site.registered(1).await;
        sites.push(site);
    }
    sites
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_paused_mid_training_and_resumed_trains_the_next_round() {
    let fed = Federation::start(2).await;
    let site_dir = fed.dir.path().join("hospital-0");
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &slow_spec("paused-mid-run", 3)).await;
    // Training starts right after the model arrives: pause then.
    until_site_state(&site_dir, "round 1's model at the site", |d| {
        audit_lines(d)
            .iter()
            .any(|l| l.contains("model_received") && l.contains(&run))
    })
    .await;
    medfl_site::policy::set_paused(&site_dir, Some("maintenance")).expect("pause");
    let first = watch_until(&mut client, &run, |d| !d.rounds.is_empty()).await;
    let paused = first.rounds[0]
        .sites
        .iter()
        .find(|s| s.site == "hospital-0")
        .expect("hospital-0 in round 1");
    assert_eq!(paused.outcome(), v1::SiteOutcome::Paused, "{paused:?}");
    let lines_when_paused = audit_lines(&site_dir).len();
    medfl_site::policy::set_paused(&site_dir, None).expect("resume");

    let detail = wait_for_completion(&mut client, &run).await;
    let last = detail.rounds.last().expect("rounds");
    let resumed = last
        .sites
        .iter()
        .find(|s| s.site == "hospital-0")
        .expect("hospital-0 in the last round");
    assert_eq!(resumed.outcome(), v1::SiteOutcome::Accepted, "{resumed:?}");
    assert!(
        detail.rounds.iter().all(|r| r.attempts == 1),
        "no round waited out its deadline: {:?}",
        detail.rounds.iter().map(|r| r.attempts).collect::<Vec<_>>()
    );
    // A handful of lines a round, not a hot loop.
    let grown = audit_lines(&site_dir).len() - lines_when_paused;
    assert!(grown < 40, "the site audit log grew by {grown} lines");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_awaiting_approval_holds_its_place_and_trains_once_approved() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 2);
    let sites = open_and_careful_sites(&coordinator, dir.path(), &csvs).await;
    let careful = dir.path().join("careful");
    let mut client = coordinator.runs().await;
    // Both sites are needed: the run must wait for the hospital rather than fail.
    let run = create_run(
        &mut client,
        &breast_cancer_spec("needs-approval", 2, 2, 120),
    )
    .await;
    until_site_state(&careful, "the run in the approval queue", |d| {
        Approvals::load(d).is_ok_and(|q| q.runs.contains_key(&run))
    })
    .await;
    let detail = watch_until(&mut client, &run, |_| true).await;
    assert_eq!(status(&detail), v1::RunStatus::Running as i32, "{detail:?}");
    // `medfl-site approve RUN`, while round 1 waits.
    Approvals::decide(&careful, &run, Decision::Approved, "").expect("approve");

    let detail = wait_for_completion(&mut client, &run).await;
    let first = &detail.rounds[0];
    assert_eq!(first.attempts, 1, "{first:?}");
    assert_eq!(first.sites_reported, 2, "{first:?}");
    for site in ["open", "careful"] {
        assert!(
            first
                .sites
                .iter()
                .any(|s| s.site == site && s.outcome() == v1::SiteOutcome::Accepted),
            "{site} in round 1: {first:?}"
        );
    }
    for site in sites {
        site.stop().await;
    }
    coordinator.stop().await;
}

/// A run stopped while it waits for a hospital's approval leaves that hospital's queue: the
/// site learns it ended from its heartbeat, and approving it is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_ended_while_awaiting_approval_leaves_the_queue() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 2);
    let sites = open_and_careful_sites(&coordinator, dir.path(), &csvs).await;
    let careful = dir.path().join("careful");
    let mut client = coordinator.runs().await;
    let run = create_run(
        &mut client,
        &breast_cancer_spec("never-approved", 2, 2, 120),
    )
    .await;
    until_site_state(&careful, "the run in the approval queue", |d| {
        Approvals::load(d).is_ok_and(|q| q.waiting().contains(&run))
    })
    .await;
    client
        .stop_run(v1::StopRunRequest {
            run_id: run.clone(),
        })
        .await
        .expect("stop");
    until_site_state(&careful, "the run marked ended", |d| {
        Approvals::load(d).is_ok_and(|q| q.runs.get(&run).is_some_and(|a| a.ended))
    })
    .await;
    assert!(Approvals::load(&careful)
        .expect("queue")
        .waiting()
        .is_empty());
    let err = Approvals::decide(&careful, &run, Decision::Approved, "")
        .expect_err("approving an ended run")
        .to_string();
    assert!(err.contains("has ended at the coordinator"), "{err}");
    for site in sites {
        site.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hospital_approves_a_run_by_name_before_it_arrives() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 2);
    let careful = dir.path().join("careful");
    // `medfl-site approve ahead-of-time` before the run exists.
    Approvals::decide_name(&careful, "ahead-of-time", Decision::Approved, "")
        .expect("an approval ahead of time");
    let sites = open_and_careful_sites(&coordinator, dir.path(), &csvs).await;
    let mut client = coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("ahead-of-time", 2, 2, 120)).await;
    let detail = wait_for_completion(&mut client, &run).await;
    for round in &detail.rounds {
        assert_eq!(round.sites_reported, 2, "{round:?}");
        assert_eq!(round.attempts, 1, "{round:?}");
    }
    // The approval is now bound to the run and the spec it came with.
    let queue = Approvals::load(&careful).expect("queue");
    let entry = &queue.runs[&run];
    assert_eq!(entry.decision, Decision::Approved);
    assert_eq!(
        entry.spec_sha256,
        medfl_site::policy::spec_sha256(&breast_cancer_spec("ahead-of-time", 2, 2, 120))
    );
    for site in sites {
        site.stop().await;
    }
    coordinator.stop().await;
}
