//! The open-file limit the connection cap needs. Every connection holds a file descriptor, and
//! so do SQLite, blobs being written and the audit log: with the common soft limit of 1,024, a
//! few thousand idle connections would make `accept` fail and, worse, every file the coordinator
//! opens. At start the coordinator raises its soft limit to fit `max_connections` plus
//! [`RESERVED`] (the hard limit allowing), and lowers the connection cap when it cannot.

use tracing::{info, warn};

/// Descriptors kept for everything but connections: SQLite and its WAL, blobs being written and
/// read, the audit log, logs.
pub const RESERVED: u64 = 1024;

/// The fewest connections the coordinator serves, whatever its limit (as `max_connections`).
const FLOOR: u32 = 16;

/// Raises the process's soft open-file limit towards `max_connections + RESERVED` and returns
/// the connection cap that fits under it (at least 16), logging when that is lower.
pub fn fit_connections(max_connections: u32) -> u32 {
    let soft = raise_soft_limit(u64::from(max_connections) + RESERVED);
    let fits = soft.saturating_sub(RESERVED);
    if fits >= u64::from(max_connections) {
        return max_connections;
    }
    let cap = u32::try_from(fits).unwrap_or(u32::MAX).max(FLOOR);
    warn!(
        max_connections,
        serving = cap,
        open_file_limit = soft,
        "the open-file limit does not fit max_connections; serving fewer connections at once \
         (raise the hard limit, e.g. LimitNOFILE= in the systemd unit or ulimit -Hn)"
    );
    cap
}

/// The soft limit after trying to raise it to `want` (not above the hard limit).
#[cfg(unix)]
fn raise_soft_limit(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let raised = want.min(limit.maximum.unwrap_or(u64::MAX));
    if raised <= soft {
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(raised),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => {
            info!(from = soft, to = raised, "raised the open-file limit");
            raised
        }
        Err(e) => {
            warn!(error = %e, limit = soft, "could not raise the open-file limit");
            soft
        }
    }
}

#[cfg(not(unix))]
fn raise_soft_limit(_want: u64) -> u64 {
    u64::MAX
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use rustix::process::{getrlimit, Resource};

    #[test]
    fn the_soft_limit_is_raised_to_fit_the_connection_cap_within_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        let cap = fit_connections(2048);
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        if hard >= 2048 + RESERVED {
            assert_eq!(cap, 2048);
            assert!(soft >= 2048 + RESERVED, "soft limit {soft}");
        } else {
            assert_eq!(u64::from(cap), hard.saturating_sub(RESERVED).max(16));
        }
        // A cap far above any hard limit is lowered to what fits, never below the floor.
        let huge = fit_connections(u32::MAX - 2048);
        assert!(huge >= FLOOR);
        if hard < u64::from(u32::MAX) {
            assert!(u64::from(huge) <= hard.saturating_sub(RESERVED).max(16));
        }
    }
}
