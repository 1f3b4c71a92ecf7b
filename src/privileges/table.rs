//! What a run needs, pure: from the spec (or the retention policy) and the Proxmox VE version to
//! a list of [`Need`]s, each "these privileges on this path (or that alternative), for this".
//!
//! Derived from the 9.1.3 API schema's `permissions` of every call the run makes (see the table
//! in `crate::proxmox`), and for config keys from qemu-server's per-key check
//! ([`config_key_privilege`]). Where PVE accepts alternatives (`any`), the need lists them and
//! is met by any one; the first is the one the documented role ([`role_privileges`]) grants.

use crate::api::GoldenImageSpec;
use crate::api::golden_image::ProvisioningChannel;
use crate::builder::static_ip;
use crate::proxmox::PveVersion;
use crate::retention::ArchiveMode;
use crate::validate::{Check, plan_checks};

/// The role the README tells users to create, for this PVE version: every privilege in it is
/// needed by some run (a production build of a cloud image, a retention with backups), none
/// is spare. Alternatives PVE also accepts are not in it: `VM.GuestAgent.Audit` (agent reads;
/// `Unrestricted` covers them), `Datastore.Audit` (storage reads; `AllocateSpace` covers them),
/// `Sys.Audit` + `Sys.Modify` on `/` (downloads; `Sys.AccessNetwork` is the narrow one).
pub fn role_privileges(version: PveVersion) -> Vec<&'static str> {
    let mut privs = vec![
        "VM.Allocate",
        "VM.Clone",
        "VM.Audit",
        "VM.Config.Disk",
        "VM.Config.CDROM",
        "VM.Config.CPU",
        "VM.Config.Memory",
        "VM.Config.Network",
        "VM.Config.HWType",
        "VM.Config.Options",
        "VM.Config.Cloudinit",
        "VM.PowerMgmt",
    ];
    privs.push(agent_exec_privilege(version));
    privs.extend([
        "VM.Backup",
        "Datastore.AllocateSpace",
        "Datastore.AllocateTemplate",
        "Sys.AccessNetwork",
        "SDN.Use",
    ]);
    privs
}

/// The `pveum` command creating [`role_privileges`] as role `Sombrero`.
pub fn role_command(version: PveVersion) -> String {
    format!(
        "pveum role add Sombrero -privs \"{}\"",
        role_privileges(version).join(" ")
    )
}

/// One requirement: met when every privilege of one [`Grant`] in `options` is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub options: Vec<Grant>,
    /// What the run does with it (`create the build VM`), for the refusal.
    pub why: String,
}

/// Privileges on one ACL path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub path: String,
    pub privileges: Vec<&'static str>,
}

impl Need {
    fn on(path: impl Into<String>, privilege: &'static str, why: impl Into<String>) -> Need {
        Need {
            options: vec![Grant {
                path: path.into(),
                privileges: vec![privilege],
            }],
            why: why.into(),
        }
    }

    /// `privilege` on a VM that does not exist yet: `/vms` (a new VMID inherits from there),
    /// or the pool the VM is created in (pool members inherit the pool's ACLs).
    fn new_vm(pool: Option<&str>, privilege: &'static str, why: impl Into<String>) -> Need {
        let mut need = Need::on("/vms", privilege, why);
        if let Some(pool) = pool {
            need.options.push(Grant {
                path: format!("/pool/{pool}"),
                privileges: vec![privilege],
            });
        }
        need
    }

    /// Any one of `privileges` on `path`.
    fn any_on(path: &str, privileges: &[&'static str], why: impl Into<String>) -> Need {
        Need {
            options: privileges
                .iter()
                .map(|p| Grant {
                    path: path.to_string(),
                    privileges: vec![*p],
                })
                .collect(),
            why: why.into(),
        }
    }
}

/// The privilege qemu-server checks for setting config key `key` to `value`
/// (`check_vm_modify_config_perm` and the drive checks); `None` for keys it does not check.
/// A CD-ROM drive (the cloud-init drive is one: `media=cdrom`) needs `VM.Config.CDROM`, any
/// other drive `VM.Config.Disk`.
pub fn config_key_privilege(key: &str, value: &str) -> Option<&'static str> {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let numbered = base.len() < key.len();
    Some(match key {
        "cores" | "cpu" | "cpulimit" | "cpuunits" | "sockets" | "vcpus" | "affinity" | "numa" => {
            "VM.Config.CPU"
        }
        "memory" | "balloon" | "shares" => "VM.Config.Memory",
        "vga" | "hotplug" | "kvm" | "machine" | "scsihw" | "smbios1" | "tablet" | "vmgenid"
        | "acpi" | "watchdog" | "audio0" => "VM.Config.HWType",
        "agent" | "autostart" | "bios" | "description" | "keyboard" | "localtime" | "name"
        | "onboot" | "ostype" | "protection" | "reboot" | "startdate" | "tags" | "tdf" => {
            "VM.Config.Options"
        }
        "boot" | "bootdisk" => "VM.Config.Disk",
        "ciuser" | "cipassword" | "sshkeys" | "nameserver" | "searchdomain" | "cicustom"
        | "citype" | "ciupgrade" => "VM.Config.Cloudinit",
        "digest" | "delete" | "revert" | "pool" | "vmid" | "node" => return None,
        _ if numbered && base == "ipconfig" => "VM.Config.Cloudinit",
        _ if numbered && base == "net" => "VM.Config.Network",
        // A socket serial port (what the build adds) needs HWType; real devices need root.
        _ if numbered && base == "serial" => "VM.Config.HWType",
        _ if numbered && matches!(base, "scsi" | "ide" | "sata" | "virtio") => {
            if value.contains("media=cdrom") || value.contains("cloudinit") {
                "VM.Config.CDROM"
            } else {
                "VM.Config.Disk"
            }
        }
        "efidisk0" | "tpmstate0" => "VM.Config.Disk",
        _ => "VM.Config.Options",
    })
}

/// What a GoldenImage run does: always the build, then validation and promotion if asked.
#[derive(Debug, Clone, Copy)]
pub struct ImageRun<'a> {
    pub spec: &'a GoldenImageSpec,
    pub validate: bool,
    pub promote: bool,
    pub version: PveVersion,
}

fn agent_read_privileges(version: PveVersion) -> &'static [&'static str] {
    if version.has_guest_agent_privileges() {
        // `agent/ping`, `network-get-interfaces`: either; the role grants Unrestricted.
        &["VM.GuestAgent.Unrestricted", "VM.GuestAgent.Audit"]
    } else {
        &["VM.Monitor"]
    }
}

fn agent_exec_privilege(version: PveVersion) -> &'static str {
    if version.has_guest_agent_privileges() {
        "VM.GuestAgent.Unrestricted"
    } else {
        "VM.Monitor"
    }
}

/// Groups config keys by the privilege they need: one [`Need`] per privilege naming the keys.
fn config_needs<'k>(
    pool: Option<&str>,
    keys: impl IntoIterator<Item = (&'k str, &'k str)>,
    what: &str,
) -> Vec<Need> {
    let mut by_priv: std::collections::BTreeMap<&'static str, Vec<&str>> = Default::default();
    for (k, v) in keys {
        if let Some(p) = config_key_privilege(k, v) {
            let keys = by_priv.entry(p).or_default();
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    by_priv
        .into_iter()
        .map(|(p, keys)| Need::new_vm(pool, p, format!("set {} of {what}", keys.join(", "))))
        .collect()
}

fn bridge_path(bridge: &str, vlan: Option<u16>) -> String {
    // A plain Linux bridge is a VNet of the implicit zone `localnetwork`; with a VLAN tag PVE
    // checks the tag's own path below it.
    match vlan {
        Some(tag) => format!("/sdn/zones/localnetwork/{bridge}/{tag}"),
        None => format!("/sdn/zones/localnetwork/{bridge}"),
    }
}

/// Everything an [`ImageRun`] needs, in the order the run needs it.
pub fn image_needs(run: &ImageRun<'_>) -> Vec<Need> {
    let spec = run.spec;
    let p = &spec.placement;
    let pool = p.pool.as_deref();
    let storage = format!("/storage/{}", p.storage);
    let mut needs = vec![
        Need::new_vm(
            pool,
            "VM.Audit",
            "list and read VMs (without it Proxmox lists none, and a build VM could not be found again)",
        ),
        Need::any_on(
            &storage,
            &["Datastore.AllocateSpace", "Datastore.Audit"],
            format!("read storage {}", p.storage),
        ),
        Need::on(
            &storage,
            "Datastore.AllocateSpace",
            format!("allocate the build VM's disks on {}", p.storage),
        ),
        Need::new_vm(
            pool,
            "VM.Allocate",
            "create the build VM, convert it to a template, destroy failed builds",
        ),
    ];
    if let Some(pool) = pool {
        needs.push(Need::on(
            format!("/pool/{pool}"),
            "VM.Allocate",
            format!("create VMs in pool {pool}"),
        ));
    }
    if spec.source.cloud_image.is_some() {
        let import = format!("/storage/{}", p.import_storage);
        needs.push(Need::on(
            &import,
            "Datastore.AllocateTemplate",
            format!("download the cloud image to {}", p.import_storage),
        ));
        needs.push(Need {
            options: vec![
                Grant {
                    path: format!("/nodes/{}", p.node),
                    privileges: vec!["Sys.AccessNetwork"],
                },
                Grant {
                    path: "/".into(),
                    privileges: vec!["Sys.Audit", "Sys.Modify"],
                },
            ],
            why: format!("let node {} fetch the image URL", p.node),
        });
        needs.push(Need::any_on(
            &import,
            &[
                "Datastore.AllocateSpace",
                "Datastore.Audit",
                "Datastore.Allocate",
            ],
            format!("read and import the image from {}", p.import_storage),
        ));
    }
    if let Some(t) = &spec.source.template {
        let path = t.vmid.map_or("/vms".to_string(), |v| format!("/vms/{v}"));
        needs.push(Need::on(&path, "VM.Audit", "read the base template"));
        needs.push(Need::on(&path, "VM.Clone", "full-clone the base template"));
    }
    // The keys the build writes: hardware, network, cloud-init, the disk, the cloud-init drive,
    // name, tags and marker.
    let hw = crate::builder::hardware_config(spec);
    let mut keys: Vec<(&str, &str)> = hw
        .values()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    keys.extend([
        ("scsi0", "import-from"),
        ("ide2", "cloudinit"),
        ("boot", "order=scsi0"),
        ("sshkeys", ""),
        ("name", ""),
        ("tags", ""),
        ("description", ""),
    ]);
    needs.extend(config_needs(pool, keys, "the build VM"));
    needs.push(Need::on(
        bridge_path(&p.bridge, p.vlan),
        "SDN.Use",
        format!("attach net0 to bridge {}", p.bridge),
    ));
    needs.push(Need::new_vm(
        pool,
        "VM.PowerMgmt",
        "start and shut down the build VM",
    ));
    let via_agent = spec.provisioning.via == ProvisioningChannel::GuestAgent;
    if via_agent {
        needs.push(Need::new_vm(
            pool,
            agent_exec_privilege(run.version),
            "run the provisioning commands through the guest agent",
        ));
    } else if static_ip(&spec.provisioning.ssh.ip_config).is_none() {
        needs.push(agent_read(
            pool,
            run.version,
            "read the build VM's DHCP address from the guest agent",
        ));
    }
    if run.validate {
        needs.extend(validation_needs(run, pool));
    }
    if run.validate || run.promote {
        needs.push(Need::new_vm(
            pool,
            "VM.Config.Options",
            "record the verdict on the template (tags and marker), move the channel tag",
        ));
    }
    needs
}

fn agent_read(pool: Option<&str>, version: PveVersion, why: &str) -> Need {
    let privs = agent_read_privileges(version);
    let mut need = Need::new_vm(pool, privs[0], why);
    for alt in &privs[1..] {
        need.options.extend(Need::new_vm(pool, alt, why).options);
    }
    need
}

fn validation_needs(run: &ImageRun<'_>, pool: Option<&str>) -> Vec<Need> {
    let mut needs = vec![
        Need::new_vm(
            pool,
            "VM.Clone",
            "clone the template for validation (a throwaway VM)",
        ),
        Need::new_vm(pool, "VM.PowerMgmt", "start and stop the validation clone"),
    ];
    let keys = [
        ("ciuser", ""),
        ("sshkeys", ""),
        ("ipconfig0", ""),
        ("net0", ""),
        ("tags", ""),
        ("protection", ""),
        ("ide2", "cloudinit"),
    ];
    needs.extend(config_needs(pool, keys, "the validation clone"));
    // An unknown check is refused by the spec's own validation; here it only adds nothing.
    let checks = plan_checks(&run.spec.validation.checks).unwrap_or_default();
    if checks.iter().any(|c| c.needs_agent()) {
        needs.push(Need::new_vm(
            pool,
            agent_exec_privilege(run.version),
            "run the validation checks in the guest (cloud-init status, services, packages)",
        ));
    } else if checks.contains(&Check::GuestAgent) {
        needs.push(agent_read(
            pool,
            run.version,
            "ping the guest agent of the validation clone",
        ));
    }
    needs
}

/// What a retention run needs to act on `vmids` (`None`: any template, as `sombrero check`
/// asks) in `mode`, with `backup_storage` for backups.
pub fn retention_needs(
    mode: ArchiveMode,
    backup_storage: Option<&str>,
    vmids: Option<&[u32]>,
) -> Vec<Need> {
    let paths: Vec<String> = match vmids {
        Some(v) => v.iter().map(|id| format!("/vms/{id}")).collect(),
        None => vec!["/vms".into()],
    };
    let mut needs = vec![Need::on(
        "/vms",
        "VM.Audit",
        "list the templates (without it Proxmox lists none)",
    )];
    for path in &paths {
        needs.push(Need::on(
            path,
            "VM.Audit",
            "re-read each template right before acting",
        ));
        match mode {
            ArchiveMode::Tag => needs.push(Need::on(
                path,
                "VM.Config.Options",
                "tag templates archived",
            )),
            ArchiveMode::Delete => {
                needs.push(Need::on(path, "VM.Allocate", "delete templates"));
            }
            ArchiveMode::Backup => {
                needs.push(Need::on(path, "VM.Backup", "back up templates (vzdump)"));
                needs.push(Need::on(
                    path,
                    "VM.Allocate",
                    "delete templates once backed up",
                ));
            }
        }
    }
    if let (ArchiveMode::Backup, Some(s)) = (mode, backup_storage) {
        let path = format!("/storage/{s}");
        needs.push(Need::on(
            &path,
            "Datastore.AllocateSpace",
            format!("write backups to {s}"),
        ));
    }
    needs
}

/// What removing leftover build VMs and validation clones (`vmids`, on deletion of their
/// GoldenImage) needs: each is re-read, stopped when running, and destroyed.
pub fn cleanup_needs(vmids: &[u32]) -> Vec<Need> {
    let mut needs = vec![Need::on(
        "/vms",
        "VM.Audit",
        "list the image's VMs (without it Proxmox lists none)",
    )];
    for id in vmids {
        let path = format!("/vms/{id}");
        needs.push(Need::on(
            &path,
            "VM.Audit",
            "re-read the VM right before acting",
        ));
        needs.push(Need::on(
            &path,
            "VM.PowerMgmt",
            "stop a leftover VM still running",
        ));
        needs.push(Need::on(
            &path,
            "VM.Allocate",
            "destroy leftover build VMs and validation clones",
        ));
    }
    needs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::golden_image::{CloudImageSource, TemplateSource};

    const PVE9: PveVersion = PveVersion { major: 9, minor: 1 };
    const PVE8: PveVersion = PveVersion { major: 8, minor: 4 };

    fn spec() -> GoldenImageSpec {
        let mut spec: GoldenImageSpec = serde_json::from_value(serde_json::json!({
            "os": "ubuntu-24.04", "type": "minimal",
            "source": {"cloudImage": {"url": "https://h/x.img", "checksum": format!("sha256:{}", "a".repeat(64))}},
            "placement": {"node": "pve1", "storage": "local-lvm", "importStorage": "local", "bridge": "vmbr0"},
        }))
        .unwrap();
        spec.provisioning.ssh.ip_config = "ip=10.0.0.5/24,gw=10.0.0.1".into();
        spec
    }

    /// Every (path, privilege) of the needs' first options.
    fn first_options(needs: &[Need]) -> Vec<(String, &'static str)> {
        let mut v: Vec<_> = needs
            .iter()
            .flat_map(|n| {
                let g = &n.options[0];
                g.privileges.iter().map(|p| (g.path.clone(), *p))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn cleanup_needs_audit_stop_and_destroy_on_each_leftover() {
        assert_eq!(
            first_options(&cleanup_needs(&[951, 960])),
            [
                ("/vms".to_string(), "VM.Audit"),
                ("/vms/951".into(), "VM.Allocate"),
                ("/vms/951".into(), "VM.Audit"),
                ("/vms/951".into(), "VM.PowerMgmt"),
                ("/vms/960".into(), "VM.Allocate"),
                ("/vms/960".into(), "VM.Audit"),
                ("/vms/960".into(), "VM.PowerMgmt"),
            ]
        );
        assert_eq!(
            first_options(&cleanup_needs(&[])),
            [("/vms".to_string(), "VM.Audit")]
        );
    }

    #[test]
    fn config_keys_map_to_qemu_servers_privileges() {
        for (key, value, want) in [
            ("cores", "2", Some("VM.Config.CPU")),
            ("cpu", "host", Some("VM.Config.CPU")),
            ("memory", "2048", Some("VM.Config.Memory")),
            ("scsihw", "virtio-scsi-single", Some("VM.Config.HWType")),
            ("machine", "q35", Some("VM.Config.HWType")),
            ("vga", "serial0", Some("VM.Config.HWType")),
            ("serial0", "socket", Some("VM.Config.HWType")),
            ("bios", "ovmf", Some("VM.Config.Options")),
            ("agent", "enabled=1", Some("VM.Config.Options")),
            ("tags", "a;b", Some("VM.Config.Options")),
            ("description", "x", Some("VM.Config.Options")),
            ("net0", "virtio,bridge=vmbr0", Some("VM.Config.Network")),
            ("ipconfig0", "ip=dhcp", Some("VM.Config.Cloudinit")),
            ("sshkeys", "ssh-ed25519", Some("VM.Config.Cloudinit")),
            ("ciupgrade", "0", Some("VM.Config.Cloudinit")),
            (
                "scsi0",
                "local-lvm:0,import-from=local:import/x.qcow2",
                Some("VM.Config.Disk"),
            ),
            ("ide2", "local-lvm:cloudinit", Some("VM.Config.CDROM")),
            ("ide0", "none,media=cdrom", Some("VM.Config.CDROM")),
            ("efidisk0", "local-lvm:1,efitype=4m", Some("VM.Config.Disk")),
            ("boot", "order=scsi0", Some("VM.Config.Disk")),
            ("digest", "abc", None),
            ("delete", "sshkeys", None),
        ] {
            assert_eq!(config_key_privilege(key, value), want, "{key}={value}");
        }
    }

    #[test]
    fn a_production_build_of_a_cloud_image_needs_the_whole_role_but_backup() {
        let spec = spec();
        let needs = image_needs(&ImageRun {
            spec: &spec,
            validate: true,
            promote: true,
            version: PVE9,
        });
        let got = first_options(&needs);
        let privs: std::collections::BTreeSet<&str> = got.iter().map(|(_, p)| *p).collect();
        let role: std::collections::BTreeSet<&str> = role_privileges(PVE9).into_iter().collect();
        let want: std::collections::BTreeSet<&str> =
            role.iter().copied().filter(|p| *p != "VM.Backup").collect();
        assert_eq!(privs, want);
        for (path, privilege) in [
            ("/vms", "VM.Allocate"),
            ("/vms", "VM.Audit"),
            ("/vms", "VM.Clone"),
            ("/vms", "VM.GuestAgent.Unrestricted"),
            ("/storage/local-lvm", "Datastore.AllocateSpace"),
            ("/storage/local", "Datastore.AllocateTemplate"),
            ("/nodes/pve1", "Sys.AccessNetwork"),
            ("/sdn/zones/localnetwork/vmbr0", "SDN.Use"),
        ] {
            assert!(
                got.contains(&(path.to_string(), privilege)),
                "{privilege} on {path} in {got:?}"
            );
        }
    }

    #[test]
    fn a_plain_build_with_a_static_address_needs_no_agent_nor_clone() {
        let spec = spec();
        let got = first_options(&image_needs(&ImageRun {
            spec: &spec,
            validate: false,
            promote: false,
            version: PVE9,
        }));
        for p in [
            "VM.Clone",
            "VM.GuestAgent.Unrestricted",
            "VM.GuestAgent.Audit",
            "VM.Backup",
        ] {
            assert!(got.iter().all(|(_, g)| *g != p), "{p} in {got:?}");
        }
    }

    #[test]
    fn pve_8_uses_vm_monitor_for_the_agent() {
        let spec = spec();
        let got = first_options(&image_needs(&ImageRun {
            spec: &spec,
            validate: true,
            promote: true,
            version: PVE8,
        }));
        assert!(got.contains(&("/vms".into(), "VM.Monitor")));
        assert!(got.iter().all(|(_, p)| !p.starts_with("VM.GuestAgent")));
        assert!(role_command(PVE8).contains("VM.Monitor"));
        assert!(!role_command(PVE8).contains("GuestAgent"));
    }

    #[test]
    fn dhcp_and_guest_agent_provisioning_need_the_agent() {
        let mut spec = spec();
        spec.provisioning.ssh.ip_config = "ip=dhcp".into();
        let needs = image_needs(&ImageRun {
            spec: &spec,
            validate: false,
            promote: false,
            version: PVE9,
        });
        let agent = needs
            .iter()
            .find(|n| n.why.contains("DHCP"))
            .expect("an agent need");
        // Either agent privilege reads the address.
        assert_eq!(agent.options.len(), 2);
        spec.provisioning.via = ProvisioningChannel::GuestAgent;
        let got = first_options(&image_needs(&ImageRun {
            spec: &spec,
            validate: false,
            promote: false,
            version: PVE9,
        }));
        assert!(got.contains(&("/vms".into(), "VM.GuestAgent.Unrestricted")));
    }

    #[test]
    fn pools_vlans_and_template_sources_change_the_paths() {
        let mut spec = spec();
        spec.source.cloud_image = None::<CloudImageSource>;
        spec.source.template = Some(TemplateSource {
            vmid: Some(9000),
            name: None,
        });
        spec.placement.pool = Some("images".into());
        spec.placement.vlan = Some(20);
        let needs = image_needs(&ImageRun {
            spec: &spec,
            validate: false,
            promote: false,
            version: PVE9,
        });
        let got = first_options(&needs);
        assert!(got.contains(&("/vms/9000".into(), "VM.Clone")));
        assert!(got.contains(&("/pool/images".into(), "VM.Allocate")));
        assert!(got.contains(&("/sdn/zones/localnetwork/vmbr0/20".into(), "SDN.Use")));
        assert!(got.iter().all(|(_, p)| *p != "Datastore.AllocateTemplate"));
        // A new VM's privilege may come from /vms or from the pool.
        let alloc = needs
            .iter()
            .find(|n| n.why.starts_with("create the build VM"))
            .unwrap();
        assert_eq!(
            alloc
                .options
                .iter()
                .map(|g| g.path.as_str())
                .collect::<Vec<_>>(),
            ["/vms", "/pool/images"]
        );
    }

    #[test]
    fn retention_needs_follow_the_mode() {
        let got = first_options(&retention_needs(ArchiveMode::Backup, Some("pbs"), None));
        assert!(got.contains(&("/vms".into(), "VM.Backup")));
        assert!(got.contains(&("/vms".into(), "VM.Allocate")));
        assert!(got.contains(&("/storage/pbs".into(), "Datastore.AllocateSpace")));
        let got = first_options(&retention_needs(ArchiveMode::Tag, None, Some(&[101])));
        assert!(got.contains(&("/vms/101".into(), "VM.Config.Options")));
        assert!(got.iter().all(|(_, p)| *p != "VM.Backup"));
        let got = first_options(&retention_needs(ArchiveMode::Delete, None, Some(&[])));
        assert_eq!(got, [("/vms".to_string(), "VM.Audit")]);
    }
}
