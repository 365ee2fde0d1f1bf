//! Strategies beyond FedAvg on the real breast cancer data: robust aggregation against a
//! malicious site, FedProx on a strongly non-IID split, FedAdam across a coordinator restart.

use medfl_e2e::raw::RawSite;
use medfl_e2e::*;
use medfl_proto::v1;
use tokio::sync::watch;

/// A site that answers every train task with the global model plus random noise of large norm
/// (uniform in [-50, 50] per coordinate) and reports a made-up evaluation, until told to stop.
fn spawn_attacker(mut site: RawSite, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stop = stop;
        loop {
            let task = tokio::select! {
                t = site.next_task() => t,
                _ = stop.wait_for(|s| *s) => return,
            };
            if task.kind == v1::TaskKind::Evaluate as i32 {
                let _ = site.evaluate(&task, 0.5).await;
                continue;
            }
            let mut poisoned = site.download(&task.global_sha256).await;
            let mut rng = medfl_core::selection::SplitMix64::new(u64::from(task.round));
            for t in &mut poisoned.tensors {
                for v in &mut t.data {
                    *v += (rng.next_f64() as f32 * 2.0 - 1.0) * 50.0;
                }
            }
            // Claims as many examples as an honest site.
            let _ = site.push(&task, &poisoned, 100).await;
        }
    })
}

/// Runs the breast cancer task on `honest` sites holding even shares of the data, plus an
/// attacker when asked, with `strategy` (a `[strategy]` table body); returns the held-out
/// accuracy of the final model. (Krum keeps a single site's update, so under strong label skew it
/// trails the clean average by the skew, not by the attack; even shares isolate the attack.)
async fn accuracy_on(honest: usize, strategy: &str, attacked: bool) -> f64 {
    let fed = Federation::start_with(honest, false).await;
    let (stop, stopped) = watch::channel(false);
    let attacker = if attacked {
        let site = RawSite::register(&fed.coordinator, "attacker").await;
        Some(spawn_attacker(site, stopped))
    } else {
        None
    };
    let sites = honest as u32 + u32::from(attacked);
    let spec = format!(
        "{}\n[strategy]\n{strategy}\n",
        breast_cancer_spec("robust", 5, sites, 60)
    );
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let last = detail.rounds.last().expect("rounds");
    assert_eq!(last.sites_reported, sites);
    let accuracy = test_accuracy(
        &detail,
        &fed.coordinator.blob(&last.global_sha256),
        &fed.test_csv,
    );
    let _ = stop.send(true);
    if let Some(a) = attacker {
        let _ = a.await;
    }
    fed.stop().await;
    accuracy
}

/// Four honest sites.
async fn accuracy_with(strategy: &str, attacked: bool) -> f64 {
    accuracy_on(4, strategy, attacked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulyan_survives_a_malicious_site_among_seven() {
    let clean = accuracy_on(6, "name = \"fedavg\"", false).await;
    let bulyan = accuracy_on(6, "name = \"bulyan\"\nf = 1", true).await;
    eprintln!("bulyan: {bulyan:.4} under attack (clean FedAvg {clean:.4})");
    assert!(
        bulyan >= clean - 0.03,
        "Bulyan {bulyan} under attack vs clean {clean}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn robust_strategies_survive_a_malicious_site_that_fedavg_does_not() {
    let clean = accuracy_with("name = \"fedavg\"", false).await;
    assert!(clean > 0.9, "clean FedAvg reaches {clean}");
    let fedavg = accuracy_with("name = \"fedavg\"", true).await;
    assert!(
        fedavg < clean - 0.2,
        "FedAvg under attack: {fedavg} vs clean {clean}"
    );
    for strategy in [
        "name = \"krum\"\nf = 1",
        "name = \"median\"",
        "name = \"trimmed_mean\"\nbeta = 0.2",
        "name = \"multi_krum\"\nf = 1\nkeep = 3",
    ] {
        let robust = accuracy_with(strategy, true).await;
        eprintln!("{strategy:?}: {robust:.4} under attack (clean FedAvg {clean:.4}, attacked FedAvg {fedavg:.4})");
        assert!(
            robust >= clean - 0.03,
            "{strategy}: {robust} under attack vs clean FedAvg {clean}"
        );
    }
    // Plain averaging with every update clipped to distance 3 from the global model: the
    // attacker's pull is bounded, so most of the accuracy comes back.
    let clipped = accuracy_with(
        "name = \"fedavg\"\n[defense]\nmax_update_norm = 3.0\nnorm_action = \"clip\"",
        true,
    )
    .await;
    eprintln!("fedavg with norm clipping: {clipped:.4} under attack");
    assert!(clipped >= 0.9, "clipped FedAvg under attack: {clipped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedprox_converges_on_a_strongly_non_iid_split() {
    let fed = Federation::start(3).await;
    let spec = format!(
        "{}\n[strategy]\nname = \"fedprox\"\nmu = 0.1\n",
        breast_cancer_spec("fedprox", 5, 3, 60)
    );
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let losses: Vec<f64> = detail.rounds.iter().map(|r| r.train_loss).collect();
    assert!(losses[4] < losses[0], "training loss falls: {losses:?}");
    let last = detail.rounds.last().expect("rounds");
    let accuracy = test_accuracy(
        &detail,
        &fed.coordinator.blob(&last.global_sha256),
        &fed.test_csv,
    );
    assert!(accuracy >= 0.9, "FedProx held-out accuracy {accuracy}");
    fed.stop().await;
}

/// The final global model of a FedAdam run, with the coordinator killed after round 2 when asked.
async fn fedadam_final(restart: bool) -> medfl_core::ModelParams {
    let mut fed = Federation::start(3).await;
    let spec = format!(
        "{}\n[strategy]\nname = \"fedadam\"\neta = 0.05\n",
        breast_cancer_spec("fedadam", 4, 3, 60)
    );
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &spec).await;
    if restart {
        watch_until(&mut client, &run, |d| d.rounds.len() >= 2).await;
        fed.coordinator.restart();
        client = fed.coordinator.runs().await;
    }
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 4);
    let last = fed.coordinator.blob(&detail.rounds[3].global_sha256);
    fed.stop().await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedadam_continues_identically_after_a_coordinator_restart() {
    let straight = fedadam_final(false).await;
    let resumed = fedadam_final(true).await;
    for (a, b) in straight.tensors.iter().zip(&resumed.tensors) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{}: {x} vs {y}",
                a.name
            );
        }
    }
}
