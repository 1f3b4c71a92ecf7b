//! `GoldenImage`: one Proxmox VM template lineage, declared.

// Repeated `printcolumn(type_ = ..)` arguments of kube's derive read as duplicates to clippy.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::ProxmoxConnection;
use super::duration::SpecDuration;

/// A golden image: how to build, validate and hand off a Proxmox VE VM template, and when to
/// rebuild it. The controller keeps one lineage of templates per GoldenImage.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "images.sombrero.dev",
    version = "v1alpha1",
    kind = "GoldenImage",
    doc = "A golden image: a Proxmox VE VM template lineage that sombrero builds, validates, promotes and hands off.",
    plural = "goldenimages",
    namespaced,
    status = "GoldenImageStatus",
    shortname = "gi",
    category = "sombrero",
    printcolumn(name = "OS", type_ = "string", json_path = ".spec.os"),
    printcolumn(name = "Latest", type_ = "string", json_path = ".status.latest.name"),
    printcolumn(name = "VMID", type_ = "integer", json_path = ".status.latest.vmid"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Validated",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Validated\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "Why Ready is what it is (e.g. ProxmoxAuthFailed, ValidationFailed)",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Stage",
        type_ = "string",
        description = "Stage of the build in flight",
        json_path = ".status.build.stage"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GoldenImageSpec {
    /// Proxmox cluster to build on. Omit to use the controller's default connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<ProxmoxConnection>,

    /// Operating system and version, e.g. `ubuntu-24.04` or `debian-12`. Part of the template
    /// name and tags.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*$') && size(self) <= 32").message("os must be lowercase letters, digits, '.' and '-' (at most 32), e.g. ubuntu-24.04"))]
    #[schemars(length(max = 32))]
    pub os: String,

    /// Image flavour, e.g. `minimal`. Part of the template name and tags.
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*$') && size(self) <= 24").message("type must be lowercase letters, digits, '.' and '-' (at most 24), e.g. minimal"))]
    #[schemars(length(max = 24))]
    pub type_: String,

    /// Template name pattern. Placeholders: `{os}`, `{type}`, `{date}` (YYYYMMDD) and `{build}`
    /// (3-digit build number of the day); `{date}` and `{build}` are required so names stay unique.
    /// Default: `{os}-{type}-{date}-{build}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^([a-z0-9.-]|[{](os|type|date|build)[}])+$') && self.contains('{date}') && self.contains('{build}')").message("nameTemplate may use lowercase letters, digits, '.', '-' and the placeholders {os}, {type}, {date}, {build}; {date} and {build} are required"))]
    #[schemars(length(max = 63))]
    pub name_template: Option<String>,

    /// Where the system disk comes from: exactly one of `cloudImage` or `template`.
    pub source: ImageSource,

    /// Node, storages and network of the build.
    pub placement: Placement,

    /// Virtual hardware of the template.
    #[serde(default)]
    pub hardware: Hardware,

    /// What is installed and run inside the build VM.
    #[serde(default)]
    pub provisioning: Provisioning,

    /// Boot test of each new template before it is promoted.
    #[serde(default)]
    pub validation: Validation,

    /// When to build a new version.
    #[serde(default)]
    pub rebuild: Rebuild,

    /// Hand-off for Terraform and other consumers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,

    /// What happens to the templates when this object is deleted: `Retain` (default) leaves
    /// them; `Delete` removes those not in use.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Exactly one source kind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cloudImage) != has(self.template)").message("set exactly one of source.cloudImage or source.template"))]
pub struct ImageSource {
    /// A cloud image downloaded through the Proxmox API (`content=import`, PVE 8.4 or newer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_image: Option<CloudImageSource>,
    /// An existing template to full-clone as the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSource>,
}

/// A cloud image, verified by checksum.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.checksum) != has(self.checksumUrl)").message("set exactly one of cloudImage.checksum or cloudImage.checksumUrl"))]
pub struct CloudImageSource {
    /// Download URL (http or https), e.g.
    /// `https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img`.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/@\\\\s]+(/\\\\S*)?$')").message("url must be an http:// or https:// URL without credentials"))]
    #[schemars(length(max = 2048))]
    pub url: String,
    /// Expected checksum: `sha256:<64 hex>` or `sha512:<128 hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$')").message("checksum must be sha256:<64 lowercase hex digits> or sha512:<128 lowercase hex digits>"))]
    #[schemars(length(max = 140))]
    pub checksum: Option<String>,
    /// URL of a checksum list (`SHA256SUMS` / `SHA512SUMS`) that names the image's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/@\\\\s]+(/\\\\S*)?$')").message("checksumUrl must be an http:// or https:// URL without credentials"))]
    #[schemars(length(max = 2048))]
    pub checksum_url: Option<String>,
    /// File name in the import storage. Default: derived from the URL (`.img` becomes `.qcow2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.+-]*[.](qcow2|raw|vmdk)$')").message("fileName must be a plain file name ending in .qcow2, .raw or .vmdk"))]
    #[schemars(length(max = 255))]
    pub file_name: Option<String>,
}

/// An existing base template, by VMID or by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.vmid) != has(self.name)").message("set exactly one of template.vmid or template.name"))]
pub struct TemplateSource {
    /// VMID of the base template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 999_999_999))]
    pub vmid: Option<u32>,
    /// Name of the base template (must be unique in the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Where the build runs and what it uses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Proxmox node that builds and holds the template.
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$')").message("node must be a Proxmox node name"))]
    #[schemars(length(max = 63))]
    pub node: String,
    /// Storage for the VM disks (e.g. `local-lvm`).
    #[serde(default = "default_storage")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z][a-zA-Z0-9_.-]*$')").message("storage must be a Proxmox storage ID"))]
    #[schemars(length(max = 64))]
    pub storage: String,
    /// Storage with `import` content for downloaded cloud images (e.g. `local`).
    #[serde(default = "default_import_storage")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z][a-zA-Z0-9_.-]*$')").message("importStorage must be a Proxmox storage ID"))]
    #[schemars(length(max = 64))]
    pub import_storage: String,
    /// Network bridge of the build and validation VMs.
    #[serde(default = "default_bridge")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z][a-zA-Z0-9_.-]*$')").message("bridge must be an interface name such as vmbr0"))]
    #[schemars(length(max = 64))]
    pub bridge: String,
    /// VLAN tag on the bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4094))]
    pub vlan: Option<u16>,
    /// Resource pool for the VMs the controller creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub pool: Option<String>,
}

fn default_storage() -> String {
    "local-lvm".into()
}
fn default_import_storage() -> String {
    "local".into()
}
fn default_bridge() -> String {
    "vmbr0".into()
}

/// Virtual hardware.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hardware {
    /// CPU cores.
    #[serde(default = "default_cores")]
    #[schemars(range(min = 1, max = 128))]
    pub cores: u32,
    /// Memory in MiB.
    #[serde(default = "default_memory", rename = "memoryMiB")]
    #[schemars(range(min = 256, max = 1_048_576))]
    pub memory_mib: u32,
    /// System disk size in GiB (the image is grown to this size; never shrunk).
    #[serde(default = "default_disk", rename = "diskGiB")]
    #[schemars(range(min = 2, max = 65_536))]
    pub disk_gib: u32,
    /// QEMU machine type.
    #[serde(default = "default_machine")]
    #[x_kube(validation = Rule::new("self.matches('^(q35|pc|pc-(i440fx|q35)-[0-9.]+(\\\\+pve[0-9]+)?)$')").message("machine must be q35, pc, or a versioned pc-q35-X.Y / pc-i440fx-X.Y"))]
    #[schemars(length(max = 64))]
    pub machine: String,
    /// Firmware.
    #[serde(default)]
    pub bios: Bios,
    /// CPU type, e.g. `host` or `x86-64-v2-AES`.
    #[serde(default = "default_cpu")]
    #[schemars(length(max = 64))]
    pub cpu: String,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            cores: default_cores(),
            memory_mib: default_memory(),
            disk_gib: default_disk(),
            machine: default_machine(),
            bios: Bios::default(),
            cpu: default_cpu(),
        }
    }
}

fn default_cores() -> u32 {
    2
}
fn default_memory() -> u32 {
    2048
}
fn default_disk() -> u32 {
    10
}
fn default_machine() -> String {
    "q35".into()
}
fn default_cpu() -> String {
    "x86-64-v2-AES".into()
}

/// Firmware of the VM.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Bios {
    #[default]
    Seabios,
    Ovmf,
}

/// How the build VM is provisioned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provisioning {
    /// Channel used to run commands: `ssh` (throwaway key injected by cloud-init) or
    /// `guestAgent` (the source must already run qemu-guest-agent).
    #[serde(default)]
    pub via: ProvisioningChannel,
    /// SSH settings of the build network (for `via: ssh`).
    #[serde(default)]
    pub ssh: SshBuild,
    /// Packages to install. `qemu-guest-agent` and `cloud-init` are always installed.
    #[serde(default = "default_packages")]
    #[schemars(length(max = 200), inner(length(max = 128)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+:~-]+)?$'))").message("packages must be Debian package names, optionally pinned as name=version"))]
    pub packages: Vec<String>,
    /// Run `apt-get update && apt-get upgrade -y` first.
    #[serde(default = "default_true")]
    pub upgrade: bool,
    /// Services to enable. `qemu-guest-agent` and `cloud-init` are always enabled.
    #[serde(default = "default_services")]
    #[schemars(length(max = 64), inner(length(max = 128)))]
    #[x_kube(validation = Rule::new("self.all(s, s.matches('^[a-zA-Z0-9@_.:-]+$'))").message("services must be systemd unit names"))]
    pub services: Vec<String>,
    /// Extra shell commands, run in order after the packages. Never put credentials here:
    /// commands are stored in the template's history.
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 4096)))]
    #[x_kube(validation = Rule::new("!self.exists(c, c.matches('(?i)(password|passwd|token|secret|api[_-]?key)[=:]\\\\s*\\\\S'))").message("commands must not embed credentials (password=, token=, secret=, api_key=): bake only what every clone may know, pass secrets at clone time with cloud-init"))]
    pub commands: Vec<String>,
    /// Upper bound for the whole provisioning stage.
    #[serde(default = "default_provision_timeout")]
    #[schemars(regex(pattern = "^([0-9]+(d|h|m|s))+$"))]
    pub timeout: SpecDuration,
    /// Keep the build VM of a failed build for debugging instead of destroying it.
    #[serde(default)]
    pub keep_failed_build: bool,
}

impl Default for Provisioning {
    fn default() -> Self {
        Provisioning {
            via: ProvisioningChannel::default(),
            ssh: SshBuild::default(),
            packages: default_packages(),
            upgrade: true,
            services: default_services(),
            commands: Vec::new(),
            timeout: default_provision_timeout(),
            keep_failed_build: false,
        }
    }
}

fn default_packages() -> Vec<String> {
    vec!["qemu-guest-agent".into(), "cloud-init".into()]
}
fn default_services() -> Vec<String> {
    vec!["qemu-guest-agent".into(), "cloud-init".into()]
}
fn default_true() -> bool {
    true
}
fn default_provision_timeout() -> SpecDuration {
    SpecDuration::new("30m")
}

/// Command channel into the build VM.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningChannel {
    #[default]
    Ssh,
    GuestAgent,
}

/// The build VM's network and SSH endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshBuild {
    /// cloud-init `ipconfig0` of the build VM: `ip=dhcp` or `ip=10.0.0.50/24,gw=10.0.0.1`.
    #[serde(default = "default_ipconfig")]
    #[x_kube(validation = Rule::new("self.matches('^ip=(dhcp|[0-9]{1,3}([.][0-9]{1,3}){3}/[0-9]{1,2})(,gw=[0-9]{1,3}([.][0-9]{1,3}){3})?$')").message("ipConfig must be ip=dhcp or ip=A.B.C.D/NN[,gw=A.B.C.D]"))]
    #[schemars(length(max = 80))]
    pub ip_config: String,
    /// Address to connect to. Default: the static IP of `ipConfig`, else the address the guest
    /// agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub host: Option<String>,
    /// SSH port.
    #[serde(default = "default_ssh_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Login user created by cloud-init.
    #[serde(default = "default_ssh_user")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z_][a-z0-9_-]{0,31}$')").message("user must be a Linux user name"))]
    #[schemars(length(max = 32))]
    pub user: String,
}

impl Default for SshBuild {
    fn default() -> Self {
        SshBuild {
            ip_config: default_ipconfig(),
            host: None,
            port: default_ssh_port(),
            user: default_ssh_user(),
        }
    }
}

fn default_ipconfig() -> String {
    "ip=dhcp".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_user() -> String {
    "sombrero".into()
}

/// Validation of a new template through a throwaway linked clone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Validation {
    /// Validate new templates before promotion. Turning this off promotes unvalidated templates.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Checks to run.
    #[serde(default = "default_checks")]
    #[schemars(length(min = 1, max = 5), inner(length(max = 32)))]
    #[x_kube(validation = Rule::new("self.all(c, c in ['boot', 'cloudInit', 'guestAgent', 'ssh', 'packageDrift'])").message("checks may only be boot, cloudInit, guestAgent, ssh, packageDrift"))]
    pub checks: Vec<String>,
    /// Packages that may appear beyond the build's baseline without failing `packageDrift`.
    #[serde(default)]
    #[schemars(length(max = 500), inner(length(max = 128)))]
    pub allowed_extra_packages: Vec<String>,
    /// Upper bound for the whole validation.
    #[serde(default = "default_validation_timeout")]
    #[schemars(regex(pattern = "^([0-9]+(d|h|m|s))+$"))]
    pub timeout: SpecDuration,
}

impl Default for Validation {
    fn default() -> Self {
        Validation {
            enabled: true,
            checks: default_checks(),
            allowed_extra_packages: Vec::new(),
            timeout: default_validation_timeout(),
        }
    }
}

/// Names accepted in `validation.checks`.
pub const CHECK_NAMES: [&str; 5] = ["boot", "cloudInit", "guestAgent", "ssh", "packageDrift"];

fn default_checks() -> Vec<String> {
    CHECK_NAMES.iter().map(|c| c.to_string()).collect()
}
fn default_validation_timeout() -> SpecDuration {
    SpecDuration::new("10m")
}

/// Rebuild triggers (a spec change always rebuilds).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rebuild {
    /// Cron schedule (5 fields, UTC) or a macro such as `@monthly`, for security-patch rebuilds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^(@(yearly|annually|monthly|weekly|daily|hourly)|([0-9*/,-]+|[A-Za-z]{3}) ([0-9*/,-]+) ([0-9*/,?LW-]+) ([0-9*/,-]+|[A-Za-z]{3}(-[A-Za-z]{3})?) ([0-9*/,?L#-]+|[A-Za-z]{3}(-[A-Za-z]{3})?))$')").message("schedule must be a 5-field cron expression (minute hour day-of-month month day-of-week) or @yearly/@monthly/@weekly/@daily/@hourly"))]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,
    /// Rebuild when the upstream checksum of the cloud image changes.
    #[serde(default = "default_true")]
    pub on_source_change: bool,
    /// How often to look at the upstream checksum.
    #[serde(default = "default_source_check_interval")]
    #[schemars(regex(pattern = "^([0-9]+(d|h|m|s))+$"))]
    pub source_check_interval: SpecDuration,
    /// Manual trigger: set to a new value (e.g. the current time) to request one rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub requested_at: Option<String>,
}

impl Default for Rebuild {
    fn default() -> Self {
        Rebuild {
            schedule: None,
            on_source_change: true,
            source_check_interval: default_source_check_interval(),
            requested_at: None,
        }
    }
}

fn default_source_check_interval() -> SpecDuration {
    SpecDuration::new("24h")
}

/// Hand-off to consumers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// ConfigMap (same namespace) that receives `template_id`, `template_name`, `node` and a
    /// Packer-compatible `manifest.json` for the latest validated template.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("configMapName must be a valid ConfigMap name"))]
    #[schemars(length(max = 253))]
    pub config_map_name: String,
}

/// What deleting the GoldenImage does to its templates.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Leave all templates in Proxmox.
    #[default]
    Retain,
    /// Delete the image's templates that are not in use.
    Delete,
}

/// Observed state of a GoldenImage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenImageStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` (kstatus), `Validated`, `UpToDate`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The latest validated template: what consumers should use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<TemplateRef>,
    /// The build in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStatus>,
    /// Every template of this image the controller knows, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<TemplateVersionStatus>,
    /// Result of the most recent validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_validation: Option<ValidationReport>,
    /// Upstream checksum seen at the last source check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_checksum: Option<String>,
    /// When the upstream checksum was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_source_check: Option<Time>,
    /// The last `rebuild.requestedAt` value that was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_rebuild_request: Option<String>,
}

/// A template, as consumers reference it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRef {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    /// Build date, `YYYY-MM-DD`.
    pub build_date: String,
    pub build_number: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validated_at: Option<Time>,
}

/// The build in flight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    /// Build id, also written into the VM's marker.
    pub id: String,
    /// VMID of the build VM, once allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// Stage in flight (`Source`, `CreateVm`, `Provision`, `Shutdown`, `Convert`, `Finalize`,
    /// `Validate`, `Promote`), or `Failed` after a failed build (`message` says where and why).
    pub stage: BuildStage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Finished stages and their durations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageTiming>,
    /// Human-readable progress of the current stage (e.g. download percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A step of the controller's job, as `status.build.stage` shows it: the build's stages, then
/// `Validate` and `Promote`; `Failed` once the job failed. The wire values are the names.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum BuildStage {
    #[default]
    Source,
    CreateVm,
    Provision,
    Shutdown,
    Convert,
    Finalize,
    Validate,
    Promote,
    Failed,
}

impl BuildStage {
    /// The wire value (`CreateVm`, ...), also the metrics label and the Events' text.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStage::Source => "Source",
            BuildStage::CreateVm => "CreateVm",
            BuildStage::Provision => "Provision",
            BuildStage::Shutdown => "Shutdown",
            BuildStage::Convert => "Convert",
            BuildStage::Finalize => "Finalize",
            BuildStage::Validate => "Validate",
            BuildStage::Promote => "Promote",
            BuildStage::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for BuildStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validation state of one template in `status.versions`: `Pending` (not validated yet: running,
/// not started, or `validation.enabled: false`), `Passed` or `Failed`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum TemplateValidation {
    #[default]
    Pending,
    Passed,
    Failed,
}

/// Duration of one build stage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageTiming {
    pub stage: BuildStage,
    pub seconds: f64,
}

/// One template of this image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateVersionStatus {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub build_date: String,
    pub build_number: u16,
    /// `Pending` (not validated yet), `Passed` or `Failed`.
    pub validation: TemplateValidation,
    /// Holds the channel tag ("latest validated").
    #[serde(default)]
    pub latest: bool,
}

/// Outcome of a validation run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationReport {
    /// Template that was validated.
    pub vmid: u32,
    pub passed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    #[serde(default)]
    pub checks: Vec<CheckResult>,
}

/// One validation check.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    #[serde(default)]
    pub message: String,
}
