//! Pure helpers of the build: file names, checksums, the CLI owner uid, the build VM's config.

use sha2::{Digest, Sha256};

use crate::api::GoldenImageSpec;
use crate::api::golden_image::Bios;
use crate::proxmox::{ChecksumAlgorithm, NetworkInterface, QemuConfig};

/// The import file name for a cloud image URL: the URL's last path segment, characters PVE
/// refuses replaced by `_`, and `.img` (Ubuntu) made `.qcow2`, because `content=import` only
/// accepts `.qcow2`, `.raw`, `.vmdk` (and `.ova`). Any other extension gets `.qcow2` appended
/// (cloud images are qcow2 in practice; `source.cloudImage.fileName` overrides).
pub fn normalize_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("image");
    let mut name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(['.', '-', '+']) {
        name.insert(0, '_');
    }
    if let Some(stem) = name.strip_suffix(".img") {
        return format!("{stem}.qcow2");
    }
    if [".qcow2", ".raw", ".vmdk"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        return name;
    }
    format!("{name}.qcow2")
}

/// `sha256:<hex>` / `sha512:<hex>` -> PVE's algorithm and the hex digest.
pub fn parse_checksum(text: &str) -> Option<(ChecksumAlgorithm, String)> {
    let (alg, hex) = text.trim().split_once(':')?;
    let alg = match alg {
        "sha256" if hex.len() == 64 => ChecksumAlgorithm::Sha256,
        "sha512" if hex.len() == 128 => ChecksumAlgorithm::Sha512,
        _ => return None,
    };
    hex.chars()
        .all(|c| c.is_ascii_hexdigit())
        .then(|| (alg, hex.to_ascii_lowercase()))
}

/// The owner uid of a CLI run (no Kubernetes object, so no real uid): a UUID-shaped SHA-256 of
/// `sombrero-cli/<namespace>/<name>`. Stable, so a second `sombrero build` of the same file
/// resumes the first one's build VM and numbers builds in the same sequence; different from any
/// real object's uid, so a controller never adopts a CLI build (or the other way round).
pub fn cli_owner_uid(namespace: &str, name: &str) -> String {
    let h = hex::encode(Sha256::digest(
        format!("sombrero-cli/{namespace}/{name}").as_bytes(),
    ));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The static address of an `ipconfig0` value (`ip=10.0.0.5/24,gw=...` -> `10.0.0.5`).
pub fn static_ip(ip_config: &str) -> Option<String> {
    ip_config.split(',').find_map(|part| {
        let v = part.trim().strip_prefix("ip=")?;
        if v == "dhcp" {
            return None;
        }
        Some(v.split('/').next().unwrap_or(v).to_string())
    })
}

/// The first non-loopback IPv4 address the guest agent reports (where a VM with `ip=dhcp` is
/// reached).
pub fn first_ipv4(ifaces: &[NetworkInterface]) -> Option<String> {
    ifaces
        .iter()
        .filter(|i| !i.is_loopback())
        .flat_map(|i| i.ip_addresses.iter())
        .find(|a| a.ip_address_type == "ipv4")
        .map(|a| a.ip_address.clone())
}

/// Hardware, network, cloud-init and serial settings of the build VM (no disk, no marker).
pub fn hardware_config(spec: &GoldenImageSpec) -> QemuConfig {
    let hw = &spec.hardware;
    let mut net = format!("virtio,bridge={}", spec.placement.bridge);
    if let Some(vlan) = spec.placement.vlan {
        net.push_str(&format!(",tag={vlan}"));
    }
    let mut c = QemuConfig::new()
        .cores(hw.cores)
        .memory_mib(u64::from(hw.memory_mib))
        .cpu(&hw.cpu)
        .machine(&hw.machine)
        .bios(match hw.bios {
            Bios::Seabios => "seabios",
            Bios::Ovmf => "ovmf",
        })
        .ostype("l26")
        .scsihw("virtio-scsi-single")
        .net(0, &net)
        .serial(0, "socket")
        .vga("serial0")
        .agent("enabled=1")
        .ipconfig(0, &spec.provisioning.ssh.ip_config)
        .ciuser(&spec.provisioning.ssh.user)
        // The build upgrades packages itself, step by step, so failures name the step.
        .ciupgrade(false);
    if hw.bios == Bios::Ovmf {
        c = c.set(
            "efidisk0",
            format!(
                "{}:1,efitype=4m,pre-enrolled-keys=0",
                spec.placement.storage
            ),
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(
            normalize_file_name(
                "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img"
            ),
            "noble-server-cloudimg-amd64.qcow2"
        );
        assert_eq!(
            normalize_file_name(
                "https://cloud.debian.org/x/debian-12-genericcloud-amd64.qcow2?x=1"
            ),
            "debian-12-genericcloud-amd64.qcow2"
        );
        assert_eq!(normalize_file_name("http://h/a b.raw"), "a_b.raw");
        assert_eq!(normalize_file_name("http://h/disk"), "disk.qcow2");
        assert_eq!(normalize_file_name("http://h/"), "h.qcow2");
    }

    #[test]
    fn checksums() {
        let hex = "a".repeat(64);
        assert_eq!(parse_checksum(&format!("sha256:{hex}")).unwrap().1, hex);
        assert!(parse_checksum("sha256:abc").is_none());
        assert!(parse_checksum("md5:abc").is_none());
    }

    #[test]
    fn owner_uid_is_stable_and_uuid_shaped() {
        let a = cli_owner_uid("default", "ubuntu");
        assert_eq!(a, cli_owner_uid("default", "ubuntu"));
        assert_ne!(a, cli_owner_uid("other", "ubuntu"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn ips() {
        assert_eq!(
            static_ip("ip=10.0.0.5/24,gw=10.0.0.1").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(static_ip("ip=dhcp"), None);
        assert_eq!(static_ip("gw=1.2.3.4"), None);
        let ifaces: Vec<NetworkInterface> = serde_json::from_value(serde_json::json!([
            {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]},
            {"name": "eth0", "ip-addresses": [
                {"ip-address": "fe80::1", "ip-address-type": "ipv6"},
                {"ip-address": "10.0.0.7", "ip-address-type": "ipv4"}
            ]}
        ]))
        .unwrap();
        assert_eq!(first_ipv4(&ifaces).as_deref(), Some("10.0.0.7"));
        assert_eq!(first_ipv4(&ifaces[..1]), None);
    }
}
