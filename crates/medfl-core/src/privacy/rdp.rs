//! Rényi differential privacy of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar and
//! Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019), computed as
//! Opacus's `RDPAccountant` does: the same orders, the same series for fractional orders, and the
//! same conversion to (ε, δ) (Balle et al. 2020), so that a hospital's numbers agree with the
//! ones its ethics board may compute with Opacus.

use super::{Mechanism, Spent};
use crate::CoreError;

/// Opacus's orders: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
pub fn orders() -> Vec<f64> {
    // `1 + x / 10` in that order of operations, so each order is the very float Opacus uses.
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// ε at the mechanism's δ, minimised over [`orders`], with the order that gave it.
pub fn epsilon(mechanism: &Mechanism) -> Result<Spent, CoreError> {
    mechanism.validate()?;
    if mechanism.steps == 0 {
        // Nothing was released (the conversion alone would still give some 0.1).
        return Ok(Spent {
            epsilon: 0.0,
            best_order: None,
        });
    }
    let orders = orders();
    let steps = mechanism.steps as f64;
    let mut best: Option<Spent> = None;
    for &order in &orders {
        let rdp = step_rdp(mechanism.sample_rate, mechanism.noise_multiplier, order) * steps;
        let eps = rdp - (mechanism.delta.ln() + order.ln()) / (order - 1.0)
            + ((order - 1.0) / order).ln();
        // The first smallest, NaN skipped (as `numpy.nanargmin`).
        if !eps.is_nan() && best.is_none_or(|b| eps < b.epsilon) {
            best = Some(Spent {
                epsilon: eps,
                best_order: Some(order),
            });
        }
    }
    Ok(best.unwrap_or(Spent {
        epsilon: f64::INFINITY,
        best_order: None,
    }))
}

/// The RDP of one step at `order`: sample rate `q`, noise multiplier `sigma`.
pub fn step_rdp(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || order.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_int(q, sigma, order as u64)
    } else {
        log_a_frac(q, sigma, order)
    };
    log_a / (order - 1.0)
}

/// log A_α for an integer order: a finite binomial sum.
fn log_a_int(q: f64, sigma: f64, order: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=order {
        let (fi, fo) = (i as f64, order as f64);
        let log_coef = binomial(fo, i).ln() + fi * q.ln() + (fo - fi) * (1.0 - q).ln();
        let s = log_coef + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// log A_α for a fractional order: two alternating series, summed until their terms fall below
/// e^-30.
fn log_a_frac(q: f64, sigma: f64, order: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let root2_sigma = std::f64::consts::SQRT_2 * sigma;
    let mut i = 0u64;
    loop {
        let fi = i as f64;
        let coef = binomial(order, i);
        let log_coef = coef.abs().ln();
        let j = order - fi;
        let log_t0 = log_coef + fi * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + fi * (1.0 - q).ln();
        let log_e0 = 0.5_f64.ln() + log_erfc((fi - z0) / root2_sigma);
        let log_e1 = 0.5_f64.ln() + log_erfc((z0 - j) / root2_sigma);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        i += 1;
        if log_s0.max(log_s1) < -30.0 || i > 100_000 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// The generalised binomial coefficient (n choose k) for real `n`, as a running product.
fn binomial(n: f64, k: u64) -> f64 {
    // For an integer n, (n choose k) = (n choose n - k): the shorter product.
    let k = if n.fract() == 0.0 && n >= 0.0 && (k as f64) > n / 2.0 && (k as f64) <= n {
        (n - k as f64) as u64
    } else {
        k
    };
    // Factors (n - m + 1) / m, falling: for m past n each is at most 1 in size, so the product
    // never overflows on its way to a small coefficient.
    let mut c = 1.0;
    for m in 1..=k {
        let m = m as f64;
        c *= (n - m + 1.0) / m;
    }
    c
}

/// log(e^x + e^y) without overflow.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log(e^x - e^y) for x >= y; NaN (the order is then skipped) when x < y.
fn log_sub(x: f64, y: f64) -> f64 {
    if x < y {
        return f64::NAN;
    }
    if y == f64::NEG_INFINITY {
        return x;
    }
    if x == y {
        return f64::NEG_INFINITY;
    }
    if x - y > 700.0 {
        return x;
    }
    (x - y).exp_m1().ln() + y
}

/// log(erfc(x)), accurate where erfc(x) itself underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 26.0 {
        return libm::erfc(x).ln();
    }
    log_erfc_series(x)
}

/// log(erfc(x)) from its asymptotic series, for large x:
/// erfc(x) = e^{-x²} / (x √π) · (1 - 1/(2x²) + 3/(2x²)² - 15/(2x²)³ + ...).
fn log_erfc_series(x: f64) -> f64 {
    let w = 1.0 / (2.0 * x * x);
    let (mut term, mut sum) = (1.0, 1.0);
    for n in 1..10 {
        term *= -(2.0 * f64::from(n) - 1.0) * w;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::super::tests::mechanism;
    use super::*;

    /// Opacus 1.6's `RDPAccountant` on 12 settings (q = 0.01; z = 0.5, 1, 2; 1 to 1,000 steps;
    /// δ = 1e-5), as committed beside this crate's tests.
    const OPACUS: &str = include_str!("../../tests/vectors/rdp_subsampled_gaussian.csv");

    #[test]
    fn matches_opacus_to_1e_9_with_the_same_best_order() {
        let mut rows = 0;
        for line in OPACUS.lines().skip(1) {
            let f: Vec<f64> = line.split(',').map(|v| v.parse().unwrap()).collect();
            let m = Mechanism {
                sample_rate: f[0],
                noise_multiplier: f[1],
                steps: f[2] as u64,
                delta: f[3],
            };
            let spent = epsilon(&m).unwrap();
            let rel = (spent.epsilon - f[4]).abs() / f[4];
            assert!(rel < 1e-9, "{line}: ε {} ({rel:e} off)", spent.epsilon);
            assert!(
                (spent.best_order.unwrap() - f[5]).abs() < 1e-9,
                "{line}: {spent:?}"
            );
            rows += 1;
        }
        assert_eq!(rows, 12);
        // The committed copy is the shared reference, where that is at hand.
        let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/vectors/rdp_subsampled_gaussian.csv");
        if let Ok(reference) = std::fs::read_to_string(shared) {
            assert_eq!(reference, OPACUS);
        }
    }

    #[test]
    fn without_subsampling_each_order_is_the_gaussian_closed_form() {
        // q = 1: RDP is α/(2z²) per step, so ε is the conversion minimised over the orders.
        let (z, steps) = (1.3, 40u64);
        let want = orders()
            .into_iter()
            .map(|a| {
                steps as f64 * a / (2.0 * z * z) - (1e-5_f64.ln() + a.ln()) / (a - 1.0)
                    + ((a - 1.0) / a).ln()
            })
            .fold(f64::INFINITY, f64::min);
        let got = epsilon(&mechanism(1.0, z, steps)).unwrap().epsilon;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn more_steps_or_sampling_cost_more_and_more_noise_costs_less() {
        let eps = |q, z, t| epsilon(&mechanism(q, z, t)).unwrap().epsilon;
        for q in [1e-4, 0.01, 0.3, 1.0] {
            for z in [0.5, 1.7, 5.0] {
                assert!(eps(q, z, 10) < eps(q, z, 100), "q {q} z {z}");
                assert!(eps(q, z * 1.5, 100) < eps(q, z, 100), "q {q} z {z}");
                assert!(eps(q, z, 100).is_finite() && eps(q, z, 100) > 0.0);
            }
            // Sub-sampling amplifies privacy.
            if q < 1.0 {
                assert!(eps(q, 1.0, 50) < eps(1.0, 1.0, 50));
            }
        }
        assert_eq!(eps(0.1, 1.0, 0), 0.0);
    }

    #[test]
    fn log_erfc_is_continuous_where_the_series_takes_over() {
        let below = libm::erfc(25.999_999).ln();
        let above = log_erfc(26.000_001);
        assert!((below - above).abs() < 1e-3, "{below} {above}");
        // Both ways agree where both are accurate.
        assert!((libm::erfc(26.0).ln() - log_erfc_series(26.0)).abs() < 1e-9);
        assert!(log_erfc(1e4).is_finite());
    }

    #[test]
    fn out_of_range_parameters_are_refused_naming_them() {
        let field = |m: Mechanism| match epsilon(&m).unwrap_err() {
            CoreError::Privacy { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(field(mechanism(0.0, 1.0, 1)), "sample_rate");
        assert_eq!(field(mechanism(1.5, 1.0, 1)), "sample_rate");
        assert_eq!(field(mechanism(0.1, 0.0, 1)), "noise_multiplier");
        assert_eq!(field(mechanism(0.1, f64::NAN, 1)), "noise_multiplier");
        let mut m = mechanism(0.1, 1.0, 1);
        m.delta = 1.0;
        assert_eq!(field(m), "delta");
    }

    #[test]
    fn the_noise_for_a_target_is_the_smallest_that_meets_it() {
        let m = mechanism(0.01, 1.0, 1000);
        for target in [0.5, 1.0, 3.0, 8.0] {
            let (z, spent) =
                super::super::noise_for(super::super::Accountant::Rdp, &m, target).unwrap();
            let at = |z| {
                epsilon(&Mechanism {
                    noise_multiplier: z,
                    ..m
                })
                .unwrap()
                .epsilon
            };
            assert!(at(z) <= target, "z {z} spends {}", at(z));
            assert_eq!(spent.epsilon, at(z));
            assert!(at(z * (1.0 - 1e-5)) > target, "z {z} is not the smallest");
        }
        assert!(matches!(
            super::super::noise_for(super::super::Accountant::Rdp, &m, 0.0),
            Err(CoreError::Privacy { field, .. }) if field == "target_epsilon"
        ));
    }
}
