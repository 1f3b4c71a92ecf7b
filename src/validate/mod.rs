//! Validation: boot-test a finished template the way a consumer uses it, through a throwaway
//! clone, before it may become "latest".
//!
//! # API (what the controller calls)
//!
//! ```no_run
//! # use sombrero::{api, image::marker::Owner, proxmox::Client};
//! use sombrero::promote::{self, Evidence};
//! use sombrero::validate::{self, NoProgress, ValidationRequest};
//! # async fn example(client: Client, owner: Owner, spec: api::golden_image::Validation)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! let vmid = 8024;
//! let request = ValidationRequest::new(vmid, "pve1", owner.clone(), spec);
//! let report = validate::validate_template(&client, &request, &NoProgress).await?;
//! let status: api::golden_image::ValidationReport = (&report).into();   // status.lastValidation
//! if report.passed { promote::promote(&client, &owner, vmid, Evidence::Report(&report)).await?; }
//! else { promote::mark_failed(&client, vmid, &report.failure_reason().unwrap_or_default()).await?; }
//! // On every reconcile (cheap: one inventory list), after a crash in particular:
//! validate::cleanup_stale_validation_vms(&client, &owner).await?;
//! # let _ = status; Ok(()) }
//! ```
//!
//! - [`validate_template`]`(client, &`[`ValidationRequest`]`, &dyn `[`ValidationProgress`]`) ->
//!   Result<`[`ValidationReport`]`, `[`ValidateError`]`>`. `Err` only for infrastructure trouble
//!   (Proxmox unreachable, auth, the template not ours, a bad request) with
//!   [`ValidateError::category`] / [`ValidateError::is_retryable`]; a failed check is
//!   `Ok(report)` with `passed: false`.
//! - [`cleanup_stale_validation_vms`]`(client, &owner) -> Result<Vec<u32>, ValidateError>`:
//!   destroys leftover validation clones of this owner (found by marker), returns their VMIDs.
//!
//! # What a validation does
//!
//! 1. Leftover validation clones of the same owner are destroyed first (one validation per
//!    owner at a time: the controller must not run two for one GoldenImage at once).
//! 2. A linked clone of the template (a full clone onto `storage` when the template's disks sit
//!    on storage that cannot link), born with our marker (role `validation`, written for the
//!    clone's VMID) in its description, so a crash at any later point leaves a VM that
//!    [`cleanup_stale_validation_vms`] recognises. Its tags become `sombrero`, the image tag and
//!    `sombrero-validation`: the template's channel tags are not copied, so no consumer ever
//!    selects the clone.
//! 3. cloud-init: a throwaway user (`ssh.user`) and a fresh ed25519 key (made in memory, never
//!    logged or stored; dropped when the run ends), `ipconfig0` from `ssh.ipConfig`, `net0` on
//!    `bridge`.
//! 4. Start, then the checks of `spec.checks` in this order, each timed:
//!    `boot` (Proxmox reports it running), `guestAgent` (a ping answers within
//!    [`ValidationRequest::agent_timeout`]), `cloudInit` (`cloud-init status --wait` via agent
//!    exec reports `done`), `ssh` (`systemctl is-active ssh`/`sshd`, then per
//!    [`SshProbe`] a TCP connect or an SSH login with the throwaway key and `true`),
//!    `packageDrift` (`dpkg-query` lists exactly baseline + `allowedExtraPackages`; added and
//!    removed packages are named). A check whose prerequisite failed (no agent, not running)
//!    fails at once with a message that says so, instead of waiting out its own timeout. The
//!    whole run is bounded by `spec.timeout`; checks not reached fail with "timed out".
//! 5. The clone is stopped and destroyed: after success, failure and timeout. If the future is
//!    dropped (the controller is shutting down), a background task destroys it; if the process
//!    dies, the next [`cleanup_stale_validation_vms`] does.
//!
//! Only VMs with our marker written for their own VMID are ever changed or destroyed: a
//! consumer's clone of a template carries a copy of the marker naming another VMID and is left
//! alone.

mod check;
mod cleanup;
mod cloud_init;
pub mod drift;
mod error;
mod report;
mod run;

use std::time::Duration;

pub use check::{Check, plan_checks};
pub use cleanup::{cleanup_stale_validation_vms, destroy_validation_vm};
pub use drift::{PackageDrift, compute_drift, parse_installed};
pub use error::ValidateError;
pub use report::{CheckOutcome, ValidationReport};
pub use run::validate_template;

use crate::api::golden_image::{SshBuild, Validation};
use crate::image::marker::Owner;

/// Default wait for the guest agent: a cloud image's first boot (cloud-init growing the disk,
/// regenerating host keys) takes 30-110 s on real hardware.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(300);

/// The tag every validation clone carries besides `sombrero` and the image tag.
pub const VALIDATION_TAG: &str = "sombrero-validation";

/// How far the `ssh` check goes beyond `systemctl is-active ssh` in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SshProbe {
    /// Only the service state (the controller cannot reach the VM network).
    ServiceOnly,
    /// Also a TCP connect to the clone's address and `ssh.port`.
    Connect,
    /// Also an SSH login as `ssh.user` with the throwaway key, running `true`. The default:
    /// what a consumer does first.
    #[default]
    Login,
}

/// What to validate and how. The controller fills it from the GoldenImage spec and the
/// template's marker.
#[derive(Debug, Clone)]
pub struct ValidationRequest {
    /// The template to validate (ours: marker role `template` written for this VMID).
    pub template_vmid: u32,
    /// Node that holds the template; the clone is made there.
    pub node: String,
    /// The GoldenImage; written into the clone's marker and used to find leftovers.
    pub owner: Owner,
    /// `spec.validation`: checks, allowed extra packages, overall timeout.
    pub spec: Validation,
    /// The network and login of the clone: `ipConfig` (a static IP is also where SSH connects;
    /// with `ip=dhcp` the address the agent reports), `host` (overrides the address), `port`,
    /// `user` (the throwaway cloud-init user).
    pub ssh: SshBuild,
    /// How far the `ssh` check goes. Use [`SshProbe::ServiceOnly`] when the controller cannot
    /// reach the VM network (e.g. `provisioning.via: guestAgent`).
    pub ssh_probe: SshProbe,
    /// The build's package manifest (names; `name=version` and `:arch` are accepted).
    pub baseline_packages: Vec<String>,
    /// Target storage of a full clone (used only when the template's storage cannot link).
    pub storage: String,
    /// Bridge of the clone's `net0`.
    pub bridge: String,
    pub vlan: Option<u16>,
    /// Resource pool of the clone.
    pub pool: Option<String>,
    /// Longest wait for the agent to answer; bounded by `spec.timeout`.
    pub agent_timeout: Duration,
}

impl ValidationRequest {
    /// A request with the defaults for everything the spec does not say.
    pub fn new(
        template_vmid: u32,
        node: impl Into<String>,
        owner: Owner,
        spec: Validation,
    ) -> Self {
        ValidationRequest {
            template_vmid,
            node: node.into(),
            owner,
            spec,
            ssh: SshBuild::default(),
            ssh_probe: SshProbe::default(),
            baseline_packages: Vec::new(),
            storage: "local-lvm".into(),
            bridge: "vmbr0".into(),
            vlan: None,
            pool: None,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
        }
    }
}

/// Something that happened during a validation, for events, logs and `status.build.message`.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// Leftover clones of this owner were destroyed before starting.
    LeftoversDestroyed { vmids: Vec<u32> },
    /// The clone exists (`linked` false: a full copy).
    CloneCreated { vmid: u32, linked: bool },
    /// The clone was started; checks begin.
    Started { vmid: u32 },
    /// One check finished.
    CheckFinished(CheckOutcome),
    /// The clone is gone.
    CloneDestroyed { vmid: u32 },
}

/// Receives [`ProgressEvent`]s. Any `Fn(&ProgressEvent) + Send + Sync` closure is one; use
/// [`NoProgress`] to ignore them.
pub trait ValidationProgress: Send + Sync {
    fn event(&self, event: &ProgressEvent);
}

impl<F: Fn(&ProgressEvent) + Send + Sync> ValidationProgress for F {
    fn event(&self, event: &ProgressEvent) {
        self(event)
    }
}

/// Ignores progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ValidationProgress for NoProgress {
    fn event(&self, _: &ProgressEvent) {}
}

/// Cuts a failure reason for a marker or a condition to at most `max` bytes.
pub fn truncate_reason(reason: &str, max: usize) -> String {
    report::truncate(reason.to_string(), max)
}
