//! The hospital decides: a run outside a site's policy is refused there with the reason the
//! researcher sees, a site requiring approval keeps a run out until the hospital approves it, and
//! a paused site does nothing until resumed.

use std::collections::BTreeSet;
use std::path::Path;

use medfl_e2e::{
    breast_cancer_spec, create_run, init_logs, site_config_with, split_breast_cancer, test_config,
    wait_for_completion, wait_for_end, Coordinator, Site,
};
use medfl_proto::v1;
use medfl_site::policy::{Approvals, Decision};

/// The config tables of a site holding `csv` as dataset `breast_cancer`, under `policy`.
fn holding_breast_cancer(policy: &str, csv: &Path) -> String {
    format!(
        "{policy}\n[datasets.breast_cancer]\npath = \"{}\"\n",
        csv.display()
    )
}

/// `medfl-site dataset add breast_cancer --path CSV` for the site whose state is in `site_dir`.
fn register_breast_cancer(site_dir: &Path, csv: &Path) {
    let dataset = medfl_site::config::DatasetConfig {
        path: csv.to_path_buf(),
        format: "csv".into(),
    };
    medfl_site::registry::add(site_dir, &Default::default(), "breast_cancer", dataset)
        .expect("registering the dataset");
}

/// Starts site `name` (its state under `dir/name`) and waits until it registered.
async fn start_site(coordinator: &Coordinator, dir: &Path, name: &str, tables: &str) -> Site {
    let config = site_config_with(name, coordinator, &dir.join(name), tables);
    let mut site = Site::start(config);
    site.registered(1).await;
    site
}

/// Stops the sites, then the coordinator.
async fn stop(sites: Vec<Site>, coordinator: Coordinator) {
    for s in sites {
        s.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_refuse_runs_and_approval_gates_them() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 4);
    let policies = [
        "",
        "[policy]\nrequire_approval = true\n",
        "[policy]\ntask_kinds = [\"text_classification\"]\n",
        "",
    ];
    let names = ["open", "careful", "text-only", "paused"];
    let mut sites = Vec::new();
    for ((name, csv), policy) in names.iter().zip(&csvs).zip(policies) {
        let tables = if *name == "open" {
            // This hospital registered its data with `medfl-site dataset add`, not in the config.
            register_breast_cancer(&dir.path().join(name), csv);
            policy.to_string()
        } else {
            holding_breast_cancer(policy, csv)
        };
        sites.push(start_site(&coordinator, dir.path(), name, &tables).await);
    }
    // The hospital throws the kill switch of one site.
    let paused_dir = dir.path().join("paused");
    medfl_site::policy::set_paused(&paused_dir, Some("maintenance")).expect("pause");
    let mut client = coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("gated", 2, 1, 8)).await;
    let detail = wait_for_completion(&mut client, &run).await;

    // Every round: the open site trained, the careful one waited, the text-only one refused, and
    // the researcher sees which (pending, rejected, paused) apart from sites that failed.
    for round in &detail.rounds {
        let by_site = |name: &str| {
            round
                .sites
                .iter()
                .find(|s| s.site == name)
                .unwrap_or_else(|| panic!("{name} in round {}", round.round))
        };
        assert_eq!(
            by_site("open").outcome(),
            medfl_proto::v1::SiteOutcome::Accepted
        );
        let careful = by_site("careful");
        assert_eq!(
            careful.outcome(),
            medfl_proto::v1::SiteOutcome::Pending,
            "{careful:?}"
        );
        assert!(
            careful.reason.contains("awaits the hospital's approval"),
            "{careful:?}"
        );
        let text_only = by_site("text-only");
        assert_eq!(
            text_only.outcome(),
            medfl_proto::v1::SiteOutcome::Rejected,
            "{text_only:?}"
        );
        assert!(
            text_only.reason.contains("policy")
                && text_only.reason.contains("tabular_classification"),
            "{text_only:?}"
        );
        let paused = by_site("paused");
        assert_eq!(
            paused.outcome(),
            medfl_proto::v1::SiteOutcome::Paused,
            "{paused:?}"
        );
        assert!(paused.reason.contains("paused by the hospital"));
    }
    let careful_dir = dir.path().join("careful");
    let queue = Approvals::load(&careful_dir).expect("queue");
    assert_eq!(queue.runs[&run].decision, Decision::Pending);

    // Once approved, the careful site's gate opens for the run; the kill switch is released.
    Approvals::decide(&careful_dir, &run, Decision::Approved, "").expect("approve");
    let spec_toml = breast_cancer_spec("gated", 2, 1, 8);
    let spec = medfl_core::spec::RunSpec::from_toml(&spec_toml).expect("spec");
    let careful_policy = medfl_site::policy::Policy {
        require_approval: true,
        ..Default::default()
    };
    medfl_site::policy::admit(
        &careful_policy,
        &careful_dir,
        &run,
        &spec,
        &medfl_site::policy::spec_sha256(&spec_toml),
        8,
        None,
    )
    .expect("an approved run is admitted");
    medfl_site::policy::set_paused(&paused_dir, None).expect("resume");
    assert!(!medfl_site::policy::is_paused(&paused_dir));

    // Asked again, the approved and the resumed sites score the final model; the text-only one
    // still refuses.
    let asked = client
        .evaluate_run(v1::EvaluateRunRequest {
            run_id: run.clone(),
        })
        .await
        .expect("evaluate")
        .into_inner();
    assert_eq!(asked.sites_asked, 4);
    let detail = wait_for_end(&mut client, &run).await;
    let scored: BTreeSet<&str> = detail
        .final_evaluation
        .iter()
        .filter(|e| e.global_sha256 == asked.global_sha256)
        .map(|e| e.site.as_str())
        .collect();
    assert_eq!(
        scored,
        BTreeSet::from(["careful", "open", "paused"]),
        "{:?}",
        detail.final_evaluation
    );
    // The site's audit log holds its policy and the wait.
    let audit = std::fs::read_to_string(careful_dir.join("audit.jsonl")).expect("audit log");
    for event in ["policy_in_force", "run_not_admitted"] {
        assert!(audit.contains(event), "{event} missing from {audit}");
    }
    stop(sites, coordinator).await;
}

/// A dataset the hospital registers on a running site is offered to runs without a restart, and
/// one it removes is withdrawn: the coordinator hears of both, also of a change made while it was
/// out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn datasets_registered_on_a_running_site_are_offered_without_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 1);
    let site_dir = dir.path().join("late");
    let mut site = start_site(&coordinator, dir.path(), "late", "").await;
    let mut client = coordinator.runs().await;
    let offered = |sites: v1::ListSitesResponse| -> Vec<String> {
        sites.sites[0]
            .datasets
            .iter()
            .map(|d| d.name.clone())
            .collect()
    };
    let list = v1::ListSitesRequest::default();
    let sites = client
        .list_sites(list.clone())
        .await
        .expect("sites")
        .into_inner();
    assert!(offered(sites).is_empty());

    // `medfl-site dataset add` while the daemon runs.
    register_breast_cancer(&site_dir, &csvs[0]);
    site.registered(2).await;
    let sites = client
        .list_sites(list.clone())
        .await
        .expect("sites")
        .into_inner();
    assert_eq!(offered(sites), ["breast_cancer"]);
    let run = create_run(&mut client, &breast_cancer_spec("late-data", 1, 1, 60)).await;
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(
        detail.rounds[0].sites[0].outcome(),
        medfl_proto::v1::SiteOutcome::Accepted
    );

    // `medfl-site dataset remove`: withdrawn from the coordinator too.
    medfl_site::registry::remove(&site_dir, "breast_cancer").expect("removing");
    site.registered(3).await;
    let sites = client
        .list_sites(list.clone())
        .await
        .expect("sites")
        .into_inner();
    assert!(offered(sites).is_empty());

    // Registered while the coordinator is down: told once the site is back in touch.
    let mut coordinator = coordinator;
    coordinator.kill();
    register_breast_cancer(&site_dir, &csvs[0]);
    coordinator.restart();
    site.registered(4).await;
    let mut client = coordinator.runs().await;
    let sites = client
        .list_sites(list.clone())
        .await
        .expect("sites")
        .into_inner();
    assert_eq!(offered(sites), ["breast_cancer"]);
    stop(vec![site], coordinator).await;
}

/// A site awaiting approval takes no sampled slot: with `fraction` 0.5 of four sites, every round
/// trains on two willing sites, and once the careful site has declined it is asked again every
/// round (so approving it takes effect at once) on top of those two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_awaiting_approval_takes_no_sampled_slot() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let (csvs, _test) = split_breast_cancer(dir.path(), 4);
    let names = ["careful", "open-1", "open-2", "open-3"];
    let mut sites = Vec::new();
    for (name, csv) in names.iter().zip(&csvs) {
        let policy = if *name == "careful" {
            "[policy]\nrequire_approval = true\n"
        } else {
            ""
        };
        let tables = holding_breast_cancer(policy, csv);
        sites.push(start_site(&coordinator, dir.path(), name, &tables).await);
    }
    let mut client = coordinator.runs().await;
    let spec = format!("fraction = 0.5\n{}", breast_cancer_spec("sampled", 5, 1, 8));
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;

    let (mut declined_before, mut checked) = (false, 0);
    for round in &detail.rounds {
        let outcome = |name: &str| {
            round
                .sites
                .iter()
                .find(|s| s.site == name)
                .map(|s| s.outcome())
        };
        let accepted = round
            .sites
            .iter()
            .filter(|s| s.outcome() == medfl_proto::v1::SiteOutcome::Accepted)
            .count();
        // Until the careful site first declines, the coordinator cannot know it will.
        if declined_before {
            assert_eq!(accepted, 2, "round {}: {:?}", round.round, round.sites);
            assert_eq!(
                outcome("careful"),
                Some(v1::SiteOutcome::Pending),
                "round {}",
                round.round
            );
            checked += 1;
        }
        declined_before |= outcome("careful") == Some(v1::SiteOutcome::Pending);
    }
    assert!(
        checked > 0,
        "the careful site declined in no round but the last"
    );
    stop(sites, coordinator).await;
}
