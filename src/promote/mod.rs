//! Promotion: a validated template becomes the image's "latest validated" — the one template
//! that carries the channel tag (`sombrero-latest`, selected together with the image tag
//! `sombrero.<ns>.<name>`, see `image::tags::latest_selector`).
//!
//! # API
//!
//! - [`promote`]`(client, &owner, vmid, Evidence) -> Result<`[`PromotionOutcome`]`, `[`PromoteError`]`>`
//! - [`mark_failed`]`(client, vmid, reason) -> Result<(), PromoteError>`
//! - [`converge_channel`]`(client, &owner) -> Result<Option<u32>, PromoteError>`: repairs a
//!   channel left with several holders (a crash between the writes) without knowing which
//!   promotion was in flight.
//! - [`output::config_map_data`] / [`output::terraform_output`] / [`output::packer_manifest`]:
//!   the pure hand-off the controller writes into the output ConfigMap.
//!
//! # Order of the writes, and why
//!
//! Proxmox cannot change two VMs atomically, so promotion is two kinds of write:
//! 1. the new template, in one config write: `validated` and `sombrero-latest` tags, the marker's
//!    validation record `Passed{at}`;
//! 2. each previous holder: `sombrero-latest` removed.
//!
//! Adding first means the image always has at least one holder, and every holder is a validated
//! template: Terraform's "newest with matching tags" and a person looking at the UI never find
//! none. Removing first would leave a window (forever, after a crash) with no latest at all,
//! which breaks every consumer's next plan. The cost of adding first is a short window with two
//! holders, which a selector demanding exactly one (Cluster API) sees as ambiguous; re-running
//! [`promote`] (idempotent: write 1 is skipped when already there) or [`converge_channel`]
//! (keeps the most recently validated, then newest build) removes the extra holder.
//!
//! Every write is read-modify-write with the config `digest`, so a concurrent edit of the tags
//! (a person in the UI) is not overwritten; PVE refuses the stale write and it is redone.
//! Only templates with our marker written for their own VMID and naming this image are read or
//! changed: consumers' clones (copied marker) and other images are left alone.

pub mod output;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::info;

use crate::config_reads::{ConfigRead, read_config};
use crate::image::marker::{
    Marker, Owner, Ownership, Role, ValidationRecord, ownership, parse_description,
    render_description,
};
use crate::image::tags::{LATEST_TAG, TagSet, image_tag};
use crate::proxmox::{self, Client, ClusterVm, ConfigUpdate, QemuConfig, VmConfig};
use crate::validate::ValidationReport;

pub use output::{config_map_data, packer_manifest, terraform_output};

/// Attempts of one read-modify-write when PVE reports a concurrent change.
const WRITE_ATTEMPTS: u32 = 4;
/// Longest failure reason kept in the marker (it shares 8 KiB with the user's notes).
const MAX_REASON_LEN: usize = 200;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoteError {
    #[error("promotion: {during}: {source}")]
    Proxmox {
        during: String,
        #[source]
        source: proxmox::Error,
    },
    /// No VM with this VMID in the cluster.
    #[error("promotion: VM {vmid} does not exist")]
    NotFound { vmid: u32 },
    /// Not a template of ours (no marker, a copied marker, another image, not a template).
    #[error("promotion: VM {vmid} is not a template of this image: {reason}")]
    NotOurs { vmid: u32, reason: String },
    /// The evidence does not show a passed validation of this template.
    #[error("promotion: template {vmid} is not validated: {reason}")]
    NotValidated { vmid: u32, reason: String },
    /// The marker cannot be written (description too long).
    #[error("promotion: cannot update the marker of {vmid}: {message}")]
    Marker { vmid: u32, message: String },
}

impl PromoteError {
    fn proxmox(during: impl Into<String>, source: proxmox::Error) -> Self {
        PromoteError::Proxmox {
            during: during.into(),
            source,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            PromoteError::Proxmox { source, .. } => {
                source.is_retryable() || is_digest_conflict(source)
            }
            _ => false,
        }
    }

    pub fn category(&self) -> &'static str {
        match self {
            PromoteError::Proxmox { source, .. } => source.category(),
            PromoteError::NotFound { .. } => "not_found",
            PromoteError::NotOurs { .. } => "not_ours",
            PromoteError::NotValidated { .. } => "not_validated",
            PromoteError::Marker { .. } => "marker",
        }
    }
}

/// Why the template may be promoted.
#[derive(Debug, Clone, Copy)]
pub enum Evidence<'a> {
    /// A report of [`crate::validate::validate_template`]: must be for this template and passed.
    Report(&'a ValidationReport),
    /// The template's marker already records `Passed` (re-running after a crash).
    Recorded,
    /// `spec.validation.enabled: false`: promoted unvalidated; the marker stays `Pending` and the
    /// template gets no `validated` tag.
    ValidationDisabled,
}

/// What [`promote`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionOutcome {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    /// When validation passed (`None` with validation disabled).
    pub validated_at: Option<DateTime<Utc>>,
    /// Templates the channel tag was taken from.
    pub previous: Vec<u32>,
    /// Whether anything was written (false: it was already the only holder).
    pub changed: bool,
    /// The template's marker after promotion, for [`output::config_map_data`].
    pub marker: Marker,
}

/// One template of an image as promotion sees it.
#[derive(Debug, Clone)]
struct ImageTemplate {
    vmid: u32,
    node: String,
    tags: TagSet,
    marker: Marker,
}

fn owner_matches(marker: &Marker, owner: &Owner) -> bool {
    marker.owner.namespace == owner.namespace && marker.owner.name == owner.name
}

/// Whether a listed VM may hold this image's channel: a template listed with the image tag and
/// the channel tag. The listing shows every VM's tags as its config has them, so only these
/// configs are read: a promotion costs the same however many templates the image has.
fn may_hold_channel(vm: &ClusterVm, image_tag: &str) -> bool {
    let tags = vm.tag_list();
    vm.is_qemu()
        && vm.template
        && tags.iter().any(|t| t == image_tag)
        && tags.iter().any(|t| t == LATEST_TAG)
}

/// The image's templates that are ours and were listed holding the channel tag: `template=1`,
/// our marker written for their VMID with role `template`, naming this image. Their tags are
/// read from their configs (the listing only picks whom to read).
async fn channel_holders(
    client: &Client,
    vms: &[ClusterVm],
    owner: &Owner,
) -> Result<Vec<ImageTemplate>, PromoteError> {
    let tag = image_tag(&owner.namespace, &owner.name);
    let mut out = Vec::new();
    for vm in vms.iter().filter(|vm| may_hold_channel(vm, &tag)) {
        let read = read_config(client, vm)
            .await
            .map_err(|e| PromoteError::proxmox(format!("reading the config of {}", vm.vmid), e))?;
        if let Some(t) = read.and_then(|r| ours(vm.vmid, &vm.node, &r, owner)) {
            out.push(t);
        }
    }
    Ok(out)
}

fn ours(vmid: u32, node: &str, read: &ConfigRead, owner: &Owner) -> Option<ImageTemplate> {
    let marker = read.marker.as_deref()?;
    our_template(vmid, owner)(&read.config, marker).ok()?;
    Some(ImageTemplate {
        vmid,
        node: node.to_string(),
        tags: TagSet::parse(read.config.tags.as_deref().unwrap_or("")),
        marker: marker.clone(),
    })
}

async fn list_vms(client: &Client) -> Result<Vec<ClusterVm>, PromoteError> {
    client
        .cluster_vms()
        .await
        .map_err(|e| PromoteError::proxmox("listing VMs", e))
}

/// The node of `vmid` in a cluster listing.
fn locate(vms: &[ClusterVm], vmid: u32) -> Result<String, PromoteError> {
    vms.iter()
        .find(|vm| vm.vmid == vmid && vm.is_qemu())
        .map(|vm| vm.node.clone())
        .ok_or(PromoteError::NotFound { vmid })
}

fn is_digest_conflict(e: &proxmox::Error) -> bool {
    e.pve_message().is_some_and(|m| {
        let m = m.to_ascii_lowercase();
        m.contains("detected modified configuration") || m.contains("digest")
    })
}

/// Read-modify-write of a VM's tags and marker with the config digest. `change` gets the
/// current tags and marker and edits them; returns whether it changed anything. The write is
/// skipped when nothing changed. `check` refuses VMs that are not (or no longer) ours.
async fn rewrite<C, F>(
    client: &Client,
    node: &str,
    vmid: u32,
    check: C,
    mut change: F,
) -> Result<(bool, Marker), PromoteError>
where
    C: Fn(&VmConfig, &Marker) -> Result<(), PromoteError>,
    F: FnMut(&mut TagSet, &mut Marker),
{
    // Set when a write's answer was lost: the next read shows whether it ran.
    let mut lost = false;
    for attempt in 1..=WRITE_ATTEMPTS {
        let config = match client.vm_config(node, vmid).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => return Err(PromoteError::NotFound { vmid }),
            Err(e) => {
                return Err(PromoteError::proxmox(
                    format!("reading the config of {vmid}"),
                    e,
                ));
            }
        };
        let description = config.description.clone().unwrap_or_default();
        let marker = parse_description(&description)
            .map_err(|e| PromoteError::NotOurs {
                vmid,
                reason: e.to_string(),
            })?
            .ok_or_else(|| PromoteError::NotOurs {
                vmid,
                reason: "its description has no sombrero marker".into(),
            })?;
        check(&config, &marker)?;
        let old_tags = TagSet::parse(config.tags.as_deref().unwrap_or(""));
        let (mut tags, mut new_marker) = (old_tags.clone(), marker.clone());
        change(&mut tags, &mut new_marker);
        if tags == old_tags && new_marker == marker {
            return Ok((lost, marker));
        }
        let mut set = QemuConfig::new();
        let mut update_delete = None;
        if tags != old_tags {
            if tags.is_empty() {
                update_delete = Some("tags");
            } else {
                set = set.set("tags", tags.to_config_string());
            }
        }
        if new_marker != marker {
            let d = render_description(&description, &new_marker).map_err(|e| {
                PromoteError::Marker {
                    vmid,
                    message: e.to_string(),
                }
            })?;
            set = set.description(&d);
        }
        let mut update = ConfigUpdate::new(set);
        if let Some(k) = update_delete {
            update = update.delete(k);
        }
        if let Some(d) = config.digest.as_deref() {
            update = update.digest(d);
        }
        match client.update_vm_config(node, vmid, &update).await {
            Ok(()) => return Ok((true, new_marker)),
            Err(e) if is_digest_conflict(&e) && attempt < WRITE_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            // A digest write is never repeated blindly: read again (the digest changed if it
            // ran, and then there is nothing left to change), then decide.
            Err(e) if e.outcome_unknown() && attempt < WRITE_ATTEMPTS => {
                lost = true;
            }
            Err(e) => {
                return Err(PromoteError::proxmox(
                    format!("writing the tags and marker of {vmid}"),
                    e,
                ));
            }
        }
    }
    unreachable_write(vmid)
}

fn unreachable_write<T>(vmid: u32) -> Result<T, PromoteError> {
    Err(PromoteError::proxmox(
        format!("writing the tags and marker of {vmid}"),
        proxmox::Error::Locked {
            request: "PUT config".into(),
            message: "the config kept changing under us".into(),
        },
    ))
}

/// Checks that `config` is our template of `owner`.
fn our_template(
    vmid: u32,
    owner: &Owner,
) -> impl Fn(&VmConfig, &Marker) -> Result<(), PromoteError> + '_ {
    move |config, marker| {
        let reason = if ownership(Some(marker), vmid) != Ownership::Ours(Role::Template) {
            Some(format!(
                "its marker was written for VM {} with role {:?}",
                marker.vmid, marker.role
            ))
        } else if !owner_matches(marker, owner) {
            Some(format!(
                "it belongs to {}/{}",
                marker.owner.namespace, marker.owner.name
            ))
        } else if !config.template {
            Some("it is not a template (template=1)".into())
        } else {
            None
        };
        match reason {
            Some(reason) => Err(PromoteError::NotOurs { vmid, reason }),
            None => Ok(()),
        }
    }
}

/// Makes `vmid` the image's only holder of the channel tag. See the module docs for the order
/// of the writes. Idempotent: re-running after a crash (or twice) converges to exactly one
/// holder, `vmid`.
pub async fn promote(
    client: &Client,
    owner: &Owner,
    vmid: u32,
    evidence: Evidence<'_>,
) -> Result<PromotionOutcome, PromoteError> {
    let not_validated = |reason: String| PromoteError::NotValidated { vmid, reason };
    let passed_at = match evidence {
        Evidence::Report(r) if r.template_vmid != vmid => {
            return Err(not_validated(format!(
                "the report is for template {}",
                r.template_vmid
            )));
        }
        Evidence::Report(r) if !r.passed => return Err(not_validated(r.summary())),
        Evidence::Report(r) => Some(r.finished_at),
        Evidence::Recorded | Evidence::ValidationDisabled => None,
    };
    // One listing serves both: where `vmid` is, and which templates held the channel before
    // write 1 (their tags are read from each config). The controller runs one promotion per
    // image at a time; two racing CLI runs may leave two holders, which converge_channel mends.
    let vms = list_vms(client).await?;
    let node = locate(&vms, vmid)?;
    let check = our_template(vmid, owner);
    let recorded_only = matches!(evidence, Evidence::Recorded);
    let disabled = matches!(evidence, Evidence::ValidationDisabled);
    let mut refused = None;
    let (changed, marker) = rewrite(client, &node, vmid, &check, |tags, marker| {
        if recorded_only && marker.metadata.validation.validated_at().is_none() {
            refused = Some(format!(
                "its marker records {:?}, not a passed validation",
                marker.metadata.validation
            ));
            return;
        }
        if !disabled {
            if let Some(at) = passed_at {
                // Keep the first record of a pass: re-running must not move the time.
                if marker.metadata.validation.validated_at().is_none() {
                    marker.metadata.validation = ValidationRecord::Passed { at };
                }
            }
            tags.mark_validated();
        }
        tags.insert(LATEST_TAG);
    })
    .await?;
    if let Some(reason) = refused {
        return Err(not_validated(reason));
    }
    // Write 2: take the tag from every other holder of this image. Each is read, checked and
    // rewritten in one read-modify-write; one that is not ours (a consumer's template cloned
    // with our tags and marker) or is gone since the listing is left alone.
    let tag = image_tag(&owner.namespace, &owner.name);
    let mut previous = Vec::new();
    for other in vms
        .iter()
        .filter(|vm| vm.vmid != vmid && may_hold_channel(vm, &tag))
    {
        let removed = rewrite(
            client,
            &other.node,
            other.vmid,
            our_template(other.vmid, owner),
            |tags, _| {
                tags.remove(LATEST_TAG);
            },
        )
        .await;
        match removed {
            Ok((true, _)) => previous.push(other.vmid),
            Ok((false, _))
            | Err(PromoteError::NotOurs { .. })
            | Err(PromoteError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    info!(vmid, ?previous, "promoted to latest");
    Ok(PromotionOutcome {
        vmid,
        node,
        name: marker.metadata.name.clone(),
        validated_at: marker.metadata.validation.validated_at(),
        changed: changed || !previous.is_empty(),
        previous,
        marker,
    })
}

/// Ordering key among holders: most recently validated, then newest build.
fn holder_key(t: &ImageTemplate) -> (Option<DateTime<Utc>>, chrono::NaiveDate, u16, u32) {
    let m = &t.marker.metadata;
    (
        m.validation.validated_at(),
        m.build_date,
        m.build_number,
        t.vmid,
    )
}

/// Leaves exactly one holder of the channel tag when there are several (a crash between
/// promotion's writes): keeps the most recently validated (then newest build) and removes the
/// tag from the rest. Returns the holder, `None` when there is none (never invents one).
pub async fn converge_channel(client: &Client, owner: &Owner) -> Result<Option<u32>, PromoteError> {
    let vms = list_vms(client).await?;
    let templates = channel_holders(client, &vms, owner).await?;
    let mut holders: Vec<&ImageTemplate> =
        templates.iter().filter(|t| t.tags.is_latest()).collect();
    holders.sort_by_key(|t| std::cmp::Reverse(holder_key(t)));
    let Some(keep) = holders.first() else {
        return Ok(None);
    };
    for extra in &holders[1..] {
        rewrite(
            client,
            &extra.node,
            extra.vmid,
            our_template(extra.vmid, owner),
            |tags, _| {
                tags.remove(LATEST_TAG);
            },
        )
        .await?;
    }
    Ok(Some(keep.vmid))
}

/// Records a failed validation on template `vmid`: the `failed-validation` tag (and neither
/// `validated` nor the channel tag), and `Failed{at, reason}` in the marker. Any other template
/// holding the channel tag keeps it: the previous latest stays in place. Re-running keeps the
/// first record.
pub async fn mark_failed(client: &Client, vmid: u32, reason: &str) -> Result<(), PromoteError> {
    let node = locate(&list_vms(client).await?, vmid)?;
    let check = |config: &VmConfig, marker: &Marker| {
        if ownership(Some(marker), vmid) != Ownership::Ours(Role::Template) || !config.template {
            return Err(PromoteError::NotOurs {
                vmid,
                reason: format!(
                    "its marker was written for VM {} with role {:?} (template={})",
                    marker.vmid, marker.role, config.template
                ),
            });
        }
        Ok(())
    };
    let reason = crate::validate::truncate_reason(reason, MAX_REASON_LEN);
    let now = Utc::now();
    rewrite(client, &node, vmid, check, |tags, marker| {
        tags.mark_failed_validation();
        if !matches!(marker.metadata.validation, ValidationRecord::Failed { .. }) {
            marker.metadata.validation = ValidationRecord::Failed {
                at: now,
                reason: reason.clone(),
            };
        }
    })
    .await?;
    info!(vmid, "marked as failed validation");
    Ok(())
}
