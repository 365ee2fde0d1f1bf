//! A model over 256 MiB makes a full round trip: download, update upload, aggregation.

use medfl_e2e::*;

use crate::fedavg::{assert_global_is, expected_average};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quarter_gigabyte_model_round_trips_retaining_updates_at_sites_allowing_big_updates() {
    // Updates are kept (a non-default) so the test can average them itself, and the sites'
    // policies allow updates above their default 100 MB (a non-default too).
    let fed = Federation::start_with_sites(
        2,
        true,
        |c| c.retain_updates = true,
        |s| s.policy.max_update_bytes = 400_000_000,
    )
    .await;
    let mut client = fed.coordinator.runs().await;
    // 30 -> 9000 -> 8000 -> 2: 72.3 million parameters, 289 MB of F32.
    let spec = breast_cancer_spec("big-model", 1, 2, 600)
        .replace("hidden = []", "hidden = [9000, 8000]")
        .replace("local_epochs = 2", "local_steps = 1")
        .replace("learning_rate = 0.1", "learning_rate = 0.001");
    let run = create_run(&mut client, &spec).await;
    let detail = wait_for_completion(&mut client, &run).await;
    let round = &detail.rounds[0];
    let size = std::fs::metadata(fed.coordinator.blob_path(&round.global_sha256))
        .expect("global blob")
        .len();
    assert!(size >= 256 << 20, "model is {size} bytes");
    assert!(round.bytes_down >= 2 * size, "both sites downloaded it");
    assert!(round.bytes_up >= 2 * size, "both sites uploaded an update");
    let expected = expected_average(&fed.coordinator, &run, 1);
    assert_global_is(&fed.coordinator, &round.global_sha256, &expected);
    fed.stop().await;
}
