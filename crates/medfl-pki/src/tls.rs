//! Mutual-TLS settings from a kit's PEM files, checked up front so that a wrong or mismatched
//! file is reported by name at start rather than as a failed handshake later.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::certificate::X509Certificate;

use crate::handshake::{RevocationCheckingVerifier, HANDSHAKE_TIMEOUT};
use crate::{fsutil, PkiError, WatchedRevocations};

/// Server side, for [`crate::tls_incoming`]: present the certificate in `cert_pem_path` with the
/// key in `key_pem_path`, and require every client to present a certificate issued by the CA in
/// `ca_pem_path` and not in `revocations`, which is re-read when it changes, so a revocation
/// refuses new connections without a restart. Speaks HTTP/2 only, as gRPC does.
pub fn server_tls(
    cert_pem_path: &Path,
    key_pem_path: &Path,
    ca_pem_path: &Path,
    revocations: Option<Arc<WatchedRevocations>>,
) -> Result<TlsAcceptor, PkiError> {
    let files = KitFiles::read(ca_pem_path, cert_pem_path, key_pem_path)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in all_cert_ders(ca_pem_path, files.ca.as_bytes())? {
        roots
            .add(der)
            .map_err(|e| PkiError::malformed(ca_pem_path, format!("unusable CA: {e}")))?;
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| PkiError::malformed(ca_pem_path, format!("unusable CA: {e}")))?;
    let verifier: Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier> =
        match revocations {
            Some(revocations) => Arc::new(RevocationCheckingVerifier {
                inner: chain,
                revocations,
            }),
            None => chain,
        };
    let certs = all_cert_ders(cert_pem_path, files.cert.as_bytes())?;
    let key = PrivateKeyDer::from_pem_slice(files.key.as_bytes())
        .map_err(|e| PkiError::malformed(key_pem_path, format!("no PEM private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::malformed(cert_pem_path, format!("TLS settings: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| PkiError::malformed(key_pem_path, format!("unusable key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Client settings: trust only the CA in `ca_pem_path`, check that the server's certificate is
/// for `domain` (the coordinator's host name or IP address), and present the certificate in
/// `cert_pem_path` with the key in `key_pem_path`.
pub fn client_tls(
    ca_pem_path: &Path,
    cert_pem_path: &Path,
    key_pem_path: &Path,
    domain: &str,
) -> Result<ClientTlsConfig, PkiError> {
    if domain.is_empty() {
        return Err(PkiError::InvalidAddress {
            address: domain.to_string(),
            reason: "the coordinator's host name is empty".into(),
        });
    }
    let files = KitFiles::read(ca_pem_path, cert_pem_path, key_pem_path)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&files.ca))
        .identity(Identity::from_pem(&files.cert, &files.key))
        .domain_name(domain)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The three PEM files of a kit, checked to belong together.
struct KitFiles {
    ca: String,
    cert: String,
    key: String,
}

/// A warning when the private key at `path` is readable or writable by others than its owner
/// (a Kubernetes secret volume mounts 0644 by default: warned, not refused).
pub fn exposed_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{}: the private key is readable by others than its owner (mode {mode:04o}); \
             `chmod 600` it (or set defaultMode: 0400 on a Kubernetes secret volume)",
            path.display()
        )
    })
}

impl KitFiles {
    fn read(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let ca = fsutil::read_string(ca_path)?;
        let cert = fsutil::read_string(cert_path)?;
        let key = fsutil::read_string(key_path)?;
        if let Some(warning) = exposed_key(key_path) {
            tracing::warn!("{warning}");
        }

        let ca_ders = all_cert_ders(ca_path, ca.as_bytes())?;
        let ca_certs = ca_ders
            .iter()
            .map(|der| parse(ca_path, der))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(not_ca) = ca_certs.iter().find(|c| !c.is_ca()) {
            return Err(PkiError::malformed(
                ca_path,
                format!("{} is not a CA certificate", not_ca.subject()),
            ));
        }

        let leaf_der = first_cert_der(cert_path, cert.as_bytes())?;
        let leaf = parse(cert_path, &leaf_der)?;
        if !ca_certs
            .iter()
            .any(|ca| leaf.verify_signature(Some(ca.public_key())).is_ok())
        {
            return Err(PkiError::malformed(
                cert_path,
                format!("not issued by the CA in {}", ca_path.display()),
            ));
        }
        if !leaf.validity().is_valid() {
            return Err(PkiError::malformed(
                cert_path,
                format!(
                    "not valid now: valid from {} until {}",
                    leaf.validity().not_before,
                    leaf.validity().not_after
                ),
            ));
        }

        let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| PkiError::malformed(key_path, format!("no PEM private key: {e}")))?;
        // Keys of kinds this crate does not issue are left for the TLS library to check.
        if let Ok(pair) = rcgen::KeyPair::try_from(&key_der) {
            if pair.public_key_raw() != leaf.public_key().subject_public_key.data.as_ref() {
                return Err(PkiError::malformed(
                    key_path,
                    format!("this key does not belong to {}", cert_path.display()),
                ));
            }
        }
        Ok(Self { ca, cert, key })
    }
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, PkiError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::malformed(path, format!("not an X.509 certificate: {e}")))
}

fn all_cert_ders(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let ders = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::malformed(path, format!("unreadable PEM: {e}")))?;
    if ders.is_empty() {
        return Err(PkiError::malformed(path, "no PEM certificate in it"));
    }
    Ok(ders)
}

/// When the first certificate in the PEM file at `path` expires: seconds since the epoch, and
/// RFC 3339. A participant checks its own, to say in plain words that it needs renewing.
pub fn certificate_expiry(path: &Path) -> Result<(i64, String), PkiError> {
    let pem = std::fs::read(path).map_err(|e| PkiError::io(path, e))?;
    let der = first_cert_der(path, &pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::malformed(path, format!("not an X.509 certificate: {e}")))?;
    let not_after = cert.validity().not_after;
    Ok((
        not_after.timestamp(),
        crate::fsutil::rfc3339(not_after.to_datetime()),
    ))
}

/// The DER of the first certificate in a PEM file's contents.
pub(crate) fn first_cert_der(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, PkiError> {
    let mut ders = all_cert_ders(path, pem)?;
    Ok(ders.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Role};

    #[test]
    fn a_key_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("site.key");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed_key(&key), None);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = exposed_key(&key).expect("a warning");
        assert!(
            warning.contains("site.key") && warning.contains("0644"),
            "{warning}"
        );
    }

    struct Files {
        _dir: tempfile::TempDir,
        ca: std::path::PathBuf,
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        other_key: std::path::PathBuf,
        other_ca: std::path::PathBuf,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(&dir.path().join("ca"), "Net", "coord").unwrap();
        let a = ca.issue(Role::Site, "a").unwrap();
        let b = ca.issue(Role::Site, "b").unwrap();
        let other = Ca::create(&dir.path().join("other"), "Other", "coord").unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Files {
            ca: write("ca.pem", ca.cert_pem()),
            cert: write("a.pem", &a.cert_pem),
            key: write("a.key", &a.key_pem),
            other_key: write("b.key", &b.key_pem),
            other_ca: write("other.pem", other.cert_pem()),
            _dir: dir,
        }
    }

    #[test]
    fn a_matching_kit_loads() {
        let f = files();
        client_tls(&f.ca, &f.cert, &f.key, "coord").unwrap();
        server_tls(&f.cert, &f.key, &f.ca, None).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let f = files();
        let missing = f.ca.with_file_name("missing.pem");
        let cases = [
            (client_tls(&missing, &f.cert, &f.key, "c"), "missing.pem"),
            (client_tls(&f.ca, &f.cert, &f.other_key, "c"), "b.key"),
            (client_tls(&f.other_ca, &f.cert, &f.key, "c"), "a.pem"),
            (
                client_tls(&f.ca, &f.key, &f.key, "c"),
                "a.key: no PEM certificate",
            ),
            (
                client_tls(&f.ca, &f.cert, &f.cert, "c"),
                "a.pem: no PEM private key",
            ),
            (
                client_tls(&f.cert, &f.cert, &f.key, "c"),
                "not a CA certificate",
            ),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let err = server_tls(&f.cert, &f.other_key, &f.ca, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("b.key") && err.contains("does not belong"),
            "{err}"
        );
    }
}
