//! Destroying validation clones: the one a run made, and leftovers of runs that died.
//!
//! A VM is destroyed only when its description holds our marker with role `validation`,
//! written for that very VMID. A consumer's clone of a template carries a copy of the template's
//! marker (another VMID, role `template`) and is never touched.

use std::time::Duration;

use tracing::{info, warn};

use super::VALIDATION_TAG;
use super::error::ValidateError;
use crate::config_reads::read_config;
use crate::image::marker::{Marker, Owner, Ownership, Role, ownership, parse_description};
use crate::image::tags::OWNER_TAG;
use crate::proxmox::readback::{Destroyed, destroy_vm, stop_vm};
use crate::proxmox::{Client, ConfigUpdate, DeleteVm, QemuConfig};

/// Prefix of a validation clone's name (`sombrero-validate-<template vmid>`). The name is set by
/// the clone call itself, so a clone whose tags were not written yet is still found.
pub(crate) const CLONE_NAME_PREFIX: &str = "sombrero-validate-";

/// How long one stop or destroy task may take.
const TASK_TIMEOUT: Duration = Duration::from_secs(300);

/// Finds validation clones of `owner` left behind (by marker: role `validation`, written for
/// its own VMID, owner namespace, name and uid equal) and destroys them. Returns their VMIDs.
///
/// The uid is compared too: a same-named GoldenImage of a second cluster (or of an earlier
/// incarnation of this object) is not ours, and its clone may belong to a validation running
/// right now. Such a leftover is `sombrero prune --owner-uid`'s to remove. Call it only while
/// no validation of this owner runs (the controller runs at most one per GoldenImage).
///
/// Cost: one inventory list, plus one config read per candidate (a non-template VM named
/// `sombrero-validate-*` or tagged `sombrero-validation`, or a nameless fresh VM with our tag).
pub async fn cleanup_stale_validation_vms(
    client: &Client,
    owner: &Owner,
) -> Result<Vec<u32>, ValidateError> {
    let vms = client
        .cluster_vms()
        .await
        .map_err(|e| ValidateError::proxmox("listing VMs to find leftover validation clones", e))?;
    let mut destroyed = Vec::new();
    for vm in vms.iter().filter(|vm| vm.is_qemu() && !vm.template) {
        let tags = vm.tag_list();
        let named = vm
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with(CLONE_NAME_PREFIX));
        let fresh_and_tagged = vm.name.is_none() && tags.iter().any(|t| t == OWNER_TAG);
        if !(named || fresh_and_tagged || tags.iter().any(|t| t == VALIDATION_TAG)) {
            continue;
        }
        let read = read_config(client, vm).await.map_err(|e| {
            ValidateError::proxmox(format!("reading the config of VM {}", vm.vmid), e)
        })?;
        let Some(read) = read else { continue };
        if !is_validation_clone_marker(read.marker.as_deref(), vm.vmid, Some(owner)) {
            continue;
        }
        info!(vmid = vm.vmid, node = %vm.node, "destroying a leftover validation clone");
        if destroy_validation_vm(client, &vm.node, vm.vmid).await? {
            destroyed.push(vm.vmid);
        }
    }
    Ok(destroyed)
}

/// Whether a description marks `vmid` as our validation clone (of `owner`, when given).
pub(crate) fn is_validation_clone_of(
    description: Option<&str>,
    vmid: u32,
    owner: Option<&Owner>,
) -> bool {
    let marker = parse_description(description.unwrap_or("")).ok().flatten();
    is_validation_clone_marker(marker.as_ref(), vmid, owner)
}

/// Whether a parsed marker marks `vmid` as our validation clone (of `owner`, when given).
fn is_validation_clone_marker(marker: Option<&Marker>, vmid: u32, owner: Option<&Owner>) -> bool {
    marker.is_some_and(|m| {
        ownership(Some(m), vmid) == Ownership::Ours(Role::Validation)
            && owner.is_none_or(|o| m.owner == *o)
    })
}

/// Stops and destroys `vmid` after checking, right before, that it is our validation clone.
/// `Ok(false)` when it is gone already or is not ours (then nothing is done).
pub async fn destroy_validation_vm(
    client: &Client,
    node: &str,
    vmid: u32,
) -> Result<bool, ValidateError> {
    let during = |what: &str| format!("{what} validation clone {vmid}");
    let config = match client.vm_config(node, vmid).await {
        Ok(c) => c,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(ValidateError::proxmox(during("reading"), e)),
    };
    if !is_validation_clone_of(config.description.as_deref(), vmid, None) {
        warn!(
            vmid,
            "not destroying VM: it does not carry our validation marker"
        );
        return Ok(false);
    }
    match client.vm_status(node, vmid).await {
        Ok(s) if s.is_running() => match stop_vm(client, node, vmid, TASK_TIMEOUT).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => return Err(ValidateError::proxmox(during("stopping"), e)),
        },
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(ValidateError::proxmox(during("reading the status of"), e)),
    }
    if config.protection {
        // Ours by marker: a protection flag copied from the template must not keep it alive.
        let update = ConfigUpdate::new(QemuConfig::new().protection(false));
        if let Err(e) = client.update_vm_config(node, vmid, &update).await {
            return Err(ValidateError::proxmox(during("unprotecting"), e));
        }
    }
    let opts = DeleteVm {
        purge: true,
        destroy_unreferenced_disks: true,
    };
    match destroy_vm(client, node, vmid, opts, TASK_TIMEOUT).await {
        Ok(Destroyed::Now { .. }) => Ok(true),
        Ok(Destroyed::AlreadyGone) => Ok(false),
        Err(e) => Err(ValidateError::proxmox(during("destroying"), e)),
    }
}
