//! What a researcher learns about patients from the models a run publishes, and how
//! record-level differential privacy stops it.

use medfl_core::privacy::{Accountant, Mechanism};
use medfl_core::run::SiteOutcome;
use medfl_e2e::*;
use medfl_train::data::{Standardizer, Table};

/// The attack's setting: one row per step, one step per round, no held-out rows.
fn one_row_steps(name: &str) -> String {
    breast_cancer_spec(name, 2, 1, 60)
        .replace("batch_size = 16", "batch_size = 1\nlocal_steps = 1")
        .replace(
            "labels = [\"B\", \"M\"]",
            "labels = [\"B\", \"M\"]\nvalidation_fraction = 0.0",
        )
}

/// Record-level DP at the settings README.md recommends.
const RECORD_DP: &str =
    "\n[privacy]\nlevel = \"record\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n";

/// What the attack gets from a finished run at `fed`'s only site: the distance (largest
/// coordinate difference) from the row it recovers to the closest training row, and the same
/// for the guess that knows nothing but the feature means (all zeros once standardised).
fn reconstruct(fed: &Federation, detail: &medfl_proto::v1::RunDetail) -> (f64, f64) {
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
    assert!(db[class].abs() > 1e-9, "the model did not move: {db:?}");
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
    let closest = |guess: &[f64]| {
        (0..rows.len())
            .map(|i| {
                rows.row(i)
                    .iter()
                    .zip(guess)
                    .map(|(x, r)| (f64::from(*x) - r).abs())
                    .fold(0.0, f64::max)
            })
            .fold(f64::INFINITY, f64::min)
    };
    (closest(&recovered), closest(&vec![0.0; features]))
}

/// Starts one site that allows batches of one (the default minimum batch of 8 refuses them).
async fn site_allowing_batches_of_one() -> Federation {
    Federation::start_with_sites(
        1,
        false,
        |_| {},
        |site| {
            site.policy.min_batch_size = 0;
        },
    )
    .await
}

/// A single-row step at one site, read back out of two consecutive global models: the update of
/// a linear layer trained on one example x is −lr·(p − y)·xᵀ for its weights and −lr·(p − y) for
/// its bias, so each weight row divided by its bias is x itself. This is the attack differential
/// privacy has to stop; the sites' default minimum batch of 8 refuses such a spec, so this site
/// is configured to allow batches of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_published_models_give_away_a_training_row_at_a_site_allowing_batches_of_one() {
    let fed = site_allowing_batches_of_one().await;
    let mut client = fed.coordinator.runs().await;
    let run = create_run(&mut client, &one_row_steps("one-row-steps")).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let (err, means) = reconstruct(&fed, &detail);
    assert!(err < 1e-3, "no row recovered: the closest is {err} away");
    println!(
        "recovered a training row to within {err:.2e} (the feature means are {means:.2} away)"
    );
    fed.stop().await;
}

/// The same attack on a run with record-level DP-SGD (z = 1, C = 1): the noise swamps the one
/// row's gradient, and what comes out is further from every training row than the feature means.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_level_dp_leaves_the_attack_no_better_than_the_feature_means_at_a_site_allowing_batches_of_one(
) {
    let fed = site_allowing_batches_of_one().await;
    let mut client = fed.coordinator.runs().await;
    let spec = one_row_steps("one-row-steps-dp") + RECORD_DP;
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let (err, means) = reconstruct(&fed, &detail);
    assert!(
        err > means,
        "the noised models still give away a row: {err} away, the means {means}"
    );
    println!("with DP the closest row is {err:.2} away; the feature means are {means:.2} away");
    fed.stop().await;
}

/// The `privacy_spent` events in a site's audit log for `run`.
fn privacy_spent(site_dir: &std::path::Path, run: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(site_dir.join("audit.jsonl"))
        .expect("site audit log")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|e| e["event"] == "privacy_spent" && e["run"] == run)
        .collect()
}

/// Each round's ε is the site's own accountant's over all its steps so far, charged in its
/// audit log before the update leaves; a run whose target ε another round would exceed is
/// declined by the site with `budget_exhausted`, the numbers in the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_charges_every_round_and_stops_at_the_runs_target_epsilon() {
    let fed = Federation::start(1).await;
    let site_dir = fed.dir.path().join("hospital-0");
    let mut client = fed.coordinator.runs().await;
    let spec = breast_cancer_spec("dp-two-rounds", 2, 1, 60) + RECORD_DP;
    let run = create_run(&mut client, &spec).await;
    wait_for_completion(&mut client, &run).await;
    let spent = privacy_spent(&site_dir, &run);
    assert_eq!(spent.len(), 2, "{spent:#?}");
    let details: Vec<&serde_json::Value> = spent.iter().map(|e| &e["details"]).collect();
    let num =
        |d: &serde_json::Value, k: &str| d[k].as_f64().unwrap_or_else(|| panic!("{k} in {d}"));
    let round_steps = num(details[0], "round_steps");
    for (i, d) in details.iter().enumerate() {
        let steps = num(d, "steps");
        assert_eq!(steps, round_steps * (i + 1) as f64, "{d}");
        let want = Accountant::Rdp
            .epsilon(&Mechanism {
                sample_rate: num(d, "sample_rate"),
                noise_multiplier: 1.0,
                steps: steps as u64,
                delta: num(d, "delta"),
            })
            .expect("ε");
        assert_eq!(num(d, "epsilon"), want.epsilon, "{d}");
    }
    let (first, second) = (num(details[0], "epsilon"), num(details[1], "epsilon"));
    assert!(second > first && first > 0.0, "{first} then {second}");
    // The researcher sees what the site charged, beside its update in each round, and in the
    // round's summary (the most any site spent).
    let detail = wait_for_completion(&mut client, &run).await;
    for (round, want) in [(1, first), (2, second)] {
        let accepted = result_of(&fed, &run, round, SiteOutcome::Accepted);
        assert_eq!(accepted.privacy_epsilon, Some(want), "round {round}");
        let summary = &detail.rounds[round as usize - 1];
        assert_eq!(summary.privacy_epsilon, Some(want), "round {round}");
    }
    // δ = 1/N^1.1 and q = 16/N for the site's N training rows.
    let n: f64 = 16.0 / num(details[0], "sample_rate");
    assert!((num(details[0], "delta") - n.powf(-1.1)).abs() < 1e-12 * n.powf(-1.1));

    // A target between one round's ε and two rounds': one round trains, the next is declined.
    let target = (first + second) / 2.0;
    let spec = breast_cancer_spec("dp-target", 3, 1, 60)
        + &RECORD_DP.replace(
            "max_grad_norm = 1.0",
            &format!("max_grad_norm = 1.0\ntarget_epsilon = {target}"),
        );
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_end(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 1, "{detail:?}");
    assert_eq!(privacy_spent(&site_dir, &run).len(), 1);
    let results = fed
        .coordinator
        .store()
        .site_results(&run, 2)
        .expect("results");
    let declined = results
        .iter()
        .find(|r| r.outcome == SiteOutcome::BudgetExhausted)
        .unwrap_or_else(|| panic!("no budget_exhausted in round 2: {results:#?}"));
    assert!(
        declined.reason.contains("target_epsilon")
            && declined.reason.contains(&format!("{target}")),
        "{}",
        declined.reason
    );
    fed.stop().await;
}

/// The result a site had in a round of a run.
fn result_of(
    fed: &Federation,
    run: &str,
    round: u32,
    outcome: SiteOutcome,
) -> medfl_coordinator::store::SiteResult {
    let results = fed
        .coordinator
        .store()
        .site_results(run, round)
        .expect("results");
    results
        .iter()
        .find(|r| r.outcome == outcome)
        .cloned()
        .unwrap_or_else(|| panic!("no {outcome} in round {round} of {run}: {results:#?}"))
}

/// A hospital's budget for its dataset across runs: a run without record-level DP is refused;
/// a DP run is charged; once what is left cannot pay for another whole run, that run is refused
/// before it trains, the numbers in the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hospitals_budget_refuses_runs_without_dp_and_runs_it_cannot_pay_for() {
    let budget = |max_epsilon: f64| {
        move |site: &mut medfl_site::config::SiteConfig| {
            site.policy.privacy.insert(
                "breast_cancer".into(),
                medfl_site::policy::DatasetBudget {
                    max_epsilon,
                    delta: Some(1e-5),
                },
            );
        }
    };
    let mut fed = Federation::start_with_sites(1, false, |_| {}, budget(100.0)).await;
    let site_dir = fed.dir.path().join("hospital-0");
    let mut client = fed.coordinator.runs().await;
    let plain = create_run(&mut client, &breast_cancer_spec("no-dp", 2, 1, 60)).await;
    wait_for_end(&mut client, &plain).await;
    let refused = result_of(&fed, &plain, 1, SiteOutcome::Rejected);
    assert!(
        refused.reason.contains("privacy budget") && refused.reason.contains("record"),
        "{}",
        refused.reason
    );

    let spec = breast_cancer_spec("dp-budgeted", 2, 1, 60) + RECORD_DP;
    let first = create_run(&mut client, &spec).await;
    wait_for_completion(&mut client, &first).await;
    let spent = privacy_spent(&site_dir, &first);
    let charged = spent.last().expect("charged")["details"]["epsilon"]
        .as_f64()
        .expect("ε");
    assert_eq!(spent[0]["details"]["delta"], 1e-5, "the hospital's δ");
    // What the hospital's run listing says of it: the DP parameters and the whole run's cost.
    let queue = medfl_site::policy::Approvals::load(&site_dir).expect("approvals");
    let summary = &queue.runs[&first].summary;
    assert!(
        summary.contains("record-level DP (z = 1, C = 1, rdp)")
            && summary.contains("costs this site at most ε = ")
            && summary.contains("over 2 rounds"),
        "{summary}"
    );

    // The same hospital with a budget of 1.5 runs' worth: the second run cannot be paid for.
    let site = fed.sites.pop().expect("the site");
    site.stop().await;
    let mut config = site_config(
        "hospital-0",
        &fed.coordinator,
        &site_dir,
        &fed.dir.path().join("data").join("site-0.csv"),
    );
    budget(1.5 * charged)(&mut config);
    let mut site = Site::start(config);
    site.registered(1).await;
    fed.sites.push(site);
    let second = create_run(&mut client, &spec.replace("dp-budgeted", "dp-over-budget")).await;
    wait_for_end(&mut client, &second).await;
    let refused = result_of(&fed, &second, 1, SiteOutcome::Rejected);
    assert!(
        refused.reason.contains("left of its budget") && refused.reason.contains("max_epsilon"),
        "{}",
        refused.reason
    );
    assert!(
        privacy_spent(&site_dir, &second).is_empty(),
        "charged without training"
    );
    fed.stop().await;
}

/// Client-level DP over three hospitals (`sample_rate` 1, so every site takes part each round).
fn client_dp(table: &str) -> String {
    format!(
        "\n[privacy]\nlevel = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 0.5\n\
         sample_rate = 1.0\ndelta = 0.01\n{table}"
    )
}

/// The updates `site_dir`'s hospital sent for `run`, as its audit log records them.
fn sent(site_dir: &std::path::Path, run: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(site_dir.join("audit.jsonl"))
        .expect("site audit log")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|e| e["event"] == "update_sent" && e["run"] == run)
        .map(|e| e["details"].clone())
        .collect()
}

/// The L2 distance between two published global models.
fn moved(fed: &Federation, from: &str, to: &str) -> f64 {
    let (a, b) = (fed.coordinator.blob(from), fed.coordinator.blob(to));
    a.tensors
        .iter()
        .flat_map(|t| {
            let u = b.get(&t.name).expect("same tensors");
            t.data
                .iter()
                .zip(&u.data)
                .map(|(x, y)| f64::from(x - y).powi(2))
        })
        .sum::<f64>()
        .sqrt()
}

/// DP-FedAvg with central noise: each hospital clips its update to C before it leaves, the
/// coordinator adds N(0, z²C²) to the sum and divides by the expected number of sites, and the
/// run ends `budget_exhausted` before the round that would pass its target ε. Specs that cannot
/// keep their promise are refused when created, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_level_dp_clips_at_each_site_noises_the_sum_and_ends_at_its_target() {
    let fed = Federation::start(3).await;
    let mut client = fed.coordinator.runs().await;
    let spec = client_dp("");
    let c = medfl_core::spec::RunSpec::from_toml(&(breast_cancer_spec("x", 4, 3, 60) + &spec))
        .expect("spec")
        .privacy
        .client
        .expect("client level");
    // A target between two rounds' ε and three rounds': two rounds run.
    let (two, three) = (c.epsilon_after(2).unwrap(), c.epsilon_after(3).unwrap());
    let target = (two + three) / 2.0;
    let text = breast_cancer_spec("client-dp", 4, 3, 60)
        + &client_dp(&format!("target_epsilon = {target}\n"));
    let run = create_run(&mut client, &text).await;
    let detail = wait_for_end(&mut client, &run).await;
    assert_eq!(
        status(&detail),
        medfl_proto::v1::RunStatus::BudgetExhausted as i32,
        "{detail:?}"
    );
    assert_eq!(detail.rounds.len(), 2, "{detail:?}");
    // Each round's summary carries what the run has spent on any one site so far.
    for (i, r) in detail.rounds.iter().enumerate() {
        assert_eq!(
            r.client_epsilon,
            Some(c.epsilon_after(i as u32 + 1).unwrap())
        );
    }
    for i in 0..3 {
        let updates = sent(&fed.dir.path().join(format!("hospital-{i}")), &run);
        assert_eq!(updates.len(), 2, "{updates:#?}");
        for u in &updates {
            // What left is within C of the global model; the site records by how much it clipped.
            let distance = u["l2_distance_from_global"].as_f64().expect("distance");
            assert!(distance <= 0.5 + 1e-5, "{u}");
            let dp = &u["client_dp"];
            assert_eq!(dp["clip_norm"].as_f64(), Some(0.5), "{u}");
            let (trained, by) = (
                dp["trained_l2_distance"].as_f64().unwrap(),
                dp["clipped_by"].as_f64().unwrap(),
            );
            assert!((trained * by - distance).abs() < 1e-4, "{u}");
        }
    }
    // Three clipped updates over 3 expected sites move the model by at most C = 0.5; the noise
    // (z·C/3 per coordinate over 62 weights, ≈ 1.3 in norm) moves it by far more.
    let step = moved(
        &fed,
        &detail.rounds[0].global_sha256,
        &detail.rounds[1].global_sha256,
    );
    assert!(step > 0.6, "the sum carried no noise: moved {step}");

    // Refused when created: a target one round already passes, a δ not below 1/K for the three
    // sites, and a robust rule.
    for (table, field) in [
        (
            client_dp(&format!(
                "target_epsilon = {}\n",
                c.epsilon_after(1).unwrap() / 2.0
            )),
            "privacy.target_epsilon",
        ),
        (
            client_dp("").replace("delta = 0.01", "delta = 0.4"),
            "privacy.delta",
        ),
        (
            format!("\n[strategy]\nname = \"median\"\n{}", client_dp("")),
            "strategy",
        ),
    ] {
        let err = client
            .create_run(medfl_proto::v1::CreateRunRequest {
                spec_toml: breast_cancer_spec("refused", 4, 3, 60) + &table,
            })
            .await
            .expect_err("refused");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    fed.stop().await;
}

/// Distributed noise with adaptive clipping, sites sampled with q = 0.5: every round commits
/// with whoever was drawn (even nobody), each update leaves already noised (so further than C
/// from the global model), and the clipping norm the tasks carry moves between rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_client_dp_with_adaptive_clipping_commits_every_sampled_round() {
    let fed = Federation::start(3).await;
    let mut client = fed.coordinator.runs().await;
    let text = breast_cancer_spec("client-dp-distributed", 4, 3, 60)
        + &client_dp(
            "noise = \"distributed\"\n\n[privacy.adaptive_clipping]\ncount_noise_multiplier = 1.0\n",
        )
        .replace("sample_rate = 1.0", "sample_rate = 0.5");
    let run = create_run(&mut client, &text).await;
    let detail = wait_for_completion(&mut client, &run).await;
    assert_eq!(detail.rounds.len(), 4, "{detail:?}");
    let mut clips = std::collections::BTreeSet::new();
    let mut updates = 0;
    for i in 0..3 {
        for u in sent(&fed.dir.path().join(format!("hospital-{i}")), &run) {
            updates += 1;
            let clip = u["client_dp"]["clip_norm"].as_f64().expect("clip norm");
            clips.insert(format!("{clip}"));
            // The site's share of the noise, N(0, z²C²/m) over 62 weights, leaves with it.
            let distance = u["l2_distance_from_global"].as_f64().expect("distance");
            assert!(distance > clip, "{u}");
        }
    }
    // About half of 12 site-rounds were sampled.
    assert!((1..12).contains(&updates), "{updates}");
    assert!(
        clips.len() > 1 || updates == 1,
        "the clip never moved: {clips:?}"
    );
    fed.stop().await;
}
