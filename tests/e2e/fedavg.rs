//! Three hospitals, three rounds of federated averaging on the breast cancer data.

use medfl_e2e::*;
use medfl_proto::v1;

/// The test's own weighted average of the accepted updates of `round`, in f64.
pub fn expected_average(fed: &Coordinator, run: &str, round: u32) -> Vec<Vec<f64>> {
    let results = fed.store().site_results(run, round).expect("site results");
    let accepted: Vec<_> = results
        .iter()
        .filter(|r| r.outcome == medfl_core::run::SiteOutcome::Accepted)
        .collect();
    assert!(!accepted.is_empty(), "round {round} has accepted updates");
    let total: f64 = accepted.iter().map(|r| r.examples as f64).sum();
    let mut sum: Vec<Vec<f64>> = Vec::new();
    for r in accepted {
        let update = fed.blob(&r.update_sha256);
        if sum.is_empty() {
            sum = update
                .tensors
                .iter()
                .map(|t| vec![0.0; t.data.len()])
                .collect();
        }
        for (s, t) in sum.iter_mut().zip(&update.tensors) {
            for (a, v) in s.iter_mut().zip(&t.data) {
                *a += r.examples as f64 / total * f64::from(*v);
            }
        }
    }
    sum
}

/// Asserts that the global model of `round` equals `expected` to 1e-6 (relative to magnitude).
pub fn assert_global_is(fed: &Coordinator, global_sha: &str, expected: &[Vec<f64>]) {
    let global = fed.blob(global_sha);
    for (t, e) in global.tensors.iter().zip(expected) {
        for (g, e) in t.data.iter().zip(e) {
            assert!(
                (f64::from(*g) - e).abs() <= 1e-6 * e.abs().max(1.0),
                "tensor {}: {g} vs {e}",
                t.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sites_three_rounds_average_exactly_and_learn_retaining_updates() {
    // Updates are kept (a non-default) so the test can average them itself.
    let fed = Federation::start_configured(3, true, |c| c.retain_updates = true).await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("fedavg-e2e", 3, 3, 120);
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 3);
    for r in &detail.rounds {
        assert_eq!(r.sites_reported, 3, "round {}", r.round);
        assert!(
            r.bytes_up > 0 && r.bytes_down > 0,
            "round {} moved bytes",
            r.round
        );
        assert!(
            r.eval_metrics.contains_key("accuracy"),
            "round {} evaluated",
            r.round
        );
        let expected = expected_average(&fed.coordinator, &run, r.round);
        assert_global_is(&fed.coordinator, &r.global_sha256, &expected);
    }
    // Every site scored the final model on its own validation split.
    let sites: Vec<&str> = detail
        .final_evaluation
        .iter()
        .map(|e| e.site.as_str())
        .collect();
    assert_eq!(sites, vec!["hospital-0", "hospital-1", "hospital-2"]);
    for e in &detail.final_evaluation {
        assert_eq!(e.global_sha256, detail.rounds[2].global_sha256);
        assert!(
            e.num_examples > 0 && e.metrics.contains_key("accuracy"),
            "{e:?}"
        );
    }
    let last = &detail.rounds[2];
    let accuracy = test_accuracy(
        &detail,
        &fed.coordinator.blob(&last.global_sha256),
        &fed.test_csv,
    );
    assert!(accuracy >= 0.93, "held-out accuracy {accuracy}");
    assert!(
        last.eval_metrics["accuracy"] > 0.8,
        "{:?}",
        last.eval_metrics
    );

    // The researcher API hands out the same final model.
    let mut stream = client
        .pull_model(v1::PullModelRequest {
            run_id: run.clone(),
            round: 0,
        })
        .await
        .expect("pull")
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert_eq!(chunk.offset, bytes.len() as u64);
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(
        medfl_core::safetensors::decode(&bytes).expect("model"),
        fed.coordinator.blob(&last.global_sha256)
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_runs_keep_per_site_detail_for_recent_rounds_only() {
    let fed = Federation::start(2).await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("long", 52, 2, 60).replace("local_epochs = 2", "local_steps = 1");
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_end(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 52);
    // The latest 50 rounds carry per-site results; older ones only their summary.
    assert!(detail.rounds[0].sites.is_empty() && detail.rounds[1].sites.is_empty());
    assert_eq!(detail.rounds[2].sites.len(), 2);
    assert_eq!(detail.rounds[51].sites.len(), 2);
    // Asking for an old round brings its sites back.
    let old = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: 1,
        })
        .await
        .expect("get run")
        .into_inner();
    assert_eq!(old.rounds[0].sites.len(), 2);
    assert!(old.rounds[1].sites.is_empty());
    fed.stop().await;
}
