//! What Proxmox holds for one image: every VM carrying the image's tag, with its parsed marker.
//! Only VMs whose marker names their own VMID and our owner uid are ever changed.

use chrono::NaiveDate;

use super::error::BuildError;
use crate::image::marker::{Marker, Owner, Role, parse_description};
use crate::image::naming::NameTemplate;
use crate::image::tags::image_tag;
use crate::proxmox::{Client, VmConfig};

/// One VM with the image's tag.
#[derive(Debug, Clone)]
pub struct TaggedVm {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub running: bool,
    pub config: VmConfig,
    pub marker: Option<Marker>,
}

impl TaggedVm {
    /// The marker was written for this VMID by this owner: ours to change.
    pub fn owned_by(&self, owner: &Owner) -> bool {
        self.marker
            .as_ref()
            .is_some_and(|m| m.vmid == self.vmid && m.owner.uid == owner.uid)
    }

    pub fn is_our_build(&self, owner: &Owner) -> bool {
        self.owned_by(owner) && self.marker.as_ref().is_some_and(|m| m.role == Role::Build)
    }
}

/// Lists the VMs tagged for this owner's image and reads their configs (one list + one config
/// per tagged VM; the image's templates are few).
pub async fn scan(client: &Client, owner: &Owner) -> Result<Vec<TaggedVm>, BuildError> {
    let tag = image_tag(&owner.namespace, &owner.name);
    let vms = client
        .cluster_vms()
        .await
        .map_err(|e| BuildError::proxmox("list VMs", &e))?;
    let mut out = Vec::new();
    for vm in vms.into_iter().filter(|v| v.is_qemu()) {
        if !vm.tag_list().contains(&tag) {
            continue;
        }
        let config = match client.vm_config(&vm.node, vm.vmid).await {
            Ok(c) => c,
            // Deleted since the listing.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(BuildError::proxmox("read VM config", &e)),
        };
        let marker = parse_description(config.description.as_deref().unwrap_or(""))
            .ok()
            .flatten();
        out.push(TaggedVm {
            vmid: vm.vmid,
            node: vm.node.clone(),
            name: config.name.clone().or(vm.name.clone()).unwrap_or_default(),
            running: vm.status.as_deref() == Some("running"),
            config,
            marker,
        });
    }
    Ok(out)
}

/// Every (date, build number) in use by this image: from markers (build VMs reserve theirs)
/// and from names that parse with the image's name template.
pub fn used_numbers(
    vms: &[TaggedVm],
    template: &NameTemplate,
    os: &str,
    image_type: &str,
) -> Vec<(NaiveDate, u16)> {
    let mut used = Vec::new();
    for vm in vms {
        if let Some(m) = &vm.marker {
            used.push((m.metadata.build_date, m.metadata.build_number));
        }
        if let Some(p) = template.parse_name(&vm.name, os, image_type) {
            used.push(p);
        }
    }
    used
}
