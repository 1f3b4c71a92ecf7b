//! Reading listed VMs' configs with the marker in their description: one read for every
//! reader (the controller's shared inventory, the builder's scan, promotion, validation's
//! clean-up, retention), and one cache that keeps a read while the cluster listing shows the VM
//! unchanged.
//!
//! Why the listing can key the cache: Proxmox changes none of a VM's node, name, tags,
//! template flag and lock without changing its config, and we write a marker only with a tag
//! or name change, or from the run that owns the VM (which reads its own VM itself, or drops
//! it from the cache with [`ConfigCache::forget`]).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;

use crate::image::marker::{Marker, parse_description};
use crate::proxmox::{Client, ClusterVm, Result, VmConfig};

/// A VM's config as read, and the marker parsed from its description (once per read).
#[derive(Debug, Clone)]
pub struct ConfigRead {
    pub config: Arc<VmConfig>,
    /// `None` without a marker, or with one that does not parse (not ours to judge here:
    /// readers compare owners).
    pub marker: Option<Arc<Marker>>,
}

impl ConfigRead {
    /// Of a config just read (pure).
    pub fn of(config: VmConfig) -> ConfigRead {
        let marker = config
            .description
            .as_deref()
            .and_then(|d| parse_description(d).ok().flatten())
            .map(Arc::new);
        ConfigRead {
            config: Arc::new(config),
            marker,
        }
    }
}

/// Reads a listed VM's config; `None` when it was deleted since the listing (it is gone:
/// nothing to decide about it).
pub async fn read_config(client: &Client, vm: &ClusterVm) -> Result<Option<ConfigRead>> {
    match client.vm_config(&vm.node, vm.vmid).await {
        Ok(c) => Ok(Some(ConfigRead::of(c))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// What of a listing entry decides whether a config read earlier still holds (see the module
/// docs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListingKey {
    node: String,
    name: Option<String>,
    tags: Option<String>,
    template: bool,
    lock: Option<String>,
}

impl ListingKey {
    pub fn of(vm: &ClusterVm) -> ListingKey {
        ListingKey {
            node: vm.node.clone(),
            name: vm.name.clone(),
            tags: vm.tags.clone(),
            template: vm.template,
            lock: vm.lock.clone(),
        }
    }
}

/// Config reads by VMID, each valid while the listing shows the VM under the same
/// [`ListingKey`].
#[derive(Debug, Clone, Default)]
pub struct ConfigCache {
    reads: HashMap<u32, (ListingKey, ConfigRead)>,
}

impl ConfigCache {
    /// The read of `vm`, if one was made while it was listed as it is now (pure).
    pub fn get(&self, vm: &ClusterVm) -> Option<&ConfigRead> {
        self.reads
            .get(&vm.vmid)
            .filter(|(key, _)| *key == ListingKey::of(vm))
            .map(|(_, read)| read)
    }

    pub fn insert(&mut self, vm: &ClusterVm, read: ConfigRead) {
        self.reads.insert(vm.vmid, (ListingKey::of(vm), read));
    }

    /// Drops a VM's read: we changed it, and its description may differ without a listing
    /// change.
    pub fn forget(&mut self, vmid: u32) {
        self.reads.remove(&vmid);
    }

    /// Keeps only the VMIDs `keep` says (the VMs of the latest listing).
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.reads.retain(|vmid, _| keep(*vmid));
    }

    /// The reads of `vms`, in their order: from the cache where it holds, else read from
    /// Proxmox `concurrency` at a time and cached. `None` for a VM deleted since the listing.
    pub async fn read_all(
        &mut self,
        client: &Client,
        vms: &[&ClusterVm],
        concurrency: usize,
    ) -> Result<Vec<Option<ConfigRead>>> {
        let mut out: Vec<Option<ConfigRead>> = vms.iter().map(|vm| self.get(vm).cloned()).collect();
        // Owned inputs: the futures must not borrow the listing (a caller may be spawned).
        let wanted: Vec<(usize, ClusterVm)> = out
            .iter()
            .enumerate()
            .filter(|(_, read)| read.is_none())
            .map(|(i, _)| (i, vms[i].clone()))
            .collect();
        let fresh: Vec<(usize, Result<Option<ConfigRead>>)> = futures::stream::iter(wanted)
            .map(|(i, vm)| {
                let client = client.clone();
                async move { (i, read_config(&client, &vm).await) }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        for (i, read) in fresh {
            if let Some(read) = read? {
                self.insert(vms[i], read.clone());
                out[i] = Some(read);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::marker::render_description;
    use crate::image::marker::tests::sample_marker;

    fn listed(vmid: u32, tags: &str, lock: Option<&str>) -> ClusterVm {
        ClusterVm {
            kind: "qemu".into(),
            vmid,
            node: "pve1".into(),
            name: Some(format!("vm{vmid}")),
            tags: Some(tags.into()),
            lock: lock.map(str::to_string),
            ..ClusterVm::default()
        }
    }

    #[test]
    fn a_read_holds_while_the_listing_shows_the_vm_unchanged() {
        let mut cache = ConfigCache::default();
        let vm = listed(100, "sombrero", None);
        cache.insert(&vm, ConfigRead::of(VmConfig::default()));
        assert!(cache.get(&vm).is_some());
        // Each listed field that Proxmox changes only with the config invalidates the read.
        let changed = [
            ClusterVm {
                node: "pve2".into(),
                ..vm.clone()
            },
            ClusterVm {
                name: Some("renamed".into()),
                ..vm.clone()
            },
            listed(100, "sombrero;sombrero-latest", None),
            ClusterVm {
                template: true,
                ..vm.clone()
            },
            listed(100, "sombrero", Some("backup")),
        ];
        for (i, other) in changed.iter().enumerate() {
            assert!(cache.get(other).is_none(), "case {i}");
        }
        // Fields of the listing that are not in the key (status, uptime) keep it.
        let running = ClusterVm {
            status: Some("running".into()),
            ..vm.clone()
        };
        assert!(cache.get(&running).is_some());
        cache.forget(100);
        assert!(cache.get(&vm).is_none());
    }

    #[test]
    fn the_marker_is_parsed_once_with_the_read() {
        let mut m = sample_marker();
        m.vmid = 100;
        let description = render_description("notes", &m).unwrap();
        let read = ConfigRead::of(VmConfig {
            description: Some(description),
            ..VmConfig::default()
        });
        assert_eq!(read.marker.as_deref(), Some(&m));
        let unmarked = ConfigRead::of(VmConfig {
            description: Some("just notes".into()),
            ..VmConfig::default()
        });
        assert!(unmarked.marker.is_none());
    }
}
