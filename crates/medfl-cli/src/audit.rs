//! `medfl audit`: checks an audit log's hash chain and shows its entries, filtered by run, site,
//! event and time. A site's log answers what left the hospital, when, and to whom.

use std::path::PathBuf;

use anyhow::Context;

use crate::table;

/// `medfl audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; names the first broken line, and prints the head (the last line's
    /// hash) to keep elsewhere.
    Verify {
        /// The log (`audit.jsonl` in a coordinator's or site's data directory).
        log: PathBuf,
        /// A head printed by an earlier `verify`: the log must still hold that line, so a
        /// truncated log, or one whose tail was rewritten, fails.
        #[arg(long, value_name = "SHA256")]
        expect_head: Option<String>,
        /// The coordinator's public key (64 hex digits, or a file holding them: its
        /// `signing.pub`, or the `coordinator_key` a site pinned): every signed checkpoint in
        /// the log must verify with it, so no entry up to the last checkpoint was rewritten,
        /// even with the hash chain rebuilt.
        #[arg(long, value_name = "HEX|FILE")]
        key: Option<String>,
    },
    /// Show entries, oldest first.
    Show {
        /// The log.
        log: PathBuf,
        /// Only this run.
        #[arg(long)]
        run: Option<String>,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// Only this event (`update_sent`, `update_refused`, ...).
        #[arg(long)]
        event: Option<String>,
        /// Only entries at or after this UTC time (`2026-11-28` or `2026-11-28T10:30:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// Only entries before this UTC time.
        #[arg(long)]
        until: Option<String>,
        /// Print the entries as they are stored: JSON, one a line.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a subcommand.
pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            log,
            expect_head,
            key,
        } => {
            let v = medfl_audit::verify(&log, expect_head.as_deref())?;
            if let (Some(head), None) = (&expect_head, v.found) {
                anyhow::bail!(
                    "{}: no entry has the head {head} recorded earlier: the log was truncated or \
                     its tail rewritten ({} entries now, head {})",
                    log.display(),
                    v.entries,
                    v.head
                );
            }
            medfl_daemon::outln!(
                "{}: {} entries, hash chain intact, head {}",
                log.display(),
                v.entries,
                v.head
            );
            if let Some(at) = v.found {
                medfl_daemon::outln!("the expected head is entry {at}");
            }
            if let Some(key) = key {
                let key = public_key(&key)?;
                let c = medfl_audit::verify_checkpoints(&log, &key)?;
                match c.last {
                    None => anyhow::bail!(
                        "{}: no signed checkpoint in it: the key can vouch for nothing",
                        log.display()
                    ),
                    Some((at, at_ms)) => medfl_daemon::outln!(
                        "{} signed checkpoints verify with the key; the last is entry {at} ({}), \
                         {} entries after it",
                        c.checkpoints,
                        table::utc(at_ms),
                        c.after_last
                    ),
                }
            }
        }
        AuditCommand::Show {
            log,
            run,
            site,
            event,
            since,
            until,
            json,
        } => {
            let since = since.as_deref().map(parse_utc).transpose()?;
            let until = until.as_deref().map(parse_utc).transpose()?;
            for e in medfl_audit::read(&log)? {
                let keep = run.as_ref().is_none_or(|r| e.run.as_ref() == Some(r))
                    && site.as_ref().is_none_or(|s| e.site.as_ref() == Some(s))
                    && event.as_ref().is_none_or(|k| &e.event == k)
                    && since.is_none_or(|t| e.at_ms >= t)
                    && until.is_none_or(|t| e.at_ms < t);
                if keep && json {
                    medfl_daemon::outln!("{}", serde_json::to_string(&e)?);
                } else if keep {
                    medfl_daemon::outln!(
                        "{:>5} {} {:<20} run={} round={} site={} {}",
                        e.seq,
                        table::utc(e.at_ms),
                        e.event,
                        e.run.as_deref().unwrap_or("-"),
                        e.round.map_or("-".into(), |r| r.to_string()),
                        e.site.as_deref().unwrap_or("-"),
                        e.details
                    );
                }
            }
        }
    }
    Ok(())
}

/// An Ed25519 public key given as 64 hex digits, or as a file holding them.
fn public_key(arg: &str) -> anyhow::Result<Vec<u8>> {
    let text = match std::fs::read_to_string(arg) {
        Ok(text) => text,
        Err(_) if arg.len() == 64 => arg.to_string(),
        Err(e) => anyhow::bail!("--key {arg}: neither 64 hex digits nor a readable file: {e}"),
    };
    let key = hex::decode(text.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .with_context(|| format!("--key {arg}: not an Ed25519 public key (64 hex digits)"))?;
    Ok(key)
}

/// Milliseconds since the epoch of a UTC `YYYY-MM-DD[THH:MM[:SS]][Z]`.
pub fn parse_utc(text: &str) -> anyhow::Result<u64> {
    let bad = || format!("`{text}` is not a UTC time like 2026-11-28 or 2026-11-28T10:30:00Z");
    let t = text.trim().trim_end_matches('Z');
    let (date, time) = t.split_once('T').unwrap_or((t, "00:00:00"));
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()
        .with_context(bad)?;
    let h: Vec<i64> = time
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()
        .with_context(bad)?;
    anyhow::ensure!(d.len() == 3 && (2..=3).contains(&h.len()), "{}", bad());
    let (y, m, day) = (d[0], d[1], d[2]);
    anyhow::ensure!(
        (1..=12).contains(&m) && (1..=31).contains(&day),
        "{}",
        bad()
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h.get(2).copied().unwrap_or(0);
    u64::try_from(secs * 1000).ok().with_context(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_dates_and_times() {
        assert_eq!(parse_utc("1970-01-01").unwrap(), 0);
        assert_eq!(
            parse_utc("2026-11-28T10:30:00Z").unwrap(),
            1_795_861_800_000
        );
        assert_eq!(parse_utc("2000-03-01T00:00").unwrap(), 951_868_800_000);
        assert!(parse_utc("28/11/2026").is_err());
        assert!(parse_utc("2026-13-01").is_err());
    }
}
