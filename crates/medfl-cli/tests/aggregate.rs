//! `medfl aggregate` on files: Flower's reference results, and clear errors for bad inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use medfl_core::safetensors::{decode, encode};
use medfl_core::{ModelParams, NamedTensor};

/// The five clients of `strategies_reference.json` (Flower 1.42), as the reference lays them out.
const CLIENTS: [([f32; 4], [f32; 2]); 5] = [
    ([1.0, 2.0, 3.0, 4.0], [0.5, -0.5]),
    ([1.1, 1.9, 3.2, 3.9], [0.4, -0.6]),
    ([0.9, 2.1, 2.8, 4.1], [0.6, -0.4]),
    ([1.05, 2.05, 3.1, 4.2], [0.55, -0.45]),
    ([10.0, -8.0, 30.0, -40.0], [5.0, 9.0]),
];

fn model(layer0: &[f32], layer1: &[f32]) -> ModelParams {
    ModelParams::new(vec![
        NamedTensor {
            name: "layer0".into(),
            shape: vec![2, 2],
            data: layer0.to_vec(),
        },
        NamedTensor {
            name: "layer1".into(),
            shape: vec![2],
            data: layer1.to_vec(),
        },
    ])
    .expect("model")
}

fn write_clients(dir: &Path) -> Vec<String> {
    CLIENTS
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            let path = dir.join(format!("client{i}.safetensors"));
            std::fs::write(&path, encode(&model(a, b))).expect("write");
            format!("{}:{}", path.display(), (i + 1) * 10)
        })
        .collect()
}

fn aggregate(args: &[&str], updates: &[String], out: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    cmd.arg("aggregate").args(args);
    for u in updates {
        cmd.arg("--update").arg(u);
    }
    cmd.arg("-o").arg(out);
    cmd.output().expect("run medfl aggregate")
}

fn read(path: &PathBuf) -> Vec<f32> {
    decode(&std::fs::read(path).expect("output"))
        .expect("safetensors")
        .tensors
        .iter()
        .flat_map(|t| t.data.clone())
        .collect()
}

fn close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn reproduces_flower_results_from_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let updates = write_clients(dir.path());
    let out = dir.path().join("out.safetensors");
    // Flower 1.42: aggregate(), aggregate_median(), aggregate_trimmed_mean(beta=0.2),
    // aggregate_krum(num_malicious=1, to_keep=0 / 3) on the same inputs.
    let cases: [(&[&str], [f64; 6]); 5] = [
        (
            &["--strategy", "fedavg"],
            [
                4.006666666666667,
                -1.3133333333333332,
                12.013333333333334,
                -10.606666666666667,
                2.02,
                2.6866666666666665,
            ],
        ),
        (
            &["--strategy", "median"],
            [1.05, 2.0, 3.1, 4.0, 0.55, -0.45],
        ),
        (
            &["--strategy", "trimmed_mean", "--param", "beta=0.2"],
            [
                1.05,
                1.9833333333333332,
                3.1,
                4.0,
                0.5499999999999999,
                -0.45,
            ],
        ),
        (
            &["--strategy", "krum", "--param", "f=1"],
            [1.0, 2.0, 3.0, 4.0, 0.5, -0.5],
        ),
        (
            &[
                "--strategy",
                "multi_krum",
                "--param",
                "f=1",
                "--param",
                "keep=3",
            ],
            [0.9875, 2.0625, 2.975, 4.1375, 0.5625, -0.4375],
        ),
    ];
    for (args, want) in cases {
        let result = aggregate(args, &updates, &out);
        assert!(
            result.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        // Tensors are stored by name: layer0 (4 values) then layer1 (2 values).
        close(&read(&out), &want);
    }
}

#[test]
fn refuses_mismatched_inputs_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut updates = write_clients(dir.path());
    let odd = dir.path().join("odd.safetensors");
    let reshaped = ModelParams::new(vec![
        NamedTensor {
            name: "layer0".into(),
            shape: vec![4],
            data: vec![1.0; 4],
        },
        NamedTensor {
            name: "layer1".into(),
            shape: vec![2],
            data: vec![1.0; 2],
        },
    ])
    .expect("model");
    std::fs::write(&odd, encode(&reshaped)).expect("write");
    updates.push(format!("{}:10", odd.display()));
    let out = dir.path().join("out.safetensors");
    let result = aggregate(&["--strategy", "median"], &updates, &out);
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("odd.safetensors") && err.contains("layer0"),
        "{err}"
    );

    let result = aggregate(
        &["--strategy", "krum", "--param", "f=3"],
        &updates[..4],
        &out,
    );
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("at least 6"));
    let result = aggregate(&["--strategy", "fedadam"], &updates[..2], &out);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("--global"));
}
