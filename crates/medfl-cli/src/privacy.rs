//! `medfl privacy`: what a differentially private run spends (ε at a δ) and the noise a target
//! ε needs, for the Poisson-subsampled Gaussian that both of medfl's privacy levels use: rows
//! sampled into each DP-SGD step at a site, or sites sampled into each round.

use medfl_core::privacy::{self, noise_for, Mechanism, Spent};

/// `medfl privacy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {
    /// Prints ε for a sample rate, noise multiplier, number of steps and δ.
    Epsilon {
        #[command(flatten)]
        common: Common,
        /// Noise standard deviation over the clipping norm (z).
        #[arg(long, value_name = "Z", allow_negative_numbers = true)]
        noise_multiplier: f64,
    },
    /// Prints the smallest noise multiplier that keeps ε at or under a target.
    Noise {
        #[command(flatten)]
        common: Common,
        /// The ε not to exceed.
        #[arg(long, value_name = "E", allow_negative_numbers = true)]
        target_epsilon: f64,
    },
}

/// What both subcommands take.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Probability that one record (or site) takes part in one step (q), in (0, 1].
    #[arg(long, value_name = "Q", allow_negative_numbers = true)]
    sample_rate: f64,
    /// Steps (DP-SGD steps, or rounds at the client level).
    #[arg(long, value_name = "T")]
    steps: u64,
    /// The δ of the (ε, δ) guarantee; at most 1/N for N records.
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    delta: f64,
    /// How ε is computed: Rényi DP as Opacus computes it, or privacy loss distributions as
    /// Google's dp-accounting does (tighter; seconds for thousands of steps).
    #[arg(long, value_enum, default_value_t = Accountant::Rdp)]
    accountant: Accountant,
    /// Print JSON (`{"epsilon": ..., ...}`) instead of text.
    #[arg(long)]
    json: bool,
}

/// The privacy accountants.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Accountant {
    /// Rényi DP (Opacus's orders and conversion).
    Rdp,
    /// Privacy loss distributions (dp-accounting's PLD accountant, discretisation 1e-4).
    Pld,
}

impl From<Accountant> for privacy::Accountant {
    fn from(accountant: Accountant) -> Self {
        match accountant {
            Accountant::Rdp => Self::Rdp,
            Accountant::Pld => Self::Pld,
        }
    }
}

/// Runs a subcommand.
pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    match command {
        PrivacyCommand::Epsilon {
            common,
            noise_multiplier,
        } => {
            let mechanism = common.mechanism(noise_multiplier);
            let spent = common.accountant().epsilon(&mechanism)?;
            let how = match spent.best_order {
                Some(order) => format!(" (RDP, best order {order})"),
                None => format!(" ({})", common.accountant().name().to_uppercase()),
            };
            common.print(
                &mechanism,
                &spent,
                serde_json::json!({}),
                format!("ε = {:.6} at δ = {}{how}", spent.epsilon, mechanism.delta),
            );
        }
        PrivacyCommand::Noise {
            common,
            target_epsilon,
        } => {
            let (z, spent) =
                noise_for(common.accountant(), &common.mechanism(1.0), target_epsilon)?;
            let mechanism = common.mechanism(z);
            common.print(
                &mechanism,
                &spent,
                serde_json::json!({ "target_epsilon": target_epsilon }),
                format!(
                    "noise multiplier z = {z:.6} (ε = {:.6} at δ = {})",
                    spent.epsilon, mechanism.delta
                ),
            );
        }
    }
    Ok(())
}

impl Common {
    fn accountant(&self) -> privacy::Accountant {
        self.accountant.into()
    }

    fn mechanism(&self, noise_multiplier: f64) -> Mechanism {
        Mechanism {
            sample_rate: self.sample_rate,
            noise_multiplier,
            steps: self.steps,
            delta: self.delta,
        }
    }

    /// Prints `text`, or with `--json` the mechanism and what it spends, plus `extra` keys.
    fn print(&self, mechanism: &Mechanism, spent: &Spent, extra: serde_json::Value, text: String) {
        if !self.json {
            medfl_daemon::outln!("{text}");
            return;
        }
        let mut out = serde_json::json!({
            "epsilon": spent.epsilon,
            "best_order": spent.best_order,
            "delta": mechanism.delta,
            "accountant": self.accountant().name(),
            "sample_rate": mechanism.sample_rate,
            "noise_multiplier": mechanism.noise_multiplier,
            "steps": mechanism.steps,
        });
        if let (Some(out), serde_json::Value::Object(extra)) = (out.as_object_mut(), extra) {
            out.extend(extra);
        }
        medfl_daemon::outln!("{out}");
    }
}
