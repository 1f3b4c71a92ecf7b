//! `TemplateRetention`: which templates to keep, archive or delete.

// Repeated `printcolumn(type_ = ..)` arguments of kube's derive read as duplicates to clippy.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::ProxmoxConnection;
use super::duration::SpecDuration;

/// A retention policy for the templates of a GoldenImage, or of all templates with given tags.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "images.sombrero.dev",
    version = "v1alpha1",
    kind = "TemplateRetention",
    doc = "A retention policy: which templates of a GoldenImage (or with given tags) to keep, archive or delete.",
    plural = "templateretentions",
    namespaced,
    status = "TemplateRetentionStatus",
    shortname = "tr",
    category = "sombrero",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.targetDescription"
    ),
    printcolumn(name = "Keep", type_ = "integer", json_path = ".spec.keepLast"),
    printcolumn(
        name = "Archive After",
        type_ = "string",
        json_path = ".spec.archiveAfter"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.retainAtLeast <= self.keepLast").message("retainAtLeast must not exceed keepLast"))]
#[serde(rename_all = "camelCase")]
pub struct TemplateRetentionSpec {
    /// Which templates the policy governs.
    pub target: RetentionTarget,
    /// Proxmox cluster, for a `tagSelector` target (a `goldenImageRef` uses the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<ProxmoxConnection>,
    /// Always keep this many newest templates.
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: u32,
    /// Archive templates older than this (and not among the last `keepLast`): `90d`, `12h`.
    #[serde(default = "default_archive_after")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(d|h|m|s))+$')").message("archiveAfter must be a duration such as 90d, 12h or 1d12h"))]
    #[schemars(length(max = 16))]
    pub archive_after: SpecDuration,
    /// Never leave fewer than this many validated templates, whatever the other rules say.
    #[serde(default = "default_retain_at_least")]
    #[schemars(range(min = 0, max = 1000))]
    pub retain_at_least: u32,
    /// What archiving means.
    #[serde(default)]
    pub archive: ArchiveSpec,
    /// Compute and show the plan in status, change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// How often to re-evaluate the policy.
    #[serde(default = "default_interval")]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(d|h|m|s))+$')").message("interval must be a duration such as 1h or 30m"))]
    #[schemars(length(max = 16))]
    pub interval: SpecDuration,
}

fn default_keep_last() -> u32 {
    3
}
fn default_archive_after() -> SpecDuration {
    SpecDuration::new("90d")
}
fn default_retain_at_least() -> u32 {
    1
}
fn default_interval() -> SpecDuration {
    SpecDuration::new("1h")
}

/// Exactly one of a GoldenImage reference or a tag selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.goldenImageRef) != has(self.tagSelector)").message("set exactly one of target.goldenImageRef or target.tagSelector"))]
pub struct RetentionTarget {
    /// A GoldenImage in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden_image_ref: Option<GoldenImageReference>,
    /// Templates carrying all of these Proxmox tags (and our ownership marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[a-z0-9_][a-z0-9_+.-]*$'))").message("tagSelector entries must be Proxmox tags: lowercase letters, digits and _ + . -"))]
    pub tag_selector: Option<Vec<String>>,
}

/// Reference to a GoldenImage by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenImageReference {
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("goldenImageRef.name must be the name of a GoldenImage"))]
    #[schemars(length(max = 253))]
    pub name: String,
}

/// How templates are archived.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'backup' || has(self.backupStorage)").message("archive.backupStorage is required when archive.mode is backup"))]
pub struct ArchiveSpec {
    /// `backup` (vzdump to `backupStorage`, check it, then delete), `tag` (drop channel tags,
    /// add `archived`, keep the template) or `delete`.
    #[serde(default)]
    pub mode: ArchiveMode,
    /// Proxmox storage with `backup` content, for `mode: backup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub backup_storage: Option<String>,
}

/// Archive mode.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum ArchiveMode {
    Backup,
    /// Non-destructive default.
    #[default]
    Tag,
    Delete,
}

/// Observed state of a TemplateRetention.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRetentionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Human-readable target, e.g. `goldenimage/ubuntu` or `tags: ubuntu,minimal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_description: Option<String>,
    /// The current plan: one entry per template.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<PlannedAction>,
    /// When the plan was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_at: Option<Time>,
    /// What the last run executed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub executed: Vec<ExecutedAction>,
    /// VMIDs the target GoldenImage listed in `status.versions` when the plan was made
    /// (`goldenImageRef` targets): when they change, the controller plans again at once
    /// instead of after `spec.interval`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_versions: Vec<u32>,
}

/// One template's fate in the plan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedAction {
    pub vmid: u32,
    pub name: String,
    /// `keep`, `archive`, `delete` or `ignore`.
    pub action: String,
    pub reason: String,
}

/// One executed action.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutedAction {
    pub vmid: u32,
    pub action: String,
    pub succeeded: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}
