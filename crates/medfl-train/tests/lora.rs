//! The text classifier on a tiny random BERT: LoRA starts exactly at the base, merging gives
//! the adapter's outputs, only trainable tensors travel, and each adaptation learns.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use medfl_core::spec::{Adaptation, EncoderSpec, Optimizer, Pooling};
use medfl_core::ModelParams;
use medfl_train::export::{adapter_bytes, merge_into_base, read_adapter};
use medfl_train::testing::write_tiny_bert;
use medfl_train::{
    BaseModels, Data, LocalModel, TextClassifier, TextExamples, TrainError, TrainOptions,
};

fn lora() -> Adaptation {
    Adaptation::Lora {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["query".into(), "value".into()],
    }
}

fn spec(sha: &str, adaptation: Adaptation) -> EncoderSpec {
    EncoderSpec {
        base: "tiny".into(),
        base_sha256: sha.into(),
        pooling: Pooling::Mean,
        max_seq_len: 24,
        adaptation,
    }
}

fn classifier(dir: &Path, adaptation: Adaptation) -> TextClassifier {
    let bases = BaseModels::new(BTreeMap::from([("tiny".into(), dir.to_path_buf())]), None);
    let sha = bases.weights_sha256(dir).unwrap();
    let base = bases.resolve("tiny", &sha).unwrap();
    TextClassifier::new(base, spec(&sha, adaptation), 3).unwrap()
}

/// Three "specialties", told apart by their words (of disjoint letters, which the tiny
/// model's letter vocabulary can see).
fn texts(n: usize) -> TextExamples {
    let words = [
        ["abcd", "bead", "cab", "dace"],
        ["fig", "jig", "high", "gif"],
        ["knoll", "moon", "look", "noon"],
    ];
    let mut out = TextExamples::default();
    for i in 0..n {
        let class = i % 3;
        let w = &words[class];
        out.texts
            .push(format!("{} of the {} {}", w[i % 4], w[(i / 3) % 4], i % 7));
        out.labels.push(class as u32);
    }
    out
}

fn opts(steps: u32) -> TrainOptions {
    TrainOptions {
        epochs: 1,
        steps,
        batch_size: 16,
        learning_rate: 3e-2,
        optimizer: Optimizer::Adamw,
        weight_decay: 0.0,
        proximal_mu: 0.0,
        seed: 7,
        record_dp: None,
    }
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `params` with every tensor named `name*` replaced by `value(i)`.
fn with(params: &ModelParams, suffix: &str, value: impl Fn(usize) -> f32) -> ModelParams {
    let mut p = params.clone();
    for t in &mut p.tensors {
        if t.name.ends_with(suffix) {
            t.data = (0..t.data.len()).map(&value).collect();
        }
    }
    p
}

#[test]
fn lora_starts_at_the_base_and_merges_exactly() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let lora_model = classifier(dir.path(), lora());
    let head_model = classifier(dir.path(), Adaptation::Head);
    let init = lora_model.init(3).unwrap();
    assert!(init
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("lora_B.weight"))
        .all(|t| t.data.iter().all(|&v| v == 0.0)));
    let head_only = ModelParams::new(
        init.tensors
            .iter()
            .filter(|t| t.name.starts_with("classifier."))
            .cloned()
            .collect(),
    )
    .unwrap();
    let sample = texts(12);
    let refs: Vec<&str> = sample.texts.iter().map(String::as_str).collect();
    let with_adapter = lora_model.logits(&init, &refs).unwrap();
    let base_only = head_model.logits(&head_only, &refs).unwrap();
    assert_eq!(
        max_abs_diff(&with_adapter, &base_only),
        0.0,
        "B = 0 must change nothing"
    );

    // A non-zero B changes the outputs; merging it into the base gives the same outputs.
    let trained = with(&init, "lora_B.weight", |i| ((i as f32) * 0.37).sin() * 0.2);
    let adapted = lora_model.logits(&trained, &refs).unwrap();
    assert!(max_abs_diff(&adapted, &base_only) > 1e-3);
    let merged_dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.path().join(f), merged_dir.path().join(f)).unwrap();
    }
    let report = merge_into_base(
        &dir.path().join("model.safetensors"),
        &trained,
        lora_model.lora_scale(),
        &merged_dir.path().join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(report.lora_merged, 4, "query and value of 2 layers");
    assert_eq!(report.left_out, ["classifier.bias", "classifier.weight"]);
    let merged = classifier(merged_dir.path(), Adaptation::Head)
        .logits(&head_only, &refs)
        .unwrap();
    let diff = max_abs_diff(&merged, &adapted);
    assert!(diff < 1e-5, "merged vs adapter: {diff}");

    // The merged file keeps the base's names, shapes and dtypes.
    let names = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec(), t.dtype()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(
        names(&dir.path().join("model.safetensors")),
        names(&merged_dir.path().join("model.safetensors"))
    );
}

#[test]
fn only_trainable_tensors_travel_and_every_adaptation_learns() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let train = Data::Text(texts(48));
    for (adaptation, suffixes) in [
        (lora(), vec!["lora_A.weight", "lora_B.weight"]),
        (Adaptation::Head, vec![]),
        (Adaptation::Full { last_layers: 1 }, vec![""]),
    ] {
        let model = classifier(dir.path(), adaptation.clone());
        let start = model.init(1).unwrap();
        for t in &start.tensors {
            let ok = t.name.starts_with("classifier.")
                || suffixes.iter().any(|s| t.name.ends_with(s))
                    && (suffixes != [""] || t.name.starts_with("encoder.layer.1."));
            assert!(ok, "{adaptation:?}: `{}` should not travel", t.name);
        }
        let before = model.evaluate(&start, &train).unwrap().metrics["loss"];
        let report = model
            .train(
                &start,
                &train,
                &opts(80),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(report.params.schema(), start.schema());
        let after = model.evaluate(&report.params, &train).unwrap();
        assert!(
            after.metrics["loss"] < before * 0.8,
            "{adaptation:?}: loss {before} -> {}",
            after.metrics["loss"]
        );
        assert!(after.metrics["accuracy"] > 0.6, "{adaptation:?}: {after:?}");
        assert!(after.metrics.contains_key("macro_f1"));
        // The same seed trains the same way (a retried round is reproducible).
        let again = model
            .train(
                &start,
                &train,
                &opts(80),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(again.params, report.params);
    }
}

#[test]
fn dropout_is_seeded_and_cancel_stops_training() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let model = classifier(
        dir.path(),
        Adaptation::Lora {
            rank: 2,
            alpha: 4.0,
            dropout: 0.3,
            target_modules: vec!["intermediate".into()],
        },
    );
    let start = model.init(2).unwrap();
    assert_eq!(start.tensors.len(), 2 * 2 + 2);
    let data = Data::Text(texts(24));
    let run = |cancel: bool| {
        model.train(
            &start,
            &data,
            &opts(6),
            &AtomicBool::new(cancel),
            &mut |_| {},
        )
    };
    assert_eq!(run(false).unwrap().params, run(false).unwrap().params);
    assert!(matches!(run(true), Err(TrainError::Cancelled)));
}

#[test]
fn adapter_files_carry_their_spec() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let params = classifier(dir.path(), lora()).init(5).unwrap();
    let path = dir.path().join("adapter.safetensors");
    std::fs::write(&path, adapter_bytes(&params, "name = \"x\"").unwrap()).unwrap();
    let (back, spec) = read_adapter(&path).unwrap();
    assert_eq!(back, params);
    assert_eq!(spec.as_deref(), Some("name = \"x\""));
}

#[test]
fn a_base_with_other_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sha = write_tiny_bert(dir.path(), 0.0).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_sha = write_tiny_bert(other.path(), 1.0).unwrap();
    assert_ne!(sha, other_sha);
    let bases = BaseModels::new(
        BTreeMap::from([("tiny".into(), dir.path().to_path_buf())]),
        None,
    );
    let err = bases.resolve("tiny", &other_sha).unwrap_err().to_string();
    assert!(err.contains(&sha) && err.contains(&other_sha), "{err}");
    assert!(err.contains("refusing"), "{err}");
    let err = bases.resolve("absent", &sha).unwrap_err().to_string();
    assert!(err.contains("no base model `absent`"), "{err}");
    // A model fetched by hash is found under its hash.
    let fetched = tempfile::tempdir().unwrap();
    write_tiny_bert(&fetched.path().join(&other_sha), 1.0).unwrap();
    let bases = BaseModels::new(BTreeMap::new(), Some(fetched.path().to_path_buf()));
    let base: Arc<_> = bases.resolve("tiny", &other_sha).unwrap();
    assert_eq!(base.sha256, other_sha);
}

/// Independent trainings averaged in [`record_level_dp_sgd_trains_lora_and_head`]: the noise
/// and the Poisson samples come from the operating system, so one run's final loss varies
/// widely (LoRA ends at 0.2 to 0.95 of its starting loss); the mean of five varies little.
const DP_TRIALS: usize = 5;

#[test]
fn record_level_dp_sgd_trains_lora_and_head() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let train = Data::Text(texts(48));
    for adaptation in [lora(), Adaptation::Head] {
        let model = classifier(dir.path(), adaptation.clone());
        let start = model.init(1).unwrap();
        let before = model.evaluate(&start, &train).unwrap().metrics["loss"];
        let mut o = opts(200);
        // A smaller step than without DP: AdamW's per-coordinate scaling amplifies the noise.
        o.learning_rate = 1e-2;
        o.record_dp = Some(medfl_train::private::RecordDp {
            noise_multiplier: 0.1,
            max_grad_norm: 1.0,
        });
        let mut ratios = Vec::new();
        for _ in 0..DP_TRIALS {
            let report = model
                .train(&start, &train, &o, &AtomicBool::new(false), &mut |_| {})
                .unwrap();
            let private = report.private.expect("DP-SGD ran");
            assert_eq!(private.fitted.steps, u64::from(o.steps));
            assert!((private.sample_rate - 16.0 / 48.0).abs() < 1e-12);
            assert!(private.rows_sampled > 1000, "{private:?}");
            let after = model.evaluate(&report.params, &train).unwrap().metrics["loss"];
            ratios.push(after / before);
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        // Clipped and noised, it learns more slowly than without (0.8 in 80 steps there); the
        // head ends at 0.75 to 0.8 of the starting loss, LoRA at 0.55 on average.
        assert!(
            mean < 0.85,
            "{adaptation:?}: final over starting loss {ratios:?}, mean {mean}"
        );
    }
}

#[test]
fn vectorised_per_example_gradients_match_one_backward_pass_per_text() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), 0.0).unwrap();
    let data = texts(24);
    // Texts of different lengths in one sample: the shorter ones are padded.
    let rows: Vec<usize> = vec![0, 5, 7, 11, 12, 18, 23, 2];
    for adaptation in [lora(), Adaptation::Head] {
        let model = classifier(dir.path(), adaptation.clone());
        // B away from zero, so that A's gradient is not zero either. The texts' gradient norms
        // lie between 4 and 7: every norm tried clips all, some or none of them.
        let start = with(&model.init(1).unwrap(), "lora_B.weight", |i| {
            ((i as f32) * 0.37).sin() * 0.2
        });
        let mut partly_clipped = false;
        for max_norm in [1e-3, 1.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1e6] {
            let want = model
                .clipped_gradients(&start, &data, &rows, max_norm, false)
                .unwrap();
            let got = model
                .clipped_gradients(&start, &data, &rows, max_norm, true)
                .unwrap();
            assert_eq!(got.clipped, want.clipped, "{adaptation:?} C = {max_norm}");
            partly_clipped |= want.clipped > 0 && want.clipped < rows.len();
            assert!(
                (got.loss_sum - want.loss_sum).abs() < 1e-5 * want.loss_sum.abs(),
                "{adaptation:?}: loss {} against {}",
                got.loss_sum,
                want.loss_sum
            );
            assert_eq!(got.grads.len(), start.tensors.len());
            for ((g, w), t) in got.grads.iter().zip(&want.grads).zip(&start.tensors) {
                let scale = max_abs_diff(w, &w.zeros_like().unwrap()).max(1e-3);
                let diff = max_abs_diff(g, w);
                assert!(
                    diff <= 1e-5 * scale,
                    "{adaptation:?} C = {max_norm}, {}: off by {diff} (largest {scale})",
                    t.name
                );
            }
        }
        assert!(
            partly_clipped,
            "{adaptation:?}: no norm clips some texts only"
        );
    }
}
