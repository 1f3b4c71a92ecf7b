//! Which VMs use a template: pure helpers over VM configs and storage content.
//!
//! A linked clone shares its template's base volume, and deleting the template frees (or, on
//! LVM-thin, silently drops) that volume. Proxmox shows the relation in three ways, depending on
//! the storage:
//! - in the clone's volume id: `local-zfs:base-100-disk-0/vm-201-disk-0` (ZFS, RBD) or
//!   `local:100/base-100-disk-0.qcow2/201/vm-201-disk-0.qcow2` (directory, NFS, CIFS: qcow2);
//! - in the storage content's `parent` field (`base-100-disk-0@__base__`, `base-100-disk-0.qcow2`);
//! - **not at all on LVM-thin**: the clone is a plain `vm-201-disk-0` thin snapshot
//!   (pve-storage `LvmThinPlugin.pm`: "volumes which were created as linked clones of another base
//!   volume are currently not tracking this relationship in their volume IDs").
//!
//! For LVM-thin the only trace left is what Proxmox copies into every clone: the template's
//! description, i.e. our marker naming the template's VMID. A VM carrying such a copy with a disk
//! on the template's LVM-thin storage may be a linked clone, and counts as one (it may be a full
//! clone: the API cannot tell them apart there, so we err on the side of keeping the template).

use std::collections::{BTreeMap, BTreeSet};

use crate::proxmox::{StorageVolume, VmConfig};

/// Config keys that hold disks (cdroms are filtered by value).
const DISK_PREFIXES: &[&str] = &[
    "scsi", "sata", "ide", "virtio", "efidisk", "tpmstate", "unused",
];

/// The storage of a volume id (`local-lvm:vm-1-disk-0` -> `local-lvm`).
pub fn storage_of(volid: &str) -> Option<&str> {
    volid
        .split_once(':')
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty())
}

/// The volume ids of a VM's disks (`scsi0: local-lvm:vm-1-disk-0,size=4G` -> `local-lvm:vm-1-disk-0`),
/// cdroms, `none` and pass-through devices (`/dev/...`) excluded. Unused disks count: a detached
/// linked-clone disk still needs its base.
pub fn disk_volumes(config: &VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    for key in config.extra.keys() {
        let Some(prefix) = DISK_PREFIXES.iter().find(|p| key.starts_with(**p)) else {
            continue;
        };
        if !key[prefix.len()..].chars().all(|c| c.is_ascii_digit()) || key.len() == prefix.len() {
            continue;
        }
        let Some(value) = config.value(key) else {
            continue;
        };
        let mut parts = value.split(',');
        let volume = parts.next().unwrap_or("").trim();
        if parts.any(|p| p.trim() == "media=cdrom") || storage_of(volume).is_none() {
            continue;
        }
        out.push(volume.to_string());
    }
    out.sort();
    out
}

/// The template VMID of every `base-<vmid>-disk-...` segment in a volume id or `parent` value
/// (`local:100/base-100-disk-0.qcow2/201/vm-201-disk-0.qcow2` -> `[100]`).
pub fn base_vmids(volume: &str) -> Vec<u32> {
    let path = volume.split_once(':').map_or(volume, |(_, p)| p);
    let mut out: Vec<u32> = path
        .split(['/', '@'])
        .filter_map(|segment| {
            let rest = segment.strip_prefix("base-")?;
            let (digits, tail) = rest.split_once('-')?;
            if !tail.starts_with("disk-") {
                return None;
            }
            digits.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Linked-clone relations found in one storage's content listing: `(template, clone)` pairs from
/// volume ids and `parent` fields. Volumes owned by the template itself are skipped.
pub fn clones_in_content(volumes: &[StorageVolume]) -> Vec<(u32, u32)> {
    let mut out = BTreeSet::new();
    for v in volumes {
        let Some(owner) = v.vmid else { continue };
        let mut bases = base_vmids(&v.volid);
        if let Some(parent) = &v.parent {
            bases.extend(base_vmids(parent));
        }
        for base in bases {
            if base != owner {
                out.insert((base, owner));
            }
        }
    }
    out.into_iter().collect()
}

/// Linked-clone relations from one VM's config: every template whose base volume its disks name.
pub fn bases_in_config(vmid: u32, config: &VmConfig) -> Vec<u32> {
    let mut out: Vec<u32> = disk_volumes(config)
        .iter()
        .flat_map(|v| base_vmids(v))
        .filter(|b| *b != vmid)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Template VMID -> the VMs that use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage(BTreeMap<u32, BTreeSet<u32>>);

impl Usage {
    pub fn add(&mut self, template: u32, user: u32) {
        if template != user {
            self.0.entry(template).or_default().insert(user);
        }
    }

    /// The VMs using `template`, ascending.
    pub fn users(&self, template: u32) -> Vec<u32> {
        self.0
            .get(&template)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> VmConfig {
        serde_json::from_value(v).expect("config")
    }

    #[test]
    fn base_vmids_of_every_storage_kind() {
        assert_eq!(base_vmids("local-zfs:base-100-disk-0/vm-201-disk-0"), [100]);
        assert_eq!(
            base_vmids("local:100/base-100-disk-0.qcow2/201/vm-201-disk-0.qcow2"),
            [100]
        );
        assert_eq!(base_vmids("base-9000-disk-1@__base__"), [9000]);
        assert_eq!(base_vmids("local-lvm:base-100-disk-0"), [100]);
        assert!(base_vmids("local-lvm:vm-201-disk-0").is_empty());
        assert!(base_vmids("local-lvm:base-x-disk-0").is_empty());
        assert!(base_vmids("local-lvm:base-100-cloudinit").is_empty());
    }

    #[test]
    fn disks_of_a_config() {
        let c = config(json!({
            "scsi0": "local-zfs:base-100-disk-0/vm-201-disk-0,size=4G",
            "ide2": "local:iso/x.iso,media=cdrom",
            "ide0": "none,media=cdrom",
            "unused0": "local-lvm:vm-201-disk-1",
            "efidisk0": "local-lvm:vm-201-disk-2,size=4M",
            "scsihw": "virtio-scsi-pci",
            "net0": "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0",
            "sata1": "/dev/disk/by-id/ata-X",
        }));
        assert_eq!(
            disk_volumes(&c),
            [
                "local-lvm:vm-201-disk-1",
                "local-lvm:vm-201-disk-2",
                "local-zfs:base-100-disk-0/vm-201-disk-0"
            ]
        );
        assert_eq!(bases_in_config(201, &c), [100]);
        // A template's own base disks are not a use of itself.
        let t = config(json!({"scsi0": "local-lvm:base-100-disk-0,size=4G", "template": 1}));
        assert!(bases_in_config(100, &t).is_empty());
    }

    #[test]
    fn content_relations() {
        let vols = vec![
            StorageVolume {
                volid: "local-zfs:vm-201-disk-0".into(),
                vmid: Some(201),
                parent: Some("base-100-disk-0@__base__".into()),
                ..Default::default()
            },
            StorageVolume {
                volid: "local:100/base-100-disk-0.qcow2/202/vm-202-disk-0.qcow2".into(),
                vmid: Some(202),
                ..Default::default()
            },
            StorageVolume {
                volid: "local-zfs:base-100-disk-0".into(),
                vmid: Some(100),
                ..Default::default()
            },
            StorageVolume {
                volid: "local-lvm:vm-300-disk-0".into(),
                vmid: Some(300),
                ..Default::default()
            },
        ];
        assert_eq!(clones_in_content(&vols), [(100, 201), (100, 202)]);
        let mut u = Usage::default();
        for (t, c) in clones_in_content(&vols) {
            u.add(t, c);
        }
        u.add(100, 100);
        assert_eq!(u.users(100), [201, 202]);
        assert!(u.users(300).is_empty());
    }
}
