//! The QEMU guest agent: ping, exec, exec-status, network interfaces, OS info.
//!
//! Every call fails with HTTP 500 "QEMU guest agent is not running" until qemu-ga answers
//! (30-110 s after a start, or never if the image lacks it), so callers poll [`Client::agent_ping`]
//! with backoff.

use std::ops::ControlFlow;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::lenient;
use super::retry::Idempotency;
use crate::poll::{PollSchedule, doubling, poll_until};

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

/// How a command run by [`Client::agent_exec_wait`] ended, when the Proxmox side worked.
#[derive(Debug)]
pub enum ExecWait {
    /// It ran to its end (an exit code, or a signal).
    Exited(ExecStatus),
    /// The guest did not start it: qemu-ga's answer, which PVE forwards as an HTTP 500. A program
    /// the guest lacks is this ("Failed to execute child process ... (No such file or
    /// directory)"), not an exit code 127; so is an agent that is not running.
    NotStarted(Error),
    /// The guest's agent lost it while it ran: qemu-ga forgets a pid once its status was
    /// collected, or when it restarts ("Agent error: Invalid parameter 'pid'").
    Lost(Error),
    /// Still running at the deadline (left running in the guest).
    TimedOut,
}

/// Pauses between two `exec-status` polls.
const EXEC_POLL: PollSchedule = doubling(Duration::from_millis(100), Duration::from_secs(2));

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

    /// Runs `command` (program and arguments, no shell) and polls until it exits or `deadline`
    /// passes (one last poll at the deadline). The guest's own errors are an [`ExecWait`];
    /// `Err` is the Proxmox side failing. The one exec-and-wait of build and validation.
    /// `idem`: `Safe` only for a command that only reads (a check): run twice it answers the
    /// same, so a lost answer is followed by running it again; else `Unsafe`.
    pub async fn agent_exec_wait<S: AsRef<str>>(
        &self,
        node: &str,
        vmid: u32,
        command: &[S],
        idem: Idempotency,
        deadline: Instant,
    ) -> Result<ExecWait> {
        let pid = match self.agent_exec_as(node, vmid, command, None, idem).await {
            Ok(pid) => pid,
            Err(e) if e.is_guest_side() => return Ok(ExecWait::NotStarted(e)),
            Err(e) => return Err(e),
        };
        let status = poll_until(deadline, EXEC_POLL, || async move {
            match self.agent_exec_status(node, vmid, pid).await {
                Ok(s) if s.exited => ControlFlow::Break(Ok(ExecWait::Exited(s))),
                Ok(_) => ControlFlow::Continue(()),
                Err(e) if e.is_guest_side() => ControlFlow::Break(Ok(ExecWait::Lost(e))),
                Err(e) => ControlFlow::Break(Err(e)),
            }
        })
        .await;
        status.unwrap_or(Ok(ExecWait::TimedOut))
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
