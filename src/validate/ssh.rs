//! The network half of the `ssh` check: a TCP connect, or an SSH login with the throwaway key.
//!
//! Host keys: the clone generated them at its first boot seconds ago, so there is nothing to
//! pin; the probe accepts the key it is shown. It only proves that a login works, sends nothing
//! but `true`, and the clone is destroyed right after.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use super::keys::ThrowawayKey;

/// Opens a TCP connection to `host:port` (and closes it).
pub(crate) async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("TCP connect to {host}:{port}: {e}")),
        Err(_) => Err(format!(
            "TCP connect to {host}:{port}: no answer within {}s",
            timeout.as_secs()
        )),
    }
}

struct AcceptHostKey;

impl client::Handler for AcceptHostKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Logs in as `user` with `key` and runs `true`; `Ok` when it exits 0.
pub(crate) async fn login(
    host: &str,
    port: u16,
    user: &str,
    key: &ThrowawayKey,
    timeout: Duration,
) -> Result<(), String> {
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(timeout),
        ..Default::default()
    });
    let attempt = async {
        let mut handle = client::connect(config, (host, port), AcceptHostKey)
            .await
            .map_err(|e| format!("SSH connect to {host}:{port}: {e}"))?;
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.private.clone(), None))
            .await
            .map_err(|e| format!("SSH authentication as {user}: {e}"))?;
        if !auth.success() {
            return Err(format!(
                "{host}:{port} refused the throwaway key for user {user} (cloud-init did not install it?)"
            ));
        }
        let mut channel = handle
            .channel_open_session()
            .await
            .map_err(|e| format!("SSH session: {e}"))?;
        channel
            .exec(true, "true")
            .await
            .map_err(|e| format!("SSH exec: {e}"))?;
        let mut code = None;
        while let Some(msg) = channel.wait().await {
            if let ChannelMsg::ExitStatus { exit_status } = msg {
                code = Some(exit_status);
            }
        }
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        match code {
            Some(0) => Ok(()),
            Some(c) => Err(format!("SSH login worked, but `true` exited {c}")),
            None => Err("SSH login worked, but the session closed without an exit status".into()),
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        format!(
            "SSH login to {host}:{port}: no answer within {}s",
            timeout.as_secs()
        )
    })?
}
