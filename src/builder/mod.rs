//! The image builder: from a cloud image or a base template to a versioned, tagged Proxmox VE
//! template, resumable at every step.
//!
//! # How callers use it
//!
//! ```no_run
//! # use sombrero::{api::GoldenImageSpec, image::marker::Owner, proxmox::Client};
//! use sombrero::builder::{BuildError, BuildRequest, NoProgress, run_build};
//! # async fn example(client: Client, spec: GoldenImageSpec, owner: Owner) -> Result<(), BuildError> {
//! let today = chrono::Utc::now().date_naive();
//! let req = BuildRequest { spec, owner, build_id: "b-20250118-001".into(), today, adopt_unvalidated: true,
//!                        fresh_id: false };
//! let outcome = run_build(&client, &req, &NoProgress).await?;
//! // outcome.vmid / outcome.name: an unvalidated template (validation `pending`).
//! # Ok(()) }
//! ```
//!
//! - The controller calls [`run_build`] from its reconciler and writes [`Progress`] into
//!   `status.build`; `sombrero build -f image.yaml` prints it on stderr.
//! - [`run_build`] **resumes**, never building twice:
//!   1. a template of this owner (marker written for its own VMID, role `template`) with the
//!      request's build id and spec hash is the finished build: its [`BuildOutcome`] is
//!      answered from the marker (manifest, checksum, validation) and nothing is touched;
//!   2. else a build VM of this owner (role `build`): with the same spec hash it continues from
//!      the stage its marker records (same VMID, same build number, no second VM); with another
//!      spec hash it is destroyed;
//!   3. else when the image's newest template has the same spec hash and is unvalidated
//!      (validation `pending`, no channel tag, not archived), it is the build in flight whose
//!      outcome was lost: answered like 1 (also with a new build id: `status.build` lost too);
//!   4. else a new build.
//! - [`cleanup_abandoned_builds`] destroys every build VM of an owner (finalizer, cleanup).
//! - The template it leaves is not validated (`ValidationRecord::Pending`, no `validated` tag);
//!   validation and promotion are `crate::validate`'s and the controller's job.
//!
//! # Stages ([`Stage`])
//!
//! 1. `Source`: `cloudImage`: resolve `checksumUrl` (a `SHA256SUMS`/`SHA512SUMS` list) to the
//!    image's checksum, normalize the file name (`.img` -> `.qcow2`, as `content=import` wants),
//!    reuse a file of that name already on the import storage when Proxmox confirms the checksum
//!    (download-url with a checksum answers "got correct file already"), else download it with
//!    the checksum verified by Proxmox. `template`: find the base template (by VMID or unique
//!    name); the clone happens in `CreateVm`.
//! 2. `CreateVm`: `nextid` (not reserved: on "already exists" take the next), create with
//!    `import-from` (or full-clone the base), resize to `hardware.diskGiB`, cloud-init drive,
//!    serial console, `agent=1`, hardware, network, `ipconfig0`, the throwaway SSH key, tags
//!    and the ownership marker (role `build`) in the same call that creates the VM.
//! 3. `Provision`: start, wait for SSH (or the guest agent), run the seed's steps one command at
//!    a time (`apt-get update`, `full-upgrade -y`, install `qemu-guest-agent
//!    cloud-init` + spec packages, enable services, spec commands, `apt-get clean`,
//!    `autoremove -y`), record the package manifest (installed packages only), then clean for cloning (`cloud-init clean`, empty machine-id, no SSH host
//!    keys, no build key; the `sshkeys` option is removed from the config too).
//! 4. `Shutdown`: graceful shutdown with a timeout, then a hard stop.
//! 5. `Convert`: the `template` endpoint (never `template=1` in the config).
//! 6. `Finalize`: role `template`, final tags and the description block with the seed's
//!    metadata (os, type, builder, builder version, build date and number, source, spec hash,
//!    package manifest digest) and the package manifest itself, gzip + base64 (names only when
//!    the versions do not fit the 8 KiB notes; see `crate::image::marker::BuildProgress`).
//!
//! The name is `{os}-{type}-{YYYYMMDD}-{NNN}` (or `spec.nameTemplate`); the build number is the
//! highest existing for this image and day + 1, reserved from the start by the build VM's marker
//! (and its name), so an interrupted build keeps its number.
//!
//! # Safety
//!
//! A VM is touched only when its marker names its own VMID and our owner uid
//! ([`crate::image::marker::ownership`]): a consumer's clone of our template carries our tag and
//! a copied marker naming another VMID, and is never adopted, changed or deleted.

mod commands;
mod error;
mod inventory;
mod plan;
mod provision;
mod source;
mod stages;

use std::fmt;
use std::time::Duration;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::api::GoldenImageSpec;
use crate::image::marker::{Owner, ValidationRecord};

pub use error::{BuildError, ErrorCategory};
pub use inventory::ImageNames;
pub use plan::{cli_owner_uid, normalize_file_name};
pub(crate) use plan::{first_ipv4, hardware_config, static_ip};
pub use stages::{cleanup_abandoned_builds, clone_names, run_build, run_build_with};

/// One build to run.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub spec: GoldenImageSpec,
    /// The object that owns the VMs (namespace, name, uid); written into every marker.
    pub owner: Owner,
    /// Recorded in the marker (`build_id`). A resumed build keeps the id its marker has.
    pub build_id: String,
    /// Build date of a new build (UTC day). A resumed build keeps the date its marker has.
    pub today: NaiveDate,
    /// Answer with the image's newest template when it has this spec and still awaits
    /// validation, instead of building again. The controller sets it (such a template is its
    /// build in flight whose outcome was lost); the CLI does not, because it never validates:
    /// each `sombrero build` run asks for a new template.
    pub adopt_unvalidated: bool,
    /// The caller made `build_id` for this call (a CLI run's): no template can carry it, so
    /// none is looked for. `false` (the controller, which may ask its build again after a
    /// crash): our newest template is read to see whether it is this build, finished.
    pub fresh_id: bool,
}

/// What a finished build produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOutcome {
    /// VMID of the new (unvalidated) template.
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub build_date: NaiveDate,
    pub build_number: u16,
    /// Size of the system disk, bytes.
    pub size_bytes: u64,
    /// `sha256:<hex>` of the cloud image (`None` for a template source).
    pub source_checksum: Option<String>,
    pub spec_hash: String,
    /// `name=version` of every installed package, sorted (the drift baseline). For a template
    /// a previous run finished, what its marker keeps (names only for a very long list).
    pub package_manifest: Vec<String>,
    /// The template's validation as its marker records it: `Pending` for a new build; a
    /// template a previous run of the same build finished may be validated already.
    #[serde(default)]
    pub validation: ValidationRecord,
    /// Duration of each stage run by this call (a resumed build lists only what it ran).
    pub stages: Vec<StageTiming>,
}

/// Duration of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: Stage,
    pub seconds: f64,
}

/// The stages of a build, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    Source,
    CreateVm,
    Provision,
    Shutdown,
    Convert,
    Finalize,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Source,
        Stage::CreateVm,
        Stage::Provision,
        Stage::Shutdown,
        Stage::Convert,
        Stage::Finalize,
    ];

    /// The name used in markers, status and progress output (`CreateVm`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "Source",
            Stage::CreateVm => "CreateVm",
            Stage::Provision => "Provision",
            Stage::Shutdown => "Shutdown",
            Stage::Convert => "Convert",
            Stage::Finalize => "Finalize",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The stage after this one (`None` after `Finalize`).
    pub fn next(self) -> Option<Stage> {
        let i = Stage::ALL.iter().position(|s| *s == self)?;
        Stage::ALL.get(i + 1).copied()
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a build reports progress. Called from the build's task; keep it cheap (the controller
/// buffers and patches status at most every few seconds; the CLI prints).
pub trait Progress: Send + Sync {
    /// A stage starts.
    fn stage(&self, stage: Stage);
    /// A human-readable step within the stage (`apt-get upgrade -y`, `downloading ...`).
    fn message(&self, text: &str);
    /// Percent of the current stage, when known (download), 0..=100.
    fn percent(&self, p: f32);
}

/// A [`Progress`] that discards everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: Stage) {}
    fn message(&self, _: &str) {}
    fn percent(&self, _: f32) {}
}

/// Timeouts of the Proxmox side of a build (the guest side uses `spec.provisioning.timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One Proxmox task (create, clone, resize, template, delete).
    pub task: Duration,
    /// The download of a cloud image.
    pub download: Duration,
    /// Graceful shutdown before a hard stop.
    pub shutdown: Duration,
    /// How long an SSH build to a DHCP address waits for the guest agent to report it (within
    /// `spec.provisioning.timeout`): a cloud image without the agent never does.
    pub agent_address: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            task: Duration::from_secs(600),
            download: Duration::from_secs(3600),
            shutdown: Duration::from_secs(120),
            agent_address: Duration::from_secs(300),
        }
    }
}
