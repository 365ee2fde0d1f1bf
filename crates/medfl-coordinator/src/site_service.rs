//! `SiteService`: what hospital sites call. Handlers identify the site, check the request against
//! the open round, stream bytes, and hand every result to the run's engine.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use medfl_audit::Event;
use medfl_core::round::{Phase, Refusal};
use medfl_core::safetensors::StreamDecoder;
use medfl_core::validate::UpdateValidator;
use medfl_proto::convert::{SITE_METADATA, TOKEN_METADATA};
use medfl_proto::v1::{self, site_service_server::SiteService};
use serde_json::json;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::blobs::sha256_hex;
use crate::engine::record_refusal;
use crate::state::{now_ms, EngineMsg, Shared, SiteLive};
use crate::store::SiteRecord;
use crate::stream::{blob_stream, file_stream};
use crate::CoordinatorError;

/// Longest site name accepted.
const MAX_NAME: usize = 64;
/// Chunks of one upload queued for its writer thread before the socket is read further.
const UPLOAD_QUEUE: usize = 4;
/// Largest example count a site may claim for one update.
const MAX_EXAMPLES: u64 = 1_000_000_000;

/// The site-facing service.
pub struct SiteApi {
    shared: Arc<Shared>,
}

impl SiteApi {
    /// The service over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Identifies the caller from its metadata and marks it seen.
    fn identify<T>(&self, req: &Request<T>) -> Result<String, CoordinatorError> {
        let meta = req.metadata();
        let get = |key: &str| {
            meta.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| {
                    CoordinatorError::Unauthenticated(format!("missing `{key}` metadata"))
                })
        };
        let site = get(SITE_METADATA)?;
        crate::auth::check_site_name(req, &site)
            .map_err(|s| CoordinatorError::PermissionDenied(s.message().to_string()))?;
        let token = get(TOKEN_METADATA)?;
        let now = now_ms();
        let mut sites = self.shared.sites()?;
        let live = sites.get_mut(&site).ok_or_else(|| {
            CoordinatorError::Unauthenticated(format!("unknown site `{site}`: register first"))
        })?;
        if live.token_sha256 != sha256_hex(token.as_bytes()) {
            return Err(CoordinatorError::Unauthenticated(format!(
                "wrong token for site `{site}`"
            )));
        }
        let was_offline = !self.shared.is_online(live, now);
        live.last_seen_ms = now;
        drop(sites);
        if was_offline {
            info!(site = %site, "site online");
            self.shared.db(|s| s.touch_site(&site, now))?;
            // A run may be waiting for enough sites.
            self.shared.notify_tasks();
        }
        Ok(site)
    }

    async fn push_update(
        &self,
        site: &str,
        mut stream: Streaming<v1::UpdateChunk>,
    ) -> Result<v1::PushUpdateResponse, CoordinatorError> {
        let header = match stream.message().await {
            Ok(Some(v1::UpdateChunk {
                part: Some(v1::update_chunk::Part::Header(h)),
            })) => h,
            Ok(_) => {
                return Err(CoordinatorError::Invalid(
                    "an upload must start with its header".into(),
                ))
            }
            Err(status) => {
                return Err(CoordinatorError::Invalid(format!(
                    "upload ended before its header: {}",
                    status.message()
                )))
            }
        };
        // Nothing from the header is kept or logged until its fields are within bounds, and a
        // refusal is recorded only for a running run's open attempt that selected this site.
        crate::edge::update_header(&header)?;
        let (round, attempt) = (header.round, header.attempt);
        let handle = self.shared.run_handle(&header.run_id)?;
        let snap = Self::check_open(site, &header, &handle)?;
        let refuse = |e: CoordinatorError| {
            record_refusal(
                &self.shared,
                &header.run_id,
                round,
                attempt,
                site,
                &e.to_string(),
            );
            e
        };
        self.precheck(site, &header, &handle, &snap)
            .map_err(refuse)?;
        let _uploading = self.shared.begin_upload(site)?;
        let config = &self.shared.config;
        let wait = Duration::from_secs(config.upload_slot_timeout_secs);
        let _permit = match tokio::time::timeout(wait, self.shared.uploads.acquire()).await {
            Ok(permit) => {
                permit.map_err(|_| CoordinatorError::Unavailable("shutting down".into()))?
            }
            Err(_) => {
                return Err(CoordinatorError::Unavailable(format!(
                    "all {} upload slots stayed busy for {}s: try again",
                    config.max_concurrent_uploads, config.upload_slot_timeout_secs
                )))
            }
        };
        let sha = self
            .receive(&header, &handle, snap.deadline_ms, &mut stream)
            .await
            .map_err(refuse)?;
        // Pinned until the engine answers: it records the update's owner if it accepts it.
        let pinned = self.shared.blobs.pinned(&sha);
        // The engine records its own refusals.
        let answer = self
            .send_to_engine(&header.run_id, |reply| EngineMsg::Update {
                site: site.to_string(),
                round,
                attempt,
                base_sha256: header.base_sha256.clone(),
                sha256: sha.clone(),
                examples: header.num_examples,
                train_loss: header.train_loss,
                privacy_epsilon: header.privacy_epsilon,
                clip_indicator: header.clip_indicator,
                reply,
            })
            .await;
        drop(pinned);
        // Nothing may own it now: refused (late, duplicate, over the bound), the run ended, or
        // accepted into an attempt that closed, and was released, while the pin held it. A
        // file still owned (by this update, or the same bytes by another owner) stays.
        let shared = self.shared.clone();
        let collected = tokio::task::spawn_blocking(move || {
            shared
                .blobs
                .collect([sha], |id| shared.db(|s| s.is_owned(id)))
        })
        .await;
        if let Ok(Err(e)) = collected {
            tracing::warn!(site = %site, error = %e, "could not delete an update nothing owns");
        }
        answer?;
        Ok(v1::PushUpdateResponse {
            accepted: true,
            message: format!("update for round {round} accepted"),
        })
    }

    /// Whether the header names the open train attempt of the run and this site was selected
    /// for it: anything else is refused without a trace, whatever round or attempt it names.
    /// Returns the open round as checked; the engine checks again when the update arrives.
    fn check_open(
        site: &str,
        header: &v1::UpdateHeader,
        handle: &crate::state::RunHandle,
    ) -> Result<crate::state::RoundSnapshot, CoordinatorError> {
        let snap = handle.snapshot.borrow().clone();
        let snap = snap.ok_or(Refusal::NotOpen {
            round: header.round,
            attempt: header.attempt,
            open_round: 0,
            open_attempt: 0,
        })?;
        if snap.round != header.round || snap.attempt != header.attempt {
            return Err(Refusal::NotOpen {
                round: header.round,
                attempt: header.attempt,
                open_round: snap.round,
                open_attempt: snap.attempt,
            }
            .into());
        }
        if snap.phase != Phase::Train {
            return Err(Refusal::WrongPhase {
                round: header.round,
                phase: snap.phase.as_str(),
            }
            .into());
        }
        if !snap.selected.contains(site) {
            return Err(Refusal::NotSelected {
                site: site.into(),
                round: header.round,
            }
            .into());
        }
        Ok(snap)
    }

    /// Cheap checks, for the open attempt `snap` that selected `site`, before any bytes are
    /// read: is this update wanted at all?
    fn precheck(
        &self,
        site: &str,
        header: &v1::UpdateHeader,
        handle: &crate::state::RunHandle,
        snap: &crate::state::RoundSnapshot,
    ) -> Result<(), CoordinatorError> {
        let max_examples = handle.spec.defense.max_examples.min(MAX_EXAMPLES);
        if header.num_examples == 0 || header.num_examples > max_examples {
            return Err(CoordinatorError::Invalid(format!(
                "num_examples must be 1..={max_examples}, got {}",
                header.num_examples
            )));
        }
        // A site trains on part of what it registered: it cannot have more examples than rows.
        let dataset = &handle.spec.task.dataset;
        let rows = self
            .shared
            .sites()?
            .get(site)
            .and_then(|s| s.rows.get(dataset).copied());
        if let Some(rows) = rows.filter(|r| *r > 0) {
            if header.num_examples > rows {
                return Err(CoordinatorError::Invalid(format!(
                    "num_examples {} exceeds the {rows} rows site `{site}` registered for \
                     dataset `{dataset}`",
                    header.num_examples
                )));
            }
        }
        if !header.train_loss.is_finite() {
            return Err(CoordinatorError::Invalid("train_loss is not finite".into()));
        }
        if let Some(e) = header
            .privacy_epsilon
            .filter(|e| !(e.is_finite() && *e >= 0.0))
        {
            return Err(CoordinatorError::Invalid(format!(
                "privacy_epsilon {e} is not a finite number >= 0"
            )));
        }
        check_clip_indicator(header.clip_indicator, &handle.spec)?;
        // An F32 update of the same tensors is the global model's size give or take its header.
        let limit = snap.global_size + medfl_core::safetensors::HEADER_ALLOWANCE;
        if header.size == 0 || header.size > limit {
            return Err(CoordinatorError::Invalid(format!(
                "update size {} is outside 1..={limit} bytes",
                header.size
            )));
        }
        if !crate::blobs::is_blob_id(&header.sha256) {
            return Err(CoordinatorError::Invalid(
                "sha256 must be 64 lowercase hex digits".into(),
            ));
        }
        // Refuse unwanted uploads before reading their bytes; the engine checks again.
        let refusal = if !snap.pending.contains(site) && !snap.awaiting.contains(site) {
            Some(Refusal::Duplicate {
                site: site.into(),
                round: header.round,
            })
        } else if now_ms() >= snap.deadline_ms {
            Some(Refusal::Late {
                site: site.into(),
                round: header.round,
            })
        } else {
            None
        };
        if let Some(r) = refusal {
            return Err(r.into());
        }
        // Last: the signature binds every field checked above to this site's key.
        let key = self
            .shared
            .sites()?
            .get(site)
            .map(|s| s.signing_key.clone())
            .unwrap_or_default();
        crate::signing::verify_update(site, &key, header)
    }

    /// Streams the update to a temporary blob, validating as it goes; returns its id. Writing,
    /// hashing, decoding and the final fsync run on a blocking thread fed through a small
    /// bounded channel, so the async threads only move bytes off the socket.
    ///
    /// The receive is bounded in time: each message must come within the idle timeout, and the
    /// whole upload within `size / min_upload_bytes_per_sec` (at least the idle timeout) and
    /// before the round's deadline (`deadline_ms`, wall time), so a slow sender gives its slot
    /// back.
    async fn receive(
        &self,
        header: &v1::UpdateHeader,
        handle: &crate::state::RunHandle,
        deadline_ms: u64,
        stream: &mut Streaming<v1::UpdateChunk>,
    ) -> Result<String, CoordinatorError> {
        let config = &self.shared.config;
        let idle = Duration::from_secs(config.upload_idle_timeout_secs);
        let transfer = Duration::from_secs(header.size / config.min_upload_bytes_per_sec).max(idle);
        let to_deadline = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        let until = tokio::time::Instant::now() + transfer.min(to_deadline);
        let incoming = self.shared.blobs.incoming()?;
        let schema = handle.schema.clone();
        let (size, expected) = (header.size, header.sha256.clone());
        let (chunks, mut arriving) = tokio::sync::mpsc::channel::<Vec<u8>>(UPLOAD_QUEUE);
        // Set when the upload broke off, so that what arrived is not stored.
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abandon = abandoned.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<String, CoordinatorError> {
            let mut incoming = incoming;
            let mut decoder = StreamDecoder::new(Some(size));
            let mut validator = UpdateValidator::new(&schema);
            while let Some(data) = arriving.blocking_recv() {
                incoming.write(&data)?;
                decoder.push(&data, &mut validator)?;
            }
            if abandon.load(std::sync::atomic::Ordering::Acquire) {
                return Err(CoordinatorError::Invalid("upload abandoned".into()));
            }
            if incoming.len() != size {
                return Err(CoordinatorError::Core(medfl_core::CoreError::Truncated {
                    got: incoming.len(),
                    expected: size,
                }));
            }
            decoder.finish()?;
            incoming.finish(Some(&expected))
        });
        let mut received = 0u64;
        let broke = loop {
            let next = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + idle),
                stream.message(),
            );
            let msg = match next.await {
                Err(_) => {
                    let why = match tokio::time::Instant::now() >= until {
                        true => format!(
                            "too slow: {received} of {size} bytes arrived before the upload's \
                             time ran out (the round's deadline, or {} bytes/s)",
                            config.min_upload_bytes_per_sec
                        ),
                        false => format!(
                            "stalled: no message for {}s after {received} of {size} bytes",
                            config.upload_idle_timeout_secs
                        ),
                    };
                    break Some(CoordinatorError::Invalid(format!("upload {why}")));
                }
                Ok(Ok(Some(msg))) => msg,
                Ok(Ok(None)) => break None,
                Ok(Err(status)) => {
                    break Some(CoordinatorError::Invalid(format!(
                        "upload broke off after {received} of {size} bytes: {}",
                        status.message()
                    )))
                }
            };
            let Some(v1::update_chunk::Part::Data(data)) = msg.part else {
                break Some(CoordinatorError::Invalid(
                    "a second header inside an upload".into(),
                ));
            };
            if received + data.len() as u64 > size {
                break Some(CoordinatorError::Invalid(format!(
                    "more than the announced {size} bytes"
                )));
            }
            received += data.len() as u64;
            handle
                .traffic
                .up
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            // A closed channel means the writer stopped on an error: it is returned below.
            if chunks.send(data).await.is_err() {
                break None;
            }
        };
        // Closing the channel lets the writer finish, or, after a break, drop the temporary.
        if broke.is_some() {
            abandoned.store(true, std::sync::atomic::Ordering::Release);
        }
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| CoordinatorError::Internal(format!("upload writer: {e}")))?;
        match broke {
            Some(e) => Err(e),
            None => written,
        }
    }

    async fn send_to_engine(
        &self,
        run_id: &str,
        make: impl FnOnce(oneshot::Sender<Result<(), CoordinatorError>>) -> EngineMsg,
    ) -> Result<(), CoordinatorError> {
        let handle = self.shared.run_handle(run_id)?;
        let (reply, answer) = oneshot::channel();
        handle
            .tx
            .send(make(reply))
            .await
            .map_err(|_| CoordinatorError::Unavailable(format!("run `{run_id}` ended")))?;
        answer
            .await
            .map_err(|_| CoordinatorError::Unavailable(format!("run `{run_id}` ended")))?
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

type BlobStreamOf = Pin<Box<dyn Stream<Item = Result<v1::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl SiteService for SiteApi {
    #[instrument(skip_all, fields(site = %req.get_ref().site))]
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        crate::auth::check_site_name(&req, &req.get_ref().site)?;
        let req = req.into_inner();
        if !valid_name(&req.site) {
            return Err(CoordinatorError::Invalid(format!(
                "site name `{}` must be 1-{MAX_NAME} letters, digits, `-`, `_` or `.`",
                req.site
            ))
            .into());
        }
        if req.token.len() < 16 {
            return Err(
                CoordinatorError::Invalid("token must be at least 16 characters".into()).into(),
            );
        }
        crate::edge::datasets(&req.datasets)?;
        crate::edge::version(&req.version)?;
        if req.signing_public_key.len() != crate::signing::PUBLIC_KEY_LEN {
            return Err(CoordinatorError::Invalid(format!(
                "RegisterRequest.signing_public_key: {} bytes, an Ed25519 public key has {}",
                req.signing_public_key.len(),
                crate::signing::PUBLIC_KEY_LEN
            ))
            .into());
        }
        let token_sha256 = sha256_hex(req.token.as_bytes());
        let now = now_ms();
        let datasets_summary: Vec<serde_json::Value> = req
            .datasets
            .iter()
            .map(|d| {
                json!({
                    "name": d.name,
                    "columns": d.columns.len(),
                    "rows": d.rows,
                    "class_counts": d.class_counts,
                })
            })
            .collect();
        let rows: std::collections::BTreeMap<String, u64> = req
            .datasets
            .iter()
            .map(|d| (d.name.clone(), d.rows))
            .collect();
        let classes: std::collections::BTreeMap<_, _> = req
            .datasets
            .iter()
            .filter(|d| !d.class_counts.is_empty())
            .map(|d| (d.name.clone(), d.class_counts.clone()))
            .collect();
        let datasets: Vec<_> = req.datasets.into_iter().map(Into::into).collect();
        {
            let mut sites = self.shared.sites().map_err(Status::from)?;
            let registered_ms = sites.get(&req.site).map_or(now, |s| s.registered_ms);
            if let Some(existing) = sites.get(&req.site) {
                let other_key = !existing.signing_key.is_empty()
                    && existing.signing_key != req.signing_public_key;
                if existing.token_sha256 != token_sha256 || other_key {
                    let reason =
                        format!("site name `{}` is registered to another identity", req.site);
                    self.shared.audit(
                        Event::new("registration_refused", json!({ "reason": reason }))
                            .site(req.site.clone()),
                    );
                    return Err(CoordinatorError::PermissionDenied(reason).into());
                }
            }
            sites.insert(
                req.site.clone(),
                SiteLive {
                    token_sha256: token_sha256.clone(),
                    datasets: datasets.clone(),
                    last_seen_ms: now,
                    registered_ms,
                    signing_key: req.signing_public_key.clone(),
                    rows: rows.clone(),
                    classes: classes.clone(),
                },
            );
        }
        self.shared
            .db(|s| {
                s.upsert_site(&SiteRecord {
                    name: req.site.clone(),
                    token_sha256,
                    datasets,
                    registered_ms: now,
                    last_seen_ms: now,
                    signing_key: req.signing_public_key.clone(),
                    rows,
                    classes,
                })
            })
            .map_err(Status::from)?;
        info!(site = %req.site, version = %req.version, "site registered");
        self.shared.audit(
            Event::new(
                "site_registered",
                json!({ "version": req.version, "datasets": datasets_summary }),
            )
            .site(req.site.clone()),
        );
        self.shared.notify_tasks();
        Ok(Response::new(v1::RegisterResponse {
            chunk_size: self.shared.config.chunk_size,
            heartbeat_interval_secs: self.shared.config.heartbeat_interval_secs,
            coordinator_public_key: crate::signing::public_key(&self.shared.signer),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.identify(&req)?;
        let runs = self.shared.runs().map_err(Status::from)?;
        let stopped_runs = req
            .into_inner()
            .active_runs
            .into_iter()
            .filter(|r| !runs.contains_key(r))
            .collect();
        Ok(Response::new(v1::HeartbeatResponse { stopped_runs }))
    }

    async fn poll_task(
        &self,
        req: Request<v1::PollTaskRequest>,
    ) -> Result<Response<v1::PollTaskResponse>, Status> {
        let site = self.identify(&req)?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.shared.config.poll_timeout_secs);
        let mut changed = self.shared.tasks_changed.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            changed.borrow_and_update();
            let task = {
                let runs = self.shared.runs().map_err(Status::from)?;
                runs.iter().find_map(|(id, handle)| {
                    let snap = handle.snapshot.borrow().clone()?;
                    snap.pending.contains(&site).then(|| v1::Task {
                        run_id: id.clone(),
                        round: snap.round,
                        attempt: snap.attempt,
                        kind: match snap.phase {
                            Phase::Statistics => v1::TaskKind::Statistics,
                            Phase::Train => v1::TaskKind::Train,
                            Phase::Evaluate => v1::TaskKind::Evaluate,
                        } as i32,
                        spec_toml: handle.spec_toml.to_string(),
                        global_sha256: snap.global_sha256.clone(),
                        global_size: snap.global_size,
                        deadline_unix_ms: snap.deadline_ms,
                        signature: Vec::new(),
                        clip_norm: snap.client_dp.map(|(c, _)| c),
                        expected_sites: snap.client_dp.map(|(_, m)| m),
                        standardization: snap.standardization.as_deref().map(String::from),
                    })
                })
            };
            let mut task = match task {
                Some(task) => Some(task),
                None => crate::campaign::task_for(&self.shared, &site)?,
            };
            if let Some(t) = task.as_mut() {
                crate::signing::sign_task(&self.shared.signer, t);
            }
            if task.is_some() {
                return Ok(Response::new(v1::PollTaskResponse { task }));
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(Response::new(v1::PollTaskResponse { task: None }));
                }
                _ = crate::state::stopping(&mut shutdown) => {
                    return Err(CoordinatorError::Unavailable("coordinator shutting down".into()).into());
                }
            }
        }
    }

    type DownloadBlobStream = BlobStreamOf;

    async fn download_blob(
        &self,
        req: Request<v1::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        self.identify(&req)?;
        let req = req.into_inner();
        crate::edge::sha256("DownloadBlobRequest.sha256", &req.sha256)?;
        if let Some((path, size)) = self.shared.published.file(&req.sha256) {
            let stream = file_stream(
                &self.shared,
                path.clone(),
                *size,
                &req.sha256,
                req.offset,
                None,
            )?;
            return Ok(Response::new(Box::pin(stream)));
        }
        if !crate::blobs::is_blob_id(&req.sha256)
            || !self
                .shared
                .db(|s| s.is_global_model(&req.sha256))
                .map_err(Status::from)?
        {
            return Err(CoordinatorError::NotFound(format!("no model {}", req.sha256)).into());
        }
        // Count the bytes against the run whose open round hands out this model.
        let traffic = self
            .shared
            .runs()
            .map_err(Status::from)?
            .values()
            .find_map(|h| {
                let snap = h.snapshot.borrow();
                snap.as_ref()
                    .filter(|s| s.global_sha256 == req.sha256)
                    .map(|_| h.traffic.clone())
            });
        let stream = blob_stream(&self.shared, &req.sha256, req.offset, traffic)?;
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all)]
    async fn get_base_model(
        &self,
        req: Request<v1::GetBaseModelRequest>,
    ) -> Result<Response<v1::GetBaseModelResponse>, Status> {
        let site = self.identify(&req)?;
        let req = req.into_inner();
        crate::edge::name("GetBaseModelRequest.name", &req.name)?;
        crate::edge::sha256("GetBaseModelRequest.weights_sha256", &req.weights_sha256)?;
        let model = self
            .shared
            .published
            .model(&req.name, &req.weights_sha256)
            .ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "the coordinator publishes no base model `{}` with weights {}",
                    req.name, req.weights_sha256
                ))
            })?;
        info!(site = %site, model = %req.name, "base model requested");
        self.shared.audit(
            medfl_audit::Event::new(
                "base_model_requested",
                serde_json::json!({ "name": req.name, "weights_sha256": req.weights_sha256 }),
            )
            .site(site),
        );
        Ok(Response::new(v1::GetBaseModelResponse {
            files: model.files.clone(),
        }))
    }

    async fn push_update(
        &self,
        req: Request<Streaming<v1::UpdateChunk>>,
    ) -> Result<Response<v1::PushUpdateResponse>, Status> {
        let site = self.identify(&req)?;
        let reply = self.push_update(&site, req.into_inner()).await?;
        Ok(Response::new(reply))
    }

    async fn report_evaluation(
        &self,
        req: Request<v1::ReportEvaluationRequest>,
    ) -> Result<Response<v1::ReportEvaluationResponse>, Status> {
        let site = self.identify(&req)?;
        let req = req.into_inner();
        crate::edge::run_id("ReportEvaluationRequest.run_id", &req.run_id)?;
        crate::edge::sha256("ReportEvaluationRequest.global_sha256", &req.global_sha256)?;
        crate::edge::metrics("ReportEvaluationRequest.metrics", &req.metrics)?;
        if req.round == 0 {
            crate::campaign::report(&self.shared, &site, req)?;
            return Ok(Response::new(v1::ReportEvaluationResponse {}));
        }
        self.send_to_engine(&req.run_id, |reply| EngineMsg::Evaluation {
            site,
            round: req.round,
            global_sha256: req.global_sha256,
            examples: req.num_examples,
            metrics: req.metrics,
            reply,
        })
        .await?;
        Ok(Response::new(v1::ReportEvaluationResponse {}))
    }

    async fn report_statistics(
        &self,
        req: Request<v1::ReportStatisticsRequest>,
    ) -> Result<Response<v1::ReportStatisticsResponse>, Status> {
        let site = self.identify(&req)?;
        let req = req.into_inner();
        crate::edge::run_id("ReportStatisticsRequest.run_id", &req.run_id)?;
        let handle = self.shared.run_handle(&req.run_id)?;
        let spec = &handle.spec;
        // A site's sums cannot cover more rows than it registered for the dataset, nor more
        // than any site may claim.
        let dataset = &spec.task.dataset;
        let registered = self
            .shared
            .sites()?
            .get(&site)
            .and_then(|s| s.rows.get(dataset).copied())
            .filter(|r| *r > 0)
            .unwrap_or(MAX_EXAMPLES);
        let sums = medfl_core::standardize::FeatureSums {
            count: req.count,
            sum: req.sum,
            sum_sq: req.sum_sq,
        };
        sums.check(
            spec.task.feature_count(),
            registered.min(spec.defense.max_examples).min(MAX_EXAMPLES),
            &format!(
                "site `{site}`'s statistics for run {} round {}",
                req.run_id, req.round
            ),
        )
        .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        self.send_to_engine(&req.run_id, |reply| EngineMsg::Statistics {
            site,
            round: req.round,
            attempt: req.attempt,
            sums,
            reply,
        })
        .await?;
        Ok(Response::new(v1::ReportStatisticsResponse {}))
    }

    async fn report_task_failure(
        &self,
        req: Request<v1::ReportTaskFailureRequest>,
    ) -> Result<Response<v1::ReportTaskFailureResponse>, Status> {
        let site = self.identify(&req)?;
        let req = req.into_inner();
        crate::edge::run_id("ReportTaskFailureRequest.run_id", &req.run_id)?;
        let reason = crate::edge::reason(&req.reason);
        if req.round == 0 {
            crate::campaign::fail(&self.shared, &site, &req.run_id, req.attempt, &reason)?;
            return Ok(Response::new(v1::ReportTaskFailureResponse {}));
        }
        let outcome = medfl_proto::convert::declined_outcome(req.declined);
        let handle = self.shared.run_handle(&req.run_id)?;
        handle
            .tx
            .send(EngineMsg::Failure {
                site,
                round: req.round,
                attempt: req.attempt,
                reason,
                outcome,
            })
            .await
            .map_err(|_| CoordinatorError::Unavailable(format!("run `{}` ended", req.run_id)))?;
        Ok(Response::new(v1::ReportTaskFailureResponse {}))
    }
}

/// A site's "within the clip" indicator moves the next round's clipping norm for everyone, so
/// it is bounded: 0 or 1 when the coordinator adds the count's noise, and within ten standard
/// deviations of the site's noise share around them when the sites add it.
fn check_clip_indicator(
    indicator: Option<f64>,
    spec: &medfl_core::spec::RunSpec,
) -> Result<(), CoordinatorError> {
    use medfl_core::spec::NoisePlacement;
    let adaptive = spec
        .privacy
        .client
        .as_ref()
        .and_then(|c| c.adaptive_clipping.as_ref().map(|a| (c.noise, a)));
    match (indicator, adaptive) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(CoordinatorError::Invalid(
            "clip_indicator is only for runs with adaptive client-level clipping".into(),
        )),
        (None, Some(_)) => Err(CoordinatorError::Invalid(
            "clip_indicator is required: the run adapts its client-level clipping norm".into(),
        )),
        (Some(v), Some((NoisePlacement::Central, _))) if v == 0.0 || v == 1.0 => Ok(()),
        (Some(v), Some((NoisePlacement::Central, _))) => Err(CoordinatorError::Invalid(format!(
            "clip_indicator must be 0 or 1, got {v}"
        ))),
        (Some(v), Some((NoisePlacement::Distributed, a))) => {
            let reach = 10.0 * a.count_noise_multiplier;
            if v.is_finite() && (-reach..=1.0 + reach).contains(&v) {
                Ok(())
            } else {
                Err(CoordinatorError::Invalid(format!(
                    "clip_indicator {v} is outside [{}, {}]",
                    -reach,
                    1.0 + reach
                )))
            }
        }
    }
}
