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
/// detail the coordinator sent. With `json`, rounds and the ended run are JSON lines instead.
pub async fn watch(client: &mut RunClient, run_id: &str, json: bool) -> anyhow::Result<RunDetail> {
    let request = || GetRunRequest {
        run_id: run_id.to_owned(),
        ..Default::default()
    };
    // The first call's errors (no such run, no access, no coordinator) are the command's.
    let mut stream = client
        .watch_run(request())
        .await
        .rpc("WatchRun")?
        .into_inner();
    eprintln!("following run {run_id}");

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

    let mut seen = Seen {
        json,
        ..Seen::default()
    };
    // A coordinator that restarts resumes its runs: follow it across the restart, for as long
    // as RECONNECT_FOR, rather than dying with the connection.
    let mut lost: Option<tokio::time::Instant> = None;
    // Where the run stood when the coordinator last closed the watch cleanly: closed again
    // with nothing new, it is not restarting but ending the watch.
    let mut closed_at: Option<Progress> = None;
    let result = loop {
        match follow(&mut stream, &multi, &overall, &round, &mut seen).await {
            Ok(true) => break Ok(()),
            Ok(false) => {
                let now = seen.last.as_ref().map(Progress::of);
                if now.is_some() && closed_at == now {
                    let status = seen.last.as_ref().and_then(|d| d.summary.as_ref());
                    break Err(anyhow::anyhow!(
                        "the watch of run {run_id} ended while the run was still {}",
                        status.map_or("unknown", |s| table::status_name(s.status))
                    ));
                }
                closed_at = now;
            }
            Err(status) if !is_disconnect(&status) => break Err(status).rpc("WatchRun"),
            Err(_) => {}
        }
        // Cut off (or the stream closed before the run ended): try again, a second apart.
        let since = *lost.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            break Err(anyhow::anyhow!(
                "lost the coordinator for {} s while following run {run_id}; `medfl run watch \
                 {run_id}` picks it up again",
                RECONNECT_FOR.as_secs()
            ));
        }
        round.set_message("connection to the coordinator lost; reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
        match client.watch_run(request()).await {
            Ok(s) => {
                stream = s.into_inner();
                lost = None;
                multi.suspend(|| eprintln!("following run {run_id} again"));
            }
            Err(status) if is_disconnect(&status) => {}
            Err(status) => break Err(status).rpc("WatchRun"),
        }
    };
    round.finish_and_clear();
    overall.finish_and_clear();
    result?;
    let detail = seen.last.with_context(|| {
        format!("the coordinator closed the watch of run {run_id} without sending it")
    })?;

    let summary = detail.summary.clone().unwrap_or_default();
    let status = table::status_name(summary.status);
    if !table::is_terminal(summary.status) {
        anyhow::bail!("the watch of run {run_id} ended while the run was still {status}");
    }
    if json {
        json_line("run", &detail)?;
        return Ok(detail);
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

/// One line of `run watch --json`: `{"KEY": value}`.
fn json_line(key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let line = serde_json::to_string(&serde_json::json!({ key: value }))?;
    medfl_daemon::outln!("{line}");
    Ok(())
}

/// How long `run watch` keeps trying to reach a coordinator it lost.
const RECONNECT_FOR: Duration = Duration::from_secs(600);

/// What the watch has seen so far, across reconnections.
#[derive(Default)]
struct Seen {
    /// JSON lines rather than the table.
    json: bool,
    /// Rounds already printed.
    printed: BTreeSet<u32>,
    /// The latest detail.
    last: Option<RunDetail>,
}

/// Where a run stands, to tell a watch that learns something new from one that does not.
#[derive(Debug, Clone, PartialEq)]
struct Progress {
    status: i32,
    rounds_done: u32,
    round: u32,
    phase: String,
    reported: u32,
}

impl Progress {
    fn of(d: &RunDetail) -> Self {
        let s = d.summary.clone().unwrap_or_default();
        Self {
            status: s.status,
            rounds_done: s.rounds_done,
            round: d.current_round,
            phase: d.current_phase.clone(),
            reported: d.current_reported,
        }
    }
}

/// Whether a watch failed because the connection did (a coordinator restarting, a network
/// blip) rather than because the coordinator refused it.
fn is_disconnect(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => true,
        // An HTTP/2 stream reset by a coordinator going away reads as an internal error.
        Code::Internal => {
            let m = status.message();
            m.contains("h2 protocol error") || m.contains("transport error")
        }
        _ => false,
    }
}

/// Reads the stream until the run ends (`true`) or the stream does (`false`), updating the bars
/// and printing newly completed rounds above them.
async fn follow(
    stream: &mut Streaming<RunDetail>,
    multi: &MultiProgress,
    overall: &ProgressBar,
    round: &ProgressBar,
    seen: &mut Seen,
) -> Result<bool, tonic::Status> {
    while let Some(detail) = stream.message().await? {
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
            if seen.json {
                if seen.printed.insert(r.round) {
                    let line = serde_json::to_string(&serde_json::json!({ "round": r }))
                        .map_err(|e| tonic::Status::internal(format!("JSON: {e}")))?;
                    multi.suspend(|| medfl_daemon::outln!("{line}"));
                }
                continue;
            }
            if seen.printed.is_empty() {
                let header = table::header_line(table::ROUND_COLUMNS);
                multi.suspend(|| medfl_daemon::outln!("{header}"));
            }
            if seen.printed.insert(r.round) {
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
        seen.last = Some(detail);
        if done {
            return Ok(true);
        }
    }
    Ok(false)
}
