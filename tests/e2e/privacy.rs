//! What a researcher learns about patients from the models a run publishes.

use medfl_e2e::*;
use medfl_train::data::{Standardizer, Table};

/// A single-row step at one site, read back out of two consecutive global models: the update of
/// a linear layer trained on one example x is −lr·(p − y)·xᵀ for its weights and −lr·(p − y) for
/// its bias, so each weight row divided by its bias is x itself. This is the attack differential
/// privacy has to stop; the sites' default minimum batch of 8 refuses such a spec, so this site
/// is configured to allow batches of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_published_models_give_away_a_training_row_at_a_site_allowing_batches_of_one() {
    let fed = Federation::start_with_sites(
        1,
        false,
        |_| {},
        |site| {
            site.policy.min_batch_size = 0;
        },
    )
    .await;
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("one-row-steps", 2, 1, 60)
        .replace("batch_size = 16", "batch_size = 1\nlocal_steps = 1")
        .replace(
            "labels = [\"B\", \"M\"]",
            "labels = [\"B\", \"M\"]\nvalidation_fraction = 0.0",
        );
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    // What any researcher may pull: the models after rounds 1 and 2.
    let before = fed.coordinator.blob(&detail.rounds[0].global_sha256);
    let after = fed.coordinator.blob(&detail.rounds[1].global_sha256);
    let weight = before
        .tensors
        .iter()
        .find(|t| t.shape.len() == 2)
        .expect("a weight matrix");
    let bias = before
        .tensors
        .iter()
        .find(|t| t.shape == [weight.shape[0]])
        .expect("its bias");
    let delta = |name: &str| -> Vec<f64> {
        let (b, a) = (
            before.get(name).expect("before"),
            after.get(name).expect("after"),
        );
        b.data
            .iter()
            .zip(&a.data)
            .map(|(b, a)| f64::from(*a) - f64::from(*b))
            .collect()
    };
    let (dw, db) = (delta(&weight.name), delta(&bias.name));
    let features = weight.shape[1];
    let class = (0..db.len())
        .max_by(|&i, &j| db[i].abs().total_cmp(&db[j].abs()))
        .expect("a class");
    assert!(db[class].abs() > 1e-6, "the model did not move: {db:?}");
    let recovered: Vec<f64> = dw[class * features..(class + 1) * features]
        .iter()
        .map(|w| w / db[class])
        .collect();

    // The hospital's rows as it trains on them (standardised with its own statistics).
    let csv = fed.dir.path().join("data").join("site-0.csv");
    let table = Table::load_csv(&csv).expect("site data");
    let examples = table
        .examples(
            &breast_cancer_features(),
            "diagnosis",
            &["B".to_string(), "M".to_string()],
        )
        .expect("examples");
    let rows = Standardizer::fit(&examples).apply(&examples);
    let error = |i: usize| {
        rows.row(i)
            .iter()
            .zip(&recovered)
            .map(|(x, r)| (f64::from(*x) - r).abs())
            .fold(0.0, f64::max)
    };
    let (closest, err) = (0..rows.len())
        .map(|i| (i, error(i)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("rows");
    assert!(
        err < 1e-3,
        "no row recovered: the closest, row {closest}, is {err} away"
    );
    println!("recovered training row {closest} of site-0.csv to within {err:.2e}");
    fed.stop().await;
}
