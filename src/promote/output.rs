//! The hand-off for consumers, pure: the seed's Terraform JSON and the data of the output
//! ConfigMap (`template_id`, `template_name`, `node`, `manifest.json`), where `manifest.json`
//! is a Packer manifest (`packer-manifest.json` layout) so tooling written for Packer reads it.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::marker::{Marker, SourceInfo};
use crate::image::output::TerraformOutput;

/// `builder_type` in the manifest.
pub const BUILDER_TYPE: &str = "sombrero";
/// ConfigMap keys.
pub const KEY_TEMPLATE_ID: &str = "template_id";
pub const KEY_TEMPLATE_NAME: &str = "template_name";
pub const KEY_NODE: &str = "node";
pub const KEY_MANIFEST: &str = "manifest.json";

/// The seed's `{"template_id": "8024", "template_name": "...", "node": "pve1"}`.
pub fn terraform_output(vmid: u32, node: &str, marker: &Marker) -> TerraformOutput {
    TerraformOutput::new(vmid, marker.metadata.name.clone(), Some(node.to_string()))
}

/// One entry of a Packer manifest's `builds`: the fields, order and encoding of Packer's
/// `post-processor/manifest` `Artifact` (`build_time` omitted when 0, `files` and
/// `custom_data` `null` when absent). Deserialising is as lenient as Go's: a missing field is
/// its zero value, an unknown one is dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ManifestBuild {
    pub name: String,
    pub builder_type: String,
    /// Unix seconds.
    #[serde(skip_serializing_if = "is_zero")]
    pub build_time: i64,
    /// Packer writes the artifact's files here; a template has none.
    pub files: Option<Vec<ArtifactFile>>,
    /// The template's VMID, as Packer's Proxmox builders write it.
    pub artifact_id: String,
    pub packer_run_uuid: String,
    pub custom_data: Option<BTreeMap<String, String>>,
}

/// Packer's `ArtifactFile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ArtifactFile {
    pub name: String,
    pub size: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A Packer manifest: `{"builds": [...], "last_run_uuid": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PackerManifest {
    pub builds: Option<Vec<ManifestBuild>>,
    pub last_run_uuid: String,
}

impl PackerManifest {
    /// What Packer's manifest post-processor writes when this run's `builds` are added to a
    /// file holding `existing` (its previous content, `None` or empty when there is none):
    /// the earlier builds are kept (Packer without `-force`), this run's appended, and
    /// `last_run_uuid` is this run's. An unreadable file is an error, as in Packer.
    pub fn appended_to(&self, existing: Option<&str>) -> Result<PackerManifest, String> {
        let mut file = match existing.filter(|t| !t.is_empty()) {
            Some(text) => serde_json::from_str::<PackerManifest>(text)
                .map_err(|e| format!("cannot parse the existing manifest: {e}"))?,
            None => PackerManifest::default(),
        };
        let builds = file.builds.get_or_insert_with(Vec::new);
        builds.extend(self.builds.iter().flatten().cloned());
        file.last_run_uuid = self.last_run_uuid.clone();
        Ok(file)
    }

    /// The bytes Go's `json.MarshalIndent(manifest, "", "  ")` gives: two-space indent, no
    /// final newline, `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c` ... (Go's HTML-safe
    /// strings). Those characters only occur inside JSON strings, so replacing them is exact.
    pub fn to_packer_json(&self) -> String {
        // Serialising plain strings, numbers and maps cannot fail; an empty object is the fallback.
        let text = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into());
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match c {
                '<' => out.push_str("\\u003c"),
                '>' => out.push_str("\\u003e"),
                '&' => out.push_str("\\u0026"),
                '\u{2028}' => out.push_str("\\u2028"),
                '\u{2029}' => out.push_str("\\u2029"),
                c => out.push(c),
            }
        }
        out
    }
}

/// A stable UUID-shaped id for a build (RFC 9562 version 8: custom, from a SHA-256 of the
/// owner's uid and the build id), so rewriting the ConfigMap for the same template changes
/// nothing.
pub fn run_uuid(owner_uid: &str, build_id: &str) -> String {
    let digest = Sha256::digest(format!("{owner_uid}/{build_id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// When the build was made: `created_at` when recorded, else midnight UTC of the build date.
fn build_time(marker: &Marker) -> DateTime<Utc> {
    marker.metadata.created_at.unwrap_or_else(|| {
        marker
            .metadata
            .build_date
            .and_time(NaiveTime::MIN)
            .and_utc()
    })
}

/// The manifest for one template. `name` is the GoldenImage's name (stable across builds, as a
/// Packer build name is); `custom_data` holds the seed's metadata and where the image came from.
pub fn packer_manifest(vmid: u32, node: &str, marker: &Marker) -> PackerManifest {
    let m = &marker.metadata;
    let mut custom = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        custom.insert(k.to_string(), v);
    };
    put("template_name", m.name.clone());
    put("template_id", vmid.to_string());
    put("node", node.to_string());
    put("os", m.os.clone());
    put("type", m.image_type.clone());
    put("builder", m.builder.clone());
    put("builder_version", m.builder_version.clone());
    put("build_date", m.build_date.format("%Y-%m-%d").to_string());
    put("build_number", format!("{:03}", m.build_number));
    put("build_id", marker.build_id.clone());
    put("spec_hash", m.spec_hash.clone());
    put(
        "image",
        format!("{}/{}", marker.owner.namespace, marker.owner.name),
    );
    match &m.source {
        Some(SourceInfo::CloudImage { url, checksum }) => {
            put("source_url", url.clone());
            if let Some(c) = checksum {
                put("source_checksum", c.clone());
            }
        }
        Some(SourceInfo::Template { vmid, name }) => {
            if let Some(v) = vmid {
                put("source_template_vmid", v.to_string());
            }
            if let Some(n) = name {
                put("source_template_name", n.clone());
            }
        }
        None => {}
    }
    if let Some(at) = m.validation.validated_at() {
        put("validated_at", at.to_rfc3339());
    }
    if let Some(d) = &m.package_manifest_digest {
        put("package_manifest_digest", d.clone());
    }
    let uuid = run_uuid(&marker.owner.uid, &marker.build_id);
    PackerManifest {
        builds: Some(vec![ManifestBuild {
            name: marker.owner.name.clone(),
            builder_type: BUILDER_TYPE.into(),
            build_time: build_time(marker).timestamp(),
            files: None,
            artifact_id: vmid.to_string(),
            packer_run_uuid: uuid.clone(),
            custom_data: Some(custom),
        }]),
        last_run_uuid: uuid,
    }
}

/// The output ConfigMap's `data`: `template_id`, `template_name`, `node`, `manifest.json`.
pub fn config_map_data(vmid: u32, node: &str, marker: &Marker) -> BTreeMap<String, String> {
    let tf = terraform_output(vmid, node, marker);
    let manifest_json = packer_manifest(vmid, node, marker).to_packer_json();
    BTreeMap::from([
        (KEY_TEMPLATE_ID.to_string(), tf.template_id),
        (KEY_TEMPLATE_NAME.to_string(), tf.template_name),
        (KEY_NODE.to_string(), node.to_string()),
        (KEY_MANIFEST.to_string(), manifest_json),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::marker::tests::sample_marker;

    #[test]
    fn config_map_holds_the_ids_and_a_packer_manifest() {
        let marker = sample_marker();
        let data = config_map_data(8024, "pve1", &marker);
        assert_eq!(data["template_id"], "8024");
        assert_eq!(data["template_name"], "ubuntu-24.04-minimal-20250118-001");
        assert_eq!(data["node"], "pve1");
        let m: serde_json::Value = serde_json::from_str(&data["manifest.json"]).unwrap();
        let b = &m["builds"][0];
        assert_eq!(m["builds"].as_array().unwrap().len(), 1);
        assert_eq!(b["name"], "ubuntu");
        assert_eq!(b["builder_type"], "sombrero");
        assert_eq!(b["artifact_id"], "8024");
        assert_eq!(b["build_time"], 1737158400); // 2025-01-18T00:00:00Z
        assert!(b["files"].is_null());
        assert_eq!(b["packer_run_uuid"], m["last_run_uuid"]);
        let cd = &b["custom_data"];
        assert_eq!(cd["os"], "ubuntu-24.04");
        assert_eq!(cd["type"], "minimal");
        assert_eq!(cd["build_date"], "2025-01-18");
        assert_eq!(cd["build_number"], "001");
        assert_eq!(cd["builder"], "sombrero");
        assert_eq!(cd["image"], "platform/ubuntu");
        assert_eq!(cd["source_checksum"], "sha256:abc");
        assert_eq!(cd["validated_at"], "2025-01-18T10:00:00+00:00");
        // Every custom_data value is a string, as Packer's map[string]string.
        assert!(cd.as_object().unwrap().values().all(|v| v.is_string()));
        // Stable: the same template gives the same bytes.
        assert_eq!(config_map_data(8024, "pve1", &marker), data);
    }

    #[test]
    fn the_manifest_is_byte_for_byte_what_packer_writes() {
        // What Packer's manifest post-processor writes (its `Artifact` struct through
        // `json.MarshalIndent(m, "", "  ")`): field order, two-space indent, HTML-safe
        // escapes, no final newline.
        let manifest = PackerManifest {
            builds: Some(vec![ManifestBuild {
                name: "ubuntu".into(),
                builder_type: "sombrero".into(),
                build_time: 1737158400,
                files: None,
                artifact_id: "8024".into(),
                packer_run_uuid: "u-1".into(),
                custom_data: Some(BTreeMap::from([("a&b".to_string(), "<x>".to_string())])),
            }]),
            last_run_uuid: "u-1".into(),
        };
        assert_eq!(
            manifest.to_packer_json(),
            "{\n  \"builds\": [\n    {\n      \"name\": \"ubuntu\",\n      \"builder_type\": \"sombrero\",\n      \"build_time\": 1737158400,\n      \"files\": null,\n      \"artifact_id\": \"8024\",\n      \"packer_run_uuid\": \"u-1\",\n      \"custom_data\": {\n        \"a\\u0026b\": \"\\u003cx\\u003e\"\n      }\n    }\n  ],\n  \"last_run_uuid\": \"u-1\"\n}"
        );
        // build_time 0 is omitted (`omitempty`), as Packer's `strip_time` leaves it.
        let mut stripped = manifest.clone();
        stripped.builds.as_mut().unwrap()[0].build_time = 0;
        assert!(!stripped.to_packer_json().contains("build_time"));
    }

    #[test]
    fn a_new_run_is_appended_to_an_existing_manifest() {
        // An entry another tool (Packer itself) wrote, with files and an unknown field.
        let existing = r#"{"builds":[{"name":"base","builder_type":"proxmox-iso","build_time":1,"files":[{"name":"a.iso","size":3}],"artifact_id":"100","packer_run_uuid":"old","custom_data":null,"extra":1}],"last_run_uuid":"old"}"#;
        let ours = packer_manifest(8024, "pve1", &sample_marker());
        let merged = ours.appended_to(Some(existing)).unwrap();
        let builds = merged.builds.as_ref().unwrap();
        assert_eq!(builds.len(), 2);
        assert_eq!(builds[0].name, "base");
        assert_eq!(
            builds[0].files,
            Some(vec![ArtifactFile {
                name: "a.iso".into(),
                size: 3
            }])
        );
        assert_eq!(builds[0].custom_data, None);
        assert_eq!(builds[1], ours.builds.as_ref().unwrap()[0]);
        assert_eq!(merged.last_run_uuid, ours.last_run_uuid);
        let json: serde_json::Value = serde_json::from_str(&merged.to_packer_json()).unwrap();
        assert!(json["builds"][0].get("extra").is_none());
        assert!(json["builds"][0]["custom_data"].is_null());
        // No file (or an empty one): just this run.
        assert_eq!(ours.appended_to(None).unwrap(), ours);
        assert_eq!(ours.appended_to(Some("")).unwrap(), ours);
        assert!(ours.appended_to(Some("not json")).is_err());
    }

    #[test]
    fn run_uuids_are_stable_uuid_shaped_and_distinct() {
        let a = run_uuid("uid-1", "b-1");
        assert_eq!(a, run_uuid("uid-1", "b-1"));
        assert_ne!(a, run_uuid("uid-1", "b-2"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('8'));
        assert!(matches!(
            parts[3].chars().next(),
            Some('8' | '9' | 'a' | 'b')
        ));
    }

    #[test]
    fn terraform_output_is_the_seed_json() {
        let tf = terraform_output(8024, "pve1", &sample_marker());
        assert_eq!(
            serde_json::to_string(&tf).unwrap(),
            r#"{"template_id":"8024","template_name":"ubuntu-24.04-minimal-20250118-001","node":"pve1"}"#
        );
    }
}
