//! The site's own small state in its data directory: its secret token (its identity towards
//! the coordinator) and the runs it took part in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};

use crate::SiteError;

/// A run this site worked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's name from its spec.
    pub name: String,
    /// Last round this site trained or evaluated.
    pub last_round: u32,
    /// Updates this site sent.
    pub updates_sent: u64,
    /// Bytes of those updates.
    pub bytes_sent: u64,
    /// Record-level differential privacy spent on the run, by this site's own accountant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyLedger>,
}

/// What record-level DP-SGD has spent of one dataset on one run: every step whose result left
/// the site, charged at the largest sample rate any round used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    /// The dataset trained on.
    pub dataset: String,
    /// ε at `delta` for all `steps` so far.
    pub epsilon: f64,
    /// The δ of the guarantee, fixed at the first charge.
    pub delta: f64,
    /// `rdp` or `pld`.
    pub accountant: String,
    /// Poisson sample rate (expected batch over the site's training rows); the largest used.
    pub sample_rate: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Clipping norm C.
    pub max_grad_norm: f64,
    /// DP-SGD steps whose results left the site.
    pub steps: u64,
}

/// What `site.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteState {
    /// The site name the token belongs to.
    pub site: String,
    /// Secret shared with the coordinator at registration.
    pub token: String,
    /// Runs by id.
    #[serde(default)]
    pub runs: BTreeMap<String, RunRecord>,
    /// The site's Ed25519 key (PKCS#8, hex), which signs every update it sends.
    #[serde(default)]
    pub signing_key: String,
    /// The coordinator's Ed25519 public key (hex), pinned at the first registration.
    #[serde(default)]
    pub coordinator_key: String,
}

impl SiteState {
    /// Where the state of the site at `data_dir` lives.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("site.json")
    }

    /// Loads the state if the site has any (for the hospital's read-only commands).
    pub fn load(data_dir: &Path) -> Result<Option<Self>, SiteError> {
        let path = Self::path(data_dir);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SiteError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| SiteError::Config(format!("{}: {e}", path.display())))
    }

    /// Loads the state, creating a fresh identity on first start.
    pub fn load_or_create(data_dir: &Path, site: &str) -> Result<Self, SiteError> {
        medfl_daemon::create_private_dir(data_dir)
            .map_err(|e| SiteError::io(format!("creating {}", data_dir.display()), e))?;
        let path = Self::path(data_dir);
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| SiteError::io(format!("reading {}", path.display()), e))?;
            let state: SiteState = serde_json::from_str(&text)
                .map_err(|e| SiteError::Config(format!("{}: {e}", path.display())))?;
            if state.site != site {
                return Err(SiteError::Config(format!(
                    "{} belongs to site `{}`, but this config names `{site}`; use another data_dir",
                    path.display(),
                    state.site
                )));
            }
            let mut state = state;
            if state.signing_key.is_empty() {
                // State from before update signing: give the site its key now.
                state.signing_key = new_signing_key()?;
                state.save(data_dir)?;
            }
            return Ok(state);
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| SiteError::Config("no system randomness for the site token".into()))?;
        let state = SiteState {
            site: site.to_string(),
            token: hex::encode(secret),
            runs: BTreeMap::new(),
            signing_key: new_signing_key()?,
            coordinator_key: String::new(),
        };
        state.save(data_dir)?;
        Ok(state)
    }

    /// The site's signing key.
    pub fn signer(&self) -> Result<Ed25519KeyPair, SiteError> {
        hex::decode(&self.signing_key)
            .ok()
            .and_then(|der| Ed25519KeyPair::from_pkcs8(&der).ok())
            .ok_or_else(|| {
                SiteError::Config("site.json: `signing_key` is not an Ed25519 key".into())
            })
    }

    /// Writes the state atomically, readable by the owner only.
    pub fn save(&self, data_dir: &Path) -> Result<(), SiteError> {
        let path = Self::path(data_dir);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| SiteError::Config(format!("serialising site state: {e}")))?;
        medfl_daemon::write_private(&path, text.as_bytes())
            .map_err(|e| SiteError::io(format!("writing {}", path.display()), e))
    }
}

/// A fresh Ed25519 key, PKCS#8 in hex.
fn new_signing_key() -> Result<String, SiteError> {
    Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map(|k| hex::encode(k.as_ref()))
        .map_err(|_| SiteError::Config("no system randomness for the signing key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = SiteState::load_or_create(dir.path(), "h1").unwrap();
        assert_eq!(a.token.len(), 64);
        assert!(a.signer().is_ok());
        let mut b = SiteState::load_or_create(dir.path(), "h1").unwrap();
        assert_eq!(a, b);
        b.runs.insert("r".into(), RunRecord::default());
        b.save(dir.path()).unwrap();
        assert_eq!(
            SiteState::load_or_create(dir.path(), "h1")
                .unwrap()
                .runs
                .len(),
            1
        );
        assert!(SiteState::load_or_create(dir.path(), "h2").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("site.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
