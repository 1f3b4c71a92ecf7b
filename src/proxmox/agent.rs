//! The QEMU guest agent: ping, exec, exec-status, network interfaces, OS info.
//!
//! Every call fails with HTTP 500 "QEMU guest agent is not running" until qemu-ga answers
//! (30-110 s after a start, or never if the image lacks it), so callers poll [`Client::agent_ping`]
//! with backoff.

use serde::Deserialize;
use serde_json::Value;

use super::client::{Client, Params};
use super::error::Result;
use super::lenient;
use super::retry::Idempotency;

/// `GET .../agent/exec-status`: no `result` wrapper; `exited` is 0/1.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct ExecStatus {
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub exited: bool,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    pub exitcode: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    pub signal: Option<i64>,
    /// Already base64-decoded by PVE.
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    #[serde(
        rename = "out-truncated",
        default,
        deserialize_with = "lenient::bool01"
    )]
    pub out_truncated: bool,
    #[serde(
        rename = "err-truncated",
        default,
        deserialize_with = "lenient::bool01"
    )]
    pub err_truncated: bool,
}

impl ExecStatus {
    /// Exited normally with code 0.
    pub fn succeeded(&self) -> bool {
        self.exited && self.exitcode == Some(0) && self.signal.is_none()
    }
}

/// One address of a guest interface.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct IpAddress {
    #[serde(rename = "ip-address", default)]
    pub ip_address: String,
    /// `ipv4` or `ipv6`.
    #[serde(rename = "ip-address-type", default)]
    pub ip_address_type: String,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub prefix: Option<u32>,
}

/// One guest interface of `network-get-interfaces`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct NetworkInterface {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<IpAddress>,
}

impl NetworkInterface {
    pub fn is_loopback(&self) -> bool {
        self.name == "lo"
            || self
                .ip_addresses
                .iter()
                .any(|a| a.ip_address == "127.0.0.1" || a.ip_address == "::1")
    }
}

/// `get-osinfo`'s result (os-release fields).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct OsInfo {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "pretty-name", default)]
    pub pretty_name: Option<String>,
    #[serde(rename = "version-id", default)]
    pub version_id: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(rename = "kernel-release", default)]
    pub kernel_release: Option<String>,
    #[serde(default)]
    pub machine: Option<String>,
}

#[derive(Deserialize)]
struct Wrapped<T> {
    result: T,
}

#[derive(Deserialize)]
struct Pid {
    #[serde(deserialize_with = "lenient::int")]
    pid: i64,
}

impl Client {
    /// `POST .../agent/ping`: Ok once the agent answers.
    pub async fn agent_ping(&self, node: &str, vmid: u32) -> Result<()> {
        // Pinging twice is harmless.
        let _: Value = self
            .post(
                &["nodes", node, "qemu", &vmid.to_string(), "agent", "ping"],
                &Params::new(),
                Idempotency::Safe,
            )
            .await?;
        Ok(())
    }

    /// Start `command` (program and arguments, no shell) in the guest; returns its pid.
    pub async fn agent_exec<S: AsRef<str>>(
        &self,
        node: &str,
        vmid: u32,
        command: &[S],
        input_data: Option<&str>,
    ) -> Result<i64> {
        self.agent_exec_as(node, vmid, command, input_data, Idempotency::Unsafe)
            .await
    }

    /// [`Client::agent_exec`] of a command that only reads (a check): run twice it answers the
    /// same, so a lost answer is followed by running it again.
    pub async fn agent_exec_read_only<S: AsRef<str>>(
        &self,
        node: &str,
        vmid: u32,
        command: &[S],
    ) -> Result<i64> {
        self.agent_exec_as(node, vmid, command, None, Idempotency::Safe)
            .await
    }

    async fn agent_exec_as<S: AsRef<str>>(
        &self,
        node: &str,
        vmid: u32,
        command: &[S],
        input_data: Option<&str>,
        idem: Idempotency,
    ) -> Result<i64> {
        let mut p = Params::new();
        // Repeated `command` keys make the array PVE 8.0.1+ requires.
        for arg in command {
            p.push("command", arg.as_ref());
        }
        let p = p.opt("input-data", input_data);
        let Pid { pid } = self
            .post(
                &["nodes", node, "qemu", &vmid.to_string(), "agent", "exec"],
                &p,
                idem,
            )
            .await?;
        Ok(pid)
    }

    pub async fn agent_exec_status(&self, node: &str, vmid: u32, pid: i64) -> Result<ExecStatus> {
        let q = Params::new().set("pid", pid);
        self.get(
            &[
                "nodes",
                node,
                "qemu",
                &vmid.to_string(),
                "agent",
                "exec-status",
            ],
            &q,
        )
        .await
    }

    pub async fn agent_network_interfaces(
        &self,
        node: &str,
        vmid: u32,
    ) -> Result<Vec<NetworkInterface>> {
        let w: Wrapped<Vec<NetworkInterface>> = self
            .get(
                &[
                    "nodes",
                    node,
                    "qemu",
                    &vmid.to_string(),
                    "agent",
                    "network-get-interfaces",
                ],
                &Params::new(),
            )
            .await?;
        Ok(w.result)
    }

    pub async fn agent_os_info(&self, node: &str, vmid: u32) -> Result<OsInfo> {
        let w: Wrapped<OsInfo> = self
            .get(
                &[
                    "nodes",
                    node,
                    "qemu",
                    &vmid.to_string(),
                    "agent",
                    "get-osinfo",
                ],
                &Params::new(),
            )
            .await?;
        Ok(w.result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_status_shapes() {
        let s: ExecStatus =
            serde_json::from_str(r#"{"exited":1,"exitcode":0,"out-data":"done\n"}"#).unwrap();
        assert!(s.succeeded());
        let s: ExecStatus = serde_json::from_str(r#"{"exited":0}"#).unwrap();
        assert!(!s.exited && !s.succeeded());
        let s: ExecStatus = serde_json::from_str(
            r#"{"exited":true,"exitcode":1,"err-data":"no","err-truncated":0}"#,
        )
        .unwrap();
        assert!(s.exited && !s.succeeded());
    }

    #[test]
    fn interfaces_decode() {
        let w: Wrapped<Vec<NetworkInterface>> = serde_json::from_str(
            r#"{"result":[{"name":"lo","ip-addresses":[{"ip-address":"127.0.0.1","ip-address-type":"ipv4","prefix":8}]},
                {"name":"eth0","hardware-address":"bc:24:11:00:00:01","ip-addresses":[{"ip-address":"10.0.0.10","ip-address-type":"ipv4","prefix":24}],"statistics":{}},
                {"name":"eth1"}]}"#,
        )
        .unwrap();
        assert!(w.result[0].is_loopback());
        assert_eq!(w.result[1].ip_addresses[0].prefix, Some(24));
        assert!(w.result[2].ip_addresses.is_empty());
    }
}
