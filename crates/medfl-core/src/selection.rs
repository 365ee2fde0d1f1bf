//! Deterministic sampling of the sites that take part in a round.

/// SplitMix64: a tiny, well-mixed generator, enough for reproducible sampling.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform index in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

/// Picks `max(ceil(fraction * n), min_sites)` of the `candidates` (all of them if there are fewer),
/// the same ones for the same seed and candidates whatever their order. Returned sorted.
pub fn select_sites(
    candidates: &[String],
    fraction: f64,
    min_sites: usize,
    seed: u64,
) -> Vec<String> {
    select_sites_sparing(candidates, &[], fraction, min_sites, seed)
}

/// As [`select_sites`], except that candidates in `declining` (sites whose hospital kept the run
/// out last time: awaiting approval, rejected, paused) take no sampled slot: the sample is drawn
/// from the others, and every declining candidate is added on top. So the run still trains on as
/// many sites as the fraction asks for, and a site the hospital approves meanwhile joins at
/// once.
pub fn select_sites_sparing(
    candidates: &[String],
    declining: &[String],
    fraction: f64,
    min_sites: usize,
    seed: u64,
) -> Vec<String> {
    let mut pool: Vec<String> = candidates.to_vec();
    pool.sort();
    pool.dedup();
    let n = pool.len();
    let (mut chosen, mut pool): (Vec<String>, Vec<String>) =
        pool.into_iter().partition(|c| declining.contains(c));
    let want = ((fraction.clamp(0.0, 1.0) * n as f64).ceil() as usize)
        .max(min_sites)
        .min(pool.len());
    let mut rng = SplitMix64::new(seed);
    // Partial Fisher-Yates: the first `want` entries are a uniform sample.
    for i in 0..want {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(want);
    chosen.extend(pool);
    chosen.sort();
    chosen
}

/// Poisson sampling of the `candidates`: each independently with probability `rate`, so the
/// sample's size varies (it may be empty). Returned sorted.
pub fn poisson_sites(candidates: &[String], rate: f64, seed: u64) -> Vec<String> {
    let mut pool: Vec<String> = candidates.to_vec();
    pool.sort();
    pool.dedup();
    let mut rng = SplitMix64::new(seed);
    pool.retain(|_| rng.next_f64() < rate);
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site-{i}")).collect()
    }

    #[test]
    fn whole_fraction_takes_everyone() {
        assert_eq!(select_sites(&names(5), 1.0, 1, 7), names(5));
    }

    #[test]
    fn fraction_rounds_up_and_honours_min_sites() {
        assert_eq!(select_sites(&names(10), 0.25, 1, 1).len(), 3);
        assert_eq!(select_sites(&names(10), 0.1, 4, 1).len(), 4);
        assert_eq!(select_sites(&names(2), 0.5, 4, 1).len(), 2);
        assert!(select_sites(&[], 1.0, 2, 1).is_empty());
    }

    #[test]
    fn deterministic_and_order_independent() {
        let mut shuffled = names(20);
        shuffled.reverse();
        let a = select_sites(&names(20), 0.3, 1, 99);
        assert_eq!(a, select_sites(&shuffled, 0.3, 1, 99));
        assert_ne!(a, select_sites(&names(20), 0.3, 1, 100));
    }

    #[test]
    fn declining_sites_take_no_slot_but_are_always_asked() {
        let all = names(10);
        let declining = vec!["site-3".to_string(), "site-7".to_string()];
        for seed in 0..50 {
            let picked = select_sites_sparing(&all, &declining, 0.3, 1, seed);
            // 3 of the 8 willing sites, plus both declining ones.
            assert_eq!(picked.len(), 5, "{picked:?}");
            assert!(declining.iter().all(|d| picked.contains(d)));
        }
        // A declining site that is not a candidate (offline) is not added.
        let picked = select_sites_sparing(&names(3), &["site-9".to_string()], 1.0, 1, 1);
        assert_eq!(picked, names(3));
        // Nobody declining: the same sample as before.
        assert_eq!(
            select_sites_sparing(&all, &[], 0.3, 1, 5),
            select_sites(&all, 0.3, 1, 5)
        );
        // Fewer willing sites than the fraction asks: all of them.
        let picked = select_sites_sparing(&names(3), &names(2), 1.0, 3, 1);
        assert_eq!(picked, names(3));
    }

    #[test]
    fn poisson_sampling_takes_each_site_independently() {
        let (n, rate, draws) = (20, 0.3, 4000u64);
        let mut hits = vec![0u32; n];
        let mut empty = 0;
        for seed in 0..draws {
            let picked = poisson_sites(&names(n), rate, seed);
            empty += u32::from(picked.is_empty());
            for p in &picked {
                let i: usize = p.trim_start_matches("site-").parse().unwrap();
                hits[i] += 1;
            }
        }
        // Each site about rate·draws = 1,200 times (sd ≈ 29).
        assert!(hits.iter().all(|&h| (1080..1320).contains(&h)), "{hits:?}");
        // An empty sample happens: 0.7^20 ≈ 0.08% of draws.
        assert!(empty < 20, "{empty}");
        assert_eq!(poisson_sites(&names(5), 1.0, 3), names(5));
        assert_eq!(
            poisson_sites(&names(5), 0.5, 3),
            poisson_sites(&names(5), 0.5, 3)
        );
    }

    #[test]
    fn every_site_gets_picked_over_many_rounds() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            seen.extend(select_sites(&names(10), 0.2, 1, seed));
        }
        assert_eq!(seen.len(), 10);
    }
}
