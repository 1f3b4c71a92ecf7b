//! One shared Proxmox inventory per cluster (key: URL + token id). Every GoldenImage of that
//! cluster reads the same snapshot: one `GET /cluster/resources?type=vm` per resync interval,
//! plus the config (for the description marker) of each VM carrying our owner tag, cached
//! while its name, tags, template flag and lock stay the same. Steady state therefore costs one
//! request per cluster per interval, however many objects there are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::connection::Connection;
use crate::image::marker::{Marker, parse_description};
use crate::image::tags::{OWNER_TAG, TagSet};
use crate::proxmox::{self, ClusterVm, VmConfig};

/// A VM with our owner tag, with its config and the marker parsed from it.
#[derive(Debug, Clone)]
pub struct OurVm {
    pub vm: ClusterVm,
    pub config: Arc<VmConfig>,
    pub marker: Option<Marker>,
    pub tags: TagSet,
}

/// What the cluster looked like at `taken`.
#[derive(Debug)]
pub struct Snapshot {
    pub taken: Instant,
    pub vms: Vec<ClusterVm>,
    pub ours: Vec<OurVm>,
}

impl Snapshot {
    /// Our VMs whose marker names this owner uid.
    pub fn of_owner<'a>(&'a self, uid: &'a str) -> impl Iterator<Item = &'a OurVm> + 'a {
        self.ours
            .iter()
            .filter(move |v| v.marker.as_ref().is_some_and(|m| m.owner.uid == uid))
    }
}

type ConfigKey = (String, String, String, bool, String);

fn config_key(vm: &ClusterVm) -> ConfigKey {
    (
        vm.node.clone(),
        vm.name.clone().unwrap_or_default(),
        vm.tags.clone().unwrap_or_default(),
        vm.template,
        vm.lock.clone().unwrap_or_default(),
    )
}

struct State {
    digest: String,
    client: proxmox::Client,
    snapshot: Option<Arc<Snapshot>>,
    configs: HashMap<u32, (ConfigKey, Arc<VmConfig>)>,
}

/// The inventory of one cluster.
pub struct ClusterInventory {
    state: tokio::sync::Mutex<State>,
}

impl ClusterInventory {
    /// The client to use for this cluster (replaced when the credential changes).
    pub async fn client(&self) -> proxmox::Client {
        self.state.lock().await.client.clone()
    }

    /// A snapshot no older than `max_age`. Concurrent callers wait for the one refresh in flight
    /// (the lock is held while fetching), so a burst of reconciles costs one list.
    pub async fn snapshot(&self, max_age: Duration) -> proxmox::Result<Arc<Snapshot>> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.snapshot
            && s.taken.elapsed() < max_age
        {
            return Ok(s.clone());
        }
        let vms = st.client.cluster_vms().await?;
        let mut ours = Vec::new();
        let mut configs = HashMap::new();
        for vm in vms.iter().filter(|v| v.is_qemu()) {
            let tags = TagSet::parse(vm.tags.as_deref().unwrap_or(""));
            if !tags.contains(OWNER_TAG) {
                continue;
            }
            let key = config_key(vm);
            let config = match st.configs.get(&vm.vmid) {
                Some((k, c)) if *k == key => c.clone(),
                _ => match st.client.vm_config(&vm.node, vm.vmid).await {
                    Ok(c) => Arc::new(c),
                    // Deleted between the list and now: it is gone, skip it.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e),
                },
            };
            let marker = config
                .description
                .as_deref()
                .and_then(|d| parse_description(d).ok().flatten());
            configs.insert(vm.vmid, (key, config.clone()));
            ours.push(OurVm {
                vm: vm.clone(),
                config,
                marker,
                tags,
            });
        }
        st.configs = configs;
        let snap = Arc::new(Snapshot {
            taken: Instant::now(),
            vms,
            ours,
        });
        st.snapshot = Some(snap.clone());
        Ok(snap)
    }

    /// Forget the snapshot (after we changed something) and the cached configs of `vmids`
    /// (their description may have changed without a tag change).
    pub async fn invalidate(&self, vmids: &[u32]) {
        let mut st = self.state.lock().await;
        st.snapshot = None;
        for id in vmids {
            st.configs.remove(id);
        }
    }
}

/// All clusters' inventories.
#[derive(Default)]
pub struct Inventories {
    map: Mutex<HashMap<String, Arc<ClusterInventory>>>,
}

impl Inventories {
    /// The inventory of `conn`'s cluster; a changed credential gets a fresh client and drops the
    /// snapshot (it may have been taken with a token that lacked privileges).
    pub async fn get(&self, conn: &Connection) -> proxmox::Result<Arc<ClusterInventory>> {
        let inv = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(inv) = map.get(&conn.cluster_key) {
                inv.clone()
            } else {
                let inv = Arc::new(ClusterInventory {
                    state: tokio::sync::Mutex::new(State {
                        digest: conn.digest.clone(),
                        client: proxmox::Client::new(conn.config.clone())?,
                        snapshot: None,
                        configs: HashMap::new(),
                    }),
                });
                map.insert(conn.cluster_key.clone(), inv.clone());
                return Ok(inv);
            }
        };
        let mut st = inv.state.lock().await;
        if st.digest != conn.digest {
            st.client = proxmox::Client::new(conn.config.clone())?;
            st.digest = conn.digest.clone();
            st.snapshot = None;
        }
        drop(st);
        Ok(inv)
    }
}
