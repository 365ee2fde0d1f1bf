//! A scripted in-process `RunService` on an ephemeral port, to drive the CLI's streaming commands.

use std::pin::Pin;

use medfl_proto::v1::run_service_server::{RunService, RunServiceServer};
use medfl_proto::v1::{
    BlobChunk, CreateRunRequest, CreateRunResponse, GetRunRequest, ListRunsRequest,
    ListRunsResponse, ListSitesRequest, ListSitesResponse, PullModelRequest, RoundSummary,
    RunDetail, RunStatus, RunSummary, SiteRoundResult, StopRunRequest, StopRunResponse,
};
use ring::digest;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::client::{self, RunClient};
use crate::{commands, pull, watch};

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The model every run serves: 10 000 bytes, sent in 4 KiB chunks.
fn model() -> Vec<u8> {
    (0..10_000u32).map(|i| (i % 251) as u8).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

fn detail(run_id: &str, status: RunStatus, done: u32, current: u32) -> RunDetail {
    let rounds = (1..=done)
        .map(|round| RoundSummary {
            round,
            attempts: 1,
            sites_selected: 2,
            sites_reported: 2,
            num_examples: 100,
            train_loss: 0.5,
            eval_metrics: [("accuracy".to_string(), 0.875), ("auc".to_string(), 0.93)]
                .into_iter()
                .collect(),
            duration_ms: 1_250,
            bytes_down: 20_000,
            bytes_up: 20_000,
            sites: vec![
                SiteRoundResult {
                    site: "st-marys".into(),
                    outcome: medfl_proto::v1::SiteOutcome::Accepted as i32,
                    num_examples: 100,
                    train_loss: 0.5,
                    eval_metrics: [("accuracy".to_string(), 0.875)].into_iter().collect(),
                    ..SiteRoundResult::default()
                },
                SiteRoundResult {
                    site: "general".into(),
                    outcome: medfl_proto::v1::SiteOutcome::Missing as i32,
                    reason: "deadline passed".into(),
                    ..SiteRoundResult::default()
                },
            ],
            global_sha256: if run_id == "lying" {
                "00".repeat(32)
            } else {
                sha(&model())
            },
            sites_omitted: 0,
            privacy_epsilon: None,
            client_epsilon: None,
        })
        .collect();
    RunDetail {
        summary: Some(RunSummary {
            run_id: run_id.into(),
            name: "mock".into(),
            status: status as i32,
            rounds_done: done,
            rounds_total: 2,
            created_unix_ms: 1,
            error: if status == RunStatus::Failed {
                "too few sites".into()
            } else {
                String::new()
            },
            ..RunSummary::default()
        }),
        rounds,
        current_round: current,
        current_phase: if current > 0 {
            "train".into()
        } else {
            "".into()
        },
        current_reported: 1,
        current_selected: 2,
        ..RunDetail::default()
    }
}

struct Mock;

#[tonic::async_trait]
impl RunService for Mock {
    async fn create_run(
        &self,
        _: Request<CreateRunRequest>,
    ) -> Result<Response<CreateRunResponse>, Status> {
        Ok(Response::new(CreateRunResponse {
            run_id: "r1".into(),
        }))
    }

    async fn list_runs(
        &self,
        _: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Ok(Response::new(ListRunsResponse::default()))
    }

    async fn get_run(&self, req: Request<GetRunRequest>) -> Result<Response<RunDetail>, Status> {
        let id = req.into_inner().run_id;
        if id == "busy" {
            return Ok(Response::new(detail(&id, RunStatus::Running, 2, 3)));
        }
        Ok(Response::new(detail(&id, RunStatus::Completed, 2, 0)))
    }

    type WatchRunStream = Boxed<RunDetail>;

    async fn watch_run(
        &self,
        req: Request<GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let id = req.into_inner().run_id;
        let end = if id == "failing" {
            RunStatus::Failed
        } else {
            RunStatus::Completed
        };
        let mut updates = vec![
            detail(&id, RunStatus::Running, 0, 1),
            detail(&id, RunStatus::Running, 1, 2),
            detail(&id, end, 2, 0),
        ];
        if id == "cut" {
            updates.truncate(2);
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            updates.into_iter().map(Ok),
        ))))
    }

    async fn stop_run(
        &self,
        _: Request<StopRunRequest>,
    ) -> Result<Response<StopRunResponse>, Status> {
        Ok(Response::new(StopRunResponse {}))
    }

    async fn list_sites(
        &self,
        _: Request<ListSitesRequest>,
    ) -> Result<Response<ListSitesResponse>, Status> {
        Ok(Response::new(ListSitesResponse::default()))
    }

    async fn evaluate_run(
        &self,
        _req: Request<medfl_proto::v1::EvaluateRunRequest>,
    ) -> Result<Response<medfl_proto::v1::EvaluateRunResponse>, Status> {
        Err(Status::unimplemented(
            "the mock coordinator does not evaluate",
        ))
    }

    type PullModelStream = Boxed<BlobChunk>;

    async fn pull_model(
        &self,
        req: Request<PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let id = req.into_inner().run_id;
        if id == "nope" {
            return Err(Status::not_found("run `nope` does not exist"));
        }
        let bytes = model();
        let mut chunks: Vec<BlobChunk> = bytes
            .chunks(4096)
            .enumerate()
            .map(|(i, data)| BlobChunk {
                offset: (i * 4096) as u64,
                data: data.to_vec(),
                total_size: if i == 0 { bytes.len() as u64 } else { 0 },
            })
            .collect();
        if id == "short" {
            chunks.pop();
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }
}

/// A mock coordinator on an ephemeral port and a client connected to it; the server stops when
/// the sender is dropped.
async fn start() -> anyhow::Result<(RunClient, oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunServiceServer::new(Mock))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let client = client::connect_with(&format!("http://{addr}"), None).await?;
    Ok((client, stop))
}

#[tokio::test]
async fn watch_follows_the_run_to_its_end() -> anyhow::Result<()> {
    let (mut client, _stop) = start().await?;
    let done = watch::watch(&mut client, "r1", false).await?;
    assert_eq!(done.rounds.len(), 2);
    assert!(crate::table::is_terminal(
        done.summary.unwrap_or_default().status
    ));

    let failed = watch::watch(&mut client, "failing", false).await?;
    assert_eq!(
        failed.summary.unwrap_or_default().status,
        RunStatus::Failed as i32
    );

    let err = watch::watch(&mut client, "cut", false)
        .await
        .map_or_else(|e| e.to_string(), |_| String::new());
    assert!(err.contains("still running"), "{err}");
    Ok(())
}

#[tokio::test]
async fn pull_writes_the_whole_model() -> anyhow::Result<()> {
    let (mut client, _stop) = start().await?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("model.safetensors");

    let pulled = pull::pull(&mut client, "r1", 2, &out).await?;
    assert_eq!(pulled.size, 10_000);
    assert_eq!(pulled.sha256, sha(&model()));
    assert_eq!(std::fs::read(&out)?, model());
    assert!(!dir.path().join("model.safetensors.part").exists());

    for (run, round, expect) in [
        ("short", 0, "stopped after 8192 of 10000 bytes"),
        ("lying", 1, "but the run lists"),
        ("nope", 0, "NotFound"),
    ] {
        let out = dir.path().join(run);
        let err = pull::pull(&mut client, run, round, &out)
            .await
            .map_or_else(|e| e.to_string(), |_| String::new());
        assert!(err.contains(expect), "{run}: {err}");
        assert!(!out.exists(), "{run}");
        assert!(!dir.path().join(format!("{run}.part")).exists(), "{run}");
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_coordinator_suggests_the_option() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let err = client::connect_with(&format!("http://{addr}"), None)
        .await
        .map_or_else(|e| format!("{e:#}"), |_| String::new());
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("--coordinator"), "{err}");
    Ok(())
}

#[tokio::test]
async fn show_finds_the_asked_round() -> anyhow::Result<()> {
    let (mut client, _stop) = start().await?;
    commands::show(&mut client, "r1", None, false).await?;
    commands::show(&mut client, "r1", Some(1), false).await?;
    let err = commands::show(&mut client, "r1", Some(9), false)
        .await
        .map_or_else(|e| e.to_string(), |()| String::new());
    assert!(
        err.contains("no finished round 9 (finished: 1, 2)"),
        "{err}"
    );
    // The round in progress is said to be in progress.
    let err = commands::show(&mut client, "busy", Some(3), false)
        .await
        .map_or_else(|e| e.to_string(), |()| String::new());
    assert!(
        err.contains("round 3 train: 1/2 sites reported") && err.contains("once it finishes"),
        "{err}"
    );
    Ok(())
}
