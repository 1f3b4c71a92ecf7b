//! A fake Proxmox VE for integration tests: `fakepve` (PyPI, pinned in
//! `tests/fakepve/requirements.txt`) plus this project's guest model and control API
//! (`tests/fakepve/harness.py`, `tests/fakepve/guest.py`), run as a child process.
//!
//! ```ignore
//! mod support;
//! use support::fakepve::{FakePve, Image};
//!
//! #[tokio::test]
//! async fn builds() {
//!     let pve = FakePve::start().await;              // or FakePve::start_with(Options { time_scale: 0.01, ..Default::default() })
//!     let http = pve.api_client();                    // reqwest client trusting the fake's CA
//!     let img = pve.add_image(Image::new("noble.qcow2")).await;   // served at img.url
//!     // ... POST {pve.url}/api2/json/nodes/{pve.node}/storage/local/download-url with
//!     //     Authorization: pve.auth_header(), checksum img.checksums["sha256"] ...
//!     assert!(pve.agent_commands(9000).await.iter().any(|c| c.line().contains("apt-get upgrade")));
//! }
//! ```
//!
//! # What a test gets
//! - `url` (`https://127.a.b.c:port`, a loopback address of its own), `node` (`pve1`), `ca_pem`
//!   (the test CA that signed the server certificate, SAN = the IP; for a client's
//!   `tls_certs_only`/custom CA), `token_id`/`token_secret` (`root@pam!sombrero`: may do
//!   everything) and `limited_token_id`/`limited_token_secret` (`sombrero-ro@pve!readonly`: the
//!   Audit privileges only, so creating, changing, starting a VM or agent `exec` get real 403s).
//! - fakepve's behaviour: schema validation (400 with per-field `errors`), tasks with UPIDs, locks,
//!   `nextid` as a string, a missing VM as 500 "Configuration file ... does not exist", storages
//!   `local` (dir: iso, vztmpl, backup, **import**) and `local-lvm` (lvmthin: images, rootdir).
//!   With the default time scale 0 every task has finished when its request returns; with e.g.
//!   0.01 (60 PVE seconds = 0.6 s) tasks show `running` and locks are held meanwhile.
//!
//! # The guest model (what fakepve lacks)
//! - An image registered with [`FakePve::add_image`] is a file served over HTTP (`ImageInfo::url`,
//!   checksums in `ImageInfo::checksums`, keys `md5 sha1 sha224 sha256 sha384 sha512`) whose bytes
//!   describe its contents. `download-url` really fetches it (loopback URLs only), verifies
//!   `checksum`/`checksum-algorithm` as PVE does (a mismatch fails the task with
//!   "checksum mismatch: got '...' != expect '...'"; a second download of an existing file without
//!   checksum fails with "refusing to override existing file"), and stores it as
//!   `local:import/<file>`. `Image::present()` puts it on the storage directly instead.
//! - Default contents: an Ubuntu 24.04 cloud image without `qemu-guest-agent` (`Image::agent()`
//!   adds it), cloud-init never run, empty machine-id, no SSH host keys, no apt lists.
//!   `Image::contents(json!({"profile": "debian-12"}))` is a Debian 12 cloud image instead, its
//!   packages, upgrades and repository read from the transcripts recorded on a real Debian 12
//!   guest (`tests/transcripts/debian-12/`, which the model is checked against:
//!   `the_model_answers_as_the_recorded_debian_12_guest` in tests/integration/fakepve_harness.rs).
//! - `scsi0: local-lvm:0,import-from=local:import/<file>` (create, or `PUT`/`POST config`) makes a
//!   disk of the image's virtual size (3.5 GiB by default) carrying a copy of its contents.
//!   `PUT .../resize` grows it (fakepve alone ignores resize). Template conversion and clones
//!   (full and linked) carry the contents along; every disk is its own copy.
//! - A running VM answers the agent only when its config enables it (`agent: 1` or `enabled=1`),
//!   its disk has `qemu-guest-agent` and that service runs, and `boot_secs` (15 PVE seconds) have
//!   passed since the start; else 500 "No QEMU guest agent configured" / "VM N is not running" /
//!   "QEMU guest agent is not running". At boot: enabled services start, an empty machine-id is
//!   filled, cloud-init runs once per instance (a new VM, or after `cloud-init clean`) and ends as
//!   [`GuestSettings::cloud_init`] says, regenerating SSH host keys.
//! - `agent/exec` (+ `exec-status`, which answers `exited: 0` while the command "runs" and forgets
//!   the pid once it reported the exit) runs, directly or through `sh -c` (`;`, `&&`, `||`, a
//!   trailing `| filter` ignored, redirections dropped, `sudo`/`VAR=x` prefixes stripped):
//!   `apt-get update|upgrade|dist-upgrade|full-upgrade|install|remove|purge|autoremove|clean`
//!   (install needs `update` first, like a fresh cloud image, and brings the package's
//!   dependencies; `-y` needed when there is something to do; `-s` simulates; plain `upgrade`
//!   keeps back an upgrade that needs a new package, a new kernel behind its metapackage, which
//!   `--with-new-pkgs`/`dist-upgrade`/`full-upgrade` install; `remove`/`autoremove` leave the
//!   package in dpkg state `rc`, `purge` does not), `systemctl
//!   enable|disable [--now]|start|stop|restart|is-active|is-enabled` (`qemu-guest-agent` is a
//!   static unit: `is-enabled` says `static`, `enable` exits 0 with systemd's notice on stderr,
//!   it starts at the next boot; `sshd` is an alias of `ssh`), `cloud-init status [--wait]
//!   [--long] [--format json]` (dots while `--wait` waits; exit 1 on error, 2 degraded),
//!   `cloud-init clean [--logs] [--machine-id]`, `dpkg-query -W [-f=FMT] [pkg..]` (`rc` packages
//!   too), `dpkg -l`, `truncate -s 0 /etc/machine-id`, `rm -f /etc/ssh/ssh_host_*`, `cat
//!   /etc/os-release|/etc/machine-id|/etc/hostname`, `echo`, `true`, `false`, `sleep`,
//!   `hostname`, `uname -r` (the newest installed kernel after a boot), `shutdown`/`poweroff` (the
//!   VM stops a moment later); redirections `>&2`, `2>&1`, `>/dev/null`, `2>/dev/null`. stdout
//!   and stderr stay apart. An unknown program exits 127 with `/bin/sh: 1: X: not found` inside
//!   `/bin/sh -c` (`bash: line 1: X: command not found` over SSH: the login shell is bash, as for
//!   cloud-init's users; the shell's own name leads, as dash and bash say it); exec'd directly by the
//!   agent it is PVE's HTTP 500 `Agent error: Guest agent command failed, error was 'Failed to
//!   execute child process “X” (No such file or directory)'`, as qemu-ga answers.
//!   [`GuestSettings::failures`] makes matching commands fail.
//! - `network-get-interfaces` answers `lo` plus `ethN` with the address of `ipconfigN`
//!   (`ip=A/P`; dhcp gives 192.0.2.x); `get-osinfo` the os-release of the contents.
//! - SSH: a running, booted VM with `openssh-server` (in the default image), host keys (made by
//!   cloud-init at first boot) and `ipconfig0: ip=127.x.y.z/n` (see [`FakePve::guest_ip`])
//!   listens on that address and [`FakePve::ssh_port`] with a real SSH server. It accepts user
//!   `ciuser` (default `ubuntu`) with a key from `sshkeys` ([`sshkeys_param`] encodes them) and
//!   runs exec requests through the same shell as the agent (recorded with `via: "ssh"`).
//!   [`FakePve::ssh_keygen`] and [`FakePve::ssh_run`] are a client for tests.
//! - `POST /nodes/{node}/vzdump` stores a backup volume (`local:backup/vzdump-qemu-...`, with
//!   notes from `notes-template` and `protected`); [`FakePve::add_backup`] adds one directly.
//!
//! # Real guests ([`Options::real_guest`])
//! With the cache directory of `scripts/real-guest-image.sh`, an image registered with
//! [`FakePve::add_image_file`] is a real qcow2, and a VM whose disks come from it is a real QEMU
//! process (`tests/fakepve/qemu_backend.py`, TCG unless a kernel boots under KVM): real disk
//! files for import/resize/template/clones, a NoCloud drive from the VM's cloud-init keys, the
//! agent endpoints answered by the real qemu-guest-agent (PVE's wrapping and error texts), SSH
//! through a hostfwd on the `ipconfig0` loopback address and [`FakePve::ssh_port`] (inside, the
//! guest is 10.0.2.15; its only reachable server is the cached apt repository), ACPI shutdown.
//! The API, tasks and locks stay fakepve's; VMs from modelled images keep the model.
//! [`FakePve::real_guest_status`] reports boots (with the kernel each printed), disk sizes and
//! timings; tests/real_guest.rs is the user.
//!
//! # The control API (this module wraps every call)
//! Fault injection (fakepve's own: [`FakePve::fail`] with a status or a catalogue error name, see
//! [`FakePve::errors_for`]), locks, network trouble, node offline, quorum, time scale, guest
//! settings, pre-existing VMs/templates ([`FakePve::add_vm`]), the request log
//! ([`FakePve::requests`]: method, path, parameters from query and body, status, token id; no
//! secret is ever recorded), agent commands run ([`FakePve::agent_commands`]), tasks, reset.
//!
//! Prerequisite: `scripts/fakepve-venv.sh` (Python >= 3.10). `start` runs it (a no-op when the
//! venv is current) and panics with the reason if it fails: a missing prerequisite fails the test.
//! The harness exits when this struct is dropped (killed) or when the test process ends (its
//! stdin closes), so a crashed test never leaks it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// How to start the fake.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Real seconds per PVE second: 0 (default) finishes every task before its request returns.
    pub time_scale: f64,
    /// The cache directory of `scripts/real-guest-image.sh`: VMs whose disks come from an image
    /// registered with [`FakePve::add_image_file`] are real QEMU guests
    /// (`tests/fakepve/qemu_backend.py`). `None`: the guest model only.
    pub real_guest: Option<PathBuf>,
}

/// A running fake Proxmox VE.
pub struct FakePve {
    /// `https://127.a.b.c:port`
    pub url: String,
    /// The loopback address the API, the control API and SSH listen on.
    pub host: String,
    /// The node name (`pve1`).
    pub node: String,
    /// PEM of the test CA that signed the server certificate.
    pub ca_pem: String,
    pub ca_cert_path: PathBuf,
    /// `root@pam!sombrero`: allowed everything.
    pub token_id: String,
    pub token_secret: String,
    /// `sombrero-ro@pve!readonly`: Audit privileges only.
    pub limited_token_id: String,
    pub limited_token_secret: String,
    /// `http://127.a.b.c:port` of the control API.
    pub control_url: String,
    /// Port of the per-VM SSH endpoints, when the harness serves them.
    pub ssh_port: Option<u16>,
    http: reqwest::Client,
    _stdin: ChildStdin,
    _child: Child,
    _dir: tempfile::TempDir,
}

/// An image to register with [`FakePve::add_image`].
#[derive(Debug, Clone)]
pub struct Image {
    pub filename: String,
    /// Contents (JSON as `tests/fakepve/guest.py` `normalise` takes it: `packages` as a list or a
    /// name->version map, `services`, `cloud_init`, `os`, ...). `None`: the default Ubuntu image.
    pub contents: Option<Value>,
    /// With `contents: None`: include qemu-guest-agent in the default image.
    pub agent: bool,
    /// Disk size after import, bytes (default 3.5 GiB).
    pub virtual_size: Option<u64>,
    /// Size the file shows in storage content, bytes (default 600 MiB).
    pub size: Option<u64>,
    /// Put it on a storage now (`storage`, default `local`, content `import`) instead of waiting
    /// for a download-url.
    pub present: bool,
    pub storage: Option<String>,
}

impl Image {
    pub fn new(filename: &str) -> Self {
        Image {
            filename: filename.to_string(),
            contents: None,
            agent: false,
            virtual_size: None,
            size: None,
            present: false,
            storage: None,
        }
    }
    /// The default Ubuntu image with qemu-guest-agent installed.
    pub fn agent(mut self) -> Self {
        self.agent = true;
        self
    }
    pub fn contents(mut self, contents: Value) -> Self {
        self.contents = Some(contents);
        self
    }
    pub fn virtual_size(mut self, bytes: u64) -> Self {
        self.virtual_size = Some(bytes);
        self
    }
    /// Already on storage `local` (volid in [`ImageInfo::volid`]).
    pub fn present(mut self) -> Self {
        self.present = true;
        self
    }
}

/// What [`FakePve::add_image`] answers.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    /// Where `download-url` can fetch it.
    pub url: String,
    pub size: u64,
    pub virtual_size: u64,
    /// Algorithm (`sha256`, `sha512`, `md5`, ...) -> hex digest of the served bytes.
    pub checksums: BTreeMap<String, String>,
    /// Set when the image was put on storage (`Image::present`).
    pub volid: Option<String>,
}

/// A fault for [`FakePve::fail`]: either `status` + `message`, or a catalogue `error` name.
#[derive(Debug, Clone, Default)]
pub struct Failure {
    /// `GET`, `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// Matched against the end of the request path (`/nodes/pve1/qemu/100/config`), or a schema
    /// template when it contains `{` (`/nodes/{node}/qemu/{vmid}/status/start`).
    pub path: String,
    pub status: Option<u16>,
    pub message: Option<String>,
    /// A name from PVE's error catalogue (see [`FakePve::errors_for`]); errors PVE raises inside
    /// the worker make the request succeed with a UPID and the task fail.
    pub error: Option<String>,
    /// Answer with a proxy's HTML page instead of JSON.
    pub html: bool,
    /// Fail this many times, then stop (`None`: until cleared).
    pub times: Option<u32>,
}

impl Failure {
    pub fn status(method: &str, path: &str, status: u16, message: &str) -> Self {
        Failure {
            method: method.into(),
            path: path.into(),
            status: Some(status),
            message: Some(message.into()),
            ..Default::default()
        }
    }
    pub fn error(method: &str, path: &str, name: &str) -> Self {
        Failure {
            method: method.into(),
            path: path.into(),
            error: Some(name.into()),
            ..Default::default()
        }
    }
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
    pub fn html(mut self) -> Self {
        self.html = true;
        self
    }
}

/// A command rule for [`GuestSettings::failures`]: a command whose line (after `sudo`/`VAR=`
/// prefixes) matches the Python regex `pattern` exits with `exitcode` and `stderr`, doing nothing.
#[derive(Debug, Clone)]
pub struct CommandFailure {
    pub pattern: String,
    pub exitcode: i32,
    pub stderr: String,
    pub times: Option<u32>,
}

impl CommandFailure {
    pub fn new(pattern: &str, exitcode: i32, stderr: &str) -> Self {
        CommandFailure {
            pattern: pattern.into(),
            exitcode,
            stderr: stderr.into(),
            times: None,
        }
    }
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

/// Per-VM (or, with `vmid: None` in [`FakePve::set_guest`], every VM's) guest behaviour.
/// Fields left `None` keep their current value.
#[derive(Debug, Clone, Default)]
pub struct GuestSettings {
    /// How cloud-init ends at first boot: `done` (default), `error` or `degraded`.
    pub cloud_init: Option<String>,
    /// PVE seconds cloud-init runs after the agent is up (default 10).
    pub cloud_init_secs: Option<f64>,
    /// PVE seconds from start until the agent answers (default 15).
    pub boot_secs: Option<f64>,
    /// Replaces the command failure rules.
    pub failures: Option<Vec<CommandFailure>>,
}

/// What [`FakePve::guest`] answers.
#[derive(Debug, Clone, Deserialize)]
pub struct GuestState {
    pub vmid: u32,
    /// The disk's contents: `packages` (name -> version), `services` (name -> {enabled}),
    /// `cloud_init` {status, instance_id, logs}, `machine_id`, `ssh_host_keys`, `apt_lists`,
    /// `apt_cache`, `os`, `hostname`, ...
    pub contents: Value,
    pub running: bool,
    pub active_services: Vec<String>,
    pub agent_up: bool,
}

impl GuestState {
    pub fn packages(&self) -> Vec<String> {
        self.contents["packages"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
    pub fn has_package(&self, name: &str) -> bool {
        self.contents["packages"].get(name).is_some()
    }
    /// Whether the service starts at boot: enabled, or static and started by its trigger
    /// (`qemu-guest-agent`, by udev when the virtio port exists).
    pub fn service_enabled(&self, name: &str) -> bool {
        self.service_state(name) != "disabled"
    }
    /// `systemctl is-enabled`'s word: `enabled`, `static` or `disabled` (also for a unit the
    /// guest does not have).
    pub fn service_state(&self, name: &str) -> &'static str {
        let svc = &self.contents["services"][name];
        if svc["static"].as_bool().unwrap_or(false) {
            "static"
        } else if svc["enabled"].as_bool().unwrap_or(false) {
            "enabled"
        } else {
            "disabled"
        }
    }
    pub fn machine_id(&self) -> String {
        self.contents["machine_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    pub fn cloud_init_status(&self) -> String {
        self.contents["cloud_init"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One API request the fake received. Secrets (passwords, tickets, token secrets) are never
/// recorded; `token_id` is the id only.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordedRequest {
    pub seq: u64,
    pub method: String,
    /// The path as sent, `/api2/json/...` or `/api2/extjs/...`.
    pub path: String,
    /// Query and body parameters (a repeated form key becomes an array).
    pub params: Value,
    pub status: Option<u16>,
    pub token_id: Option<String>,
}

/// One command the guest ran (agent exec or SSH).
#[derive(Debug, Clone, Deserialize)]
pub struct AgentCommand {
    pub vmid: u32,
    /// `agent` or `ssh`.
    pub via: String,
    pub command: Vec<String>,
    pub input_data: Option<String>,
    pub exitcode: i64,
    pub stdout: String,
    pub stderr: String,
}

impl AgentCommand {
    /// The command as one line (`/bin/sh -c apt-get update`; over SSH `bash -c ...`).
    pub fn line(&self) -> String {
        self.command.join(" ")
    }
}

/// A backup volume for [`FakePve::add_backup`].
#[derive(Debug, Clone, Default)]
pub struct Backup {
    pub vmid: u32,
    /// Default `local`.
    pub storage: Option<String>,
    /// Default `vzdump-qemu-<vmid>-<ctime as YYYY_MM_DD-HH_MM_SS>.vma.zst`.
    pub filename: Option<String>,
    pub notes: Option<String>,
    pub protected: bool,
    /// Unix seconds (default now).
    pub ctime: Option<i64>,
}

/// What a [`FakePve::arm_trap`] trap does to the request it waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum TrapAction {
    /// SIGKILL this process right after the answer was sent.
    Kill { pid: u32 },
    /// Execute the request, then close the connection without an answer (a lost answer).
    Drop,
    /// Answer, then take the node offline (595 for its requests) for `secs` real seconds.
    NodeOffline { secs: f64 },
}

/// A one-shot trap: fires on the `after`-th API request (1-based) matching `method`, the
/// `path` regex and `writes_only` (non-GET).
#[derive(Debug, Clone)]
pub struct Trap {
    pub action: TrapAction,
    pub after: u64,
    pub method: Option<String>,
    pub path: Option<String>,
    pub writes_only: bool,
}

impl Trap {
    pub fn new(action: TrapAction, after: u64) -> Self {
        Trap {
            action,
            after,
            method: None,
            path: None,
            writes_only: false,
        }
    }
    pub fn writes_only(mut self) -> Self {
        self.writes_only = true;
        self
    }
    pub fn on(mut self, method: &str, path_regex: &str) -> Self {
        self.method = Some(method.into());
        self.path = Some(path_regex.into());
        self
    }
    fn to_json(&self) -> Value {
        let mut v = json!({
            "after": self.after, "method": self.method, "path": self.path,
            "writes_only": self.writes_only,
        });
        match self.action {
            TrapAction::Kill { pid } => {
                v["action"] = json!("kill");
                v["pid"] = json!(pid);
            }
            TrapAction::Drop => v["action"] = json!("drop"),
            TrapAction::NodeOffline { secs } => {
                v["action"] = json!("node-offline");
                v["secs"] = json!(secs);
            }
        }
        v
    }
}

/// What [`FakePve::trap_state`] answers.
#[derive(Debug, Clone, Deserialize)]
pub struct TrapState {
    pub armed: bool,
    pub seen: u64,
    pub fired: bool,
}

/// An SSH key pair made by [`FakePve::ssh_keygen`].
#[derive(Debug, Clone)]
pub struct SshKey {
    pub private_key_path: PathBuf,
    /// `ssh-ed25519 AAAA... sombrero-test`
    pub public_key: String,
}

/// What a command run by [`FakePve::ssh_run`] gave.
#[derive(Debug, Clone, Deserialize)]
pub struct SshOutput {
    pub exitcode: i64,
    pub stdout: String,
    pub stderr: String,
}

/// The `sshkeys` value PVE wants: the keys joined with newlines, then percent-encoded strictly
/// (everything outside `[-A-Za-z0-9_.!~*'()]`, so a space is `%20`, never `+`).
pub fn sshkeys_param(public_keys: &[&str]) -> String {
    let joined = public_keys.join("\n");
    let mut out = String::new();
    for b in joined.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

static SSH_KEYS: AtomicU32 = AtomicU32::new(0);
static COUNTER: AtomicU32 = AtomicU32::new(0);
static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/fakepve-venv.sh` once per test process (a no-op when the venv is current).
fn venv_python() -> PathBuf {
    let result = VENV.get_or_init(|| {
        let root = repo_root();
        let script = root.join("scripts/fakepve-venv.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(root.join(".venv/fakepve/bin/python"))
    });
    match result {
        Ok(p) => p.clone(),
        Err(e) => {
            panic!("the fake Proxmox VE needs its Python venv: run `scripts/fakepve-venv.sh`.\n{e}")
        }
    }
}

/// A loopback address of this instance's own: 127.<pid>.<pid>.<counter>.
fn pick_host() -> String {
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("127.{}.{}.{}", (pid >> 8) & 0xff, pid & 0xff, 2 + n % 250)
}

#[derive(Deserialize)]
struct Handoff {
    url: String,
    node: String,
    ca_cert_path: PathBuf,
    token_id: String,
    token_secret: String,
    limited_token_id: String,
    limited_token_secret: String,
    control_url: String,
    ssh_port: Option<u16>,
}

impl FakePve {
    /// Starts a fake with time scale 0. Panics with the reason when it cannot.
    pub async fn start() -> FakePve {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> FakePve {
        let python = venv_python();
        let dir = tempfile::Builder::new()
            .prefix("fakepve-")
            .tempdir()
            .expect("temp dir");
        let host = pick_host();
        let harness = repo_root().join("tests/fakepve/harness.py");
        let mut child = Command::new(&python)
            .arg(&harness)
            .args(["--host", &host, "--port", "0", "--control-port", "0"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--time-scale", &options.time_scale.to_string()])
            .args(
                options
                    .real_guest
                    .iter()
                    .flat_map(|dir| [std::ffi::OsStr::new("--real-guest"), dir.as_os_str()]),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} {}: {e}",
                    python.display(),
                    harness.display()
                )
            });
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(60),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => {
                let status = child.wait().await;
                panic!(
                    "the fakepve harness exited before it was ready ({status:?}); its stderr is above"
                )
            }
            Ok(Err(e)) => panic!("reading the fakepve harness hand-off: {e}"),
            Err(_) => panic!("the fakepve harness did not start within 60 s"),
        }
        let h: Handoff = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad hand-off line from the fakepve harness: {e}"));
        let ca_pem =
            std::fs::read_to_string(&h.ca_cert_path).expect("read the fake's CA certificate");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        FakePve {
            url: h.url,
            host,
            node: h.node,
            ca_pem,
            ca_cert_path: h.ca_cert_path,
            token_id: h.token_id,
            token_secret: h.token_secret,
            limited_token_id: h.limited_token_id,
            limited_token_secret: h.limited_token_secret,
            control_url: h.control_url,
            ssh_port: h.ssh_port,
            http,
            _stdin: stdin,
            _child: child,
            _dir: dir,
        }
    }

    /// `PVEAPIToken=root@pam!sombrero=<secret>`, the value of the `Authorization` header.
    pub fn auth_header(&self) -> String {
        format!("PVEAPIToken={}={}", self.token_id, self.token_secret)
    }

    /// The same for the read-only token.
    pub fn limited_auth_header(&self) -> String {
        format!(
            "PVEAPIToken={}={}",
            self.limited_token_id, self.limited_token_secret
        )
    }

    /// A reqwest client that trusts only the fake's CA (no proxy).
    pub fn api_client(&self) -> reqwest::Client {
        let cert = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA PEM");
        reqwest::Client::builder()
            .tls_certs_only([cert])
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("API client")
    }

    /// `{url}/api2/json{path}`.
    pub fn api_url(&self, path: &str) -> String {
        format!("{}/api2/json{}", self.url, path)
    }

    /// Any control call: `GET` when `body` is `None`, else `POST` with the JSON body. Panics on
    /// an error answer (a broken test setup), with the harness's message.
    pub async fn control(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{}", self.control_url, path);
        let req = match body {
            None => self.http.get(&url),
            Some(b) => self.http.post(&url).json(&b),
        };
        let rsp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("fakepve control {path}: {e}"));
        let status = rsp.status();
        let text = rsp.text().await.unwrap_or_default();
        if !status.is_success() {
            panic!("fakepve control {path}: {status}: {text}");
        }
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("fakepve control {path}: bad JSON ({e}): {text}"))
    }

    // ------------------------------------------------------------ faults

    /// Makes matching API requests fail (fakepve's `fail`).
    pub async fn fail(&self, f: Failure) {
        let mut body = json!({"method": f.method, "path": f.path, "html": f.html});
        if let Some(s) = f.status {
            body["status"] = json!(s);
        }
        if let Some(m) = f.message {
            body["message"] = json!(m);
        }
        if let Some(e) = f.error {
            body["error"] = json!(e);
        }
        if let Some(t) = f.times {
            body["times"] = json!(t);
        }
        self.control("/fail", Some(body)).await;
    }

    /// Removes every failure rule.
    pub async fn clear_failures(&self) {
        self.control("/fail/clear", Some(json!({}))).await;
    }

    /// The catalogue errors a method can return at a concrete path: `[{name, status, message,
    /// in_task}]`; any `name` can be given to [`Failure::error`].
    pub async fn errors_for(&self, method: &str, path: &str) -> Vec<Value> {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("method", method)
            .append_pair("path", path)
            .finish();
        self.control(&format!("/errors?{query}"), None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn set_time_scale(&self, scale: f64) {
        self.control("/time-scale", Some(json!({"scale": scale})))
            .await;
    }

    /// Leaves the VM with config lock `lock` (`backup`, `clone`, `snapshot`, ...), as an
    /// interrupted operation does.
    pub async fn lock_vm(&self, vmid: u32, lock: &str) {
        self.control("/lock", Some(json!({"vmid": vmid, "lock": lock})))
            .await;
    }

    pub async fn unlock_vm(&self, vmid: u32) {
        self.control("/lock", Some(json!({"vmid": vmid, "lock": null})))
            .await;
    }

    /// Another worker holds the VM's config lock file for `secs` PVE seconds (`None`: until
    /// [`FakePve::release_config_lock`]); writes then fail with "can't lock file ... got timeout".
    /// Needs a non-zero time scale.
    pub async fn hold_config_lock(&self, vmid: u32, secs: Option<f64>) {
        self.control("/config-lock", Some(json!({"vmid": vmid, "secs": secs})))
            .await;
    }

    pub async fn release_config_lock(&self, vmid: u32) {
        self.control("/config-lock", Some(json!({"vmid": vmid, "release": true})))
            .await;
    }

    /// Network trouble: `{"latency": s, "jitter": s, "node": "pve1", "drop_rate": 0..1,
    /// "hang_rate": 0..1, "hang_secs": s, "seed": n}` (PVE seconds; omitted keys reset to 0). A
    /// seed restarts the random generator, so the requests a share hits are the same every run.
    pub async fn set_network(&self, settings: Value) {
        self.control("/network", Some(settings)).await;
    }

    /// Takes a node offline (its requests get 595) or back; an unknown node is added.
    pub async fn set_node_online(&self, node: &str, online: bool) {
        self.control("/node", Some(json!({"node": node, "online": online})))
            .await;
    }

    /// `false`: /etc/pve read-only, writes fail with "cluster not ready - no quorum?".
    pub async fn set_quorum(&self, quorate: bool) {
        self.control("/quorum", Some(json!({"quorate": quorate})))
            .await;
    }

    /// Sets fakepve attributes of a VM: `start_error`, `start_secs`, `stop_secs`,
    /// `shutdown_secs`, `acpi`, `agent_hangs`.
    pub async fn set_vm_attr(&self, vmid: u32, attrs: Value) {
        let mut body = attrs;
        body["vmid"] = json!(vmid);
        self.control("/vm-attr", Some(body)).await;
    }

    // ------------------------------------------------------------ guest model

    /// Registers a real image file (with [`Options::real_guest`]): served like [`Self::add_image`]'s.
    pub async fn add_image_file(&self, filename: &str, path: &Path) -> ImageInfo {
        let v = self
            .control("/images", Some(json!({"filename": filename, "file": path})))
            .await;
        serde_json::from_value(v).expect("image info")
    }

    /// With [`Options::real_guest`]: accel, apt repository requests, timed disk and shutdown
    /// operations, every boot (with the kernel its console showed), disk sizes.
    pub async fn real_guest_status(&self) -> Value {
        self.control("/real-guest", None).await
    }

    /// The serial console of a real guest's last boot.
    pub async fn real_guest_console(&self, vmid: u32) -> String {
        let rsp = self
            .http
            .get(format!("{}/real-guest/console/{vmid}", self.control_url))
            .send()
            .await
            .expect("control API");
        rsp.text().await.unwrap_or_default()
    }

    pub async fn add_image(&self, image: Image) -> ImageInfo {
        let body = json!({
            "filename": image.filename, "contents": image.contents, "agent": image.agent,
            "virtual_size": image.virtual_size, "size": image.size, "present": image.present,
            "storage": image.storage,
        });
        serde_json::from_value(self.control("/images", Some(body)).await).expect("image info")
    }

    /// Guest behaviour for one VM, or with `None` for every VM (a VM's own settings win).
    pub async fn set_guest(&self, vmid: Option<u32>, settings: GuestSettings) {
        let mut body = json!({"vmid": vmid});
        if let Some(v) = settings.cloud_init {
            body["cloud_init"] = json!(v);
        }
        if let Some(v) = settings.cloud_init_secs {
            body["cloud_init_secs"] = json!(v);
        }
        if let Some(v) = settings.boot_secs {
            body["boot_secs"] = json!(v);
        }
        if let Some(rules) = settings.failures {
            body["failures"] = Value::Array(
                rules
                    .into_iter()
                    .map(|r| json!({"pattern": r.pattern, "exitcode": r.exitcode, "stderr": r.stderr, "times": r.times}))
                    .collect(),
            );
        }
        self.control("/guest", Some(body)).await;
    }

    /// The guest of a VM whose disk came from a registered image (panics for other VMs).
    pub async fn guest(&self, vmid: u32) -> GuestState {
        serde_json::from_value(self.control(&format!("/guest/{vmid}"), None).await)
            .expect("guest state")
    }

    /// Adds an existing VM or template: `{"vmid", "name", "node", "status", "template": bool,
    /// "config": {...}, "contents": {...} | "agent": bool, "storage", "disk_size"}`. Unless the
    /// config has disks, it gets `scsi0` on `local-lvm` with the contents (default Ubuntu with the
    /// agent). Answers `{"vmid", "config"}`.
    pub async fn add_vm(&self, spec: Value) -> Value {
        self.control("/vms", Some(spec)).await
    }

    /// Adds a backup volume to a storage's content; answers its volid.
    pub async fn add_backup(&self, b: Backup) -> String {
        let body = json!({
            "vmid": b.vmid, "storage": b.storage, "filename": b.filename, "notes": b.notes,
            "protected": b.protected, "ctime": b.ctime,
        });
        self.control("/backups", Some(body)).await["volid"]
            .as_str()
            .expect("volid")
            .to_string()
    }

    // ------------------------------------------------------------ what was asked

    /// Every API request so far, oldest first.
    pub async fn requests(&self) -> Vec<RecordedRequest> {
        self.requests_since(0).await
    }

    /// Requests after sequence number `seq` (see [`RecordedRequest::seq`]).
    pub async fn requests_since(&self, seq: u64) -> Vec<RecordedRequest> {
        serde_json::from_value(self.control(&format!("/requests?since={seq}"), None).await)
            .expect("requests")
    }

    /// Commands the guest of `vmid` ran (agent and SSH), oldest first.
    pub async fn agent_commands(&self, vmid: u32) -> Vec<AgentCommand> {
        serde_json::from_value(
            self.control(&format!("/agent-commands?vmid={vmid}"), None)
                .await,
        )
        .expect("agent commands")
    }

    /// Every task: `[{upid, node, type, id, user, status, exitstatus, starttime, endtime}]`.
    pub async fn tasks(&self) -> Vec<Value> {
        self.control("/tasks", None)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Back to a fresh fake (same URL, tokens and CA): VMs, images, settings and logs go.
    pub async fn reset(&self) {
        self.control("/reset", Some(json!({}))).await;
    }

    // ------------------------------------------------------------ crash traps

    /// Arms the one-shot trap on the `trap.after`-th API request matching it (see [`Trap`]).
    pub async fn arm_trap(&self, trap: Trap) {
        self.control("/trap", Some(trap.to_json())).await;
    }

    /// Whether the armed trap fired, and how many matching requests it saw.
    pub async fn trap_state(&self) -> TrapState {
        serde_json::from_value(self.control("/trap", None).await).unwrap()
    }

    /// Tasks of this type (`qmcreate`, ...) first wait `secs` PVE seconds holding their lock:
    /// a create shows `lock: create` and no tags or description meanwhile, as PVE's do.
    pub async fn set_task_secs(&self, task_type: &str, secs: f64) {
        self.control("/task-secs", Some(json!({"type": task_type, "secs": secs})))
            .await;
    }

    /// A new API token (of a new user) holding exactly `privs` on `/`: `(token_id, secret)`.
    /// `GET /access/permissions` reports them as PVE would.
    pub async fn add_token(&self, privs: &[&str]) -> (String, String) {
        let v = self
            .control("/tokens", Some(json!({"privs": privs, "path": "/"})))
            .await;
        (
            v["token_id"].as_str().unwrap().to_string(),
            v["token_secret"].as_str().unwrap().to_string(),
        )
    }

    // ------------------------------------------------------------ SSH

    /// A loopback address for a VM's `ipconfig0` (`ip=<this>/8`), distinct per instance and `n`.
    /// Its SSH endpoint listens there on [`FakePve::ssh_port`] once the guest has booted.
    pub fn guest_ip(&self, n: u8) -> String {
        let parts: Vec<u8> = self
            .host
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        format!("127.{}.{}.{}", parts[1], parts[2] ^ 0x80, n.max(1))
    }

    /// Makes an ed25519 key pair in this instance's temp dir (through the venv's asyncssh).
    pub fn ssh_keygen(&self) -> SshKey {
        let n = SSH_KEYS.fetch_add(1, Ordering::Relaxed);
        let path = self._dir.path().join(format!("id_ed25519_{n}"));
        let out = std::process::Command::new(venv_python())
            .arg(repo_root().join("tests/fakepve/ssh_client.py"))
            .arg("keygen")
            .arg(&path)
            .output()
            .expect("run ssh_client.py keygen");
        assert!(
            out.status.success(),
            "ssh keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SshKey {
            private_key_path: path,
            public_key: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }

    /// Runs `command` over SSH on a fake guest (`ip` from its `ipconfig0`, the harness's SSH
    /// port). `Err` for a connection or authentication failure (e.g. the guest has not booted yet).
    pub async fn ssh_run(
        &self,
        ip: &str,
        user: &str,
        key: &SshKey,
        command: &str,
    ) -> Result<SshOutput, String> {
        let port = self.ssh_port.expect("the harness serves no SSH endpoint");
        let out = Command::new(venv_python())
            .arg(repo_root().join("tests/fakepve/ssh_client.py"))
            .args(["run", ip, &port.to_string(), user])
            .arg(&key.private_key_path)
            .arg(command)
            .output()
            .await
            .map_err(|e| format!("run ssh_client.py: {e}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "ssh_client.py said ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(err) = v.get("error") {
            return Err(err.as_str().unwrap_or_default().to_string());
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    /// Runs `commands` one after another on ONE SSH connection, as the build does (it outlives
    /// the removal of the guest's host keys, which refuses new connections). `Err` for a
    /// connection or authentication failure.
    pub async fn ssh_run_all(
        &self,
        ip: &str,
        user: &str,
        key: &SshKey,
        commands: &[&str],
    ) -> Result<Vec<SshOutput>, String> {
        use tokio::io::AsyncWriteExt;
        let port = self.ssh_port.expect("the harness serves no SSH endpoint");
        let mut child = Command::new(venv_python())
            .arg(repo_root().join("tests/fakepve/ssh_client.py"))
            .args(["run-all", ip, &port.to_string(), user])
            .arg(&key.private_key_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("run ssh_client.py: {e}"))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(&serde_json::to_vec(commands).unwrap())
            .await
            .map_err(|e| format!("write to ssh_client.py: {e}"))?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("run ssh_client.py: {e}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "ssh_client.py said ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(err) = v.get("error") {
            return Err(err.as_str().unwrap_or_default().to_string());
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    /// Where the CA certificate is, for tools that take a file.
    pub fn ca_path(&self) -> &Path {
        &self.ca_cert_path
    }
}
