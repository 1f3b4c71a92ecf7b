//! The validation run against Proxmox: clone, configure, start, check, destroy.

use std::ops::ControlFlow;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::check::{Check, plan_checks};
use super::cleanup::{CLONE_NAME_PREFIX, cleanup_stale_validation_vms, destroy_validation_vm};
use super::cloud_init;
use super::drift::{PackageDrift, compute_drift, dpkg_query, parse_installed};
use super::error::ValidateError;
use super::report::{CheckOutcome, ValidationReport};
use super::{ProgressEvent, SshProbe, VALIDATION_TAG, ValidationProgress, ValidationRequest};
use crate::builder::{first_ipv4, static_ip};
use crate::image::marker::{Ownership, Role, ownership, parse_description, render_description};
use crate::image::tags::{OWNER_TAG, TagSet, image_tag};
use crate::poll::{doubling, poll_until};
use crate::proxmox::readback::{TaskCall, run_task};
use crate::proxmox::{
    self, Client, CloneRequest, ConfigUpdate, ExecStatus, ExecWait, Idempotency, QemuConfig,
    StorageInfo, VmConfig,
};
use crate::ssh::{self, ThrowawayKey};

/// Longest a clone or start task may take.
const TASK_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for `running` after a successful start task.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long sshd may lag behind the agent at first boot.
const SSH_TIMEOUT: Duration = Duration::from_secs(120);
/// One TCP connect / SSH login attempt.
const SSH_ATTEMPT: Duration = Duration::from_secs(10);
/// Comment of the clone's public key, so a person who finds it in `sshkeys` knows its origin.
const VALIDATION_KEY_COMMENT: &str = "sombrero-validation";
/// Attempts at a free VMID (`nextid` does not reserve one).
const VMID_ATTEMPTS: u32 = 5;

/// Validates a template through a throwaway clone; see the module docs for the steps.
/// `Ok(report)` whether the checks passed or not; `Err` only for infrastructure trouble.
pub async fn validate_template(
    client: &Client,
    req: &ValidationRequest,
    progress: &dyn ValidationProgress,
) -> Result<ValidationReport, ValidateError> {
    let checks =
        plan_checks(&req.spec.checks).map_err(|message| ValidateError::InvalidRequest {
            field: "validation.checks".into(),
            message,
        })?;
    let total = req
        .spec
        .timeout
        .parsed()
        .ok()
        .and_then(|d| d.to_std().ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ValidateError::InvalidRequest {
            field: "validation.timeout".into(),
            message: format!(
                "{:?} is not a duration such as 10m or 1h30m",
                req.spec.timeout
            ),
        })?;
    let started_at = Utc::now();
    let deadline = Instant::now() + total;
    let node = req.node.as_str();
    let tvmid = req.template_vmid;

    let template = client
        .vm_config(node, tvmid)
        .await
        .map_err(|e| ValidateError::proxmox(format!("reading template {tvmid}"), e))?;
    let marker = check_template(&template, req)?;

    let leftovers = cleanup_stale_validation_vms(client, &req.owner).await?;
    if !leftovers.is_empty() {
        progress.event(&ProgressEvent::LeftoversDestroyed { vmids: leftovers });
    }

    let key = ThrowawayKey::generate(VALIDATION_KEY_COMMENT).map_err(|message| {
        ValidateError::InvalidRequest {
            field: "ssh key".into(),
            message,
        }
    })?;
    let storages = client
        .storages(node, None)
        .await
        .map_err(|e| ValidateError::proxmox(format!("listing the storages of {node}"), e))?;
    let linked = can_link(&template, &storages);
    let (vmid, linked) = create_clone(client, req, &marker, &template, linked).await?;
    progress.event(&ProgressEvent::CloneCreated { vmid, linked });
    info!(
        template = tvmid,
        clone = vmid,
        linked,
        "validation clone created"
    );

    // Whatever happens from here on, the clone goes: the guard covers a dropped future.
    let mut guard = CloneGuard::new(client, node, vmid);
    let ran = run_checks(client, req, vmid, &key, &checks, deadline, progress).await;
    guard.disarm();
    let destroyed = destroy_validation_vm(client, node, vmid).await;
    let finished_at = Utc::now();
    let (outcomes, drift) = match ran {
        Ok(r) => r,
        Err(e) => {
            if let Err(d) = destroyed {
                warn!(clone = vmid, error = %d, "destroying the validation clone failed; the next cleanup retries");
            }
            return Err(e);
        }
    };
    let report = ValidationReport::new(tvmid, Some(vmid), started_at, finished_at, outcomes, drift);
    match destroyed {
        Ok(_) => {
            progress.event(&ProgressEvent::CloneDestroyed { vmid });
            info!(template = tvmid, clone = vmid, passed = report.passed, summary = %report.summary(), "validation finished");
            Ok(report)
        }
        Err(ValidateError::Proxmox { source, .. }) => Err(ValidateError::Cleanup {
            vmid,
            source,
            report: Box::new(report),
        }),
        Err(e) => Err(e),
    }
}

/// The template must carry our marker, written for its VMID, of this owner, and be a template.
fn check_template(
    template: &VmConfig,
    req: &ValidationRequest,
) -> Result<crate::image::Marker, ValidateError> {
    let vmid = req.template_vmid;
    let not_ours = |reason: String| ValidateError::NotOurs { vmid, reason };
    let marker = parse_description(template.description.as_deref().unwrap_or(""))
        .map_err(|e| not_ours(e.to_string()))?
        .ok_or_else(|| not_ours("its description has no sombrero marker".into()))?;
    match ownership(Some(&marker), vmid) {
        Ownership::Ours(Role::Template) => {}
        Ownership::Ours(role) => {
            return Err(not_ours(format!(
                "its marker has role {role:?}, not template (the build has not finished)"
            )));
        }
        _ => {
            return Err(not_ours(format!(
                "its marker was written for VM {} (a clone of our template, not ours)",
                marker.vmid
            )));
        }
    }
    if marker.owner.namespace != req.owner.namespace || marker.owner.name != req.owner.name {
        return Err(not_ours(format!(
            "it belongs to {}/{}, not {}/{}",
            marker.owner.namespace, marker.owner.name, req.owner.namespace, req.owner.name
        )));
    }
    if !template.template {
        return Err(ValidateError::InvalidRequest {
            field: "template_vmid".into(),
            message: format!("VM {vmid} is not a template (template=1) yet"),
        });
    }
    Ok(marker)
}

/// Disk keys of a VM config whose volumes a clone copies or links.
fn disk_volumes(config: &VmConfig) -> Vec<String> {
    let is_disk_key = |k: &str| {
        ["scsi", "virtio", "sata", "ide"].iter().any(|p| {
            k.strip_prefix(p)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }) || k == "efidisk0"
            || k == "tpmstate0"
    };
    config
        .extra
        .keys()
        .filter(|k| is_disk_key(k))
        .filter_map(|k| config.value(k))
        .filter(|v| {
            !v.contains("media=cdrom") && !v.contains("cloudinit") && !v.starts_with("none")
        })
        .map(|v| v.split(',').next().unwrap_or_default().to_string())
        .collect()
}

/// Whether every disk of the template sits where PVE can make a linked clone: thin storages,
/// or qcow2 files on file storages. Unknown storages count as linkable; PVE's refusal then
/// falls back to a full clone.
pub(crate) fn can_link(template: &VmConfig, storages: &[StorageInfo]) -> bool {
    disk_volumes(template).iter().all(|volume| {
        let Some((storage, path)) = volume.split_once(':') else {
            return true;
        };
        match storages
            .iter()
            .find(|s| s.storage == storage)
            .map(|s| s.kind.as_str())
        {
            Some("lvmthin" | "zfspool" | "zfs" | "rbd" | "btrfs") => true,
            Some("dir" | "nfs" | "cifs" | "glusterfs" | "cephfs") => path.ends_with(".qcow2"),
            Some(_) => false,
            None => true,
        }
    })
}

/// Makes the clone with its marker in the description from the first moment, retrying on a
/// taken VMID; falls back to a full clone when PVE refuses to link.
async fn create_clone(
    client: &Client,
    req: &ValidationRequest,
    marker: &crate::image::Marker,
    template: &VmConfig,
    mut linked: bool,
) -> Result<(u32, bool), ValidateError> {
    let node = req.node.as_str();
    let tvmid = req.template_vmid;
    let mut last_taken = None;
    for _ in 0..VMID_ATTEMPTS {
        let mut vmid = client
            .next_vmid()
            .await
            .map_err(|e| ValidateError::proxmox("allocating a VMID", e))?;
        if last_taken.is_some_and(|t| vmid <= t) {
            vmid = last_taken.unwrap_or(vmid) + 1;
        }
        let clone_marker = marker.retarget(Role::Validation, vmid);
        let description =
            render_description(template.description.as_deref().unwrap_or(""), &clone_marker)
                .or_else(|_| render_description("", &clone_marker))
                .map_err(|e| ValidateError::InvalidRequest {
                    field: "marker".into(),
                    message: e.to_string(),
                })?;
        let request = CloneRequest {
            newid: vmid,
            name: Some(format!("{CLONE_NAME_PREFIX}{tvmid}")),
            description: Some(description),
            full: Some(!linked),
            target: None,
            storage: (!linked).then(|| req.storage.clone()),
            pool: req.pool.clone(),
        };
        // A lost answer is read back: the clone task found in the node's list (a clone's
        // UPID names the template) is waited for, never a second clone made beside it.
        let what = TaskCall {
            node,
            vmid: Some(tvmid),
            task_type: "qmclone",
            id: tvmid.to_string(),
        };
        let request = &request;
        let result = run_task(client, &what, TASK_TIMEOUT, move || async move {
            client.clone_vm(node, tvmid, request).await.map(Some)
        })
        .await;
        match result {
            Ok(_) => return Ok((vmid, linked)),
            Err(e) if e.is_already_exists() => {
                last_taken = Some(vmid);
                continue;
            }
            Err(e) if linked && refuses_linking(&e) => {
                // A failed clone may leave a half-made VM; it carries our marker.
                destroy_validation_vm(client, node, vmid).await?;
                linked = false;
                continue;
            }
            Err(e) => {
                // The task may have created the VM before failing: remove what is ours.
                let _ = destroy_validation_vm(client, node, vmid).await;
                return Err(ValidateError::proxmox(
                    format!("cloning template {tvmid} to {vmid}"),
                    e,
                ));
            }
        }
    }
    Err(ValidateError::proxmox(
        format!("cloning template {tvmid}"),
        proxmox::Error::AlreadyExists {
            request: "POST clone".into(),
            message: format!(
                "no free VMID after {VMID_ATTEMPTS} attempts (others are creating VMs at the same time)"
            ),
        },
    ))
}

fn refuses_linking(e: &proxmox::Error) -> bool {
    e.pve_message().is_some_and(|m| {
        m.to_ascii_lowercase()
            .contains("linked clone feature is not supported")
    })
}

/// Destroys the clone in the background if the validation future is dropped mid-way.
struct CloneGuard {
    armed: Option<(Client, String, u32)>,
}

impl CloneGuard {
    fn new(client: &Client, node: &str, vmid: u32) -> Self {
        CloneGuard {
            armed: Some((client.clone(), node.to_string(), vmid)),
        }
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

impl Drop for CloneGuard {
    fn drop(&mut self) {
        let Some((client, node, vmid)) = self.armed.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            warn!(
                clone = vmid,
                "validation interrupted; destroying its clone in the background"
            );
            handle.spawn(async move {
                if let Err(e) = destroy_validation_vm(&client, &node, vmid).await {
                    warn!(clone = vmid, error = %e, "destroying an interrupted validation's clone failed; the next cleanup retries");
                }
            });
        }
    }
}

/// The clone's cloud-init and network settings, and its tags.
fn clone_config(req: &ValidationRequest, clone: &VmConfig, key: &ThrowawayKey) -> ConfigUpdate {
    let mut set = QemuConfig::new()
        .ciuser(&req.ssh.user)
        .sshkeys(&[key.public_openssh.as_str()])
        .ipconfig(0, &req.ssh.ip_config)
        .net(
            0,
            &net0(clone.value("net0").as_deref(), &req.bridge, req.vlan),
        );
    let mut tags = TagSet::new();
    tags.insert(OWNER_TAG);
    tags.insert(&image_tag(&req.owner.namespace, &req.owner.name));
    tags.insert(VALIDATION_TAG);
    set = set.set("tags", tags.to_config_string());
    let has_cloudinit = clone
        .extra
        .values()
        .any(|v| v.as_str().is_some_and(|s| s.contains("cloudinit")));
    if !has_cloudinit {
        // Without a cloud-init drive the user and key would not reach the guest; consumers add
        // one too (Terraform, Cluster API).
        let slot = ["ide2", "ide0", "ide1", "ide3", "sata5"]
            .into_iter()
            .find(|s| clone.value(s).is_none())
            .unwrap_or("ide2");
        set = set.set(slot, format!("{}:cloudinit", req.storage));
    }
    ConfigUpdate::new(set)
}

/// `net0` on `bridge` (and `vlan`), keeping the model and MAC of the template's `net0`.
pub(crate) fn net0(existing: Option<&str>, bridge: &str, vlan: Option<u16>) -> String {
    let mut parts: Vec<String> = existing
        .unwrap_or("virtio")
        .split(',')
        .filter(|p| !p.is_empty() && !p.starts_with("bridge=") && !p.starts_with("tag="))
        .map(str::to_string)
        .collect();
    if parts.is_empty() {
        parts.push("virtio".into());
    }
    parts.push(format!("bridge={bridge}"));
    if let Some(tag) = vlan {
        parts.push(format!("tag={tag}"));
    }
    parts.join(",")
}

/// Why a command did not start in the guest: the command, then the agent's words (an unknown
/// program is qemu-ga's "Failed to execute child process ... (No such file or directory)",
/// forwarded by PVE as a 500, not an exit code 127).
fn could_not_start(line: &str, e: &proxmox::Error) -> String {
    format!(
        "`{line}` could not start in the guest: {}",
        e.pve_message().unwrap_or("guest agent error")
    )
}

/// State shared by the checks of one run.
struct Run<'a> {
    client: &'a Client,
    req: &'a ValidationRequest,
    node: &'a str,
    vmid: u32,
    key: &'a ThrowawayKey,
    deadline: Instant,
    /// `None` until checked; `Some(Err(why))` when the agent never answered.
    agent: Option<Result<(), String>>,
    /// `Some(Err(why))` when the clone did not come up.
    boot: Option<Result<(), String>>,
    agent_enabled: bool,
    drift: Option<PackageDrift>,
}

type CheckResult = Result<Result<String, String>, ValidateError>;

async fn run_checks(
    client: &Client,
    req: &ValidationRequest,
    vmid: u32,
    key: &ThrowawayKey,
    checks: &[Check],
    deadline: Instant,
    progress: &dyn ValidationProgress,
) -> Result<(Vec<CheckOutcome>, Option<PackageDrift>), ValidateError> {
    let node = req.node.as_str();
    let clone = client
        .vm_config(node, vmid)
        .await
        .map_err(|e| ValidateError::proxmox(format!("reading clone {vmid}"), e))?;
    let configuring = |e| ValidateError::proxmox(format!("configuring clone {vmid}"), e);
    match client
        .update_vm_config(node, vmid, &clone_config(req, &clone, key))
        .await
    {
        Ok(()) => {}
        // The write may add a cloud-init drive, so it is not repeated blindly: read what is
        // there, then write again without what the lost write added already.
        Err(e) if e.outcome_unknown() => {
            let now = client
                .vm_config(node, vmid)
                .await
                .map_err(|e| ValidateError::proxmox(format!("reading clone {vmid}"), e))?;
            client
                .update_vm_config(node, vmid, &clone_config(req, &now, key))
                .await
                .map_err(configuring)?;
        }
        Err(e) => return Err(configuring(e)),
    }
    let mut run = Run {
        client,
        req,
        node,
        vmid,
        key,
        deadline,
        agent: None,
        boot: None,
        agent_enabled: clone.agent_enabled(),
        drift: None,
    };
    let boot_started = Instant::now();
    run.boot = Some(run.start().await?);
    progress.event(&ProgressEvent::Started { vmid });
    let mut outcomes = Vec::new();
    for (i, &check) in checks.iter().enumerate() {
        // The boot wait counts towards the `boot` check.
        let started = if i == 0 && check == Check::Boot {
            boot_started
        } else {
            Instant::now()
        };
        let result = if Instant::now() >= run.deadline {
            Err(format!(
                "not run: the validation's timeout ({}) ran out",
                req.spec.timeout
            ))
        } else {
            run.check(check).await?
        };
        let elapsed = started.elapsed();
        let outcome = match result {
            Ok(msg) => CheckOutcome::pass(check, elapsed, msg),
            Err(msg) => CheckOutcome::fail(check, elapsed, msg),
        };
        progress.event(&ProgressEvent::CheckFinished(outcome.clone()));
        outcomes.push(outcome);
    }
    Ok((outcomes, run.drift.take()))
}

impl Run<'_> {
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn timed_out(&self, what: &str) -> String {
        format!(
            "{what}: the validation's timeout ({}) ran out",
            self.req.spec.timeout
        )
    }

    /// Starts the clone and waits until Proxmox reports it running.
    async fn start(&self) -> Result<Result<(), String>, ValidateError> {
        let (client, node, vmid) = (self.client, self.node, self.vmid);
        let what = TaskCall {
            node,
            vmid: Some(vmid),
            task_type: "qmstart",
            id: vmid.to_string(),
        };
        let started = run_task(
            client,
            &what,
            TASK_TIMEOUT.min(self.remaining()),
            move || async move { client.start_vm(node, vmid).await.map(Some) },
        )
        .await;
        match started {
            Ok(_) => {}
            // The start task failing is the template's problem (e.g. a broken disk).
            Err(proxmox::Error::TaskFailed { exitstatus, .. }) => {
                return Ok(Err(format!("start failed: {exitstatus}")));
            }
            Err(proxmox::Error::Timeout { .. }) if self.remaining().is_zero() => {
                return Ok(Err(self.timed_out("start")));
            }
            Err(e) => return Err(ValidateError::proxmox(format!("starting clone {vmid}"), e)),
        }
        let limit = Instant::now() + RUNNING_TIMEOUT.min(self.remaining());
        let schedule = doubling(Duration::from_millis(200), Duration::from_secs(2));
        let running = poll_until(limit, schedule, || async {
            match client.vm_status(node, vmid).await {
                Ok(status) if status.is_running() => ControlFlow::Break(Ok(())),
                Ok(status) => ControlFlow::Continue(status.status),
                Err(e) => ControlFlow::Break(Err(ValidateError::proxmox(
                    format!("reading the status of clone {vmid}"),
                    e,
                ))),
            }
        })
        .await;
        match running {
            Ok(read) => read.map(Ok),
            Err(status) => Ok(Err(format!(
                "the start task succeeded but the VM is {status} after {}s",
                RUNNING_TIMEOUT.min(self.remaining()).as_secs()
            ))),
        }
    }

    async fn check(&mut self, check: Check) -> CheckResult {
        if let Some(Err(why)) = &self.boot {
            return Ok(Err(if check == Check::Boot {
                why.clone()
            } else {
                format!("not run: the clone did not boot ({why})")
            }));
        }
        if check.needs_agent()
            && let Err(why) = self.wait_agent().await?
        {
            return Ok(Err(format!("not run: needs the guest agent, which {why}")));
        }
        match check {
            Check::Boot => Ok(Ok("the clone is running".into())),
            Check::GuestAgent => Ok(self
                .wait_agent()
                .await?
                .map(|()| "the guest agent answers".to_string())
                .map_err(|why| format!("the guest agent {why}"))),
            Check::CloudInit => self.cloud_init().await,
            Check::Ssh => self.ssh().await,
            Check::PackageDrift => self.package_drift().await,
        }
    }

    /// Waits for the agent once; later checks reuse the answer. `Err(why)` completes "the
    /// guest agent ...".
    async fn wait_agent(&mut self) -> Result<Result<(), String>, ValidateError> {
        if let Some(known) = &self.agent {
            return Ok(known.clone());
        }
        let result = if !self.agent_enabled {
            Err("is not enabled in the template's config (set agent: 1); consumers' clones would lack it too".to_string())
        } else {
            let budget = self.req.agent_timeout.min(self.remaining());
            let limit = Instant::now() + budget;
            let (client, node, vmid) = (self.client, self.node, self.vmid);
            let schedule = doubling(Duration::from_millis(200), Duration::from_secs(5));
            let answered = poll_until(limit, schedule, || async {
                match client.agent_ping(node, vmid).await {
                    Ok(()) => ControlFlow::Break(Ok(())),
                    Err(e) if e.is_guest_side() => ControlFlow::Continue(e),
                    Err(e) => ControlFlow::Break(Err(e)),
                }
            })
            .await;
            match answered {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    return Err(ValidateError::proxmox(
                        format!("pinging the guest agent of clone {vmid}"),
                        e,
                    ));
                }
                Err(e) => Err(format!(
                    "did not answer within {}s ({})",
                    budget.as_secs(),
                    e.pve_message().unwrap_or("no answer")
                )),
            }
        };
        self.agent = Some(result.clone());
        Ok(result)
    }

    /// Runs a command through the agent until it exits or the deadline passes. Inner `Err`: the
    /// guest could not run it (agent gone, timed out).
    async fn exec(
        &mut self,
        command: &[&str],
    ) -> Result<Result<ExecStatus, String>, ValidateError> {
        let line = command.join(" ");
        let infra =
            |e| ValidateError::proxmox(format!("running `{line}` in clone {}", self.vmid), e);
        match self
            .client
            // Every check command only reads: a lost answer is followed by running it again.
            .agent_exec_wait(
                self.node,
                self.vmid,
                command,
                Idempotency::Safe,
                self.deadline,
            )
            .await
        {
            Ok(ExecWait::Exited(s)) => Ok(Ok(s)),
            Ok(ExecWait::NotStarted(e)) => Ok(Err(could_not_start(&line, &e))),
            Ok(ExecWait::Lost(e)) => Ok(Err(format!(
                "`{line}`: {}",
                e.pve_message().unwrap_or("agent error")
            ))),
            Ok(ExecWait::TimedOut) => Ok(Err(self.timed_out(&format!("`{line}` still running")))),
            Err(e) => Err(infra(e)),
        }
    }

    async fn cloud_init(&mut self) -> CheckResult {
        let s = match self.exec(&cloud_init::COMMAND).await? {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        Ok(cloud_init::verdict(
            s.exitcode,
            s.out_data.as_deref().unwrap_or(""),
            &detail(&s),
        ))
    }

    async fn ssh(&mut self) -> CheckResult {
        let mut service = None;
        let mut states = Vec::new();
        for unit in ["ssh", "sshd"] {
            let s = match self.exec(&["systemctl", "is-active", unit]).await? {
                Ok(s) => s,
                Err(why) => return Ok(Err(why)),
            };
            let state = s.out_data.as_deref().unwrap_or("").trim().to_string();
            if s.succeeded() && state == "active" {
                service = Some(unit);
                break;
            }
            states.push(format!(
                "{unit}: {}",
                if state.is_empty() { "unknown" } else { &state }
            ));
        }
        let Some(unit) = service else {
            return Ok(Err(format!(
                "the SSH service is not active ({})",
                states.join(", ")
            )));
        };
        if self.req.ssh_probe == SshProbe::ServiceOnly {
            return Ok(Ok(format!("{unit}.service is active")));
        }
        let host = match self.address().await? {
            Ok(h) => h,
            Err(why) => return Ok(Err(format!("{unit}.service is active, but {why}"))),
        };
        let port = self.req.ssh.port;
        let limit = Instant::now() + SSH_TIMEOUT.min(self.remaining());
        let schedule = doubling(Duration::from_millis(200), Duration::from_secs(5));
        let (req, key) = (self.req, self.key);
        let probed = poll_until(limit, schedule, || async {
            let attempt = SSH_ATTEMPT.min(
                limit
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1)),
            );
            let result = match req.ssh_probe {
                SshProbe::Connect => ssh::tcp_connect(&host, port, attempt).await.map(|()| {
                    format!("{unit}.service is active and {host}:{port} accepts TCP connections")
                }),
                _ => ssh::login_probe(&host, port, &req.ssh.user, key, attempt).await.map(|()| {
                    format!("{unit}.service is active and {} logged in to {host}:{port} with the cloud-init key", req.ssh.user)
                }),
            };
            match result {
                Ok(msg) => ControlFlow::Break(msg),
                Err(why) => ControlFlow::Continue(why),
            }
        })
        .await;
        Ok(probed)
    }

    /// Where to reach the clone: `ssh.host`, the static IP of `ssh.ipConfig`, else the first
    /// non-loopback IPv4 address the agent reports.
    async fn address(&mut self) -> Result<Result<String, String>, ValidateError> {
        if let Some(h) = self.req.ssh.host.as_deref().filter(|h| !h.is_empty()) {
            return Ok(Ok(h.to_string()));
        }
        if let Some(ip) = static_ip(&self.req.ssh.ip_config) {
            return Ok(Ok(ip));
        }
        match self
            .client
            .agent_network_interfaces(self.node, self.vmid)
            .await
        {
            Ok(ifaces) => Ok(first_ipv4(&ifaces)
                .ok_or_else(|| "the agent reports no IPv4 address to connect to".to_string())),
            Err(e) if e.is_guest_side() => Ok(Err(format!(
                "its address is unknown ({})",
                e.pve_message().unwrap_or("agent error")
            ))),
            Err(e) => Err(ValidateError::proxmox(
                format!("reading the addresses of clone {}", self.vmid),
                e,
            )),
        }
    }

    async fn package_drift(&mut self) -> CheckResult {
        if self.req.baseline_packages.is_empty() {
            return Ok(Err(
                "no baseline package manifest was recorded for this template, so drift cannot be judged (rebuild it, or drop packageDrift from validation.checks)".into(),
            ));
        }
        let query = dpkg_query();
        let argv: Vec<&str> = query.iter().map(String::as_str).collect();
        let s = match self.exec(&argv).await? {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        if !s.succeeded() {
            return Ok(Err(format!(
                "`dpkg-query -W` exited {}{}",
                s.exitcode.unwrap_or(-1),
                detail(&s)
            )));
        }
        if s.out_truncated {
            return Ok(Err(
                "the package list was cut off by the guest agent; cannot compare it".into(),
            ));
        }
        let installed = parse_installed(s.out_data.as_deref().unwrap_or(""));
        let drift = compute_drift(
            &installed,
            &self.req.baseline_packages,
            &self.req.spec.allowed_extra_packages,
        );
        let msg = if drift.is_clean() {
            format!("{} installed packages match the baseline", installed.len())
        } else {
            drift.message(20)
        };
        let clean = drift.is_clean();
        self.drift = Some(drift);
        Ok(if clean { Ok(msg) } else { Err(msg) })
    }
}

/// `: <last lines of stderr, else of stdout>` for a failure message. The guest agent keeps the
/// two apart (`err-data`, `out-data`); lines of only the dots `cloud-init status --wait` prints
/// say nothing and are left out.
fn detail(s: &ExecStatus) -> String {
    let says = |l: &&str| !l.trim().trim_matches('.').is_empty();
    let text = s
        .err_data
        .as_deref()
        .filter(|e| e.lines().any(|l| says(&l)))
        .or(s.out_data.as_deref())
        .unwrap_or("");
    let lines: Vec<&str> = text.lines().filter(says).map(str::trim).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    format!(": {tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> VmConfig {
        serde_json::from_value(v).unwrap()
    }

    fn storage(name: &str, kind: &str) -> StorageInfo {
        StorageInfo {
            storage: name.into(),
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn linked_clones_where_the_storage_can() {
        let storages = [
            storage("local-lvm", "lvmthin"),
            storage("local", "dir"),
            storage("thick", "lvm"),
        ];
        let thin = config(
            json!({"scsi0": "local-lvm:base-9000-disk-0,size=10G", "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom"}),
        );
        assert!(can_link(&thin, &storages));
        let raw_dir = config(json!({"scsi0": "local:9000/base-9000-disk-0.raw,size=10G"}));
        assert!(!can_link(&raw_dir, &storages));
        let qcow_dir = config(json!({"virtio0": "local:9000/base-9000-disk-0.qcow2"}));
        assert!(can_link(&qcow_dir, &storages));
        let thick = config(
            json!({"scsi0": "thick:base-9000-disk-0", "efidisk0": "local-lvm:base-9000-disk-1"}),
        );
        assert!(!can_link(&thick, &storages));
        let unknown = config(json!({"scsi0": "ceph:base-9000-disk-0", "ide0": "none,media=cdrom"}));
        assert!(can_link(&unknown, &storages));
    }

    #[test]
    fn net0_keeps_model_and_mac() {
        assert_eq!(
            net0(
                Some("virtio=BC:24:11:00:00:01,bridge=vmbr1,tag=5,firewall=1"),
                "vmbr0",
                None
            ),
            "virtio=BC:24:11:00:00:01,firewall=1,bridge=vmbr0"
        );
        assert_eq!(net0(None, "vmbr2", Some(30)), "virtio,bridge=vmbr2,tag=30");
    }

    #[test]
    fn failure_detail_prefers_stderr_and_drops_the_dots() {
        let st = |out: Option<&str>, err: Option<&str>| ExecStatus {
            exited: true,
            exitcode: Some(1),
            out_data: out.map(str::to_string),
            err_data: err.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(
            detail(&st(
                Some("....\nstatus: error\n"),
                Some("Failed to load datasource\n")
            )),
            ": Failed to load datasource"
        );
        assert_eq!(
            detail(&st(Some("......\nstatus: error\n"), Some("\n"))),
            ": status: error"
        );
        assert_eq!(detail(&st(Some("..."), None)), "");
        let many: String = (1..=8).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            detail(&st(None, Some(&many))),
            ": line 4 | line 5 | line 6 | line 7 | line 8"
        );
    }

    #[test]
    fn guest_side_errors_are_not_infrastructure() {
        let guest_side = proxmox::Error::is_guest_side;
        let api = |m: &str| proxmox::Error::Api {
            request: "POST /x".into(),
            status: 500,
            message: m.into(),
        };
        assert!(guest_side(&api("QEMU guest agent is not running")));
        assert!(guest_side(&api("No QEMU guest agent configured")));
        assert!(guest_side(&api(
            "VM 100 qmp command 'guest-ping' failed - got timeout"
        )));
        assert!(guest_side(&api(
            "Agent error: Guest agent command failed, error was 'Failed to execute child process \u{201c}cloud-init\u{201d} (No such file or directory)'"
        )));
        assert!(guest_side(&api("Agent error: Invalid parameter 'pid'")));
        assert!(!guest_side(&api("permission denied")));
        let missing = api(
            "Agent error: Guest agent command failed, error was 'Failed to execute child process \u{201c}cloud-init\u{201d} (No such file or directory)'",
        );
        let why = could_not_start("cloud-init status --wait", &missing);
        assert!(
            why.starts_with(
                "`cloud-init status --wait` could not start in the guest: Agent error:"
            ) && why.contains("No such file or directory"),
            "{why}"
        );
        assert!(!guest_side(&proxmox::Error::Transient {
            request: "x".into(),
            message: "conn".into()
        }));
    }
}
