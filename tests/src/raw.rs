//! A hand-driven site for tests: speaks the site protocol directly so a test can send exactly
//! the bytes it wants (bad updates, duplicates, late results) or vanish mid-round.

use medfl_core::safetensors::encode;
use medfl_core::ModelParams;
use medfl_proto::convert::{SITE_METADATA, TOKEN_METADATA};
use medfl_proto::v1;
use medfl_proto::v1::site_service_client::SiteServiceClient;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A site driven by the test.
pub struct RawSite {
    /// The site's name.
    pub name: String,
    token: String,
    /// The generated client.
    pub client: SiteServiceClient<Channel>,
    /// The key it registered, which signs its updates.
    signer: std::sync::Arc<Ed25519KeyPair>,
    /// The coordinator's public key, as registration returned it.
    pub coordinator_key: Vec<u8>,
}

/// A fresh Ed25519 key.
pub fn new_key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
}

impl RawSite {
    /// Connects (with its own kit when `coordinator` serves TLS) and registers with the breast
    /// cancer dataset's columns.
    pub async fn register(coordinator: &crate::Coordinator, name: &str) -> Self {
        let mut client =
            SiteServiceClient::new(coordinator.channel_as(medfl_pki::Role::Site, name).await);
        let token = format!("{name}-secret-token-0123456789");
        let mut columns = crate::breast_cancer_features();
        columns.push("diagnosis".into());
        let signer = new_key();
        let reply = client
            .register(v1::RegisterRequest {
                site: name.into(),
                token: token.clone(),
                datasets: vec![v1::DatasetSchema {
                    name: "breast_cancer".into(),
                    columns,
                    rows: 10_000,
                    class_counts: Default::default(),
                }],
                version: "test".into(),
                signing_public_key: signer.public_key().as_ref().to_vec(),
            })
            .await
            .expect("register")
            .into_inner();
        Self {
            name: name.into(),
            token,
            client,
            signer: std::sync::Arc::new(signer),
            coordinator_key: reply.coordinator_public_key,
        }
    }

    /// Signs `header` as this site, with `key` when given (else its registered key).
    pub fn sign_with(&self, header: &mut v1::UpdateHeader, key: Option<&Ed25519KeyPair>) {
        let claim = medfl_proto::convert::update_claim(header, &self.name);
        header.signature = key
            .unwrap_or(&self.signer)
            .sign(&claim.message())
            .as_ref()
            .to_vec();
    }

    /// A correct, signed header for `bytes` as an update to `task`.
    pub fn header_for(&self, task: &v1::Task, bytes: &[u8], examples: u64) -> v1::UpdateHeader {
        let mut header = header_for(task, bytes, examples);
        self.sign_with(&mut header, None);
        header
    }

    /// The same site with another token (an impostor).
    pub fn impostor(&self, name: &str) -> Self {
        Self {
            name: name.into(),
            token: "not-the-right-token-at-all".into(),
            client: self.client.clone(),
            signer: self.signer.clone(),
            coordinator_key: self.coordinator_key.clone(),
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

    /// Polls until a train or evaluate task arrives; a statistics task (federated
    /// standardisation, before round 1) is answered on the way with [`Self::send_statistics`].
    pub async fn next_task(&mut self) -> v1::Task {
        loop {
            let task = self.next_any_task().await;
            if task.kind == v1::TaskKind::Statistics as i32 {
                self.send_statistics(&task).await.expect("statistics taken");
                continue;
            }
            return task;
        }
    }

    /// Polls until any task arrives.
    pub async fn next_any_task(&mut self) -> v1::Task {
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

    /// Answers the statistics task of a new tabular run (federated standardisation asks every
    /// site before round 1): call it for every raw site of a run before any polls for its
    /// train task, or the first waits for the others until the phase's deadline.
    pub async fn statistics(sites: &mut [&mut RawSite]) {
        for site in sites.iter_mut() {
            let task = site.next_any_task().await;
            assert_eq!(task.kind, v1::TaskKind::Statistics as i32, "{task:?}");
            site.send_statistics(&task).await.expect("statistics taken");
        }
    }

    /// Answers a statistics task with sums of 100 rows whose every feature has mean 1 and
    /// deviation 1.
    pub async fn send_statistics(&mut self, task: &v1::Task) -> Result<(), Status> {
        let spec = medfl_core::spec::RunSpec::from_toml(&task.spec_toml).expect("spec");
        let d = spec.task.features.len();
        self.client
            .report_statistics(self.req(v1::ReportStatisticsRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                attempt: task.attempt,
                count: 100,
                sum: vec![100.0; d],
                sum_sq: vec![200.0; d],
            }))
            .await
            .map(|_| ())
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
        let header = self.header_for(task, &bytes, examples);
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
                declined: v1::Declined::Unspecified.into(),
            }))
            .await
            .expect("report failure");
    }
}

/// A correct but unsigned header for `bytes` as an update to `task`.
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
        signature: Vec::new(),
        privacy_epsilon: None,
        clip_indicator: None,
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
