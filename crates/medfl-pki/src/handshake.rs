//! The coordinator's side of the mutual-TLS handshake: a client-certificate check that refuses
//! revoked participants before any request is read, and the listener that runs handshakes.
//!
//! tonic's own TLS server takes no certificate verifier of ours, so the coordinator accepts
//! connections here and hands tonic finished `tokio_rustls` streams; tonic still reads the peer's
//! certificates from them (`Request::peer_certs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::{PeerIdentity, PkiError, WatchedRevocations};

/// The longest a TLS handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Connections on `listener` that completed a mutual-TLS handshake under `acceptor`, for
/// `tonic::transport::Server::serve_with_incoming`. Handshakes run concurrently, each within
/// [`HANDSHAKE_TIMEOUT`]; a failed one is logged and never reaches the server. Accepting stops
/// when the stream is dropped, which closes the listener.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
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
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
