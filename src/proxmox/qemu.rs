//! QEMU VMs: create, config, resize, power, template, clone, delete.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::lenient;
use super::retry::{self, Idempotency};
use super::task::Upid;

/// Percent-encode SSH public keys for the `sshkeys` option.
///
/// PVE's `urlencoded` format accepts only `[-%a-zA-Z0-9_.!~*'()]` and then URI-unescapes the
/// value, so every other byte (space, `+`, `/`, `=`, `@`, `:`, newline) must be `%XX`, and a
/// space must never become `+`. Keys are trimmed and joined with a newline.
pub fn encode_sshkeys<S: AsRef<str>>(keys: &[S]) -> String {
    let joined = keys
        .iter()
        .map(|k| k.as_ref().trim())
        .filter(|k| !k.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::with_capacity(joined.len() * 2);
    for b in joined.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
            )
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decode what [`encode_sshkeys`] produced (GET config returns it still encoded).
pub fn decode_sshkeys(encoded: &str) -> Vec<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            out.push(hex(bytes[i + 1]) * 16 + hex(bytes[i + 2]));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Join tags for the `tags` option. PVE lower-cases, sorts and de-duplicates them on write.
pub fn join_tags<S: AsRef<str>>(tags: &[S]) -> String {
    tags.iter()
        .map(|t| t.as_ref().trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(";")
}

/// VM configuration keys for create and update. Config keys are many (`scsi0`, `net0`,
/// `ipconfig0`, ...), so this is a map with typed helpers for the common ones; the values are
/// PVE's property strings. Booleans are written as `0`/`1`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QemuConfig {
    values: BTreeMap<String, String>,
}

impl QemuConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Any key, verbatim.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.values.insert(key.to_owned(), value.to_string());
        self
    }

    pub fn flag(self, key: &str, value: bool) -> Self {
        self.set(key, if value { "1" } else { "0" })
    }

    pub fn name(self, name: &str) -> Self {
        self.set("name", name)
    }
    pub fn memory_mib(self, mib: u64) -> Self {
        self.set("memory", mib)
    }
    pub fn cores(self, cores: u32) -> Self {
        self.set("cores", cores)
    }
    pub fn sockets(self, sockets: u32) -> Self {
        self.set("sockets", sockets)
    }
    pub fn cpu(self, cpu: &str) -> Self {
        self.set("cpu", cpu)
    }
    pub fn ostype(self, ostype: &str) -> Self {
        self.set("ostype", ostype)
    }
    pub fn machine(self, machine: &str) -> Self {
        self.set("machine", machine)
    }
    pub fn bios(self, bios: &str) -> Self {
        self.set("bios", bios)
    }
    pub fn scsihw(self, model: &str) -> Self {
        self.set("scsihw", model)
    }
    /// `scsiN`, e.g. `local-lvm:0,import-from=local:import/noble.qcow2,discard=on`.
    pub fn scsi(self, n: u8, spec: &str) -> Self {
        self.set(&format!("scsi{n}"), spec)
    }
    /// `ideN`, e.g. `ide2 = local-lvm:cloudinit`.
    pub fn ide(self, n: u8, spec: &str) -> Self {
        self.set(&format!("ide{n}"), spec)
    }
    /// `netN`, e.g. `virtio,bridge=vmbr0`.
    pub fn net(self, n: u8, spec: &str) -> Self {
        self.set(&format!("net{n}"), spec)
    }
    /// `ipconfigN`, e.g. `ip=dhcp` or `ip=10.0.0.5/24,gw=10.0.0.1`.
    pub fn ipconfig(self, n: u8, spec: &str) -> Self {
        self.set(&format!("ipconfig{n}"), spec)
    }
    /// `serialN`, e.g. `socket`.
    pub fn serial(self, n: u8, spec: &str) -> Self {
        self.set(&format!("serial{n}"), spec)
    }
    pub fn vga(self, spec: &str) -> Self {
        self.set("vga", spec)
    }
    pub fn boot(self, spec: &str) -> Self {
        self.set("boot", spec)
    }
    /// `agent`: `1`, or a property string like `enabled=1,fstrim_cloned_disks=1`.
    pub fn agent(self, spec: &str) -> Self {
        self.set("agent", spec)
    }
    pub fn ciuser(self, user: &str) -> Self {
        self.set("ciuser", user)
    }
    pub fn ciupgrade(self, on: bool) -> Self {
        self.flag("ciupgrade", on)
    }
    /// Public keys, encoded as PVE requires ([`encode_sshkeys`]).
    pub fn sshkeys<S: AsRef<str>>(self, keys: &[S]) -> Self {
        self.set("sshkeys", encode_sshkeys(keys))
    }
    pub fn tags<S: AsRef<str>>(self, tags: &[S]) -> Self {
        self.set("tags", join_tags(tags))
    }
    /// At most 8192 characters; PVE trims trailing whitespace.
    pub fn description(self, text: &str) -> Self {
        self.set("description", text)
    }
    pub fn pool(self, pool: &str) -> Self {
        self.set("pool", pool)
    }
    pub fn protection(self, on: bool) -> Self {
        self.flag("protection", on)
    }
    pub fn onboot(self, on: bool) -> Self {
        self.flag("onboot", on)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn values(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn check(&self) -> Result<()> {
        if let Some(d) = self.values.get("description")
            && d.chars().count() > 8192
        {
            return Err(Error::InvalidParameter {
                request: "qemu config".into(),
                message: "description is longer than PVE's 8192 characters".into(),
                errors: BTreeMap::from([("description".to_owned(), "too long".to_owned())]),
            });
        }
        if self
            .values
            .keys()
            .any(|k| k == "vmid" || k == "node" || k == "delete" || k == "digest")
        {
            return Err(Error::InvalidParameter {
                request: "qemu config".into(),
                message: "vmid, node, delete and digest are not config keys here; use the method arguments".into(),
                errors: BTreeMap::new(),
            });
        }
        Ok(())
    }

    fn add_to(&self, mut p: Params) -> Params {
        for (k, v) in &self.values {
            p.push(k, v);
        }
        p
    }
}

/// `GET /nodes/{node}/qemu/{vmid}/config`: the common keys typed, everything else in `extra`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct VmConfig {
    /// SHA-1 of the config, for optimistic concurrency (`digest` on update).
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub protection: bool,
    /// `1`, `0` or a property string like `enabled=1,fstrim_cloned_disks=1`.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub agent: Option<String>,
    /// Still percent-encoded; see [`decode_sshkeys`].
    #[serde(default)]
    pub sshkeys: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub memory: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub cores: Option<u32>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl VmConfig {
    /// Any key as the text PVE stores (`scsi0`, `net0`, `ipconfig0`, ...), typed keys included.
    pub fn value(&self, key: &str) -> Option<String> {
        match key {
            "digest" => self.digest.clone(),
            "name" => self.name.clone(),
            "tags" => self.tags.clone(),
            "description" => self.description.clone(),
            "template" => Some(if self.template { "1" } else { "0" }.to_owned()),
            "lock" => self.lock.clone(),
            "protection" => Some(if self.protection { "1" } else { "0" }.to_owned()),
            "agent" => self.agent.clone(),
            "sshkeys" => self.sshkeys.clone(),
            "memory" => self.memory.clone(),
            "cores" => self.cores.map(|c| c.to_string()),
            _ => self.extra.get(key).map(lenient::scalar_to_string),
        }
    }

    /// Whether the guest agent is enabled (`agent: 1` or `agent: enabled=1,...`).
    pub fn agent_enabled(&self) -> bool {
        let Some(a) = self.agent.as_deref() else {
            return false;
        };
        // The first, key-less part is the default key `enabled`.
        a.split(',').any(|part| match part.split_once('=') {
            None => part.trim() == "1",
            Some((k, v)) => {
                k.trim() == "enabled" && matches!(v.trim(), "1" | "true" | "on" | "yes")
            }
        })
    }

    pub fn tag_list(&self) -> Vec<String> {
        super::cluster::split_tags(self.tags.as_deref().unwrap_or(""))
    }
}

/// A config change: keys to set, keys to delete, and the digest the change assumes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigUpdate {
    pub set: QemuConfig,
    pub delete: Vec<String>,
    pub digest: Option<String>,
}

impl ConfigUpdate {
    pub fn new(set: QemuConfig) -> Self {
        ConfigUpdate {
            set,
            delete: Vec::new(),
            digest: None,
        }
    }

    pub fn delete(mut self, key: &str) -> Self {
        self.delete.push(key.to_owned());
        self
    }

    pub fn digest(mut self, digest: &str) -> Self {
        self.digest = Some(digest.to_owned());
        self
    }

    /// Whether writing this twice leaves the same config as writing it once
    /// ([`retry::config_write`]): then a lost answer is simply repeated.
    pub fn idempotency(&self) -> Idempotency {
        retry::config_write(
            self.set
                .values()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
            self.delete.iter().map(String::as_str),
            self.digest.is_some(),
        )
    }

    fn params(&self) -> Result<Params> {
        self.set.check()?;
        let p = self.set.add_to(Params::new());
        let p = if self.delete.is_empty() {
            p
        } else {
            p.set("delete", self.delete.join(","))
        };
        Ok(p.opt("digest", self.digest.as_deref()))
    }
}

/// `GET /nodes/{node}/qemu/{vmid}/status/current`.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct VmStatus {
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub vmid: Option<u32>,
    /// `running` or `stopped`.
    pub status: String,
    #[serde(default)]
    pub qmpstatus: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub agent: bool,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub uptime: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub pid: Option<u32>,
}

impl VmStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// `POST /nodes/{node}/qemu/{vmid}/status/shutdown` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shutdown {
    /// Seconds PVE waits for the guest (PVE's default: 60).
    pub timeout: Option<u32>,
    /// Stop the VM hard if it did not shut down within the timeout.
    pub force_stop: bool,
}

/// `POST /nodes/{node}/qemu/{vmid}/clone`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloneRequest {
    pub newid: u32,
    pub name: Option<String>,
    pub description: Option<String>,
    /// `Some(false)` asks for a linked clone (a template's default), `Some(true)` a full copy.
    pub full: Option<bool>,
    /// Target node; the source must be on shared storage.
    pub target: Option<String>,
    /// Target storage (full clones only).
    pub storage: Option<String>,
    pub pool: Option<String>,
}

impl CloneRequest {
    pub fn new(newid: u32) -> Self {
        CloneRequest {
            newid,
            ..Default::default()
        }
    }

    fn params(&self) -> Result<Params> {
        if self.storage.is_some() && self.full == Some(false) {
            return Err(Error::InvalidParameter {
                request: "clone".into(),
                message: "a storage can only be chosen for a full clone".into(),
                errors: BTreeMap::from([(
                    "storage".to_owned(),
                    "parameter 'storage' not allowed for linked clones".to_owned(),
                )]),
            });
        }
        Ok(Params::new()
            .set("newid", self.newid)
            .opt("name", self.name.as_deref())
            .opt("description", self.description.as_deref())
            .opt_flag("full", self.full)
            .opt("target", self.target.as_deref())
            .opt("storage", self.storage.as_deref())
            .opt("pool", self.pool.as_deref()))
    }
}

/// `DELETE /nodes/{node}/qemu/{vmid}` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteVm {
    /// Also remove the VMID from backup jobs, replication and HA.
    pub purge: bool,
    /// Also free every `vm-<id>-*` volume not referenced by the config (failed builds).
    pub destroy_unreferenced_disks: bool,
}

fn upid(s: String) -> Result<Upid> {
    s.parse()
}

fn opt_upid(s: Option<String>) -> Result<Option<Upid>> {
    s.filter(|s| !s.is_empty()).map(upid).transpose()
}

impl Client {
    /// Create a VM (`qmcreate` task). A taken VMID gives [`Error::AlreadyExists`] before any
    /// task starts. Never retried after the request may have reached PVE.
    pub async fn create_vm(&self, node: &str, vmid: u32, config: &QemuConfig) -> Result<Upid> {
        config.check()?;
        let p = config.add_to(Params::new().set("vmid", vmid));
        upid(
            self.post(&["nodes", node, "qemu"], &p, Idempotency::Unsafe)
                .await?,
        )
    }

    /// The VM's config (pending changes applied unless `current`).
    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<VmConfig> {
        self.get(
            &["nodes", node, "qemu", &vmid.to_string(), "config"],
            &Params::new(),
        )
        .await
    }

    /// Change the config synchronously (`PUT`). Fine for tags and description; PVE's proxy
    /// gives up on synchronous calls after 30 s, so prefer [`Client::update_vm_config_async`]
    /// for disk changes.
    pub async fn update_vm_config(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<()> {
        let p = update.params()?;
        // Absolute values and deletes are repeated after a lost answer; a digest or a new disk
        // only when PVE proves nothing ran.
        let _: Value = self
            .put(
                &["nodes", node, "qemu", &vmid.to_string(), "config"],
                &p,
                update.idempotency(),
            )
            .await?;
        Ok(())
    }

    /// Change the config as a `qmconfig` task (`POST`). `None` if PVE answered without a task.
    pub async fn update_vm_config_async(
        &self,
        node: &str,
        vmid: u32,
        update: &ConfigUpdate,
    ) -> Result<Option<Upid>> {
        let p = update.params()?;
        opt_upid(
            self.post(
                &["nodes", node, "qemu", &vmid.to_string(), "config"],
                &p,
                update.idempotency(),
            )
            .await?,
        )
    }

    /// Grow a disk: `size` is absolute (`20G`) or relative (`+18G`); shrinking is refused by PVE.
    /// Returns the task (PVE >= 8.0.1) or `None` (older versions finish synchronously).
    pub async fn resize_disk(
        &self,
        node: &str,
        vmid: u32,
        disk: &str,
        size: &str,
    ) -> Result<Option<Upid>> {
        let p = Params::new().set("disk", disk).set("size", size);
        // An absolute size is repeated after a lost answer, a relative one never.
        opt_upid(
            self.put(
                &["nodes", node, "qemu", &vmid.to_string(), "resize"],
                &p,
                retry::resize(size),
            )
            .await?,
        )
    }

    pub async fn vm_status(&self, node: &str, vmid: u32) -> Result<VmStatus> {
        self.get(
            &[
                "nodes",
                node,
                "qemu",
                &vmid.to_string(),
                "status",
                "current",
            ],
            &Params::new(),
        )
        .await
    }

    /// Start (`qmstart`). "already running" and "locked" come back as a failed task.
    pub async fn start_vm(&self, node: &str, vmid: u32) -> Result<Upid> {
        upid(
            self.post(
                &["nodes", node, "qemu", &vmid.to_string(), "status", "start"],
                &Params::new(),
                Idempotency::Unsafe,
            )
            .await?,
        )
    }

    /// Clean shutdown through the guest agent or ACPI (`qmshutdown`).
    pub async fn shutdown_vm(&self, node: &str, vmid: u32, opts: Shutdown) -> Result<Upid> {
        let p = Params::new()
            .opt("timeout", opts.timeout)
            .opt_flag("forceStop", opts.force_stop.then_some(true));
        upid(
            self.post(
                &[
                    "nodes",
                    node,
                    "qemu",
                    &vmid.to_string(),
                    "status",
                    "shutdown",
                ],
                &p,
                Idempotency::Unsafe,
            )
            .await?,
        )
    }

    /// Hard stop (`qmstop`).
    pub async fn stop_vm(&self, node: &str, vmid: u32) -> Result<Upid> {
        upid(
            self.post(
                &["nodes", node, "qemu", &vmid.to_string(), "status", "stop"],
                &Params::new(),
                Idempotency::Unsafe,
            )
            .await?,
        )
    }

    /// Convert a stopped VM into a template (`qmtemplate`): renames disks to `base-<vmid>-*`,
    /// which linked clones need. `None` on PVE 6 (no task).
    pub async fn convert_to_template(&self, node: &str, vmid: u32) -> Result<Option<Upid>> {
        opt_upid(
            self.post(
                &["nodes", node, "qemu", &vmid.to_string(), "template"],
                &Params::new(),
                Idempotency::Unsafe,
            )
            .await?,
        )
    }

    /// Clone `vmid` (`qmclone`; the UPID's id is the *source* VMID).
    pub async fn clone_vm(&self, node: &str, vmid: u32, request: &CloneRequest) -> Result<Upid> {
        let p = request.params()?;
        upid(
            self.post(
                &["nodes", node, "qemu", &vmid.to_string(), "clone"],
                &p,
                Idempotency::Unsafe,
            )
            .await?,
        )
    }

    /// Destroy a VM and its disks (`qmdestroy`). A protected VM is refused by PVE.
    pub async fn delete_vm(&self, node: &str, vmid: u32, opts: DeleteVm) -> Result<Upid> {
        let q = Params::new()
            .opt_flag("purge", opts.purge.then_some(true))
            .opt_flag(
                "destroy-unreferenced-disks",
                opts.destroy_unreferenced_disks.then_some(true),
            );
        upid(
            self.delete(
                &["nodes", node, "qemu", &vmid.to_string()],
                &q,
                Idempotency::Unsafe,
            )
            .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sshkeys_are_strictly_percent_encoded() {
        let keys = [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB+x/y= user@host",
            "  ",
            "ssh-rsa AAAAB3Nza+C1yc2E= other:key ",
        ];
        let enc = encode_sshkeys(&keys);
        assert_eq!(
            enc,
            "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIB%2Bx%2Fy%3D%20user%40host%0Assh-rsa%20AAAAB3Nza%2BC1yc2E%3D%20other%3Akey"
        );
        // Exactly PVE's `urlencoded` alphabet.
        assert!(
            enc.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-%_.!~*'()".contains(c))
        );
        assert!(!enc.contains('+') && !enc.contains(' '));
        assert_eq!(decode_sshkeys(&enc), vec![keys[0].trim(), keys[2].trim()]);
        assert_eq!(encode_sshkeys::<&str>(&[]), "");
        // Decoding never panics on truncated escapes.
        assert_eq!(decode_sshkeys("abc%4"), vec!["abc%4"]);
        assert_eq!(decode_sshkeys("%"), vec!["%"]);
    }

    #[test]
    fn config_goes_out_as_a_form_with_the_encoded_keys() {
        let c = QemuConfig::new()
            .name("golden-build")
            .memory_mib(2048)
            .cores(2)
            .scsi(0, "local-lvm:0,import-from=local:import/noble.qcow2")
            .ide(2, "local-lvm:cloudinit")
            .net(0, "virtio,bridge=vmbr0")
            .ipconfig(0, "ip=dhcp")
            .serial(0, "socket")
            .agent("enabled=1")
            .ciupgrade(false)
            .sshkeys(&["ssh-ed25519 AAAA k@h"])
            .tags(&["sombrero", "ubuntu-24.04"])
            .description("hello");
        let p = c.add_to(Params::new().set("vmid", 9000));
        let form = p.encode();
        assert!(
            form.starts_with("vmid=9000&agent=enabled%3D1&ciupgrade=0&cores=2&description=hello"),
            "{form}"
        );
        // The already percent-encoded key is encoded once more by the form: %20 -> %2520.
        assert!(
            form.contains("sshkeys=ssh-ed25519%2520AAAA%2520k%2540h"),
            "{form}"
        );
        assert!(form.contains("tags=sombrero%3Bubuntu-24.04"), "{form}");
    }

    #[test]
    fn config_checks() {
        assert!(
            QemuConfig::new()
                .description(&"x".repeat(8193))
                .check()
                .is_err()
        );
        assert!(QemuConfig::new().set("vmid", 1).check().is_err());
        let u = ConfigUpdate::new(QemuConfig::new().tags(&["a"]))
            .delete("protection")
            .delete("description")
            .digest("abc");
        assert_eq!(
            u.params().unwrap().encode(),
            "tags=a&delete=protection%2Cdescription&digest=abc"
        );
    }

    #[test]
    fn clone_params() {
        let mut c = CloneRequest::new(9001);
        c.name = Some("validate-9000".into());
        c.full = Some(false);
        assert_eq!(
            c.params().unwrap().encode(),
            "newid=9001&name=validate-9000&full=0"
        );
        c.storage = Some("local-lvm".into());
        assert!(c.params().is_err());
    }

    #[test]
    fn vm_config_keeps_unknown_keys() {
        let c: VmConfig = serde_json::from_str(
            r#"{"digest":"0123abcd","name":"t","template":1,"agent":"enabled=1,fstrim_cloned_disks=1","cores":"2","memory":2048,
                "scsi0":"local-lvm:base-9000-disk-0,size=3G","net0":"virtio=BC:24:11:00:00:01,bridge=vmbr0","numa":0,"sshkeys":"ssh-ed25519%20AAAA"}"#,
        )
        .unwrap();
        assert!(c.template);
        assert!(c.agent_enabled());
        assert_eq!(c.cores, Some(2));
        assert_eq!(c.memory.as_deref(), Some("2048"));
        assert_eq!(
            c.value("scsi0").as_deref(),
            Some("local-lvm:base-9000-disk-0,size=3G")
        );
        assert_eq!(c.value("numa").as_deref(), Some("0"));
        assert_eq!(c.value("template").as_deref(), Some("1"));
        assert_eq!(
            decode_sshkeys(c.sshkeys.as_deref().unwrap()),
            vec!["ssh-ed25519 AAAA"]
        );
        for (agent, on) in [
            ("1", true),
            ("0", false),
            ("enabled=0", false),
            ("enabled=1,type=virtio", true),
            ("type=virtio,enabled=1", true),
        ] {
            let c = VmConfig {
                agent: Some(agent.into()),
                ..Default::default()
            };
            assert_eq!(c.agent_enabled(), on, "{agent}");
        }
    }

    #[test]
    fn vm_status_decodes() {
        let s: VmStatus = serde_json::from_str(r#"{"vmid":100,"status":"running","qmpstatus":"running","agent":1,"ha":{"managed":0},"template":""}"#).unwrap();
        assert!(s.is_running() && s.agent && !s.template);
    }
}
