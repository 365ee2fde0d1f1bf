//! The coordinator's Ed25519 key, which signs every task it hands out, and the check of a site's
//! signature on its update.

use std::io::Write;
use std::path::Path;

use medfl_core::signing::{TaskClaim, UpdateClaim};
use medfl_proto::v1;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::CoordinatorError;

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Loads the key in `data_dir/signing.pk8`, creating it (mode 0600) on first start.
pub fn load_or_create(data_dir: &Path) -> Result<Ed25519KeyPair, CoordinatorError> {
    let path = data_dir.join("signing.pk8");
    let bad = |why: String| CoordinatorError::Config(format!("{}: {why}", path.display()));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| bad(format!("not a key: {e}")));
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| bad(e.to_string()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| CoordinatorError::io(format!("creating {}", path.display()), e))?;
    file.write_all(pkcs8.as_ref())
        .and_then(|()| file.sync_all())
        .map_err(|e| CoordinatorError::io(format!("writing {}", path.display()), e))?;
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| bad(e.to_string()))
}

/// The key's public half.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

/// Signs `task` in place.
pub fn sign_task(key: &Ed25519KeyPair, task: &mut v1::Task) {
    let claim = TaskClaim {
        run_id: &task.run_id,
        round: task.round,
        attempt: task.attempt,
        kind: task.kind,
        global_sha256: &task.global_sha256,
    };
    task.signature = key.sign(&claim.message()).as_ref().to_vec();
}

/// Checks that `site`, whose pinned key is `public_key`, signed `header`.
pub fn verify_update(
    site: &str,
    public_key: &[u8],
    header: &v1::UpdateHeader,
) -> Result<(), CoordinatorError> {
    let claim = UpdateClaim {
        run_id: &header.run_id,
        round: header.round,
        attempt: header.attempt,
        base_sha256: &header.base_sha256,
        update_sha256: &header.sha256,
        examples: header.num_examples,
        site,
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&claim.message(), &header.signature)
        .map_err(|_| {
            CoordinatorError::PermissionDenied(format!(
                "the signature of site `{site}`'s update for run {} round {} attempt {} does not \
                 verify: unsigned, tampered, or replayed from another round",
                header.run_id, header.round, header.attempt
            ))
        })
}
