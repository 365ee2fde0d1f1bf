//! Kits: one directory per participant with the CA certificate, its certificate and key, and a
//! ready config file whose paths are relative to the file's directory; and [`provision`], which
//! creates a CA and every kit at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::ca::{CA_CERT_FILE, REVOKED_FILE};
use crate::fsutil;
use crate::identity::validate_name;
use crate::{Ca, Issued, PkiError, Role};

/// The name of the coordinator's certificate and kit made by [`provision`].
pub const COORDINATOR_NAME: &str = "coordinator";

/// A kit written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    /// The participant's role.
    pub role: Role,
    /// The participant's name.
    pub name: String,
    /// The kit directory, `<out_dir>/<name>`.
    pub dir: PathBuf,
    /// The config file (`site.toml`, `coordinator.toml` or `medfl.toml`).
    pub config: PathBuf,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The participant's certificate.
    pub cert: PathBuf,
    /// The participant's private key (mode 0600).
    pub key: PathBuf,
    /// The certificate's serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub sha256_hex: String,
    /// When the certificate expires (RFC 3339).
    pub not_after: String,
}

/// What [`provision`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The CA directory (keep it offline; it holds `ca.key`).
    pub ca_dir: PathBuf,
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    pub ca_sha256_hex: String,
    /// The kits: the coordinator's first, then sites, researchers and operators as given.
    pub kits: Vec<Kit>,
}

/// The config file of a role's kit.
fn config_file(role: Role) -> &'static str {
    match role {
        Role::Site => "site.toml",
        Role::Coordinator => "coordinator.toml",
        Role::Researcher | Role::Operator => "medfl.toml",
    }
}

impl Ca {
    /// Writes `issued`'s kit to `out_dir/<name>/`: `ca.pem`, `<name>.pem`, `<name>.key` (mode
    /// 0600) and the role's config file; the coordinator's kit also gets a copy of the current
    /// `revoked.json`. Refuses a kit directory that exists and is not empty.
    pub fn write_kit(&self, out_dir: &Path, issued: &Issued) -> Result<Kit, PkiError> {
        validate_name(&issued.name)?;
        let dir = out_dir.join(&issued.name);
        if !fsutil::dir_is_free(&dir)? {
            return Err(PkiError::KitExists { path: dir });
        }
        fsutil::create_private_dir(&dir)?;
        let name = &issued.name;
        let ca = dir.join(CA_CERT_FILE);
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        let config = dir.join(config_file(issued.role));
        fsutil::write_new(&key, issued.key_pem.as_bytes(), true)?;
        fsutil::write_new(&cert, issued.cert_pem.as_bytes(), false)?;
        fsutil::write_new(&ca, self.cert_pem().as_bytes(), false)?;
        fsutil::write_new(&config, self.config_text(issued).as_bytes(), false)?;
        if issued.role == Role::Coordinator {
            fsutil::write_new(
                &dir.join(REVOKED_FILE),
                self.revocation_list().to_json().as_bytes(),
                false,
            )?;
        }
        Ok(Kit {
            role: issued.role,
            name: name.clone(),
            dir,
            config,
            ca,
            cert,
            key,
            serial_hex: issued.serial_hex.clone(),
            sha256_hex: issued.sha256_hex.clone(),
            not_after: issued.not_after.clone(),
        })
    }

    /// Issues a certificate to `name` as `role` and writes its kit under `out_dir`, checking
    /// first that the kit directory is free so that no name is spent on a kit that cannot be
    /// written.
    pub fn issue_kit(&mut self, role: Role, name: &str, out_dir: &Path) -> Result<Kit, PkiError> {
        self.issue_kit_for(role, name, out_dir, crate::ca::DEFAULT_VALID_DAYS)
    }

    /// [`Ca::issue_kit`] with a certificate valid for `valid_days`.
    pub fn issue_kit_for(
        &mut self,
        role: Role,
        name: &str,
        out_dir: &Path,
        valid_days: u32,
    ) -> Result<Kit, PkiError> {
        kit_dir_free(name, out_dir)?;
        let issued = self.issue_for(role, name, valid_days)?;
        self.write_kit(out_dir, &issued)
    }

    /// [`Ca::renew`], writing the new kit under `out_dir`.
    pub fn renew_kit(
        &mut self,
        name: &str,
        out_dir: &Path,
        valid_days: u32,
    ) -> Result<Kit, PkiError> {
        kit_dir_free(name, out_dir)?;
        let issued = self.renew(name, valid_days)?;
        self.write_kit(out_dir, &issued)
    }

    /// [`Ca::reissue`], writing the new kit under `out_dir`; returns the certificates revoked.
    pub fn reissue_kit(
        &mut self,
        name: &str,
        out_dir: &Path,
        valid_days: u32,
    ) -> Result<(Vec<crate::ca::Participant>, Kit), PkiError> {
        kit_dir_free(name, out_dir)?;
        let (revoked, issued) = self.reissue(name, valid_days)?;
        Ok((revoked, self.write_kit(out_dir, &issued)?))
    }

    fn config_text(&self, issued: &Issued) -> String {
        let consortium = &self.consortium().name;
        let address = self.consortium().coordinator();
        let url = address.url();
        let name = &issued.name;
        let tls = format!(
            "tls_ca = \"{CA_CERT_FILE}\"\ntls_cert = \"{name}.pem\"\ntls_key = \"{name}.key\"\n"
        );
        let header = format!(
            "# medfl {role} \"{name}\" of the consortium \"{consortium}\".\n\
             # Paths are relative to this file's directory. {name}.key is this participant's\n\
             # private key: it never leaves this kit.\n",
            role = issued.role,
        );
        match issued.role {
            Role::Site => format!(
                "{header}name = \"{name}\"\ncoordinator = \"{url}\"\n\
                 data_dir = \"site-data\"\n{tls}\n\
                 # One table per dataset this site offers, for example:\n\
                 # [datasets.example]\n# path = \"data.csv\"\n# format = \"csv\"\n"
            ),
            Role::Coordinator => format!(
                "{header}# Participants reach it at {url}.\n\
                 listen = \"0.0.0.0:{port}\"\ndata_dir = \"coordinator-data\"\n{tls}\
                 # Re-read whenever it changes: after a revocation, copy the CA's {REVOKED_FILE}\n\
                 # over it, or point this at that file.\n\
                 revocation_list = \"{REVOKED_FILE}\"\n",
                port = address.port,
            ),
            Role::Researcher | Role::Operator => {
                format!("{header}coordinator = \"{url}\"\n{tls}")
            }
        }
    }
}

/// Fails unless `out_dir/name` is free for a kit, before a certificate is spent on it.
fn kit_dir_free(name: &str, out_dir: &Path) -> Result<(), PkiError> {
    validate_name(name)?;
    let dir = out_dir.join(name);
    if !fsutil::dir_is_free(&dir)? {
        return Err(PkiError::KitExists { path: dir });
    }
    Ok(())
}

/// How [`provision_with`] issues: the certificates' validity and further names the
/// coordinator's certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Days each participant's certificate is valid.
    pub valid_days: u32,
    /// Host names or IP addresses the coordinator is also reached at.
    pub coordinator_names: Vec<String>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self {
            valid_days: crate::ca::DEFAULT_VALID_DAYS,
            coordinator_names: Vec::new(),
        }
    }
}

/// Creates a consortium at once: the CA in `ca_dir` (default `out_dir/ca`), a coordinator kit
/// named [`COORDINATOR_NAME`], and one kit per site, researcher and operator, all under
/// `out_dir`. Every name and kit directory is checked before anything is written.
pub fn provision(
    ca_dir: Option<&Path>,
    consortium: &str,
    coordinator_host: &str,
    sites: &[String],
    researchers: &[String],
    operators: &[String],
    out_dir: &Path,
) -> Result<Provisioned, PkiError> {
    provision_with(
        ca_dir,
        consortium,
        coordinator_host,
        (sites, researchers, operators),
        out_dir,
        &IssueOptions::default(),
    )
}

/// [`provision`] with the certificates issued as `options` say. `people` are the sites,
/// researchers and operators.
pub fn provision_with(
    ca_dir: Option<&Path>,
    consortium: &str,
    coordinator_host: &str,
    people: (&[String], &[String], &[String]),
    out_dir: &Path,
    options: &IssueOptions,
) -> Result<Provisioned, PkiError> {
    let (sites, researchers, operators) = people;
    let ca_dir = ca_dir.map_or_else(|| out_dir.join("ca"), Path::to_path_buf);
    let plan: Vec<(Role, &str)> = std::iter::once((Role::Coordinator, COORDINATOR_NAME))
        .chain(sites.iter().map(|n| (Role::Site, n.as_str())))
        .chain(researchers.iter().map(|n| (Role::Researcher, n.as_str())))
        .chain(operators.iter().map(|n| (Role::Operator, n.as_str())))
        .collect();
    let mut seen: BTreeMap<String, Role> = BTreeMap::new();
    for &(role, name) in &plan {
        validate_name(name)?;
        if let Some(first) = seen.insert(name.to_ascii_lowercase(), role) {
            return Err(PkiError::InvalidName {
                name: name.to_string(),
                reason: format!("given twice (as {first} and as {role})"),
            });
        }
        let dir = out_dir.join(name);
        if ca_dir.starts_with(&dir) {
            return Err(PkiError::InvalidName {
                name: name.to_string(),
                reason: format!(
                    "its kit directory would hold the CA in {}",
                    ca_dir.display()
                ),
            });
        }
        if !fsutil::dir_is_free(&dir)? {
            return Err(PkiError::KitExists { path: dir });
        }
    }
    crate::ca::check_validity(COORDINATOR_NAME, options.valid_days)?;
    for name in &options.coordinator_names {
        crate::ca::CoordinatorAddress::parse(name)?;
    }
    let mut ca = Ca::create(&ca_dir, consortium, coordinator_host)?;
    ca.add_coordinator_names(&options.coordinator_names)?;
    let kits = plan
        .into_iter()
        .map(|(role, name)| ca.issue_kit_for(role, name, out_dir, options.valid_days))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Provisioned {
        ca_sha256_hex: ca.consortium().ca_sha256.clone(),
        ca_dir,
        kits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RevocationList;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn toml_file(path: &Path) -> toml::Table {
        std::fs::read_to_string(path).unwrap().parse().unwrap()
    }

    #[test]
    fn provisions_every_kit_with_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("kits");
        let done = provision(
            None,
            "Net",
            "coord.example.org:9443",
            &names(&["hospital-a", "hospital-b"]),
            &names(&["alice"]),
            &names(&["ops"]),
            &out,
        )
        .unwrap();
        assert_eq!(done.ca_dir, out.join("ca"));
        let roles: Vec<_> = done
            .kits
            .iter()
            .map(|k| (k.role, k.name.as_str()))
            .collect();
        assert_eq!(
            roles,
            [
                (Role::Coordinator, "coordinator"),
                (Role::Site, "hospital-a"),
                (Role::Site, "hospital-b"),
                (Role::Researcher, "alice"),
                (Role::Operator, "ops"),
            ]
        );
        for kit in &done.kits {
            assert_eq!(kit.dir, out.join(&kit.name));
            for file in [&kit.ca, &kit.cert, &kit.key, &kit.config] {
                assert!(file.is_file(), "{}", file.display());
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&kit.key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", kit.key.display());
            }
            // Every path in the config resolves inside the kit.
            let config = toml_file(&kit.config);
            for key in ["tls_ca", "tls_cert", "tls_key"] {
                let file = config[key].as_str().unwrap();
                assert!(kit.dir.join(file).is_file(), "{key} = {file}");
            }
        }

        let site = toml_file(&out.join("hospital-a/site.toml"));
        assert_eq!(site["name"].as_str(), Some("hospital-a"));
        assert_eq!(
            site["coordinator"].as_str(),
            Some("https://coord.example.org:9443")
        );
        assert_eq!(site["data_dir"].as_str(), Some("site-data"));
        let text = std::fs::read_to_string(out.join("hospital-a/site.toml")).unwrap();
        assert!(text.contains("# [datasets.example]\n# path = \"data.csv\"\n# format = \"csv\""));

        let coordinator = toml_file(&out.join("coordinator/coordinator.toml"));
        assert_eq!(coordinator["listen"].as_str(), Some("0.0.0.0:9443"));
        assert_eq!(coordinator["data_dir"].as_str(), Some("coordinator-data"));
        assert_eq!(
            coordinator["revocation_list"].as_str(),
            Some("revoked.json")
        );
        let copy = RevocationList::load(&out.join("coordinator/revoked.json")).unwrap();
        assert_eq!(copy.consortium, "Net");
        assert!(copy.revoked.is_empty());

        let alice = toml_file(&out.join("alice/medfl.toml"));
        assert_eq!(
            alice["coordinator"].as_str(),
            Some("https://coord.example.org:9443")
        );
        assert_eq!(alice["tls_key"].as_str(), Some("alice.key"));
        assert!(out.join("ops/medfl.toml").is_file());
    }

    #[test]
    fn refuses_bad_or_repeated_names_before_writing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("kits");
        let cases = [
            (names(&["a", "A"]), names(&[]), "given twice"),
            (
                names(&["a"]),
                names(&["a"]),
                "given twice (as site and as researcher)",
            ),
            (names(&["coordinator"]), names(&[]), "given twice"),
            (
                names(&["a b"]),
                names(&[]),
                "invalid participant name \"a b\"",
            ),
            (names(&["ca"]), names(&[]), "would hold the CA"),
        ];
        for (sites, researchers, expected) in cases {
            let err = provision(None, "Net", "coord", &sites, &researchers, &[], &out)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(!out.exists(), "{expected}: wrote {}", out.display());
        }
    }

    #[test]
    fn refuses_a_non_empty_kit_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("kits");
        std::fs::create_dir_all(out.join("h")).unwrap();
        std::fs::write(out.join("h/notes.txt"), "x").unwrap();
        let err = provision(None, "Net", "coord", &names(&["h"]), &[], &[], &out).unwrap_err();
        assert!(matches!(err, PkiError::KitExists { .. }), "{err}");
        assert!(!out.join("ca").exists());

        // An empty one is fine; a later kit for a new name goes beside the others.
        std::fs::remove_file(out.join("h/notes.txt")).unwrap();
        provision(None, "Net", "coord", &names(&["h"]), &[], &[], &out).unwrap();
        let mut ca = Ca::open(&out.join("ca")).unwrap();
        let err = ca.issue_kit(Role::Site, "h", &out).unwrap_err();
        assert!(matches!(err, PkiError::KitExists { .. }), "{err}");
        // The kit check came first: the name is still only issued once.
        assert_eq!(ca.consortium().participants.len(), 2);
        let kit = ca.issue_kit(Role::Site, "h2", &out).unwrap();
        assert_eq!(kit.config, out.join("h2/site.toml"));
    }
}
