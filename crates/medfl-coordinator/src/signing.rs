//! The coordinator's Ed25519 key, which signs every task it hands out, and the check of a site's
//! signature on its update.

use std::path::Path;

use medfl_proto::convert::{task_claim, update_claim};
use medfl_proto::v1;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::CoordinatorError;

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Loads the key in `data_dir/signing.pk8`, creating it (mode 0600) on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Ed25519KeyPair, CoordinatorError> {
    let path = data_dir.join("signing.pk8");
    let bad = |why: String| CoordinatorError::Config(format!("{}: {why}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) => {
            return Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| bad(format!("not a key: {e}")))
        }
        // Only a missing key is created: an unreadable one is never replaced.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CoordinatorError::io(
                format!("reading {}", path.display()),
                e,
            ))
        }
        Err(_) => {}
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| bad(e.to_string()))?;
    medfl_daemon::write_private(&path, pkcs8.as_ref())
        .map_err(|e| CoordinatorError::io(format!("writing {}", path.display()), e))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| bad(e.to_string()))
}

/// The key's public half.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

/// Signs `task` in place.
pub fn sign_task(key: &Ed25519KeyPair, task: &mut v1::Task) {
    task.signature = key.sign(&task_claim(task).message()).as_ref().to_vec();
}

/// Checks that `site`, whose pinned key is `public_key`, signed `header`.
pub fn verify_update(
    site: &str,
    public_key: &[u8],
    header: &v1::UpdateHeader,
) -> Result<(), CoordinatorError> {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&update_claim(header, site).message(), &header.signature)
        .map_err(|_| {
            CoordinatorError::PermissionDenied(format!(
                "the signature of site `{site}`'s update for run {} round {} attempt {} does not \
                 verify: unsigned, tampered, or replayed from another round",
                header.run_id, header.round, header.attempt
            ))
        })
}
