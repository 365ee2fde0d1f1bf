//! Server optimisers on the FedAvg pseudo-gradient (Reddi et al. 2021), as Flower 1.42 runs them.
//!
//! Each round the coordinator computes `avg`, the FedAvg of the round's updates, then steps the
//! global model `x` block by block with [`ServerOptimizer::step_block`], keeping the optimiser
//! state (`m`, `v`) beside the model in blocks of the same layout.

use crate::CoreError;

/// A server optimiser and its hyper-parameters (Flower's `FedAvgM`, `FedAdam`, `FedYogi`,
/// `FedAdagrad`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// SGD with momentum on the pseudo-gradient `x - avg`.
    FedAvgM {
        /// Server learning rate (Flower's default 1.0).
        server_learning_rate: f64,
        /// Momentum factor; 0 disables the buffer (Flower's default 0.0).
        momentum: f64,
    },
    /// Adam, with Flower's bias-corrected step size.
    FedAdam {
        /// Server learning rate.
        eta: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity (added to `sqrt(v)`).
        tau: f64,
    },
    /// Yogi: Adam with an additive second-moment update, no bias correction.
    FedYogi {
        /// Server learning rate.
        eta: f64,
        /// First-moment decay.
        beta_1: f64,
        /// Second-moment decay.
        beta_2: f64,
        /// Adaptivity (added to `sqrt(v)`).
        tau: f64,
    },
    /// Adagrad: the sum of squared pseudo-gradients, no first moment.
    FedAdagrad {
        /// Server learning rate.
        eta: f64,
        /// Adaptivity (added to `sqrt(v)`).
        tau: f64,
    },
}

/// `numpy.sign`: 0 for 0, unlike `f64::signum`.
fn sign(z: f64) -> f64 {
    if z > 0.0 {
        1.0
    } else if z < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl ServerOptimizer {
    /// Flower's `FedAvgM` defaults: learning rate 1.0, momentum 0.0 (plain FedAvg).
    pub fn defaults_avgm() -> Self {
        Self::FedAvgM {
            server_learning_rate: 1.0,
            momentum: 0.0,
        }
    }

    /// Flower's `FedAdam` defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9.
    pub fn defaults_adam() -> Self {
        Self::FedAdam {
            eta: 0.1,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-9,
        }
    }

    /// Flower's `FedYogi` defaults: eta 0.01, beta_1 0.9, beta_2 0.99, tau 1e-3.
    pub fn defaults_yogi() -> Self {
        Self::FedYogi {
            eta: 1e-2,
            beta_1: 0.9,
            beta_2: 0.99,
            tau: 1e-3,
        }
    }

    /// Flower's `FedAdagrad` defaults: eta 0.1, tau 1e-9.
    pub fn defaults_adagrad() -> Self {
        Self::FedAdagrad {
            eta: 0.1,
            tau: 1e-9,
        }
    }

    /// Whether the optimiser keeps a first-moment (momentum) buffer `m`.
    pub fn uses_first_moment(&self) -> bool {
        match self {
            Self::FedAvgM { momentum, .. } => *momentum > 0.0,
            Self::FedAdam { .. } | Self::FedYogi { .. } => true,
            // Flower runs Adagrad with beta_1 = 0, so its `m` is just this round's delta.
            Self::FedAdagrad { .. } => false,
        }
    }

    /// Whether the optimiser keeps a second-moment buffer `v`.
    pub fn uses_second_moment(&self) -> bool {
        !matches!(self, Self::FedAvgM { .. })
    }

    /// Checks the hyper-parameters: learning rates and `tau` finite and positive, `beta_1`,
    /// `beta_2` and `momentum` in `[0, 1)`. Errors name the field (`strategy.eta`).
    pub fn validate(&self) -> Result<(), CoreError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(CoreError::spec(
                    format!("strategy.{field}"),
                    format!("must be positive, got {v}"),
                ))
            }
        };
        let unit = |field: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(CoreError::spec(
                    format!("strategy.{field}"),
                    format!("must be in [0, 1), got {v}"),
                ))
            }
        };
        match *self {
            Self::FedAvgM {
                server_learning_rate,
                momentum,
            } => {
                positive("server_learning_rate", server_learning_rate)?;
                unit("momentum", momentum)
            }
            Self::FedAdam {
                eta,
                beta_1,
                beta_2,
                tau,
            }
            | Self::FedYogi {
                eta,
                beta_1,
                beta_2,
                tau,
            } => {
                positive("eta", eta)?;
                positive("tau", tau)?;
                unit("beta_1", beta_1)?;
                unit("beta_2", beta_2)
            }
            Self::FedAdagrad { eta, tau } => {
                positive("eta", eta)?;
                positive("tau", tau)
            }
        }
    }

    /// The step size of server step `t`. FedAdam's is Flower's bias-corrected
    /// `eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`: Flower raises to `server_round + 1`.
    fn step_size(&self, t: u64) -> f64 {
        match *self {
            Self::FedAdam {
                eta,
                beta_1,
                beta_2,
                ..
            } => {
                let p = t as f64 + 1.0;
                eta * (1.0 - beta_2.powf(p)).sqrt() / (1.0 - beta_1.powf(p))
            }
            Self::FedYogi { eta, .. } | Self::FedAdagrad { eta, .. } => eta,
            Self::FedAvgM {
                server_learning_rate,
                ..
            } => server_learning_rate,
        }
    }

    /// One coordinate's step: the new `(x, m, v)` from the old ones and the round's average.
    fn coordinate(&self, lr: f64, x: f64, avg: f64, m: f64, v: f64) -> (f64, f64, f64) {
        let delta = avg - x;
        match *self {
            Self::FedAvgM { momentum, .. } => {
                if lr == 1.0 && momentum == 0.0 {
                    // Flower skips server optimisation here and returns the FedAvg itself.
                    return (avg, m, v);
                }
                let grad = x - avg;
                // Flower starts the buffer at the first gradient; from zeros this is the same.
                let m = momentum * m + grad;
                let dir = if momentum > 0.0 { m } else { grad };
                (x - lr * dir, m, v)
            }
            Self::FedAdam {
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let m = beta_1 * m + (1.0 - beta_1) * delta;
                let v = beta_2 * v + (1.0 - beta_2) * (delta * delta);
                (x + lr * m / (v.sqrt() + tau), m, v)
            }
            Self::FedYogi {
                beta_1,
                beta_2,
                tau,
                ..
            } => {
                let m = beta_1 * m + (1.0 - beta_1) * delta;
                let d2 = delta * delta;
                let v = v - (1.0 - beta_2) * d2 * sign(v - d2);
                (x + lr * m / (v.sqrt() + tau), m, v)
            }
            Self::FedAdagrad { tau, .. } => {
                let v = v + delta * delta;
                (x + lr * delta / (v.sqrt() + tau), delta, v)
            }
        }
    }

    /// One server step on one block: moves `x` (the global model) using `avg` (the FedAvg of the
    /// round's updates, pseudo-gradient `avg - x`) and updates the state `m` and `v` in place.
    ///
    /// `t` is the 1-based server step. The state starts as zeros; pass empty slices for state the
    /// optimiser does not use ([`Self::uses_first_moment`], [`Self::uses_second_moment`]).
    /// Computed in `f64`, stored as `f32`.
    ///
    /// # Panics
    /// If `avg`, or a state the optimiser uses, has another length than `x`.
    pub fn step_block(&self, t: u64, x: &mut [f32], avg: &[f32], m: &mut [f32], v: &mut [f32]) {
        assert_eq!(avg.len(), x.len(), "avg and x differ in length");
        if self.uses_first_moment() {
            assert_eq!(m.len(), x.len(), "m and x differ in length");
        }
        if self.uses_second_moment() {
            assert_eq!(v.len(), x.len(), "v and x differ in length");
        }
        let lr = self.step_size(t);
        for (k, (xk, a)) in x.iter_mut().zip(avg).enumerate() {
            let old = |s: &[f32]| s.get(k).map_or(0.0, |&s| f64::from(s));
            let (nx, nm, nv) = self.coordinate(lr, f64::from(*xk), f64::from(*a), old(m), old(v));
            *xk = nx as f32;
            if let Some(s) = m.get_mut(k) {
                *s = nm as f32;
            }
            if let Some(s) = v.get_mut(k) {
                *s = nv as f32;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two FedAdam steps with Flower 1.42's defaults, `strategies_reference.json`
    /// (`server_optimizers.fedadam_defaults`). The global model starts at client 0's `layer0`
    /// with a zero `layer1`; both rounds aggregate clients 0, 1, 2 (10, 20, 30 examples). The
    /// update is the body of `FedAdam.aggregate_fit` (`flwr/server/strategy/fedadam.py`):
    /// ```python
    /// import numpy as np
    /// from flwr.server.strategy.aggregate import aggregate
    /// eta, beta_1, beta_2, tau = 1e-1, 0.9, 0.99, 1e-9
    /// x = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros(2)]
    /// avg = aggregate([(clients[i], num_examples[i]) for i in range(3)])
    /// m = [np.zeros_like(a) for a in x]; v = [np.zeros_like(a) for a in x]
    /// for server_round in (1, 2):
    ///     delta = [a - b for a, b in zip(avg, x)]
    ///     m = [beta_1 * a + (1 - beta_1) * d for a, d in zip(m, delta)]
    ///     v = [beta_2 * a + (1 - beta_2) * np.multiply(d, d) for a, d in zip(v, delta)]
    ///     eta_norm = (eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0))
    ///                 / (1 - np.power(beta_1, server_round + 1.0)))
    ///     x = [a + eta_norm * b / (np.sqrt(c) + tau) for a, b, c in zip(x, m, v)]
    /// ```
    pub(crate) const X0: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 0.0, 0.0];
    /// FedAvg of clients 0..3 of the reference inputs, weighted 10, 20, 30.
    pub(crate) const CLIENTS_012: [[f32; 6]; 3] = [
        [1.0, 2.0, 3.0, 4.0, 0.5, -0.5],
        [1.1, 1.9, 3.2, 3.9, 0.4, -0.6],
        [0.9, 2.1, 2.8, 4.1, 0.6, -0.4],
    ];
    pub(crate) const WEIGHTS_012: [f64; 3] = [10.0, 20.0, 30.0];
    /// `(params, m, v)` after each round.
    pub(crate) const FLOWER_ADAM: [[[f64; 6]; 3]; 2] = [
        [
            [
                0.9257540657072137,
                2.074245934292786,
                2.9257540434334404,
                4.074245934292787,
                0.07424597740332788,
                -0.07424597730422312,
            ],
            [
                -0.0016666666666666603,
                0.0016666666666666603,
                -0.0033333333333333205,
                0.0016666666666665716,
                0.05166666666666665,
                -0.048333333333333325,
            ],
            [
                2.7777777777777605e-06,
                2.7777777777777605e-06,
                1.1111111111111042e-05,
                2.777777777777464e-06,
                0.002669444444444446,
                0.002336111111111113,
            ],
        ],
        [
            [
                0.9709443040509024,
                2.0290556959490975,
                2.9389306750953517,
                4.029055695949096,
                0.15932858191791557,
                -0.1592657665619347,
            ],
            [
                0.004257926762611969,
                -0.0042579267626119575,
                0.001091262323322653,
                -0.004257926762612171,
                0.09074206892633385,
                -0.08440873560291101,
            ],
            [
                3.590372060360311e-05,
                3.5903720603602984e-05,
                2.773842739823933e-05,
                3.5903720603604224e-05,
                0.004600110662882481,
                0.003986274648628883,
            ],
        ],
    ];

    /// `|got - want| <= rel * max(|want|, floor)`.
    fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, floor: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() <= rel * w.abs().max(floor),
                "{what}: {got:?} vs {want:?}"
            );
        }
    }

    fn average() -> Vec<f32> {
        let rows: Vec<&[f32]> = CLIENTS_012.iter().map(|r| r.as_slice()).collect();
        let mut avg = vec![0.0; 6];
        super::super::robust::weighted_mean_block(&rows, &WEIGHTS_012, &mut avg);
        avg
    }

    /// Runs two FedAdam steps over blocks of `size` coordinates; returns `(x, m, v)` per round.
    fn adam_rounds(size: usize) -> Vec<[Vec<f32>; 3]> {
        let opt = ServerOptimizer::defaults_adam();
        let avg = average();
        let (mut x, mut m, mut v) = (X0.to_vec(), vec![0.0; 6], vec![0.0; 6]);
        (1..=2)
            .map(|t| {
                for (((xb, ab), mb), vb) in x
                    .chunks_mut(size)
                    .zip(avg.chunks(size))
                    .zip(m.chunks_mut(size))
                    .zip(v.chunks_mut(size))
                {
                    opt.step_block(t, xb, ab, mb, vb);
                }
                [x.clone(), m.clone(), v.clone()]
            })
            .collect()
    }

    pub(crate) fn check_adam(got: &[[Vec<f32>; 3]], want: &[[[f64; 6]; 3]]) {
        for ([x, m, v], [wx, wm, wv]) in got.iter().zip(want) {
            // Parameters: 1e-6 relative to the magnitude (at least 1), as elsewhere.
            assert_close("params", x, wx, 1e-6, 1.0);
            // The moments come from `avg - x`, about 2e-2, a difference of `f32` values up to 4
            // whose rounding (up to 2.4e-7) is 1e-5 of it: that is all the `f32` inputs allow
            // (measured: m 1.5e-5, v 3.1e-5 relative). So `m` is held to 1e-6 of the parameter
            // scale times `1 - beta_1` (1e-7 absolute), and `v` to 1e-4 relative.
            assert_close("m", m, wm, 1e-7, 1.0);
            assert_close("v", v, wv, 1e-4, 0.0);
        }
    }

    #[test]
    fn fedadam_matches_flower_reference() {
        check_adam(&adam_rounds(6), &FLOWER_ADAM);
    }

    #[test]
    fn fedadam_matches_shared_reference_file_when_present() {
        let Some(text) = crate::fedavg::shared_strategies_reference(
            "server_opt::fedadam_matches_shared_reference_file_when_present",
        ) else {
            return;
        };
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let steps = json["server_optimizers"]["fedadam_defaults"]["steps"]
            .as_array()
            .unwrap();
        let want: Vec<[[f64; 6]; 3]> = steps
            .iter()
            .map(|s| {
                ["new_params", "m_t", "v_t"].map(|k| {
                    let mut a = [0.0; 6];
                    a.copy_from_slice(&flat(&s[k]));
                    a
                })
            })
            .collect();
        assert_eq!(want.len(), 2);
        check_adam(&adam_rounds(6), &want);
        let hp = &json["server_optimizers"]["fedadam_defaults"]["hyperparams"];
        let ServerOptimizer::FedAdam {
            eta,
            beta_1,
            beta_2,
            tau,
        } = ServerOptimizer::defaults_adam()
        else {
            unreachable!()
        };
        let expected = [eta, beta_1, beta_2, tau];
        for (key, value) in ["eta", "beta_1", "beta_2", "tau"].iter().zip(expected) {
            assert_eq!(hp[key].as_f64(), Some(value), "{key}");
        }
    }

    #[test]
    fn blocks_of_any_size_give_the_same_steps() {
        let whole = adam_rounds(6);
        for size in 1..6 {
            assert_eq!(adam_rounds(size), whole);
        }
        let mut rng = crate::selection::SplitMix64::new(23);
        let len = 19;
        let random = |rng: &mut crate::selection::SplitMix64| -> Vec<f32> {
            (0..len)
                .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
                .collect()
        };
        let (x0, avg) = (random(&mut rng), random(&mut rng));
        for opt in all_kinds() {
            let run = |size: usize| {
                let (mut x, mut m, mut v) = (x0.clone(), vec![0.0; len], vec![0.0; len]);
                for t in 1..=3 {
                    for (((xb, ab), mb), vb) in x
                        .chunks_mut(size)
                        .zip(avg.chunks(size))
                        .zip(m.chunks_mut(size))
                        .zip(v.chunks_mut(size))
                    {
                        opt.step_block(t, xb, ab, mb, vb);
                    }
                }
                (x, m, v)
            };
            let whole = run(len);
            for size in 1..len {
                assert_eq!(run(size), whole, "{opt:?}");
            }
        }
    }

    /// Every number in a nested JSON array, depth first.
    pub(crate) fn flat(x: &serde_json::Value) -> Vec<f64> {
        match x {
            serde_json::Value::Array(items) => items.iter().flat_map(flat).collect(),
            other => vec![other.as_f64().unwrap()],
        }
    }

    fn all_kinds() -> [ServerOptimizer; 5] {
        [
            ServerOptimizer::defaults_avgm(),
            ServerOptimizer::FedAvgM {
                server_learning_rate: 0.7,
                momentum: 0.9,
            },
            ServerOptimizer::defaults_adam(),
            ServerOptimizer::defaults_yogi(),
            ServerOptimizer::defaults_adagrad(),
        ]
    }

    #[test]
    fn unused_state_may_be_empty() {
        let avg = [0.5_f32, -1.0];
        for opt in all_kinds() {
            opt.validate().unwrap();
            let mut x = [0.0_f32, 0.0];
            let mut m = vec![0.0; if opt.uses_first_moment() { 2 } else { 0 }];
            let mut v = vec![0.0; if opt.uses_second_moment() { 2 } else { 0 }];
            opt.step_block(1, &mut x, &avg, &mut m, &mut v);
            // Every optimiser moves towards the average on its first step.
            assert!(x[0] > 0.0 && x[1] < 0.0, "{opt:?}: {x:?}");
        }
    }

    /// FedAvgM by hand, as Flower's `fedavgm.py`: the pseudo-gradient `x - avg`, the momentum
    /// buffer started at the first gradient then `momentum * buf + grad`, and `x -= lr * buf`.
    /// With the defaults (lr 1, no momentum) the result is the average itself.
    #[test]
    fn fedavgm_follows_flower() {
        let mut x = [1.0_f32];
        let (mut m, mut v) = ([0.0_f32], [0.0_f32; 0]);
        let opt = ServerOptimizer::FedAvgM {
            server_learning_rate: 0.5,
            momentum: 0.9,
        };
        opt.step_block(1, &mut x, &[0.0], &mut m, &mut v);
        // grad 1, buf 1, x = 1 - 0.5.
        assert_eq!((x, m), ([0.5], [1.0]));
        opt.step_block(2, &mut x, &[0.0], &mut m, &mut v);
        // grad 0.5, buf 0.9 + 0.5 = 1.4, x = 0.5 - 0.7.
        assert!(
            (x[0] + 0.2).abs() < 1e-6 && (m[0] - 1.4).abs() < 1e-6,
            "{x:?} {m:?}"
        );
        let mut x = [0.3_f32, -7.25];
        ServerOptimizer::defaults_avgm().step_block(1, &mut x, &[0.1, 2.5], &mut [], &mut []);
        assert_eq!(x, [0.1, 2.5]);
    }

    /// FedYogi and FedAdagrad by hand (`fedyogi.py`, `fedadagrad.py`): no bias correction; Yogi's
    /// `v -= (1 - beta_2) * d^2 * sign(v - d^2)`, Adagrad's `v += d^2` with `m = d`.
    #[test]
    fn fedyogi_and_fedadagrad_follow_flower() {
        let (eta, b1, b2, tau) = (0.01, 0.9, 0.99, 1e-3);
        let opt = ServerOptimizer::FedYogi {
            eta,
            beta_1: b1,
            beta_2: b2,
            tau,
        };
        let (mut x, mut m, mut v) = ([0.0_f32], [0.0_f32], [0.0_f32]);
        let (mut ex, mut em, mut ev) = (0.0_f64, 0.0_f64, 0.0_f64);
        for (t, avg) in [(1, 1.0_f64), (2, 0.5), (3, 3.0), (4, 0.0)] {
            let d = avg - ex;
            em = b1 * em + (1.0 - b1) * d;
            ev -= (1.0 - b2) * d * d * sign(ev - d * d);
            ex += eta * em / (ev.sqrt() + tau);
            opt.step_block(t, &mut x, &[avg as f32], &mut m, &mut v);
            assert!((f64::from(x[0]) - ex).abs() <= 1e-6, "yogi x {x:?} vs {ex}");
            assert!(
                (f64::from(v[0]) - ev).abs() <= 1e-6 * ev.max(1e-3),
                "yogi v"
            );
        }
        let opt = ServerOptimizer::defaults_adagrad();
        let (mut x, mut v) = ([0.0_f32], [0.0_f32]);
        let (mut ex, mut ev) = (0.0_f64, 0.0_f64);
        for (t, avg) in [(1, 1.0_f64), (2, 0.5), (3, -2.0)] {
            let d = avg - ex;
            ev += d * d;
            ex += 0.1 * d / (ev.sqrt() + 1e-9);
            opt.step_block(t, &mut x, &[avg as f32], &mut [], &mut v);
            assert!(
                (f64::from(x[0]) - ex).abs() <= 1e-6,
                "adagrad x {x:?} vs {ex}"
            );
        }
        // np.sign(0) is 0: a zero delta leaves Yogi's v alone.
        let (mut x, mut m, mut v) = ([2.0_f32], [0.0_f32], [0.25_f32]);
        ServerOptimizer::defaults_yogi().step_block(1, &mut x, &[2.0], &mut m, &mut v);
        assert_eq!(v, [0.25]);
    }

    #[test]
    fn validation_names_the_field() {
        let field = |o: ServerOptimizer| match o.validate() {
            Err(CoreError::Spec { field, .. }) => field,
            other => panic!("{o:?}: expected a spec error, got {other:?}"),
        };
        let adam = |eta, beta_1, beta_2, tau| ServerOptimizer::FedAdam {
            eta,
            beta_1,
            beta_2,
            tau,
        };
        assert_eq!(field(adam(0.0, 0.9, 0.99, 1e-9)), "strategy.eta");
        assert_eq!(field(adam(f64::INFINITY, 0.9, 0.99, 1e-9)), "strategy.eta");
        assert_eq!(field(adam(0.1, 1.0, 0.99, 1e-9)), "strategy.beta_1");
        assert_eq!(field(adam(0.1, 0.9, -0.1, 1e-9)), "strategy.beta_2");
        assert_eq!(field(adam(0.1, 0.9, 0.99, f64::NAN)), "strategy.tau");
        assert_eq!(
            field(ServerOptimizer::FedYogi {
                eta: 0.1,
                beta_1: 0.9,
                beta_2: 1.5,
                tau: 1e-3
            }),
            "strategy.beta_2"
        );
        assert_eq!(
            field(ServerOptimizer::FedAdagrad { eta: 0.1, tau: 0.0 }),
            "strategy.tau"
        );
        assert_eq!(
            field(ServerOptimizer::FedAvgM {
                server_learning_rate: -1.0,
                momentum: 0.9
            }),
            "strategy.server_learning_rate"
        );
        assert_eq!(
            field(ServerOptimizer::FedAvgM {
                server_learning_rate: 1.0,
                momentum: 1.0
            }),
            "strategy.momentum"
        );
    }
}
