//! The plaintext trial in `deploy/README.md` starts as written there: each command of its block,
//! run from the repository root with the real binaries, one process each. Only the port (a free
//! one, not 7070) and the data directories (temporary ones) differ, both set the way an operator
//! would override them, through `MEDFL_*` variables.
//!
//! It uses the binaries `cargo test --workspace` builds beside this test (`medfl-coordinator`,
//! `medfl-site`, `medfl`); run alone, build them first with `cargo build --bins`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long each step may take before the test fails (a hang fails rather than blocks).
const STEP: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

/// The commands of the README's trial block, one per line, as words.
fn trial_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README");
    let section = readme
        .split("## Trial on one machine")
        .nth(1)
        .expect("deploy/README.md has a trial section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the trial section has a sh block");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// `target/release/NAME` in the README is the binary built beside this test.
pub(crate) fn binary(word: &str) -> PathBuf {
    let name = word
        .strip_prefix("target/release/")
        .unwrap_or_else(|| panic!("{word} is not a target/release binary"));
    let dir = std::env::current_exe()
        .expect("the test's path")
        .parent()
        .and_then(Path::parent)
        .expect("the target directory")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test --workspace` builds it, or `cargo build --bins`",
        path.display()
    );
    path
}

/// A command of the block, from the repository root, with the test's overrides only.
fn command(words: &[String], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(binary(&words[0]));
    cmd.args(&words[1..]).current_dir(repo());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("MEDFL_")) {
        cmd.env_remove(key);
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// Daemons started by the test, killed when it ends however it ends.
#[derive(Default)]
pub(crate) struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Daemons {
    /// Starts `cmd`, sending each line it logs to `lines` tagged with `who`.
    pub(crate) fn start(
        &mut self,
        mut cmd: Command,
        who: &str,
        lines: &mpsc::Sender<(String, String)>,
    ) {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {who}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (who, lines) = (who.to_string(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send((who.clone(), line)).is_err() {
                    break;
                }
            }
        });
        self.0.push(child);
    }
}

/// The address in a `... serving addr=A` log line with `what` in it.
pub(crate) fn logged_addr(line: &str, what: &str) -> Option<String> {
    line.contains(what)
        .then(|| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix("addr="))
                .map(String::from)
        })
        .flatten()
}

/// Waits for a logged line that `pick` accepts; fails after [`STEP`].
pub(crate) fn wait_for<T>(
    lines: &mpsc::Receiver<(String, String)>,
    what: &str,
    mut pick: impl FnMut(&str, &str) -> Option<T>,
) -> T {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(STEP) {
            Ok((who, line)) => {
                if let Some(found) = pick(&who, &line) {
                    return found;
                }
                seen.push(format!("{who}: {line}"));
            }
            Err(e) => panic!("waiting for {what}: {e}; logged:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn the_plaintext_trial_in_deploy_readme_starts_and_trains_as_written_insecure_dev() {
    let commands = trial_commands();
    let name = |words: &Vec<String>| words[0].rsplit('/').next().unwrap_or("").to_string();
    let kinds: Vec<String> = commands.iter().map(name).collect();
    assert_eq!(
        kinds,
        [
            "medfl-coordinator",
            "medfl-site",
            "medfl-site",
            "medfl-site",
            "medfl",
            "medfl"
        ],
        "{commands:?}"
    );
    let state = tempfile::tempdir().unwrap();
    let (tx, lines) = mpsc::channel();
    let mut daemons = Daemons::default();

    let coordinator = &commands[0];
    daemons.start(
        command(
            coordinator,
            &[
                ("MEDFL_LISTEN", "127.0.0.1:0".into()),
                (
                    "MEDFL_DATA_DIR",
                    state.path().join("coordinator").display().to_string(),
                ),
            ],
        ),
        "coordinator",
        &tx,
    );
    let addr = wait_for(&lines, "the coordinator to serve", |_, line| {
        logged_addr(line, "coordinator serving")
    });
    let url = format!("http://{addr}");

    for (i, site) in commands[1..4].iter().enumerate() {
        daemons.start(
            command(
                site,
                &[
                    ("MEDFL_COORDINATOR", url.clone()),
                    (
                        "MEDFL_DATA_DIR",
                        state.path().join(format!("site-{i}")).display().to_string(),
                    ),
                ],
            ),
            &format!("site {i}"),
            &tx,
        );
    }
    let mut registered = std::collections::BTreeSet::new();
    while registered.len() < 3 {
        let site = wait_for(&lines, "three sites to register", |who, line| {
            line.contains("registered").then(|| who.to_string())
        });
        registered.insert(site);
    }

    let cli = [("MEDFL_COORDINATOR", url.clone())];
    let created = command(&commands[4], &cli).output().expect("run create");
    assert!(
        created.status.success(),
        "run create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let run = String::from_utf8_lossy(&created.stdout).trim().to_string();
    assert!(
        !run.is_empty() && !run.contains(char::is_whitespace),
        "{run}"
    );

    let mut watch_words = commands[5].clone();
    let placeholder = watch_words
        .iter()
        .position(|w| w == "<RUN-ID>")
        .expect("the watch line takes <RUN-ID>");
    watch_words[placeholder] = run.clone();
    let watch = command(&watch_words, &cli)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run watch");
    let pid = watch.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(watch.wait_with_output());
    });
    let out = match finished.recv_timeout(Duration::from_secs(600)) {
        Ok(out) => out.expect("run watch output"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("run watch {run} did not end within 10 minutes");
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "run watch exited {:?}: {text}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("completed"), "{text}");
}
