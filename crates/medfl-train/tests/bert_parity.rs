//! The BERT encoder and tokenizer: parity with PyTorch/transformers on all-MiniLM-L6-v2 (when the
//! shared model is present), and a tiny random BERT written by the test (always).
//!
//! The reference (`shared/vectors/minilm_reference.json`) was made with transformers'
//! `BertModel` and `AutoTokenizer` on the same files, in essence:
//!
//! ```python
//! tok = AutoTokenizer.from_pretrained(d); model = BertModel.from_pretrained(d).eval()
//! enc = tok(text, return_tensors="pt")                      # unpadded, untruncated
//! h = model(**enc).last_hidden_state                        # [1, T, 384]
//! m = enc.attention_mask.unsqueeze(-1).float()
//! pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
//! normed = torch.nn.functional.normalize(pooled, p=2, dim=1)
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use medfl_train::bert::{cls_pool, l2_normalize, mean_pool, BertConfig, BertModel};
use medfl_train::testing::{tiny_config, tiny_tensors};
use medfl_train::tokenize::TextTokenizer;
use serde_json::Value;

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(rel)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

fn row(t: &Tensor, i: usize) -> Vec<f32> {
    t.i(i).and_then(|r| r.to_vec1()).expect("a row of floats")
}

/// The first 8 values of the hidden state of row `b` at position `pos`.
fn first8(hidden: &Tensor, b: usize, pos: usize) -> Vec<f32> {
    hidden
        .i((b, pos, ..8))
        .and_then(|t| t.to_vec1())
        .expect("a hidden-state sample")
}

#[test]
fn minilm_matches_transformers() {
    let dir = shared("models/all-MiniLM-L6-v2");
    let reference = shared("vectors/minilm_reference.json");
    if !dir.join("model.safetensors").exists() || !reference.exists() {
        // CI sets MEDFL_REQUIRE_ASSETS=1: there a missing model fails the test.
        let required = std::env::var("MEDFL_REQUIRE_ASSETS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MEDFL_REQUIRE_ASSETS=1 but {} or {} is absent",
            dir.display(),
            reference.display()
        );
        eprintln!(
            "skipping MiniLM parity: {} or {} is absent",
            dir.display(),
            reference.display()
        );
        return;
    }
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let dev = Device::Cpu;
    let tokenizer = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let model = BertModel::load(&dir, &dev).unwrap();

    let (mut d_hidden, mut d_pooled, mut d_normed, mut d_sum) = (0f32, 0f32, 0f32, 0f64);
    let mut unpadded = Vec::new();
    for s in reference["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let batch = tokenizer.encode_batch(&[text], 512).unwrap();
        assert_eq!(batch.input_ids[0], ids(&s["input_ids"]), "ids of {text:?}");
        assert_eq!(batch.attention_mask[0], ids(&s["attention_mask"]));
        assert_eq!(batch.token_type_ids[0], ids(&s["token_type_ids"]));

        let mask = batch.attention_mask_tensor(&dev).unwrap();
        let hidden = model
            .forward(&batch.input_ids_tensor(&dev).unwrap(), &mask)
            .unwrap();
        let last = batch.seq_len() - 1;
        d_hidden = d_hidden
            .max(max_abs_diff(
                &first8(&hidden, 0, 0),
                &floats(&s["last_hidden_state_cls_first8"]),
            ))
            .max(max_abs_diff(
                &first8(&hidden, 0, last),
                &floats(&s["last_hidden_state_last_pos_first8"]),
            ));
        let sum = f64::from(hidden.sum_all().unwrap().to_scalar::<f32>().unwrap());
        d_sum = d_sum.max((sum - s["last_hidden_state_sum_all"].as_f64().unwrap()).abs());
        let pooled = mean_pool(&hidden, &mask).unwrap();
        let normed = l2_normalize(&pooled).unwrap();
        d_pooled = d_pooled.max(max_abs_diff(&row(&pooled, 0), &floats(&s["mean_pooled"])));
        d_normed = d_normed.max(max_abs_diff(
            &row(&normed, 0),
            &floats(&s["mean_pooled_l2_normalized"]),
        ));
        assert_eq!(
            row(&cls_pool(&hidden).unwrap(), 0)[..8],
            first8(&hidden, 0, 0)
        );
        unpadded.push(row(&pooled, 0));
    }
    eprintln!(
        "MiniLM max |diff|: ids 0, hidden samples {d_hidden:e}, mean-pooled {d_pooled:e}, \
         normalised {d_normed:e}, hidden sum {d_sum:e}"
    );
    assert!(d_hidden < 1e-4, "hidden states differ by {d_hidden}");
    assert!(
        d_pooled < 1e-4,
        "mean-pooled embeddings differ by {d_pooled}"
    );
    assert!(
        d_normed < 1e-4,
        "normalised embeddings differ by {d_normed}"
    );

    // The padded batch: same ids and mask as transformers, same pooled vectors as unpadded.
    let padded = &reference["padded_batch"];
    let rows = padded["rows"].as_array().unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let batch = tokenizer.encode_batch(&texts, 512).unwrap();
    assert_eq!(
        batch.seq_len() as u64,
        padded["padded_len"].as_u64().unwrap()
    );
    let mask = batch.attention_mask_tensor(&dev).unwrap();
    let hidden = model
        .forward(&batch.input_ids_tensor(&dev).unwrap(), &mask)
        .unwrap();
    let pooled = mean_pool(&hidden, &mask).unwrap();
    let normed = l2_normalize(&pooled).unwrap();
    let (mut d_vs_unpadded, mut d_vs_ref, mut d_hidden) = (0f32, 0f32, 0f32);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(batch.input_ids[i], ids(&r["input_ids_padded"]), "row {i}");
        assert_eq!(
            batch.attention_mask[i],
            ids(&r["attention_mask"]),
            "row {i}"
        );
        let n = usize::try_from(r["n_real_tokens"].as_u64().unwrap()).unwrap();
        d_hidden = d_hidden
            .max(max_abs_diff(
                &first8(&hidden, i, 0),
                &floats(&r["last_hidden_state_cls_first8"]),
            ))
            .max(max_abs_diff(
                &first8(&hidden, i, n - 1),
                &floats(&r["last_hidden_state_last_real_pos_first8"]),
            ));
        d_vs_unpadded = d_vs_unpadded.max(max_abs_diff(&row(&pooled, i), &unpadded[i]));
        d_vs_ref = d_vs_ref
            .max(max_abs_diff(&row(&pooled, i), &floats(&r["mean_pooled"])))
            .max(max_abs_diff(
                &row(&normed, i),
                &floats(&r["mean_pooled_l2_normalized"]),
            ));
    }
    eprintln!(
        "MiniLM padded batch max |diff|: pooled vs unpadded {d_vs_unpadded:e}, \
         vs reference {d_vs_ref:e}, hidden samples {d_hidden:e}"
    );
    assert!(
        d_vs_unpadded < 1e-4,
        "padding changes pooled vectors by {d_vs_unpadded}"
    );
    assert!(
        d_vs_ref < 1e-4,
        "padded batch differs from reference by {d_vs_ref}"
    );
    assert!(d_hidden < 1e-4, "padded hidden states differ by {d_hidden}");

    // Truncation keeps [CLS] … [SEP], as the tokenizer's own truncation would.
    let first = &reference["sentences"][0];
    let full = ids(&first["input_ids"]);
    let cut = tokenizer
        .encode_batch(&[first["text"].as_str().unwrap()], 8)
        .unwrap();
    let mut expected = full[..7].to_vec();
    expected.push(*full.last().unwrap());
    assert_eq!(cut.input_ids[0], expected);
}

fn write_model(dir: &Path, config: &BertConfig, tensors: &HashMap<String, Tensor>) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).expect("writing the model"),
    )
    .expect("writing the model");
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))
        .expect("writing the model");
}

fn tiny_model() -> (tempfile::TempDir, BertModel) {
    let dir = tempfile::tempdir().expect("loading the tiny model");
    let config = tiny_config();
    write_model(dir.path(), &config, &tiny_tensors(&config));
    let model = BertModel::load(dir.path(), &Device::Cpu).expect("loading the tiny model");
    (dir, model)
}

#[test]
fn tiny_model_runs_and_padding_does_not_leak() {
    let (_dir, model) = tiny_model();
    let dev = Device::Cpu;
    let short = [5u32, 17, 42, 9, 3];
    let long = [5u32, 58, 23, 61, 7, 14, 65, 3];
    let padded = [5u32, 17, 42, 9, 3, 0, 0, 0];
    let ids = Tensor::new(&[padded, long], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0, 0, 0], [1; 8]], &dev).unwrap();
    let hidden = model.forward(&ids, &mask).unwrap();
    assert_eq!(hidden.dims(), &[2, 8, 32]);
    let all: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
    assert!(all.iter().all(|x| x.is_finite()));

    let alone_ids = Tensor::new(&[short], &dev).unwrap();
    let alone_mask = Tensor::new(&[[1u32; 5]], &dev).unwrap();
    let alone = model.forward(&alone_ids, &alone_mask).unwrap();
    let pooled = mean_pool(&hidden, &mask).unwrap();
    let d = max_abs_diff(
        &row(&pooled, 0),
        &row(&mean_pool(&alone, &alone_mask).unwrap(), 0),
    );
    assert!(d < 1e-5, "padding changed the pooled vector by {d}");
    let real = hidden.get(0).unwrap().narrow(0, 0, 5).unwrap();
    let d = max_abs_diff(
        &real.flatten_all().unwrap().to_vec1().unwrap(),
        &alone.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(d < 1e-5, "padding changed real hidden states by {d}");
    // A row that is all padding stays finite.
    let none = Tensor::new(&[[0u32; 8]], &dev).unwrap();
    let h = model.forward(&ids.narrow(0, 0, 1).unwrap(), &none).unwrap();
    let h: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
    assert!(h.iter().all(|x| x.is_finite()));
    // Too long for the position table, or a mask that does not fit: errors, not panics.
    let too_long = Tensor::zeros((1, 65), DType::U32, &dev).unwrap();
    assert!(model.forward(&too_long, &too_long).is_err());
    assert!(model.forward(&ids, &alone_mask).is_err());
}

#[test]
fn bert_prefix_and_token_types_are_handled() {
    let config = tiny_config();
    let tensors = tiny_tensors(&config);
    let dev = Device::Cpu;
    let plain = BertModel::from_tensors(config.clone(), &tensors, &dev).unwrap();
    let prefixed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (format!("bert.{k}"), v.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &config, &prefixed);
    let loaded = BertModel::load(dir.path(), &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1]], &dev).unwrap();
    let a = plain.forward(&ids, &mask).unwrap();
    let b = loaded.forward(&ids, &mask).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let zeros = Tensor::zeros((1, 3), DType::U32, &dev).unwrap();
    let ones = Tensor::ones((1, 3), DType::U32, &dev).unwrap();
    let typed0 = plain
        .forward_with_token_types(&ids, Some(&zeros), &mask)
        .unwrap();
    let typed1 = plain
        .forward_with_token_types(&ids, Some(&ones), &mask)
        .unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_abs_diff(&flat(&typed0), &flat(&a)) < 1e-6);
    assert!(max_abs_diff(&flat(&typed1), &flat(&a)) > 1e-3);
}

#[test]
fn load_errors_name_the_problem() {
    let config = tiny_config();
    let tensors = tiny_tensors(&config);
    let dir = tempfile::tempdir().unwrap();

    let mut wrong = config.clone();
    wrong.model_type = "roberta".into();
    write_model(dir.path(), &wrong, &tensors);
    let err = BertModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("roberta"),
        "{err}"
    );

    let mut missing = tensors.clone();
    missing.remove("encoder.layer.1.attention.self.value.weight");
    write_model(dir.path(), &config, &missing);
    let err = BertModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("encoder.layer.1.attention.self.value.weight"),
        "{err}"
    );

    let mut bigger = config.clone();
    bigger.intermediate_size = 48;
    write_model(dir.path(), &bigger, &tensors);
    let err = BertModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.layer.0.intermediate.dense.weight") && err.contains("[48, 32]"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = BertModel::load(empty.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn every_projection_is_reachable_and_gradients_flow_through_the_encoder() {
    let config = tiny_config();
    let mut tensors = tiny_tensors(&config);
    let dev = Device::Cpu;
    // A trainable first-layer query: its gradient must pass through attention, GELU and both
    // layer norms of the layers above, as a LoRA adapter's will.
    let name = "encoder.layer.0.attention.self.query.weight";
    let var = Var::from_tensor(&tensors[name]).unwrap();
    tensors.insert(name.into(), var.as_tensor().clone());
    let mut model = BertModel::from_tensors(config, &tensors, &dev).unwrap();

    let names: Vec<String> = model
        .projections_mut()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 12);
    assert_eq!(names[0], "encoder.layer.0.attention.self.query");
    assert_eq!(names[11], "encoder.layer.1.output.dense");
    let (_, query) = model.projections_mut().swap_remove(0);
    assert_eq!(query.weight().id(), var.as_tensor().id());

    let ids = Tensor::new(&[[1u32, 2, 3, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 0]], &dev).unwrap();
    let hidden = model.forward(&ids, &mask).unwrap();
    let loss = l2_normalize(&mean_pool(&hidden, &mask).unwrap())
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("a gradient for the query weight");
    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|x| x.abs() > 1e-6));
}
