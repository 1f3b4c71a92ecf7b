//! The ownership marker: a machine-readable block in a VM's description (PVE "Notes").
//!
//! Users may edit the notes too, so our part is one fenced code block with the info string
//! `sombrero`, holding pretty-printed JSON. The PVE UI renders notes as Markdown, so people see
//! the metadata as a readable code block; text outside the block is the user's and is preserved.
//!
//! ````text
//! Anything the user wrote.
//!
//! ```sombrero
//! {
//!   "schema": 1,
//!   "owner": { "namespace": "platform", "name": "ubuntu", "uid": "…" },
//!   ...
//! }
//! ```
//! ````
//!
//! Proxmox copies the description into every clone, so the marker records the VMID it was
//! written for: on any other VMID it is a copy and the VM is not ours ([`ownership`]).

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the JSON layout inside the block. Readers ignore unknown fields, so adding fields
/// does not need a bump; changing the meaning of one does.
pub const MARKER_SCHEMA_VERSION: u32 = 1;
/// The `builder` metadata value.
pub const BUILDER: &str = "sombrero";
/// Opening line of the block (a Markdown fence with our info string).
pub const MARKER_BEGIN: &str = "```sombrero";
/// Closing line of the block.
pub const MARKER_END: &str = "```";
/// PVE's `maxLength` for `description`.
pub const MAX_DESCRIPTION_LEN: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MarkerError {
    #[error(
        "the sombrero block in the description starts at line {line} but has no closing {MARKER_END:?} line"
    )]
    Unterminated { line: usize },
    #[error(
        "the description holds {count} sombrero blocks; exactly one is expected (remove the copies by hand)"
    )]
    Multiple { count: usize },
    #[error("the sombrero block in the description is not valid marker JSON: {message}")]
    InvalidJson { message: String },
    #[error(
        "the description would be {len} bytes, Proxmox allows at most {MAX_DESCRIPTION_LEN}: shorten the notes outside the sombrero block"
    )]
    TooLong { len: usize },
}

/// What a marked VM is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A VM being built (becomes the template, same VMID).
    Build,
    /// A finished template.
    Template,
    /// A throwaway clone booted to validate a template.
    Validation,
}

/// The Kubernetes object that owns the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Where the image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceInfo {
    CloudImage {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checksum: Option<String>,
    },
    Template {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vmid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// Outcome of validation as recorded on the template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ValidationRecord {
    #[default]
    Pending,
    Passed {
        at: DateTime<Utc>,
    },
    /// Keep `reason` short: it shares the description's 8 KiB with the user's notes.
    Failed {
        at: DateTime<Utc>,
        reason: String,
    },
}

impl ValidationRecord {
    pub fn validated_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Passed { at } => Some(*at),
            _ => None,
        }
    }
}

/// The seed's metadata, in full. Field names follow the seed (`build_date`, `build_number`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMetadata {
    pub name: String,
    pub os: String,
    #[serde(rename = "type")]
    pub image_type: String,
    pub builder: String,
    pub builder_version: String,
    pub build_date: NaiveDate,
    pub build_number: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceInfo>,
    pub spec_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_manifest_digest: Option<String>,
    #[serde(default)]
    pub validation: ValidationRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

/// Progress of a build (`crate::build`), kept in the build VM's marker so an interrupted build
/// resumes where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildProgress {
    /// The last build stage that finished (`crate::build::Stage` names: `CreateVm`, `Provision`, ...).
    pub stage: String,
    /// The package manifest (`name=version`) once provisioning recorded it; also kept on the
    /// template when the description has room (else only `metadata.package_manifest_digest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

/// The whole marker block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub schema: u32,
    pub owner: Owner,
    pub build_id: String,
    pub role: Role,
    /// The VMID this marker was written for.
    pub vmid: u32,
    pub metadata: TemplateMetadata,
    /// Build progress (role `build`) and the package manifest; absent on older markers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildProgress>,
}

impl Marker {
    /// The same marker written for another VM (e.g. a validation clone).
    pub fn retarget(&self, role: Role, vmid: u32) -> Self {
        Self {
            role,
            vmid,
            ..self.clone()
        }
    }
}

/// Whether a VM is ours to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The marker was written for this very VMID.
    Ours(Role),
    /// A marker written for another VMID: Proxmox copied it into a clone. The VM belongs to
    /// whoever cloned it.
    Foreign,
    /// No marker we can read. Hands off.
    NotOurs,
}

impl Ownership {
    pub fn is_ours(self) -> bool {
        matches!(self, Self::Ours(_))
    }
}

/// Decides ownership from a parsed marker and the VMID the description was read from.
pub fn ownership(marker: Option<&Marker>, actual_vmid: u32) -> Ownership {
    match marker {
        None => Ownership::NotOurs,
        Some(m) if m.vmid == actual_vmid => Ownership::Ours(m.role),
        Some(_) => Ownership::Foreign,
    }
}

/// Ownership straight from a description; a malformed block counts as no marker, because we
/// never touch a VM we cannot prove is ours.
pub fn ownership_of_description(description: &str, actual_vmid: u32) -> Ownership {
    match parse_description(description) {
        Ok(marker) => ownership(marker.as_ref(), actual_vmid),
        Err(_) => Ownership::NotOurs,
    }
}

/// Where the block sits, in line indices: `begin` and `end` are the fence lines
/// (`end` is `None` when unterminated).
struct BlockSpan {
    begin: usize,
    end: Option<usize>,
}

fn find_blocks(lines: &[&str]) -> Vec<BlockSpan> {
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == MARKER_BEGIN {
            let end = (i + 1..lines.len()).find(|&j| lines[j].trim() == MARKER_END);
            blocks.push(BlockSpan { begin: i, end });
            match end {
                Some(end) => i = end + 1,
                None => break,
            }
        } else {
            i += 1;
        }
    }
    blocks
}

/// Reads the marker from a description: `Ok(None)` when there is no block, an error when a
/// block is there but unusable.
pub fn parse_description(description: &str) -> Result<Option<Marker>, MarkerError> {
    let lines: Vec<&str> = description.lines().collect();
    let blocks = find_blocks(&lines);
    let block = match blocks.as_slice() {
        [] => return Ok(None),
        [one] => one,
        many => return Err(MarkerError::Multiple { count: many.len() }),
    };
    let Some(end) = block.end else {
        return Err(MarkerError::Unterminated {
            line: block.begin + 1,
        });
    };
    let body = lines[block.begin + 1..end].join("\n");
    serde_json::from_str(&body)
        .map(Some)
        .map_err(|e| MarkerError::InvalidJson {
            message: e.to_string(),
        })
}

/// The user's part of a description: everything outside our block(s), trailing whitespace
/// trimmed. The blank lines around a removed block collapse into one, so re-rendering does not
/// grow the notes. An unterminated block is taken to run to the end (we wrote it; a cut-off
/// copy is not worth keeping).
pub fn user_text(description: &str) -> String {
    let lines: Vec<&str> = description.lines().collect();
    let blocks = find_blocks(&lines);
    let blank = |l: &&str| l.trim().is_empty();
    let mut chunks: Vec<&[&str]> = Vec::with_capacity(blocks.len() + 1);
    let mut next = 0;
    for block in &blocks {
        chunks.push(&lines[next..block.begin]);
        next = block.end.map_or(lines.len(), |e| e + 1);
    }
    chunks.push(lines.get(next..).unwrap_or_default());
    let mut kept: Vec<String> = Vec::new();
    for (i, mut chunk) in chunks.into_iter().enumerate() {
        // Leading blank lines are trimmed only where a block was cut off; the user's own
        // layout at the very top stays.
        if i > 0 {
            while let Some((_, rest)) = chunk.split_first().filter(|(f, _)| blank(f)) {
                chunk = rest;
            }
        }
        while let Some((_, rest)) = chunk.split_last().filter(|(l, _)| blank(l)) {
            chunk = rest;
        }
        if !chunk.is_empty() {
            kept.push(chunk.join("\n"));
        }
    }
    kept.join("\n\n").trim_end().to_string()
}

/// Renders a description: the user's text from `existing` (our old block removed), a blank
/// line, then the block. No trailing newline, as PVE strips trailing whitespace on read and
/// the result should compare equal to what we read back.
pub fn render_description(existing: &str, marker: &Marker) -> Result<String, MarkerError> {
    let json = serde_json::to_string_pretty(marker).map_err(|e| MarkerError::InvalidJson {
        message: e.to_string(),
    })?;
    // Backticks occur only inside JSON strings; escaping them keeps a value from closing the fence.
    let json = json.replace('`', "\\u0060");
    let user = user_text(existing);
    let block = format!("{MARKER_BEGIN}\n{json}\n{MARKER_END}");
    let description = if user.is_empty() {
        block
    } else {
        format!("{user}\n\n{block}")
    };
    if description.len() > MAX_DESCRIPTION_LEN {
        return Err(MarkerError::TooLong {
            len: description.len(),
        });
    }
    Ok(description)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_marker() -> Marker {
        Marker {
            schema: MARKER_SCHEMA_VERSION,
            owner: Owner {
                namespace: "platform".into(),
                name: "ubuntu".into(),
                uid: "7d1c0c6e-0000-4000-8000-000000000001".into(),
            },
            build_id: "b-20250118-001".into(),
            role: Role::Template,
            vmid: 8024,
            metadata: TemplateMetadata {
                name: "ubuntu-24.04-minimal-20250118-001".into(),
                os: "ubuntu-24.04".into(),
                image_type: "minimal".into(),
                builder: BUILDER.into(),
                builder_version: "0.1.0".into(),
                build_date: NaiveDate::from_ymd_opt(2025, 1, 18).expect("date"),
                build_number: 1,
                source: Some(SourceInfo::CloudImage {
                    url: "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img".into(),
                    checksum: Some("sha256:abc".into()),
                }),
                spec_hash: "0123456789abcdef".into(),
                package_manifest_digest: Some("sha256:def".into()),
                validation: ValidationRecord::Passed {
                    at: DateTime::parse_from_rfc3339("2025-01-18T10:00:00Z")
                        .expect("time")
                        .with_timezone(&Utc),
                },
                created_at: None,
            },
            build: None,
        }
    }

    #[test]
    fn render_and_parse_round_trip_keeping_user_text() {
        let m = sample_marker();
        let d = render_description("Owned by the platform team.\n\nSee wiki.", &m).unwrap();
        assert!(d.starts_with("Owned by the platform team.\n\nSee wiki.\n\n```sombrero\n{"));
        assert!(d.ends_with("\n```"));
        assert_eq!(parse_description(&d).unwrap(), Some(m.clone()));
        assert_eq!(user_text(&d), "Owned by the platform team.\n\nSee wiki.");
        // Re-rendering replaces our block instead of adding a second one.
        let mut m2 = m.clone();
        m2.role = Role::Validation;
        let d2 = render_description(&d, &m2).unwrap();
        assert_eq!(parse_description(&d2).unwrap(), Some(m2));
        assert_eq!(user_text(&d2), user_text(&d));
        // Empty notes: only the block.
        assert!(
            render_description("", &m)
                .unwrap()
                .starts_with(MARKER_BEGIN)
        );
    }

    #[test]
    fn json_uses_the_seed_field_names() {
        let d = render_description("", &sample_marker()).unwrap();
        for key in [
            "\"build_date\": \"2025-01-18\"",
            "\"build_number\": 1",
            "\"builder\": \"sombrero\"",
            "\"type\": \"minimal\"",
            "\"role\": \"template\"",
            "\"vmid\": 8024",
            "\"status\": \"passed\"",
            "\"kind\": \"cloud_image\"",
        ] {
            assert!(d.contains(key), "missing {key} in\n{d}");
        }
    }

    #[test]
    fn user_edits_around_the_block_survive() {
        let m = sample_marker();
        let d = render_description("top", &m).unwrap();
        let edited = format!("{d}\n\nbelow, added later   \n");
        assert_eq!(parse_description(&edited).unwrap(), Some(m.clone()));
        assert_eq!(user_text(&edited), "top\n\nbelow, added later");
        let d2 = render_description(&edited, &m).unwrap();
        assert!(d2.starts_with("top\n\nbelow, added later\n\n```sombrero"));
    }

    #[test]
    fn backticks_in_values_cannot_break_the_fence() {
        let mut m = sample_marker();
        m.metadata.validation = ValidationRecord::Failed {
            at: Utc::now(),
            reason: "boom\n```\nnot json".into(),
        };
        let d = render_description("", &m).unwrap();
        assert_eq!(parse_description(&d).unwrap(), Some(m));
    }

    #[test]
    fn missing_and_malformed_blocks() {
        assert_eq!(parse_description(""), Ok(None));
        assert_eq!(
            parse_description("just notes\n```rust\nfn x(){}\n```"),
            Ok(None)
        );
        assert_eq!(
            parse_description("a\n```sombrero\n{\"schema\":1}"),
            Err(MarkerError::Unterminated { line: 2 })
        );
        assert!(matches!(
            parse_description("```sombrero\n{not json\n```"),
            Err(MarkerError::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_description("```sombrero\n{\"schema\":1}\n```"),
            Err(MarkerError::InvalidJson { .. })
        ));
        let block = render_description("", &sample_marker()).unwrap();
        assert_eq!(
            parse_description(&format!("{block}\n{block}")),
            Err(MarkerError::Multiple { count: 2 })
        );
        // Rendering over a broken description still produces one clean block.
        let fixed =
            render_description(&format!("keep me\n{block}\n{block}"), &sample_marker()).unwrap();
        assert_eq!(parse_description(&fixed).unwrap(), Some(sample_marker()));
        assert_eq!(user_text(&fixed), "keep me");
        assert_eq!(user_text("keep\n```sombrero\n{cut"), "keep");
    }

    #[test]
    fn unknown_fields_and_defaults_are_tolerated() {
        let m = sample_marker();
        let mut v = serde_json::to_value(&m).unwrap();
        v["future_field"] = serde_json::json!({"x": 1});
        v["metadata"]["also_new"] = serde_json::json!(true);
        v["metadata"].as_object_mut().unwrap().remove("validation");
        let d = format!("```sombrero\n{v}\n```");
        let parsed = parse_description(&d).unwrap().unwrap();
        assert_eq!(parsed.metadata.validation, ValidationRecord::Pending);
        assert_eq!(parsed.vmid, m.vmid);
    }

    #[test]
    fn too_long_description_is_refused() {
        let err =
            render_description(&"x".repeat(MAX_DESCRIPTION_LEN), &sample_marker()).unwrap_err();
        assert!(matches!(err, MarkerError::TooLong { .. }));
        assert!(err.to_string().contains("shorten"));
    }

    #[test]
    fn ownership_rules() {
        let m = sample_marker();
        assert_eq!(ownership(Some(&m), 8024), Ownership::Ours(Role::Template));
        assert_eq!(ownership(Some(&m), 201), Ownership::Foreign);
        assert_eq!(ownership(None, 8024), Ownership::NotOurs);
        let d = render_description("", &m).unwrap();
        assert!(ownership_of_description(&d, 8024).is_ours());
        assert_eq!(ownership_of_description(&d, 201), Ownership::Foreign);
        assert_eq!(ownership_of_description("hello", 8024), Ownership::NotOurs);
        assert_eq!(
            ownership_of_description("```sombrero\n{broken\n```", 8024),
            Ownership::NotOurs
        );
        let clone = m.retarget(Role::Validation, 9001);
        assert_eq!(
            ownership(Some(&clone), 9001),
            Ownership::Ours(Role::Validation)
        );
        assert_eq!(clone.metadata, m.metadata);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,400}") {
            let _ = parse_description(&s);
            let _ = user_text(&s);
        }

        #[test]
        fn user_text_survives_rendering(text in "[a-zA-Z0-9 .#*\\n-]{0,300}") {
            let m = sample_marker();
            let d = render_description(&text, &m).unwrap();
            prop_assert_eq!(parse_description(&d).unwrap(), Some(m.clone()));
            prop_assert_eq!(user_text(&d), text.trim_end().to_string());
            // Rendering is idempotent.
            prop_assert_eq!(render_description(&d, &m).unwrap(), d);
        }
    }
}
