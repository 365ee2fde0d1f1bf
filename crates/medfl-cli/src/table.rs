//! Plain-text tables and the number, byte, time and run formats that `show`, `watch` and `list` share.

use std::collections::BTreeMap;

use medfl_proto::convert::run_status;
use medfl_proto::v1::{
    RoundSummary, RunDetail, RunSummary, SiteEvaluation, SiteInfo, SiteRoundResult,
};

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text: padded on the right.
    Left,
    /// Numbers: padded on the left.
    Right,
}

/// One column of a table: its header, the narrowest it may be and how its cells line up.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Header text.
    pub header: &'static str,
    /// Minimum width in characters; a [`Table`] widens the column to fit its cells.
    pub width: usize,
    /// Alignment of header and cells.
    pub align: Align,
}

const fn left(header: &'static str, width: usize) -> Column {
    Column {
        header,
        width,
        align: Align::Left,
    }
}

const fn right(header: &'static str, width: usize) -> Column {
    Column {
        header,
        width,
        align: Align::Right,
    }
}

/// Columns of the per-round table, shared by `run show`, `run watch` and the demo.
pub const ROUND_COLUMNS: &[Column] = &[
    right("ROUND", 5),
    right("TRIES", 5),
    right("SITES", 5),
    right("EXAMPLES", 8),
    right("TRAIN_LOSS", 10),
    right("ACC", 6),
    right("AUC", 6),
    right("F1", 6),
    right("SECS", 6),
    right("DOWN", 9),
    right("UP", 9),
    right("PER_UPDATE", 17),
    right("EPSILON", 7),
    right("CLIENT_EPS", 10),
    left("GLOBAL", 12),
];

/// Columns of the per-site results of one round.
pub const SITE_RESULT_COLUMNS: &[Column] = &[
    left("SITE", 8),
    left("OUTCOME", 8),
    left("REASON", 6),
    right("EXAMPLES", 8),
    right("TRAIN_LOSS", 10),
    right("ACC", 6),
    right("EPSILON", 7),
];

/// Columns of a cross-site evaluation.
pub const EVALUATION_COLUMNS: &[Column] = &[
    left("SITE", 8),
    right("EXAMPLES", 8),
    right("ACC", 6),
    right("AUC", 6),
    right("LOSS", 6),
];

/// Columns of the run list.
pub const RUN_COLUMNS: &[Column] = &[
    left("ID", 8),
    left("NAME", 8),
    left("STATUS", 9),
    right("ROUNDS", 7),
    left("CREATED", 20),
    left("BY", 6),
    left("ERROR", 0),
];

/// Columns of the site list.
pub const SITE_COLUMNS: &[Column] = &[
    left("NAME", 8),
    left("ONLINE", 6),
    right("LAST SEEN", 9),
    left("DATASETS", 0),
];

/// Rows of cells under a fixed set of columns; each column is as wide as its widest cell.
#[derive(Debug, Clone)]
pub struct Table {
    columns: &'static [Column],
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these columns.
    pub fn new(columns: &'static [Column]) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing trailing cells print empty, extra cells are ignored.
    pub fn push(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The header line and every row, each ending in a newline.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|cell| width(cell))
                    .chain([c.width, width(c.header)])
                    .max()
                    .unwrap_or(c.width)
            })
            .collect();
        let mut out = render_line(self.columns, &widths, &headers(self.columns));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&render_line(self.columns, &widths, row));
            out.push('\n');
        }
        out
    }
}

/// The header line of `columns` at their minimum widths (no newline).
pub fn header_line(columns: &[Column]) -> String {
    line(columns, &headers(columns))
}

/// One row at the columns' minimum widths (no newline), for output printed a row at a time.
pub fn line(columns: &[Column], cells: &[String]) -> String {
    let widths: Vec<usize> = columns.iter().map(|c| c.width).collect();
    render_line(columns, &widths, cells)
}

fn headers(columns: &[Column]) -> Vec<String> {
    columns.iter().map(|c| c.header.to_string()).collect()
}

fn width(s: &str) -> usize {
    s.chars().count()
}

fn render_line(columns: &[Column], widths: &[usize], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, (column, &w)) in columns.iter().zip(widths).enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        let cell = cells.get(i).map(String::as_str).unwrap_or("");
        match column.align {
            Align::Left => out.push_str(&format!("{cell:<w$}")),
            Align::Right => out.push_str(&format!("{cell:>w$}")),
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// The cells of one [`RoundSummary`] under [`ROUND_COLUMNS`]; `full_model_bytes` (0 when
/// unknown) is what each update's size is compared with.
pub fn round_cells(r: &RoundSummary, full_model_bytes: u64) -> Vec<String> {
    vec![
        r.round.to_string(),
        r.attempts.to_string(),
        format!("{}/{}", r.sites_reported, r.sites_selected),
        r.num_examples.to_string(),
        if r.num_examples == 0 {
            "-".into()
        } else {
            number(r.train_loss)
        },
        metric(&r.eval_metrics, "accuracy"),
        metric(&r.eval_metrics, "auc"),
        metric(&r.eval_metrics, "macro_f1"),
        seconds(r.duration_ms),
        human_bytes(r.bytes_down),
        human_bytes(r.bytes_up),
        per_update(r, full_model_bytes),
        // Record-level DP: the most any counted site has spent on the run so far.
        r.privacy_epsilon.map_or("-".into(), |e| format!("{e:.3}")),
        // Client-level DP: what the run has spent on any one site after this round.
        r.client_epsilon.map_or("-".into(), |e| format!("{e:.3}")),
        short_sha(&r.global_sha256),
    ]
}

/// A round's duration in seconds: tenths from a second up, milliseconds below (a round of
/// 11 ms is not "0.0").
fn seconds(ms: u64) -> String {
    if ms >= 1000 {
        format!("{:.1}", ms as f64 / 1000.0)
    } else {
        format!("{:.3}", ms as f64 / 1000.0)
    }
}

/// Mean bytes of an update this round, and their share of the whole model.
fn per_update(r: &RoundSummary, full_model_bytes: u64) -> String {
    if r.sites_reported == 0 {
        return "-".into();
    }
    let each = r.bytes_up / u64::from(r.sites_reported);
    if full_model_bytes == 0 {
        return human_bytes(each);
    }
    let share = 100.0 * each as f64 / full_model_bytes as f64;
    format!("{} {share:.2}%", human_bytes(each))
}

/// One [`RoundSummary`] as a line under [`header_line`]`(`[`ROUND_COLUMNS`]`)`, as `run watch`
/// prints it when the round completes.
pub fn round_line(r: &RoundSummary, full_model_bytes: u64) -> String {
    line(ROUND_COLUMNS, &round_cells(r, full_model_bytes))
}

/// The per-round table of a run.
pub fn rounds_table(rounds: &[RoundSummary], full_model_bytes: u64) -> String {
    let mut table = Table::new(ROUND_COLUMNS);
    for r in rounds {
        table.push(round_cells(r, full_model_bytes));
    }
    table.render()
}

/// The per-site results of one round.
pub fn site_results_table(sites: &[SiteRoundResult]) -> String {
    let mut table = Table::new(SITE_RESULT_COLUMNS);
    for s in sites {
        table.push(vec![
            one_line(&s.site),
            outcome_name(s.outcome).to_string(),
            match (s.reason.is_empty(), s.count) {
                (true, _) => "-".into(),
                (false, 0 | 1) => one_line(&s.reason),
                // Repeated refusals are counted in one result, with the latest reason.
                (false, n) => format!("{n}× {}", one_line(&s.reason)),
            },
            s.num_examples.to_string(),
            if s.num_examples == 0 {
                "-".into()
            } else {
                number(s.train_loss)
            },
            metric(&s.eval_metrics, "accuracy"),
            // The record-level ε the site's own accountant charged for the run so far.
            s.privacy_epsilon.map_or("-".into(), |e| format!("{e:.3}")),
        ]);
    }
    table.render()
}

/// Each site's evaluation of the final model.
pub fn evaluation_table(evaluations: &[SiteEvaluation]) -> String {
    let mut table = Table::new(EVALUATION_COLUMNS);
    for e in evaluations {
        table.push(vec![
            one_line(&e.site),
            e.num_examples.to_string(),
            metric(&e.metrics, "accuracy"),
            metric(&e.metrics, "auc"),
            metric(&e.metrics, "loss"),
        ]);
    }
    table.render()
}

/// The run list.
pub fn runs_table(runs: &[RunSummary]) -> String {
    let mut table = Table::new(RUN_COLUMNS);
    for r in runs {
        table.push(vec![
            one_line(&r.run_id),
            one_line(&r.name),
            status_name(r.status).into(),
            format!("{}/{}", r.rounds_done, r.rounds_total),
            utc(r.created_unix_ms),
            if r.creator.is_empty() {
                "-".into()
            } else {
                one_line(&r.creator)
            },
            if r.error.is_empty() {
                "-".into()
            } else {
                one_line(&r.error)
            },
        ]);
    }
    table.render()
}

/// The site list; `now_unix_ms` is the current time, to say how long ago each site was seen.
pub fn sites_table(sites: &[SiteInfo], now_unix_ms: u64) -> String {
    let mut table = Table::new(SITE_COLUMNS);
    for s in sites {
        let datasets: Vec<String> = s
            .datasets
            .iter()
            .map(|d| format!("{} ({} cols)", one_line(&d.name), d.columns.len()))
            .collect();
        table.push(vec![
            one_line(&s.name),
            if s.online { "yes" } else { "no" }.into(),
            if s.last_seen_unix_ms == 0 {
                "never".into()
            } else {
                format!(
                    "{} ago",
                    human_age(now_unix_ms.saturating_sub(s.last_seen_unix_ms) / 1000)
                )
            },
            if datasets.is_empty() {
                "-".into()
            } else {
                datasets.join(", ")
            },
        ]);
    }
    table.render()
}

/// Each site's datasets with their column names, one dataset per line.
pub fn site_columns(sites: &[SiteInfo]) -> String {
    let mut out = String::new();
    for s in sites {
        for d in &s.datasets {
            let columns: Vec<String> = d.columns.iter().map(|c| one_line(c)).collect();
            // An image dataset also says how many images each class has.
            let classes: Vec<String> = d
                .class_counts
                .iter()
                .map(|(class, n)| format!("{} {n}", one_line(class)))
                .collect();
            let classes = if classes.is_empty() {
                String::new()
            } else {
                format!(" ({} images: {})", d.rows, classes.join(", "))
            };
            out += &format!(
                "{} / {}: {}{classes}\n",
                one_line(&s.name),
                one_line(&d.name),
                columns.join(", ")
            );
        }
    }
    if !out.is_empty() {
        out.insert(0, '\n');
    }
    out
}

/// What the run has spent at each privacy level and what its targets leave, one line per
/// level (empty without differential privacy or with a spec that does not parse).
pub fn privacy_summary(detail: &RunDetail) -> String {
    let Ok(spec) = medfl_core::spec::RunSpec::from_toml(&detail.spec_toml) else {
        return String::new();
    };
    let left = |target: Option<f64>, spent: Option<f64>| match target {
        Some(t) => format!("; target ε {t}, {:.3} left", t - spent.unwrap_or(0.0)),
        None => String::new(),
    };
    let eps = |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{e:.3}"));
    let mut out = String::new();
    if let Some(r) = &spec.privacy.record {
        let spent = detail
            .rounds
            .iter()
            .filter_map(|x| x.privacy_epsilon)
            .reduce(f64::max);
        out += &format!(
            "privacy, record level (each patient): largest ε a site reported {} (z = {}, C = {}, \
             δ {}, {}){}\n",
            eps(spent),
            r.noise_multiplier,
            r.max_grad_norm,
            r.delta
                .map_or("1/N^1.1 per site".to_string(), |d| format!("= {d}")),
            r.accountant.accountant().name(),
            left(r.target_epsilon, spent),
        );
    }
    if let Some(c) = &spec.privacy.client {
        let last = detail.rounds.last();
        let spent = last.and_then(|r| r.client_epsilon);
        out += &format!(
            "privacy, client level (each hospital): ε {} at δ = {} after {} rounds (q = {}, z = {}, \
             C = {}{}, {} noise, {}){}\n",
            eps(spent),
            c.delta,
            last.map_or(0, |r| r.round),
            c.sample_rate,
            c.noise_multiplier,
            c.clip_norm,
            if c.adaptive_clipping.is_some() { " adaptive" } else { "" },
            c.noise.name(),
            c.accountant.accountant().name(),
            left(c.target_epsilon, spent),
        );
    }
    out
}

/// `took` milliseconds as `1 h 02 min`, `3 min 05 s` or `12.3 s`.
fn elapsed(took: u64) -> String {
    let secs = took / 1000;
    match secs {
        0..60 => format!("{} s", seconds(took)),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60),
    }
}

/// A run's summary as `key  value` lines: id, name, status, rounds, creation time, the round in
/// progress and the error, when there is one.
pub fn run_overview(detail: &RunDetail) -> String {
    let empty = RunSummary::default();
    let s = detail.summary.as_ref().unwrap_or(&empty);
    let mut lines = vec![
        ("run", one_line(&s.run_id)),
        ("name", one_line(&s.name)),
        ("status", status_name(s.status).into()),
        ("rounds", format!("{}/{}", s.rounds_done, s.rounds_total)),
        ("created", utc(s.created_unix_ms)),
    ];
    if s.ended_unix_ms > 0 {
        let took = s.ended_unix_ms.saturating_sub(s.created_unix_ms);
        lines.push((
            "ended",
            format!("{} (after {})", utc(s.ended_unix_ms), elapsed(took)),
        ));
    }
    if !s.creator.is_empty() {
        lines.push((
            "by",
            format!("{} ({})", one_line(&s.creator), one_line(&s.creator_role)),
        ));
    }
    if !detail.rounds.is_empty() {
        // Rounds left out of the reply are not counted.
        let ms: u64 = detail.rounds.iter().map(|r| r.duration_ms).sum();
        let shown = detail.rounds.len();
        lines.push((
            "trained",
            format!(
                "{} s over {shown} round{}{}",
                seconds(ms),
                if shown == 1 { "" } else { "s" },
                if detail.rounds_omitted > 0 {
                    " shown"
                } else {
                    ""
                }
            ),
        ));
    }
    if is_running(s.status) && detail.current_round > 0 {
        lines.push(("current", current_round(detail)));
    }
    if !s.error.is_empty() {
        lines.push(("error", one_line(&s.error)));
    }
    lines
        .into_iter()
        .map(|(k, v)| format!("{k:<8} {v}\n"))
        .collect()
}

/// The round in progress, as `round 4 train: 2/3 sites reported`.
pub fn current_round(detail: &RunDetail) -> String {
    let phase = if detail.current_phase.is_empty() {
        "starting"
    } else {
        detail.current_phase.as_str()
    };
    format!(
        "round {} {}: {}/{} sites reported",
        detail.current_round,
        one_line(phase),
        detail.current_reported,
        detail.current_selected
    )
}

/// The lower-case name of a wire run status (`unknown` for codes this CLI does not know).
pub fn status_name(code: i32) -> &'static str {
    run_status(code).map_or("unknown", |s| s.as_str())
}

/// Whether a wire run status means the run has ended.
pub fn is_terminal(code: i32) -> bool {
    run_status(code).is_some_and(|s| s.is_terminal())
}

fn is_running(code: i32) -> bool {
    run_status(code).is_some_and(|s| !s.is_terminal())
}

/// A metric from an `eval_metrics` map to four decimals, or `-` when absent or not finite.
pub fn metric(metrics: &BTreeMap<String, f64>, name: &str) -> String {
    metrics.get(name).map_or_else(|| "-".into(), |&v| number(v))
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "-".into()
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A span of seconds in its two largest units: `42s`, `3m 05s`, `2h 07m`, `4d 03h`.
pub fn human_age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Milliseconds since the Unix epoch as a UTC time, `2024-05-01T12:34:56Z`; `-` for zero.
pub fn utc(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let secs = unix_ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Year, month and day of a count of days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The first 12 characters of a SHA-256, or `-` when there is none.
pub fn short_sha(sha: &str) -> String {
    if sha.is_empty() {
        return "-".into();
    }
    sha.chars().take(12).collect()
}

/// Text from the coordinator made safe for one table cell: control characters become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// How a site's outcome is shown.
pub fn outcome_name(code: i32) -> &'static str {
    medfl_proto::convert::site_outcome(code).map_or("unknown", |o| o.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round() -> RoundSummary {
        RoundSummary {
            round: 3,
            attempts: 1,
            sites_selected: 4,
            sites_reported: 3,
            num_examples: 1200,
            train_loss: 0.123_456,
            eval_metrics: [("accuracy".to_string(), 0.9)].into_iter().collect(),
            duration_ms: 2_345,
            bytes_down: 3 * 1024 * 1024,
            bytes_up: 512,
            global_sha256: "0123456789abcdef0123".into(),
            sites: vec![],
            sites_omitted: 0,
            privacy_epsilon: None,
            client_epsilon: None,
        }
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn human_age_keeps_two_units() {
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(185), "3m 05s");
        assert_eq!(human_age(2 * 3600 + 7 * 60 + 9), "2h 07m");
        assert_eq!(human_age(4 * 86_400 + 3 * 3600), "4d 03h");
    }

    #[test]
    fn utc_formats_civil_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_714_566_896_789), "2024-05-01T12:34:56Z");
    }

    #[test]
    fn round_row_shows_dashes_for_missing_metrics() {
        let cells = round_cells(&round(), 0);
        assert_eq!(
            cells,
            [
                "3",
                "1",
                "3/4",
                "1200",
                "0.1235",
                "0.9000",
                "-",
                "-",
                "2.3",
                "3.0 MiB",
                "512 B",
                "170 B",
                "-",
                "-",
                "0123456789ab"
            ]
        );
        // Short rounds keep their milliseconds.
        let quick = RoundSummary {
            duration_ms: 11,
            ..round()
        };
        assert_eq!(round_cells(&quick, 0)[8], "0.011");
        // Each update's share of the whole model.
        assert_eq!(round_cells(&round(), 17_000)[11], "170 B 1.00%");
        let empty = round_cells(&RoundSummary::default(), 100);
        assert_eq!(empty[4], "-");
        assert_eq!(empty[11], "-");
        assert_eq!(empty[12], "-");
        assert_eq!(empty[13], "-");
        assert_eq!(empty[14], "-");
        let private = RoundSummary {
            privacy_epsilon: Some(2.5),
            client_epsilon: Some(0.75),
            ..round()
        };
        assert_eq!(round_cells(&private, 0)[12], "2.500");
        assert_eq!(round_cells(&private, 0)[13], "0.750");
    }

    #[test]
    fn privacy_summary_gives_each_level_its_spend_and_what_is_left() {
        let spec = "name = \"p\"\nrounds = 3\n[model]\nkind = \"mlp\"\nhidden = []\n\
                    [task]\ndataset = \"d\"\nlabel = \"y\"\nlabels = [\"a\", \"b\"]\n\
                    features = [\"x\"]\n\
                    [[privacy]]\nlevel = \"record\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n\
                    target_epsilon = 8.0\n\
                    [[privacy]]\nlevel = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 0.5\n\
                    sample_rate = 0.5\ndelta = 0.001\ntarget_epsilon = 4.0\n";
        let detail = RunDetail {
            spec_toml: spec.into(),
            rounds: vec![
                RoundSummary {
                    privacy_epsilon: Some(1.5),
                    client_epsilon: Some(0.5),
                    ..round()
                },
                RoundSummary {
                    round: 4,
                    privacy_epsilon: Some(2.0),
                    client_epsilon: Some(0.75),
                    ..round()
                },
            ],
            ..RunDetail::default()
        };
        let text = privacy_summary(&detail);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("largest ε a site reported 2.000")
                && lines[0].contains("target ε 8, 6.000 left"),
            "{text}"
        );
        assert!(
            lines[1].contains("ε 0.750 at δ = 0.001 after 4 rounds")
                && lines[1].contains("target ε 4, 3.250 left"),
            "{text}"
        );
        assert_eq!(privacy_summary(&RunDetail::default()), "");
    }

    #[test]
    fn round_line_lines_up_with_header() {
        let header = header_line(ROUND_COLUMNS);
        let row = round_line(&round(), 0);
        assert_eq!(
            header,
            "ROUND  TRIES  SITES  EXAMPLES  TRAIN_LOSS     ACC     AUC      F1    SECS       DOWN         UP         PER_UPDATE  EPSILON  CLIENT_EPS  GLOBAL"
        );
        assert_eq!(
            row,
            "    3      1    3/4      1200      0.1235  0.9000       -       -     2.3    3.0 MiB      512 B              170 B        -           -  0123456789ab"
        );
        // The table used by `run show` has the same layout when no cell is wider than its column.
        let table = rounds_table(&[round()], 0);
        assert_eq!(table, format!("{header}\n{row}\n"));
    }

    #[test]
    fn table_widens_to_fit_and_trims() {
        const COLS: &[Column] = &[left("A", 1), right("N", 1), left("Z", 0)];
        let mut t = Table::new(COLS);
        t.push(vec!["long".into(), "7".into(), "".into()]);
        t.push(vec!["x".into(), "123".into(), "end".into()]);
        assert_eq!(t.render(), "A       N  Z\nlong    7\nx     123  end\n");
    }

    #[test]
    fn the_overview_names_the_owner_and_the_training_time() {
        let detail = RunDetail {
            summary: Some(RunSummary {
                run_id: "r1".into(),
                creator: "dr-ana".into(),
                creator_role: "researcher".into(),
                ..RunSummary::default()
            }),
            rounds: vec![round(), round()],
            ..RunDetail::default()
        };
        let text = run_overview(&detail);
        assert!(text.contains("by       dr-ana (researcher)"), "{text}");
        assert!(text.contains("trained  4.7 s over 2 rounds"), "{text}");
    }

    #[test]
    fn an_ended_run_shows_when_and_after_how_long() {
        let detail = RunDetail {
            summary: Some(RunSummary {
                created_unix_ms: 1_795_861_800_000,
                ended_unix_ms: 1_795_861_800_000 + 3_723_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = run_overview(&detail);
        assert!(text.contains("ended    2026-11-28T11:32:03Z"), "{text}");
        assert!(text.contains("after 1 h 02 min"), "{text}");
        assert_eq!(elapsed(65_000), "1 min 05 s");
        let running = RunDetail {
            summary: Some(RunSummary::default()),
            ..Default::default()
        };
        assert!(!run_overview(&running).contains("ended"));
    }

    #[test]
    fn cells_are_single_line() {
        let runs = [RunSummary {
            run_id: "r1".into(),
            name: "a\nb".into(),
            status: 3,
            rounds_done: 2,
            rounds_total: 5,
            created_unix_ms: 0,
            error: "too few\tsites".into(),
            ..Default::default()
        }];
        let text = runs_table(&runs);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("a b"), "{text}");
        assert!(text.contains("failed"), "{text}");
        assert!(text.contains("too few sites"), "{text}");
    }
}
