//! Every kind of bad update is refused with the right status, and the round goes on with the
//! good ones: the next global model is the average of the good updates only.

use medfl_core::safetensors::encode;
use medfl_core::NamedTensor;
use medfl_e2e::raw::{new_key, shifted, RawSite};
use medfl_e2e::*;
use medfl_proto::v1;
use tonic::Code;

use crate::fedavg::{assert_global_is, expected_average};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_updates_are_refused_and_good_ones_averaged_retaining_updates() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Updates are kept (a non-default) so the test can average the good ones itself.
    let mut config = test_config(&dir.path().join("coordinator"));
    config.retain_updates = true;
    let coordinator = Coordinator::start(config).await;
    let mut good1 = RawSite::register(&coordinator, "good-1").await;
    let mut good2 = RawSite::register(&coordinator, "good-2").await;
    let mut bad = RawSite::register(&coordinator, "bad").await;
    let mut client = coordinator.runs().await;
    let spec = breast_cancer_spec("bad-updates", 2, 2, 60);
    let run = create_run(&mut client, &spec).await;
    RawSite::statistics(&mut [&mut good1, &mut good2, &mut bad]).await;

    let t1 = good1.next_task().await;
    let t2 = good2.next_task().await;
    let tb = bad.next_task().await;
    assert_eq!((t1.round, tb.round), (1, 1));
    let global = good1.download(&t1.global_sha256).await;

    let code = |r: Result<v1::PushUpdateResponse, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty());
            s.code()
        }
    };
    // Wrong tensor names.
    let mut renamed = global.clone();
    renamed.tensors[0].name = "layers.9.weight".into();
    let renamed = medfl_core::ModelParams::new(renamed.tensors).expect("model");
    assert_eq!(
        code(bad.push(&tb, &renamed, 10).await),
        Code::InvalidArgument
    );
    // Wrong shape.
    let mut reshaped = global.clone();
    let t = &mut reshaped.tensors[1];
    assert_eq!(t.shape.len(), 2, "the weight matrix");
    *t = NamedTensor {
        name: t.name.clone(),
        shape: vec![t.data.len()],
        data: t.data.clone(),
    };
    assert_eq!(
        code(bad.push(&tb, &reshaped, 10).await),
        Code::InvalidArgument
    );
    // NaN.
    let mut nan = global.clone();
    nan.tensors[1].data[0] = f32::NAN;
    assert_eq!(code(bad.push(&tb, &nan, 10).await), Code::InvalidArgument);
    // F16 instead of F32 (same names and shapes).
    let mut half = Vec::new();
    let json = format!(
        "{{\"{}\":{{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}}}",
        global.tensors[0].name
    );
    half.extend_from_slice(&(json.len() as u64).to_le_bytes());
    half.extend_from_slice(json.as_bytes());
    half.extend_from_slice(&[0u8; 4]);
    let header = bad.header_for(&tb, &half, 10);
    let len = half.len();
    assert_eq!(
        code(bad.push_raw(header, half, len).await),
        Code::InvalidArgument
    );
    // Hash does not match the bytes.
    let bytes = encode(&shifted(&global, 1.0));
    let mut header = bad.header_for(&tb, &bytes, 10);
    header.sha256 = hex::encode([7u8; 32]);
    bad.sign_with(&mut header, None);
    let len = bytes.len();
    assert_eq!(
        code(bad.push_raw(header, bytes.clone(), len).await),
        Code::DataLoss
    );
    // Truncated: the upload breaks off halfway.
    let header = bad.header_for(&tb, &bytes, 10);
    assert_eq!(
        code(bad.push_raw(header, bytes.clone(), len / 2).await),
        Code::DataLoss
    );
    // Absurd example count.
    assert_eq!(code(bad.push(&tb, &global, 0).await), Code::InvalidArgument);
    // Another name than its certificate's: an unknown site, and a known one.
    let mut stranger = bad.impostor("nobody");
    assert_eq!(
        code(stranger.push(&tb, &global, 10).await),
        Code::PermissionDenied
    );
    let mut impostor = bad.impostor("good-1");
    assert_eq!(
        code(impostor.push(&tb, &global, 10).await),
        Code::PermissionDenied
    );

    // The good updates, one of them twice.
    let u1 = shifted(&global, 0.5);
    let u2 = shifted(&global, -0.25);
    assert_eq!(code(good1.push(&t1, &u1, 30).await), Code::Ok);
    assert_eq!(code(good1.push(&t1, &u1, 30).await), Code::AlreadyExists);
    assert_eq!(code(good2.push(&t2, &u2, 10).await), Code::Ok);
    // The bad site gives up: the round closes without waiting for the deadline.
    bad.fail(&tb, "test site gives up").await;

    // Evaluation phase of round 1: a late update for round 1 is refused.
    let e1 = good1.next_task().await;
    assert_eq!(e1.kind, v1::TaskKind::Evaluate as i32);
    assert_eq!(
        code(bad.push(&tb, &global, 10).await),
        Code::FailedPrecondition
    );
    let e2 = good2.next_task().await;
    good1.evaluate(&e1, 0.9).await.expect("evaluation");
    good2.evaluate(&e2, 0.7).await.expect("evaluation");

    let detail = watch_until(&mut client, &run, |d| !d.rounds.is_empty()).await;
    let round = &detail.rounds[0];
    assert_eq!(round.sites_reported, 2);
    // (30 * 0.5 + 10 * -0.25) / 40 = 0.3125 above the starting model.
    let expected = expected_average(&coordinator, &run, 1);
    assert_global_is(&coordinator, &round.global_sha256, &expected);
    let start = global.tensors[0].data[0] as f64;
    assert!((expected[0][0] - (start + 0.3125)).abs() < 1e-6);

    // Every refusal of a selected site in the open attempt is on record with its reason; the
    // late one, for a train phase that had ended, is refused without a record.
    let results = coordinator.store().site_results(&run, 1).expect("results");
    let refused = results
        .iter()
        .filter(|r| r.outcome == medfl_core::run::SiteOutcome::Refused)
        .count();
    assert_eq!(refused, 8, "{results:#?}");
    assert!(results
        .iter()
        .any(|r| r.site == "bad" && r.reason.contains("non-finite")));
    assert!(results
        .iter()
        .any(|r| r.site == "bad" && r.outcome == medfl_core::run::SiteOutcome::Failed));

    client
        .stop_run(v1::StopRunRequest {
            run_id: run.clone(),
        })
        .await
        .expect("stop");
    let detail = wait_for_end(&mut client, &run).await;
    assert_eq!(status(&detail), v1::RunStatus::Stopped as i32);
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updates_beyond_the_norm_bound_are_refused_or_clipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let mut a = RawSite::register(&coordinator, "site-a").await;
    let mut b = RawSite::register(&coordinator, "site-b").await;
    let mut client = coordinator.runs().await;
    let spec = format!(
        "{}\n[defense]\nmax_update_norm = 1.0\nnorm_action = \"reject\"\nmax_examples = 1000\n",
        breast_cancer_spec("norm-bound", 1, 2, 60)
    );
    let run = create_run(&mut client, &spec).await;
    RawSite::statistics(&mut [&mut a, &mut b]).await;
    let ta = a.next_task().await;
    let tb = b.next_task().await;
    let global = a.download(&ta.global_sha256).await;
    // 31 coordinates shifted by 1: distance sqrt(31) > 1.
    let far = a
        .push(&ta, &shifted(&global, 1.0), 10)
        .await
        .expect_err("too far");
    assert_eq!(far.code(), Code::InvalidArgument);
    assert!(
        far.message().contains("over the run's bound"),
        "{}",
        far.message()
    );
    // Claims more examples than the run allows.
    let greedy = a
        .push(&ta, &global, 5000)
        .await
        .expect_err("too many examples");
    assert!(
        greedy.message().contains("num_examples"),
        "{}",
        greedy.message()
    );
    // Within the bound: accepted.
    a.push(&ta, &shifted(&global, 0.1), 10)
        .await
        .expect("near update");
    b.push(&tb, &shifted(&global, -0.1), 10)
        .await
        .expect("near update");
    let results = coordinator.store().site_results(&run, 1).expect("results");
    assert_eq!(
        results
            .iter()
            .filter(|r| r.outcome == medfl_core::run::SiteOutcome::Refused)
            .count(),
        2
    );
    client
        .stop_run(v1::StopRunRequest {
            run_id: run.clone(),
        })
        .await
        .expect("stop");

    // With `clip`, the far update counts, pulled back to the bound.
    let spec = spec
        .replace("\"reject\"", "\"clip\"")
        .replace("norm-bound", "norm-clip");
    let run = create_run(&mut client, &spec).await;
    RawSite::statistics(&mut [&mut a, &mut b]).await;
    let ta = a.next_task().await;
    let tb = b.next_task().await;
    let global = a.download(&ta.global_sha256).await;
    a.push(&ta, &shifted(&global, 1.0), 10)
        .await
        .expect("clipped, not refused");
    b.push(&tb, &global, 10).await.expect("unchanged update");
    let e1 = a.next_task().await;
    let e2 = b.next_task().await;
    a.evaluate(&e1, 0.5).await.expect("evaluation");
    b.evaluate(&e2, 0.5).await.expect("evaluation");
    let detail = watch_until(&mut client, &run, |d| !d.rounds.is_empty()).await;
    let next = coordinator.blob(&detail.rounds[0].global_sha256);
    // Site a's update was clipped to distance 1, so every coordinate moved by 1/sqrt(31);
    // averaged with an unchanged update, the global model moves by half of that.
    let n = global.numel() as f32;
    for (g, t) in global.tensors.iter().zip(&next.tensors) {
        for (x, y) in g.data.iter().zip(&t.data) {
            assert!((y - x - 0.5 / n.sqrt()).abs() < 1e-5, "{x} -> {y}");
        }
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsigned_forged_and_replayed_updates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let mut site = RawSite::register(&coordinator, "signer").await;
    let mut client = coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("signed", 2, 1, 60)).await;
    let t1 = site.next_task().await;
    // Tasks carry the coordinator's signature over run, round, attempt, kind and model.
    let claim = medfl_proto::convert::task_claim(&t1);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &site.coordinator_key)
        .verify(&claim.message(), &t1.signature)
        .expect("a signed task");
    let global = site.download(&t1.global_sha256).await;
    let bytes = encode(&shifted(&global, 0.1));
    let len = bytes.len();
    let denied = |r: Result<v1::PushUpdateResponse, tonic::Status>| match r {
        Err(s) if s.code() == Code::PermissionDenied && s.message().contains("signature") => true,
        other => panic!("expected a signature refusal, got {other:?}"),
    };
    // Unsigned.
    let mut h = site.header_for(&t1, &bytes, 10);
    h.signature.clear();
    assert!(denied(site.push_raw(h, bytes.clone(), len).await));
    // Signed with a key the coordinator never pinned for this site.
    let mut h = site.header_for(&t1, &bytes, 10);
    site.sign_with(&mut h, Some(&new_key()));
    assert!(denied(site.push_raw(h, bytes.clone(), len).await));
    // A claim changed after signing (more examples, more weight).
    let mut h = site.header_for(&t1, &bytes, 10);
    h.num_examples = 1000;
    assert!(denied(site.push_raw(h, bytes.clone(), len).await));
    // The genuine update is accepted.
    let signed_round_1 = site.header_for(&t1, &bytes, 10);
    site.push_raw(signed_round_1.clone(), bytes.clone(), len)
        .await
        .expect("a signed update");
    let e1 = site.next_task().await;
    site.evaluate(&e1, 0.9).await.expect("evaluation");
    // Round 2: the round-1 update replayed under round 2's numbers is refused.
    let t2 = site.next_task().await;
    assert_eq!(t2.round, 2);
    let replay = v1::UpdateHeader {
        round: t2.round,
        attempt: t2.attempt,
        base_sha256: t2.global_sha256.clone(),
        ..signed_round_1
    };
    assert!(denied(site.push_raw(replay, bytes.clone(), len).await));
    let results = coordinator.store().site_results(&run, 1).expect("results");
    assert!(
        results
            .iter()
            .any(|r| r.outcome == medfl_core::run::SiteOutcome::Accepted),
        "{results:#?}"
    );
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impossible_feature_statistics_are_refused_and_the_pooled_ones_sign_every_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = Coordinator::start(test_config(&dir.path().join("coordinator"))).await;
    let mut site = RawSite::register(&coordinator, "counter").await;
    let mut client = coordinator.runs().await;
    let run = create_run(&mut client, &breast_cancer_spec("sums", 1, 1, 60)).await;
    let task = site.next_any_task().await;
    assert_eq!(task.kind, v1::TaskKind::Statistics as i32);
    assert_eq!(task.standardization, None);
    let d = breast_cancer_features().len();
    let report = |count: u64, sum: Vec<f64>, sum_sq: Vec<f64>| {
        let req = site.req(v1::ReportStatisticsRequest {
            run_id: task.run_id.clone(),
            round: task.round,
            attempt: task.attempt,
            count,
            sum,
            sum_sq,
        });
        let mut client = site.client.clone();
        async move { client.report_statistics(req).await.map(|_| ()) }
    };
    let refused = |r: Result<(), tonic::Status>, what: &str| match r {
        Err(s) if s.code() == Code::InvalidArgument && s.message().contains(what) => {}
        other => panic!("expected a refusal naming `{what}`, got {other:?}"),
    };
    // More rows than the site registered (10,000), sums for another feature count, a sum of
    // squares no real rows give, a non-finite sum.
    refused(
        report(20_000, vec![1.0; d], vec![1.0; d]).await,
        "more than the 10000",
    );
    refused(report(10, vec![1.0; 3], vec![1.0; 3]).await, "features");
    refused(
        report(10, vec![100.0; d], vec![1.0; d]).await,
        "cannot come from",
    );
    refused(
        report(10, vec![f64::INFINITY; d], vec![1.0; d]).await,
        "not finite",
    );
    // Honest sums: 4 rows of each feature at 1, 2, 3, 4 (mean 2.5, deviation √1.25).
    report(4, vec![10.0; d], vec![30.0; d])
        .await
        .expect("honest sums");
    // Sent again, they are refused: the phase closed once its only site answered.
    let again = report(4, vec![10.0; d], vec![30.0; d]).await;
    assert!(
        again
            .as_ref()
            .is_err_and(|s| s.code() == Code::FailedPrecondition),
        "{again:?}"
    );
    // Round 1's task carries the pooled statistics, signed with the rest of the task.
    let train = site.next_task().await;
    assert_eq!((train.round, train.kind), (1, v1::TaskKind::Train as i32));
    let pooled = medfl_core::standardize::Standardization::from_json(
        train
            .standardization
            .as_deref()
            .expect("statistics in the task"),
        &breast_cancer_features(),
    )
    .expect("statistics");
    assert_eq!((pooled.rows, pooled.sites), (4, 1));
    assert!((pooled.mean[0] - 2.5).abs() < 1e-12);
    assert!((pooled.std[0] - 1.25f64.sqrt()).abs() < 1e-12);
    let claim = medfl_proto::convert::task_claim(&train);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &site.coordinator_key)
        .verify(&claim.message(), &train.signature)
        .expect("a signed task");
    let mut shifted_stats = train.clone();
    shifted_stats.standardization = Some(
        medfl_core::standardize::Standardization {
            mean: vec![0.0; d],
            ..pooled.clone()
        }
        .to_json(),
    );
    let claim = medfl_proto::convert::task_claim(&shifted_stats);
    assert!(
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &site.coordinator_key)
            .verify(&claim.message(), &train.signature)
            .is_err(),
        "statistics changed in transit must not verify"
    );
    // The researcher sees them with the run.
    let detail = client
        .get_run(v1::GetRunRequest {
            run_id: run.clone(),
            sites_of_round: 0,
        })
        .await
        .expect("run")
        .into_inner();
    assert_eq!(detail.standardization, train.standardization);
}
