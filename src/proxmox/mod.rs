//! A typed async client for the Proxmox VE API (`/api2/json`), authenticated with an API token.
//!
//! - [`Config`] / [`Config::from_env`]: where and how to connect; [`Secret`] hides the token.
//! - [`Client`]: every call has a timeout; reads are retried with exponential backoff and
//!   jitter, writes when PVE provably did not run them (no connection, HTTP 595, a lock that
//!   could not be taken) or, after a lost answer, when running them twice has the same effect
//!   (absolute config values, deletes, an absolute resize: [`retry::config_write`],
//!   [`retry::resize`]), so a create is never sent twice. A lost answer to any other write is
//!   the caller's to read back ([`Error::outcome_unknown`], [`Client::find_my_task`]).
//! - [`Error`]: classified from the HTTP status and PVE's message (PVE says "not found" and
//!   "locked" with a 500), with [`Error::is_retryable`] and [`Error::category`] for metrics.
//! - [`Upid`] and [`Client::wait_task`]: async calls return a task id at once; the outcome is
//!   the task's exit status (`OK` / `WARNINGS: n` succeed), polled on the node the UPID names;
//!   transient errors while polling (a reset, 5xx, the node briefly unreachable) are waited
//!   out until the wait's own deadline.
//!
//! # Supported Proxmox VE versions
//!
//! - **8.4 and 9.x**: everything.
//! - **8.0–8.3**: all calls work except downloading disk images as content `import`
//!   ([`Client::download_url`] checks the version and returns [`Error::Unsupported`]); such
//!   images can only be imported from another VM's disk. On 8.0 `agent/exec` still takes the
//!   command as a string (this client sends the array form of 8.0.1+). Before pve-http-server
//!   5.2 (PVE < 8.4) error texts are only in the HTTP reason phrase, which this client reads.
//! - 7.x is not supported (no `ciupgrade`, older `resize`/`exec` shapes).
//!
//! # Privileges of the API token
//!
//! Create the token with privilege separation and grant it a role with exactly these (checked
//! against the 9.1.3 API schema's `permissions`):
//!
//! | call | privilege (path) |
//! |---|---|
//! | `version`, `cluster/nextid` | none beyond a valid token |
//! | `cluster/resources?type=vm` | `VM.Audit` (`/vms`); without it the list is silently empty |
//! | storage list, status, content | `Datastore.Audit` or `Datastore.AllocateSpace` (`/storage/{storage}`) |
//! | `download-url` | `Datastore.AllocateTemplate` (`/storage/{storage}`) and either `Sys.Audit`+`Sys.Modify` (`/`) or `Sys.AccessNetwork` (`/nodes/{node}`, PVE 8.1+) |
//! | delete a volume | `Datastore.Allocate` (`/storage/{storage}`) |
//! | create a VM | `VM.Allocate` (`/vms/{vmid}` or `/pool/{pool}`), `Datastore.AllocateSpace` on target storages, `Datastore.Audit` on the `import-from` source storage, `SDN.Use` on the bridge, `VM.Config.*` for the options set |
//! | config get, status | `VM.Audit` (`/vms/{vmid}`) |
//! | config set (PUT/POST) | the `VM.Config.*` privilege of each key: `Options` (tags, description, protection, agent), `Disk`, `CDROM`, `CPU`, `Memory`, `Network`, `HWType`, `Cloudinit` |
//! | resize | `VM.Config.Disk` |
//! | start, shutdown, stop | `VM.PowerMgmt` |
//! | template, delete | `VM.Allocate` |
//! | clone | `VM.Clone` on the source, `VM.Allocate` on `/vms/{newid}` (or the pool), `Datastore.AllocateSpace`, `Pool.Allocate` only to manage pools themselves |
//! | agent ping, network, osinfo | PVE 9: `VM.GuestAgent.Audit` or `VM.GuestAgent.Unrestricted`; PVE 8: `VM.Monitor` |
//! | agent exec, exec-status | PVE 9: `VM.GuestAgent.Unrestricted` (root-equivalent in the guest); PVE 8: `VM.Monitor` |
//! | vzdump | `VM.Backup` (`/vms/{vmid}`), `Datastore.AllocateSpace` on the backup storage |
//! | task status and log, the node's task list | none for the token's own tasks; `Sys.Audit` (`/nodes/{node}`) for others |
//! | `access/permissions` | none: every token may read its own |
//!
//! The role (`crate::privileges::table::role_privileges`, the README's `pveum` line) holds
//! only privileges some run needs; where PVE accepts alternatives it takes one:
//! `VM.GuestAgent.Unrestricted` (not also `.Audit`), `Datastore.AllocateSpace` (not also
//! `Datastore.Audit`), `Sys.AccessNetwork` (not `Sys.Audit` + `Sys.Modify` on `/`). Every run
//! checks them before its first write (`crate::privileges`).

pub mod access;
pub mod agent;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod lenient;
pub mod qemu;
pub mod readback;
pub mod retry;
pub mod secret;
pub mod storage;
pub mod task;
pub mod tls;

pub use agent::{ExecStatus, ExecWait, IpAddress, NetworkInterface, OsInfo};
pub use backup::Vzdump;
pub use client::{Client, Params};
pub use cluster::{ClusterVm, PveVersion, VersionInfo};
pub use config::Config;
pub use error::{Error, Result};
pub use qemu::{
    CloneRequest, ConfigUpdate, DeleteVm, QemuConfig, Shutdown, VmConfig, VmStatus, encode_sshkeys,
};
pub use retry::{Idempotency, RetryPolicy};
pub use secret::Secret;
pub use storage::{ChecksumAlgorithm, DownloadUrl, StorageInfo, StorageStatus, StorageVolume};
pub use task::{PollSchedule, TaskListEntry, TaskLogLine, TaskOutcome, TaskStatus, Upid};
pub use tls::TlsMode;
