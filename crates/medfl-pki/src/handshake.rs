//! The coordinator's side of the mutual-TLS handshake: a client-certificate check that refuses
//! revoked participants before any request is read, and the listener that runs handshakes.
//!
//! tonic's own TLS server takes no certificate verifier of ours, so the coordinator accepts
//! connections here and hands tonic finished `tokio_rustls` streams; tonic still reads the peer's
//! certificates from them (`Request::peer_certs`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::{PeerIdentity, PkiError, WatchedRevocations};

/// The longest a TLS handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest an accepted connection may stay silent. A real client sends its TLS hello as soon
/// as it connects (a connection that waited in the backlog has already sent it), so this only
/// cuts connections opened to hold a slot: at the cap, their slots turn over every few seconds
/// and a client waiting in the (first come, first served) backlog is accepted well within its
/// own handshake timeout.
pub(crate) const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(3);

/// The consortium CA's verdict on a client certificate, then the revocation list's.
#[derive(Debug)]
pub(crate) struct RevocationCheckingVerifier {
    /// Chains the certificate to the consortium CA.
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    /// Re-read when it changes, as for every call.
    pub(crate) revocations: Arc<WatchedRevocations>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let Ok(peer) = PeerIdentity::from_der(end_entity.as_ref()) else {
            // Not one of ours to name: the per-call check refuses it with the reason.
            return Ok(verified);
        };
        match self.revocations.check(&peer) {
            Err(e @ PkiError::Revoked { .. }) => {
                warn!(role = %peer.role, name = %peer.name, serial = %peer.serial_hex, "TLS handshake refused: {e}");
                Err(Error::InvalidCertificate(CertificateError::Revoked))
            }
            // An unreadable list fails closed on every call, with the file named in the status
            // the caller reads; a handshake alert could not say as much.
            Ok(()) | Err(_) => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How many connections the coordinator holds and handshakes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections, handshaking or served. At the cap, accepting waits for one to close.
    pub max_connections: usize,
    /// TLS handshakes in progress (they cost CPU): a connection takes a permit once its first
    /// bytes arrive, so idle connections hold no handshake slot.
    pub max_handshakes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_handshakes: 128,
        }
    }
}

/// A connection that holds its slot under [`ConnectionLimits::max_connections`] until it closes.
#[derive(Debug)]
pub struct Admitted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The peer's certificates still reach every call (`Request::peer_certs`).
impl<S: Connected> Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connections on `listener` that completed a mutual-TLS handshake under `acceptor`, for
/// `tonic::transport::Server::serve_with_incoming`, within `limits`: a connection slot is taken
/// before `accept`, and a handshake slot before the handshake, once the client has sent its first
/// bytes. A connection has [`FIRST_BYTES_TIMEOUT`] from accept to its first bytes and
/// [`HANDSHAKE_TIMEOUT`] from accept to a finished handshake; a failed one is logged and never
/// reaches the server. Accepting stops when the stream is dropped, which
/// closes the listener.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
) -> ReceiverStream<std::io::Result<Admitted<TlsStream<TcpStream>>>> {
    tls_incoming_observed(listener, acceptor, limits, |_| {})
}

/// A TLS handshake the coordinator refused: a client that spoke TLS and failed it (no
/// certificate, one of another CA, a revoked or expired one). Connections that never sent a
/// hello, or went quiet, are not counted: scanners and load balancers do that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedHandshake {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// Why, as the TLS library says it (at most 200 characters).
    pub reason: String,
}

/// [`tls_incoming`], telling `refused` of each refused handshake (for the audit log).
pub fn tls_incoming_observed(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    refused: impl Fn(RefusedHandshake) + Send + Sync + 'static,
) -> ReceiverStream<std::io::Result<Admitted<TlsStream<TcpStream>>>> {
    let refused = Arc::new(refused);
    let (tx, rx) = mpsc::channel(64);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            // Backpressure: at the cap, new connections wait in the kernel's backlog.
            let slot = tokio::select! {
                slot = connections.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                () = tx.closed() => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Small gRPC frames should not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, handshakes) = (acceptor.clone(), tx.clone(), handshakes.clone());
            let refused = refused.clone();
            tokio::spawn(async move {
                let handshake = async {
                    // An idle connection waits here holding its connection slot only.
                    // `peek`, not `readable`: readiness may be reported before any byte came.
                    let mut first = [0u8; 1];
                    let sent = tokio::time::timeout(FIRST_BYTES_TIMEOUT, tcp.peek(&mut first))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "sent nothing")
                        })??;
                    if sent == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "closed before its TLS hello",
                        ));
                    }
                    let _permit = handshakes
                        .acquire_owned()
                        .await
                        .map_err(|_| std::io::Error::other("shutting down"))?;
                    acceptor.accept(tcp).await
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(Admitted {
                                inner: tls,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        // Silence or a hang-up before the hello is not a refusal.
                        let quiet = matches!(
                            e.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::UnexpectedEof
                        );
                        if !quiet {
                            let reason: String = e.to_string().chars().take(200).collect();
                            refused(RefusedHandshake { peer, reason });
                        }
                    }
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
