//! The throwaway login of a validation clone: a fresh ed25519 key pair per run, in memory only.

use std::sync::Arc;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// Comment of the public key, so a person who finds it in a clone's `sshkeys` knows its origin.
const KEY_COMMENT: &str = "sombrero-validation";

/// A key pair that lives for one validation. The private half is never printed, logged or
/// written anywhere; the public half goes into the clone's cloud-init `sshkeys`.
pub(crate) struct ThrowawayKey {
    pub(crate) private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA... sombrero-validation`
    pub(crate) public_openssh: String,
}

impl std::fmt::Debug for ThrowawayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

impl ThrowawayKey {
    pub(crate) fn generate() -> Result<Self, String> {
        // rand's thread RNG is a CSPRNG seeded from the OS.
        let seed: [u8; 32] = rand::random();
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(KEY_COMMENT);
        let public_openssh = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the validation key: {e}"))?;
        Ok(ThrowawayKey {
            private: Arc::new(key),
            public_openssh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_keys_and_debug_hides_the_private_half() {
        let a = ThrowawayKey::generate().unwrap();
        let b = ThrowawayKey::generate().unwrap();
        assert!(a.public_openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(a.public_openssh.ends_with(" sombrero-validation"));
        assert_ne!(a.public_openssh, b.public_openssh);
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains("PRIVATE") && !dbg.contains("private:"),
            "{dbg}"
        );
    }
}
