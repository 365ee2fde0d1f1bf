//! Client-level DP-FedAvg at the coordinator (McMahan et al. 2018), for one round: every update
//! counts once whatever its example count, its distance to the global model is clipped to C, the
//! sum of those distances gets Gaussian noise (unless the sites added it themselves) and is
//! divided by a fixed denominator, the expected number of sampled sites, not by the number that
//! answered (which would depend on who took part). With adaptive clipping (Andrew et al. 2021)
//! the round also yields the next round's C from the noised fraction of sites that were within
//! it.

use crate::privacy::dpsgd::{standard_normal, RandomBits};
use crate::spec::{ClientPrivacySpec, NoisePlacement};
use crate::CoreError;

/// One round of client-level DP, as the aggregator applies it.
pub struct ClientDp {
    /// C: this round's clipping norm of `update - global`.
    pub clip_norm: f64,
    /// The fixed denominator: the expected number of sampled sites, q·K.
    pub expected_sites: f64,
    /// Standard deviation of the noise the coordinator adds to the sum (z_Δ·C); none when the
    /// sites added their shares.
    pub central_noise_std: Option<f64>,
    /// Whether the coordinator clips (central noise); with distributed noise each update
    /// already carries its noise, so the sites' own clipping bounds them.
    pub clips: bool,
    /// Adaptive clipping: γ, η and the count's noise the coordinator adds (none when the sites
    /// added their shares).
    pub adaptive: Option<AdaptiveRound>,
    /// Where the noise comes from: the operating system's generator in the coordinator.
    pub bits: Box<dyn RandomBits + Send + Sync>,
    /// Sum of the sites' reported "within the clip" indicators.
    unclipped: f64,
}

/// Adaptive clipping's part of a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveRound {
    /// γ: the quantile of update norms the clip follows.
    pub target_quantile: f64,
    /// η: the geometric step.
    pub learning_rate: f64,
    /// σ_b, the standard deviation of the noise the coordinator adds to the count; none when
    /// every site added its share.
    pub central_count_std: Option<f64>,
}

impl std::fmt::Debug for ClientDp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientDp")
            .field("clip_norm", &self.clip_norm)
            .field("expected_sites", &self.expected_sites)
            .field("central_noise_std", &self.central_noise_std)
            .field("adaptive", &self.adaptive)
            .finish_non_exhaustive()
    }
}

impl ClientDp {
    /// A round of `spec` with clipping norm `clip_norm` over `expected_sites` sampled sites.
    pub fn new(
        spec: &ClientPrivacySpec,
        clip_norm: f64,
        expected_sites: f64,
        bits: Box<dyn RandomBits + Send + Sync>,
    ) -> Result<Self, CoreError> {
        if !(clip_norm.is_finite() && clip_norm > 0.0) {
            return Err(CoreError::Aggregation(format!(
                "client-level DP: the clipping norm must be positive, got {clip_norm}"
            )));
        }
        if !(expected_sites.is_finite() && expected_sites > 0.0) {
            return Err(CoreError::Aggregation(format!(
                "client-level DP: the expected number of sampled sites must be positive, got \
                 {expected_sites}"
            )));
        }
        let central = spec.noise == NoisePlacement::Central;
        Ok(Self {
            clip_norm,
            expected_sites,
            central_noise_std: central.then(|| spec.update_noise_multiplier() * clip_norm),
            clips: central,
            adaptive: spec.adaptive_clipping.as_ref().map(|a| AdaptiveRound {
                target_quantile: a.target_quantile,
                learning_rate: a.learning_rate,
                central_count_std: central.then_some(a.count_noise_multiplier),
            }),
            bits,
            unclipped: 0.0,
        })
    }

    /// Counts a site's "within the clip" indicator (0 or 1, plus its share of the count's noise
    /// under distributed noise).
    pub fn count_indicator(&mut self, indicator: f64) {
        self.unclipped += indicator;
    }

    /// The next round's clipping norm, C·exp(−η(b̄ − γ)) with b̄ the noised count of sites within
    /// the clip over the expected number of sampled sites; C itself without adaptive clipping.
    /// Draws the count's noise: call once per round.
    pub fn next_clip_norm(&mut self) -> f64 {
        let Some(a) = self.adaptive else {
            return self.clip_norm;
        };
        let noise = a
            .central_count_std
            .map_or(0.0, |s| s * standard_normal(&mut *self.bits));
        let fraction = (self.unclipped + noise) / self.expected_sites;
        self.clip_norm * (-a.learning_rate * (fraction - a.target_quantile)).exp()
    }

    /// The scale that clips an update at distance `norm` from the global model to C (1 within
    /// it, and 1 when the coordinator does not clip).
    pub fn scale(&self, norm: f64) -> f32 {
        if self.clips && norm > self.clip_norm {
            (self.clip_norm / norm) as f32
        } else {
            1.0
        }
    }

    /// One block of the noised average: `global + (sum - n·global + noise) / expected_sites`,
    /// from the block's `global` values, the `sum` of the `n` admitted (clipped) updates, into
    /// `out`.
    pub fn noised_average(&mut self, global: &[f32], sum: &[f64], n: usize, out: &mut [f32]) {
        let n = n as f64;
        for ((o, &g), &s) in out.iter_mut().zip(global).zip(sum) {
            let g = f64::from(g);
            let noise = self
                .central_noise_std
                .map_or(0.0, |std| std * standard_normal(&mut *self.bits));
            *o = (g + (s - n * g + noise) / self.expected_sites) as f32;
        }
    }
}

/// What a site did to its update under client-level DP before it left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteRelease {
    /// L2 norm of `update - global` as trained.
    pub norm: f64,
    /// The factor it was scaled by to fit the clipping norm (1 within it).
    pub scale: f64,
    /// Adaptive clipping's "within the clip" indicator, with the site's share of the count's
    /// noise under distributed noise.
    pub clip_indicator: Option<f64>,
}

/// A site's side of client-level DP: clips `update - global` to `clip_norm` and, with
/// distributed noise, adds its share N(0, z_Δ²C²/m) of the sum's noise to every value, m the
/// `expected_sites`. Tensors are matched to the global model's by name and shape.
pub fn release_update(
    spec: &ClientPrivacySpec,
    clip_norm: f64,
    expected_sites: f64,
    update: &mut crate::ModelParams,
    global: &crate::ModelParams,
    bits: &mut dyn RandomBits,
) -> Result<SiteRelease, CoreError> {
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(CoreError::Aggregation(format!(
            "the task's clip_norm must be a positive number, got {clip_norm}"
        )));
    }
    if !(expected_sites.is_finite() && expected_sites > 0.0) {
        return Err(CoreError::Aggregation(format!(
            "the task's expected_sites must be a positive number, got {expected_sites}"
        )));
    }
    let mut pairs = Vec::with_capacity(update.tensors.len());
    for (i, t) in update.tensors.iter().enumerate() {
        let g = global
            .tensors
            .iter()
            .find(|g| g.name == t.name && g.shape == t.shape)
            .ok_or_else(|| {
                CoreError::SchemaMismatch(format!(
                    "tensor {} {:?} is not in the global model",
                    t.name, t.shape
                ))
            })?;
        pairs.push((i, g));
    }
    let norm = pairs
        .iter()
        .flat_map(|(i, g)| update.tensors[*i].data.iter().zip(&g.data))
        .map(|(u, g)| f64::from(u - g).powi(2))
        .sum::<f64>()
        .sqrt();
    let scale = if norm > clip_norm {
        clip_norm / norm
    } else {
        1.0
    };
    let share = expected_sites.sqrt();
    let noise_std = (spec.noise == NoisePlacement::Distributed)
        .then(|| spec.update_noise_multiplier() * clip_norm / share);
    for (i, g) in pairs {
        for (u, &g) in update.tensors[i].data.iter_mut().zip(&g.data) {
            let (u64_, g64) = (f64::from(*u), f64::from(g));
            let noise = noise_std.map_or(0.0, |s| s * standard_normal(bits));
            *u = (g64 + scale * (u64_ - g64) + noise) as f32;
        }
    }
    let clip_indicator = spec.adaptive_clipping.as_ref().map(|a| {
        let within = if norm <= clip_norm { 1.0 } else { 0.0 };
        match spec.noise {
            NoisePlacement::Central => within,
            NoisePlacement::Distributed => {
                within + a.count_noise_multiplier / share * standard_normal(bits)
            }
        }
    });
    Ok(SiteRelease {
        norm,
        scale,
        clip_indicator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::SplitMix64;
    use crate::spec::{AccountantSpec, AdaptiveClipping};
    use crate::{ModelParams, NamedTensor};

    fn params(name: &str, values: Vec<f32>) -> ModelParams {
        ModelParams::new(vec![NamedTensor {
            name: name.into(),
            shape: vec![values.len()],
            data: values,
        }])
        .unwrap()
    }

    fn spec(noise: NoisePlacement) -> ClientPrivacySpec {
        ClientPrivacySpec {
            noise_multiplier: 2.0,
            clip_norm: 1.0,
            sample_rate: 1.0,
            noise,
            adaptive_clipping: Some(AdaptiveClipping {
                target_quantile: 0.5,
                learning_rate: 0.2,
                count_noise_multiplier: 100.0,
            }),
            target_epsilon: None,
            delta: 1e-3,
            accountant: AccountantSpec::Rdp,
        }
    }

    #[test]
    fn a_site_clips_its_difference_and_adds_its_share_of_the_noise() {
        let mut bits = SplitMix64::new(5);
        let global = params("w", vec![1.0; 4]);
        // Difference (3, 4, 0, 0): norm 5, clipped to C = 1 at central noise: exact.
        let mut update = params("w", vec![4.0, 5.0, 1.0, 1.0]);
        let r = release_update(
            &spec(NoisePlacement::Central),
            1.0,
            4.0,
            &mut update,
            &global,
            &mut bits,
        )
        .unwrap();
        assert!((r.norm - 5.0).abs() < 1e-9 && (r.scale - 0.2).abs() < 1e-12);
        assert_eq!(r.clip_indicator, Some(0.0));
        let want = [1.6f32, 1.8, 1.0, 1.0];
        assert!(update.tensors[0]
            .data
            .iter()
            .zip(want)
            .all(|(a, b)| (a - b).abs() < 1e-6));
        // Within the clip: untouched, indicator 1.
        let mut small = params("w", vec![1.1, 1.0, 1.0, 1.0]);
        let r = release_update(
            &spec(NoisePlacement::Central),
            1.0,
            4.0,
            &mut small,
            &global,
            &mut bits,
        )
        .unwrap();
        assert_eq!((r.scale, r.clip_indicator), (1.0, Some(1.0)));
        // Distributed: each value gets N(0, (z_Δ·C)²/m); z_Δ ≈ z with a loose count noise.
        let n = 40_000;
        let zero = params("w", vec![0.0; n]);
        let mut noisy = params("w", vec![0.0; n]);
        let s = spec(NoisePlacement::Distributed);
        let r = release_update(&s, 0.5, 4.0, &mut noisy, &zero, &mut bits).unwrap();
        let sd = (noisy.tensors[0]
            .data
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        let want = s.update_noise_multiplier() * 0.5 / 2.0;
        assert!((sd - want).abs() < 0.02 * want, "{sd} vs {want}");
        assert!(
            r.clip_indicator.unwrap() != 1.0,
            "the count carries noise too"
        );
        // A tensor the global model lacks is an error, not a silent skip.
        let mut other = params("v", vec![0.0; 4]);
        assert!(release_update(&s, 1.0, 4.0, &mut other, &global, &mut bits).is_err());
        assert!(release_update(&s, 0.0, 4.0, &mut small, &global, &mut bits).is_err());
        assert!(release_update(&s, 1.0, f64::NAN, &mut small, &global, &mut bits).is_err());
    }
}
