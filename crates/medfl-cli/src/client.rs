//! Connecting to the coordinator's `RunService`, and turning gRPC failures into readable errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use medfl_proto::v1::run_service_client::RunServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// A `RunService` client on one channel to the coordinator.
pub type RunClient = RunServiceClient<Channel>;

/// Longest wait for the TCP connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a unary call may take (streams are not bounded: a watch lasts as long as the run).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of HTTP/2 pings that keep long streams alive through idle rounds.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest message accepted from the coordinator; model chunks are far smaller.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The files of a researcher's or operator's kit that mutual TLS needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct TlsFiles {
    /// The consortium CA certificate.
    pub tls_ca: PathBuf,
    /// The caller's certificate.
    pub tls_cert: PathBuf,
    /// The caller's private key.
    pub tls_key: PathBuf,
}

/// A kit's `medfl.toml`: the coordinator's URL and the TLS files, relative to the file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KitConfig {
    coordinator: String,
    #[serde(flatten)]
    tls: TlsFiles,
}

/// Where the CLI connects: the URL and, for `https`, the kit's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The coordinator's URL.
    pub url: String,
    /// The kit's files, for mutual TLS.
    pub tls: Option<TlsFiles>,
}

/// Default coordinator URL.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

impl Target {
    /// The URL given (`--coordinator`), else the kit's (`--config medfl.toml`), else the local
    /// default; TLS files from the kit.
    pub fn resolve(url: Option<String>, kit: Option<&Path>) -> anyhow::Result<Self> {
        let kit = match kit {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let mut kit: KitConfig =
                    toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
                let base = path.parent().unwrap_or(Path::new("."));
                for p in [
                    &mut kit.tls.tls_ca,
                    &mut kit.tls.tls_cert,
                    &mut kit.tls.tls_key,
                ] {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
                Some(kit)
            }
            None => None,
        };
        let url = url
            .or_else(|| kit.as_ref().map(|k| k.coordinator.clone()))
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
        Ok(Self {
            url,
            tls: kit.map(|k| k.tls),
        })
    }

    /// Connects to the target.
    pub async fn connect(&self) -> anyhow::Result<RunClient> {
        connect_with(&self.url, self.tls.as_ref()).await
    }
}

/// Connects to the coordinator at `addr`: `https://` with a kit's `tls` files, or plaintext
/// `http://` to a coordinator started with `--insecure-dev`.
pub async fn connect_with(addr: &str, tls: Option<&TlsFiles>) -> anyhow::Result<RunClient> {
    let invalid = || {
        format!(
            "`{addr}` is not a valid coordinator URL (expected e.g. http://127.0.0.1:7070); \
             set it with --coordinator URL or MEDFL_COORDINATOR"
        )
    };
    let mut endpoint = Endpoint::from_shared(addr.to_owned()).with_context(invalid)?;
    let host = endpoint.uri().host().map(str::to_string);
    let scheme = endpoint.uri().scheme_str().map(str::to_string);
    match (scheme.as_deref(), host, tls) {
        (Some("http"), Some(_), _) => {}
        (Some("https"), Some(host), Some(tls)) => {
            let config = medfl_pki::client_tls(&tls.tls_ca, &tls.tls_cert, &tls.tls_key, &host)?;
            endpoint = endpoint.tls_config(config)?;
        }
        (Some("https"), Some(_), None) => anyhow::bail!(
            "`{addr}` needs mutual TLS: pass your kit's medfl.toml with --config (or \
             MEDFL_CONFIG)"
        ),
        _ => anyhow::bail!("{}", invalid()),
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Some(KEEP_ALIVE))
        .http2_keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE);
    let channel = endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach the coordinator at {addr}: is it running? \
             point at another one with --coordinator URL (or MEDFL_COORDINATOR)"
        )
    })?;
    Ok(RunServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// A request for a unary call, with the CLI's call deadline.
pub fn unary<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// The error for a failed call: the call's name, the gRPC status code and the coordinator's
/// message, with a hint when the coordinator could not be reached.
pub fn status_error(call: &str, status: &Status) -> anyhow::Error {
    let message = if status.message().is_empty() {
        "(no message)"
    } else {
        status.message()
    };
    let hint = match status.code() {
        Code::Unavailable => "; is the coordinator still running?",
        Code::DeadlineExceeded => "; the coordinator did not answer in time",
        _ => "",
    };
    anyhow::anyhow!("{call} failed: {:?}: {message}{hint}", status.code())
}

/// Maps a call's `Status` error with [`status_error`].
pub trait RpcResultExt<T> {
    /// The value, or an error naming `call`, the status code and message.
    fn rpc(self, call: &str) -> anyhow::Result<T>;
}

impl<T> RpcResultExt<T> for Result<T, Status> {
    fn rpc(self, call: &str) -> anyhow::Result<T> {
        self.map_err(|status| status_error(call, &status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_show_code_and_message() {
        let err = status_error("GetRun", &Status::not_found("run `r9` does not exist"));
        assert_eq!(
            err.to_string(),
            "GetRun failed: NotFound: run `r9` does not exist"
        );
        let err = Err::<(), _>(Status::unavailable("")).rpc("ListRuns");
        let text = err.map_or_else(|e| e.to_string(), |()| String::new());
        assert!(text.starts_with("ListRuns failed: Unavailable: (no message)"));
        assert!(text.contains("coordinator"));
    }

    #[tokio::test]
    async fn bad_addresses_name_the_option() {
        for addr in ["not a url", "bogus", "127.0.0.1:7070", "ftp://host:1"] {
            let err = connect_with(addr, None)
                .await
                .err()
                .map(|e| format!("{e:#}"));
            let text = err.unwrap_or_default();
            assert!(text.contains("--coordinator"), "{text}");
            assert!(text.contains(addr), "{text}");
        }
    }
}
