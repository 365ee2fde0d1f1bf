//! The site daemon's main loop: connect out to the coordinator, register, heartbeat, poll for
//! tasks and do them; on a lost connection, back off exponentially with jitter and reconnect.

use std::future::Future;
use std::time::Duration;

use medfl_core::selection::SplitMix64;
use medfl_proto::v1;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::client::Client;
use crate::config::SiteConfig;
use crate::tasks::{CancelReason, Tasks};
use crate::worker::Worker;
use crate::SiteError;

/// Longest a task poll may hang before the connection counts as dead.
const POLL_LIMIT: Duration = Duration::from_secs(330);

/// How long a stopping site waits for a task it cancelled to tell the coordinator so.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Exponential backoff with jitter: each delay is a random point in the upper half of
/// `min * 2^n`, capped at `max`.
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A backoff between `min` and `max`, seeded for jitter.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max,
            failures: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(20));
        self.failures += 1;
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        ceiling.mul_f64(0.5 + 0.5 * self.rng.next_f64())
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// How long a site whose certificate is revoked or expired waits between tries.
pub const REFUSED_CERTIFICATE_RETRY: Duration = Duration::from_secs(3600);

/// In words for hospital IT, why the coordinator will not take this site's certificate, when
/// it is expired (checked here, against `now`, seconds since the epoch) or revoked (as the
/// coordinator's refusal or TLS alert says); `None` for any other failure.
pub fn certificate_refused(e: &SiteError, cfg: &SiteConfig, now: i64) -> Option<String> {
    let name = &cfg.name;
    let renew = format!(
        "the consortium's operator issues a new kit with `medfl provision renew {name}`; put \
         it in place of this one and restart the site"
    );
    if let Some(cert) = &cfg.tls_cert {
        if let Ok((expiry, when)) = medfl_pki::certificate_expiry(cert) {
            if expiry <= now {
                return Some(format!(
                    "this site's certificate ({}) expired at {when}, so the coordinator refuses \
                     it: {renew}",
                    cert.display()
                ));
            }
        }
    }
    let mut chain = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = next {
        chain.push(err.to_string());
        next = err.source();
    }
    let chain = chain.join(": ");
    if chain.contains("CertificateRevoked") || chain.contains("presented a revoked certificate") {
        return Some(format!(
            "the coordinator refuses this site's certificate: the consortium revoked it. Ask \
             the operator whether `{name}` may come back; `medfl provision reissue {name}` \
             issues a new kit"
        ));
    }
    if chain.contains("CertificateExpired") {
        return Some(format!(
            "the coordinator refuses this site's certificate as expired (check this machine's \
             clock if it has not): {renew}"
        ));
    }
    None
}

/// Runs the site until `shutdown` completes. Returns an error only for problems that
/// reconnecting cannot fix (bad data at start, an identity the coordinator refuses); every
/// other failure is retried with backoff (hourly when the site's certificate is revoked or
/// expired, which only the consortium's operator can change).
pub async fn run(config: SiteConfig, shutdown: impl Future<Output = ()>) -> Result<(), SiteError> {
    run_observed(config, shutdown, watch::Sender::new(0)).await
}

/// [`run`], counting successful registrations (and re-registrations after a dataset change)
/// in `registrations` so a supervisor (or a test) can wait for the site to be connected.
pub async fn run_observed(
    config: SiteConfig,
    shutdown: impl Future<Output = ()>,
    registrations: watch::Sender<u64>,
) -> Result<(), SiteError> {
    let mut worker = Worker::open(config)?;
    let cfg = worker.config().clone();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.reconnect_min_ms),
        Duration::from_secs(cfg.reconnect_max_secs),
        seed,
    );
    let tasks = worker.tasks().clone();
    // Tells the watchers (and the session) to stop when the site does.
    let (stopping, stop_watch) = watch::channel(false);
    if cfg.tls_cert.is_none() {
        medfl_daemon::warn_plaintext("site", stop_watch.clone());
    }
    watch_kill_switch(cfg.data_dir.clone(), tasks.clone(), stop_watch.clone());
    tokio::pin!(shutdown);
    let result = loop {
        let r = {
            let connected = session(
                &mut worker,
                &mut backoff,
                &registrations,
                stop_watch.clone(),
            );
            tokio::pin!(connected);
            tokio::select! {
                _ = &mut shutdown => {
                    stopping.send_replace(true);
                    // A training task under way is cancelled and tells the coordinator it will
                    // not answer, so no round waits for it; briefly, as the site is stopping.
                    if tasks.cancel_all(CancelReason::ShuttingDown) > 0 {
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut connected).await;
                    }
                    break Ok(());
                }
                r = &mut connected => r,
            }
        };
        match r {
            // Only a refused identity is final: anything else is retried after a pause.
            Err(e @ SiteError::Config(_)) => break Err(e),
            Err(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let delay = match certificate_refused(&e, &cfg, now) {
                    // Nothing changes until the operator acts: try again hourly, not every
                    // few seconds.
                    Some(why) => {
                        error!(site = %cfg.name, retry_in_s = REFUSED_CERTIFICATE_RETRY.as_secs(), "{why}");
                        REFUSED_CERTIFICATE_RETRY
                    }
                    None => {
                        let delay = backoff.next_delay();
                        warn!(site = %cfg.name, error = %e, retry_in_ms = delay.as_millis() as u64, "lost the coordinator; reconnecting");
                        delay
                    }
                };
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Ok(()) => break Ok(()),
        }
    };
    tasks.cancel_all(CancelReason::ShuttingDown);
    stopping.send_replace(true);
    info!(site = %cfg.name, "site stopped");
    result
}

/// How often the daemon looks at the kill switch.
const PAUSE_CHECK: Duration = Duration::from_millis(500);

/// Cancels any training under way as soon as the hospital pauses the site, until `stop`.
/// Only tasks in flight are cancelled: once resumed, the next task trains.
fn watch_kill_switch(data_dir: std::path::PathBuf, tasks: Tasks, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PAUSE_CHECK);
        let mut was_paused = false;
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let paused = crate::policy::is_paused(&data_dir);
                    if paused {
                        tasks.cancel_all(CancelReason::Paused);
                    }
                    if paused != was_paused {
                        info!(paused, "kill switch {}", if paused { "thrown: training stopped, nothing is sent" } else { "released" });
                        was_paused = paused;
                    }
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    });
}

/// How often a running site looks for datasets registered or removed, and runs approved or
/// rejected, by hand.
const REGISTRY_CHECK: Duration = Duration::from_millis(500);

/// What interrupted a poll.
enum Interrupt {
    /// The dataset registry changed.
    Registry,
    /// The approval queue changed.
    Approvals,
}

/// One connection's life: register, then poll and work until the connection fails or `stop`
/// turns true. Datasets registered or removed meanwhile are loaded and announced by registering
/// again; tasks held while their run awaited approval are done once the hospital approves.
async fn session(
    worker: &mut Worker,
    backoff: &mut Backoff,
    registrations: &watch::Sender<u64>,
    stop: watch::Receiver<bool>,
) -> Result<(), SiteError> {
    let cfg = worker.config().clone();
    let mut client = Client::connect(&cfg, worker.token()).await?;
    // Catch up with registry changes made before this session (at start, or while the
    // coordinator was out of reach), then follow the file from here.
    let mut registry = crate::registry::stamp(&cfg.data_dir);
    let mut approvals = crate::policy::stamp(&cfg.data_dir);
    follow_registry(worker);
    let reply = register(&mut client, worker).await?;
    worker.pin_coordinator_key(&reply.coordinator_public_key)?;
    worker.chunk_size = (reply.chunk_size as usize).clamp(4096, 16 << 20);
    backoff.reset();
    info!(site = %cfg.name, coordinator = %cfg.coordinator, "registered");
    registrations.send_modify(|n| *n += 1);
    let heartbeat = tokio::spawn(heartbeats(
        client.clone(),
        worker.tasks().clone(),
        Duration::from_secs(u64::from(reply.heartbeat_interval_secs.max(1))),
        cfg.data_dir.clone(),
    ));
    let _stop_heartbeats = AbortOnDrop(heartbeat);
    let mut check = tokio::time::interval(REGISTRY_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Decisions taken while the coordinator was out of reach.
    worker.run_held(&mut client).await?;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut poll = client.authed(v1::PollTaskRequest {});
        // A coordinator answers polls within its poll timeout; past this the link is dead.
        poll.set_timeout(POLL_LIMIT);
        let polled = {
            let reply = client.site.poll_task(poll);
            tokio::pin!(reply);
            loop {
                tokio::select! {
                    r = &mut reply => break Ok(r),
                    _ = check.tick() => {
                        // Dropping the poll loses nothing: tasks stay open at the coordinator.
                        let now = crate::registry::stamp(&cfg.data_dir);
                        if now != registry {
                            registry = now;
                            break Err(Interrupt::Registry);
                        }
                        let now = crate::policy::stamp(&cfg.data_dir);
                        if now != approvals {
                            approvals = now;
                            break Err(Interrupt::Approvals);
                        }
                    }
                }
            }
        };
        let polled = match polled {
            Ok(polled) => polled,
            Err(Interrupt::Registry) => {
                if follow_registry(worker) {
                    register(&mut client, worker).await?;
                    info!(site = %cfg.name, datasets = ?worker.dataset_schemas().iter().map(|d| &d.name).collect::<Vec<_>>(), "datasets changed; coordinator told");
                    registrations.send_modify(|n| *n += 1);
                }
                continue;
            }
            Err(Interrupt::Approvals) => {
                worker.run_held(&mut client).await?;
                continue;
            }
        };
        let task = polled
            .map_err(|s| SiteError::Connect {
                url: cfg.coordinator.clone(),
                message: format!("polling for tasks: {}: {}", s.code(), s.message()),
            })?
            .into_inner()
            .task;
        if let Some(task) = task {
            worker.handle(&mut client, task).await?;
        }
    }
}

/// Brings the worker's datasets in line with the registry; whether they changed. An unreadable
/// registry is logged and changes nothing.
fn follow_registry(worker: &mut Worker) -> bool {
    worker.reload_datasets().unwrap_or_else(|e| {
        warn!(site = %worker.config().name, error = %e, "dataset registry unreadable; datasets unchanged");
        false
    })
}

/// Registers (again) with the site's identity and current datasets; audited.
async fn register(client: &mut Client, worker: &Worker) -> Result<v1::RegisterResponse, SiteError> {
    let cfg = worker.config();
    let reply = client
        .site
        .register(v1::RegisterRequest {
            site: cfg.name.clone(),
            token: worker.token().to_string(),
            datasets: worker.dataset_schemas(),
            version: env!("CARGO_PKG_VERSION").into(),
            signing_public_key: worker.signing_public_key(),
        })
        .await
        .map_err(|s| match s.code() {
            // Someone else holds this name: reconnecting will not help.
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                SiteError::Config(format!("registration refused: {}", s.message()))
            }
            _ => SiteError::Rpc(s),
        })?
        .into_inner();
    worker.audit(medfl_audit::Event::new(
        "registered",
        serde_json::json!({ "coordinator": cfg.coordinator, "datasets": worker.dataset_schemas().iter().map(|d| &d.name).collect::<Vec<_>>() }),
    ));
    Ok(reply)
}

/// Tells the coordinator the site is alive and which runs it works on; cancels the tasks of
/// those it says ended.
async fn heartbeats(client: Client, tasks: Tasks, every: Duration, data_dir: std::path::PathBuf) {
    let mut client = client;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut active_runs = tasks.active_runs();
        // Runs waiting for the hospital's decision too: once they end at the coordinator, the
        // queue says so, and nobody approves a run that will never train.
        let waiting = match crate::policy::Approvals::load(&data_dir) {
            Ok(queue) => queue.waiting(),
            Err(e) => {
                warn!(error = %e, "could not read the approval queue");
                Vec::new()
            }
        };
        active_runs.extend(waiting.iter().cloned());
        active_runs.sort();
        active_runs.dedup();
        let Ok(reply) = client
            .site
            .heartbeat(client.authed(v1::HeartbeatRequest { active_runs }))
            .await
        else {
            continue;
        };
        let stopped = reply.into_inner().stopped_runs;
        let ended: Vec<String> = stopped
            .iter()
            .filter(|r| waiting.contains(r))
            .cloned()
            .collect();
        match crate::policy::Approvals::mark_ended(&data_dir, &ended) {
            Ok(marked) => {
                for run in marked {
                    info!(run = %run, "a run awaiting approval ended at the coordinator");
                }
            }
            Err(e) => warn!(error = %e, "could not mark ended runs in the approval queue"),
        }
        for run in stopped {
            if tasks.run_stopped(&run) > 0 {
                info!(run = %run, "run ended at the coordinator; abandoning its work");
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 1);
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)));
        assert!(d[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn an_expired_or_revoked_certificate_is_said_in_plain_words() {
        let dir = tempfile::tempdir().unwrap();
        let made = medfl_pki::provision_with(
            None,
            "Net",
            "localhost",
            (&["st-marys".to_string()], &[], &[]),
            &dir.path().join("kits"),
            &medfl_pki::IssueOptions {
                valid_days: 1,
                coordinator_names: Vec::new(),
            },
        )
        .unwrap();
        let cfg = SiteConfig::load(Some(&made.kits[1].config)).unwrap();
        let (expiry, _) = medfl_pki::certificate_expiry(cfg.tls_cert.as_ref().unwrap()).unwrap();
        let lost = SiteError::Connect {
            url: cfg.coordinator.clone(),
            message: "connection refused".into(),
        };
        // Valid: an ordinary failure, retried with the usual backoff.
        assert_eq!(certificate_refused(&lost, &cfg, expiry - 60), None);
        // Past its date: whatever the failure, the certificate is why.
        let why = certificate_refused(&lost, &cfg, expiry + 1).expect("expired");
        assert!(
            why.contains("expired") && why.contains("medfl provision renew st-marys"),
            "{why}"
        );
        // Revoked: the coordinator's refusal on a connection, or its TLS alert on a new one.
        let refusal = SiteError::Rpc(tonic::Status::permission_denied(
            "site \"st-marys\" presented a revoked certificate (serial 0a, revoked at x)",
        ));
        let alert = SiteError::Rpc(tonic::Status::from_error(Box::new(std::io::Error::other(
            "received fatal alert: CertificateRevoked",
        ))));
        for e in [refusal, alert] {
            let why = certificate_refused(&e, &cfg, expiry - 60).expect("revoked");
            assert!(
                why.contains("revoked") && why.contains("medfl provision reissue st-marys"),
                "{why}"
            );
        }
        assert_eq!(REFUSED_CERTIFICATE_RETRY, Duration::from_secs(3600));
    }
}
