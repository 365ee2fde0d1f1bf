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
use medfl_e2e::Coordinator;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tonic::Code;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// This test's turn: held to its end.
async fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
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

/// From now on `site` declines whatever it is asked, so that runs waiting for it go on.
fn declining(mut site: RawSite) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let task = site.next_task().await;
            site.fail(&task, "giving up").await;
        }
    })
}
