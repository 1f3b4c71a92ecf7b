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
    #[error("the package manifest in the sombrero block cannot be read: {message}")]
    InvalidManifest { message: String },
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

/// Progress of a build (`crate::builder`), kept in the build VM's marker so an interrupted build
/// resumes where it stopped; on the template it keeps the package manifest (the baseline of
/// validation's `packageDrift`).
///
/// The manifest is stored compressed ([`BuildProgress::set_packages`], read with
/// [`BuildProgress::packages`]): ~600 `name=version` lines are 15–17 KB of text, 6.9–7.3 KB
/// as gzip + base64, right at the 8 KiB description limit next to the rest of the marker
/// (~1 KB). [`render_description_fitting`] then keeps names only (~3.5 KB: the drift baseline,
/// which compares names), and drops the list only when even that does not fit next to the
/// user's notes; `metadata.package_manifest_digest` (over the full list) always stays.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildProgress {
    /// The last build stage that finished (`crate::builder::Stage` names: `CreateVm`, `Provision`, ...).
    pub stage: String,
    /// The manifest in plain text, as markers written before the compressed form hold it.
    /// Read by [`BuildProgress::packages`]; new markers leave it empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// The manifest lines (`name=version`, or names only when that did not fit) joined with
    /// `\n`, gzip-compressed, standard base64 with padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages_gz: Option<String>,
}

/// Largest decompressed manifest accepted (a real one is ~20 KB): a crafted description must
/// not make us allocate without bound.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

impl BuildProgress {
    /// Stores `manifest` compressed (an empty one clears it).
    pub fn set_packages(&mut self, manifest: &[String]) {
        self.packages.clear();
        self.packages_gz = (!manifest.is_empty()).then(|| pack_lines(manifest));
    }

    /// The recorded manifest, decoded; empty when none was recorded. An error when the stored
    /// value is not gzip + base64 (someone edited the notes).
    pub fn packages(&self) -> Result<Vec<String>, MarkerError> {
        match &self.packages_gz {
            Some(packed) => unpack_lines(packed),
            None => Ok(self.packages.clone()),
        }
    }

    pub fn has_packages(&self) -> bool {
        self.packages_gz.is_some() || !self.packages.is_empty()
    }

    pub fn clear_packages(&mut self) {
        self.packages.clear();
        self.packages_gz = None;
    }

    /// Keeps only the package names (enough for drift, which compares names).
    fn reduce_to_names(&mut self) -> Result<(), MarkerError> {
        let names: Vec<String> = self
            .packages()?
            .iter()
            .map(|l| l.split_once('=').map_or(l.as_str(), |(n, _)| n).to_string())
            .collect();
        self.set_packages(&names);
        Ok(())
    }
}

fn pack_lines(lines: &[String]) -> String {
    use base64::Engine as _;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write as _;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(lines.join("\n").as_bytes());
    let bytes = gz.finish().unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unpack_lines(packed: &str) -> Result<Vec<String>, MarkerError> {
    use base64::Engine as _;
    use std::io::Read as _;
    let invalid = |why: String| MarkerError::InvalidManifest { message: why };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(packed.trim())
        .map_err(|e| invalid(format!("not base64: {e}")))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| invalid(format!("not gzip-compressed UTF-8: {e}")))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(invalid(format!(
            "larger than {MAX_MANIFEST_BYTES} bytes decompressed"
        )));
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
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

    /// The recorded package manifest, decoded (empty when none was recorded).
    pub fn package_manifest(&self) -> Result<Vec<String>, MarkerError> {
        self.build
            .as_ref()
            .map_or(Ok(Vec::new()), BuildProgress::packages)
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

/// [`render_description`], shrinking the package manifest until the description fits: the
/// full `name=version` list, else names only, else none (the digest in the metadata stays).
/// `marker` is left as written. `TooLong` only when even the marker without a manifest does
/// not fit next to the user's notes.
pub fn render_description_fitting(
    existing: &str,
    marker: &mut Marker,
) -> Result<String, MarkerError> {
    match render_description(existing, marker) {
        Err(MarkerError::TooLong { .. })
            if marker
                .build
                .as_ref()
                .is_some_and(BuildProgress::has_packages) => {}
        other => return other,
    }
    if let Some(b) = marker.build.as_mut() {
        // An unreadable manifest cannot be shortened; dropping it is all that is left.
        if b.reduce_to_names().is_ok()
            && let Ok(d) = render_description(existing, marker)
        {
            return Ok(d);
        }
    }
    if let Some(b) = marker.build.as_mut() {
        b.clear_packages();
    }
    render_description(existing, marker)
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

    /// A deterministic, realistic Debian/Ubuntu manifest: `n` sorted `name=version` lines, names
    /// 5–30 characters built like real ones (a prefix such as `lib` or `python3-`, one or two
    /// common words, a soname digit or a `-dev`/`-common`/`-data` suffix), versions with
    /// epochs, `ubuntu`/`build` revisions, `+dfsg`, and runs of binary packages sharing their
    /// source package's version. It compresses like a real list: 600 lines are ~15 KB of
    /// text, ~6.8 KB as gzip + base64 (a real Debian 12 host's list, 600 of its 712 lines
    /// picked at random: 15.1 KB, 6.9 KB).
    pub(crate) fn realistic_manifest(n: usize) -> Vec<String> {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        const PREFIX: [&str; 16] = [
            "", "", "", "", "", "", "lib", "lib", "lib", "lib", "python3-", "gir1.2-", "fonts-",
            "linux-", "perl-", "node-",
        ];
        const WORD: [&str; 96] = [
            "acl",
            "apt",
            "attr",
            "audit",
            "bash",
            "binutils",
            "blkid",
            "bsd",
            "bz2",
            "cairo",
            "cap",
            "cloud",
            "com",
            "core",
            "crypt",
            "cups",
            "curl",
            "dbus",
            "debconf",
            "dev",
            "dns",
            "drm",
            "dpkg",
            "e2fs",
            "elf",
            "event",
            "expat",
            "fdisk",
            "ffi",
            "file",
            "font",
            "fuse",
            "gcc",
            "gdbm",
            "gio",
            "glib",
            "gmp",
            "gnutls",
            "gpg",
            "grub",
            "gssapi",
            "gtk",
            "hogweed",
            "icu",
            "idn",
            "init",
            "iproute",
            "isc",
            "jansson",
            "json",
            "kmod",
            "krb5",
            "ldap",
            "lz4",
            "lzma",
            "magic",
            "mount",
            "ncurses",
            "net",
            "nettle",
            "netplan",
            "nftables",
            "nghttp",
            "nss",
            "numa",
            "open",
            "pam",
            "pango",
            "pcre",
            "perl",
            "pixman",
            "png",
            "policykit",
            "popt",
            "proc",
            "psl",
            "python",
            "readline",
            "rtmp",
            "sasl",
            "seccomp",
            "selinux",
            "semanage",
            "sepol",
            "smart",
            "snap",
            "sqlite",
            "ssh",
            "ssl",
            "system",
            "tasn",
            "tinfo",
            "udev",
            "unistring",
            "xml",
            "xxhash",
        ];
        const SUFFIX: [&str; 20] = [
            "", "", "", "", "-dev", "-common", "-data", "-bin", "-utils", "0", "1", "2", "6",
            "t64", "-doc", "-base", "-tools", "3", "-modules", "-gnutls",
        ];
        let mut lines = std::collections::BTreeSet::new();
        let mut version = String::new();
        while lines.len() < n {
            let pick = |i: u64| WORD[i as usize];
            let stem = if next(3) == 0 {
                format!("{}{}", pick(next(96)), pick(next(96)))
            } else {
                pick(next(96)).to_string()
            };
            let name = format!(
                "{}{stem}{}",
                PREFIX[next(PREFIX.len() as u64) as usize],
                SUFFIX[next(SUFFIX.len() as u64) as usize]
            );
            if !(5..=30).contains(&name.len()) {
                continue;
            }
            // A third of the packages come from the previous one's source package.
            if version.is_empty() || next(3) != 0 {
                let epoch = if next(10) == 0 { "1:" } else { "" };
                let mut upstream = format!("{}.{}", next(12), next(40));
                if next(2) == 0 {
                    upstream.push_str(&format!(".{}", next(30)));
                }
                if next(10) == 0 {
                    upstream.push_str("+dfsg");
                }
                let revision = match next(4) {
                    0 => format!("{}", 1 + next(5)),
                    1 => format!("{}build{}", 1 + next(5), 1 + next(3)),
                    _ => format!("{}ubuntu{}.{}", next(4), 1 + next(9), next(6)),
                };
                version = format!("{epoch}{upstream}-{revision}");
            }
            lines.insert(format!("{name}={version}"));
        }
        lines.into_iter().collect()
    }

    /// A template marker with values of real length (hashes, URL, uid, times).
    fn full_size_marker() -> Marker {
        let mut m = sample_marker();
        m.build_id = "b-20250118101530".into();
        m.metadata.spec_hash = "0123456789abcdef".into();
        m.metadata.package_manifest_digest = Some(format!("sha256:{}", "d".repeat(64)));
        m.metadata.source = Some(SourceInfo::CloudImage {
            url: "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img"
                .into(),
            checksum: Some(format!("sha256:{}", "c".repeat(64))),
        });
        m.metadata.validation = ValidationRecord::Pending;
        m.metadata.created_at = Some(Utc::now());
        m.build = Some(BuildProgress {
            stage: "Finalize".into(),
            ..Default::default()
        });
        m
    }

    #[test]
    fn manifest_round_trips_compressed() {
        let manifest = realistic_manifest(50);
        let mut b = BuildProgress::default();
        b.set_packages(&manifest);
        assert!(b.packages.is_empty() && b.packages_gz.is_some());
        assert_eq!(b.packages().unwrap(), manifest);
        let mut m = full_size_marker();
        m.build = Some(b);
        let d = render_description("", &m).unwrap();
        let back = parse_description(&d).unwrap().unwrap();
        assert_eq!(back.package_manifest().unwrap(), manifest);
        b_empty_is_cleared();
    }

    fn b_empty_is_cleared() {
        let mut b = BuildProgress::default();
        b.set_packages(&[]);
        assert!(!b.has_packages());
        assert_eq!(b.packages().unwrap(), Vec::<String>::new());
        assert_eq!(
            sample_marker().package_manifest().unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn old_uncompressed_manifests_still_read() {
        let d = render_description("", &sample_marker()).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(
            &d.lines()
                .skip(1)
                .take_while(|l| *l != "```")
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        v["build"] = serde_json::json!({"stage": "Finalize", "packages": ["a=1", "b=2"]});
        let m = parse_description(&format!("```sombrero\n{v}\n```"))
            .unwrap()
            .unwrap();
        assert_eq!(m.package_manifest().unwrap(), vec!["a=1", "b=2"]);
    }

    #[test]
    fn broken_or_oversized_manifests_are_errors_not_panics() {
        let mut b = BuildProgress {
            packages_gz: Some("not base64!".into()),
            ..Default::default()
        };
        assert!(matches!(
            b.packages(),
            Err(MarkerError::InvalidManifest { .. })
        ));
        b.packages_gz = Some("aGVsbG8=".into()); // base64 of "hello", not gzip
        let e = b.packages().unwrap_err();
        assert!(e.to_string().contains("gzip"), "{e}");
        // 2 MiB of newlines compress to a few KB: refused, not inflated.
        b.set_packages(&vec![String::new(); 2 << 20]);
        assert!(b.packages_gz.as_ref().unwrap().len() < 10_000);
        let e = b.packages().unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    /// Measured (printed with `--nocapture`): 600 realistic lines are 17.4 KB of text, 7.3 KB
    /// as gzip + base64; with the rest of a template marker (~1 KB) the description would be
    /// 8.3 KB, just over the 8 KiB limit, so the versions are dropped and the names (the drift
    /// baseline, 3.5 KB packed, 4.5 KB in all) are kept. 500 lines still fit with versions. (A real Debian 12
    /// host: 600 of its 712 lines, 15.1 KB of text, 6.9 KB packed, ~7.9 KB in all: fits by
    /// ~300 bytes; all 712: names only.)
    #[test]
    fn six_hundred_packages_keep_at_least_their_names() {
        let manifest = realistic_manifest(600);
        let text = manifest.join("\n").len();
        assert!((14_000..20_000).contains(&text), "{text} bytes of text");
        let mut m = full_size_marker();
        if let Some(b) = m.build.as_mut() {
            b.set_packages(&manifest);
        }
        let packed = m
            .build
            .as_ref()
            .and_then(|b| b.packages_gz.clone())
            .unwrap();
        let full = render_description("", &m).map(|d| d.len());
        let d = render_description_fitting("", &mut m).unwrap();
        let kept = m
            .build
            .as_ref()
            .and_then(|b| b.packages_gz.clone())
            .unwrap();
        eprintln!(
            "600 packages: {text} bytes of text, {} packed; with versions the description is {full:?}; names only {} packed, description {} of {MAX_DESCRIPTION_LEN}",
            packed.len(),
            kept.len(),
            d.len()
        );
        assert!(d.len() <= MAX_DESCRIPTION_LEN);
        let back = parse_description(&d).unwrap().unwrap();
        let names: Vec<String> = manifest
            .iter()
            .map(|l| l.split('=').next().unwrap().to_string())
            .collect();
        let got = back.package_manifest().unwrap();
        // Versions kept, or (as measured) names only: the drift baseline survives either way,
        // with plenty of room left for the user's notes.
        assert!(got == manifest || got == names, "{} lines", got.len());
        assert!(d.len() < MAX_DESCRIPTION_LEN - 2500, "{} bytes", d.len());
        // 500 lines keep their versions.
        let five = realistic_manifest(500);
        let mut m = full_size_marker();
        if let Some(b) = m.build.as_mut() {
            b.set_packages(&five);
        }
        let d = render_description_fitting("", &mut m).unwrap();
        assert_eq!(
            parse_description(&d)
                .unwrap()
                .unwrap()
                .package_manifest()
                .unwrap(),
            five
        );
    }

    #[test]
    fn too_big_manifests_fall_back_to_names_then_to_the_digest() {
        let manifest = realistic_manifest(1000);
        let mut m = full_size_marker();
        if let Some(b) = m.build.as_mut() {
            b.set_packages(&manifest);
        }
        let d = render_description_fitting("", &mut m).unwrap();
        let back = parse_description(&d).unwrap().unwrap();
        let names: Vec<String> = manifest
            .iter()
            .map(|l| l.split('=').next().unwrap().to_string())
            .collect();
        assert_eq!(back.package_manifest().unwrap(), names);
        assert!(back.metadata.package_manifest_digest.is_some());
        // With long user notes not even the names fit: only the digest stays.
        let notes = "n".repeat(5000);
        let mut m = full_size_marker();
        if let Some(b) = m.build.as_mut() {
            b.set_packages(&manifest);
        }
        let d = render_description_fitting(&notes, &mut m).unwrap();
        let back = parse_description(&d).unwrap().unwrap();
        assert_eq!(back.package_manifest().unwrap(), Vec::<String>::new());
        assert_eq!(
            back.metadata.package_manifest_digest,
            m.metadata.package_manifest_digest
        );
        assert!(d.starts_with(&notes));
        // Notes that leave no room at all are still an error.
        assert!(matches!(
            render_description_fitting(&"n".repeat(MAX_DESCRIPTION_LEN), &mut m),
            Err(MarkerError::TooLong { .. })
        ));
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
