//! Clients that send what no honest site or researcher would, against a coordinator on the
//! shipped defaults. Every test asserts the clear status each attack gets, that the coordinator's
//! bytes on disk and this process's resident memory grew within a bound, and that an honest run
//! beside the attack completes.
//!
//! The tests take turns (one federation at a time in this process), so that resident memory
//! measures one coordinator (with its two small sites and the attacking client), not a dozen
//! federations running beside it.

mod connections;
mod researchers;
mod sites;

use medfl_e2e::raw::RawSite;
use medfl_e2e::{breast_cancer_spec, create_run, wait_for_completion, Coordinator, Federation};
use medfl_proto::v1;
use medfl_proto::v1::run_service_client::RunServiceClient;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Code;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// This test's turn: held to its end. The first turn installs the daemons' own text log
/// subscriber for the process, keeping the lines that mention [`FORGED`].
async fn turn() -> MutexGuard<'static, ()> {
    static LOGS: std::sync::Once = std::sync::Once::new();
    LOGS.call_once(|| {
        let logs = medfl_daemon::subscriber("text", false, || ForgedLines);
        tracing::subscriber::set_global_default(logs).expect("the only log subscriber");
    });
    ONE_AT_A_TIME.lock().await
}

/// A word hostile clients put into the strings they send, to find them in the logs.
const FORGED: &str = "forged";

/// The log lines that mention [`FORGED`], as the text log writes them.
static FORGED_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Keeps [`FORGED`] lines in [`FORGED_LOG`] (the log writes one event per call).
struct ForgedLines;

impl std::io::Write for ForgedLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.windows(FORGED.len()).any(|w| w == FORGED.as_bytes()) {
            FORGED_LOG
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the log holds of lines mentioning [`FORGED`] so far.
fn forged_log() -> String {
    String::from_utf8_lossy(&FORGED_LOG.lock().expect("log")).into_owned()
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Bytes of a file in the coordinator's data directory (0 when absent).
fn size(coordinator: &Coordinator, file: &str) -> u64 {
    std::fs::metadata(coordinator.data_dir.join(file)).map_or(0, |m| m.len())
}

/// SQLite's write-ahead log is checkpointed at 1,000 pages and truncated back to 4 MiB
/// (`journal_size_limit`): it is checked against that ceiling, not counted as growth, since
/// honest work beside an attack fills and empties it.
const WAL_CEILING: u64 = 4200 << 10;

/// The coordinator's state and audit bytes on disk and this process's resident memory, taken
/// before an attack and compared after it.
struct Footprint {
    disk: u64,
    resident: Option<u64>,
}

impl Footprint {
    fn of(coordinator: &Coordinator) -> Self {
        Self {
            disk: size(coordinator, "state.db") + size(coordinator, "audit.jsonl"),
            resident: medfl_e2e::resident_bytes(),
        }
    }

    /// Asserts that state and audit grew less than `disk` bytes and resident memory less than
    /// `resident` bytes since `self`, and that the write-ahead log is within its ceiling; prints
    /// the growth (resident memory where the system reports it).
    fn assert_grew_less_than(&self, coordinator: &Coordinator, disk: u64, resident: u64) {
        let now = Self::of(coordinator);
        let disk_grown = now.disk.saturating_sub(self.disk);
        match (self.resident, now.resident) {
            (Some(before), Some(after)) => {
                let grown = after.saturating_sub(before);
                println!(
                    "state and audit grew {} KiB; resident memory {:.1} -> {:.1} MiB",
                    disk_grown >> 10,
                    mib(before),
                    mib(after)
                );
                assert!(
                    grown < resident,
                    "resident memory grew {:.1} MiB (bound {:.0} MiB)",
                    mib(grown),
                    mib(resident)
                );
            }
            _ => println!(
                "state and audit grew {} KiB; this system does not report resident memory",
                disk_grown >> 10
            ),
        }
        assert!(
            disk_grown < disk,
            "state and audit grew {disk_grown} bytes (bound {disk})"
        );
        let wal = size(coordinator, "state.db-wal");
        assert!(wal <= WAL_CEILING, "the write-ahead log holds {wal} bytes");
    }
}

/// From now on `site` declines whatever it is asked, so that runs waiting for it go on. A call
/// cut by a coordinator restart is made again (the channel reconnects), as a daemon would.
fn declining(site: RawSite) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = site.client.clone();
        loop {
            let Ok(reply) = client.poll_task(site.req(v1::PollTaskRequest {})).await else {
                tokio::task::yield_now().await;
                continue;
            };
            let Some(task) = reply.into_inner().task else {
                continue;
            };
            let declined = v1::ReportTaskFailureRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                attempt: task.attempt,
                reason: "giving up".into(),
                declined: v1::Declined::Unspecified.into(),
            };
            while client
                .report_task_failure(site.req(declined.clone()))
                .await
                .is_err()
            {
                tokio::task::yield_now().await;
            }
        }
    })
}

/// `hostile` declines `task` with `reason`, and every task after it; returns the detail of the
/// honest run `run` once it completed.
async fn declined_until_complete(
    mut hostile: RawSite,
    task: &v1::Task,
    reason: &str,
    client: &mut RunServiceClient<Channel>,
    run: &str,
) -> v1::RunDetail {
    hostile.fail(task, reason).await;
    let declining = declining(hostile);
    let detail = wait_for_completion(client, run).await;
    declining.abort();
    detail
}

/// Two hospitals and a hostile site, with an honest run of `rounds` rounds whose first round
/// waits for the hostile site: it holds that round's task.
struct Attack {
    fed: Federation,
    client: RunServiceClient<Channel>,
    hostile: RawSite,
    run: String,
    task: v1::Task,
}

impl Attack {
    async fn beside(run_name: &str, rounds: u32) -> Self {
        let fed = Federation::start(2).await;
        let mut client = fed.coordinator.runs().await;
        let mut hostile = RawSite::register(&fed.coordinator, "hostile").await;
        let run = create_run(&mut client, &breast_cancer_spec(run_name, rounds, 2, 120)).await;
        let task = hostile.next_task().await;
        Self {
            fed,
            client,
            hostile,
            run,
            task,
        }
    }
}

/// The hostile site registers again with `columns` column names.
async fn register_columns(hostile: &mut RawSite, columns: usize) -> Code {
    let columns = (0..columns).map(|i| format!("column-{i:014}")).collect();
    code(
        hostile
            .client
            .register(v1::RegisterRequest {
                site: "hostile".into(),
                token: "hostile-secret-token-0123456789".into(),
                datasets: vec![v1::DatasetSchema {
                    name: "breast_cancer".into(),
                    columns,
                    rows: 100,
                    class_counts: Default::default(),
                }],
                version: "test".into(),
                signing_public_key: vec![7; 32],
            })
            .await,
    )
}

/// The hostile site reports an evaluation of `task`'s model with `metrics` metric names.
async fn report_metrics(hostile: &mut RawSite, task: &v1::Task, metrics: usize) -> Code {
    let metrics = (0..metrics).map(|i| (format!("metric-{i}"), 0.5)).collect();
    code(
        hostile
            .client
            .report_evaluation(hostile.req(v1::ReportEvaluationRequest {
                run_id: task.run_id.clone(),
                round: task.round,
                global_sha256: task.global_sha256.clone(),
                num_examples: 10,
                metrics,
            }))
            .await,
    )
}
