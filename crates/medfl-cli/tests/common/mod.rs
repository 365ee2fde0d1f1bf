//! What the CLI test binaries share: running `medfl` as the test consortium's researcher.

use std::process::{Command, Output};

use medfl_e2e::Coordinator;

/// Runs `medfl --config KIT --coordinator URL ARGS...` as the test consortium's researcher, off
/// the async threads.
pub async fn medfl(coordinator: &Coordinator, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medfl"));
    if let Some(kit) = coordinator.researcher_config() {
        cmd.arg("--config").arg(kit);
    }
    cmd.arg("--coordinator").arg(coordinator.url()).args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run medfl"))
        .await
        .expect("join")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
