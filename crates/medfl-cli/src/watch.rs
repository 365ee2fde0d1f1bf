//! `run watch`: follows a run live with progress bars and prints each round as it completes.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use medfl_proto::v1::{GetRunRequest, RunDetail};
use tonic::Streaming;

use crate::client::{RpcResultExt, RunClient};
use crate::table;

/// Follows run `run_id` until it ends: an overall bar of rounds, a spinner with the current
/// round's phase and sites, and one [`table::round_line`] per completed round (rounds already
/// done when the watch starts are printed first). Prints the final status and returns the last
/// detail the coordinator sent.
pub async fn watch(client: &mut RunClient, run_id: &str) -> anyhow::Result<RunDetail> {
    let mut stream = client
        .watch_run(GetRunRequest {
            run_id: run_id.to_owned(),
            ..Default::default()
        })
        .await
        .rpc("WatchRun")?
        .into_inner();

    let multi = MultiProgress::new();
    let overall = multi.add(ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "{prefix:.bold} [{bar:32.cyan/blue}] {pos}/{len} rounds  {elapsed}",
    )?));
    overall.set_prefix(run_id.to_owned());
    let round = multi.add(
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?),
    );
    round.set_message("waiting for the coordinator");
    round.enable_steady_tick(Duration::from_millis(120));

    let result = follow(&mut stream, &multi, &overall, &round).await;
    round.finish_and_clear();
    overall.finish_and_clear();
    let detail = result?.with_context(|| {
        format!("the coordinator closed the watch of run {run_id} without sending it")
    })?;

    let summary = detail.summary.clone().unwrap_or_default();
    let status = table::status_name(summary.status);
    if !table::is_terminal(summary.status) {
        anyhow::bail!("the watch of run {run_id} ended while the run was still {status}");
    }
    medfl_daemon::outln!(
        "run {run_id} {status} after {}/{} rounds",
        summary.rounds_done,
        summary.rounds_total
    );
    if !summary.error.is_empty() {
        medfl_daemon::outln!("error: {}", summary.error);
    }
    medfl_daemon::out!("{}", table::privacy_summary(&detail));
    if !detail.final_evaluation.is_empty() {
        medfl_daemon::outln!("\nfinal model evaluated at each site:");
        medfl_daemon::out!("{}", table::evaluation_table(&detail.final_evaluation));
    }
    Ok(detail)
}

/// Reads the stream until the run ends or the stream does, updating the bars and printing newly
/// completed rounds above them. `None` when the stream closed before any message.
async fn follow(
    stream: &mut Streaming<RunDetail>,
    multi: &MultiProgress,
    overall: &ProgressBar,
    round: &ProgressBar,
) -> anyhow::Result<Option<RunDetail>> {
    let mut printed = BTreeSet::new();
    let mut last = None;
    while let Some(detail) = stream.message().await.rpc("WatchRun")? {
        let summary = detail.summary.clone().unwrap_or_default();
        overall.set_length(u64::from(summary.rounds_total));
        overall.set_position(u64::from(summary.rounds_done));
        if detail.current_round > 0 {
            round.set_message(table::current_round(&detail));
        } else if table::is_terminal(summary.status) && detail.evaluating {
            round.set_message("sites are evaluating the final model");
        } else if table::is_terminal(summary.status) {
            round.set_message(format!("run {}", table::status_name(summary.status)));
        } else {
            round.set_message("waiting for the next round");
        }
        let ended = table::is_terminal(summary.status);
        // A committed round is printed once its evaluation is in: when it has metrics, when a
        // later round is under way, or when the run is over.
        let evaluated = |r: &medfl_proto::v1::RoundSummary| {
            !r.eval_metrics.is_empty() || detail.current_round > r.round || ended
        };
        for r in detail.rounds.iter().filter(|r| evaluated(r)) {
            if printed.is_empty() {
                let header = table::header_line(table::ROUND_COLUMNS);
                multi.suspend(|| medfl_daemon::outln!("{header}"));
            }
            if printed.insert(r.round) {
                let line = table::round_line(r, detail.full_model_bytes);
                multi.suspend(|| medfl_daemon::outln!("{line}"));
                // Sites that did not contribute, and why (refused, awaiting approval, ...).
                for s in r
                    .sites
                    .iter()
                    .filter(|s| s.outcome() != medfl_proto::v1::SiteOutcome::Accepted)
                {
                    let note = format!(
                        "      {}: {}: {}",
                        s.site,
                        crate::table::outcome_name(s.outcome),
                        s.reason
                    );
                    multi.suspend(|| medfl_daemon::outln!("{note}"));
                }
            }
        }
        // The run is over for its watcher once its final evaluation is in as well.
        let done = ended && !detail.evaluating;
        last = Some(detail);
        if done {
            break;
        }
    }
    Ok(last)
}
