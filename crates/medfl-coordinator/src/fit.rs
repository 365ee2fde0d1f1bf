//! What a reply keeps so that it always fits a stock gRPC client's 4 MiB message limit, however
//! much a run or the site list holds: run details are summarised (with counts of what was
//! left out), site lists are paged.

use medfl_proto::v1;
use prost::Message;

/// The most bytes one reply may encode to: under the 4 MiB a gRPC client accepts by default,
/// with room for framing.
pub const REPLY_BUDGET: usize = (4 << 20) - (64 << 10);

/// Per-site results one round of a run detail carries at most.
pub const SITES_PER_ROUND: usize = 1000;

/// Bytes of a per-site reason a run detail carries at most (the stored reason stays whole).
const REASON_CHARS: usize = 500;

/// Trims `detail` until it fits `budget` bytes, least useful first: long reasons, then per-site
/// results beyond [`SITES_PER_ROUND`] a round, then the per-site results of the oldest rounds,
/// then the final evaluations beyond the budget, then the oldest rounds themselves. What is
/// left out is counted in `sites_omitted`, `evaluations_omitted` and `rounds_omitted`.
pub fn run_detail(detail: &mut v1::RunDetail, budget: usize) {
    for round in &mut detail.rounds {
        for site in &mut round.sites {
            truncate_chars(&mut site.reason, REASON_CHARS);
        }
        if round.sites.len() > SITES_PER_ROUND {
            round.sites_omitted += (round.sites.len() - SITES_PER_ROUND) as u32;
            round.sites.truncate(SITES_PER_ROUND);
        }
    }
    let mut size = detail.encoded_len();
    // The newest round with sites keeps them longest: it is what a watcher looks at.
    let mut oldest = 0;
    while size > budget && oldest + 1 < detail.rounds.len() {
        let round = &mut detail.rounds[oldest];
        if !round.sites.is_empty() {
            let before = round.encoded_len();
            round.sites_omitted += round.sites.len() as u32;
            round.sites.clear();
            size -= before - round.encoded_len();
        }
        oldest += 1;
    }
    while size > budget && !detail.final_evaluation.is_empty() {
        let e = detail.final_evaluation.pop().expect("not empty");
        detail.evaluations_omitted += 1;
        size = size.saturating_sub(field_cost(e.encoded_len()));
    }
    if size > budget {
        // Whole rounds go, oldest first; the latest always stays, with as many sites as fit.
        let mut cut = 0;
        while size > budget && cut + 1 < detail.rounds.len() {
            size = size.saturating_sub(field_cost(detail.rounds[cut].encoded_len()));
            cut += 1;
        }
        detail.rounds.drain(..cut);
        detail.rounds_omitted += cut as u32;
        if let Some(last) = detail.rounds.last_mut() {
            while size > budget && !last.sites.is_empty() {
                let s = last.sites.pop().expect("not empty");
                last.sites_omitted += 1;
                size = size.saturating_sub(field_cost(s.encoded_len()));
            }
        }
    }
    // The counts of what was left out take a few bytes of their own (and a shrunk round's
    // length prefix a byte less): settle on the exact size.
    while detail.encoded_len() > budget {
        if detail.rounds.len() > 1 {
            detail.rounds.remove(0);
            detail.rounds_omitted += 1;
        } else if let Some(s) = detail.rounds.last_mut().and_then(|r| {
            let s = r.sites.pop();
            r.sites_omitted += u32::from(s.is_some());
            s
        }) {
            drop(s);
        } else {
            break;
        }
    }
}

/// Bytes a repeated message field of `len` bytes takes in its parent: its key (fields here
/// are numbered below 16), its length prefix and itself.
fn field_cost(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Cuts `s` to at most `max` characters, marking the cut.
fn truncate_chars(s: &mut String, max: usize) {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
        s.push('…');
    }
}

/// Sites a page holds when the caller does not say.
pub const SITES_PAGE: usize = 500;

/// The most sites a page holds.
pub const SITES_PAGE_MAX: usize = 5000;

/// A page of `sites` (in name order) starting after `token`, at most `page_size` long (0: the
/// default) and within `budget` bytes; returns it with the next page's token (empty at the
/// end). One site always fits: registration bounds a site's schema well under the budget.
pub fn sites_page(
    sites: impl Iterator<Item = v1::SiteInfo>,
    token: &str,
    page_size: u32,
    budget: usize,
) -> v1::ListSitesResponse {
    let limit = match page_size as usize {
        0 => SITES_PAGE,
        n => n.min(SITES_PAGE_MAX),
    };
    let mut page = v1::ListSitesResponse::default();
    let mut size = 0;
    for site in sites.filter(|s| token.is_empty() || s.name.as_str() > token) {
        let len = site.encoded_len() + 4;
        if page.sites.len() == limit || (!page.sites.is_empty() && size + len > budget) {
            page.next_page_token = page
                .sites
                .last()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            break;
        }
        size += len;
        page.sites.push(site);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, columns: usize) -> v1::SiteInfo {
        v1::SiteInfo {
            name: name.into(),
            datasets: vec![v1::DatasetSchema {
                name: "d".into(),
                columns: (0..columns).map(|i| format!("column_{i:06}")).collect(),
                rows: 10,
                class_counts: Default::default(),
            }],
            ..Default::default()
        }
    }

    fn round(n: u32, sites: usize, reason: usize) -> v1::RoundSummary {
        v1::RoundSummary {
            round: n,
            sites: (0..sites)
                .map(|i| v1::SiteRoundResult {
                    site: format!("site-{i:05}"),
                    reason: "x".repeat(reason),
                    count: 1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_detail_within_budget_is_left_alone() {
        let mut d = v1::RunDetail {
            rounds: vec![round(1, 3, 10), round(2, 3, 10)],
            ..Default::default()
        };
        let before = d.clone();
        run_detail(&mut d, REPLY_BUDGET);
        assert_eq!(d, before);
    }

    #[test]
    fn a_huge_detail_fits_and_counts_what_it_left_out() {
        // 200 rounds of 10,000 sites with long reasons: hundreds of MB untrimmed.
        let mut d = v1::RunDetail {
            rounds: (1..=200).map(|n| round(n, 10_000, 2000)).collect(),
            ..Default::default()
        };
        run_detail(&mut d, REPLY_BUDGET);
        assert!(d.encoded_len() <= REPLY_BUDGET, "{}", d.encoded_len());
        let last = d.rounds.last().unwrap();
        assert_eq!(last.round, 200, "the latest round stays");
        assert_eq!(last.sites.len() + last.sites_omitted as usize, 10_000);
        assert!(!last.sites.is_empty(), "the latest round keeps sites");
        assert!(last.sites[0].reason.chars().count() <= REASON_CHARS + 1);
        let kept: usize = d
            .rounds
            .iter()
            .map(|r| r.sites.len() + r.sites_omitted as usize)
            .sum();
        assert_eq!(kept + d.rounds_omitted as usize * 10_000, 200 * 10_000);
    }

    #[test]
    fn rounds_go_oldest_first_only_when_their_sites_are_not_enough() {
        let mut d = v1::RunDetail {
            rounds: (1..=50_000).map(|n| round(n, 0, 0)).collect(),
            ..Default::default()
        };
        for r in &mut d.rounds {
            r.global_sha256 = "a".repeat(64);
        }
        run_detail(&mut d, 1 << 20);
        assert!(d.encoded_len() <= 1 << 20);
        assert_eq!(d.rounds[0].round, d.rounds_omitted + 1);
        assert_eq!(d.rounds.last().unwrap().round, 50_000);
    }

    #[test]
    fn pages_cover_every_site_once_within_the_budget() {
        let sites: Vec<_> = (0..10_000).map(|i| site(&format!("s{i:05}"), 40)).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = sites_page(sites.iter().cloned(), &token, 0, 64 << 10);
            assert!(page.encoded_len() <= 64 << 10);
            assert!(page.sites.len() <= SITES_PAGE);
            seen.extend(page.sites.iter().map(|s| s.name.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let want: Vec<_> = sites.iter().map(|s| s.name.clone()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn one_site_larger_than_the_budget_still_comes_alone() {
        let sites = [site("a", 10), site("b", 100_000), site("c", 10)];
        let page = sites_page(sites.iter().cloned(), "a", 0, 64 << 10);
        assert_eq!(page.sites.len(), 1);
        assert_eq!(page.sites[0].name, "b");
        assert_eq!(page.next_page_token, "b");
    }
}
