//! The one-call subcommands: create, list, show and stop runs, and list sites.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use medfl_core::spec::RunSpec;
use medfl_proto::v1::{
    CreateRunRequest, GetRunRequest, ListRunsRequest, ListSitesRequest, StopRunRequest,
};

use crate::client::{unary, RpcResultExt, RunClient};
use crate::table;

/// Reads and checks the spec at `path`; errors name the file and the field or line.
pub fn read_spec(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read run spec {}", path.display()))?;
    RunSpec::from_toml(&text).with_context(|| format!("invalid run spec {}", path.display()))?;
    Ok(text)
}

/// `run create`: checks the spec locally, creates the run and prints its id.
pub async fn create(client: &mut RunClient, spec: &Path) -> anyhow::Result<()> {
    let spec_toml = read_spec(spec)?;
    let run_id = client
        .create_run(unary(CreateRunRequest { spec_toml }))
        .await
        .rpc("CreateRun")?
        .into_inner()
        .run_id;
    medfl_daemon::outln!("{run_id}");
    eprintln!("follow it with: medfl run watch {run_id}");
    Ok(())
}

/// Prints `value` as indented JSON: what every read command prints with `--json`.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    medfl_daemon::outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `run list`: a table of every run.
pub async fn list(client: &mut RunClient, json: bool) -> anyhow::Result<()> {
    let runs = client
        .list_runs(unary(ListRunsRequest {}))
        .await
        .rpc("ListRuns")?
        .into_inner()
        .runs;
    if json {
        return print_json(&runs);
    }
    if runs.is_empty() {
        medfl_daemon::outln!("no runs yet; create one with: medfl run create SPEC.toml");
    } else {
        medfl_daemon::out!("{}", table::runs_table(&runs));
    }
    Ok(())
}

/// `run show`: the run's summary, its rounds, and the per-site results of `round` (the last
/// finished round when `None`).
pub async fn show(
    client: &mut RunClient,
    run_id: &str,
    round: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let detail = client
        .get_run(unary(GetRunRequest {
            run_id: run_id.to_owned(),
            sites_of_round: round.unwrap_or(0),
        }))
        .await
        .rpc("GetRun")?
        .into_inner();
    let sites_of = match round {
        Some(n) => Some(
            detail
                .rounds
                .iter()
                .find(|r| r.round == n)
                .with_context(|| {
                    if n == detail.current_round {
                        return format!(
                            "run {run_id}'s {}; its results show once it finishes",
                            table::current_round(&detail)
                        );
                    }
                    let done: Vec<String> =
                        detail.rounds.iter().map(|r| r.round.to_string()).collect();
                    format!(
                        "run {run_id} has no finished round {n} (finished: {})",
                        if done.is_empty() {
                            "none".into()
                        } else {
                            done.join(", ")
                        }
                    )
                })?,
        ),
        None => detail.rounds.last(),
    };
    if json {
        return match sites_of {
            // The round asked for, with its per-site results.
            Some(chosen) if round.is_some() => print_json(chosen),
            _ => print_json(&detail),
        };
    }

    medfl_daemon::out!("{}", table::run_overview(&detail));
    let Some(chosen) = sites_of else {
        medfl_daemon::outln!("\nno round finished yet");
        return Ok(());
    };
    medfl_daemon::outln!();
    medfl_daemon::out!(
        "{}",
        table::rounds_table(&detail.rounds, detail.full_model_bytes)
    );
    if detail.rounds_omitted > 0 {
        medfl_daemon::outln!(
            "({} earlier rounds left out to fit the reply; ask for one with --round N)",
            detail.rounds_omitted
        );
    }
    medfl_daemon::out!("{}", table::privacy_summary(&detail));
    medfl_daemon::outln!("\nsites in round {}:", chosen.round);
    if chosen.sites.is_empty() {
        medfl_daemon::outln!("no site results");
    } else {
        medfl_daemon::out!("{}", table::site_results_table(&chosen.sites));
    }
    if chosen.sites_omitted > 0 {
        medfl_daemon::outln!(
            "({} more site results left out to fit the reply)",
            chosen.sites_omitted
        );
    }
    if !detail.final_evaluation.is_empty() {
        medfl_daemon::outln!("\nfinal model evaluated at each site:");
        medfl_daemon::out!("{}", table::evaluation_table(&detail.final_evaluation));
    }
    if detail.evaluations_omitted > 0 {
        medfl_daemon::outln!(
            "({} more evaluations left out to fit the reply)",
            detail.evaluations_omitted
        );
    }
    Ok(())
}

/// `run evaluate`: asks every online site holding the run's data to score the run's latest
/// model, waits for their answers and prints them per site.
pub async fn evaluate(client: &mut RunClient, run_id: &str, json: bool) -> anyhow::Result<()> {
    let asked = client
        .evaluate_run(unary(medfl_proto::v1::EvaluateRunRequest {
            run_id: run_id.to_owned(),
        }))
        .await
        .rpc("EvaluateRun")?
        .into_inner();
    eprintln!(
        "{} sites asked to evaluate model {}",
        asked.sites_asked,
        table::short_sha(&asked.global_sha256)
    );
    let mut stream = client
        .watch_run(GetRunRequest {
            run_id: run_id.to_owned(),
            ..Default::default()
        })
        .await
        .rpc("WatchRun")?
        .into_inner();
    let mut last = None;
    while let Some(detail) = stream.message().await.rpc("WatchRun")? {
        let done = !detail.evaluating;
        last = Some(detail);
        if done {
            break;
        }
    }
    let detail = last.context("the coordinator closed the watch without sending the run")?;
    let answered: Vec<_> = detail
        .final_evaluation
        .into_iter()
        .filter(|e| e.global_sha256 == asked.global_sha256)
        .collect();
    if json {
        print_json(&answered)?;
    } else {
        medfl_daemon::out!("{}", table::evaluation_table(&answered));
    }
    evaluation_verdict(run_id, answered.len(), asked.sites_asked)
}

/// Whether an evaluation that `answered` of `asked` sites answered succeeded: some sites
/// missing is a warning, none answering an error (exit 1), so scripts can tell.
fn evaluation_verdict(run_id: &str, answered: usize, asked: u32) -> anyhow::Result<()> {
    if answered == 0 && asked > 0 {
        anyhow::bail!(
            "none of the {asked} sites asked answered before the deadline; `medfl run show \
             {run_id}` lists each site's outcome and reason"
        );
    }
    if (answered as u32) < asked {
        eprintln!("{answered} of {asked} sites answered before the deadline");
    }
    Ok(())
}

/// `run stop`: asks the coordinator to stop the run.
pub async fn stop(client: &mut RunClient, run_id: &str) -> anyhow::Result<()> {
    client
        .stop_run(unary(StopRunRequest {
            run_id: run_id.to_owned(),
        }))
        .await
        .rpc("StopRun")?;
    medfl_daemon::outln!("run {run_id} stopped");
    Ok(())
}

/// `sites`: a table of the sites the coordinator knows.
pub async fn sites(client: &mut RunClient, columns: bool, json: bool) -> anyhow::Result<()> {
    // A page at a time: each fits the message limit, however many sites there are.
    let mut sites = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sites(unary(ListSitesRequest {
                page_size: 0,
                page_token,
            }))
            .await
            .rpc("ListSites")?
            .into_inner();
        sites.extend(page.sites);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if json {
        return print_json(&sites);
    }
    if sites.is_empty() {
        medfl_daemon::outln!("no site has registered yet");
        return Ok(());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    medfl_daemon::out!("{}", table::sites_table(&sites, now_ms));
    if columns {
        medfl_daemon::out!("{}", table::site_columns(&sites));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "bc"
rounds = 3

[model]
kind = "mlp"

[task]
dataset = "bc"
features = ["x1", "x2"]
label = "y"
labels = ["B", "M"]
"#;

    #[test]
    fn an_evaluation_nobody_answered_is_an_error() {
        let err = evaluation_verdict("r1", 0, 3).unwrap_err().to_string();
        assert!(
            err.contains("none of the 3 sites") && err.contains("run show r1"),
            "{err}"
        );
        assert!(evaluation_verdict("r1", 1, 3).is_ok());
        assert!(evaluation_verdict("r1", 3, 3).is_ok());
        assert!(evaluation_verdict("r1", 0, 0).is_ok());
    }

    #[test]
    fn spec_errors_name_file_and_field() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let good = dir.path().join("good.toml");
        std::fs::write(&good, SPEC)?;
        assert_eq!(read_spec(&good)?, SPEC);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, SPEC.replace("rounds = 3", "rounds = 0"))?;
        let err = read_spec(&bad).map_or_else(|e| format!("{e:#}"), |_| String::new());
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("rounds: must be"), "{err}");

        let missing = dir.path().join("missing.toml");
        let err = read_spec(&missing).map_or_else(|e| format!("{e:#}"), |_| String::new());
        assert!(err.contains("missing.toml"), "{err}");
        Ok(())
    }
}
