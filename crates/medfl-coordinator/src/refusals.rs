//! Refused TLS handshakes in the audit log, rate-limited: who tried to connect without a
//! certificate the consortium accepts (none, another CA's, a revoked or expired one), and from
//! where. A flood of them (a scanner, a site retrying with a revoked kit) cannot fill the disk:
//! at most [`PER_MINUTE`] entries a minute, and the next entry says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfl_pki::RefusedHandshake;
use tokio::sync::mpsc;

use crate::state::Shared;

/// Refused handshakes written to the audit log in any one minute.
pub const PER_MINUTE: u32 = 10;

/// Refusals waiting to be written; more are counted as left out.
const QUEUE: usize = 64;

/// Counts what one window of [`PER_MINUTE`] lets through.
#[derive(Debug)]
pub struct Window {
    started: Instant,
    written: u32,
    left_out: u64,
}

impl Window {
    /// A window starting at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            written: 0,
            left_out: 0,
        }
    }

    /// Whether a refusal at `now` is written; when it is, how many were left out before it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.started) >= Duration::from_secs(60) {
            self.started = now;
            self.written = 0;
        }
        if self.written >= PER_MINUTE {
            self.left_out += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.left_out))
    }

    /// Counts refusals left out elsewhere (a full queue).
    pub fn leave_out(&mut self, n: u64) {
        self.left_out += n;
    }
}

/// What `medfl_pki::tls_incoming_observed` calls for each refused handshake: queues it for a
/// task that writes the audit entries within the rate.
pub fn audit_refusals(shared: Arc<Shared>) -> impl Fn(RefusedHandshake) + Send + Sync + 'static {
    let (tx, mut rx) = mpsc::channel::<RefusedHandshake>(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    tokio::spawn(async move {
        let mut window = Window::new(Instant::now());
        while let Some(refused) = rx.recv().await {
            window.leave_out(counted.swap(0, Ordering::Relaxed));
            let Some(left_out) = window.admit(Instant::now()) else {
                continue;
            };
            shared.audit(medfl_audit::Event::new(
                "handshake_refused",
                serde_json::json!({
                    "peer": refused.peer.to_string(),
                    "reason": refused.reason,
                    "left_out_before": left_out,
                }),
            ));
        }
    });
    move |refused| {
        if tx.try_send(refused).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_rate_is_written_and_the_next_entry_counts_the_rest() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        let written: Vec<Option<u64>> = (0..15).map(|_| w.admit(t0)).collect();
        assert_eq!(
            written.iter().filter(|w| w.is_some()).count(),
            PER_MINUTE as usize
        );
        assert!(written[10..].iter().all(Option::is_none));
        w.leave_out(3);
        // A minute on, the first entry says 5 + 3 were left out.
        assert_eq!(w.admit(t0 + Duration::from_secs(61)), Some(8));
        assert_eq!(w.admit(t0 + Duration::from_secs(62)), Some(0));
    }
}
