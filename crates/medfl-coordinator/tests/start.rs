//! The coordinator binary as an operator starts it: a config it cannot use stops the start with
//! the file and the key named, before anything binds or is written.

use std::process::Command;

#[test]
fn a_bad_config_stops_the_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    // The shipped defaults (mutual TLS) plus one misspelt key.
    std::fs::write(&config, "chunk_sise = 65536\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_medfl-coordinator"))
        .arg("--config")
        .arg(&config)
        .env_remove("MEDFL_LISTEN")
        .output()
        .expect("running medfl-coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("chunk_sise") && err.contains("coordinator.toml"),
        "{err}"
    );
    // Nothing was created beside the file: the default data_dir is relative to it.
    assert!(!dir.path().join("coordinator-data").exists());
}
