//! Cluster-wide endpoints: version, resources (the inventory of VMs), next free VMID.

use serde::Deserialize;

use super::client::{Client, Params};
use super::error::{Error, Result};
use super::lenient;

/// `GET /version`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VersionInfo {
    /// The pve-manager package version, e.g. `8.4.1`.
    pub version: String,
    /// The point release, e.g. `8.4`.
    #[serde(default)]
    pub release: String,
    #[serde(default)]
    pub repoid: String,
}

impl VersionInfo {
    pub fn parsed(&self) -> Result<PveVersion> {
        let text = if self.release.is_empty() {
            &self.version
        } else {
            &self.release
        };
        PveVersion::parse(text).or_else(|_| PveVersion::parse(&self.version))
    }
}

/// A Proxmox VE `major.minor` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PveVersion {
    pub major: u32,
    pub minor: u32,
}

impl PveVersion {
    /// `8.4`, `8.4.1`, `9.1-3`, `pve-manager/8.4.1/...` all parse.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let t = t.strip_prefix("pve-manager/").unwrap_or(t);
        let mut nums = t
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let bad = || Error::Decode {
            request: "GET /version".into(),
            message: format!("cannot read a version from {text:?}"),
        };
        let major = nums.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        let minor = nums.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        Ok(PveVersion { major, minor })
    }

    /// `content=import` for qcow2/raw/vmdk (download-url and `import-from`) came with 8.4.
    pub fn supports_import_content(self) -> bool {
        self >= PveVersion { major: 8, minor: 4 }
    }

    /// PVE 9 replaced VM.Monitor with VM.GuestAgent.* for the agent endpoints.
    pub fn has_guest_agent_privileges(self) -> bool {
        self.major >= 9
    }
}

impl std::fmt::Display for PveVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One guest of `GET /cluster/resources?type=vm` (QEMU VMs and LXC containers).
///
/// `name`, `status` and `template` come from the status broadcast and lag by up to ~10 s: a
/// fresh VM shows `status: "unknown"` and no name. `tags` and `lock` are read from the config.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct ClusterVm {
    /// `qemu/100`.
    #[serde(default)]
    pub id: String,
    /// `qemu` or `lxc`.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(deserialize_with = "lenient::u32_")]
    pub vmid: u32,
    #[serde(default)]
    pub node: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool01")]
    pub template: bool,
    /// As stored: `;`-separated, normalized by PVE. See [`ClusterVm::tag_list`].
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub lock: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub hastate: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub maxdisk: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub maxmem: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_uint")]
    pub uptime: Option<u64>,
}

impl ClusterVm {
    pub fn is_qemu(&self) -> bool {
        self.kind == "qemu"
    }

    /// The tags split and lower-cased (PVE accepts `;`, `,` and spaces as separators).
    pub fn tag_list(&self) -> Vec<String> {
        split_tags(self.tags.as_deref().unwrap_or(""))
    }
}

/// Split a PVE tag list the way `PVE::ParseUtils::split_list` does, lower-cased.
pub fn split_tags(tags: &str) -> Vec<String> {
    tags.split([';', ',', ' ', '\t', '\n'])
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

impl Client {
    /// `GET /version` (any authenticated token may call it).
    pub async fn version(&self) -> Result<VersionInfo> {
        self.get(&["version"], &Params::new()).await
    }

    /// The server's `major.minor`, asked once per client and cached.
    pub async fn pve_version(&self) -> Result<PveVersion> {
        self.cached_version()
            .get_or_try_init(|| async { self.version().await?.parsed() })
            .await
            .copied()
    }

    /// Fail with [`Error::Unsupported`] unless the server has `content=import` (PVE 8.4+).
    pub async fn require_import_content(&self) -> Result<()> {
        let v = self.pve_version().await?;
        if v.supports_import_content() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                message: format!(
                    "Proxmox VE {v} cannot download or import qcow2/raw/vmdk images as content 'import' (needs 8.4 or newer); upgrade, or clone an existing template instead"
                ),
            })
        }
    }

    /// All guests of the cluster (`GET /cluster/resources?type=vm`): one call, whatever the
    /// number of nodes. Entries are filtered by VM.Audit: a token without it sees `[]`.
    pub async fn cluster_vms(&self) -> Result<Vec<ClusterVm>> {
        self.get(&["cluster", "resources"], &Params::new().set("type", "vm"))
            .await
    }

    /// The lowest free VMID. It is not reserved: creating with it may still meet
    /// [`Error::AlreadyExists`], then ask again.
    pub async fn next_vmid(&self) -> Result<u32> {
        #[derive(Deserialize)]
        struct Id(#[serde(deserialize_with = "lenient::u32_")] u32);
        let Id(id) = self.get(&["cluster", "nextid"], &Params::new()).await?;
        Ok(id)
    }

    /// Whether `vmid` is free now (`GET /cluster/nextid?vmid=N`); a taken one is `Ok(false)`.
    pub async fn vmid_is_free(&self, vmid: u32) -> Result<bool> {
        match self
            .get::<serde_json::Value>(&["cluster", "nextid"], &Params::new().set("vmid", vmid))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            PveVersion::parse("8.4").unwrap(),
            PveVersion { major: 8, minor: 4 }
        );
        assert_eq!(
            PveVersion::parse("9.1.3").unwrap(),
            PveVersion { major: 9, minor: 1 }
        );
        assert_eq!(
            PveVersion::parse("pve-manager/8.3.2/3e76eec21c4a14a7").unwrap(),
            PveVersion { major: 8, minor: 3 }
        );
        assert!(PveVersion::parse("eight").is_err());
        assert!(!PveVersion::parse("8.3").unwrap().supports_import_content());
        assert!(PveVersion::parse("8.4").unwrap().supports_import_content());
        assert!(PveVersion::parse("9.0").unwrap().supports_import_content());
        assert!(
            PveVersion::parse("9.0")
                .unwrap()
                .has_guest_agent_privileges()
        );
        let v = VersionInfo {
            version: "8.4.1".into(),
            release: "".into(),
            repoid: "x".into(),
        };
        assert_eq!(v.parsed().unwrap().to_string(), "8.4");
    }

    #[test]
    fn cluster_vm_decodes_fresh_and_lagging_entries() {
        let vms: Vec<ClusterVm> = serde_json::from_str(
            r#"[{"id":"qemu/100","type":"qemu","vmid":100,"node":"pve1","status":"unknown"},
                {"id":"qemu/9000","type":"qemu","vmid":"9000","node":"pve1","name":"ubuntu-24.04-minimal-20250118-001",
                 "status":"stopped","template":1,"tags":"golden;sombrero;Ubuntu","maxdisk":"2147483648","cpu":0.0},
                {"id":"lxc/200","type":"lxc","vmid":200,"node":"pve2","template":0}]"#,
        )
        .unwrap();
        assert_eq!(vms[0].name, None);
        assert!(!vms[0].template);
        assert!(vms[1].template && vms[1].is_qemu());
        assert_eq!(vms[1].tag_list(), vec!["golden", "sombrero", "ubuntu"]);
        assert_eq!(vms[1].maxdisk, Some(2147483648));
        assert!(!vms[2].is_qemu());
    }

    #[test]
    fn tag_splitting() {
        assert_eq!(split_tags("a;b,c d"), vec!["a", "b", "c", "d"]);
        assert!(split_tags("").is_empty());
    }
}
