//! `medfl privacy`: ε as Opacus computes it, the noise a target needs, and errors naming the
//! parameter out of range.

use std::path::Path;
use std::process::{Command, Output};

fn medfl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(args)
        .output()
        .expect("medfl runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn epsilon_matches_opacus_on_every_reference_row() {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../medfl-core/tests/vectors/rdp_subsampled_gaussian.csv"),
    )
    .expect("reference");
    for line in reference.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let out = medfl(&[
            "privacy",
            "epsilon",
            "--sample-rate",
            f[0],
            "--noise-multiplier",
            f[1],
            "--steps",
            f[2],
            "--delta",
            f[3],
            "--json",
        ]);
        let got = json(&out);
        let want: f64 = f[4].parse().expect("ε");
        let eps = got["epsilon"].as_f64().expect("epsilon");
        assert!((eps - want).abs() / want < 1e-9, "{line}: {got}");
        assert_eq!(got["best_order"].as_f64(), f[5].parse().ok(), "{line}");
    }
    // Text names the order too.
    let out = medfl(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "0.01",
        "--noise-multiplier",
        "1",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ε = 2.101365") && text.contains("order 7.8"),
        "{text}"
    );
}

/// `medfl privacy COMMAND FLAG VALUE --json` for q = 0.01, 1,000 steps and δ = 1e-5.
fn at_reference(command: &str, flag: &str, value: &str) -> serde_json::Value {
    json(&medfl(&[
        "privacy",
        command,
        flag,
        value,
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ]))
}

#[test]
fn noise_is_the_smallest_multiplier_that_meets_the_target() {
    let got = at_reference("noise", "--target-epsilon", "3");
    let z = got["noise_multiplier"].as_f64().expect("z");
    let eps = got["epsilon"].as_f64().expect("ε");
    assert!(eps <= 3.0 && eps > 2.99, "{got}");
    // Slightly less noise spends more than the target.
    let less = at_reference("epsilon", "--noise-multiplier", &format!("{}", z * 0.9999));
    assert!(less["epsilon"].as_f64().expect("ε") > 3.0, "{less}");
}

#[test]
fn parameters_out_of_range_are_refused_naming_them() {
    for (args, field) in [
        (
            ["--sample-rate", "0", "--noise-multiplier", "1"],
            "sample_rate",
        ),
        (
            ["--sample-rate", "1.5", "--noise-multiplier", "1"],
            "sample_rate",
        ),
        (
            ["--sample-rate", "0.1", "--noise-multiplier", "0"],
            "noise_multiplier",
        ),
        (
            ["--sample-rate", "0.1", "--noise-multiplier", "-2"],
            "noise_multiplier",
        ),
    ] {
        let mut all = vec!["privacy", "epsilon", "--steps", "10", "--delta", "1e-5"];
        all.extend(args);
        let out = medfl(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{args:?}: {err}");
    }
    let out = medfl(&[
        "privacy",
        "noise",
        "--target-epsilon",
        "0",
        "--sample-rate",
        "0.1",
        "--steps",
        "10",
        "--delta",
        "1e-5",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("target_epsilon"));
    let out = medfl(&[
        "privacy",
        "epsilon",
        "--sample-rate",
        "0.1",
        "--noise-multiplier",
        "1",
        "--steps",
        "10",
        "--delta",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("delta"));
}

#[test]
fn the_pld_accountant_matches_dp_accounting_and_needs_less_noise() {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../medfl-core/tests/vectors/pld_subsampled_gaussian.csv"),
    )
    .expect("reference");
    // The rows with a realistic ε (the core's own test checks all 36).
    for line in reference.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let want: f64 = f[4].parse().expect("ε");
        if want > 30.0 {
            continue;
        }
        let got = json(&medfl(&[
            "privacy",
            "epsilon",
            "--accountant",
            "pld",
            "--sample-rate",
            f[0],
            "--noise-multiplier",
            f[1],
            "--steps",
            f[2],
            "--delta",
            f[3],
            "--json",
        ]));
        let eps = got["epsilon"].as_f64().expect("epsilon");
        assert!((eps - want).abs() / want < 1e-8, "{line}: {got}");
        assert_eq!(got["accountant"], "pld", "{got}");
        assert!(got["best_order"].is_null(), "{got}");
    }
    let noise = |accountant: &str| {
        let got = json(&medfl(&[
            "privacy",
            "noise",
            "--accountant",
            accountant,
            "--target-epsilon",
            "3",
            "--sample-rate",
            "0.01",
            "--steps",
            "1000",
            "--delta",
            "1e-5",
            "--json",
        ]));
        assert!(got["epsilon"].as_f64().expect("ε") <= 3.0, "{got}");
        got["noise_multiplier"].as_f64().expect("z")
    };
    let (rdp, pld) = (noise("rdp"), noise("pld"));
    assert!(pld < rdp, "pld needs z {pld}, rdp {rdp}");
}

/// `medfl privacy epsilon ... | head` (a reader that has gone): the command ends quietly with
/// status 0 instead of panicking on the broken pipe.
#[test]
fn a_reader_that_has_gone_ends_the_output_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_medfl"))
        .args(["privacy", "epsilon", "--sample-rate", "0.01"])
        .args([
            "--noise-multiplier",
            "1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("medfl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
