//! Privacy loss distributions (PLD) of the Poisson-subsampled Gaussian mechanism: a tighter
//! accountant than [`super::rdp`] (3.03 against 4.40 for one step at q = 0.01, z = 0.5).
//!
//! It follows Google's dp-accounting `PLDAccountant` with its defaults, so that a hospital's ε
//! agrees with the one its ethics board may compute with that library:
//! - add-or-remove-one adjacency: the remove and the add direction each get a distribution,
//!   and ε is the larger of the two;
//! - each step's distribution is discretised on losses that are multiples of 1e-4 with the
//!   pessimistic "connect the dots" method (Doroshenko et al. 2022), from the mechanism's exact
//!   hockey-stick divergences;
//! - the steps are composed by one FFT raised to the number of steps, on a window that Chernoff
//!   bounds show holds all but 1e-15 of the mass (what falls outside counts as infinite loss).

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use super::{Mechanism, Spent};
use crate::CoreError;

/// Width of the loss grid (dp-accounting's default `value_discretization_interval`).
pub const DISCRETISATION: f64 = 1e-4;

/// Mass of the composed distribution allowed outside the FFT window (dp-accounting's default).
const TAIL_MASS: f64 = 1e-15;

/// Natural log of each one-step tail of the Gaussian cut off when discretising (as
/// dp-accounting's `log_mass_truncation_bound`): the tails beyond hold 0.5·e⁻⁵⁰ each.
const LOG_TAIL: f64 = -50.0;

/// The most grid points one distribution may take (a window of 2²⁵ complex numbers is 512 MiB).
const MAX_POINTS: usize = 1 << 25;

/// ε at the mechanism's δ (the larger of the remove and add directions). `best_order` is
/// `None`: a PLD has no Rényi order.
pub fn epsilon(mechanism: &Mechanism) -> Result<Spent, CoreError> {
    mechanism.validate()?;
    if mechanism.steps == 0 {
        return Ok(Spent {
            epsilon: 0.0,
            best_order: None,
        });
    }
    let directions: &[Direction] = if mechanism.sample_rate == 1.0 {
        // Without sampling both directions are the same Gaussian.
        &[Direction::Remove]
    } else {
        &[Direction::Remove, Direction::Add]
    };
    let mut epsilon = 0.0_f64;
    for &direction in directions {
        let loss = Loss {
            direction,
            q: mechanism.sample_rate,
            sigma: mechanism.noise_multiplier,
        };
        let composed = loss.discretise()?.self_compose(mechanism.steps)?;
        epsilon = epsilon.max(composed.epsilon_for(mechanism.delta));
    }
    Ok(Spent {
        epsilon,
        best_order: None,
    })
}

/// Which neighbouring dataset is the larger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The output on the dataset with the record (a mixture of N(0, σ²) and N(1, σ²)) against
    /// the one without (N(0, σ²)).
    Remove,
    /// The other way round.
    Add,
}

/// The privacy loss of one step in one direction: sensitivity 1, noise σ, sample rate q.
#[derive(Debug, Clone, Copy)]
struct Loss {
    direction: Direction,
    q: f64,
    sigma: f64,
}

impl Loss {
    /// The loss at output `x`: ln(1 − q + q·exp((2x − 1)/(2σ²))), negated for the add direction.
    fn at(&self, x: f64) -> f64 {
        let u = (2.0 * x - 1.0) / (2.0 * self.sigma * self.sigma);
        let remove = if self.q == 1.0 {
            u
        } else {
            log_add((1.0 - self.q).ln(), self.q.ln() + u)
        };
        match self.direction {
            Direction::Remove => remove,
            Direction::Add => -remove,
        }
    }

    /// The ε-hockey-stick divergence sup_S P(S) − e^ε·Q(S): the δ of one step at ε.
    fn delta(&self, eps: f64) -> f64 {
        let (q, sigma) = (self.q, self.sigma);
        let log_keep = (1.0 - q).ln(); // −∞ when q = 1
        let delta = match self.direction {
            Direction::Remove => {
                // The loss is increasing in x and above ln(1 − q) everywhere.
                if eps <= log_keep {
                    return -eps.exp_m1();
                }
                // Loss > ε exactly where x > x*.
                let x = sigma * sigma * (log_sub(eps, log_keep) - q.ln()) + 0.5;
                q * upper_tail((x - 1.0) / sigma) + (1.0 - q) * upper_tail(x / sigma)
                    - eps.exp() * upper_tail(x / sigma)
            }
            Direction::Add => {
                // The loss is decreasing in x and below −ln(1 − q) everywhere.
                if eps >= -log_keep {
                    return 0.0;
                }
                let x = sigma * sigma * (log_sub(-eps, log_keep) - q.ln()) + 0.5;
                lower_tail(x / sigma)
                    - eps.exp()
                        * ((1.0 - q) * lower_tail(x / sigma) + q * lower_tail((x - 1.0) / sigma))
            }
        };
        delta.clamp(0.0, 1.0)
    }

    /// The pessimistic connect-the-dots distribution of one step on the loss grid.
    fn discretise(&self) -> Result<Pmf, CoreError> {
        // Where the one-step Gaussian tails are cut: beyond them lies 0.5·e⁻⁵⁰ on each side.
        let t = upper_tail_inverse(0.5 * LOG_TAIL.exp());
        let (far_low, far_high) = (-self.sigma * t, 1.0 + self.sigma * t);
        let (high, low) = match self.direction {
            Direction::Remove => (self.at(far_high), self.at(far_low)),
            Direction::Add => (self.at(far_low), self.at(far_high)),
        };
        let high = (high / DISCRETISATION).ceil() as i64;
        let low = (low / DISCRETISATION).floor() as i64;
        let points = usize::try_from(high - low + 1).unwrap_or(usize::MAX);
        if points > MAX_POINTS {
            return Err(too_fine(points));
        }
        // δ at every grid point, made non-increasing (rounding may leave it a hair off).
        let mut deltas: Vec<f64> = (low..=high)
            .map(|i| self.delta(i as f64 * DISCRETISATION))
            .collect();
        for i in 1..deltas.len() {
            deltas[i] = deltas[i].min(deltas[i - 1]);
        }
        if deltas.len() == 1 {
            return Ok(Pmf {
                lowest: low,
                probs: vec![1.0 - deltas[0]],
                infinity: deltas[0],
            });
        }
        // The masses whose hockey-stick curve passes through every (ε_i, δ_i) and is linear in
        // e^ε between them: above the true, convex curve, so never optimistic.
        let diffs: Vec<f64> = deltas.windows(2).map(|w| w[1] - w[0]).collect();
        let (grow, shrink) = (DISCRETISATION.exp_m1(), (-DISCRETISATION).exp_m1());
        let n = deltas.len();
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - deltas[0] + diffs[0] / grow;
        for i in 1..n - 1 {
            probs[i] = (diffs[i] - diffs[i - 1] * DISCRETISATION.exp()) / grow;
        }
        probs[n - 1] = diffs[n - 2] / shrink;
        for p in &mut probs {
            *p = p.max(0.0);
        }
        Ok(Pmf {
            lowest: low,
            probs,
            infinity: deltas[n - 1],
        })
    }
}

/// A privacy loss distribution on the grid: `probs[k]` is the mass at loss
/// (`lowest` + k)·[`DISCRETISATION`]; `infinity` the mass of infinite loss.
#[derive(Debug, Clone)]
struct Pmf {
    lowest: i64,
    probs: Vec<f64>,
    infinity: f64,
}

impl Pmf {
    /// The distribution of the sum of `times` independent copies.
    fn self_compose(&self, times: u64) -> Result<Pmf, CoreError> {
        if times == 1 {
            return Ok(self.clone());
        }
        let len = self.probs.len();
        let (low, high) = self.chernoff_window(times);
        let width = usize::try_from(high - low + 1).unwrap_or(usize::MAX);
        let size = fast_len(width.max(len));
        if size > MAX_POINTS {
            return Err(too_fine(size));
        }
        let mut planner = FftPlanner::<f64>::new();
        let (forward, inverse): (Arc<_>, Arc<_>) = (
            planner.plan_fft_forward(size),
            planner.plan_fft_inverse(size),
        );
        let mut buffer: Vec<Complex<f64>> = self
            .probs
            .iter()
            .map(|&p| Complex::new(p, 0.0))
            .chain(std::iter::repeat(Complex::new(0.0, 0.0)))
            .take(size)
            .collect();
        forward.process(&mut buffer);
        for c in &mut buffer {
            *c = power(*c, times);
        }
        inverse.process(&mut buffer);
        // The DFT wraps sums around modulo its size: read the window [low, high] out of it.
        let scale = 1.0 / size as f64;
        let start = usize::try_from(low).unwrap_or(0) % size;
        let probs = (0..width)
            .map(|k| buffer[(start + k) % size].re * scale)
            .collect();
        let times_f = times as f64;
        Ok(Pmf {
            lowest: self.lowest * times as i64 + low,
            probs,
            infinity: TAIL_MASS - (times_f * (-self.infinity).ln_1p()).exp_m1(),
        })
    }

    /// Offsets (from `times`·`lowest`) between which the sum of `times` copies lies but for
    /// [`TAIL_MASS`], by Chernoff bounds at orders ±1/len ... ±20/len.
    fn chernoff_window(&self, times: u64) -> (i64, i64) {
        let len = self.probs.len();
        let times_f = times as f64;
        let mut low = 0_i64;
        let mut high = (len as i64 - 1).saturating_mul(times as i64);
        let slack = (2.0 / TAIL_MASS).ln();
        for k in (-20..=20).filter(|&k| k != 0) {
            let order = f64::from(k) / len as f64;
            let log_mgf = self
                .probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.0)
                .map(|(i, &p)| i as f64 * order + p.ln())
                .fold(f64::NEG_INFINITY, log_add);
            let bound = (times_f * log_mgf + slack) / order;
            if !bound.is_finite() {
                continue;
            }
            if k > 0 {
                high = high.min(bound.ceil() as i64);
            } else {
                low = low.max(bound.floor() as i64);
            }
        }
        (low, high.max(low))
    }

    /// The smallest ε ≥ 0 whose hockey-stick divergence is at most `delta`, scanning losses
    /// from the top (infinite if the infinite-loss mass alone exceeds it).
    fn epsilon_for(&self, delta: f64) -> f64 {
        if self.infinity > delta {
            return f64::INFINITY;
        }
        let (mut upper, mut lower) = (self.infinity, 0.0_f64);
        for (k, &p) in self.probs.iter().enumerate().rev() {
            let loss = (self.lowest + k as i64) as f64 * DISCRETISATION;
            if upper > delta && lower > 0.0 && ((upper - delta) / lower).ln() >= loss {
                break;
            }
            upper += p;
            lower += (-loss).exp() * p;
            if upper >= delta && lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if upper <= lower + delta {
            return 0.0;
        }
        ((upper - delta) / lower).ln()
    }
}

fn too_fine(points: usize) -> CoreError {
    CoreError::privacy(
        "noise_multiplier",
        format!(
            "the PLD accountant would need {points} grid points (more than {MAX_POINTS}); \
             use the RDP accountant for so little noise or so many steps"
        ),
    )
}

/// `c` to the power `n`, by squaring.
fn power(mut c: Complex<f64>, mut n: u64) -> Complex<f64> {
    let mut out = Complex::new(1.0, 0.0);
    while n > 0 {
        if n & 1 == 1 {
            out *= c;
        }
        c *= c;
        n >>= 1;
    }
    out
}

/// The smallest length ≥ `n` with no prime factor above 5 (fast for the FFT).
fn fast_len(n: usize) -> usize {
    let mut best = n.next_power_of_two();
    let mut p5 = 1;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            // The smallest power of two taking p35 to at least n.
            let mut m = p35;
            while m < n {
                m *= 2;
            }
            best = best.min(m);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// P(N(0, 1) > x), accurate in the far tail.
fn upper_tail(x: f64) -> f64 {
    0.5 * libm::erfc(x / std::f64::consts::SQRT_2)
}

/// P(N(0, 1) < x).
fn lower_tail(x: f64) -> f64 {
    upper_tail(-x)
}

/// The x with P(N(0, 1) > x) = `mass`, for mass in (0, 0.5], by bisection.
fn upper_tail_inverse(mass: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, 40.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if upper_tail(mid) > mass {
            low = mid;
        } else {
            high = mid;
        }
    }
    0.5 * (low + high)
}

/// ln(e^x + e^y).
fn log_add(x: f64, y: f64) -> f64 {
    let (low, high) = if x < y { (x, y) } else { (y, x) };
    if low == f64::NEG_INFINITY {
        return high;
    }
    high + (low - high).exp().ln_1p()
}

/// ln(e^x − e^y) for x > y.
fn log_sub(x: f64, y: f64) -> f64 {
    if y == f64::NEG_INFINITY {
        return x;
    }
    x + (-(y - x).exp_m1()).ln()
}

#[cfg(test)]
mod tests {
    use super::super::tests::mechanism;
    use super::*;

    /// Every row of the reference written by `benches/dp_accounting_pld.py` (dp-accounting 0.6
    /// `PLDAccountant`): within 1e-8 (the issue asks for 1%; the same method agrees to ~3e-10).
    #[test]
    fn agrees_with_dp_accounting() {
        let rows = include_str!("../../tests/vectors/pld_subsampled_gaussian.csv");
        let mut checked = 0;
        for line in rows.lines().skip(1) {
            let f: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
            let m = Mechanism {
                sample_rate: f[0],
                noise_multiplier: f[1],
                steps: f[2] as u64,
                delta: f[3],
            };
            let got = epsilon(&m).unwrap().epsilon;
            let relative = (got - f[4]).abs() / f[4];
            assert!(relative < 1e-8, "{line}: got {got}, off by {relative:e}");
            checked += 1;
        }
        assert_eq!(checked, 36);
    }

    #[test]
    fn tighter_than_rdp_and_monotone() {
        let m = mechanism(0.01, 0.5, 1);
        let pld = epsilon(&m).unwrap().epsilon;
        let rdp = super::super::rdp::epsilon(&m).unwrap().epsilon;
        assert!(pld < rdp, "pld {pld} rdp {rdp}");
        let more_steps = epsilon(&mechanism(0.01, 0.5, 10)).unwrap().epsilon;
        let more_noise = epsilon(&mechanism(0.01, 1.0, 1)).unwrap().epsilon;
        assert!(more_steps > pld && more_noise < pld);
    }

    #[test]
    fn one_step_distribution_is_a_distribution() {
        for direction in [Direction::Remove, Direction::Add] {
            let pmf = Loss {
                direction,
                q: 0.1,
                sigma: 1.0,
            }
            .discretise()
            .unwrap();
            let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity;
            // The masses telescope to 1; clamping rounding noise below zero adds a little.
            assert!((total - 1.0).abs() < 1e-6, "{direction:?}: {total}");
            assert!(pmf.probs.iter().all(|&p| p >= 0.0));
        }
    }

    #[test]
    fn no_steps_spend_nothing_and_bad_parameters_are_named() {
        assert_eq!(epsilon(&mechanism(0.1, 1.0, 0)).unwrap().epsilon, 0.0);
        let err = epsilon(&mechanism(0.0, 1.0, 1)).unwrap_err().to_string();
        assert!(err.contains("sample_rate"), "{err}");
        let err = epsilon(&mechanism(1.0, 0.001, 10)).unwrap_err().to_string();
        assert!(
            err.contains("noise_multiplier") && err.contains("RDP"),
            "{err}"
        );
    }

    #[test]
    fn fast_lengths() {
        assert_eq!(fast_len(1), 1);
        assert_eq!(fast_len(7), 8);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(121), 125);
        assert_eq!(fast_len(1025), 1080);
    }
}
