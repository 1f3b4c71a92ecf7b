//! Provisioning: a command channel into the build VM (SSH or the guest agent) and the run of the
//! seed's steps through it.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::commands::{self, Step};
use super::error::BuildError;
use super::{Progress, Stage};
use crate::poll::{PollSchedule, doubling, poll_until};
use crate::proxmox::{Client, ExecWait, Idempotency};
use crate::ssh::{CommandOutput, SshSession, ThrowawayKey};

/// The way into the guest.
pub enum Channel<'a> {
    Ssh(SshSession),
    Agent {
        client: &'a Client,
        node: String,
        vmid: u32,
    },
}

impl Channel<'_> {
    pub async fn run(&mut self, line: &str, deadline: Instant) -> Result<CommandOutput, String> {
        match self {
            Channel::Ssh(session) => {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(left, session.run(line))
                    .await
                    .map_err(|_| "timed out".to_string())?
            }
            Channel::Agent { client, node, vmid } => {
                agent_run(client, node, *vmid, line, deadline).await
            }
        }
    }

    pub async fn close(self) {
        if let Channel::Ssh(s) = self {
            s.close().await;
        }
    }
}

async fn agent_run(
    client: &Client,
    node: &str,
    vmid: u32,
    line: &str,
    deadline: Instant,
) -> Result<CommandOutput, String> {
    let st = match client
        .agent_exec_wait(
            node,
            vmid,
            &["/bin/sh", "-c", line],
            Idempotency::Unsafe,
            deadline.into(),
        )
        .await
    {
        Ok(ExecWait::Exited(st)) => st,
        Ok(ExecWait::NotStarted(e)) => return Err(format!("agent exec: {e}")),
        Ok(ExecWait::Lost(e)) => return Err(format!("agent exec-status: {e}")),
        Ok(ExecWait::TimedOut) => return Err("timed out".into()),
        Err(e) => return Err(format!("agent: {e}")),
    };
    let mut stderr = st.err_data.unwrap_or_default();
    if let Some(sig) = st.signal {
        stderr.push_str(&format!("\nkilled by signal {sig}"));
    }
    Ok(CommandOutput {
        exitcode: st
            .exitcode
            .unwrap_or(if st.signal.is_some() { -1 } else { 0 }),
        stdout: st.out_data.unwrap_or_default(),
        stderr,
    })
}

/// Waits until SSH accepts the build key (cloud-init has run) or the deadline passes.
pub async fn wait_for_ssh(
    host: &str,
    port: u16,
    user: &str,
    key: &ThrowawayKey,
    deadline: Instant,
    progress: &dyn Progress,
) -> Result<SshSession, BuildError> {
    progress.message(&format!("waiting for SSH on {host}:{port}"));
    poll_until(deadline.into(), GUEST_POLL, || async {
        let left = deadline.saturating_duration_since(Instant::now());
        match SshSession::connect(host, port, user, key, left.min(Duration::from_secs(30))).await {
            Ok(s) => ControlFlow::Break(s),
            Err(e) => ControlFlow::Continue(e),
        }
    })
    .await
    .map_err(|last| {
        BuildError::timeout(
            "wait for SSH",
            format!("SSH on {host}:{port} did not accept the build key in time: {last}"),
            "check provisioning.ssh (ipConfig, host, port, user) and that the build network is reachable from sombrero; raise provisioning.timeout for slow boots",
        )
        .at(Stage::Provision)
    })
}

/// Pauses between two tries of SSH or of the agent while the build VM boots.
const GUEST_POLL: PollSchedule = doubling(Duration::from_millis(200), Duration::from_secs(5));

/// Why the build waits for the guest agent; says what to change when it never answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentWait {
    /// `provisioning.via: guestAgent`: the agent is the command channel.
    Channel,
    /// SSH to a DHCP address: only the agent can report it.
    Address,
}

impl AgentWait {
    fn hint(self) -> &'static str {
        match self {
            AgentWait::Channel => {
                "provisioning.via guestAgent needs a source image with qemu-guest-agent installed and enabled; use via: ssh otherwise"
            }
            // Debian's and Ubuntu's cloud images ship without qemu-guest-agent: the build
            // installs it, but it only answers after the next boot (a static unit that udev
            // starts when the virtio port appears), i.e. in the clones, never in the build VM.
            AgentWait::Address => {
                "with provisioning.ssh.ipConfig ip=dhcp the build VM's address comes from the guest agent, which the source image lacks (cloud images ship without qemu-guest-agent); set provisioning.ssh.host or a static provisioning.ssh.ipConfig (ip=10.0.0.50/24,gw=10.0.0.1)"
            }
        }
    }
}

/// Waits until the guest agent answers, until `deadline`.
pub async fn wait_for_agent(
    client: &Client,
    node: &str,
    vmid: u32,
    deadline: Instant,
    why: AgentWait,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    progress.message(match why {
        AgentWait::Channel => "waiting for the guest agent",
        AgentWait::Address => "waiting for the guest agent to report the build VM's address",
    });
    poll_until(deadline.into(), GUEST_POLL, || async {
        match client.agent_ping(node, vmid).await {
            Ok(()) => ControlFlow::Break(()),
            Err(e) => ControlFlow::Continue(e),
        }
    })
    .await
    .map_err(|err| {
        BuildError::timeout(
            "wait for the guest agent",
            format!("the guest agent of VM {vmid} did not answer in time: {err}"),
            why.hint(),
        )
        .at(Stage::Provision)
    })
}

/// Runs steps in order; the first failure ends the run with the step and the stderr tail.
pub async fn run_steps(
    channel: &mut Channel<'_>,
    steps: &[Step],
    deadline: Instant,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    for step in steps {
        progress.message(&step.name);
        let out = run_step(channel, step, deadline).await?;
        if !step.apt_report {
            continue;
        }
        // Not errors, but nothing a person would expect from a rebuild: say so (see UPGRADE).
        let held = commands::kept_back(&out.stdout);
        if !held.is_empty() {
            tracing::warn!(step = %step.name, kept_back = ?held, "apt kept packages back");
            progress.message(&format!(
                "{}: apt kept back {} (not upgraded)",
                step.name,
                held.join(", ")
            ));
        }
        let gone = commands::removed(&out.stdout);
        if !gone.is_empty() {
            tracing::warn!(step = %step.name, removed = ?gone, "apt removed packages");
            progress.message(&format!("{}: apt removed {}", step.name, gone.join(", ")));
        }
    }
    Ok(())
}

pub async fn run_step(
    channel: &mut Channel<'_>,
    step: &Step,
    deadline: Instant,
) -> Result<CommandOutput, BuildError> {
    let out = channel.run(&step.line, deadline).await.map_err(|e| {
        if e == "timed out" {
            BuildError::timeout(
                &step.name,
                format!("{} did not finish before provisioning.timeout", step.name),
                "raise spec.provisioning.timeout, or check the guest (a prompt waiting for input?)",
            )
        } else if e.contains("Agent error:") {
            // qemu-ga refused the command itself (PVE's 500 "Agent error: ..."), e.g. a missing
            // program; the guest answered, the connection is fine.
            BuildError::guest(
                &step.name,
                format!("the guest agent could not run {}: {e}", step.name),
                Vec::new(),
                "the guest agent's answer is above; check that the image has the program (/bin/sh) and the agent works",
            )
        } else {
            BuildError::guest(
                &step.name,
                format!("could not run {}: {e}", step.name),
                Vec::new(),
                "the connection to the build VM broke; the next run resumes the build",
            )
        }
        .at(Stage::Provision)
    })?;
    if !step.ok_codes.contains(&out.exitcode) {
        let mut details = commands::tail(&out.stderr, 10);
        if details.is_empty() {
            details = commands::tail(&out.stdout, 10);
        }
        return Err(BuildError::guest(
            &step.name,
            format!("{} exited with {}", step.name, out.exitcode),
            details,
            "fix the command or package list in spec.provisioning (the output above is the guest's); set provisioning.keepFailedBuild: true to keep the build VM for debugging",
        )
        .at(Stage::Provision));
    }
    Ok(out)
}
