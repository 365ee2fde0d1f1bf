//! Schemas and initial weights of every model kind: [`medfl_model::RunModel`] (what the
//! coordinator uses, without candle) against the candle-based implementation medfl-train had
//! before the two were split, pasted below as `reference`, and against
//! [`medfl_train::model_for_run`]. Weights must agree bit for bit, including full fine-tuning's
//! base tensors stored as f16, bf16 or f64 and widened by candle's `to_dtype(F32)`.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use medfl_core::spec::RunSpec;
use medfl_core::{ModelParams, ModelSchema};
use medfl_model::RunModel;
use medfl_train::testing::write_tiny_bert;
use medfl_train::BaseModels;

/// The schema and init of medfl-train as of the split, verbatim but for the shape helpers of
/// `BertConfig`, which are written out here too.
mod reference {
    use candle_core::{DType, Tensor};
    use medfl_core::selection::SplitMix64;
    use medfl_core::spec::Adaptation;
    use medfl_core::{ModelParams, ModelSchema, NamedTensor, TensorSpec};
    use std::collections::HashMap;

    const PROJECTIONS: [&str; 6] = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ];

    fn lora_target_path(target: &str) -> Option<&'static str> {
        Some(match target {
            "query" => PROJECTIONS[0],
            "key" => PROJECTIONS[1],
            "value" => PROJECTIONS[2],
            "attention.output" => PROJECTIONS[3],
            "intermediate" => PROJECTIONS[4],
            "output" => PROJECTIONS[5],
            _ => return None,
        })
    }

    /// What the classifier reads of a BERT config.
    pub struct Config {
        pub vocab_size: usize,
        pub hidden_size: usize,
        pub num_hidden_layers: usize,
        pub intermediate_size: usize,
        pub max_position_embeddings: usize,
        pub type_vocab_size: usize,
    }

    impl Config {
        fn projection_shape(&self, path: &str) -> Option<[usize; 2]> {
            let (h, m) = (self.hidden_size, self.intermediate_size);
            Some(match path {
                p if p == PROJECTIONS[4] => [m, h],
                p if p == PROJECTIONS[5] => [h, m],
                p if PROJECTIONS.contains(&p) => [h, h],
                _ => return None,
            })
        }

        fn layer_tensors(&self, i: usize) -> Vec<(String, Vec<usize>)> {
            let h = self.hidden_size;
            let mut out = Vec::new();
            for path in PROJECTIONS {
                let [o, inp] = self.projection_shape(path).unwrap_or([h, h]);
                out.push((format!("encoder.layer.{i}.{path}.weight"), vec![o, inp]));
                out.push((format!("encoder.layer.{i}.{path}.bias"), vec![o]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                for part in ["weight", "bias"] {
                    out.push((format!("encoder.layer.{i}.{norm}.{part}"), vec![h]));
                }
            }
            out
        }

        fn embedding_tensors(&self) -> Vec<(String, Vec<usize>)> {
            let h = self.hidden_size;
            vec![
                (
                    "embeddings.word_embeddings.weight".into(),
                    vec![self.vocab_size, h],
                ),
                (
                    "embeddings.position_embeddings.weight".into(),
                    vec![self.max_position_embeddings, h],
                ),
                (
                    "embeddings.token_type_embeddings.weight".into(),
                    vec![self.type_vocab_size, h],
                ),
                ("embeddings.LayerNorm.weight".into(), vec![h]),
                ("embeddings.LayerNorm.bias".into(), vec![h]),
            ]
        }
    }

    /// `mlp.rs`: `Mlp::schema`.
    pub fn mlp_schema(dims: &[usize]) -> ModelSchema {
        let specs = (0..dims.len() - 1)
            .flat_map(|i| {
                [
                    TensorSpec {
                        name: format!("layers.{i}.weight"),
                        shape: vec![dims[i + 1], dims[i]],
                    },
                    TensorSpec {
                        name: format!("layers.{i}.bias"),
                        shape: vec![dims[i + 1]],
                    },
                ]
            })
            .collect();
        ModelSchema::new(specs).unwrap_or_default()
    }

    /// `mlp.rs`: `Mlp::init`.
    pub fn mlp_init(dims: &[usize], seed: u64) -> ModelParams {
        let mut rng = SplitMix64::new(seed);
        let tensors = mlp_schema(dims)
            .tensors
            .into_iter()
            .map(|spec| {
                let layer: usize = spec.name[7..spec.name.rfind('.').unwrap_or(7)]
                    .parse()
                    .unwrap_or(0);
                let bound = 1.0 / (dims[layer] as f64).sqrt();
                let data = (0..spec.numel())
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    data,
                }
            })
            .collect();
        ModelParams::new(tensors).unwrap()
    }

    /// `classifier.rs`: `TextClassifier::lora_projections`.
    fn lora_projections(c: &Config, adaptation: &Adaptation) -> Vec<String> {
        let Adaptation::Lora { target_modules, .. } = adaptation else {
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
        (0..c.num_hidden_layers)
            .flat_map(|i| paths.iter().map(move |p| format!("encoder.layer.{i}.{p}")))
            .collect()
    }

    /// `classifier.rs`: `TextClassifier::full_tensors`.
    fn full_tensors(c: &Config, adaptation: &Adaptation) -> Vec<(String, Vec<usize>)> {
        let Adaptation::Full { last_layers } = *adaptation else {
            return Vec::new();
        };
        let first = if last_layers == 0 {
            0
        } else {
            c.num_hidden_layers - last_layers as usize
        };
        let mut out = if last_layers == 0 {
            c.embedding_tensors()
        } else {
            Vec::new()
        };
        for i in first..c.num_hidden_layers {
            out.extend(c.layer_tensors(i));
        }
        out
    }

    /// `classifier.rs`: `TextClassifier::schema`.
    pub fn text_schema(c: &Config, adaptation: &Adaptation, n_classes: usize) -> ModelSchema {
        let mut specs = Vec::new();
        match adaptation {
            Adaptation::Lora { rank, .. } => {
                let rank = *rank as usize;
                for name in lora_projections(c, adaptation) {
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
                    full_tensors(c, adaptation)
                        .into_iter()
                        .map(|(name, shape)| TensorSpec { name, shape }),
                );
            }
        }
        specs.push(TensorSpec {
            name: "classifier.weight".into(),
            shape: vec![n_classes, c.hidden_size],
        });
        specs.push(TensorSpec {
            name: "classifier.bias".into(),
            shape: vec![n_classes],
        });
        ModelSchema::new(specs).unwrap_or_default()
    }

    fn uniform(rng: &mut SplitMix64, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    }

    /// `classifier.rs`: `TextClassifier::init`; `base` is the checkpoint as candle's
    /// `safetensors::load_buffer` reads it.
    pub fn text_init(
        c: &Config,
        adaptation: &Adaptation,
        n_classes: usize,
        base: &HashMap<String, Tensor>,
        seed: u64,
    ) -> ModelParams {
        let mut rng = SplitMix64::new(seed);
        let get = |name: &str| base.get(name).or_else(|| base.get(&format!("bert.{name}")));
        let hidden = c.hidden_size as f64;
        let tensors = text_schema(c, adaptation, n_classes)
            .tensors
            .into_iter()
            .map(|spec| {
                let n = spec.numel();
                let data = if spec.name.ends_with(".lora_A.weight") {
                    uniform(&mut rng, n, 1.0 / (spec.shape[1] as f64).sqrt())
                } else if spec.name.ends_with(".lora_B.weight") {
                    vec![0.0; n]
                } else if spec.name == "classifier.weight" || spec.name == "classifier.bias" {
                    uniform(&mut rng, n, 1.0 / hidden.sqrt())
                } else {
                    get(&spec.name)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                NamedTensor {
                    name: spec.name,
                    shape: spec.shape,
                    data,
                }
            })
            .collect();
        ModelParams::new(tensors).unwrap()
    }
}

/// SHA-256 of names, shapes and the bits of every value: equal only for identical weights.
fn digest(params: &ModelParams) -> String {
    let mut bytes = Vec::new();
    for t in &params.tensors {
        bytes.extend(t.name.as_bytes());
        bytes.push(0);
        for d in &t.shape {
            bytes.extend((*d as u64).to_le_bytes());
        }
        for v in &t.data {
            bytes.extend(v.to_bits().to_le_bytes());
        }
    }
    medfl_model::base::sha256_hex(&bytes)
}

/// Bit-for-bit equality, naming the first tensor that differs.
fn assert_identical(got: &ModelParams, want: &ModelParams, what: &str) {
    assert_eq!(got.schema(), want.schema(), "{what}: schemas differ");
    for (g, w) in got.tensors.iter().zip(&want.tensors) {
        let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&g.data) == bits(&w.data),
            "{what}: tensor `{}` differs",
            g.name
        );
    }
    assert_eq!(digest(got), digest(want), "{what}");
}

fn mlp_spec(features: usize, hidden: &[usize], labels: usize) -> RunSpec {
    let features: Vec<String> = (0..features).map(|i| format!("\"x{i}\"")).collect();
    let labels: Vec<String> = (0..labels).map(|i| format!("\"c{i}\"")).collect();
    let hidden: Vec<String> = hidden.iter().map(usize::to_string).collect();
    RunSpec::from_toml(&format!(
        "name = \"t\"\nrounds = 1\nmin_sites = 1\n\n[model]\nkind = \"mlp\"\nhidden = [{}]\n\n\
         [task]\ndataset = \"d\"\nfeatures = [{}]\nlabel = \"y\"\nlabels = [{}]\n",
        hidden.join(", "),
        features.join(", "),
        labels.join(", ")
    ))
    .unwrap()
}

fn text_spec(sha: &str, adaptation: &str) -> RunSpec {
    RunSpec::from_toml(&format!(
        "name = \"t\"\nrounds = 1\nmin_sites = 1\n\n[model]\nkind = \"bert\"\nbase = \"tiny\"\n\
         base_sha256 = \"{sha}\"\nmax_seq_len = 24\n\n[model.adaptation]\n{adaptation}\n\n\
         [task]\ndataset = \"d\"\ntext = \"text\"\nlabel = \"y\"\nlabels = [\"a\", \"b\", \"c\"]\n"
    ))
    .unwrap()
}

const SEEDS: [u64; 3] = [0, 7, u64::MAX];

/// Checks the schema and the init for every seed of [`medfl_model::RunModel`] and of
/// medfl-train's `model_for_run` against the reference; returns the digest of each seed's
/// weights.
fn check_run(
    spec: &RunSpec,
    bases: &BaseModels,
    want_schema: &ModelSchema,
    want: &dyn Fn(u64) -> ModelParams,
    seeds: &[u64],
) -> Vec<String> {
    let model = RunModel::for_run(spec, bases.registry()).unwrap();
    let trained = medfl_train::model_for_run(spec, bases).unwrap();
    assert_eq!(&model.schema(), want_schema, "{spec:?}");
    assert_eq!(&trained.schema(), want_schema, "{spec:?}");
    seeds
        .iter()
        .map(|&seed| {
            let want = want(seed);
            let what = format!("{:?}, seed {seed}", spec.model);
            assert_identical(&model.init(seed).unwrap(), &want, &what);
            assert_identical(&trained.init(seed).unwrap(), &want, &what);
            digest(&want)
        })
        .collect()
}

#[test]
fn mlp_and_logistic_regression_match_the_reference() {
    // Digests of medfl-train's own init before the split, for seeds 0, 7 and u64::MAX: they
    // pin the reference above too.
    let cases: [(usize, Vec<usize>, usize, [&str; 3]); 3] = [
        (
            4,
            vec![5, 3],
            3,
            [
                "d6d7135134c4d5fb25df36cd8f91b1fb2a4efbea077b3aadf83d8f0ff22f2306",
                "15627afaa249fc5f1188d65455fbb893730059a7301c9b1a9ca21aa5bbc05055",
                "94c973effc20dfb0425b032ebd12b05b0fb37c35b39125fa67ac05ca0a243c46",
            ],
        ),
        (
            6,
            vec![],
            2,
            [
                "e8b26c117f0cbbb2c98a14e19073a62e2a8d5f00ea850476563ee6e707c89166",
                "ed271e48baf743c22ccc29ff2714f3e33dca7c39176b1a20eae69efe5cb9ec4e",
                "dbd0f0dc4a13f20705b7c6aab2def17540cf6ca8409736a2b5bcd6b0156cba78",
            ],
        ),
        (
            3,
            vec![8],
            2,
            [
                "a5511eabd49441a3ec950516da045ed8a6ddfbe319acd4c2b1d1c67c17ff5671",
                "04d4a6981a282546d212c91c6e1da3e96e76f873d108b1d2732a75369ffab359",
                "3b12643c679436e1554878ac7ea0c72a14dbc358c14ff415d958d3d1f891861f",
            ],
        ),
    ];
    for (features, hidden, labels, pinned) in cases {
        let spec = mlp_spec(features, &hidden, labels);
        let mut dims = vec![features];
        dims.extend(&hidden);
        dims.push(labels);
        let digests = check_run(
            &spec,
            &BaseModels::none(),
            &reference::mlp_schema(&dims),
            &|seed| reference::mlp_init(&dims, seed),
            &SEEDS,
        );
        assert_eq!(digests, pinned, "{dims:?}");
    }
}

/// How a test stores the tiny BERT's weights.
#[derive(Debug, Clone, Copy)]
enum Storage {
    F32,
    F16,
    Bf16,
    F64,
    /// f32, every name prefixed with `bert.` as `BertForSequenceClassification` saves them.
    Prefixed,
}

/// Writes the tiny BERT to `dir` with weights stored as `storage`; returns their SHA-256.
fn write_base(dir: &Path, storage: Storage) -> String {
    write_tiny_bert(dir, 0.5).unwrap();
    let path = dir.join("model.safetensors");
    let tensors =
        candle_core::safetensors::load_buffer(&std::fs::read(&path).unwrap(), &Device::Cpu)
            .unwrap();
    let stored: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| match storage {
            Storage::F32 => (name, t),
            Storage::F16 => (name, t.to_dtype(DType::F16).unwrap()),
            Storage::Bf16 => (name, t.to_dtype(DType::BF16).unwrap()),
            Storage::F64 => (name, (t.to_dtype(DType::F64).unwrap() / 3.0).unwrap()),
            Storage::Prefixed => (format!("bert.{name}"), t),
        })
        .collect();
    candle_core::safetensors::save(&stored, &path).unwrap();
    medfl_train::base::sha256_file(&path).unwrap()
}

fn reference_config(dir: &Path) -> reference::Config {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    reference::Config {
        vocab_size: get("vocab_size"),
        hidden_size: get("hidden_size"),
        num_hidden_layers: get("num_hidden_layers"),
        intermediate_size: get("intermediate_size"),
        max_position_embeddings: get("max_position_embeddings"),
        type_vocab_size: get("type_vocab_size"),
    }
}

fn check_text(storage: Storage, adaptation: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let sha = write_base(dir.path(), storage);
    check_base(dir.path(), &sha, adaptation, &SEEDS)
}

/// [`check_run`] for the base model in `dir`, adapted as `adaptation` says.
fn check_base(dir: &Path, sha: &str, adaptation: &str, seeds: &[u64]) -> Vec<String> {
    let spec = text_spec(sha, adaptation);
    let encoder = spec.encoder().unwrap().clone();
    let bases = BaseModels::new(BTreeMap::from([("tiny".into(), dir.to_path_buf())]), None);
    let config = reference_config(dir);
    let checkpoint = candle_core::safetensors::load_buffer(
        &std::fs::read(dir.join("model.safetensors")).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let n = spec.task.labels.len();
    check_run(
        &spec,
        &bases,
        &reference::text_schema(&config, &encoder.adaptation, n),
        &|seed| reference::text_init(&config, &encoder.adaptation, n, &checkpoint, seed),
        seeds,
    )
}

#[test]
fn text_classifiers_match_the_reference_in_every_adaptation() {
    // As for the MLP: digests from before the split, for LoRA and the head (which do not
    // depend on the base's values, only on its shapes).
    let cases = [
        (
            "method = \"lora\"\nrank = 4\nalpha = 8.0\ntarget_modules = [\"query\", \"value\"]",
            Some([
                "823ac5020f94c28a8c18d8122ad9ad764e106f502f56de12a70d180a2db73eb9",
                "bcb537acf8a1ef3fd8b1b3dffe5f24b014805f8abd2bb854a7ba1ef123903e37",
                "c582601414fd427b46bd7729b47f1283b9477833e1339e84e9635ca7a6177204",
            ]),
        ),
        (
            "method = \"lora\"\nrank = 2\ntarget_modules = [\"query\", \"key\", \"value\", \
             \"attention.output\", \"intermediate\", \"output\"]",
            Some([
                "9457b05f9386d8d27715a46840bbff3ff83821399cdd0021b24c884e48a44dfc",
                "bf174f57dea607ebcaa5af21a426ec810deacf2de0c7e074272eccabaf6072d4",
                "6730790073b935ff8c235a4c73037f8cd39a6009b0132aee75784780ed814749",
            ]),
        ),
        (
            "method = \"head\"",
            Some([
                "1f41ffeb91e9b216248ec26aa0f1207a988897e4b91bbb8142374d700f270e7d",
                "77348df640a49e5c24d64e88eb91b21a46deea62dcccb75dfd735697cf029c88",
                "8e02950f9d37db2813f95f6e8bd81450332987f01a343ade57ac1e59f039b866",
            ]),
        ),
        ("method = \"full\"\nlast_layers = 1", None),
        ("method = \"full\"\nlast_layers = 0", None),
    ];
    for (adaptation, pinned) in cases {
        let digests = check_text(Storage::F32, adaptation);
        if let Some(pinned) = pinned {
            assert_eq!(digests, pinned, "{adaptation}");
        }
    }
}

#[test]
fn full_fine_tuning_widens_stored_weights_as_candle_does() {
    for storage in [Storage::F16, Storage::Bf16, Storage::F64, Storage::Prefixed] {
        for adaptation in [
            "method = \"full\"\nlast_layers = 0",
            "method = \"full\"\nlast_layers = 2",
        ] {
            check_text(storage, adaptation);
        }
    }
}

/// Full fine-tuning of the real all-MiniLM-L6-v2, when the shared model is present (CI sets
/// MEDFL_REQUIRE_ASSETS=1: there a missing model fails the test).
#[test]
fn minilm_full_fine_tuning_matches_the_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MEDFL_REQUIRE_ASSETS=1 but {} is absent",
            dir.display()
        );
        eprintln!("skipping MiniLM init parity: {} is absent", dir.display());
        return;
    }
    let sha = medfl_train::base::sha256_file(&dir.join("model.safetensors")).unwrap();
    check_base(&dir, &sha, "method = \"full\"\nlast_layers = 0", &[3]);
}
