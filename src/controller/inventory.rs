//! One shared Proxmox inventory per cluster (key: URL + token id). Every GoldenImage of that
//! cluster reads the same snapshot: one `GET /cluster/resources?type=vm` per resync interval,
//! plus the config (for the description marker) of each VM carrying our owner tag, cached
//! while its name, tags, template flag and lock stay the same ([`crate::config_reads`]).
//! Steady state therefore costs one request per cluster per interval, however many objects
//! there are.
//!
//! The snapshot is refreshed by a background task and published through a
//! [`tokio::sync::watch`] channel: a reader takes the latest one without waiting for a refresh
//! and no lock is held across a network call. Only a reader that changed something (a finished
//! job, a destroyed clone) or whose credential changed waits, for a snapshot taken after that
//! ([`ClusterInventory::refresh`]). Configs are read with bounded concurrency. When a refresh
//! shows a change to an image's VMs (a template deleted in the PVE UI, a tag edited), the
//! image is woken ([`Inventories::subscribe`]): it shows in its status at the next resync, not
//! at its next requeue.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast, watch};

use super::connection::Connection;
use crate::config_reads::{ConfigCache, ConfigRead, ListingKey};
use crate::image::tags::{OWNER_TAG, TagSet};
use crate::proxmox::{self, ClusterVm};

/// Config reads in flight at once during a refresh (the cold start reads one per template).
pub const CONFIG_READS: usize = 8;

/// A VM with our owner tag, with its config and the marker parsed from it.
#[derive(Debug, Clone)]
pub struct OurVm {
    pub vm: ClusterVm,
    /// Its config and marker, shared by the snapshots that show the same config.
    pub read: ConfigRead,
    pub tags: TagSet,
}

/// A QEMU VM without our owner tag, as much of it as readers use: retention's in-use check
/// looks up a clone's node by VMID, and its tag selector matches templates (so a template's
/// tags are kept, a VM's are not). A cluster's 10,000 VMs cost a few hundred KiB.
#[derive(Debug, Clone)]
pub struct OtherVm {
    pub vmid: u32,
    /// Shared by the VMs of a node.
    pub node: Arc<str>,
    pub template: bool,
    pub tags: Option<Box<str>>,
}

impl OtherVm {
    /// Of a listed QEMU VM (pure); `nodes` interns the node names.
    pub fn of(vm: &ClusterVm, nodes: &mut BTreeSet<Arc<str>>) -> OtherVm {
        let node = match nodes.get(vm.node.as_str()) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(vm.node.as_str());
                nodes.insert(n.clone());
                n
            }
        };
        OtherVm {
            vmid: vm.vmid,
            node,
            template: vm.template,
            tags: vm
                .template
                .then(|| vm.tags.as_deref().map(Box::from))
                .flatten(),
        }
    }

    /// As the listing's entry, with the fields readers use.
    fn listed(&self) -> ClusterVm {
        ClusterVm {
            id: format!("qemu/{}", self.vmid),
            kind: "qemu".into(),
            vmid: self.vmid,
            node: self.node.to_string(),
            template: self.template,
            tags: self.tags.as_deref().map(str::to_owned),
            ..Default::default()
        }
    }
}

/// What the cluster looked like at `taken`: our VMs in full (listing entry, config, marker) and
/// the other QEMU VMs in brief ([`OtherVm`]); containers are left out (no reader looks at
/// them).
#[derive(Debug)]
pub struct Snapshot {
    pub taken: Instant,
    pub ours: Vec<OurVm>,
    pub others: Vec<OtherVm>,
}

impl Snapshot {
    /// The QEMU VMs of the listing with what readers use of them (retention's
    /// `gather_from`): ours as listed, the others from [`OtherVm`]. Built on demand, for the
    /// rare reader (a retention run, a deletion).
    pub fn vms(&self) -> Vec<ClusterVm> {
        self.ours
            .iter()
            .map(|o| o.vm.clone())
            .chain(self.others.iter().map(OtherVm::listed))
            .collect()
    }

    /// The config reads of our VMs by VMID, for a reader that reads only what they lack
    /// (retention's `gather_from`).
    pub fn config_reads(&self) -> BTreeMap<u32, ConfigRead> {
        self.ours
            .iter()
            .map(|o| (o.vm.vmid, o.read.clone()))
            .collect()
    }

    /// Our VMs whose marker names this owner uid.
    pub fn of_owner<'a>(&'a self, uid: &'a str) -> impl Iterator<Item = &'a OurVm> + 'a {
        self.ours
            .iter()
            .filter(move |v| v.read.marker.as_ref().is_some_and(|m| m.owner.uid == uid))
    }
}

/// An image, as its VMs' markers name it: namespace and name.
pub type ImageRef = (String, String);

/// Per image, what of its VMs a snapshot shows (VMID and the listing's key): two snapshots
/// differing here differ for that image.
fn by_image(snap: &Snapshot) -> BTreeMap<ImageRef, BTreeSet<(u32, ListingKey)>> {
    let mut out: BTreeMap<ImageRef, BTreeSet<(u32, ListingKey)>> = BTreeMap::new();
    for v in &snap.ours {
        if let Some(m) = &v.read.marker {
            out.entry((m.owner.namespace.clone(), m.owner.name.clone()))
                .or_default()
                .insert((v.vm.vmid, ListingKey::of(&v.vm)));
        }
    }
    out
}

/// The images whose VMs differ between two snapshots (pure).
pub fn changed_images(before: &Snapshot, after: &Snapshot) -> Vec<ImageRef> {
    let (a, b) = (by_image(before), by_image(after));
    let keys: BTreeSet<&ImageRef> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// A refresh's outcome, numbered: `generation` is the number of refresh requests made before
/// the refresh began, so it shows everything changed before any of them.
#[derive(Clone)]
struct Published {
    generation: u64,
    result: Result<Arc<Snapshot>, proxmox::Error>,
}

struct Shared {
    client: proxmox::Client,
    /// Refresh requests so far.
    requested: u64,
    /// Cached configs to drop before the next refresh (we changed those VMs).
    forget: Vec<u32>,
}

/// The inventory of one cluster.
pub struct ClusterInventory {
    shared: Mutex<Shared>,
    refresh_now: Arc<Notify>,
    published: watch::Sender<Option<Published>>,
}

impl ClusterInventory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client to use for this cluster (replaced when the credential changes).
    pub async fn client(&self) -> proxmox::Client {
        self.lock().client.clone()
    }

    /// The latest snapshot (the background task keeps it within one resync interval). Waits
    /// only for the first one (a changed credential is a new inventory). `max_age` zero: a
    /// snapshot taken after this call ([`Self::refresh`]).
    pub async fn snapshot(&self, max_age: Duration) -> proxmox::Result<Arc<Snapshot>> {
        if max_age.is_zero() {
            return self.refresh(&[]).await;
        }
        self.wait_for(0).await
    }

    /// A snapshot taken after this call, with the cached configs of `vmids` read again (we
    /// changed them: their description may differ without a tag change).
    pub async fn refresh(&self, vmids: &[u32]) -> proxmox::Result<Arc<Snapshot>> {
        let want = self.request(vmids);
        self.wait_for(want).await
    }

    /// Asks for a refresh that reads the configs of `vmids` again, without waiting for it.
    pub async fn invalidate(&self, vmids: &[u32]) {
        self.request(vmids);
    }

    fn request(&self, vmids: &[u32]) -> u64 {
        let want = {
            let mut s = self.lock();
            s.requested += 1;
            s.forget.extend_from_slice(vmids);
            s.requested
        };
        self.refresh_now.notify_one();
        want
    }

    async fn wait_for(&self, generation: u64) -> proxmox::Result<Arc<Snapshot>> {
        let mut rx = self.published.subscribe();
        let published = rx
            .wait_for(|p| p.as_ref().is_some_and(|p| p.generation >= generation))
            .await
            .map_err(|_| proxmox::Error::Timeout {
                request: "inventory".into(),
                message: "the inventory's refresh task ended".into(),
            })?
            .clone()
            .expect("waited for Some");
        published.result
    }
}

/// The background refresh of one cluster's inventory; ends when the inventory is dropped.
async fn refresher(
    inv: Weak<ClusterInventory>,
    refresh_now: Arc<Notify>,
    resync: Duration,
    wake: broadcast::Sender<ImageRef>,
) {
    let mut configs = ConfigCache::default();
    let mut previous: Option<Arc<Snapshot>> = None;
    loop {
        let (client, generation) = {
            let Some(inv) = inv.upgrade() else { return };
            let mut s = inv.lock();
            for id in std::mem::take(&mut s.forget) {
                configs.forget(id);
            }
            (s.client.clone(), s.requested)
        };
        let result = fetch(&client, &mut configs).await;
        {
            let Some(inv) = inv.upgrade() else { return };
            let changed = match (&previous, &result) {
                (Some(before), Ok(snap)) => changed_images(before, snap),
                _ => Vec::new(),
            };
            if let Ok(snap) = &result {
                previous = Some(snap.clone());
            }
            publish_then_wake(&inv, Published { generation, result }, changed, |image| {
                // No receiver (no controller running): nothing to wake.
                let _ = wake.send(image);
            });
            if inv.lock().requested > generation {
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(resync) => {}
            _ = refresh_now.notified() => {}
        }
    }
}

/// Publishes a refresh, then wakes the images it changed: a woken reconcile reads the snapshot
/// that woke it (woken before the publish, it could read the previous one and see nothing
/// changed until its requeue).
fn publish_then_wake(
    inv: &ClusterInventory,
    published: Published,
    changed: Vec<ImageRef>,
    wake: impl Fn(ImageRef),
) {
    inv.published.send_replace(Some(published));
    for image in changed {
        wake(image);
    }
}

/// One list, and the configs of our VMs not cached under the same listing key, read
/// [`CONFIG_READS`] at a time.
async fn fetch(
    client: &proxmox::Client,
    configs: &mut ConfigCache,
) -> proxmox::Result<Arc<Snapshot>> {
    let vms = client.cluster_vms().await?;
    let mut nodes = BTreeSet::new();
    let mut others = Vec::new();
    let mut ours: Vec<(&ClusterVm, TagSet)> = Vec::new();
    for vm in vms.iter().filter(|v| v.is_qemu()) {
        let tags = TagSet::parse(vm.tags.as_deref().unwrap_or(""));
        if tags.contains(OWNER_TAG) {
            ours.push((vm, tags));
        } else {
            others.push(OtherVm::of(vm, &mut nodes));
        }
    }
    let listed: Vec<&ClusterVm> = ours.iter().map(|(vm, _)| *vm).collect();
    let reads = configs.read_all(client, &listed, CONFIG_READS).await?;
    let kept: HashSet<u32> = listed.iter().map(|vm| vm.vmid).collect();
    configs.retain(|vmid| kept.contains(&vmid));
    let mut out = Vec::new();
    for ((vm, tags), read) in ours.into_iter().zip(reads) {
        // Deleted between the list and now: it is gone, skip it.
        let Some(read) = read else {
            continue;
        };
        out.push(OurVm {
            vm: vm.clone(),
            read,
            tags,
        });
    }
    others.shrink_to_fit();
    Ok(Arc::new(Snapshot {
        taken: Instant::now(),
        ours: out,
        others,
    }))
}

/// All clusters' inventories, one per credential: two Secrets for one cluster (another token,
/// or the same token id with another secret) never share a snapshot, so an image never sees
/// what its own token could not list, nor fails on another's token.
pub struct Inventories {
    map: Mutex<HashMap<String, Entry>>,
    resync: Duration,
    wake: broadcast::Sender<ImageRef>,
}

struct Entry {
    inv: Arc<ClusterInventory>,
    used: Instant,
}

impl Default for Inventories {
    fn default() -> Self {
        Inventories::new(Duration::from_secs(60))
    }
}

impl Inventories {
    /// Inventories refreshed every `resync`.
    pub fn new(resync: Duration) -> Self {
        Inventories {
            map: Mutex::new(HashMap::new()),
            resync,
            wake: broadcast::channel(4096).0,
        }
    }

    /// The images whose VMs changed between two refreshes, as they happen (a receiver that
    /// falls behind misses some: their requeue still comes).
    pub fn subscribe(&self) -> broadcast::Receiver<ImageRef> {
        self.wake.subscribe()
    }

    /// The inventory of `conn`'s cluster and credential (its background refresh starts with
    /// it). A changed credential is a new inventory whose first readers wait for its first
    /// snapshot; one nobody asked for in three resyncs (a rotated secret, a deleted image) is
    /// dropped, which ends its refresh.
    pub async fn get(&self, conn: &Connection) -> proxmox::Result<Arc<ClusterInventory>> {
        let key = format!("{}|{}", conn.cluster_key, conn.digest);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.resync * 3;
        map.retain(|k, e| *k == key || now.duration_since(e.used) < idle);
        if let Some(e) = map.get_mut(&key) {
            e.used = now;
            return Ok(e.inv.clone());
        }
        let refresh_now = Arc::new(Notify::new());
        let inv = Arc::new(ClusterInventory {
            shared: Mutex::new(Shared {
                client: proxmox::Client::new(conn.config.clone())?,
                requested: 0,
                forget: Vec::new(),
            }),
            refresh_now: refresh_now.clone(),
            published: watch::channel(None).0,
        });
        map.insert(
            key,
            Entry {
                inv: inv.clone(),
                used: now,
            },
        );
        tokio::spawn(refresher(
            Arc::downgrade(&inv),
            refresh_now,
            self.resync,
            self.wake.clone(),
        ));
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::marker::tests::sample_marker;
    use crate::proxmox::VmConfig;

    fn ours(vmid: u32, ns: &str, name: &str, tags: &str) -> OurVm {
        let mut m = sample_marker();
        m.vmid = vmid;
        m.owner.namespace = ns.into();
        m.owner.name = name.into();
        let vm: ClusterVm = serde_json::from_value(serde_json::json!({
            "vmid": vmid, "node": "pve1", "type": "qemu", "name": format!("t{vmid}"),
            "tags": tags, "template": 1,
        }))
        .unwrap();
        OurVm {
            vm,
            read: ConfigRead {
                config: Arc::new(VmConfig::default()),
                marker: Some(Arc::new(m)),
            },
            tags: TagSet::parse(tags),
        }
    }

    fn snap(ours: Vec<OurVm>) -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            ours,
            others: Vec::new(),
        }
    }

    #[test]
    fn a_woken_image_reads_the_snapshot_that_woke_it() {
        let config = proxmox::Config::new("https://127.0.0.1:1", "a@pve!t", "s").unwrap();
        let inv = ClusterInventory {
            shared: Mutex::new(Shared {
                client: proxmox::Client::new(config).unwrap(),
                requested: 0,
                forget: Vec::new(),
            }),
            refresh_now: Arc::new(Notify::new()),
            published: watch::channel(None).0,
        };
        let before = snap(vec![ours(100, "ns", "a", "sombrero")]);
        let after = Arc::new(snap(Vec::new()));
        let changed = changed_images(&before, &after);
        assert_eq!(changed.len(), 1);
        let woken = std::cell::Cell::new(0);
        publish_then_wake(
            &inv,
            Published {
                generation: 3,
                result: Ok(after.clone()),
            },
            changed,
            |_| {
                let seen = inv.published.borrow();
                let p = seen.as_ref().expect("published before the wake");
                assert_eq!(p.generation, 3);
                assert!(Arc::ptr_eq(p.result.as_ref().unwrap(), &after));
                woken.set(woken.get() + 1);
            },
        );
        assert_eq!(woken.get(), 1);
    }

    #[test]
    fn other_vms_keep_what_readers_use() {
        let listed = |v: serde_json::Value| -> ClusterVm { serde_json::from_value(v).unwrap() };
        let mut nodes = BTreeSet::new();
        let vm = OtherVm::of(
            &listed(
                serde_json::json!({"vmid": 700, "node": "pve2", "type": "qemu",
                "name": "web", "status": "running", "tags": "team-a", "maxmem": 1}),
            ),
            &mut nodes,
        );
        let template = OtherVm::of(
            &listed(
                serde_json::json!({"vmid": 9000, "node": "pve2", "type": "qemu",
                "name": "base", "template": 1, "tags": "os.debian-12"}),
            ),
            &mut nodes,
        );
        assert!(Arc::ptr_eq(&vm.node, &template.node), "node names shared");
        let s = Snapshot {
            taken: Instant::now(),
            ours: vec![ours(100, "ns", "a", "sombrero")],
            others: vec![vm, template],
        };
        let vms = s.vms();
        assert_eq!(
            vms.iter().map(|v| v.vmid).collect::<Vec<_>>(),
            vec![100, 700, 9000]
        );
        // Retention's in-use check: a clone's node by VMID; its tag selector: a template's tags.
        assert_eq!((vms[1].node.as_str(), vms[1].is_qemu()), ("pve2", true));
        assert!(!vms[1].template && vms[1].tags.is_none());
        assert!(vms[2].template);
        assert_eq!(vms[2].tags.as_deref(), Some("os.debian-12"));
    }

    #[test]
    fn a_change_wakes_only_the_images_it_concerns() {
        let a1 = || ours(100, "ns", "a", "sombrero");
        let b1 = || ours(200, "ns", "b", "sombrero");
        let c1 = || ours(300, "other", "a", "sombrero");
        let before = snap(vec![a1(), b1(), c1()]);
        // Nothing changed.
        assert!(changed_images(&before, &snap(vec![a1(), b1(), c1()])).is_empty());
        // A template deleted in the PVE UI.
        assert_eq!(
            changed_images(&before, &snap(vec![a1(), c1()])),
            vec![("ns".to_string(), "b".to_string())]
        );
        // A tag edited (the channel moved), and a new VM of another image.
        let after = snap(vec![
            ours(100, "ns", "a", "sombrero;sombrero-latest"),
            b1(),
            c1(),
            ours(301, "other", "a", "sombrero"),
        ]);
        assert_eq!(
            changed_images(&before, &after),
            vec![
                ("ns".to_string(), "a".to_string()),
                ("other".to_string(), "a".to_string())
            ]
        );
    }
}
