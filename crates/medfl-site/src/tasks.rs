//! The tasks a site has under way, each with its own cancellation token, and the runs it works
//! on: shared by the worker, the heartbeat (which cancels the tasks of runs that ended at the
//! coordinator) and the kill switch watcher (which cancels whatever is in flight).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::SiteError;

/// Why a task was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The hospital threw the kill switch (`medfl-site pause`).
    Paused,
    /// The run was stopped or ended at the coordinator.
    RunStopped,
    /// The site daemon is shutting down.
    ShuttingDown,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::Paused => "paused by the hospital",
            CancelReason::RunStopped => "the run ended at the coordinator",
            CancelReason::ShuttingDown => "the site is shutting down",
        })
    }
}

/// One task's cancellation: set once, keeping the first reason given.
#[derive(Debug, Default)]
pub struct CancelToken {
    flag: AtomicBool,
    reason: OnceLock<CancelReason>,
}

impl CancelToken {
    /// Cancels the task; a token already cancelled keeps its first reason.
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.flag.store(true, Ordering::Release);
    }

    /// Why the task was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.reason.get().copied()
    }

    /// The flag training checks between steps.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// `Err(SiteError::Cancelled)` once the task was cancelled.
    pub fn check(&self) -> Result<(), SiteError> {
        match self.reason() {
            Some(reason) => Err(SiteError::Cancelled(reason)),
            None => Ok(()),
        }
    }
}

/// Which task a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    /// The run.
    pub run: String,
    /// Its round (0 for a cross-site evaluation).
    pub round: u32,
    /// The attempt at the round.
    pub attempt: u32,
}

#[derive(Debug, Default)]
struct Inner {
    /// Tokens of the tasks under way; `serial` tells two tasks with the same key apart.
    in_flight: HashMap<TaskKey, (u64, Arc<CancelToken>)>,
    /// Runs the site took tasks of and has not heard ended.
    runs: BTreeSet<String>,
    /// Runs the coordinator said ended, not yet forgotten by the worker.
    ended: BTreeSet<String>,
}

/// The site's tasks under way and the runs it works on. Cheap to clone; clones share.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    inner: Arc<Mutex<Inner>>,
    serial: Arc<AtomicU64>,
}

impl Tasks {
    /// The shared state. Nothing panics while holding the lock and every change leaves it
    /// consistent, so a poisoned lock is taken over as is.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes that the site works on `run` (told to the coordinator at every heartbeat).
    pub fn work_on(&self, run: &str) {
        let mut inner = self.lock();
        inner.ended.remove(run);
        inner.runs.insert(run.to_string());
    }

    /// Registers a task under way with a fresh token; it is removed (and, should its work
    /// still run, cancelled) when the guard drops.
    pub fn begin(&self, key: TaskKey) -> TaskGuard {
        let token = Arc::new(CancelToken::default());
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.runs.insert(key.run.clone());
        inner.ended.remove(&key.run);
        inner.in_flight.insert(key.clone(), (serial, token.clone()));
        TaskGuard {
            tasks: self.clone(),
            key,
            serial,
            token,
        }
    }

    /// Cancels every task under way; returns how many.
    pub fn cancel_all(&self, reason: CancelReason) -> usize {
        let inner = self.lock();
        for (_, token) in inner.in_flight.values() {
            token.cancel(reason);
        }
        inner.in_flight.len()
    }

    /// The coordinator says `run` ended: cancels its tasks under way and stops reporting it as
    /// active. Returns how many tasks were cancelled.
    pub fn run_stopped(&self, run: &str) -> usize {
        let mut inner = self.lock();
        let mut cancelled = 0;
        for (key, (_, token)) in &inner.in_flight {
            if key.run == run {
                token.cancel(CancelReason::RunStopped);
                cancelled += 1;
            }
        }
        if inner.runs.remove(run) {
            inner.ended.insert(run.to_string());
        }
        cancelled
    }

    /// The runs the site works on: those with tasks under way and those it took tasks of and
    /// has not heard ended.
    pub fn active_runs(&self) -> Vec<String> {
        let inner = self.lock();
        let mut runs = inner.runs.clone();
        runs.extend(inner.in_flight.keys().map(|k| k.run.clone()));
        runs.into_iter().collect()
    }

    /// Runs the coordinator said ended since the last call, for the worker to forget.
    pub fn take_ended(&self) -> BTreeSet<String> {
        std::mem::take(&mut self.lock().ended)
    }

    /// Whether a task is under way.
    pub fn busy(&self) -> bool {
        !self.lock().in_flight.is_empty()
    }
}

/// A task under way: holds its token, and unregisters it on drop.
#[derive(Debug)]
pub struct TaskGuard {
    tasks: Tasks,
    key: TaskKey,
    serial: u64,
    token: Arc<CancelToken>,
}

impl TaskGuard {
    /// The task's token.
    pub fn token(&self) -> &Arc<CancelToken> {
        &self.token
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        // Work still running for a task nobody waits for any more stops here.
        self.token.flag.store(true, Ordering::Release);
        let mut inner = self.tasks.lock();
        if inner
            .in_flight
            .get(&self.key)
            .is_some_and(|(serial, _)| *serial == self.serial)
        {
            inner.in_flight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(run: &str, round: u32) -> TaskKey {
        TaskKey {
            run: run.into(),
            round,
            attempt: 0,
        }
    }

    #[test]
    fn a_pause_cancels_only_what_is_in_flight() {
        let tasks = Tasks::default();
        let first = tasks.begin(key("r", 1));
        assert_eq!(tasks.cancel_all(CancelReason::Paused), 1);
        assert_eq!(first.token().reason(), Some(CancelReason::Paused));
        assert!(first.token().flag().load(Ordering::Acquire));
        assert!(matches!(
            first.token().check(),
            Err(SiteError::Cancelled(CancelReason::Paused))
        ));
        drop(first);
        assert!(!tasks.busy());
        // After the resume, the run's next task starts uncancelled.
        let next = tasks.begin(key("r", 2));
        assert_eq!(next.token().reason(), None);
        assert!(next.token().check().is_ok());
        assert!(!next.token().flag().load(Ordering::Acquire));
    }

    #[test]
    fn the_first_reason_sticks() {
        let tasks = Tasks::default();
        let task = tasks.begin(key("r", 1));
        tasks.run_stopped("r");
        tasks.cancel_all(CancelReason::ShuttingDown);
        assert_eq!(task.token().reason(), Some(CancelReason::RunStopped));
    }

    #[test]
    fn a_stopped_run_cancels_its_tasks_and_is_no_longer_active() {
        let tasks = Tasks::default();
        tasks.work_on("prepared");
        let a = tasks.begin(key("a", 1));
        let b = tasks.begin(key("b", 3));
        assert_eq!(tasks.active_runs(), ["a", "b", "prepared"]);
        assert_eq!(tasks.run_stopped("a"), 1);
        assert_eq!(a.token().reason(), Some(CancelReason::RunStopped));
        assert_eq!(b.token().reason(), None);
        // Reported while its task still winds down, then no more.
        assert_eq!(tasks.active_runs(), ["a", "b", "prepared"]);
        drop(a);
        assert_eq!(tasks.active_runs(), ["b", "prepared"]);
        assert_eq!(tasks.run_stopped("prepared"), 0);
        assert_eq!(tasks.active_runs(), ["b"]);
        assert_eq!(
            tasks.take_ended().into_iter().collect::<Vec<_>>(),
            ["a", "prepared"]
        );
        assert!(tasks.take_ended().is_empty());
        // A run the site never worked on is not remembered as ended.
        tasks.run_stopped("elsewhere");
        assert!(tasks.take_ended().is_empty());
    }

    #[test]
    fn a_dropped_guard_stops_its_work_and_leaves_a_newer_task_alone() {
        let tasks = Tasks::default();
        let old = tasks.begin(key("r", 1));
        let token = old.token().clone();
        // The same task handed out again while the first is still winding down.
        let new = tasks.begin(key("r", 1));
        drop(old);
        assert!(token.flag().load(Ordering::Acquire));
        assert!(tasks.busy());
        assert_eq!(tasks.cancel_all(CancelReason::Paused), 1);
        assert_eq!(new.token().reason(), Some(CancelReason::Paused));
        drop(new);
        assert!(!tasks.busy());
    }
}
