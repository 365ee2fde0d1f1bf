//! What the coordinator and site daemons share: layered configuration loading, logging setup
//! and the signals that stop them.
//!
//! # Layout
//! - [`load_config`]: embedded defaults, then a TOML file, then `MEDFL_*` variables.
//! - [`init_logging`]: `tracing` to stderr, filtered by `RUST_LOG`, as text or JSON lines,
//!   network strings escaped ([`escaped_fields`]).
//! - [`stop_signal`]: completes on SIGINT or SIGTERM.
//! - [`warn_plaintext`]: the once-a-minute warning of a daemon running without TLS.
//! - [`write_private`]: replaces a file atomically, readable by its owner only.
//! - [`write_stdout`] ([`out!`], [`outln!`]): what the commands print, ending quietly when the
//!   reader has gone (`medfl run list | head`).

use std::path::Path;

use serde::de::DeserializeOwned;

/// Loads `T` from `defaults` (TOML), then `file` if given, then `MEDFL_<KEY>` environment
/// variables for the `keys` the config has; an empty variable clears its key (an optional one
/// becomes unset). The error names the file and the key, or the
/// variable when the bad value came from the environment; a `MEDFL_*` variable that names no
/// key (a typo) is warned about on stderr rather than silently ignored.
pub fn load_config<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    keys: &[&str],
) -> Result<T, String> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    for name in unknown_env(vars.iter().cloned(), keys) {
        eprintln!(
            "warning: {name} is not a setting ({}); ignored",
            keys.iter()
                .map(|k| format!("MEDFL_{}", k.to_uppercase()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    load_config_from(defaults, file, keys, vars.into_iter())
}

/// [`load_config`] with the environment given.
fn load_config_from<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    keys: &[&str],
    vars: impl Iterator<Item = (String, String)>,
) -> Result<T, String> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(defaults, config::FileFormat::Toml));
    if let Some(file) = file {
        if !file.exists() {
            return Err(format!("{}: no such file", file.display()));
        }
        builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
    }
    let mut overrides = env_overrides(vars, keys);
    // An empty variable clears the key (the file's TLS paths, for a plaintext trial) rather than
    // setting it to an empty string.
    let cleared: Vec<String> = overrides
        .iter()
        .filter(|(_, value)| value.is_empty())
        .map(|(name, _)| name.clone())
        .collect();
    for name in cleared {
        overrides.remove(&name);
        let key = name.trim_start_matches("MEDFL_").to_lowercase();
        builder = builder
            .set_override(key, config::Value::new(None, config::ValueKind::Nil))
            .map_err(|e| format!("environment variable {name}: {e}"))?;
    }
    builder
        .add_source(
            config::Environment::with_prefix("MEDFL")
                .try_parsing(true)
                .source(Some(overrides.clone())),
        )
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| {
            let message = e.to_string();
            // A bad value set in the environment is the variable's fault, not the file's.
            let variable = overrides.keys().find(|name| {
                name.strip_prefix("MEDFL_")
                    .is_some_and(|key| message.contains(&key.to_lowercase()))
            });
            let place = match (variable, file) {
                (Some(name), _) => format!("environment variable {name}: "),
                (None, Some(f)) => format!("{}: ", f.display()),
                (None, None) => String::new(),
            };
            format!("{place}{message}")
        })
}

/// The `MEDFL_*` variables that name none of `keys`, are not medfl's own (`MEDFL_CONFIG`,
/// `MEDFL_REQUIRE_ASSETS`) and do not look like an orchestrator's (Kubernetes service links:
/// `MEDFL_X_SERVICE_HOST`, `MEDFL_X_PORT_7070_TCP`, ...): most likely typos.
pub fn unknown_env(vars: impl Iterator<Item = (String, String)>, keys: &[&str]) -> Vec<String> {
    let service_link = |key: &str| {
        key.contains("_SERVICE_")
            || key.ends_with("_SERVICE_HOST")
            || key.ends_with("_SERVICE_PORT")
            || key.ends_with("_PORT")
            || key.split('_').collect::<Vec<_>>().windows(2).any(|w| {
                w[0] == "PORT" && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit())
            })
    };
    let mut unknown: Vec<String> = vars
        .filter_map(|(name, _)| {
            let key = name.strip_prefix("MEDFL_")?;
            // medfl's own variables beyond the config: the CLI's config file, the test suite's.
            let known = keys.iter().any(|k| key.eq_ignore_ascii_case(k))
                || ["CONFIG", "REQUIRE_ASSETS"].contains(&key);
            (!known && !service_link(key)).then_some(name)
        })
        .collect();
    unknown.sort();
    unknown
}

/// The `MEDFL_<KEY>` variables naming one of `keys`. Others are left alone: an orchestrator may
/// set `MEDFL_*` variables of its own (Kubernetes service links), which must not stop a daemon.
pub fn env_overrides(
    vars: impl Iterator<Item = (String, String)>,
    keys: &[&str],
) -> config::Map<String, String> {
    vars.filter(|(k, _)| {
        k.strip_prefix("MEDFL_")
            .is_some_and(|key| keys.iter().any(|known| key.eq_ignore_ascii_case(known)))
    })
    .collect()
}

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines when
/// `format` is `json`. Text lines escape control characters in every field and message
/// ([`escaped_fields`]), and carry colour codes only when stderr is a terminal; JSON escapes them
/// by its own rules. So a string from the network can neither forge a log line nor drive an
/// operator's terminal.
pub fn init_logging(format: &str) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Also forwards the `log` records of dependencies (rustls). A second call (a test running
    // several daemons in one process) keeps the first.
    let _ = tracing_subscriber::util::SubscriberInitExt::try_init(subscriber(
        format,
        ansi,
        std::io::stderr,
    ));
}

/// The daemons' log subscriber writing to `writer`, as [`init_logging`] installs it: filtered
/// by `RUST_LOG` (default `info`), JSON lines when `format` is `json`, else text with escaped
/// fields, colour codes only with `ansi`.
pub fn subscriber<W>(
    format: &str,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if format == "json" {
        Box::new(logs.json().finish())
    } else {
        Box::new(logs.fmt_fields(escaped_fields()).finish())
    }
}

/// The text log's field formatter: `name=value` pairs (the message bare), each value with its
/// control characters escaped (a newline as `\n`, ESC as `\u{1b}`).
pub fn escaped_fields(
) -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        let text = escape_controls(&text);
        if field.name() == "message" {
            write!(w, "{text}")
        } else {
            write!(w, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

/// `s` with every control character written as its Rust escape.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Completes on SIGINT, or on SIGTERM where there is one (containers stop with SIGTERM).
pub async fn stop_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Writes `args` to standard output. When the reader has gone (`medfl run list | head`) the
/// command has nothing left to do: it exits with status 0 instead of panicking as `print!`
/// does; any other write error exits with status 1, saying so on standard error.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// `print!` through [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` through [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Replaces `path` with `bytes` atomically (a temporary file beside it, then a rename), the file
/// readable and writable by its owner only (keys, tokens, state).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Creates directory `dir` (and its parents) readable by its owner alone (0700 on Unix, also
/// when it already existed): data, blob and cache directories hold patients' derived data.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

/// Makes the existing file `path` readable by its owner alone (0600 on Unix).
pub fn restrict_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Makes each relative path in `paths` relative to `base` (a config file's directory).
pub fn resolve_relative<'a>(
    base: &Path,
    paths: impl IntoIterator<Item = &'a mut std::path::PathBuf>,
) {
    for path in paths {
        if path.is_relative() {
            *path = base.join(&*path);
        }
    }
}

/// How often a daemon without TLS says so.
const PLAINTEXT_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Logs a warning now and every minute until `stop` turns true: `who` runs plaintext gRPC
/// (`--insecure-dev`), which suits a trial on one machine and nothing else.
pub fn warn_plaintext(who: &'static str, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PLAINTEXT_WARNING_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => tracing::warn!(
                    "{who} running without TLS (--insecure-dev): traffic is readable and \
                     identities unchecked; use the kits of `medfl provision` outside a trial"
                ),
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A run name from the network, as an attacker would write it: a forged line and a
    /// terminal escape.
    const HOSTILE: &str = "x\n2026-01-01T00:00:00Z  INFO run stopped by=admin\u{1b}[2J";

    fn log_hostile() {
        tracing::warn!(name = %HOSTILE, site = ?HOSTILE, "refused {}", HOSTILE);
    }

    #[test]
    fn text_logs_escape_network_strings() {
        let out = Captured::default();
        let sink = out.clone();
        let logs = subscriber("text", false, move || sink.clone());
        tracing::subscriber::with_default(logs, log_hostile);
        let text = out.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("name=x\\n2026"), "{text}");
        assert!(text.contains("refused x\\n"), "{text}");
    }

    #[test]
    fn json_logs_escape_network_strings() {
        let out = Captured::default();
        let sink = out.clone();
        let logs = subscriber("json", false, move || sink.clone());
        tracing::subscriber::with_default(logs, log_hostile);
        let text = out.text();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn escaping_keeps_printable_text() {
        assert_eq!(escape_controls("Zürich-1"), "Zürich-1");
        assert_eq!(escape_controls("a\tb\r"), "a\\tb\\r");
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        port: u16,
        name: String,
    }

    #[test]
    fn layers_defaults_and_file_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "name = \"b\"\n").unwrap();
        let cfg: Cfg = load_config("port = 1\nname = \"a\"\n", Some(&file), &[]).unwrap();
        assert_eq!((cfg.port, cfg.name.as_str()), (1, "b"));
        std::fs::write(&file, "nmae = \"b\"\n").unwrap();
        let err = load_config::<Cfg>("port = 1\nname = \"a\"\n", Some(&file), &[]).unwrap_err();
        assert!(err.contains("x.toml") && err.contains("nmae"), "{err}");
        let err =
            load_config::<Cfg>("port = 1\n", Some(&dir.path().join("no.toml")), &[]).unwrap_err();
        assert!(err.contains("no.toml"), "{err}");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "name = \"b\"\n").unwrap();
        let vars = [("MEDFL_PORT".to_string(), "seventy".to_string())];
        let err = load_config_from::<Cfg>(
            "port = 1\nname = \"a\"\n",
            Some(&file),
            &["port"],
            vars.into_iter(),
        )
        .unwrap_err();
        assert!(
            err.starts_with("environment variable MEDFL_PORT: "),
            "{err}"
        );
        assert!(!err.contains("x.toml"), "{err}");
        let vars = [("MEDFL_PORT".to_string(), "70".to_string())];
        let cfg: Cfg = load_config_from(
            "port = 1\nname = \"a\"\n",
            Some(&file),
            &["port"],
            vars.into_iter(),
        )
        .unwrap();
        assert_eq!(cfg.port, 70);
    }

    #[test]
    fn an_empty_variable_clears_an_optional_key_from_the_file() {
        #[derive(serde::Deserialize)]
        struct Tls {
            tls_ca: Option<String>,
            port: u16,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "tls_ca = \"kit/ca.pem\"\n").unwrap();
        let load = |value: &str| {
            let vars = [("MEDFL_TLS_CA".to_string(), value.to_string())];
            load_config_from::<Tls>(
                "port = 1\n",
                Some(&file),
                &["tls_ca", "port"],
                vars.into_iter(),
            )
            .unwrap()
        };
        assert_eq!(load("").tls_ca, None);
        assert_eq!(load("other.pem").tls_ca.as_deref(), Some("other.pem"));
        assert_eq!(load("").port, 1);
    }

    #[test]
    fn typos_are_told_apart_from_service_links() {
        let vars = [
            "MEDFL_DATA_DIR",
            "MEDFL_DATA_DRI",
            "MEDFL_CONFIG",
            "MEDFL_COORDINATOR_SERVICE_HOST",
            "MEDFL_COORDINATOR_SERVICE_PORT_GRPC",
            "MEDFL_COORDINATOR_PORT",
            "MEDFL_COORDINATOR_PORT_7070_TCP_ADDR",
            "PATH",
        ]
        .map(|k| (k.to_string(), String::new()));
        assert_eq!(
            unknown_env(vars.into_iter(), &["data_dir"]),
            vec!["MEDFL_DATA_DRI"]
        );
    }

    #[test]
    fn only_known_keys_are_taken_from_the_environment() {
        let vars = [
            ("MEDFL_DATA_DIR", "/d"),
            ("MEDFL_COORDINATOR_SERVICE_HOST", "10.0.0.1"),
            ("PATH", "/bin"),
            ("MEDFL_LOG_FORMAT", "json"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let got = env_overrides(vars.into_iter(), &["data_dir", "log_format", "coordinator"]);
        let mut keys: Vec<&str> = got.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec!["MEDFL_DATA_DIR", "MEDFL_LOG_FORMAT"]);
    }
}
