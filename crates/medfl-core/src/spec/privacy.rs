//! `[privacy]`: differential privacy for a run, at the record level (DP-SGD at every site), the
//! client level (DP-FedAvg over sites), or both. One level is one `[privacy]` table; both are two
//! `[[privacy]]` tables, one per level. Each level is accounted for separately.
//!
//! ```toml
//! [[privacy]]
//! level = "record"        # DP-SGD at every site: each patient's influence is bounded
//! noise_multiplier = 1.1  # z: noise standard deviation over the clipping norm
//! max_grad_norm = 1.0     # C: each record's gradient is clipped to this L2 norm
//!
//! [[privacy]]
//! level = "client"        # DP-FedAvg: each hospital's influence on the model is bounded
//! noise_multiplier = 1.0  # z over the sum of the sites' clipped updates
//! clip_norm = 0.5         # C: each site's update (minus the global model) is clipped to it
//! sample_rate = 0.5       # q: each online site takes part in a round with this probability
//! delta = 1e-3            # required: below 1 / (number of sites)
//! target_epsilon = 8.0    # optional: the run ends `budget_exhausted` before passing it
//! ```

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::privacy::Mechanism;
use crate::spec::{RunSpec, StrategySpec};
use crate::CoreError;

/// The run's differential privacy: none, either level or both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Privacy {
    /// Record level: DP-SGD in every site's local training.
    pub record: Option<PrivacySpec>,
    /// Client level: DP-FedAvg over the sites' updates.
    pub client: Option<ClientPrivacySpec>,
}

/// Record-level differential privacy (`level = "record"`).
///
/// ```toml
/// [privacy]
/// level = "record"
/// noise_multiplier = 1.1  # z: noise standard deviation over the clipping norm
/// max_grad_norm = 1.0     # C: each record's gradient is clipped to this L2 norm
/// target_epsilon = 8.0    # optional: a site stops before its ε for the run would exceed it
/// delta = 1e-6            # optional: default 1/N^1.1 at a site holding N records
/// accountant = "rdp"      # or "pld"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Noise standard deviation over the clipping norm (z), > 0.
    pub noise_multiplier: f64,
    /// Per-record clipping norm (C), > 0.
    pub max_grad_norm: f64,
    /// The ε each site may spend on the run, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// The δ of the guarantee; each site's default is 1/N^1.1 for its N records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// How ε is computed.
    #[serde(default)]
    pub accountant: AccountantSpec,
}

/// Client-level differential privacy (`level = "client"`): DP-FedAvg (McMahan et al. 2018).
/// Each site clips its update to `clip_norm`; the sum of the sampled sites' updates gets
/// Gaussian noise of standard deviation z·C and is divided by the expected number of sampled
/// sites, whoever answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPrivacySpec {
    /// Noise standard deviation over the clipping norm (z), > 0.
    pub noise_multiplier: f64,
    /// Per-site clipping norm of `update - global` (C), > 0; the first round's under adaptive
    /// clipping.
    pub clip_norm: f64,
    /// Probability that an online site takes part in a round (q), in (0, 1].
    pub sample_rate: f64,
    /// Who adds the noise.
    #[serde(default)]
    pub noise: NoisePlacement,
    /// Adapts the clipping norm to a quantile of the sites' update norms (Andrew et al. 2021).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClipping>,
    /// The ε the run may spend on any one site, at most: the run ends `budget_exhausted`
    /// before a round that would pass it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// The δ of the guarantee: required, and below 1 / (number of sites).
    pub delta: f64,
    /// How ε is computed.
    #[serde(default)]
    pub accountant: AccountantSpec,
}

/// `privacy.noise` at the client level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// The coordinator adds N(0, z²C²) to the sum: it sees each site's clipped update.
    #[default]
    Central,
    /// Each site adds N(0, z²C²/m) to its own clipped update, m the expected number of sampled
    /// sites, so the sum carries the full noise: composes with secure aggregation.
    Distributed,
}

impl NoisePlacement {
    /// The name the spec writes (`central`, `distributed`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Central => "central",
            Self::Distributed => "distributed",
        }
    }
}

/// `[privacy.adaptive_clipping]` (Andrew et al. 2021): after each round
/// C ← C·exp(−η(b̄ − γ)), b̄ the noised fraction of sampled sites whose update norm was at most C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// γ: the quantile of update norms the clip follows, in [0, 1].
    #[serde(default = "half")]
    pub target_quantile: f64,
    /// η: the geometric step of the clip, > 0.
    #[serde(default = "fifth")]
    pub learning_rate: f64,
    /// σ_b: standard deviation of the noise on the count of unclipped sites; more than z/2,
    /// since the update's noise multiplier becomes (z⁻² − (2σ_b)⁻²)^(−1/2).
    pub count_noise_multiplier: f64,
}

fn half() -> f64 {
    0.5
}
fn fifth() -> f64 {
    0.2
}

/// `privacy.accountant`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountantSpec {
    /// Rényi DP as Opacus computes it.
    #[default]
    Rdp,
    /// Privacy loss distributions as dp-accounting computes them (tighter).
    Pld,
}

impl AccountantSpec {
    /// The accountant itself.
    pub fn accountant(self) -> crate::privacy::Accountant {
        match self {
            Self::Rdp => crate::privacy::Accountant::Rdp,
            Self::Pld => crate::privacy::Accountant::Pld,
        }
    }
}

fn positive(level: &str, field: &str, v: f64) -> Result<(), CoreError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(CoreError::spec(
            format!("privacy.{field}"),
            format!("{level} level: must be a finite number > 0, got {v}"),
        ))
    }
}

fn delta_in_range(level: &str, d: f64) -> Result<(), CoreError> {
    if d > 0.0 && d < 1.0 {
        Ok(())
    } else {
        Err(CoreError::spec(
            "privacy.delta",
            format!("{level} level: must be in (0, 1), got {d}"),
        ))
    }
}

impl Privacy {
    /// Whether neither level is on.
    pub fn is_off(&self) -> bool {
        self.record.is_none() && self.client.is_none()
    }

    /// Checks both levels against the rest of `spec`, naming the offending field.
    pub(crate) fn validate(&self, spec: &RunSpec) -> Result<(), CoreError> {
        if let Some(p) = &self.record {
            p.validate()?;
        }
        if let Some(c) = &self.client {
            c.validate(spec)?;
        }
        Ok(())
    }
}

impl PrivacySpec {
    fn validate(&self) -> Result<(), CoreError> {
        positive("record", "noise_multiplier", self.noise_multiplier)?;
        positive("record", "max_grad_norm", self.max_grad_norm)?;
        if let Some(e) = self.target_epsilon {
            positive("record", "target_epsilon", e)?;
        }
        if let Some(d) = self.delta {
            delta_in_range("record", d)?;
        }
        Ok(())
    }

    /// The δ a site holding `rows` records uses: the spec's, or 1/N^1.1. Refused (naming
    /// `privacy.delta`) when it is not below 1/N: a δ that large allows publishing a record.
    pub fn delta_for(&self, rows: usize) -> Result<f64, CoreError> {
        let n = rows.max(1) as f64;
        let delta = self.delta.unwrap_or_else(|| n.powf(-1.1));
        if delta >= 1.0 / n {
            return Err(CoreError::spec(
                "privacy.delta",
                format!(
                    "{delta} is not below 1/N = {} for a dataset of {rows} records",
                    1.0 / n
                ),
            ));
        }
        Ok(delta)
    }
}

impl ClientPrivacySpec {
    fn validate(&self, spec: &RunSpec) -> Result<(), CoreError> {
        positive("client", "noise_multiplier", self.noise_multiplier)?;
        positive("client", "clip_norm", self.clip_norm)?;
        let q = self.sample_rate;
        if !(q > 0.0 && q <= 1.0) {
            return Err(CoreError::spec(
                "privacy.sample_rate",
                format!("client level: must be in (0, 1], got {q}"),
            ));
        }
        if let Some(e) = self.target_epsilon {
            positive("client", "target_epsilon", e)?;
        }
        delta_in_range("client", self.delta)?;
        if let Some(a) = &self.adaptive_clipping {
            if !(0.0..=1.0).contains(&a.target_quantile) {
                return Err(CoreError::spec(
                    "privacy.adaptive_clipping.target_quantile",
                    format!("must be in [0, 1], got {}", a.target_quantile),
                ));
            }
            positive("client", "adaptive_clipping.learning_rate", a.learning_rate)?;
            let (sb, z) = (a.count_noise_multiplier, self.noise_multiplier);
            if !(sb.is_finite() && 2.0 * sb > z) {
                return Err(CoreError::spec(
                    "privacy.adaptive_clipping.count_noise_multiplier",
                    format!(
                        "must be more than noise_multiplier / 2 = {} (the count's noise is paid \
                         for out of z), got {sb}",
                        z / 2.0
                    ),
                ));
            }
        }
        // The guarantee bounds each site's influence on a sum; a rule that picks or sorts
        // updates (Krum, medians, trimmed means) has no such bound.
        if !matches!(
            spec.strategy,
            StrategySpec::Fedavg
                | StrategySpec::Fedprox { .. }
                | StrategySpec::Fedavgm { .. }
                | StrategySpec::Fedadam(_)
                | StrategySpec::Fedyogi(_)
                | StrategySpec::Fedadagrad { .. }
        ) {
            return Err(CoreError::spec(
                "strategy",
                format!(
                    "{} breaks client-level DP's sensitivity bound (each site's clipped update \
                     enters a noised sum); use fedavg, fedprox or a server optimizer",
                    spec.strategy.name()
                ),
            ));
        }
        if spec.fraction != 1.0 {
            return Err(CoreError::spec(
                "fraction",
                "with client-level DP each site takes part with probability \
                 privacy.sample_rate; leave fraction out",
            ));
        }
        if self.noise == NoisePlacement::Distributed && spec.defense.max_update_norm.is_some() {
            return Err(CoreError::spec(
                "defense.max_update_norm",
                "with distributed noise every update carries its site's share of the noise, so a \
                 norm bound would refuse or distort it; the sites' clipping (privacy.clip_norm) \
                 bounds them",
            ));
        }
        Ok(())
    }

    /// The noise multiplier on the sum of updates: z without adaptive clipping; with it, what is
    /// left of z once the count of unclipped sites has its noise, (z⁻² − (2σ_b)⁻²)^(−1/2).
    pub fn update_noise_multiplier(&self) -> f64 {
        let z = self.noise_multiplier;
        match &self.adaptive_clipping {
            None => z,
            Some(a) => (z.powi(-2) - (2.0 * a.count_noise_multiplier).powi(-2)).powf(-0.5),
        }
    }

    /// The mechanism of `rounds` rounds.
    pub fn mechanism(&self, rounds: u32) -> Mechanism {
        Mechanism {
            sample_rate: self.sample_rate,
            noise_multiplier: self.noise_multiplier,
            steps: u64::from(rounds),
            delta: self.delta,
        }
    }

    /// The ε any one site has spent after `rounds` rounds.
    pub fn epsilon_after(&self, rounds: u32) -> Result<f64, CoreError> {
        Ok(self
            .accountant
            .accountant()
            .epsilon(&self.mechanism(rounds))?
            .epsilon)
    }

    /// How many of the spec's `rounds` the target ε allows (all of them without a target).
    /// Refused, naming `privacy.target_epsilon`, when not even one round fits.
    pub fn rounds_within_target(&self, rounds: u32) -> Result<u32, CoreError> {
        let Some(target) = self.target_epsilon else {
            return Ok(rounds);
        };
        if self.epsilon_after(rounds)? <= target {
            return Ok(rounds);
        }
        // ε grows with the rounds: the last round count within the target, by bisection.
        let (mut fits, mut over) = (0u32, rounds);
        while over - fits > 1 {
            let mid = fits + (over - fits) / 2;
            if self.epsilon_after(mid)? <= target {
                fits = mid;
            } else {
                over = mid;
            }
        }
        if fits == 0 {
            return Err(CoreError::spec(
                "privacy.target_epsilon",
                format!(
                    "client level: one round already spends ε = {:.4} > {target} \
                     (q = {}, z = {}, δ = {}); raise noise_multiplier or lower sample_rate",
                    self.epsilon_after(1)?,
                    self.sample_rate,
                    self.noise_multiplier,
                    self.delta
                ),
            ));
        }
        Ok(fits)
    }

    /// Checks δ against the number of sites that may take part: a δ of 1/K or more allows
    /// publishing one site's update.
    pub fn check_delta(&self, sites: usize) -> Result<(), CoreError> {
        let k = sites.max(1) as f64;
        if self.delta >= 1.0 / k {
            return Err(CoreError::spec(
                "privacy.delta",
                format!(
                    "client level: {} is not below 1/K = {} for {sites} sites",
                    self.delta,
                    1.0 / k
                ),
            ));
        }
        Ok(())
    }
}

/// One `[privacy]` table, told apart by its `level`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case")]
enum LevelTable {
    Record(PrivacySpec),
    Client(ClientPrivacySpec),
}

impl Serialize for Privacy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut tables: Vec<LevelTable> = Vec::new();
        tables.extend(self.record.clone().map(LevelTable::Record));
        tables.extend(self.client.clone().map(LevelTable::Client));
        match tables.as_slice() {
            [one] => one.serialize(s),
            _ => tables.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Privacy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tables;
        impl<'de> serde::de::Visitor<'de> for Tables {
            type Value = Privacy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [privacy] table, or one [[privacy]] table per level")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Privacy, A::Error> {
                let one = LevelTable::deserialize(MapAccessDeserializer::new(map))?;
                Privacy::default()
                    .with(one)
                    .map_err(serde::de::Error::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Privacy, A::Error> {
                let many = Vec::<LevelTable>::deserialize(SeqAccessDeserializer::new(seq))?;
                many.into_iter()
                    .try_fold(Privacy::default(), Privacy::with)
                    .map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(Tables)
    }
}

impl Privacy {
    fn with(mut self, table: LevelTable) -> Result<Self, String> {
        let twice = |level: &str| format!("privacy: level \"{level}\" is given twice");
        match table {
            LevelTable::Record(r) if self.record.is_none() => self.record = Some(r),
            LevelTable::Client(c) if self.client.is_none() => self.client = Some(c),
            LevelTable::Record(_) => return Err(twice("record")),
            LevelTable::Client(_) => return Err(twice("client")),
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::SPEC;

    fn with(tables: &str) -> Result<RunSpec, CoreError> {
        RunSpec::from_toml(&format!("{SPEC}\n{tables}"))
    }

    const RECORD: &str = "level = \"record\"\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\n";
    const CLIENT: &str =
        "level = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 0.5\nsample_rate = 0.5\ndelta = 1e-3\n";

    #[test]
    fn record_level_parses_round_trips_and_names_bad_values() {
        let s = with(&format!("[privacy]\n{RECORD}")).unwrap();
        let p = s.privacy.record.clone().unwrap();
        assert!(s.privacy.client.is_none());
        assert_eq!(p.accountant, AccountantSpec::Rdp);
        assert_eq!((p.target_epsilon, p.delta), (None, None));
        assert_eq!(RunSpec::from_toml(&s.to_toml()).unwrap(), s);
        // Without the table nothing is written, so older specs keep their hash.
        assert!(!RunSpec::from_toml(SPEC)
            .unwrap()
            .to_toml()
            .contains("privacy"));
        for (table, field) in [
            (
                "noise_multiplier = 0\nmax_grad_norm = 1",
                "privacy.noise_multiplier",
            ),
            (
                "noise_multiplier = -1\nmax_grad_norm = 1",
                "privacy.noise_multiplier",
            ),
            (
                "noise_multiplier = 1\nmax_grad_norm = 0",
                "privacy.max_grad_norm",
            ),
        ] {
            let err = with(&format!("[privacy]\nlevel = \"record\"\n{table}")).unwrap_err();
            assert!(err.to_string().contains(field), "{table}: {err}");
        }
        for (extra, field) in [
            ("target_epsilon = 0", "privacy.target_epsilon"),
            ("target_epsilon = -3", "privacy.target_epsilon"),
            ("delta = 1", "privacy.delta"),
            ("delta = 0", "privacy.delta"),
        ] {
            let err = with(&format!("[privacy]\n{RECORD}{extra}")).unwrap_err();
            assert!(err.to_string().contains(field), "{extra}: {err}");
        }
        let err = with(&format!("[privacy]\n{RECORD}accountant = \"moments\"")).unwrap_err();
        assert!(err.to_string().contains("moments"), "{err}");
        let err = with(&format!("[privacy]\n{RECORD}noise_multipler = 2")).unwrap_err();
        assert!(err.to_string().contains("noise_multipler"), "{err}");
        let err = with("[privacy]\nlevel = \"hospital\"\nnoise_multiplier = 1").unwrap_err();
        assert!(err.to_string().contains("hospital"), "{err}");
        // The default δ is 1/N^1.1; a δ of 1/N or more is refused with the numbers.
        assert!((p.delta_for(1000).unwrap() - 1000f64.powf(-1.1)).abs() < 1e-15);
        let loose = PrivacySpec {
            delta: Some(1e-3),
            ..p
        };
        let err = loose.delta_for(1000).unwrap_err().to_string();
        assert!(
            err.contains("privacy.delta") && err.contains("1000 records"),
            "{err}"
        );
        assert_eq!(loose.delta_for(999).unwrap(), 1e-3);
    }

    #[test]
    fn client_level_alone_or_with_record_level_round_trips() {
        let s = with(&format!("[privacy]\n{CLIENT}")).unwrap();
        let c = s.privacy.client.clone().unwrap();
        assert!(s.privacy.record.is_none());
        assert_eq!(c.noise, NoisePlacement::Central);
        assert_eq!(c.adaptive_clipping, None);
        assert_eq!(RunSpec::from_toml(&s.to_toml()).unwrap(), s);
        let both = with(&format!(
            "[[privacy]]\n{RECORD}\n[[privacy]]\n{CLIENT}noise = \"distributed\"\n\
             [privacy.adaptive_clipping]\ncount_noise_multiplier = 5.0\n"
        ))
        .unwrap();
        let (r, c) = (
            both.privacy.record.clone().unwrap(),
            both.privacy.client.clone().unwrap(),
        );
        assert_eq!(r.noise_multiplier, 1.1);
        assert_eq!(c.noise, NoisePlacement::Distributed);
        let a = c.adaptive_clipping.clone().unwrap();
        assert_eq!((a.target_quantile, a.learning_rate), (0.5, 0.2));
        assert_eq!(RunSpec::from_toml(&both.to_toml()).unwrap(), both);
        // The count's noise is paid for out of z: z_Δ = (1 − 1/100)^(−1/2).
        assert!((c.update_noise_multiplier() - (0.99f64).powf(-0.5)).abs() < 1e-12);
        let err = with(&format!("[[privacy]]\n{RECORD}\n[[privacy]]\n{RECORD}")).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn client_level_bad_values_name_their_field() {
        for (change, field) in [
            (("noise_multiplier = 1.0", "noise_multiplier = 0"), "privacy.noise_multiplier"),
            (("clip_norm = 0.5", "clip_norm = -1"), "privacy.clip_norm"),
            (("sample_rate = 0.5", "sample_rate = 0"), "privacy.sample_rate"),
            (("sample_rate = 0.5", "sample_rate = 1.5"), "privacy.sample_rate"),
            (("delta = 1e-3", "delta = 1"), "privacy.delta"),
            (("delta = 1e-3", "delta = 1e-3\ntarget_epsilon = 0"), "privacy.target_epsilon"),
            (
                ("delta = 1e-3", "delta = 1e-3\n[privacy.adaptive_clipping]\ncount_noise_multiplier = 0.5"),
                "privacy.adaptive_clipping.count_noise_multiplier",
            ),
            (
                ("delta = 1e-3", "delta = 1e-3\n[privacy.adaptive_clipping]\ntarget_quantile = 2\ncount_noise_multiplier = 5"),
                "privacy.adaptive_clipping.target_quantile",
            ),
        ] {
            let err = with(&format!("[privacy]\n{}", CLIENT.replace(change.0, change.1))).unwrap_err();
            assert!(err.to_string().contains(field), "{change:?}: {err}");
        }
        let err = with(&format!(
            "[privacy]\n{}",
            CLIENT.replace("delta = 1e-3\n", "")
        ))
        .unwrap_err();
        assert!(err.to_string().contains("delta"), "{err}");
        // Robust rules have no sensitivity bound; sampling is the privacy's, not `fraction`'s.
        let spec = |top: &str, tail: &str| {
            RunSpec::from_toml(&format!("{top}\n{SPEC}\n{tail}\n[privacy]\n{CLIENT}"))
        };
        let err = with(&format!(
            "[strategy]\nname = \"median\"\n\n[privacy]\n{CLIENT}"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("strategy") && err.to_string().contains("sensitivity"),
            "{err}"
        );
        let err = spec("fraction = 0.5", "").unwrap_err();
        assert!(err.to_string().contains("fraction"), "{err}");
        let err = with(&format!(
            "[defense]\nmax_update_norm = 1.0\n\n[privacy]\n{CLIENT}noise = \"distributed\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("defense.max_update_norm"), "{err}");
        assert!(with(&format!(
            "[defense]\nmax_update_norm = 1.0\n\n[privacy]\n{CLIENT}"
        ))
        .is_ok());
        assert!(with(&format!(
            "[strategy]\nname = \"fedadam\"\n\n[privacy]\n{CLIENT}"
        ))
        .is_ok());
    }

    #[test]
    fn the_target_limits_the_rounds_and_an_unmeetable_one_is_refused() {
        let mut c = with(&format!("[privacy]\n{CLIENT}"))
            .unwrap()
            .privacy
            .client
            .unwrap();
        assert_eq!(c.rounds_within_target(50).unwrap(), 50);
        let full = c.epsilon_after(50).unwrap();
        c.target_epsilon = Some(full);
        assert_eq!(c.rounds_within_target(50).unwrap(), 50);
        let t = c.epsilon_after(20).unwrap();
        c.target_epsilon = Some(t);
        let fits = c.rounds_within_target(50).unwrap();
        assert_eq!(fits, 20);
        assert!(c.epsilon_after(fits + 1).unwrap() > t);
        c.target_epsilon = Some(c.epsilon_after(1).unwrap() / 2.0);
        let err = c.rounds_within_target(50).unwrap_err().to_string();
        assert!(
            err.contains("privacy.target_epsilon") && err.contains("one round"),
            "{err}"
        );
        assert!(c.check_delta(999).is_ok());
        let err = c.check_delta(1000).unwrap_err().to_string();
        assert!(
            err.contains("privacy.delta") && err.contains("1000 sites"),
            "{err}"
        );
    }
}
