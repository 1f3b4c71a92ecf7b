//! SSH into a guest we just booted (a build VM, a validation clone): a throwaway ed25519 key
//! pair that lives in memory only, an exec client on russh (aws-lc-rs crypto), and the probes
//! validation uses (a TCP connect, a login that runs `true`).
//!
//! Host keys: the guest generated its host keys at first boot, seconds ago, so there is nothing
//! to pin in advance; the client accepts the key it is shown. The exposure is the build or
//! validation network only, the key gives access to a VM that holds nothing secret, and it is
//! removed (build) or the clone destroyed (validation) right after.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

/// What a command in the guest gave (over SSH or the guest agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub exitcode: i64,
    pub stdout: String,
    pub stderr: String,
}

/// A key pair that lives for one run. The private half is never printed, logged or written
/// anywhere; the public half goes into the guest's cloud-init `sshkeys`.
pub struct ThrowawayKey {
    private: Arc<PrivateKey>,
    /// `ssh-ed25519 AAAA... <comment>`
    pub public_openssh: String,
}

impl std::fmt::Debug for ThrowawayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private half.
        f.debug_struct("ThrowawayKey")
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

impl ThrowawayKey {
    /// A fresh key; `comment` ends the public key, so a person who finds it in a VM's
    /// `sshkeys` knows its origin (`sombrero-build`, `sombrero-validation`).
    pub fn generate(comment: &str) -> Result<Self, String> {
        // rand's thread RNG is a CSPRNG seeded from the OS.
        let seed: [u8; 32] = rand::random();
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(comment);
        let public_openssh = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the {comment} key: {e}"))?;
        Ok(ThrowawayKey {
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
    /// Connects and authenticates once within `timeout`; `Err` says why (refused, timed out,
    /// key not accepted).
    pub async fn connect(
        host: &str,
        port: u16,
        user: &str,
        key: &ThrowawayKey,
        timeout: Duration,
    ) -> Result<Self, String> {
        // Long provisioning steps may print nothing for minutes: keep the session alive.
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(3600)),
            keepalive_interval: Some(Duration::from_secs(15)),
            ..Default::default()
        });
        let connect = async {
            let mut handle = client::connect(config, (host, port), AcceptHostKey)
                .await
                .map_err(|e| format!("SSH connect to {host}:{port}: {e}"))?;
            let auth = handle
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.private.clone(), None))
                .await
                .map_err(|e| format!("SSH authentication as {user}: {e}"))?;
            if !auth.success() {
                return Err(format!(
                    "{host}:{port} did not accept the throwaway key for user {user} (cloud-init has not installed it yet?)"
                ));
            }
            Ok(SshSession { handle })
        };
        tokio::time::timeout(timeout, connect).await.map_err(|_| {
            format!(
                "SSH connect to {host}:{port}: no answer within {}s",
                timeout.as_secs()
            )
        })?
    }

    /// Runs one command line (through the login shell) and collects its output and exit code
    /// (-1 when a signal killed it).
    pub async fn run(&mut self, line: &str) -> Result<CommandOutput, String> {
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| format!("SSH session: {e}"))?;
        channel
            .exec(true, line)
            .await
            .map_err(|e| format!("SSH exec: {e}"))?;
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

/// Opens a TCP connection to `host:port` (and closes it).
pub async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("TCP connect to {host}:{port}: {e}")),
        Err(_) => Err(format!(
            "TCP connect to {host}:{port}: no answer within {}s",
            timeout.as_secs()
        )),
    }
}

/// Logs in as `user` with `key` and runs `true`, all within `timeout`; `Ok` when it exits 0.
pub async fn login_probe(
    host: &str,
    port: u16,
    user: &str,
    key: &ThrowawayKey,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut session = SshSession::connect(host, port, user, key, timeout).await?;
        let result = session.run("true").await;
        session.close().await;
        match result?.exitcode {
            0 => Ok(()),
            c => Err(format!("SSH login worked, but `true` exited {c}")),
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        format!(
            "SSH login to {host}:{port}: no answer within {}s",
            timeout.as_secs()
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_ed25519_and_debug_hides_the_private_half() {
        let a = ThrowawayKey::generate("sombrero-build").unwrap();
        let b = ThrowawayKey::generate("sombrero-build").unwrap();
        assert!(a.public_openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(a.public_openssh.ends_with(" sombrero-build"));
        assert_ne!(a.public_openssh, b.public_openssh);
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains("PRIVATE") && !dbg.contains("private") && dbg.contains("ssh-ed25519"),
            "{dbg}"
        );
    }

    #[tokio::test]
    async fn tcp_connect_reports_a_closed_port_and_accepts_an_open_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tcp_connect("127.0.0.1", port, Duration::from_secs(5))
            .await
            .unwrap();
        drop(listener);
        let err = tcp_connect("127.0.0.1", port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.starts_with(&format!("TCP connect to 127.0.0.1:{port}:")),
            "{err}"
        );
    }
}
