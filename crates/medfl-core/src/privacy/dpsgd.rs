//! The arithmetic of one DP-SGD step (Abadi et al. 2016, with Opacus's semantics) that needs no
//! tensors: which records a step samples, how much each record's gradient is scaled down, and
//! the Gaussian noise. The training crate applies them to candle tensors.
//!
//! Randomness comes from a [`RandomBits`] source: the sites use the operating system's
//! generator; tests use a seeded [`SplitMix64`], which must never be used for real noise.

use crate::selection::SplitMix64;

/// Opacus's guard against dividing by a zero norm in [`clip_factor`].
const NORM_GUARD: f64 = 1e-6;

/// A source of uniformly random 64-bit words.
pub trait RandomBits {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;

    /// A uniform float in `(0, 1]` (never 0, so that its logarithm is finite).
    fn next_open_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

impl RandomBits for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        SplitMix64::next_u64(self)
    }
}

/// A Poisson sample of `0..n`: each index independently with probability `rate`, in increasing
/// order. Drawn by geometric skips, so a step costs O(rate·n), not O(n).
pub fn poisson_sample<R: RandomBits + ?Sized>(bits: &mut R, n: usize, rate: f64) -> Vec<usize> {
    if rate >= 1.0 {
        return (0..n).collect();
    }
    if rate <= 0.0 || n == 0 {
        return Vec::new();
    }
    let log_miss = (-rate).ln_1p();
    let mut sample = Vec::with_capacity((rate * n as f64 * 1.2) as usize + 4);
    let mut next = 0_f64;
    loop {
        // Indices skipped before the next one taken: Geometric(rate) on {0, 1, ...}.
        next += (bits.next_open_unit().ln() / log_miss).floor();
        if next >= n as f64 {
            return sample;
        }
        sample.push(next as usize);
        next += 1.0;
    }
}

/// A standard normal draw (Box–Muller, from two uniforms in double precision).
pub fn standard_normal<R: RandomBits + ?Sized>(bits: &mut R) -> f64 {
    let (u, v) = (bits.next_open_unit(), bits.next_open_unit());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Adds N(0, std²) to every value.
pub fn add_noise<R: RandomBits + ?Sized>(bits: &mut R, values: &mut [f32], std: f64) {
    for v in values {
        *v = (f64::from(*v) + std * standard_normal(bits)) as f32;
    }
}

/// What a record's gradient of L2 norm `norm` is multiplied by so that its norm is at most
/// `max_norm`: min(1, C / (norm + 1e-6)), as Opacus computes it.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + NORM_GUARD)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_samples_have_the_right_size_and_spread() {
        let mut bits = SplitMix64::new(7);
        let (n, rate, draws) = (1000, 0.05, 2000);
        let mut sizes = Vec::new();
        let mut hits = vec![0u32; n];
        for _ in 0..draws {
            let s = poisson_sample(&mut bits, n, rate);
            assert!(s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&i| i < n));
            s.iter().for_each(|&i| hits[i] += 1);
            sizes.push(s.len() as f64);
        }
        let mean = sizes.iter().sum::<f64>() / draws as f64;
        let var = sizes.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / draws as f64;
        // Binomial(1000, 0.05): mean 50, variance 47.5.
        assert!((mean - 50.0).abs() < 1.0, "mean {mean}");
        assert!((var - 47.5).abs() < 7.0, "variance {var}");
        // Every index is taken about rate·draws = 100 times: first and last included.
        assert!(
            hits[0] > 60 && hits[n - 1] > 60,
            "{} {}",
            hits[0],
            hits[n - 1]
        );
        assert_eq!(
            poisson_sample(&mut bits, 10, 1.0),
            (0..10).collect::<Vec<_>>()
        );
        assert!(poisson_sample(&mut bits, 10, 0.0).is_empty());
    }

    #[test]
    fn normal_draws_have_unit_variance() {
        let mut bits = SplitMix64::new(3);
        let mut values = vec![0f32; 200_000];
        add_noise(&mut bits, &mut values, 2.0);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 4.0).abs() < 0.06, "{var}");
        let beyond = values.iter().filter(|v| v.abs() > 6.0).count() as f64 / n;
        assert!((beyond - 0.0027).abs() < 0.0006, "{beyond}"); // P(|Z| > 3)
    }

    #[test]
    fn clipping_scales_only_large_gradients() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) * 4.0 - 1.0).abs() < 1e-6);
        assert!(clip_factor(0.0, 1.0) == 1.0);
    }
}
