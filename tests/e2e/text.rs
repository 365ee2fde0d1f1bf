//! Text runs on a pre-trained encoder: sites check the pinned weights, fetch a base they lack,
//! refuse other weights; only the adapter travels; LoRA on the real model learns ICD-10 chapters.

use std::collections::BTreeMap;

use medfl_core::safetensors::decode;
use medfl_e2e::{
    create_run, icd10_jsonl, init_logs, shared_minilm, test_config, text_site as site_with,
    text_spec, wait_for_completion, write_parts, Coordinator, Site,
};
use medfl_train::testing::write_tiny_bert;
use medfl_train::{label_skew_partition, model_for_run, BaseModels, Data, TextTable};

/// The 21 ICD-10 chapters, as the data labels them.
fn chapters(table: &TextTable) -> Vec<String> {
    let mut labels: Vec<String> = table.column("label");
    labels.sort();
    labels.dedup();
    labels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sites_verify_fetch_or_refuse_the_pinned_base_and_only_the_adapter_travels() {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let published = dir.path().join("published/tiny");
    let sha = write_tiny_bert(&published, 0.0).expect("tiny model");
    let other = dir.path().join("other/tiny");
    let other_sha = write_tiny_bert(&other, 1.0).expect("tiny model");

    let mut cfg = test_config(&dir.path().join("coordinator"));
    cfg.base_models = BTreeMap::from([("tiny".to_string(), published.clone())]);
    let coordinator = Coordinator::start(cfg).await;

    let table = TextTable::load_jsonl(&icd10_jsonl()).expect("ICD-10 data");
    let labels = chapters(&table);
    let label_column = table.column("label");
    let refs: Vec<&str> = label_column.iter().map(String::as_str).collect();
    let shares = vec![vec![0.01; labels.len()]; 3];
    let parts = write_parts(
        &table,
        &label_skew_partition(&refs, &labels, &shares, 3),
        dir.path(),
    );

    let mut sites = vec![
        // Holds the published weights.
        site_with(
            "holder",
            &coordinator,
            dir.path(),
            &parts[0],
            Some(("tiny", &published)),
        ),
        // Holds no base model: fetches it from the coordinator.
        site_with("fetcher", &coordinator, dir.path(), &parts[1], None),
        // Holds other weights under the same name: must refuse.
        site_with(
            "impostor",
            &coordinator,
            dir.path(),
            &parts[2],
            Some(("tiny", &other)),
        ),
    ];
    for s in &mut sites {
        s.registered(1).await;
    }
    let mut client = coordinator.runs().await;
    let spec = text_spec(
        "tiny-lora",
        "tiny",
        &sha,
        &labels,
        1,
        "[model.adaptation]\nmethod = \"lora\"\nrank = 2\nalpha = 4.0\n",
    );
    let run_id = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run_id).await;
    let round = &detail.rounds[0];
    assert_eq!(round.sites_reported, 2, "{round:?}");
    let impostor = round
        .sites
        .iter()
        .find(|s| s.site == "impostor")
        .expect("the impostor's result");
    assert_eq!(
        impostor.outcome(),
        medfl_proto::v1::SiteOutcome::Failed,
        "{impostor:?}"
    );
    assert!(
        impostor.reason.contains(&other_sha) && impostor.reason.contains("refusing"),
        "{}",
        impostor.reason
    );
    let fetched = dir.path().join("fetcher/base-models").join(&sha);
    assert_eq!(
        medfl_train::base::sha256_file(&fetched.join("model.safetensors")).expect("hash"),
        sha
    );

    // Only the adapter and head travel: far smaller than the base.
    let base_bytes = std::fs::metadata(published.join("model.safetensors"))
        .expect("size")
        .len();
    assert_eq!(detail.full_model_bytes, base_bytes);
    let per_update = round.bytes_up / u64::from(round.sites_reported);
    assert!(
        per_update > 0 && per_update < base_bytes / 5,
        "{per_update} of {base_bytes}"
    );
    let global = coordinator.blob(&round.global_sha256);
    assert!(global
        .tensors
        .iter()
        .all(|t| t.name.contains(".lora_") || t.name.starts_with("classifier.")));

    // A run pinning weights the coordinator does not publish is refused at creation.
    let bad = spec.replace(&sha, &other_sha);
    let err = client
        .create_run(medfl_proto::v1::CreateRunRequest { spec_toml: bad })
        .await
        .expect_err("unpublished base");
    assert!(
        err.message().contains("model.base_sha256"),
        "{}",
        err.message()
    );
    for s in sites {
        s.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_lora_on_minilm_learns_icd10_chapters() {
    let Some(model_dir) = shared_minilm("federated_lora_on_minilm_learns_icd10_chapters") else {
        return;
    };
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let bases = BaseModels::new(BTreeMap::from([("minilm".into(), model_dir.clone())]), None);
    let sha = bases.weights_sha256(&model_dir).expect("hash");
    let mut cfg = test_config(&dir.path().join("coordinator"));
    cfg.base_models = BTreeMap::from([("minilm".to_string(), model_dir.clone())]);
    let coordinator = Coordinator::start(cfg).await;

    // Three sites, each mostly a few specialties; a held-out test split of every chapter.
    let table = TextTable::load_jsonl(&icd10_jsonl()).expect("ICD-10 data");
    let labels = chapters(&table);
    let label_column = table.column("label");
    let refs: Vec<&str> = label_column.iter().map(String::as_str).collect();
    let mut shares = vec![vec![0.008; labels.len()]];
    for site in 0..3 {
        shares.push(
            (0..labels.len())
                .map(|c| if c % 3 == site { 0.012 } else { 0.002 })
                .collect(),
        );
    }
    let parts = label_skew_partition(&refs, &labels, &shares, 11);
    let paths = write_parts(&table, &parts, dir.path());
    let mut sites: Vec<Site> = (0..3)
        .map(|i| {
            site_with(
                &format!("hospital-{i}"),
                &coordinator,
                dir.path(),
                &paths[i + 1],
                Some(("minilm", &model_dir)),
            )
        })
        .collect();
    for s in &mut sites {
        s.registered(1).await;
    }
    let mut client = coordinator.runs().await;
    let spec = text_spec("icd10-lora", "minilm", &sha, &labels, 2, "");
    let run_id = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run_id).await;

    let test = table.subset(&parts[0]);
    let (test, _) = test
        .examples("text", "label", &labels)
        .expect("test examples");
    let test = Data::Text(test);
    let run_spec = medfl_core::spec::RunSpec::from_toml(&spec).expect("spec");
    let model = model_for_run(&run_spec, &bases).expect("model");
    let untrained = model
        .evaluate(&model.init(run_spec.seed).expect("init"), &test)
        .expect("eval");
    let last = detail.rounds.last().expect("rounds");
    let trained =
        decode(&std::fs::read(coordinator.blob_path(&last.global_sha256)).expect("model"))
            .expect("decode");
    let after = model.evaluate(&trained, &test).expect("eval");
    println!(
        "ICD-10 held-out ({} texts): untrained head {:.3}, federated LoRA after {} rounds {:.3} \
         (macro-F1 {:.3})",
        test.len(),
        untrained.metrics["accuracy"],
        detail.rounds.len(),
        after.metrics["accuracy"],
        after.metrics["macro_f1"]
    );
    assert!(
        after.metrics["accuracy"] > untrained.metrics["accuracy"] + 0.1,
        "{untrained:?} -> {after:?}"
    );
    // The adapter is a small fraction of the model.
    assert!(last.bytes_up / u64::from(last.sites_reported) < detail.full_model_bytes / 50);
    for s in sites {
        s.stop().await;
    }
    coordinator.stop().await;
}
