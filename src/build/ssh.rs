//! The SSH channel into a build VM: a throwaway ed25519 key pair per build (injected with
//! cloud-init `sshkeys`), and a small exec client on russh (aws-lc-rs crypto).
//!
//! Host keys: the build VM generated its host keys at first boot, seconds ago, so there is
//! nothing to pin in advance; the client accepts the key it is shown. The exposure is the build
//! network only, the key gives access to a VM that holds nothing secret, and it is removed
//! before the VM becomes a template.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use super::provision::CommandOutput;

/// A key pair that lives only in memory for one build run.
pub struct BuildKey {
    private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA... sombrero-build`
    pub public_openssh: String,
}

impl std::fmt::Debug for BuildKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private half.
        f.debug_struct("BuildKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

impl BuildKey {
    pub fn generate() -> Result<Self, String> {
        // rand's thread RNG is a CSPRNG seeded from the OS.
        let seed: [u8; 32] = rand::random();
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment("sombrero-build");
        let public_openssh = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the build key: {e}"))?;
        Ok(BuildKey {
            private: Arc::new(key),
            public_openssh,
        })
    }
}

struct AcceptHostKey;

impl client::Handler for AcceptHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An authenticated SSH connection.
pub struct SshSession {
    handle: client::Handle<AcceptHostKey>,
}

impl SshSession {
    /// Connects and authenticates once; `Err` says why (refused, timed out, key not accepted).
    pub async fn connect(
        host: &str,
        port: u16,
        user: &str,
        key: &BuildKey,
        timeout: Duration,
    ) -> Result<Self, String> {
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(3600)),
            keepalive_interval: Some(Duration::from_secs(15)),
            ..Default::default()
        });
        let connect = async {
            let mut handle = client::connect(config, (host, port), AcceptHostKey)
                .await
                .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
            let auth = handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.private.clone(), None))
                .await
                .map_err(|e| format!("authenticate as {user}: {e}"))?;
            if !auth.success() {
                return Err(format!(
                    "{host}:{port} did not accept the build key for user {user} (cloud-init not done yet?)"
                ));
            }
            Ok(SshSession { handle })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connect to {host}:{port}: timed out after {timeout:?}"))?
    }

    /// Runs one command line (through the login shell) and collects its output and exit code.
    pub async fn run(&mut self, line: &str) -> Result<CommandOutput, String> {
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| format!("open a session: {e}"))?;
        channel
            .exec(true, line)
            .await
            .map_err(|e| format!("exec: {e}"))?;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut code = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => err.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => code = Some(i64::from(exit_status)),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    err.extend_from_slice(format!("killed by signal {signal_name:?}\n").as_bytes());
                    code = Some(-1);
                }
                _ => {}
            }
        }
        let Some(exitcode) = code else {
            return Err("the connection closed before the command reported an exit status".into());
        };
        Ok(CommandOutput {
            exitcode,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        })
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_ed25519_and_debug_hides_the_private_half() {
        let a = BuildKey::generate().unwrap();
        let b = BuildKey::generate().unwrap();
        assert!(a.public_openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(a.public_openssh.ends_with(" sombrero-build"));
        assert_ne!(a.public_openssh, b.public_openssh);
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("PRIVATE") && dbg.contains("ssh-ed25519"));
    }
}
