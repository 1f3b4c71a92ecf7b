//! Gathering a target's templates from Proxmox, with what protects them (in use, protected,
//! latest), as [`TemplateVersion`]s for the plan.
//!
//! # Requests (measured in `tests/integration/retention.rs`, `gather_request_count`)
//! - 1 `GET /cluster/resources?type=vm` (every guest of the cluster, with tags);
//! - 1 `GET .../qemu/{vmid}/config` per template carrying the target's tags (the marker, the
//!   `protection` flag and the disks are only in the config);
//! - only when some template in the policy's scope could be removed (not protected; not the
//!   latest either, unless its image is being deleted), the in-use check ([`find_users`]):
//!   - 1 `GET /nodes/{node}/storage` per node holding such a template (storage types);
//!   - 1 `GET .../storage/{storage}/content?content=images` per storage holding their disks
//!     (once for a shared storage): volume ids and `parent` fields show linked clones on every
//!     storage but LVM-thin;
//!   - 1 config per VM that may be a clone PVE does not record: non-template VMs carrying our
//!     owner tag (validation clones, consumer clones keeping the copied tags), and VMs owning a
//!     volume on the template's LVM-thin storage created after the template's base volume.
//!
//! Steady state (nothing old enough to remove, or everything latest/protected) costs
//! 1 + templates requests; no per-VM polling of the rest of the cluster. The controller uses
//! [`gather_from`] on its shared per-cluster inventory (the list and the configs of every VM with
//! our owner tag, cached), so there a steady-state evaluation costs no request of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::Arc;

use crate::config_reads::{ConfigRead, read_config};
use crate::image::marker::{Ownership, Role, ownership};
use crate::image::tags::{OWNER_TAG, TagSet};
use crate::image::version::{TemplateVersion, VmFacts};
use crate::proxmox::{ClusterVm, Result, StorageInfo, StorageVolume, VmConfig, client::Client};

use super::plan::{Purpose, not_ours};
use super::target::{NotOurs, Scope, Target};
use super::usage::{Usage, bases_in_config, clones_in_content, disk_volumes, storage_of};

/// A client that counts its requests, so the cost of a gathering can be reported and tested.
pub struct Counted<'a> {
    pub client: &'a Client,
    count: AtomicU32,
}

impl<'a> Counted<'a> {
    pub fn new(client: &'a Client) -> Self {
        Self {
            client,
            count: AtomicU32::new(0),
        }
    }

    pub fn requests(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    fn tick(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub async fn cluster_vms(&self) -> Result<Vec<ClusterVm>> {
        self.tick();
        self.client.cluster_vms().await
    }

    /// A listed VM's config and marker; `None` when it was deleted since the listing.
    pub async fn read_config(&self, vm: &ClusterVm) -> Result<Option<ConfigRead>> {
        self.tick();
        read_config(self.client, vm).await
    }

    async fn storages(&self, node: &str) -> Result<Vec<StorageInfo>> {
        self.tick();
        self.client.storages(node, None).await
    }

    async fn images(&self, node: &str, storage: &str) -> Result<Vec<StorageVolume>> {
        self.tick();
        self.client
            .storage_content(node, storage, Some("images"), None)
            .await
    }
}

/// One template of the target as read from Proxmox.
struct TemplateInfo {
    vmid: u32,
    node: String,
    read: ConfigRead,
}

/// What a gathering found.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Every template carrying the target's tags, ours or not (the plan lists the others as
    /// "not ours"; one without a readable marker is a [`TemplateVersion::unmarked`]).
    pub versions: Vec<TemplateVersion>,
    /// Requests made.
    pub requests: u32,
}

/// A template whose users are looked for: where it lives and which build it is.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub vmid: u32,
    pub node: String,
    /// Volume ids of its disks (`local-lvm:base-100-disk-0`).
    pub disks: Vec<String>,
    /// Its marker's build id: validation clones of the same build use it.
    pub build_id: Option<String>,
}

impl Candidate {
    pub fn of(vmid: u32, node: &str, read: &ConfigRead) -> Self {
        Self {
            vmid,
            node: node.to_string(),
            disks: disk_volumes(&read.config),
            build_id: read.marker.as_ref().map(|m| m.build_id.clone()),
        }
    }
}

/// Reads the target's templates and what protects them. A VM that disappears between the list
/// and its config read is skipped (it is gone; nothing to plan). Users (linked clones) are
/// looked for only for the templates in `scope` that `purpose` may remove.
pub async fn gather(
    client: &Client,
    target: &Target,
    scope: &Scope,
    purpose: Purpose,
) -> Result<Inventory> {
    let api = Counted::new(client);
    let vms = api.cluster_vms().await?;
    gather_counted(&api, target, scope, purpose, &vms, &BTreeMap::new()).await
}

/// [`gather`] on a cluster list and configs already at hand (the controller's shared inventory:
/// its list and the configs of every VM with our owner tag), reading only what they lack.
/// `Inventory::requests` counts the extra requests.
pub async fn gather_from(
    client: &Client,
    target: &Target,
    scope: &Scope,
    purpose: Purpose,
    vms: &[ClusterVm],
    configs: &BTreeMap<u32, ConfigRead>,
) -> Result<Inventory> {
    gather_counted(&Counted::new(client), target, scope, purpose, vms, configs).await
}

async fn gather_counted(
    api: &Counted<'_>,
    target: &Target,
    scope: &Scope,
    purpose: Purpose,
    vms: &[ClusterVm],
    configs: &BTreeMap<u32, ConfigRead>,
) -> Result<Inventory> {
    let mut templates = BTreeMap::new();
    for vm in vms.iter().filter(|v| v.is_qemu() && v.template) {
        if !target.matches_tags(&TagSet::parse(vm.tags.as_deref().unwrap_or(""))) {
            continue;
        }
        let read = match configs.get(&vm.vmid) {
            Some(read) => read.clone(),
            None => match api.read_config(vm).await? {
                Some(read) => read,
                None => continue,
            },
        };
        // /cluster/resources lags behind; the config is the truth.
        if !read.config.template {
            continue;
        }
        templates.insert(
            vm.vmid,
            TemplateInfo {
                vmid: vm.vmid,
                node: vm.node.clone(),
                read,
            },
        );
    }

    let mut versions: Vec<TemplateVersion> = templates.values().map(version_of).collect();
    let removable = |v: &TemplateVersion| match purpose {
        Purpose::Rotation => !v.latest && !v.protected,
        Purpose::ImageDeleted => !v.protected,
    };
    let candidates: Vec<Candidate> = versions
        .iter()
        .filter(|v| not_ours(v, scope).is_none() && removable(v))
        .filter_map(|v| templates.get(&v.vmid))
        .map(|t| Candidate::of(t.vmid, &t.node, &t.read))
        .collect();
    if !candidates.is_empty() {
        let mut known = configs.clone();
        known.extend(templates.values().map(|t| (t.vmid, t.read.clone())));
        let usage = find_users(api, vms, &candidates, &known).await?;
        for v in &mut versions {
            v.in_use_by = usage.users(v.vmid);
        }
    }
    Ok(Inventory {
        versions,
        requests: api.requests(),
    })
}

fn version_of(t: &TemplateInfo) -> TemplateVersion {
    let config = &t.read.config;
    let tags = TagSet::parse(config.tags.as_deref().unwrap_or(""));
    let name = config.name.clone().unwrap_or_default();
    TemplateVersion::from_vm(VmFacts {
        vmid: t.vmid,
        node: &t.node,
        name: &name,
        tags: &tags,
        marker: t.read.marker.as_deref(),
        protected: config.protection,
        in_use_by: &[],
    })
    .unwrap_or_else(|| TemplateVersion::unmarked(t.vmid, &t.node, &name, &tags, config.protection))
}

/// The VMs using each candidate: linked clones (from volume ids and `parent` in the content of
/// the candidates' storages, from clone configs, and on LVM-thin from a copied marker) and our
/// validation clones of the same build, whatever their state. `known` configs are not re-read.
pub async fn find_users(
    api: &Counted<'_>,
    vms: &[ClusterVm],
    candidates: &[Candidate],
    known: &BTreeMap<u32, ConfigRead>,
) -> Result<Usage> {
    let mut usage = Usage::default();
    let candidate_ids: BTreeSet<u32> = candidates.iter().map(|c| c.vmid).collect();

    // Storage types of the candidates' nodes.
    let mut kinds: BTreeMap<(String, String), StorageInfo> = BTreeMap::new();
    let nodes: BTreeSet<&str> = candidates.iter().map(|c| c.node.as_str()).collect();
    for node in nodes {
        for s in api.storages(node).await? {
            kinds.insert((node.to_string(), s.storage.clone()), s);
        }
    }

    // One content listing per storage (per node for local storages).
    let mut listings: BTreeMap<(String, String), Vec<StorageVolume>> = BTreeMap::new();
    // Candidate -> VMs owning a volume on its LVM-thin storage, created after its base volume.
    let mut maybe_clones: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for c in candidates {
        for disk in &c.disks {
            let Some(storage) = storage_of(disk) else {
                continue;
            };
            let Some(info) = kinds.get(&(c.node.clone(), storage.to_string())) else {
                continue;
            };
            let key = if info.shared {
                (String::new(), storage.to_string())
            } else {
                (c.node.clone(), storage.to_string())
            };
            if !listings.contains_key(&key) {
                let volumes = match api.images(&c.node, storage).await {
                    Ok(v) => v,
                    // An inactive or vanished storage has no clones to show; the config reads
                    // below still see references.
                    Err(e) if e.is_not_found() => Vec::new(),
                    Err(e) => return Err(e),
                };
                for (template, clone) in clones_in_content(&volumes) {
                    usage.add(template, clone);
                }
                listings.insert(key.clone(), volumes);
            }
            if info.kind == "lvmthin" {
                let volumes = &listings[&key];
                let base_ctime = volumes
                    .iter()
                    .find(|v| v.volid == *disk)
                    .and_then(|v| v.ctime);
                let set = maybe_clones.entry(c.vmid).or_default();
                for v in volumes {
                    let Some(owner) = v.vmid else { continue };
                    let newer = match (base_ctime, v.ctime) {
                        (Some(base), Some(t)) => t >= base,
                        _ => true,
                    };
                    if owner != c.vmid && newer {
                        set.insert(owner);
                    }
                }
            }
        }
    }

    // Configs of VMs that may be clones PVE does not record.
    let by_id: BTreeMap<u32, &ClusterVm> = vms
        .iter()
        .filter(|v| v.is_qemu())
        .map(|v| (v.vmid, v))
        .collect();
    let mut to_read: BTreeSet<u32> = maybe_clones.values().flatten().copied().collect();
    for vm in by_id.values() {
        if !vm.template && TagSet::parse(vm.tags.as_deref().unwrap_or("")).contains(OWNER_TAG) {
            to_read.insert(vm.vmid);
        }
    }
    for vmid in to_read {
        if candidate_ids.contains(&vmid) {
            continue;
        }
        let read = match known.get(&vmid) {
            Some(read) => read.clone(),
            None => {
                let Some(vm) = by_id.get(&vmid) else { continue };
                match api.read_config(vm).await? {
                    Some(read) => read,
                    None => continue,
                }
            }
        };
        for base in bases_in_config(vmid, &read.config) {
            usage.add(base, vmid);
        }
        let Some(marker) = read.marker.as_deref() else {
            continue;
        };
        match ownership(Some(marker), vmid) {
            Ownership::Ours(Role::Validation) => {
                for c in candidates {
                    if c.build_id.as_deref() == Some(marker.build_id.as_str()) {
                        usage.add(c.vmid, vmid);
                    }
                }
            }
            // A copy of a candidate's marker: a clone of it. Where PVE records linked clones
            // the listing above already told; on LVM-thin this is all there is.
            Ownership::Foreign
                if maybe_clones
                    .get(&marker.vmid)
                    .is_some_and(|s| s.contains(&vmid)) =>
            {
                usage.add(marker.vmid, vmid);
            }
            _ => {}
        }
    }
    Ok(usage)
}

/// Why a template may not be changed right now (the re-check before a destructive call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No longer in the cluster.
    Gone,
    NotOwned,
    /// Our marker, but not the plan's owner (the marker changed since the plan).
    NotInScope(NotOurs),
    NotATemplate,
    Protected,
    Locked(String),
    Latest,
    InUse(Vec<u32>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone => f.write_str("it no longer exists"),
            Self::NotOwned => f.write_str("it no longer carries our marker for its VMID"),
            Self::NotInScope(why) => write!(f, "it is not ours: {why}"),
            Self::NotATemplate => f.write_str("it is no longer a template"),
            Self::Protected => f.write_str("it is protected (protection=1)"),
            Self::Locked(l) => write!(f, "it is locked ({l})"),
            Self::Latest => f.write_str("it became the current latest"),
            Self::InUse(by) => {
                let ids: Vec<String> = by.iter().map(u32::to_string).collect();
                write!(f, "it is in use by {}", ids.join(", "))
            }
        }
    }
}

/// A template that passed the re-check: where it is now and its config.
#[derive(Debug, Clone)]
pub struct Checked {
    pub node: String,
    pub config: Arc<VmConfig>,
}

/// Re-reads one template and its users just before a destructive call: still ours (a template
/// marker for its VMID, naming an owner in `scope`), still a template, not protected, not
/// locked, not the latest (unless the image itself is being deleted), not in use.
pub async fn recheck(
    client: &Client,
    vmid: u32,
    scope: &Scope,
    purpose: Purpose,
) -> Result<std::result::Result<Checked, Refusal>> {
    let api = Counted::new(client);
    let vms = api.cluster_vms().await?;
    let Some(vm) = vms.iter().find(|v| v.vmid == vmid && v.is_qemu()) else {
        return Ok(Err(Refusal::Gone));
    };
    let node = vm.node.clone();
    let Some(read) = api.read_config(vm).await? else {
        return Ok(Err(Refusal::Gone));
    };
    let (config, marker) = (&read.config, read.marker.as_deref());
    let refusal = if ownership(marker, vmid) != Ownership::Ours(Role::Template) {
        Some(Refusal::NotOwned)
    } else if let Some(Err(why)) = marker.map(|m| scope.check(&m.owner)) {
        Some(Refusal::NotInScope(why))
    } else if !config.template {
        Some(Refusal::NotATemplate)
    } else if config.protection {
        Some(Refusal::Protected)
    } else if let Some(lock) = config.lock.clone().filter(|l| !l.is_empty()) {
        Some(Refusal::Locked(lock))
    } else if purpose == Purpose::Rotation
        && TagSet::parse(config.tags.as_deref().unwrap_or("")).is_latest()
    {
        Some(Refusal::Latest)
    } else {
        None
    };
    if let Some(r) = refusal {
        return Ok(Err(r));
    }
    let candidate = Candidate::of(vmid, &node, &read);
    let config = read.config.clone();
    let known = BTreeMap::from([(vmid, read)]);
    let users = find_users(&api, &vms, &[candidate], &known)
        .await?
        .users(vmid);
    if !users.is_empty() {
        return Ok(Err(Refusal::InUse(users)));
    }
    Ok(Ok(Checked { node, config }))
}
