//! The consortium CA, kept in a directory: `ca.pem`, `ca.key` (mode 0600), `consortium.json`
//! (who was issued what) and `revoked.json` (the revocation list coordinators read).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::fsutil::{self, now_rfc3339, rfc3339};
use crate::identity::{identity_uri, validate_name};
use crate::revocation::{RevocationList, Revoked};
use crate::{PeerIdentity, PkiError, Role};

/// The coordinator's port when the address names none.
pub const DEFAULT_PORT: u16 = 7070;
/// The CA certificate in a CA directory (and in every kit).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key in a CA directory; it never leaves that directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The record of the consortium and every certificate issued.
pub const CONSORTIUM_FILE: &str = "consortium.json";
/// The revocation list, in a CA directory and in the coordinator's kit.
pub const REVOKED_FILE: &str = "revoked.json";

/// How long the CA certificate is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a participant's certificate is valid unless the operator says otherwise.
pub const DEFAULT_VALID_DAYS: u32 = 730;
/// The longest validity a participant's certificate may have (the CA's own).
pub const MAX_VALID_DAYS: u32 = 3650;
/// Certificates start being valid this long before they are issued, for clocks that lag.
const BACKDATE: Duration = Duration::minutes(5);
/// The longest consortium name.
const MAX_CONSORTIUM: usize = 64;

/// Where participants reach the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorAddress {
    /// A DNS name (lowercase) or an IP address, without brackets.
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl CoordinatorAddress {
    /// Parses `host`, `host:port`, an IP address, or `[ipv6]:port`; the port defaults to
    /// [`DEFAULT_PORT`].
    pub fn parse(address: &str) -> Result<Self, PkiError> {
        let invalid = |reason: &str| PkiError::InvalidAddress {
            address: address.to_string(),
            reason: reason.to_string(),
        };
        if address.contains("://") {
            return Err(invalid("give a host or host:port, not a URL"));
        }
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (host, rest) = rest
                .split_once(']')
                .ok_or_else(|| invalid("no closing ']'"))?;
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(invalid("only an IPv6 address may be in brackets"));
            }
            let port = match rest {
                "" => None,
                _ => Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| invalid("expected ':' and a port after ']'"))?,
                ),
            };
            (host, port)
        } else if address.parse::<Ipv6Addr>().is_ok() {
            (address, None)
        } else {
            match address.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (address, None),
            }
        };
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(invalid(&format!("{p:?} is not a port (1-65535)"))),
            },
        };
        if host.parse::<IpAddr>().is_ok() {
            return Ok(Self {
                host: host.to_string(),
                port,
            });
        }
        check_dns_name(host).map_err(|reason| invalid(&reason))?;
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// `https://host:port`, with brackets around an IPv6 address.
    pub fn url(&self) -> String {
        format!("https://{self}")
    }
}

impl fmt::Display for CoordinatorAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

fn check_dns_name(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{label:?} is not a DNS label (1-63 letters, digits and inner '-')"
            ));
        }
    }
    Ok(())
}

fn check_consortium_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidConsortium {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.trim().is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.chars().count() > MAX_CONSORTIUM {
        return Err(invalid("it is longer than 64 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("it holds control characters"));
    }
    if name.trim() != name {
        return Err(invalid("it starts or ends with white space"));
    }
    Ok(())
}

/// One certificate the CA issued, as recorded in `consortium.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    /// The participant's name, unique in the consortium.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The certificate's serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
    /// When it expires (RFC 3339).
    pub not_after: String,
    /// Whether it was revoked.
    pub revoked: bool,
    /// When it was revoked (RFC 3339).
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// `consortium.json`: the consortium, its coordinator, and every certificate issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consortium {
    /// The consortium's name (the O of every certificate).
    pub name: String,
    /// The coordinator's host name or IP address.
    pub coordinator_host: String,
    /// The coordinator's port.
    pub coordinator_port: u16,
    /// When the CA was created (RFC 3339).
    pub created_at: String,
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub ca_sha256: String,
    /// Further host names or IP addresses the coordinator's certificates carry (a second DNS
    /// name, a load balancer's address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinator_names: Vec<String>,
    /// Every certificate issued, oldest first; a renewed participant has one per certificate.
    pub participants: Vec<Participant>,
}

impl Consortium {
    /// Where participants reach the coordinator.
    pub fn coordinator(&self) -> CoordinatorAddress {
        CoordinatorAddress {
            host: self.coordinator_host.clone(),
            port: self.coordinator_port,
        }
    }

    /// The participant of that name: its latest certificate.
    pub fn participant(&self, name: &str) -> Option<&Participant> {
        self.participants.iter().rev().find(|p| p.name == name)
    }

    /// The participant whose name equals `name` ignoring ASCII case.
    fn clashing(&self, name: &str) -> Option<&Participant> {
        self.participants
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The revocation list these records imply.
    pub fn revocation_list(&self) -> RevocationList {
        RevocationList {
            consortium: self.name.clone(),
            revoked: self
                .participants
                .iter()
                .filter(|p| p.revoked)
                .map(|p| Revoked {
                    name: p.name.clone(),
                    role: p.role,
                    serial: p.serial.clone(),
                    sha256: p.sha256.clone(),
                    revoked_at: p.revoked_at.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }

    fn load(path: &Path) -> Result<Self, PkiError> {
        let text = fsutil::read_string(path)?;
        let consortium: Self = serde_json::from_str(&text)
            .map_err(|e| PkiError::malformed(path, format!("not a consortium file: {e}")))?;
        let address = consortium.coordinator().to_string();
        let parsed = CoordinatorAddress::parse(&address)
            .map_err(|e| PkiError::malformed(path, format!("coordinator_host: {e}")))?;
        if parsed != consortium.coordinator() {
            return Err(PkiError::malformed(
                path,
                format!("coordinator_host {address:?} is not in canonical form"),
            ));
        }
        Ok(consortium)
    }

    fn save(&self, path: &Path) -> Result<(), PkiError> {
        fsutil::write_atomic(path, to_json(self).as_bytes())
    }
}

/// Pretty JSON with a final newline; plain data always serialises.
pub(crate) fn to_json(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// A freshly issued certificate and its private key.
#[derive(Clone)]
pub struct Issued {
    /// The participant's role.
    pub role: Role,
    /// The participant's name.
    pub name: String,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM); it belongs in the participant's kit only.
    pub key_pem: String,
    /// The certificate's serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the certificate's DER, lowercase hex: its fingerprint.
    pub sha256_hex: String,
    /// When it expires (RFC 3339).
    pub not_after: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("serial_hex", &self.serial_hex)
            .field("sha256_hex", &self.sha256_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The consortium CA, opened from its directory.
pub struct Ca {
    dir: PathBuf,
    consortium: Consortium,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("consortium", &self.consortium.name)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a CA for `consortium_name` in `ca_dir` (created, mode 0700 on Unix), whose
    /// coordinator participants reach at `coordinator_host` (`host` or `host:port`). Writes
    /// `ca.key` (mode 0600), `ca.pem`, `consortium.json` and an empty `revoked.json`; refuses a
    /// directory that already holds any of them.
    pub fn create(
        ca_dir: &Path,
        consortium_name: &str,
        coordinator_host: &str,
    ) -> Result<Self, PkiError> {
        check_consortium_name(consortium_name)?;
        let address = CoordinatorAddress::parse(coordinator_host)?;
        for file in [CA_KEY_FILE, CA_CERT_FILE, CONSORTIUM_FILE, REVOKED_FILE] {
            let path = ca_dir.join(file);
            if path.exists() {
                return Err(PkiError::CaExists { path });
            }
        }
        let ca_name = format!("{consortium_name} CA");
        let fail = |e: rcgen::Error| PkiError::Certificate {
            name: ca_name.clone(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(consortium_name, &ca_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial(&ca_name)?);
        let cert = params.self_signed(&key).map_err(fail)?;
        let cert_pem = cert.pem();
        let ca_sha256 = hex::encode(digest(&SHA256, cert.der()));

        fsutil::create_private_dir(ca_dir)?;
        // The key first, created exclusively: of two concurrent creations only one gets here.
        let key_path = ca_dir.join(CA_KEY_FILE);
        match fsutil::write_new(&key_path, key.serialize_pem().as_bytes(), true) {
            Err(PkiError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                return Err(PkiError::CaExists { path: key_path });
            }
            other => other?,
        }
        fsutil::write_new(&ca_dir.join(CA_CERT_FILE), cert_pem.as_bytes(), false)?;
        let consortium = Consortium {
            name: consortium_name.to_string(),
            coordinator_host: address.host,
            coordinator_port: address.port,
            created_at: rfc3339(now),
            ca_sha256,
            coordinator_names: Vec::new(),
            participants: Vec::new(),
        };
        fsutil::write_new(
            &ca_dir.join(CONSORTIUM_FILE),
            to_json(&consortium).as_bytes(),
            false,
        )?;
        fsutil::write_new(
            &ca_dir.join(REVOKED_FILE),
            consortium.revocation_list().to_json().as_bytes(),
            false,
        )?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(fail)?;
        Ok(Self {
            dir: ca_dir.to_path_buf(),
            consortium,
            cert_pem,
            issuer,
        })
    }

    /// Opens the CA in `ca_dir`, checking that `ca.key` belongs to `ca.pem`.
    pub fn open(ca_dir: &Path) -> Result<Self, PkiError> {
        let consortium = Consortium::load(&ca_dir.join(CONSORTIUM_FILE))?;
        let cert_path = ca_dir.join(CA_CERT_FILE);
        let key_path = ca_dir.join(CA_KEY_FILE);
        let cert_pem = fsutil::read_string(&cert_path)?;
        let key = KeyPair::from_pem(&fsutil::read_string(&key_path)?)
            .map_err(|e| PkiError::malformed(&key_path, format!("not a private key: {e}")))?;
        let der = crate::tls::first_cert_der(&cert_path, cert_pem.as_bytes())?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
            PkiError::malformed(&cert_path, format!("not an X.509 certificate: {e}"))
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::malformed(
                &key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| {
            PkiError::malformed(&cert_path, format!("not a usable CA certificate: {e}"))
        })?;
        Ok(Self {
            dir: ca_dir.to_path_buf(),
            consortium,
            cert_pem,
            issuer,
        })
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The consortium's records, as of the last operation.
    pub fn consortium(&self) -> &Consortium {
        &self.consortium
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn consortium_path(&self) -> PathBuf {
        self.dir.join(CONSORTIUM_FILE)
    }

    /// Issues a certificate and key to `name` as `role`, valid for [`DEFAULT_VALID_DAYS`], and
    /// records it in `consortium.json`. A name is issued once: a name already recorded (in any
    /// letter case, revoked or not) is refused; [`Ca::renew`] and [`Ca::reissue`] give a known
    /// name a new certificate.
    pub fn issue(&mut self, role: Role, name: &str) -> Result<Issued, PkiError> {
        self.issue_for(role, name, DEFAULT_VALID_DAYS)
    }

    /// [`Ca::issue`] with a certificate valid for `valid_days`.
    pub fn issue_for(
        &mut self,
        role: Role,
        name: &str,
        valid_days: u32,
    ) -> Result<Issued, PkiError> {
        validate_name(name)?;
        // Re-read the records so that a change by another process since `open` is not lost.
        self.consortium = Consortium::load(&self.consortium_path())?;
        if let Some(p) = self.consortium.clashing(name) {
            return Err(PkiError::Duplicate {
                name: name.to_string(),
                role: p.role,
                path: self.consortium_path(),
            });
        }
        self.sign(role, name, valid_days)
    }

    /// A new key and certificate for a participant whose certificate is about to expire, in
    /// the same role. Its earlier certificates stay valid until they expire, so the new kit can
    /// be put in place without a gap; a revoked participant needs [`Ca::reissue`].
    pub fn renew(&mut self, name: &str, valid_days: u32) -> Result<Issued, PkiError> {
        self.consortium = Consortium::load(&self.consortium_path())?;
        let latest = self.known(name)?;
        if latest.revoked {
            return Err(PkiError::AlreadyRevoked {
                name: name.to_string(),
                revoked_at: latest.revoked_at.clone().unwrap_or_default(),
            });
        }
        self.sign(latest.role, name, valid_days)
    }

    /// A new key and certificate for a participant whose key was lost or exposed, or who was
    /// revoked and is let back in, in the same role: every certificate it still holds is
    /// revoked first (and `revoked.json` rewritten). Returns the certificates revoked now.
    pub fn reissue(
        &mut self,
        name: &str,
        valid_days: u32,
    ) -> Result<(Vec<Participant>, Issued), PkiError> {
        check_validity(name, valid_days)?;
        self.consortium = Consortium::load(&self.consortium_path())?;
        let role = self.known(name)?.role;
        let revoked = self.revoke_all(name)?;
        Ok((revoked, self.sign(role, name, valid_days)?))
    }

    /// The latest record of `name`, which must be known.
    fn known(&self, name: &str) -> Result<Participant, PkiError> {
        self.consortium
            .participant(name)
            .cloned()
            .ok_or_else(|| PkiError::UnknownParticipant {
                name: name.to_string(),
                path: self.consortium_path(),
            })
    }

    /// Adds host names or IP addresses that coordinator certificates issued from now on carry
    /// besides the consortium's coordinator host (`localhost` and the loopback addresses are
    /// always there).
    pub fn add_coordinator_names(&mut self, names: &[String]) -> Result<(), PkiError> {
        self.consortium = Consortium::load(&self.consortium_path())?;
        for name in names {
            let host = CoordinatorAddress::parse(name)?.host;
            if !self.consortium.coordinator_names.contains(&host) {
                self.consortium.coordinator_names.push(host);
            }
        }
        self.consortium.save(&self.consortium_path())
    }

    /// Signs a new key's certificate for `name` as `role`, valid for `valid_days`, and records
    /// it.
    fn sign(&mut self, role: Role, name: &str, valid_days: u32) -> Result<Issued, PkiError> {
        check_validity(name, valid_days)?;
        let fail = |e: rcgen::Error| PkiError::Certificate {
            name: name.to_string(),
            reason: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name =
            distinguished_name(&self.consortium.name, name, Some(role.as_str()));
        params.subject_alt_names = self.subject_alt_names(role, name)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
            _ => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(valid_days));
        params.serial_number = Some(random_serial(name)?);
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        let identity = PeerIdentity::from_der(cert.der())?;
        let issued = Issued {
            role,
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex: identity.serial_hex,
            sha256_hex: identity.sha256_hex,
            not_after: rfc3339(params.not_after),
        };
        self.consortium.participants.push(Participant {
            name: issued.name.clone(),
            role,
            serial: issued.serial_hex.clone(),
            sha256: issued.sha256_hex.clone(),
            issued_at: rfc3339(now),
            not_after: issued.not_after.clone(),
            revoked: false,
            revoked_at: None,
        });
        self.consortium.save(&self.consortium_path())?;
        Ok(issued)
    }

    fn subject_alt_names(&self, role: Role, name: &str) -> Result<Vec<SanType>, PkiError> {
        let ia5 = |s: String| {
            s.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| PkiError::Certificate {
                    name: name.to_string(),
                    reason: format!("subjectAltName {s:?}: {e}"),
                })
        };
        let mut sans = vec![SanType::URI(ia5(identity_uri(role, name))?)];
        if role == Role::Coordinator {
            let host = self.consortium.coordinator();
            let mut push = |san: SanType| {
                if !sans.contains(&san) {
                    sans.push(san);
                }
            };
            match host.ip() {
                Some(ip) => push(SanType::IpAddress(ip)),
                None => push(SanType::DnsName(ia5(host.host.clone())?)),
            }
            for extra in &self.consortium.coordinator_names {
                match extra.parse::<IpAddr>() {
                    Ok(ip) => push(SanType::IpAddress(ip)),
                    Err(_) => push(SanType::DnsName(ia5(extra.clone())?)),
                }
            }
            push(SanType::DnsName(ia5("localhost".into())?));
            push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        }
        Ok(sans)
    }

    /// Revokes `name`'s certificates (a renewed participant may hold two): marks them in
    /// `consortium.json` and rewrites `revoked.json` (atomically, so a coordinator watching it
    /// never reads half a file). Returns the latest.
    pub fn revoke(&mut self, name: &str) -> Result<Participant, PkiError> {
        self.consortium = Consortium::load(&self.consortium_path())?;
        let latest = self.known(name)?;
        match self.revoke_all(name)?.pop() {
            Some(revoked) => Ok(revoked),
            None => Err(PkiError::AlreadyRevoked {
                name: name.to_string(),
                revoked_at: latest.revoked_at.unwrap_or_default(),
            }),
        }
    }

    /// Revokes every certificate `name` still holds, oldest first, saving the records and the
    /// revocation list when there was any; returns them.
    fn revoke_all(&mut self, name: &str) -> Result<Vec<Participant>, PkiError> {
        let now = now_rfc3339();
        let mut revoked = Vec::new();
        for p in self
            .consortium
            .participants
            .iter_mut()
            .filter(|p| p.name == name && !p.revoked)
        {
            p.revoked = true;
            p.revoked_at = Some(now.clone());
            revoked.push(p.clone());
        }
        if !revoked.is_empty() {
            self.consortium.save(&self.consortium_path())?;
            self.write_revocation_list()?;
        }
        Ok(revoked)
    }

    /// The current revocation list.
    pub fn revocation_list(&self) -> RevocationList {
        self.consortium.revocation_list()
    }

    /// Rewrites `revoked.json` from `consortium.json`'s records; returns its path.
    pub fn write_revocation_list(&self) -> Result<PathBuf, PkiError> {
        let path = self.dir.join(REVOKED_FILE);
        fsutil::write_atomic(&path, self.revocation_list().to_json().as_bytes())?;
        Ok(path)
    }
}

/// Refuses a validity of no days, or longer than the CA's own.
pub(crate) fn check_validity(name: &str, valid_days: u32) -> Result<(), PkiError> {
    if (1..=MAX_VALID_DAYS).contains(&valid_days) {
        return Ok(());
    }
    Err(PkiError::Certificate {
        name: name.to_string(),
        reason: format!("valid for {valid_days} days: give 1 to {MAX_VALID_DAYS}"),
    })
}

fn distinguished_name(
    consortium: &str,
    common_name: &str,
    unit: Option<&str>,
) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, consortium);
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// 128 random bits, positive, with the top byte non-zero so that the DER keeps all 16 bytes.
fn random_serial(name: &str) -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Certificate {
            name: name.to_string(),
            reason: "the system random number generator failed".into(),
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses() {
        let parse = |s: &str| CoordinatorAddress::parse(s).unwrap();
        assert_eq!(
            parse("Coord.Example.org").to_string(),
            "coord.example.org:7070"
        );
        assert_eq!(parse("coord:9000").port, 9000);
        assert_eq!(parse("10.0.0.5").url(), "https://10.0.0.5:7070");
        assert_eq!(parse("::1").url(), "https://[::1]:7070");
        assert_eq!(parse("[fd00::2]:8443").url(), "https://[fd00::2]:8443");
        assert!(parse("10.0.0.5").ip().is_some());
        for bad in [
            "",
            "https://coord",
            "coord:0",
            "coord:x",
            "coord:70000",
            "-coord",
            "co ord",
            "a..b",
            "[coord]:1",
            "[::1]8443",
        ] {
            let err = CoordinatorAddress::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn consortium_names() {
        check_consortium_name("St Mary's Oncology Network").unwrap();
        for bad in ["", "  ", " x", "a\nb", &"x".repeat(65)] {
            assert!(matches!(
                check_consortium_name(bad),
                Err(PkiError::InvalidConsortium { .. })
            ));
        }
    }

    #[test]
    fn creates_opens_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Ca::create(&ca_dir, "Net", "coord.example.org:9443").unwrap();
        assert_eq!(
            ca.consortium().coordinator().url(),
            "https://coord.example.org:9443"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
            assert_eq!(mode(&ca_dir), 0o700);
        }
        let reopened = Ca::open(&ca_dir).unwrap();
        assert_eq!(reopened.consortium(), ca.consortium());
        let err = Ca::create(&ca_dir, "Net", "coord").unwrap_err();
        assert!(matches!(err, PkiError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
    }

    #[test]
    fn open_refuses_a_key_of_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        Ca::create(&dir.path().join("a"), "A", "coord").unwrap();
        Ca::create(&dir.path().join("b"), "B", "coord").unwrap();
        std::fs::copy(
            dir.path().join("b").join(CA_KEY_FILE),
            dir.path().join("a").join(CA_KEY_FILE),
        )
        .unwrap();
        let err = Ca::open(&dir.path().join("a")).unwrap_err().to_string();
        assert!(err.contains("does not belong to"), "{err}");
        assert!(err.contains(CA_KEY_FILE), "{err}");
    }

    #[test]
    fn issues_once_per_name_and_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(dir.path(), "Net", "coord").unwrap();
        let issued = ca.issue(Role::Site, "hospital-a").unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(issued.serial_hex.len(), 32);
        assert!(!format!("{issued:?}").contains("PRIVATE"));
        for name in ["hospital-a", "Hospital-A"] {
            let err = ca.issue(Role::Researcher, name).unwrap_err();
            assert!(matches!(err, PkiError::Duplicate { .. }), "{err}");
            assert!(err.to_string().contains(name), "{err}");
        }
        assert!(matches!(
            ca.issue(Role::Site, "a/b"),
            Err(PkiError::InvalidName { .. })
        ));
        let consortium = Ca::open(dir.path()).unwrap().consortium().clone();
        let p = consortium.participant("hospital-a").unwrap();
        assert_eq!((p.role, p.revoked), (Role::Site, false));
        assert_eq!(p.serial, issued.serial_hex);
        assert_eq!(p.not_after, issued.not_after);
    }

    #[test]
    fn certificates_carry_the_identity_and_the_right_usage() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(dir.path(), "Net", "10.1.2.3:9000").unwrap();
        let coordinator = ca.issue(Role::Coordinator, "coordinator").unwrap();
        let site = ca.issue(Role::Site, "h").unwrap();
        let der = |pem: &str| crate::tls::first_cert_der(Path::new("x"), pem.as_bytes()).unwrap();

        let coordinator_der = der(&coordinator.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&coordinator_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "URI(urn:medfl:coordinator:coordinator)",
                "IPAddress(0a:01:02:03)",
                "DNSName(localhost)",
                "IPAddress(7f:00:00:01)",
                "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)",
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(cert.subject().to_string().contains("O=Net"));

        let site_der = der(&site.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&site_der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let ca_der = der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let years = |c: &x509_parser::certificate::X509Certificate<'_>| {
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp())
                / (365 * 86_400)
        };
        assert_eq!(years(&cert), 2);
        assert_eq!(years(&ca_cert), 10);
        assert!(ca_cert.is_ca());
        let id = PeerIdentity::from_der(&site_der).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Site, "h"));
    }

    #[test]
    fn revokes_once_and_writes_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(dir.path(), "Net", "coord").unwrap();
        let issued = ca.issue(Role::Site, "h").unwrap();
        let revoked_path = dir.path().join(REVOKED_FILE);
        assert!(RevocationList::load(&revoked_path)
            .unwrap()
            .revoked
            .is_empty());
        ca.revoke("h").unwrap();
        let list = RevocationList::load(&revoked_path).unwrap();
        assert_eq!(list.revoked.len(), 1);
        assert_eq!(list.revoked[0].sha256, issued.sha256_hex);
        assert!(Ca::open(dir.path()).unwrap().consortium().participants[0].revoked);
        let err = ca.revoke("h").unwrap_err();
        assert!(matches!(err, PkiError::AlreadyRevoked { .. }), "{err}");
        let err = ca.revoke("nobody").unwrap_err().to_string();
        assert!(
            err.contains("\"nobody\"") && err.contains(CONSORTIUM_FILE),
            "{err}"
        );
        // A revoked name stays taken.
        assert!(matches!(
            ca.issue(Role::Site, "h"),
            Err(PkiError::Duplicate { .. })
        ));
    }

    #[test]
    fn renews_and_reissues_with_the_validity_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(dir.path(), "Net", "coord").unwrap();
        let first = ca.issue(Role::Site, "h").unwrap();
        let days = |issued: &Issued| {
            let der =
                crate::tls::first_cert_der(Path::new("x"), issued.cert_pem.as_bytes()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
                / 86_400
        };
        // Renewed: a new key and serial in the same role; the old certificate stays valid.
        let renewed = ca.renew("h", 90).unwrap();
        assert_eq!(renewed.role, Role::Site);
        assert_ne!(renewed.serial_hex, first.serial_hex);
        assert_ne!(renewed.key_pem, first.key_pem);
        assert_eq!(days(&renewed), 90);
        assert!(ca.revocation_list().revoked.is_empty());
        assert_eq!(
            ca.consortium().participant("h").unwrap().serial,
            renewed.serial_hex
        );
        assert!(ca.renew("nobody", 90).is_err());
        for bad in [0, MAX_VALID_DAYS + 1] {
            let err = ca.renew("h", bad).unwrap_err().to_string();
            assert!(err.contains("1 to 3650"), "{err}");
        }

        // Revoking the name revokes both certificates; renewing it then is refused.
        ca.revoke("h").unwrap();
        let revoked: Vec<String> = ca
            .revocation_list()
            .revoked
            .iter()
            .map(|r| r.serial.clone())
            .collect();
        assert_eq!(
            revoked,
            [first.serial_hex.clone(), renewed.serial_hex.clone()]
        );
        assert!(matches!(
            ca.renew("h", 90),
            Err(PkiError::AlreadyRevoked { .. })
        ));

        // Reissued: the name is back with a new certificate, the old ones stay revoked.
        let (now_revoked, back) = ca.reissue("h", 365).unwrap();
        assert!(now_revoked.is_empty());
        assert_eq!(days(&back), 365);
        let list = RevocationList::load(&dir.path().join(REVOKED_FILE)).unwrap();
        assert_eq!(list.revoked.len(), 2);
        assert!(list.revoked.iter().all(|r| r.serial != back.serial_hex));
        // Reissued while valid (a lost key): the current certificate is revoked first.
        let (now_revoked, again) = ca.reissue("h", 365).unwrap();
        assert_eq!(now_revoked.len(), 1);
        assert_eq!(now_revoked[0].serial, back.serial_hex);
        assert_ne!(again.serial_hex, back.serial_hex);
        assert_eq!(ca.revocation_list().revoked.len(), 3);
    }

    #[test]
    fn the_coordinator_certificate_carries_further_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Ca::create(dir.path(), "Net", "coord.example.org").unwrap();
        ca.add_coordinator_names(&["lb.example.org".into(), "192.0.2.7".into()])
            .unwrap();
        assert!(ca.add_coordinator_names(&["not a host".into()]).is_err());
        let coordinator = ca.issue(Role::Coordinator, "coordinator").unwrap();
        let der =
            crate::tls::first_cert_der(Path::new("x"), coordinator.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        for want in [
            "DNSName(coord.example.org)",
            "DNSName(lb.example.org)",
            "IPAddress(c0:00:02:07)",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        // Kept in consortium.json, so a renewed coordinator certificate carries them too.
        let reopened = Ca::open(dir.path()).unwrap();
        assert_eq!(
            reopened.consortium().coordinator_names,
            ["lb.example.org", "192.0.2.7"]
        );
    }

    #[test]
    fn a_malformed_consortium_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        Ca::create(dir.path(), "Net", "coord").unwrap();
        std::fs::write(dir.path().join(CONSORTIUM_FILE), "{").unwrap();
        let err = Ca::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(CONSORTIUM_FILE), "{err}");
    }
}
