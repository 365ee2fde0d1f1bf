//! Differential-privacy accounting: how much privacy (ε at a given δ) a mechanism spends, and
//! how much noise a target ε needs.
//!
//! Both privacy levels medfl offers reduce to the same mechanism: the Poisson-subsampled
//! Gaussian (rows sampled with rate q into each DP-SGD step at a site, or sites sampled with rate
//! q into each round of DP-FedAvg; noise z times the clipping norm), composed over the steps or
//! rounds. [`rdp`] accounts for it with Rényi differential privacy as Opacus does, [`pld`] with
//! privacy loss distributions as Google's dp-accounting does (tighter, and slower).

pub mod dpsgd;
pub mod pld;
pub mod rdp;

use crate::CoreError;

/// A Poisson-subsampled Gaussian mechanism composed `steps` times, and the δ at which its ε is
/// asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mechanism {
    /// Probability that one record (or site) takes part in one step, in (0, 1].
    pub sample_rate: f64,
    /// Noise standard deviation over the clipping norm, > 0.
    pub noise_multiplier: f64,
    /// Steps (or rounds) composed.
    pub steps: u64,
    /// The δ of the (ε, δ) guarantee, in (0, 1).
    pub delta: f64,
}

impl Mechanism {
    /// Checks every parameter, naming the one out of range.
    pub fn validate(&self) -> Result<(), CoreError> {
        let q = self.sample_rate;
        if !(q > 0.0 && q <= 1.0) {
            return Err(CoreError::privacy(
                "sample_rate",
                format!("must be in (0, 1], got {q}"),
            ));
        }
        let z = self.noise_multiplier;
        if !(z > 0.0 && z.is_finite()) {
            return Err(CoreError::privacy(
                "noise_multiplier",
                format!("must be a finite number > 0, got {z}"),
            ));
        }
        let d = self.delta;
        if !(d > 0.0 && d < 1.0) {
            return Err(CoreError::privacy(
                "delta",
                format!("must be in (0, 1), got {d}"),
            ));
        }
        Ok(())
    }
}

/// The privacy a mechanism spends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    /// ε at the mechanism's δ.
    pub epsilon: f64,
    /// The Rényi order that gave the tightest ε (RDP only, and only for at least one step).
    pub best_order: Option<f64>,
}

/// How ε is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accountant {
    /// Rényi DP with Opacus's orders and conversion ([`rdp`]).
    Rdp,
    /// Privacy loss distributions as dp-accounting's PLD accountant ([`pld`]).
    Pld,
}

impl Accountant {
    /// What `mechanism` spends by this accountant.
    pub fn epsilon(self, mechanism: &Mechanism) -> Result<Spent, CoreError> {
        match self {
            Self::Rdp => rdp::epsilon(mechanism),
            Self::Pld => pld::epsilon(mechanism),
        }
    }

    /// The accountant's name as the CLI, specs and model metadata spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rdp => "rdp",
            Self::Pld => "pld",
        }
    }
}

/// The smallest noise multiplier (to 1e-6 relative, rounded up) with which `mechanism` (its own
/// `noise_multiplier` ignored) spends at most `target_epsilon` by `accountant`, with what it
/// spends.
pub fn noise_for(
    accountant: Accountant,
    mechanism: &Mechanism,
    target_epsilon: f64,
) -> Result<(f64, Spent), CoreError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(CoreError::privacy(
            "target_epsilon",
            format!("must be a finite number > 0, got {target_epsilon}"),
        ));
    }
    let spends = |z: f64| {
        accountant.epsilon(&Mechanism {
            noise_multiplier: z,
            ..*mechanism
        })
    };
    // ε falls as the noise grows: double until the target is met, then bisect, keeping what
    // the upper end (always within the target) spends.
    let (mut low, mut high) = (0.0_f64, 1.0_f64);
    let mut at_high = spends(high)?;
    while at_high.epsilon > target_epsilon {
        low = high;
        high *= 2.0;
        at_high = spends(high)?;
        if high > 1e6 {
            return Err(CoreError::privacy(
                "target_epsilon",
                format!("{target_epsilon} cannot be met with any noise multiplier up to 1e6"),
            ));
        }
    }
    while high - low > 1e-6 * high {
        let mid = 0.5 * (low + high);
        let at_mid = spends(mid)?;
        if at_mid.epsilon > target_epsilon {
            low = mid;
        } else {
            (high, at_high) = (mid, at_mid);
        }
    }
    Ok((high, at_high))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Mechanism;

    /// The mechanism at q, z and steps, at δ = 1e-5 (the reference files' δ).
    pub(crate) fn mechanism(q: f64, z: f64, steps: u64) -> Mechanism {
        Mechanism {
            sample_rate: q,
            noise_multiplier: z,
            steps,
            delta: 1e-5,
        }
    }
}
