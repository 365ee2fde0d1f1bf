//! A hand-driven site for tests: speaks the site protocol directly so a test can send exactly
//! the bytes it wants (bad updates, duplicates, late results) or vanish mid-round.

use medfl_core::safetensors::encode;
use medfl_core::ModelParams;
use medfl_proto::convert::{SITE_METADATA, TOKEN_METADATA};
use medfl_proto::v1;
use medfl_proto::v1::site_service_client::SiteServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A site driven by the test.
pub struct RawSite {
    /// The site's name.
    pub name: String,
    token: String,
    /// The generated client.
    pub client: SiteServiceClient<Channel>,
}

impl RawSite {
    /// Connects and registers with the breast cancer dataset's columns.
    pub async fn register(url: &str, name: &str) -> Self {
        let mut client = SiteServiceClient::connect(url.to_string())
            .await
            .expect("connect");
        let token = format!("{name}-secret-token-0123456789");
        let mut columns = crate::breast_cancer_features();
        columns.push("diagnosis".into());
        client
            .register(v1::RegisterRequest {
                site: name.into(),
                token: token.clone(),
                datasets: vec![v1::DatasetSchema {
                    name: "breast_cancer".into(),
                    columns,
                    rows: 100,
                }],
                version: "test".into(),
            })
            .await
            .expect("register");
        Self {
            name: name.into(),
            token,
            client,
        }
    }

    /// The same site with another token (an impostor).
    pub fn impostor(&self, name: &str) -> Self {
        Self {
            name: name.into(),
            token: "not-the-right-token-at-all".into(),
            client: self.client.clone(),
        }
    }

    /// Wraps a message with this site's identity.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(SITE_METADATA, self.name.parse().expect("ascii name"));
        req.metadata_mut()
            .insert(TOKEN_METADATA, self.token.parse().expect("ascii token"));
        req
    }

    /// Polls until a task arrives.
    pub async fn next_task(&mut self) -> v1::Task {
        loop {
            let reply = self
                .client
                .poll_task(self.req(v1::PollTaskRequest {}))
                .await
                .expect("poll");
            if let Some(task) = reply.into_inner().task {
                return task;
            }
        }
    }

    /// Downloads a global model.
    pub async fn download(&mut self, sha: &str) -> ModelParams {
        let mut stream = self
            .client
            .download_blob(self.req(v1::DownloadBlobRequest {
                sha256: sha.into(),
                offset: 0,
            }))
            .await
            .expect("download")
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.expect("chunk") {
            bytes.extend_from_slice(&chunk.data);
        }
        medfl_core::safetensors::decode(&bytes).expect("model")
    }

    /// Sends `bytes` as an update under `header`, cut into 64 KiB chunks; `send` limits how
    /// many bytes actually go out (to simulate a broken-off upload).
    pub async fn push_raw(
        &mut self,
        header: v1::UpdateHeader,
        bytes: Vec<u8>,
        send: usize,
    ) -> Result<v1::PushUpdateResponse, Status> {
        let mut msgs = vec![v1::UpdateChunk {
            part: Some(v1::update_chunk::Part::Header(header)),
        }];
        for chunk in bytes[..send.min(bytes.len())].chunks(64 * 1024) {
            msgs.push(v1::UpdateChunk {
                part: Some(v1::update_chunk::Part::Data(chunk.to_vec())),
            });
        }
        self.client
            .push_update(self.req(tokio_stream::iter(msgs)))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends `params` as a well-formed update for `task`, claiming `examples`.
    pub async fn push(
        &mut self,
        task: &v1::Task,
        params: &ModelParams,
        examples: u64,
    ) -> Result<v1::PushUpdateResponse, Status> {
        let bytes = encode(params);
        let header = header_for(task, &bytes, examples);
        let len = bytes.len();
        self.push_raw(header, bytes, len).await
    }

    /// Reports an evaluation of the task's model.
    pub async fn evaluate(&mut self, task: &v1::Task, accuracy: f64) -> Result<(), Status> {
        self.client
            .report_evaluation(self.req(v1::ReportEvaluationRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                global_sha256: task.global_sha256.clone(),
                num_examples: 10,
                metrics: [("accuracy".to_string(), accuracy)].into(),
            }))
            .await
            .map(|_| ())
    }

    /// Says the task cannot be done.
    pub async fn fail(&mut self, task: &v1::Task, reason: &str) {
        self.client
            .report_task_failure(self.req(v1::ReportTaskFailureRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                attempt: task.attempt,
                reason: reason.into(),
            }))
            .await
            .expect("report failure");
    }
}

/// A correct header for `bytes` as an update to `task`.
pub fn header_for(task: &v1::Task, bytes: &[u8], examples: u64) -> v1::UpdateHeader {
    v1::UpdateHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        attempt: task.attempt,
        base_sha256: task.global_sha256.clone(),
        sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes)),
        size: bytes.len() as u64,
        num_examples: examples,
        train_loss: 0.5,
        train_steps: 1,
    }
}

/// `params` with every value shifted by `by`.
pub fn shifted(params: &ModelParams, by: f32) -> ModelParams {
    let mut out = params.clone();
    for t in &mut out.tensors {
        for v in &mut t.data {
            *v += by;
        }
    }
    out
}
