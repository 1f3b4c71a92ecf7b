//! Executing a retention plan against Proxmox: archive (backup then delete, or re-tag) and
//! delete, each with a result and a message.
//!
//! It is the one delete path: retention runs (`sombrero prune`, the TemplateRetention
//! controller) and a GoldenImage's `deletionPolicy: Delete` finalizer execute their plans here.
//!
//! Safety, in order:
//! - Only the plan's removals run; everything else is never touched.
//! - Immediately before every destructive call the template is re-read ([`recheck`]): still a
//!   template with our marker for its VMID naming an owner in the plan's scope, not protected,
//!   not locked, not the latest (unless the image itself is deleted), not in use (LVM-thin lets
//!   PVE delete a base volume under linked clones: this check is what stops it).
//! - Deletion purges the VM (backup jobs, HA, replication entries) and its referenced disks;
//!   unreferenced volumes named after the VMID are left alone: nothing proves they are ours.
//! - `backup`: vzdump runs on the node that hosts the template (elsewhere PVE "skips external
//!   VMs" and reports OK without a backup); the template is deleted only when a new backup volume
//!   of it shows in the storage's content. Any failure leaves the template in place.
//! - Crash safety: the backup's notes name the template (`sombrero archive: <name> ...`). A run
//!   interrupted between backup and delete finds that backup next time and deletes without a
//!   second vzdump; a run interrupted during delete finds the template gone ("already gone").

use std::collections::BTreeSet;
use std::time::Duration;

use crate::api::template_retention::ExecutedAction;
use crate::image::tags::TagSet;
use crate::proxmox::readback::{Destroyed, TaskCall, destroy_vm, run_task};
use crate::proxmox::{self, ConfigUpdate, DeleteVm, QemuConfig, Vzdump, client::Client};

use super::inventory::{Checked, Refusal, recheck};
use super::plan::{Action, ArchiveMode, Decision, Plan};

/// How long a template deletion may take.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long a template backup may take (a few GiB, compressed).
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// Start of the notes of every backup we make; the template name follows.
pub const BACKUP_NOTES_PREFIX: &str = "sombrero archive: ";

/// Where progress lines go (the CLI prints them on stderr; the controller logs them).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// One executed removal: the status record, and the Proxmox error that failed it, if one did
/// (a refusal by the re-check has none), so a caller can tell a revoked token from a busy VM.
#[derive(Debug, Clone)]
pub struct Executed {
    pub record: ExecutedAction,
    pub error: Option<proxmox::Error>,
}

/// A failed step: the message, and the Proxmox error behind it.
struct Failure {
    message: String,
    error: Option<proxmox::Error>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self {
            message,
            error: None,
        }
    }
}

/// `context: <error><suffix>`, keeping the error.
fn failed(context: &str, e: proxmox::Error, suffix: &str) -> Failure {
    Failure {
        message: format!("{context}: {e}{suffix}"),
        error: Some(e),
    }
}

/// Runs the plan's removals (oldest first). `dry_run` makes no call at all and returns nothing.
/// `backup_storage` is required in `backup` mode (an archive without it fails, deleting nothing).
pub async fn execute(
    client: &Client,
    plan: &Plan,
    backup_storage: Option<&str>,
    dry_run: bool,
    progress: Progress<'_>,
) -> Vec<ExecutedAction> {
    execute_detailed(client, plan, backup_storage, dry_run, progress)
        .await
        .into_iter()
        .map(|e| e.record)
        .collect()
}

/// [`execute`], with the Proxmox error of each failed action.
pub async fn execute_detailed(
    client: &Client,
    plan: &Plan,
    backup_storage: Option<&str>,
    dry_run: bool,
    progress: Progress<'_>,
) -> Vec<Executed> {
    let mut results = Vec::new();
    for d in plan.removals().collect::<Vec<_>>().into_iter().rev() {
        if dry_run {
            progress(&format!(
                "dry run: would {} {}",
                verb(plan.mode, d),
                label(d)
            ));
            continue;
        }
        let outcome = match (d.action, plan.mode) {
            (Action::Delete, _) | (Action::Archive, ArchiveMode::Delete) => {
                delete(client, plan, d).await
            }
            (Action::Archive, ArchiveMode::Tag) => tag(client, plan, d).await,
            (Action::Archive, ArchiveMode::Backup) => match backup_storage {
                Some(storage) => backup(client, plan, d, storage, progress).await,
                None => Err(
                    "archive mode backup needs archive.backupStorage; nothing was deleted"
                        .to_string()
                        .into(),
                ),
            },
            (Action::Keep | Action::Ignore, _) => continue,
        };
        let (succeeded, message, error) = match outcome {
            Ok(m) => (true, m, None),
            Err(f) => (false, f.message, f.error),
        };
        progress(&format!(
            "{} {}: {}",
            label(d),
            if succeeded { "done" } else { "FAILED" },
            message
        ));
        results.push(Executed {
            record: ExecutedAction {
                vmid: d.vmid,
                action: d.action.to_string(),
                succeeded,
                message,
                at: Some(crate::api::time::to_time(chrono::Utc::now())),
            },
            error,
        });
    }
    results
}

fn label(d: &Decision) -> String {
    format!("{} ({})", d.vmid, d.name)
}

fn verb(mode: ArchiveMode, d: &Decision) -> &'static str {
    match (d.action, mode) {
        (Action::Archive, ArchiveMode::Backup) => "back up then delete",
        (Action::Archive, ArchiveMode::Tag) => "tag as archived",
        _ => "delete",
    }
}

/// The re-check before a destructive call, against the plan's scope and purpose.
async fn checked(
    client: &Client,
    plan: &Plan,
    d: &Decision,
) -> Result<Result<Checked, Refusal>, Failure> {
    recheck(client, d.vmid, &plan.scope, plan.purpose)
        .await
        .map_err(|e| failed("could not re-check the template before changing it", e, ""))
}

async fn delete(client: &Client, plan: &Plan, d: &Decision) -> Result<String, Failure> {
    match checked(client, plan, d).await? {
        Ok(c) => destroy(client, d.vmid, &c.node).await,
        Err(Refusal::Gone) => Ok("already gone".into()),
        Err(r) => Err(format!("not deleted: {r}").into()),
    }
}

async fn destroy(client: &Client, vmid: u32, node: &str) -> Result<String, Failure> {
    let opts = DeleteVm {
        purge: true,
        destroy_unreferenced_disks: false,
    };
    match destroy_vm(client, node, vmid, opts, DELETE_TIMEOUT).await {
        Ok(Destroyed::Now { warnings: 0 }) => Ok(format!("deleted from {node}")),
        Ok(Destroyed::Now { warnings }) => Ok(format!("deleted from {node} ({warnings} warnings)")),
        // Gone between the re-check and the call: what we wanted.
        Ok(Destroyed::AlreadyGone) => Ok("already gone".into()),
        Err(e) => Err(failed("delete failed", e, "")),
    }
}

async fn tag(client: &Client, plan: &Plan, d: &Decision) -> Result<String, Failure> {
    let c = match checked(client, plan, d).await? {
        Ok(c) => c,
        Err(Refusal::Gone) => return Ok("already gone".into()),
        Err(r) => return Err(format!("not archived: {r}").into()),
    };
    let mut tags = TagSet::parse(c.config.tags.as_deref().unwrap_or(""));
    tags.mark_archived();
    let mut update = ConfigUpdate::new(QemuConfig::new().set("tags", tags.to_config_string()));
    if let Some(digest) = &c.config.digest {
        // Someone changing the template meanwhile makes PVE refuse; the next run re-plans.
        update = update.digest(digest);
    }
    match client.update_vm_config(&c.node, d.vmid, &update).await {
        Ok(()) => {}
        // A write with a digest is not repeated blindly: after a lost answer the config says
        // whether it ran; if not, the next run re-plans (nothing destructive happened).
        Err(e) if e.outcome_unknown() => {
            let now = client
                .vm_config(&c.node, d.vmid)
                .await
                .map_err(|e| failed("tagging: could not read the result back", e, ""))?;
            if !TagSet::parse(now.tags.as_deref().unwrap_or("")).is_archived() {
                return Err(failed("tagging failed", e, ""));
            }
        }
        Err(e) => return Err(failed("tagging failed", e, "")),
    }
    Ok(format!("tagged archived (tags: {tags})"))
}

async fn backup(
    client: &Client,
    plan: &Plan,
    d: &Decision,
    storage: &str,
    progress: Progress<'_>,
) -> Result<String, Failure> {
    let c = match checked(client, plan, d).await? {
        Ok(c) => c,
        Err(Refusal::Gone) => return Ok("already gone".into()),
        Err(r) => return Err(format!("not archived: {r}").into()),
    };
    let name = c.config.name.clone().unwrap_or_else(|| d.name.clone());
    let notes = format!("{BACKUP_NOTES_PREFIX}{name}");
    // `<notes> (VMID ..., node ...)`: the name must match whole, not as a prefix of another.
    let ours = |n: &str| n == notes || n.starts_with(&format!("{notes} ("));
    let nothing = "; nothing was deleted";
    let before = backups_of(client, &c.node, storage, d.vmid)
        .await
        .map_err(|e| {
            failed(
                &format!("backup storage {storage:?} cannot be listed"),
                e,
                nothing,
            )
        })?;
    let volid = match before.iter().find(|(_, n)| ours(n)).map(|(v, _)| v.clone()) {
        // An earlier run backed it up and was interrupted before deleting.
        Some(existing) => {
            progress(&format!("{}: found earlier backup {existing}", label(d)));
            existing
        }
        None => {
            progress(&format!("{}: vzdump on {} to {storage}", label(d), c.node));
            let mut request = Vzdump::new(d.vmid, storage);
            request.compress = Some("zstd".into());
            request.notes_template =
                Some(format!("{notes} (VMID {{{{vmid}}}}, node {{{{node}}}})"));
            // After a lost answer the vzdump task is looked for (the UPID of a one-VM backup
            // names the VM); none found, it is started once more.
            let what = TaskCall {
                node: &c.node,
                vmid: Some(d.vmid),
                task_type: "vzdump",
                id: d.vmid.to_string(),
            };
            let (node, request) = (c.node.as_str(), &request);
            run_task(client, &what, BACKUP_TIMEOUT, move || async move {
                client.vzdump(node, request).await.map(Some)
            })
            .await
            .map_err(|e| failed("backup failed", e, nothing))?;
            let known: BTreeSet<&String> = before.iter().map(|(v, _)| v).collect();
            let after = backups_of(client, &c.node, storage, d.vmid)
                .await
                .map_err(|e| failed("backup could not be checked", e, nothing))?;
            after
                .into_iter()
                .find(|(v, n)| !known.contains(v) && ours(n))
                .map(|(v, _)| v)
                .ok_or_else(|| {
                    Failure::from(format!(
                        "vzdump reported success but no new backup of {} is in {storage}'s content; nothing was deleted",
                        d.vmid
                    ))
                })?
        }
    };
    // The backup may have taken long: check again right before deleting.
    let recheck = checked(client, plan, d).await.map_err(|f| Failure {
        message: format!("backed up to {volid}, but {}", f.message),
        error: f.error,
    })?;
    match recheck {
        Ok(c) => destroy(client, d.vmid, &c.node)
            .await
            .map(|m| format!("backed up to {volid}, {m}"))
            .map_err(|f| Failure {
                message: format!("backed up to {volid}, but {}", f.message),
                error: f.error,
            }),
        Err(Refusal::Gone) => Ok(format!("backed up to {volid}; already gone")),
        Err(r) => Err(format!("backed up to {volid}, not deleted: {r}").into()),
    }
}

/// `(volid, notes)` of the backups of `vmid` on `storage`.
async fn backups_of(
    client: &Client,
    node: &str,
    storage: &str,
    vmid: u32,
) -> crate::proxmox::Result<Vec<(String, String)>> {
    Ok(client
        .storage_content(node, storage, Some("backup"), Some(vmid))
        .await?
        .into_iter()
        .filter(|v| v.vmid == Some(vmid))
        .map(|v| (v.volid, v.notes.unwrap_or_default()))
        .collect())
}
