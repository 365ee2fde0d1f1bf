//! Starting the coordinator: open the data directory, resume running runs, serve gRPC on a
//! listener the caller bound, and stop cleanly when the caller's shutdown future completes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use medfl_core::run::RunStatus;
use medfl_proto::v1::run_service_server::RunServiceServer;
use medfl_proto::v1::site_service_server::SiteServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tracing::info;

use crate::auth::{Authority, Gate};
use crate::blobs::BlobStore;
use crate::config::CoordinatorConfig;
use crate::published::Published;
use crate::run_service::RunApi;
use crate::site_service::SiteApi;
use crate::state::Shared;
use crate::store::Store;
use crate::{engine, CoordinatorError};

/// Entries between the audit log's signed checkpoints.
pub const AUDIT_CHECKPOINT_EVERY: u64 = 100;

/// Serves the coordinator on `listener` until `shutdown` completes. Runs left `running` by an
/// earlier process resume from their last committed round (re-opening its evaluation if it had
/// not finished), and open cross-site evaluations go on collecting answers.
pub async fn serve(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    let data_dir = config.data_dir.clone();
    medfl_daemon::create_private_dir(&data_dir)
        .map_err(|e| CoordinatorError::io(format!("creating {}", data_dir.display()), e))?;
    let state_db = data_dir.join("state.db");
    let store = Store::open(&state_db)?;
    // The database and its journal files are the owner's alone (SQLite gives new -wal and -shm
    // files the database's mode, so this also covers those made later).
    for file in ["state.db", "state.db-wal", "state.db-shm"] {
        let path = data_dir.join(file);
        if path.exists() {
            medfl_daemon::restrict_file(&path)
                .map_err(|e| CoordinatorError::io(format!("restricting {}", path.display()), e))?;
        }
    }
    let blobs = BlobStore::open(&data_dir.join("blobs"))?;
    // The log carries checkpoints signed with the coordinator's task-signing key, whose public
    // half sites pin and `signing.pub` holds for anyone who checks the log.
    let signer = Arc::new(crate::signing::load_or_create(&data_dir)?);
    let key_hex = hex::encode(crate::signing::public_key(&signer));
    let public = data_dir.join("signing.pub");
    std::fs::write(&public, format!("{key_hex}\n"))
        .map_err(|e| CoordinatorError::io(format!("writing {}", public.display()), e))?;
    let audit = medfl_audit::AuditLog::open(&data_dir.join("audit.jsonl"))
        .map_err(|e| CoordinatorError::Config(format!("audit log: {e}")))?
        .with_checkpoints(
            AUDIT_CHECKPOINT_EVERY,
            key_hex,
            Box::new({
                let signer = signer.clone();
                move |message| signer.sign(message).as_ref().to_vec()
            }),
        );
    let running: Vec<_> = store
        .runs()?
        .into_iter()
        .filter(|r| r.status == RunStatus::Running)
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let max_message = config.max_message_bytes as usize;
    // Hashing published base models reads every byte of them: off the async threads.
    let base_dirs = config.base_models.clone();
    let published = tokio::task::spawn_blocking(move || Published::scan(&base_dirs))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("hashing base models: {e}")))??;
    let shared = Arc::new(Shared::new(
        config, store, blobs, audit, stop_rx, published, signer,
    )?);
    let sweeper = shared.clone();
    tokio::task::spawn_blocking(move || crate::retention::sweep_orphans(&sweeper))
        .await
        .map_err(|e| CoordinatorError::Internal(format!("sweeping blobs: {e}")))??;

    // Cross-site evaluations of ended runs go on collecting answers.
    crate::campaign::resume(&shared)?;
    let engines = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    for run in &running {
        engine::spawn(&shared, run, &mut *engines.lock().await)?;
    }

    // Mutual TLS, or plaintext only when asked for in so many words.
    let (tls, authority) = security(&shared.config)?;
    if tls.is_none() {
        medfl_daemon::warn_plaintext("coordinator", shared.shutdown.clone());
    }
    let authority = Arc::new(authority);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SiteServiceServer<SiteApi>>().await;
    health.set_serving::<RunServiceServer<RunApi>>().await;
    let site_api = InterceptedService::new(
        SiteServiceServer::new(SiteApi::new(shared.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        Gate::sites(authority.clone()),
    );
    let run_api = InterceptedService::new(
        RunServiceServer::new(RunApi::new(shared.clone(), engines.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        Gate::researchers(authority),
    );

    if let Some(at) = shared.config.health_listen {
        serve_health(at, health_service.clone(), shared.shutdown.clone()).await?;
    }
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::io("reading the listener's address", e))?;
    info!(%addr, data_dir = %data_dir.display(), resumed = running.len(), "coordinator serving");
    let stop = stop_tx.clone();
    // No `tcp_nodelay` here: tonic ignores it for `serve_with_incoming`; `tls_incoming` sets it.
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(256)
        .add_service(health_service)
        .add_service(site_api)
        .add_service(run_api);
    let shutdown = async move {
        shutdown.await;
        // Long polls and watches end now instead of at their timeouts.
        stop.send_replace(true);
    };
    match tls {
        // Handshakes run here, not in tonic, so that revoked certificates are refused in them.
        Some(acceptor) => {
            let limits = medfl_pki::ConnectionLimits {
                max_connections: crate::open_files::fit_connections(shared.config.max_connections)
                    as usize,
                max_handshakes: shared.config.max_handshakes as usize,
            };
            let incoming = medfl_pki::tls_incoming_observed(
                listener,
                acceptor,
                limits,
                crate::refusals::audit_refusals(shared.clone()),
            );
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming = TcpListenerStream::new(listener);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
    .map_err(|e| CoordinatorError::Internal(format!("gRPC server: {e}")))?;
    stop_tx.send_replace(true);
    let mut engines = engines.lock().await;
    while engines.join_next().await.is_some() {}
    shared.audit_checkpoint();
    info!("coordinator stopped");
    Ok(())
}

/// Serves the health service alone, plaintext, on `at` until `stop` turns true: the probe sees
/// whether the coordinator serves, and nothing else is reachable there.
async fn serve_health(
    at: std::net::SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    mut stop: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let listener = TcpListener::bind(at)
        .await
        .map_err(|e| CoordinatorError::io(format!("binding health_listen {at}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::io("reading the health listener's address", e))?;
    info!(%addr, "health serving");
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(4)
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "health server stopped");
        }
    });
    Ok(())
}

/// The server's TLS settings and the authority that identifies callers; `None` for TLS only
/// with `insecure_dev`, and an error naming the keys when neither is configured.
fn security(
    config: &CoordinatorConfig,
) -> Result<(Option<TlsAcceptor>, Authority), CoordinatorError> {
    let (Some(ca), Some(cert), Some(key)) = (&config.tls_ca, &config.tls_cert, &config.tls_key)
    else {
        if config.insecure_dev {
            return Ok((None, Authority::new(false, None)));
        }
        return Err(CoordinatorError::Config(
            "`tls_ca`, `tls_cert`, `tls_key`: the coordinator serves only mutual TLS; set them to \
             the files of its `medfl provision` kit, or pass --insecure-dev for a trial on one \
             machine"
                .into(),
        ));
    };
    let revocations = match &config.revocation_list {
        Some(path) => Some(Arc::new(
            medfl_pki::WatchedRevocations::open(path)
                .map_err(|e| CoordinatorError::Config(format!("`revocation_list`: {e}")))?,
        )),
        None => None,
    };
    let tls = medfl_pki::server_tls(cert, key, ca, revocations.clone())
        .map_err(|e| CoordinatorError::Config(format!("TLS: {e}")))?;
    Ok((Some(tls), Authority::new(true, revocations)))
}
