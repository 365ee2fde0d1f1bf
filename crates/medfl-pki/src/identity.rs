//! Who a certificate is for: a [`Role`] and a name, carried in the URI SAN
//! `urn:medfl:<role>:<name>` and read back from a peer's certificate by [`PeerIdentity`].

use std::fmt;
use std::str::FromStr;

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

use crate::PkiError;

/// The prefix of the URI SAN that carries a participant's identity.
pub const URI_PREFIX: &str = "urn:medfl:";

/// The longest participant name.
const MAX_NAME: usize = 64;

/// A participant's part in the consortium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A hospital that trains on its own data.
    Site,
    /// Someone who creates and follows runs.
    Researcher,
    /// Someone who administers the federation.
    Operator,
    /// The coordinator server.
    Coordinator,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 4] = [
        Role::Site,
        Role::Researcher,
        Role::Operator,
        Role::Coordinator,
    ];

    /// The lowercase name (`site`, `researcher`, `operator`, `coordinator`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Researcher => "researcher",
            Role::Operator => "operator",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::UnknownRole(s.to_string()))
    }
}

/// Checks a participant name: 1 to 64 ASCII letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid("it is longer than 64 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(&format!(
            "{c:?} is not allowed: use letters, digits, '-', '_' and '.'"
        )));
    }
    if name == "." || name == ".." {
        return Err(invalid("it is a directory name"));
    }
    Ok(())
}

/// The URI SAN for a participant: `urn:medfl:<role>:<name>`.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("{URI_PREFIX}{role}:{name}")
}

/// The identity a peer's certificate carries.
///
/// [`PeerIdentity::from_der`] reads the certificate only; it trusts the TLS layer to have checked
/// that the consortium CA issued it, so call it on certificates a mutual-TLS handshake verified
/// (`request.peer_certs()` in tonic).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The participant's role.
    pub role: Role,
    /// The participant's name.
    pub name: String,
    /// The certificate's serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256_hex: String,
}

impl PeerIdentity {
    /// Reads the `urn:medfl:<role>:<name>` URI SAN of a DER certificate; an error if the
    /// certificate cannot be parsed or has no, several, or a malformed medfl identity.
    pub fn from_der(cert_der: &[u8]) -> Result<Self, PkiError> {
        let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| PkiError::Identity(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(PkiError::Identity(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            )));
        }
        let subject = cert.subject().to_string();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| {
                PkiError::Identity(format!(
                    "unreadable subjectAltName in certificate for {subject:?}: {e}"
                ))
            })?
            .ok_or_else(|| {
                PkiError::Identity(format!(
                    "certificate for {subject:?} has no subjectAltName, so no {URI_PREFIX} identity"
                ))
            })?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) if u.starts_with(URI_PREFIX) => Some(*u),
                _ => None,
            })
            .collect();
        let uri = match uris.as_slice() {
            [one] => *one,
            [] => {
                return Err(PkiError::Identity(format!(
                    "certificate for {subject:?} has no {URI_PREFIX}<role>:<name> URI SAN"
                )))
            }
            _ => {
                return Err(PkiError::Identity(format!(
                    "certificate for {subject:?} has {} {URI_PREFIX} URI SANs; expected one",
                    uris.len()
                )))
            }
        };
        let (role, name) = parse_uri(uri)?;
        Ok(Self {
            role,
            name,
            serial_hex: hex::encode(cert.raw_serial()),
            sha256_hex: hex::encode(digest(&SHA256, cert_der)),
        })
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

fn parse_uri(uri: &str) -> Result<(Role, String), PkiError> {
    let malformed = |why: String| {
        PkiError::Identity(format!(
            "malformed identity {uri:?}: {why} (expected {URI_PREFIX}<role>:<name>)"
        ))
    };
    let rest = uri.strip_prefix(URI_PREFIX).unwrap_or(uri);
    let (role, name) = rest
        .split_once(':')
        .ok_or_else(|| malformed("no role".into()))?;
    let role: Role = role.parse().map_err(|e| malformed(format!("{e}")))?;
    validate_name(name).map_err(|e| malformed(e.to_string()))?;
    Ok((role, name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(
                serde_json::to_string(&role).unwrap(),
                format!("\"{}\"", role.as_str())
            );
        }
        let err = "Site".parse::<Role>().unwrap_err().to_string();
        assert!(err.contains("\"Site\""), "{err}");
    }

    #[test]
    fn names() {
        for ok in ["a", "hospital-a", "St_Marys.2", &"x".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", "a:b", &"x".repeat(65)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    fn cert_with_sans(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_identity() {
        let der = cert_with_sans(&["https://example.org", "urn:medfl:site:hospital-a"]);
        let id = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.role, Role::Site);
        assert_eq!(id.name, "hospital-a");
        assert_eq!(id.sha256_hex, hex::encode(digest(&SHA256, &der)));
        assert_eq!(id.to_string(), "site hospital-a");
    }

    #[test]
    fn refuses_missing_or_malformed_identities() {
        let cases: [(&[&str], &str); 5] = [
            (&[], "no subjectAltName"),
            (&["https://example.org"], "no urn:medfl:"),
            (&["urn:medfl:nurse:x"], "unknown role \"nurse\""),
            (&["urn:medfl:site:a/b"], "invalid participant name"),
            (&["urn:medfl:site:a", "urn:medfl:site:b"], "has 2"),
        ];
        for (uris, expected) in cases {
            let err = PeerIdentity::from_der(&cert_with_sans(uris))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{uris:?}: {err}");
        }
        let err = PeerIdentity::from_der(b"junk").unwrap_err().to_string();
        assert!(err.contains("not an X.509 certificate"), "{err}");
    }
}
