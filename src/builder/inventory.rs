//! What Proxmox holds for one image: every VM carrying the image's tag, with its parsed marker.
//! Only VMs whose marker names their own VMID and our owner uid are ever changed.

use chrono::NaiveDate;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::error::{BuildError, ErrorCategory};
use crate::config_reads::{ConfigCache, read_config};
use crate::image::marker::{Marker, Owner, Role, ValidationRecord};
use crate::image::naming::NameTemplate;
use crate::image::tags::{BUILD_TAG, TagSet, image_tag};
use crate::poll::poll_until;
use crate::proxmox::readback::is_creation_lock;
use crate::proxmox::{Client, ClusterVm, PollSchedule, VmConfig};

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

    /// A finished template of this owner: role `template` for this VMID, converted.
    pub fn is_our_template(&self, owner: &Owner) -> bool {
        self.config.template
            && self.owned_by(owner)
            && self
                .marker
                .as_ref()
                .is_some_and(|m| m.role == Role::Template)
    }

    fn tags(&self) -> TagSet {
        TagSet::parse(self.config.tags.as_deref().unwrap_or(""))
    }
}

/// The template a previous run of this very build (same build id, same spec hash) already
/// finished: the process died after `Finalize`, before validation or promotion were recorded.
pub fn finished_build<'a>(
    vms: &'a [TaggedVm],
    owner: &Owner,
    build_id: &str,
    spec_hash: &str,
) -> Option<(&'a TaggedVm, &'a Marker)> {
    newest(vms.iter().filter(|v| {
        v.is_our_template(owner)
            && v.marker
                .as_ref()
                .is_some_and(|m| m.build_id == build_id && m.metadata.spec_hash == spec_hash)
    }))
}

/// An unvalidated template of the current spec: the image's newest template, validation
/// `pending`, not promoted (no channel tag: with validation disabled a promoted template stays
/// `pending`), not archived. It is the build in flight whose outcome was lost, not something
/// to build again. Older pending templates were superseded (with validation disabled every
/// template a newer one took the channel tag from looks like that) and do not count.
pub fn unvalidated_template<'a>(
    vms: &'a [TaggedVm],
    owner: &Owner,
    spec_hash: &str,
) -> Option<(&'a TaggedVm, &'a Marker)> {
    let (vm, marker) = newest(vms.iter().filter(|v| v.is_our_template(owner)))?;
    let tags = vm.tags();
    let in_flight = marker.metadata.spec_hash == spec_hash
        && marker.metadata.validation == ValidationRecord::Pending
        && !tags.is_latest()
        && !tags.is_archived();
    in_flight.then_some((vm, marker))
}

/// By build date, number, VMID; with the marker (VMs without one never qualify).
fn newest<'a>(vms: impl Iterator<Item = &'a TaggedVm>) -> Option<(&'a TaggedVm, &'a Marker)> {
    vms.filter_map(|v| Some((v, v.marker.as_ref()?)))
        .max_by_key(|(v, m)| (m.metadata.build_date, m.metadata.build_number, v.vmid))
}

/// A build VM holding the (date, number) of one of this owner's finished templates: a second
/// VM of that build, never to be resumed.
pub fn number_taken_by_template(vms: &[TaggedVm], owner: &Owner, build: &TaggedVm) -> bool {
    let Some(b) = &build.marker else { return false };
    let number = (b.metadata.build_date, b.metadata.build_number);
    vms.iter().any(|v| {
        v.vmid != build.vmid
            && v.is_our_template(owner)
            && v.marker.as_ref().is_some_and(|m| {
                (m.metadata.build_date, m.metadata.build_number) == number
                    && m.metadata.name == b.metadata.name
            })
    })
}

/// The names this image's VMs take: its name template, os and type.
#[derive(Debug, Clone)]
pub struct ImageNames {
    pub template: NameTemplate,
    pub os: String,
    pub image_type: String,
}

impl ImageNames {
    /// A name this image's build (or template) would carry.
    pub fn matches(&self, name: &str) -> bool {
        self.template
            .parse_name(name, &self.os, &self.image_type)
            .is_some()
    }
}

/// A VM that may be this image's build VM cloned from a base template and not configured yet:
/// a clone copies the base's tags (the clone call cannot set tags) until our first config
/// write, but carries our name and marker from the moment it exists (both go into the clone
/// call). The listing's names lag for a fresh VM, so a VM without a name counts too.
pub fn may_be_our_clone(vm: &ClusterVm, names: Option<&ImageNames>) -> bool {
    vm.is_qemu()
        && !vm.template
        && names.is_some_and(|n| vm.name.as_deref().is_none_or(|name| n.matches(name)))
}

/// A VM still being created that may be this image's build VM: Proxmox writes a created VM's
/// tags and description only when the create task ends, so until then it is anonymous. One
/// carrying another image's tags is not ours, unless it may be our clone (see
/// [`may_be_our_clone`]).
pub fn may_be_ours_being_created(vm: &ClusterVm, tag: &str, names: Option<&ImageNames>) -> bool {
    let tags = vm.tag_list();
    vm.is_qemu()
        && is_creation_lock(vm.lock.as_deref())
        && (tags.is_empty() || tags.iter().any(|t| t == tag) || may_be_our_clone(vm, names))
}

/// Whether the first look reads a tagged template's config: when it carries [`BUILD_TAG`] (a
/// build VM converted, its Finalize not written: to resume), or when its listed name does not
/// give its build number (renamed by hand, made under another name template: its marker's
/// number must count). The others are read when a decision needs them
/// ([`read_newest_template`], [`read_templates`]): a build reads no config per template
/// of the image. Without `image` (the clean-up of build VMs on deletion, rare) every template is
/// read: a build VM converted by a version that did not tag it yet must not be left behind.
pub fn read_template_at_once(vm: &ClusterVm, image: Option<&ImageNames>) -> bool {
    vm.tag_list().iter().any(|t| t == BUILD_TAG)
        || image.is_none_or(|n| vm.name.as_deref().is_none_or(|name| !n.matches(name)))
}

/// The tagged templates not read yet, newest by their listed name's (date, number) first, then
/// the higher VMID. A template of ours is named by its marker (Finalize writes both), so the
/// first of ours in this order is our newest.
pub fn newest_first<'a>(unread: &[&'a ClusterVm], image: &ImageNames) -> Vec<&'a ClusterVm> {
    let mut out = unread.to_vec();
    out.sort_by_key(|vm| {
        let number = vm
            .name
            .as_deref()
            .and_then(|n| image.template.parse_name(n, &image.os, &image.image_type));
        std::cmp::Reverse((number, vm.vmid))
    });
    out
}

/// What one `cluster/resources` list showed: the image's tagged VMs (and our unconfigured
/// clones) with their configs, and the whole listing (names for build numbers, the base
/// template of a template source), so one read answers all of them. Templates whose names
/// give their numbers are read only on demand ([`read_template_at_once`]).
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub vms: Vec<TaggedVm>,
    pub listing: Vec<ClusterVm>,
    /// The image's tag.
    pub tag: String,
    /// The configs read so far, for a [`rescan`] to keep.
    configs: ConfigCache,
}

impl std::ops::Deref for Scan {
    type Target = Vec<TaggedVm>;
    fn deref(&self) -> &Vec<TaggedVm> {
        &self.vms
    }
}

impl IntoIterator for Scan {
    type Item = TaggedVm;
    type IntoIter = std::vec::IntoIter<TaggedVm>;
    fn into_iter(self) -> Self::IntoIter {
        self.vms.into_iter()
    }
}

impl Scan {
    /// Tagged templates of the listing whose config is not read yet.
    fn unread_templates(&self) -> Vec<&ClusterVm> {
        self.listing
            .iter()
            .filter(|v| v.is_qemu() && v.template && v.tag_list().contains(&self.tag))
            .filter(|v| !self.vms.iter().any(|t| t.vmid == v.vmid))
            .collect()
    }

    /// Names of every VM and template in the cluster.
    pub fn cluster_names(&self) -> impl Iterator<Item = &str> {
        self.listing
            .iter()
            .filter(|v| v.is_qemu())
            .filter_map(|v| v.name.as_deref())
    }
}

/// Lists the VMs tagged for this owner's image and reads their configs (one list + one config
/// per tagged VM that is no template, and per template [`read_template_at_once`] picks by its
/// name under `image`). With `names` (a template source), also the VMs that may be our clone
/// not configured yet ([`may_be_our_clone`]: one config read each), kept only when their
/// marker names them and this owner.
///
/// First it waits (at most `wait`) until no VM that may be ours is being created: a run that
/// died during a create leaves a VM without marker until its task ends, and deciding before
/// then would take a second VMID and the same build number for the same build.
pub async fn scan(
    client: &Client,
    owner: &Owner,
    image: Option<&ImageNames>,
    names: Option<&ImageNames>,
    wait: Duration,
) -> Result<Scan, BuildError> {
    rescan(client, owner, image, names, wait, None).await
}

/// [`scan`] again, reading only the configs of VMs that are new or whose name, tags, template
/// flag or lock changed since `previous` (the others keep the config read then,
/// [`ConfigCache`]): numbers are read right before the VM that reserves one is created without
/// a second read per template.
pub async fn rescan(
    client: &Client,
    owner: &Owner,
    image: Option<&ImageNames>,
    names: Option<&ImageNames>,
    wait: Duration,
    previous: Option<&Scan>,
) -> Result<Scan, BuildError> {
    let tag = image_tag(&owner.namespace, &owner.name);
    let deadline = Instant::now() + wait;
    let settled = poll_until(deadline.into(), PollSchedule::default(), || async {
        let vms = match client.cluster_vms().await {
            Ok(vms) => vms,
            Err(e) => return ControlFlow::Break(Err(BuildError::proxmox("list VMs", &e))),
        };
        let pending: Vec<u32> = vms
            .iter()
            .filter(|v| may_be_ours_being_created(v, &tag, names))
            .map(|v| v.vmid)
            .collect();
        if pending.is_empty() {
            return ControlFlow::Break(Ok(vms));
        }
        tracing::info!(
            ?pending,
            "waiting for VMs being created before reading build numbers"
        );
        ControlFlow::Continue(pending)
    })
    .await;
    let listing = match settled {
        Ok(listed) => listed?,
        Err(pending) => {
            return Err(BuildError::new(
                ErrorCategory::ProxmoxTransient,
                format!(
                    "VM(s) {pending:?} are still being created after {}s; one may be a build VM of this image, so nothing is decided before its marker can be read",
                    wait.as_secs()
                ),
                "the next run looks again; a create task that never ends shows in the node's task list",
            ));
        }
    };
    let mut configs = previous.map(|p| p.configs.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for vm in listing.iter().filter(|v| v.is_qemu()) {
        let tagged = vm.tag_list().contains(&tag);
        if !tagged && !may_be_our_clone(vm, names) {
            continue;
        }
        if tagged && vm.template && !read_template_at_once(vm, image) {
            continue;
        }
        // Deleted since the listing: skipped.
        let Some(found) = read_one(client, &mut configs, vm).await? else {
            continue;
        };
        // Untagged, only our own clone is of interest: a look-alike is nobody's business here.
        if tagged || found.owned_by(owner) {
            out.push(found);
        }
    }
    configs.retain(|vmid| listing.iter().any(|v| v.vmid == vmid));
    Ok(Scan {
        vms: out,
        listing,
        tag,
        configs,
    })
}

/// One listed VM with its config and marker, from `configs` while the listing shows it
/// unchanged; `None` when it was deleted since the listing.
async fn read_one(
    client: &Client,
    configs: &mut ConfigCache,
    vm: &ClusterVm,
) -> Result<Option<TaggedVm>, BuildError> {
    let read = match configs.get(vm) {
        Some(read) => read.clone(),
        None => match read_config(client, vm).await {
            Ok(Some(read)) => {
                configs.insert(vm, read.clone());
                read
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(BuildError::proxmox("read VM config", &e)),
        },
    };
    Ok(Some(TaggedVm {
        vmid: vm.vmid,
        node: vm.node.clone(),
        name: read
            .config
            .name
            .clone()
            .or(vm.name.clone())
            .unwrap_or_default(),
        running: vm.status.as_deref() == Some("running"),
        config: (*read.config).clone(),
        marker: read.marker.as_deref().cloned(),
    }))
}

/// Reads the image's templates not read yet, newest first ([`newest_first`]), until one of this
/// owner's is found: our newest template, the only one [`unvalidated_template`] looks at.
/// Others' templates on the way (a consumer's, a CLI run's of the same image) cost one read
/// each.
pub async fn read_newest_template(
    client: &Client,
    scan: &mut Scan,
    owner: &Owner,
    image: &ImageNames,
) -> Result<(), BuildError> {
    let order: Vec<ClusterVm> = newest_first(&scan.unread_templates(), image)
        .into_iter()
        .cloned()
        .collect();
    for vm in order {
        if let Some(found) = read_one(client, &mut scan.configs, &vm).await? {
            let ours = found.is_our_template(owner);
            scan.vms.push(found);
            if ours {
                break;
            }
        }
    }
    Ok(())
}

/// Reads the image's templates not read yet that `pick` selects: all of them for a build id
/// asked again (its finished template may be any of them), or those of a build VM's name (the
/// finished template it may duplicate, [`number_taken_by_template`]).
pub async fn read_templates(
    client: &Client,
    scan: &mut Scan,
    pick: impl Fn(&ClusterVm) -> bool,
) -> Result<(), BuildError> {
    let picked: Vec<ClusterVm> = scan
        .unread_templates()
        .into_iter()
        .filter(|v| pick(v))
        .cloned()
        .collect();
    for vm in picked {
        if let Some(found) = read_one(client, &mut scan.configs, &vm).await? {
            scan.vms.push(found);
        }
    }
    Ok(())
}

/// Every (date, build number) a new build of this image must not take: the markers of the
/// image's own VMs (a build VM reserves its number, even renamed), and every name in the
/// cluster that parses with the image's name template, os and type, whoever owns it. Names
/// are unique per Proxmox cluster, not per image: five GoldenImages of one os/type in five
/// namespaces count one sequence.
pub fn used_numbers<'a>(
    vms: &[TaggedVm],
    cluster_names: impl IntoIterator<Item = &'a str>,
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
    used.extend(
        cluster_names
            .into_iter()
            .filter_map(|name| template.parse_name(name, os, image_type)),
    );
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::marker::tests::sample_marker;

    fn vm(vmid: u32, template: bool, tags: &str, edit: impl FnOnce(&mut Marker)) -> TaggedVm {
        let mut m = sample_marker();
        m.vmid = vmid;
        m.metadata.validation = ValidationRecord::Pending;
        edit(&mut m);
        TaggedVm {
            vmid,
            node: "pve1".into(),
            name: m.metadata.name.clone(),
            running: false,
            config: VmConfig {
                template,
                tags: Some(tags.into()),
                ..Default::default()
            },
            marker: Some(m),
        }
    }

    #[test]
    fn numbers_count_every_name_of_the_prefix_whoever_owns_it() {
        let t = NameTemplate::default();
        let d = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        // This image's own build VM, renamed by hand: its marker still reserves 4.
        let mut own = vm(120, false, "sombrero", |m| {
            m.role = Role::Build;
            m.metadata.build_date = d;
            m.metadata.build_number = 4;
        });
        own.name = "renamed".into();
        let cluster = [
            // Another namespace's template and in-flight build VM of the same os/type.
            "ubuntu-24.04-minimal-20261201-001",
            "ubuntu-24.04-minimal-20261201-002",
            // Other prefixes, other days, other shapes: not this sequence.
            "debian-12-minimal-20261201-009",
            "ubuntu-24.04-minimal-20261130-007",
            "ubuntu-24.04-minimal-20261201-01",
            "renamed",
        ];
        let used = used_numbers(&[own], cluster, &t, "ubuntu-24.04", "minimal");
        assert_eq!(crate::image::next_build_number(used.clone(), d).unwrap(), 5);
        let without_own = used_numbers(&[], cluster, &t, "ubuntu-24.04", "minimal");
        assert_eq!(crate::image::next_build_number(without_own, d).unwrap(), 3);
        // Nothing of the prefix anywhere: the sequence starts at 1.
        assert_eq!(
            crate::image::next_build_number(
                used_numbers(&[], [], &t, "ubuntu-24.04", "minimal"),
                d
            )
            .unwrap(),
            1
        );
    }

    #[test]
    fn finds_the_finished_template_of_a_build() {
        let owner = sample_marker().owner;
        let id = sample_marker().build_id;
        let hash = sample_marker().metadata.spec_hash;
        let vms = vec![
            // Another build of the same spec.
            vm(100, true, "sombrero", |m| m.build_id = "b-other".into()),
            // Still a build VM.
            vm(101, false, "sombrero", |m| m.role = Role::Build),
            // A consumer's clone carrying a copy of the marker.
            vm(102, true, "sombrero", |m| m.vmid = 999),
            // Another owner.
            vm(103, true, "sombrero", |m| {
                m.owner.uid = "someone-else".into()
            }),
            vm(104, true, "sombrero", |m| {
                m.metadata.validation = ValidationRecord::Failed {
                    at: chrono::Utc::now(),
                    reason: "x".into(),
                }
            }),
        ];
        assert_eq!(
            finished_build(&vms, &owner, &id, &hash).map(|(v, _)| v.vmid),
            Some(104)
        );
        assert!(finished_build(&vms, &owner, &id, "other-hash").is_none());
        assert!(finished_build(&vms[..4], &owner, &id, &hash).is_none());
        // Without the build id: the image's newest template, if pending and unpromoted.
        assert!(
            unvalidated_template(&vms, &owner, &hash).is_none(),
            "104 failed"
        );
        assert_eq!(
            unvalidated_template(&vms[..4], &owner, &hash).map(|(v, _)| v.vmid),
            Some(100)
        );
        let promoted = vec![vm(105, true, "sombrero;sombrero-latest", |_| {})];
        assert!(unvalidated_template(&promoted, &owner, &hash).is_none());
        let archived = vec![vm(106, true, "sombrero;archived", |_| {})];
        assert!(unvalidated_template(&archived, &owner, &hash).is_none());
        let two = vec![
            vm(107, true, "sombrero", |m| m.metadata.build_number = 2),
            vm(108, true, "sombrero", |_| {}),
        ];
        assert_eq!(
            unvalidated_template(&two, &owner, &hash).map(|(v, _)| v.vmid),
            Some(107)
        );
        assert!(unvalidated_template(&two, &owner, "other-hash").is_none());
        // Validation disabled: the older template lost the channel tag to a newer one; it
        // stays pending but was superseded.
        let superseded = vec![
            vm(109, true, "sombrero", |_| {}),
            vm(110, true, "sombrero;sombrero-latest", |m| {
                m.metadata.build_number = 2
            }),
        ];
        assert!(unvalidated_template(&superseded, &owner, &hash).is_none());
    }

    #[test]
    fn templates_are_read_when_their_names_do_not_say_their_number_and_newest_first() {
        let names = ImageNames {
            template: NameTemplate::default(),
            os: "ubuntu-24.04".into(),
            image_type: "minimal".into(),
        };
        let t = |vmid: u32, name: Option<&str>| ClusterVm {
            kind: "qemu".into(),
            vmid,
            name: name.map(str::to_string),
            template: true,
            ..ClusterVm::default()
        };
        // (template, read at the first look with the image's names, without: the clean-up)
        let cases = [
            (
                t(100, Some("ubuntu-24.04-minimal-20261201-001")),
                false,
                true,
            ),
            (t(101, Some("renamed-by-hand")), true, true),
            (t(102, Some("ubuntu-24.04-other-20261201-001")), true, true),
            (t(103, None), true, true),
            (
                ClusterVm {
                    tags: Some("sombrero;sombrero-build".into()),
                    ..t(104, Some("ubuntu-24.04-minimal-20261201-002"))
                },
                true,
                true,
            ),
        ];
        for (i, (vm, with, without)) in cases.iter().enumerate() {
            assert_eq!(read_template_at_once(vm, Some(&names)), *with, "case {i}");
            assert_eq!(read_template_at_once(vm, None), *without, "case {i}");
        }
        let listed = [
            t(200, Some("ubuntu-24.04-minimal-20261201-002")),
            t(201, Some("ubuntu-24.04-minimal-20261202-001")),
            t(150, Some("ubuntu-24.04-minimal-20261202-001")),
            t(300, Some("ubuntu-24.04-minimal-20261130-009")),
            t(400, Some("renamed")),
        ];
        let refs: Vec<&ClusterVm> = listed.iter().collect();
        let order: Vec<u32> = newest_first(&refs, &names).iter().map(|v| v.vmid).collect();
        // By (date, number), then the higher VMID; a name that says nothing last.
        assert_eq!(order, [201, 150, 200, 300, 400]);
    }

    #[test]
    fn which_vms_may_be_ours_being_created_or_cloned() {
        let names = ImageNames {
            template: NameTemplate::default(),
            os: "ubuntu-24.04".into(),
            image_type: "minimal".into(),
        };
        let ours = "ubuntu-24.04-minimal-20261202-001";
        let tag = "sombrero.ci.crash";
        let vm = |name: Option<&str>, tags: &str, lock: Option<&str>, template: bool| ClusterVm {
            kind: "qemu".into(),
            vmid: 200,
            name: name.map(str::to_string),
            tags: (!tags.is_empty()).then(|| tags.to_string()),
            lock: lock.map(str::to_string),
            template,
            ..ClusterVm::default()
        };
        // (vm, may be our clone, may be ours being created): with names / without.
        let cases = [
            (vm(Some(ours), "base", None, false), true, false),
            (vm(Some(ours), "base", Some("clone"), false), true, true),
            (vm(None, "base", Some("clone"), false), true, true),
            (vm(Some(ours), "base", None, true), false, false),
            (
                vm(Some("someone-elses-db"), "base", Some("clone"), false),
                false,
                false,
            ),
            (
                vm(Some("ubuntu-24.04-other-20261202-001"), "", None, false),
                false,
                false,
            ),
            (vm(Some("x"), "", Some("create"), false), false, true),
            (vm(Some("x"), tag, Some("create"), false), false, true),
            (
                vm(Some("x"), "sombrero.ci.other", Some("create"), false),
                false,
                false,
            ),
        ];
        for (i, (v, clone, creating)) in cases.iter().enumerate() {
            assert_eq!(may_be_our_clone(v, Some(&names)), *clone, "case {i}");
            assert!(!may_be_our_clone(v, None), "case {i}: no names, no clone");
            assert_eq!(
                may_be_ours_being_created(v, tag, Some(&names)),
                *creating,
                "case {i}"
            );
        }
    }
}
