//! Connecting to the coordinator's `RunService`, and turning gRPC failures into readable errors.

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

/// Connects to the coordinator at `addr` (`http://host:port`).
pub async fn connect(addr: &str) -> anyhow::Result<RunClient> {
    let invalid = || {
        format!(
            "`{addr}` is not a valid coordinator URL (expected e.g. http://127.0.0.1:7070); \
             set it with --coordinator URL or MEDFL_COORDINATOR"
        )
    };
    let endpoint = Endpoint::from_shared(addr.to_owned()).with_context(invalid)?;
    if endpoint.uri().scheme_str() != Some("http") || endpoint.uri().host().is_none() {
        anyhow::bail!("{}", invalid());
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
            let err = connect(addr).await.err().map(|e| format!("{e:#}"));
            let text = err.unwrap_or_default();
            assert!(text.contains("--coordinator"), "{text}");
            assert!(text.contains(addr), "{text}");
        }
    }
}
