//! The tensors that travel for a text classifier on a frozen pre-trained encoder (LoRA
//! adapters, the top layers or only a linear head), and their seeded initial values.
//!
//! Trainable tensors are named as the base checkpoint names its weights, so they can be merged
//! back into it: `encoder.layer.{i}.attention.self.query.lora_A.weight` (`[rank, in]`) and
//! `...lora_B.weight` (`[out, rank]`) for LoRA, the base's own names for `full`, and
//! `classifier.weight` (`[classes, hidden]`) and `classifier.bias` for the head.

use std::sync::Arc;

use medfl_core::selection::SplitMix64;
use medfl_core::spec::{Adaptation, EncoderSpec};
use medfl_core::{ModelParams, ModelSchema, NamedTensor, TensorSpec};

use crate::base::BaseModel;
use crate::bert::{lora_target_path, PROJECTIONS};
use crate::checkpoint::Checkpoint;
use crate::ModelError;

/// Name of the head's weight.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// Name of the head's bias.
pub const HEAD_BIAS: &str = "classifier.bias";

/// A classifier of `n_classes` on a base encoder, adapted as an [`EncoderSpec`] says.
#[derive(Debug, Clone)]
pub struct EncoderClassifier {
    base: Arc<BaseModel>,
    spec: EncoderSpec,
    n_classes: usize,
}

impl EncoderClassifier {
    /// A classifier on `base`; fails if the spec's adaptation does not fit the architecture.
    pub fn new(
        base: Arc<BaseModel>,
        spec: EncoderSpec,
        n_classes: usize,
    ) -> Result<Self, ModelError> {
        let layers = base.config.num_hidden_layers as u32;
        if let Adaptation::Full { last_layers } = spec.adaptation {
            if last_layers > layers {
                return Err(ModelError::Spec(format!(
                    "model.adaptation.last_layers is {last_layers}, but `{}` has {layers} layers",
                    base.name
                )));
            }
        }
        if spec.max_seq_len as usize > base.config.max_position_embeddings {
            return Err(ModelError::Spec(format!(
                "model.max_seq_len is {}, but `{}` has {} positions",
                spec.max_seq_len, base.name, base.config.max_position_embeddings
            )));
        }
        Ok(Self {
            base,
            spec,
            n_classes,
        })
    }

    /// The base model.
    pub fn base(&self) -> &Arc<BaseModel> {
        &self.base
    }

    /// How the encoder is adapted.
    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// `alpha / rank` for LoRA, else 0.
    pub fn lora_scale(&self) -> f64 {
        match &self.spec.adaptation {
            Adaptation::Lora { rank, alpha, .. } => alpha / f64::from(*rank),
            _ => 0.0,
        }
    }

    /// The projections LoRA adapts, as `encoder.layer.{i}.{path}`, in layer order.
    pub fn lora_projections(&self) -> Vec<String> {
        let Adaptation::Lora { target_modules, .. } = &self.spec.adaptation else {
            return Vec::new();
        };
        let paths: Vec<&str> = PROJECTIONS
            .into_iter()
            .filter(|p| {
                target_modules
                    .iter()
                    .any(|t| lora_target_path(t) == Some(*p))
            })
            .collect();
        (0..self.base.config.num_hidden_layers)
            .flat_map(|i| paths.iter().map(move |p| format!("encoder.layer.{i}.{p}")))
            .collect()
    }

    /// The base tensors `full` trains: the last `last_layers` layers, or everything.
    pub fn full_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let Adaptation::Full { last_layers } = self.spec.adaptation else {
            return Vec::new();
        };
        let c = &self.base.config;
        if last_layers == 0 {
            return c.encoder_tensors();
        }
        (c.num_hidden_layers - last_layers as usize..c.num_hidden_layers)
            .flat_map(|i| c.layer_tensors(i))
            .collect()
    }

    /// Names and shapes of the tensors that train and travel.
    pub fn schema(&self) -> ModelSchema {
        let c = &self.base.config;
        let mut specs = Vec::new();
        match &self.spec.adaptation {
            Adaptation::Lora { rank, .. } => {
                let rank = *rank as usize;
                for name in self.lora_projections() {
                    let path = name.splitn(4, '.').nth(3).unwrap_or_default();
                    let [out, inp] = c.projection_shape(path).unwrap_or([0, 0]);
                    specs.push(TensorSpec {
                        name: format!("{name}.lora_A.weight"),
                        shape: vec![rank, inp],
                    });
                    specs.push(TensorSpec {
                        name: format!("{name}.lora_B.weight"),
                        shape: vec![out, rank],
                    });
                }
            }
            Adaptation::Head => {}
            Adaptation::Full { .. } => {
                specs.extend(
                    self.full_tensors()
                        .into_iter()
                        .map(|(name, shape)| TensorSpec { name, shape }),
                );
            }
        }
        specs.push(TensorSpec {
            name: HEAD_WEIGHT.into(),
            shape: vec![self.n_classes, c.hidden_size],
        });
        specs.push(TensorSpec {
            name: HEAD_BIAS.into(),
            shape: vec![self.n_classes],
        });
        // Names are unique by construction.
        ModelSchema::new(specs).unwrap_or_default()
    }

    /// LoRA `A` Kaiming-uniform (PEFT's `a = sqrt(5)`: U(±1/sqrt(in))), `B` zero, so training
    /// starts from the base exactly; the head as `nn.Linear`; `full` from the base's weights
    /// (read and checked against the pin again, widened to f32). Random tensors are drawn in
    /// name order, the same for the same seed.
    pub fn init(&self, seed: u64) -> Result<ModelParams, ModelError> {
        let mut rng = SplitMix64::new(seed);
        let weights = match self.spec.adaptation {
            Adaptation::Full { .. } => Some(self.base.read_weights()?),
            _ => None,
        };
        let path = self.base.weights_path();
        let checkpoint = match &weights {
            Some(bytes) => {
                let checkpoint = Checkpoint::parse(bytes, &path)?;
                checkpoint.check(&self.base.config)?;
                Some(checkpoint)
            }
            None => None,
        };
        let hidden = self.base.config.hidden_size as f64;
        let tensors = self
            .schema()
            .tensors
            .into_iter()
            .map(|spec| {
                let n = spec.numel();
                let data = if spec.name.ends_with(".lora_A.weight") {
                    uniform(&mut rng, n, 1.0 / (spec.shape[1] as f64).sqrt())
                } else if spec.name.ends_with(".lora_B.weight") {
                    vec![0.0; n]
                } else if spec.name == HEAD_WEIGHT || spec.name == HEAD_BIAS {
                    uniform(&mut rng, n, 1.0 / hidden.sqrt())
                } else {
                    checkpoint
                        .as_ref()
                        .ok_or_else(|| {
                            ModelError::Weights(format!("base has no tensor `{}`", spec.name))
                        })?
                        .f32(&spec.name, &spec.shape)?
                };
                Ok(NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    data,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(ModelParams::new(tensors)?)
    }
}

/// `n` draws from U(-bound, bound), computed in f64 and rounded to f32.
fn uniform(rng: &mut SplitMix64, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::write_base;
    use medfl_core::spec::Pooling;

    /// A classifier on the tiny BERT, written to `dir`.
    fn classifier(
        dir: &std::path::Path,
        adaptation: Adaptation,
        max_seq_len: u32,
    ) -> Result<EncoderClassifier, ModelError> {
        let sha = write_base(dir, 0.0);
        let base = Arc::new(BaseModel::open("tiny", dir, &sha).unwrap());
        let spec = EncoderSpec {
            base: "tiny".into(),
            base_sha256: sha,
            pooling: Pooling::Mean,
            max_seq_len,
            adaptation,
        };
        EncoderClassifier::new(base, spec, 3)
    }

    #[test]
    fn lora_starts_at_the_base_and_the_head_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = classifier(
            dir.path(),
            Adaptation::Lora {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec!["value".into(), "intermediate".into()],
            },
            8,
        )
        .unwrap();
        assert_eq!(c.lora_scale(), 2.0);
        assert_eq!(
            c.lora_projections(),
            [
                "encoder.layer.0.attention.self.value",
                "encoder.layer.0.intermediate.dense",
                "encoder.layer.1.attention.self.value",
                "encoder.layer.1.intermediate.dense",
            ]
        );
        let p = c.init(5).unwrap();
        assert_eq!(p.schema(), c.schema());
        assert_eq!(p.tensors.len(), 2 * 4 + 2);
        let t = |name: &str| p.get(name).unwrap();
        assert_eq!(
            t("encoder.layer.1.intermediate.dense.lora_A.weight").shape,
            [2, 8]
        );
        assert_eq!(
            t("encoder.layer.1.intermediate.dense.lora_B.weight").shape,
            [16, 2]
        );
        assert!(t("encoder.layer.0.attention.self.value.lora_B.weight")
            .data
            .iter()
            .all(|v| *v == 0.0));
        let bound = 1.0 / 8f32.sqrt();
        assert!(t(HEAD_WEIGHT).data.iter().all(|v| v.abs() <= bound));
        assert_eq!(t(HEAD_WEIGHT).shape, [3, 8]);
        assert_ne!(p, c.init(6).unwrap());
    }

    #[test]
    fn full_fine_tuning_starts_from_the_base_weights() {
        let dir = tempfile::tempdir().unwrap();
        let c = classifier(dir.path(), Adaptation::Full { last_layers: 1 }, 8).unwrap();
        let p = c.init(1).unwrap();
        assert_eq!(p.tensors.len(), 16 + 2);
        assert!(p.get("encoder.layer.0.output.dense.weight").is_none());
        let want = crate::testing::tiny_tensors(&c.base().config);
        let name = "encoder.layer.1.output.LayerNorm.bias";
        assert_eq!(p.get(name).unwrap().data, want[name]);
        let all = classifier(dir.path(), Adaptation::Full { last_layers: 0 }, 8).unwrap();
        assert_eq!(all.schema().tensors.len(), 5 + 2 * 16 + 2);
        assert_eq!(all.init(1).unwrap().get(name), p.get(name));
        let head = classifier(dir.path(), Adaptation::Head, 8).unwrap();
        assert_eq!(head.schema().tensors.len(), 2);
    }

    #[test]
    fn specs_that_do_not_fit_the_base_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = classifier(dir.path(), Adaptation::Full { last_layers: 3 }, 8).unwrap_err();
        assert!(
            matches!(&err, ModelError::Spec(m) if m.contains("last_layers is 3")),
            "{err}"
        );
        let err = classifier(dir.path(), Adaptation::Head, 13).unwrap_err();
        assert!(
            matches!(&err, ModelError::Spec(m) if m.contains("12 positions")),
            "{err}"
        );
    }
}
